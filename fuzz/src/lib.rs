//! What the fuzz targets share: the tiny LLaVA fixture served in process (every tier,
//! the gateway, its HTTP router) on one runtime, built once per fuzzing process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use iris_engine::{Engine, EngineConfig, Parts, Pipeline, PipelineOptions};
use iris_image::ImageLimits;
use iris_server::gateway::{Gateway, GatewayLimits, GatewayModel};
use iris_server::metrics::Metrics;
use iris_server::openai::{self, HttpConfig};
use iris_server::tiers::{BatchConfig, LocalConnector, LocalDecoder, LocalVision};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

pub const MODEL: &str = "llava-tiny-hub-f32";

pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub gateway: Arc<Gateway>,
    pub decoder: Arc<LocalDecoder>,
    pub router: axum::Router,
}

/// Small limits, so that every input a fuzzer makes is cheap to serve.
pub fn limits() -> ImageLimits {
    ImageLimits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 22,
    }
}

pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = fixture(MODEL);
        let opts = PipelineOptions {
            dtype: None,
            limits: limits(),
            ..Default::default()
        };
        let p = Arc::new(Pipeline::load_parts(&dir, &opts, Parts::ALL).unwrap());
        let pipelines: HashMap<String, Arc<Pipeline>> = [(MODEL.to_string(), p.clone())].into();
        let metrics = Arc::new(Metrics::new());
        let _guard = rt.enter();
        let (engine, _) = Engine::start_with(
            p,
            EngineConfig {
                kv_blocks: 256,
                ..EngineConfig::default()
            },
            Vec::new(),
        )
        .unwrap();
        let engines = [(MODEL.to_string(), Arc::new(engine))].into();
        let vision = Arc::new(LocalVision::start(
            pipelines.clone(),
            BatchConfig::default(),
            metrics.clone(),
        ));
        let connector = Arc::new(LocalConnector::new(pipelines, metrics.clone()));
        let decoder = Arc::new(LocalDecoder::new(engines, metrics.clone()));
        let gateway = Arc::new(Gateway::new(
            vec![GatewayModel::load(MODEL, &dir, limits()).unwrap()],
            vision,
            connector,
            decoder.clone(),
            GatewayLimits {
                max_images: 2,
                max_tokens: 4,
                image: limits(),
                request_timeout: Duration::from_secs(30),
                ..GatewayLimits::default()
            },
            metrics,
        ));
        let router = openai::router(
            gateway.clone(),
            HttpConfig {
                default_max_tokens: 4,
                ..HttpConfig::default()
            },
        );
        drop(_guard);
        Harness {
            rt,
            gateway,
            decoder,
            router,
        }
    })
}
