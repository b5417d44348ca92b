//! What the Iris binaries share: the process bootstrap (logging, the tokio runtime,
//! the allocator setting, a role's error as an exit status), the runners of each role
//! (`roles`: binding, health, etcd registration, signals) and `iris cluster`. The
//! libraries below (iris-server and the rest) start nothing themselves.

use std::process::ExitCode;

use iris_server::error::ServeError;

pub mod cluster_cli;
pub mod roles;
pub mod telemetry;
pub mod tp_group;

/// Why a role could not start or stopped with an error (the binaries print it with
/// its causes, `{:#}`: a message here names the step, its source says what failed).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading {}", path.display())]
    Load {
        path: std::path::PathBuf,
        source: iris_engine::Error,
    },
    #[error("binding {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the gRPC server")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Cluster(#[from] iris_cluster::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("a start-up task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Invalid(String),
}

impl StartError {
    /// `error` while setting up the model `id`.
    pub fn load_id(id: &str, error: impl Into<iris_engine::Error>) -> StartError {
        StartError::Load {
            path: id.into(),
            source: error.into(),
        }
    }

    /// `error` while loading the model folder `path`.
    pub fn load(path: &std::path::Path, error: impl Into<iris_engine::Error>) -> StartError {
        StartError::Load {
            path: path.to_path_buf(),
            source: error.into(),
        }
    }
}

pub use telemetry::{init_logging, Telemetry};

/// Runs a server role on a two-worker tokio runtime, with logging (and traces, where
/// `telemetry` has an endpoint: flushed when the role ends).
pub fn run_role<F, E>(telemetry: Telemetry, f: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    telemetry::init(&telemetry)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(f);
    telemetry::shutdown();
    Ok(result?)
}

/// What a binary returns: success, or the error printed with its causes.
pub fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The entry of the one-role binaries (`iris-gateway`, `iris-encoder`, ...): parse
/// `A`, then run the role.
pub fn main_with<A, F, Fut, E>(f: F) -> ExitCode
where
    A: roles::Role,
    F: FnOnce(A) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    #[derive(clap::Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    iris_tensor::keep_freed_memory();
    // A rank of a local tensor-parallel group (`--tp N`): this binary, started by
    // rank 0 (`iris tp-rank`, whichever binary rank 0 is).
    if std::env::args().nth(1).as_deref() == Some("tp-rank") {
        #[derive(clap::Parser)]
        struct Rank {
            #[arg(hide = true)]
            _cmd: String,
            #[command(flatten)]
            args: tp_group::RankArgs,
        }
        let r = <Rank as clap::Parser>::parse();
        init_logging();
        return exit(tp_group::rank(r.args));
    }
    let cli = <Cli<A> as clap::Parser>::parse();
    let telemetry = roles::Role::telemetry(&cli.args);
    exit(run_role(telemetry, f(cli.args)))
}
