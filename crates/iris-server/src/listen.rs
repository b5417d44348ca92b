//! The sockets every role serves on. Each accepted connection holds one of a listener's
//! `max_connections` slots (over the limit it is closed at once), does its TLS handshake
//! (rustls, when configured; mutual when a client CA is given) off the accept loop, and
//! is closed when its peer goes quiet: a read that waits longer than `idle` (gRPC: the
//! server pings every third of that, so a live peer always answers) or a write the peer
//! does not take for `idle`. HTTP/1 connections also get `header` to send each request
//! head (idle keep-alive connections included) and each piece of a body.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::metrics::Metrics;

/// How long a connection may stay silent, and how many may be open.
#[derive(Debug, Clone, Copy)]
pub struct ConnPolicy {
    pub max_connections: usize,
    /// A read or a write that waits this long closes the connection.
    pub idle: Duration,
    /// HTTP: the time to send a request head, and each piece of its body.
    pub header: Duration,
}

impl Default for ConnPolicy {
    fn default() -> Self {
        ConnPolicy {
            max_connections: 1024,
            idle: Duration::from_secs(60),
            header: Duration::from_secs(10),
        }
    }
}

/// PEM files for a TLS listener (or a TLS client).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate this CA signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

pub fn read_certs(path: &Path) -> io::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> io::Result<rustls::pki_types::PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's rustls config: its certificate chain and key, ALPN `alpn`, and client
/// certificates required when `client_ca` is set.
pub fn server_tls(files: &TlsFiles, alpn: &[&[u8]]) -> io::Result<Arc<rustls::ServerConfig>> {
    let bad = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c).map_err(bad)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(bad)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What a listener serves: gRPC connections are closed when reads wait past `idle`
/// (the server pings), HTTP/1 ones when a request head or body piece is late (a
/// streamed answer may run long with the client silent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Grpc,
    Http,
}

/// One accepted connection under its listener's policy.
pub struct Conn {
    io: Box<dyn Io>,
    idle: Duration,
    read_idle: bool,
    read_since: Option<Pin<Box<Sleep>>>,
    write_since: Option<Pin<Box<Sleep>>>,
    info: tonic::transport::server::TcpConnectInfo,
    metrics: Arc<Metrics>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// Polls `timer` (started on the first wait) and fails the wait once it fires.
    fn waited(
        timer: &mut Option<Pin<Box<Sleep>>>,
        idle: Duration,
        cx: &mut Context<'_>,
        metrics: &Metrics,
        what: &str,
    ) -> Poll<io::Error> {
        let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match t.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics.count_conn_closed(what);
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer was silent for {idle:?} ({what})"),
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn write_op<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut Box<dyn Io>>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match op(Pin::new(&mut self.io), cx) {
            Poll::Ready(r) => {
                self.write_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => Conn::waited(
                &mut self.write_since,
                self.idle,
                cx,
                &self.metrics,
                "write_stall",
            )
            .map(Err),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match Pin::new(&mut me.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                me.read_since = None;
                Poll::Ready(r)
            }
            Poll::Pending if me.read_idle => {
                Conn::waited(&mut me.read_since, me.idle, cx, &me.metrics, "read_idle").map(Err)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_op(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_op(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.open_connections.dec();
    }
}

/// Accepts connections on `listener` under `policy`, each handshaken (TLS) on its own
/// task; the stream of ready connections is what a server serves.
pub fn incoming(
    listener: TcpListener,
    proto: Proto,
    policy: ConnPolicy,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(policy.max_connections.max(1)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: wait, don't spin.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let listener = match proto {
                Proto::Grpc => "grpc",
                Proto::Http => "http",
            };
            metrics
                .connections_accepted
                .get_or_create(&crate::metrics::ListenerLabel {
                    listener: listener.into(),
                })
                .inc();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.count_conn_closed("limit");
                drop(tcp);
                continue;
            };
            let (tx, acceptor, metrics) = (tx.clone(), acceptor.clone(), metrics.clone());
            tokio::spawn(async move {
                if let Some(conn) =
                    handshake(tcp, remote, slot, proto, policy, acceptor, metrics).await
                {
                    let _ = tx.send(conn).await;
                }
            });
        }
    });
    rx
}

async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: OwnedSemaphorePermit,
    proto: Proto,
    policy: ConnPolicy,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    metrics: Arc<Metrics>,
) -> Option<Conn> {
    let _ = tcp.set_nodelay(true);
    let info = tonic::transport::server::TcpConnectInfo {
        local_addr: tcp.local_addr().ok(),
        remote_addr: Some(remote),
    };
    let io: Box<dyn Io> = match acceptor {
        None => Box::new(tcp),
        Some(acc) => match tokio::time::timeout(policy.header, acc.accept(tcp)).await {
            Ok(Ok(tls)) => Box::new(tls),
            Ok(Err(e)) => {
                tracing::debug!(%remote, "TLS handshake: {e}");
                metrics.count_conn_closed("tls");
                return None;
            }
            Err(_) => {
                metrics.count_conn_closed("tls_timeout");
                return None;
            }
        },
    };
    metrics.open_connections.inc();
    Some(Conn {
        io,
        idle: policy.idle,
        read_idle: proto == Proto::Grpc,
        read_since: None,
        write_since: None,
        info,
        metrics,
        _slot: slot,
    })
}

/// Serves HTTP/1 on `conns` with `app` until `stop`, then lets the requests in
/// flight finish. Request heads must arrive within `policy.header` (idle keep-alive
/// connections are closed then), and each piece of a body too.
pub async fn serve_http(
    mut conns: mpsc::Receiver<Conn>,
    app: axum::Router,
    policy: ConnPolicy,
    stop: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(policy.header);
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            c = conns.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = &mut stop => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(
            tower_http::timeout::RequestBodyTimeout::new(app.clone(), policy.header),
        );
        let served = graceful.watch(builder.serve_connection(TokioIo::new(conn), svc));
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!("http connection: {e}");
            }
        });
    }
    graceful.shutdown().await;
}
