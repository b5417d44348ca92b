//! A tensor-parallel group on this machine (`--tp N`): rank 0 is this process, ranks
//! 1..N are child processes of this binary (`iris tp-rank`) that load their shard and
//! follow rank 0's calls (`iris_engine::tp`), over shared memory. A child whose rank 0
//! disappears fails its next collective (the barrier times out) and exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use clap::Args;
use iris_engine::{Parts, Pipeline, PipelineOptions};
use iris_tensor::{DType, Device};

/// The rank processes of a group. Dropping it waits for them (they return once rank
/// 0's pipeline is dropped) and kills any that do not.
pub struct LocalGroup {
    children: Vec<Child>,
}

impl LocalGroup {
    /// Starts ranks 1..`tp` for `model` and loads rank 0's pipeline (`parts`) here.
    pub fn start(
        model: &Path,
        opts: &PipelineOptions,
        parts: Parts,
        tp: usize,
    ) -> anyhow::Result<(Pipeline, LocalGroup)> {
        let group = iris_comm::cpu::local_group("shm", tp, "group")?;
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for rank in 1..tp {
            let mut c = Command::new(&exe);
            c.arg("tp-rank")
                .arg("--model")
                .arg(model)
                .args(["--rank", &rank.to_string(), "--world", &tp.to_string()])
                .args(["--group", &group, "--device", &opts.device.to_string()]);
            if let Some(d) = opts.dtype {
                c.args(["--dtype", &d.to_string()]);
            }
            children.push(c.spawn()?);
        }
        let group_guard = LocalGroup { children };
        let comm = Arc::new(iris_comm::cpu::CpuComm::join("shm", &group, 0, tp)?);
        let pipe = Pipeline::load_tp(model, opts, parts, comm)
            .map_err(|e| anyhow::anyhow!("loading {} as rank 0 of {tp}: {e}", model.display()))?;
        Ok((pipe, group_guard))
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        for c in &mut self.children {
            // They return when rank 0's model is dropped; a rank stuck otherwise goes.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Groups that live as long as the process (a serving role's).
static KEPT: std::sync::Mutex<Vec<LocalGroup>> = std::sync::Mutex::new(Vec::new());

/// Keeps `group` until the process exits; its ranks exit with it.
pub fn keep(group: LocalGroup) {
    if let Ok(mut k) = KEPT.lock() {
        k.push(group);
    }
}

/// `iris tp-rank`: one rank (not 0) of a local group.
#[derive(Args)]
pub struct RankArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    #[arg(long)]
    group: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    dtype: Option<String>,
}

pub fn rank(a: RankArgs) -> anyhow::Result<()> {
    // Go when rank 0's process goes, however it ends.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets this process's parent-death signal.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
    let device = Device::parse(&a.device)?;
    let dtype = a
        .dtype
        .as_deref()
        .map(|d| DType::parse(d).ok_or_else(|| anyhow::anyhow!("unknown dtype {d}")))
        .transpose()?;
    let comm = Arc::new(iris_comm::cpu::CpuComm::join(
        "shm", &a.group, a.rank, a.world,
    )?);
    let opts = PipelineOptions {
        dtype,
        device,
        ..Default::default()
    };
    let pipe = Pipeline::load_tp(&a.model, &opts, Parts::LANGUAGE, comm.clone())
        .map_err(|e| anyhow::anyhow!("loading {} as rank {}: {e}", a.model.display(), a.rank))?;
    iris_engine::tp::follow(&*pipe.model, &*comm, device)?;
    Ok(())
}
