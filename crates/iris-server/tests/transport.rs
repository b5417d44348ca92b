//! Tensors bigger than gRPC's default 4 MB limit cross a real tonic server and client:
//! LLaVA-1.5's visual tokens are 576×4096 (9.4 MB in f32, 4.7 MB in bf16).

use std::sync::Arc;
use std::time::{Duration, Instant};

use iris_models::config::ImageSize;
use iris_proto::v1::connector_server::ConnectorServer;
use iris_server::error::ServeError;
use iris_server::services::{max, ConnectorService};
use iris_server::tiers::{connector_client, ConnectorTier, RemoteConnector, Replicas};
use iris_tensor::Tensor;

/// A connector whose projection doubles its input (the transport is under test here,
/// not the model).
struct Doubling;

#[tonic::async_trait]
impl ConnectorTier for Doubling {
    async fn project(
        &self,
        _: &str,
        f: Tensor,
        _: ImageSize,
        _: Instant,
    ) -> Result<Tensor, ServeError> {
        let v: Vec<f32> = f.to_f32_vec().iter().map(|x| x * 2.0).collect();
        Ok(Tensor::from_f32(v, f.shape()).unwrap())
    }
}

#[tokio::test]
async fn visual_tokens_larger_than_4_mb_cross_grpc() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(max(ConnectorServer::new(ConnectorService(Arc::new(
                Doubling,
            )))))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let remote = RemoteConnector(Replicas::new(&[addr], connector_client).unwrap());
    // Values that bf16 cannot hold exactly, so they travel as f32: 9.4 MB each way.
    let (rows, d) = (576, 4096);
    let x: Vec<f32> = (0..rows * d).map(|i| i as f32 / 7.0).collect();
    let t = Tensor::from_f32(x.clone(), &[rows, d]).unwrap();
    let out = remote
        .project(
            "m",
            t,
            ImageSize::default(),
            Instant::now() + Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(out.shape(), &[rows, d]);
    let got = out.to_f32_vec();
    assert!(got.iter().zip(&x).all(|(g, x)| *g == x * 2.0));
}
