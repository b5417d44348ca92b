//! `iris cluster apply FILE` and `iris cluster status`: write the model registry to
//! etcd, and show it with the live members.

use std::path::PathBuf;
use std::sync::Arc;

use crate::roles::EtcdArgs;
use crate::StartError;
use clap::{Args, Subcommand};
use iris_cluster::{members_prefix, models_prefix, EtcdRegistry, Member, ModelEntry, Registry};

#[derive(Args, Debug, Clone)]
pub struct ClusterConn {
    /// etcd endpoints (comma-separated).
    #[arg(long, env = "IRIS_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    #[arg(long, env = "IRIS_CLUSTER", default_value = "default")]
    pub cluster: String,
    #[command(flatten)]
    pub auth: EtcdArgs,
}

impl ClusterConn {
    fn registry(&self) -> Result<EtcdRegistry, StartError> {
        Ok(EtcdRegistry::with_access(
            &self.etcd,
            self.auth.access(None)?,
        ))
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum ClusterCmd {
    /// Write the served models (JSON: `{"models": [{"id", "encoder", "connector",
    /// "language_model", "tp_size"}]}`) to the registry.
    Apply {
        #[command(flatten)]
        conn: ClusterConn,
        file: PathBuf,
    },
    /// Print the registered models and the live members, as JSON.
    Status {
        #[command(flatten)]
        conn: ClusterConn,
    },
}

#[derive(serde::Deserialize)]
struct ModelsFile {
    models: Vec<ModelEntry>,
}

pub async fn run(cmd: ClusterCmd) -> Result<(), StartError> {
    match cmd {
        ClusterCmd::Apply { conn, file } => {
            let invalid = |m: String| StartError::Invalid(format!("{}: {m}", file.display()));
            let text = std::fs::read_to_string(&file).map_err(|e| invalid(e.to_string()))?;
            let f: ModelsFile = serde_json::from_str(&text)
                .map_err(|e| invalid(format!("not a models file: {e}")))?;
            for m in &f.models {
                if m.id.is_empty() {
                    return Err(invalid("a model without an id".into()));
                }
                if m.tp_size < 1 {
                    return Err(invalid(format!("model `{}`: tp_size must be ≥ 1", m.id)));
                }
            }
            let reg: Arc<dyn Registry> = Arc::new(conn.registry()?);
            for m in &f.models {
                let key = format!("{}{}", models_prefix(&conn.cluster), m.id);
                reg.put(key, serde_json::to_vec(m)?).await?;
            }
            println!(
                "applied {} model(s) to cluster `{}`",
                f.models.len(),
                conn.cluster
            );
        }
        ClusterCmd::Status { conn } => {
            let reg = conn.registry()?;
            let models: Vec<ModelEntry> = reg
                .get_prefix(models_prefix(&conn.cluster))
                .await?
                .into_iter()
                .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
                .collect();
            let members: Vec<Member> = reg
                .get_prefix(members_prefix(&conn.cluster))
                .await?
                .into_iter()
                .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "cluster": conn.cluster,
                    "models": models,
                    "members": members,
                }))?
            );
        }
    }
    Ok(())
}
