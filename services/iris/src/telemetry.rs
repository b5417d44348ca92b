//! Logs (text or JSON lines, `RUST_LOG`), and traces over OTLP/HTTP when a member is
//! given `--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`: its `tracing` spans, as
//! OpenTelemetry spans of the service `iris-<role>`, batched and sent from a background
//! thread (the SDK's batch processor, `OTEL_BSP_*` tune it). Both are set up once, as
//! a role starts ([`init`]); without an endpoint no span is made for export
//! ([`iris_server::trace`]).

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::StartError;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Where a role's process sends its spans (none: nowhere), and as which service.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub endpoint: Option<String>,
    pub service: &'static str,
}

/// Logs only (a process that exports no traces).
pub fn init_logging() {
    let _ = init(&Telemetry {
        endpoint: None,
        service: "iris",
    });
}

/// The OTLP/HTTP traces URL of an endpoint: `/v1/traces` added to a bare host.
fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    match trimmed.split_once("://") {
        Some((_, rest)) if rest.contains('/') => trimmed.to_string(),
        _ => format!("{trimmed}/v1/traces"),
    }
}

/// Logs as JSON lines when `IRIS_LOG_JSON` is set, else text, at `RUST_LOG`'s level
/// (default `info`); and with an endpoint, spans at info and above (whatever `RUST_LOG`
/// prints) exported as `t.service`. Called once, before the runtime starts.
pub fn init(t: &Telemetry) -> Result<(), StartError> {
    let provider = match t.endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(traces_url(endpoint))
                .build()
                .map_err(|e| StartError::Invalid(format!("--otlp-endpoint {endpoint}: {e}")))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder().with_service_name(t.service).build())
                    .build(),
            )
        }
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("iris"))
            .with_filter(Targets::new().with_default(LevelFilter::INFO))
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let base = tracing_subscriber::registry().with(traces);
    let installed = if std::env::var_os("IRIS_LOG_JSON").is_some() {
        let fmt = tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter);
        base.with(fmt).try_init()
    } else {
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter);
        base.with(fmt).try_init()
    };
    if let (Some(p), Ok(())) = (provider, installed) {
        let _ = PROVIDER.set(p);
        iris_server::trace::set_enabled(true);
        tracing::info!(
            endpoint = t.endpoint.as_deref(),
            service = t.service,
            "exporting traces over OTLP/HTTP"
        );
    }
    Ok(())
}

/// Sends the spans still batched and stops the exporter (at exit, off the runtime).
pub fn shutdown() {
    iris_server::trace::set_enabled(false);
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.shutdown() {
            eprintln!("warning: flushing traces: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn a_bare_endpoint_gets_the_traces_path() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/otlp/v1/traces"),
            "http://c:4318/otlp/v1/traces"
        );
    }
}
