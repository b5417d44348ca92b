//! One request, one trace, across the processes: W3C trace context (`traceparent`)
//! read from each call a member serves (an HTTP header or gRPC metadata) as the parent
//! of its span, and written from the current span onto every tier call it makes. The
//! spans reach a collector through the process's OpenTelemetry layer (the `iris`
//! binaries' `--otlp-endpoint`); until that is on, nothing here makes a span or a
//! header ([`set_enabled`]).

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span making and propagation on (the exporter is running) or off.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `make()`'s span when tracing is on, else a disabled one (nothing recorded).
pub fn span(make: impl FnOnce() -> Span) -> Span {
    if enabled() {
        make()
    } else {
        Span::none()
    }
}

struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        if let (Ok(k), Ok(v)) = (key, value.parse()) {
            self.0.insert(k, v);
        }
    }
}

/// The span of a call this member serves (`path`: the RPC or the HTTP route), its
/// parent the caller's `traceparent` in `headers` (none: a new trace).
pub fn server_span(path: &str, headers: &axum::http::HeaderMap) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!("serve", otel.name = %path, otel.kind = "server");
    let _ = span.set_parent(TraceContextPropagator::new().extract(&Headers(headers)));
    span
}

/// Writes the current span's context onto an outgoing call's metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    let cx = Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut Metadata(metadata));
}

/// Axum middleware: each HTTP request in a server span parented on its `traceparent`.
pub async fn http_layer(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    if !enabled() {
        return next.run(req).await;
    }
    let span = server_span(req.uri().path(), req.headers());
    next.run(req).instrument(span).await
}
