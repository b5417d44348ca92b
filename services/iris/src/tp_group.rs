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
            if let Some(q) = opts.quantize {
                c.args(["--quantize", q.name()]);
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
    #[arg(long, default_value = "cpu", value_parser = crate::roles::parse_device)]
    device: Device,
    #[arg(long, value_parser = crate::roles::parse_dtype)]
    dtype: Option<DType>,
    #[arg(long, value_parser = crate::roles::parse_quantize)]
    quantize: Option<iris_tensor::quant::QuantType>,
}

pub fn rank(a: RankArgs) -> anyhow::Result<()> {
    // Go when rank 0's process goes, however it ends.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets this process's parent-death signal.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
    let comm = Arc::new(iris_comm::cpu::CpuComm::join(
        "shm", &a.group, a.rank, a.world,
    )?);
    let opts = PipelineOptions {
        dtype: a.dtype,
        device: a.device,
        quantize: a.quantize,
        ..Default::default()
    };
    let pipe = Pipeline::load_tp(&a.model, &opts, Parts::LANGUAGE, comm.clone())
        .map_err(|e| anyhow::anyhow!("loading {} as rank {}: {e}", a.model.display(), a.rank))?;
    iris_engine::tp::follow(&*pipe.model, &*comm, a.device)?;
    Ok(())
}

// ------------------------------------------------------------------ cluster groups

/// A decoder group of separately started processes (`iris-decoder --tp N --rank R`),
/// one per rank, on one host or several.
#[derive(Args, Debug, Clone)]
pub struct GroupArgs {
    /// This process is rank R of a group of `--tp` ranks started separately (one
    /// process per rank, on any hosts): rank 0 serves and registers the group as one
    /// decoder member, the others follow it. Without it, `--tp N` starts ranks 1..N
    /// here as child processes.
    #[arg(long, env = "IRIS_RANK")]
    pub rank: Option<usize>,
    /// A rank above 0 serves `grpc.health.v1` here while it follows rank 0 (each rank
    /// a Kubernetes pod with probes); rank 0 serves health with the decoder.
    #[arg(long)]
    pub follower_health_addr: Option<std::net::SocketAddr>,
    /// The group's name: its ranks meet in etcd under
    /// `/iris/<cluster>/groups/<model>/<group>/`.
    #[arg(long = "group", default_value = "0")]
    pub group: String,
    /// Every rank's collective address in rank order, comma-separated: the group
    /// meets there over TCP without etcd (one model).
    #[arg(long = "tp-addrs", value_delimiter = ',')]
    pub tp_addrs: Vec<String>,
    /// Where this rank's collectives listen (with etcd; port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub tp_listen: std::net::SocketAddr,
    /// The address the other ranks reach this one's collectives at (default: the
    /// bound one; `host:port`, a name is resolved when they connect).
    #[arg(long)]
    pub tp_advertise: Option<String>,
    /// How the ranks exchange: `shm` (shared memory, one host), `tcp`, `nccl` (GPU
    /// ranks, a CUDA build; rank 0 publishes the NCCL unique id through etcd), or
    /// `auto` (NCCL on GPUs, else shared memory when every rank reports this host,
    /// else TCP).
    #[arg(long, default_value = "auto")]
    pub tp_transport: String,
}

/// What a rank registers under `/groups/<model>/<group>/ranks/<rank>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RankEntry {
    rank: usize,
    world: usize,
    /// Its collectives' TCP address.
    addr: String,
    /// Which host (and filesystem) it runs on: the hostname and the boot id.
    host: String,
    /// This process's registration (a restarted rank has another).
    nonce: u64,
}

/// What rank 0 publishes under `/groups/<model>/<group>/rendezvous` once every rank
/// is registered: how the group meets, and which registration of each rank is in it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Rendezvous {
    token: u64,
    transport: String,
    /// The shared-memory file (`shm`).
    shm: Option<String>,
    /// NCCL's unique id, hex (`nccl`).
    #[serde(default)]
    nccl: Option<String>,
    ranks: Vec<RankEntry>,
}

/// A rank's place in a formed group: its communicator and the etcd registrations that
/// live as long as it serves.
pub struct Formed {
    pub comm: Arc<dyn iris_comm::Communicator>,
    /// The group's key prefix and its ranks' registrations (for [`watch_ranks`]).
    pub prefix: Option<String>,
    ranks: Vec<RankEntry>,
    _leases: Vec<iris_cluster::Lease>,
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The hostname and boot id: processes that report the same one share a kernel and a
/// filesystem (two pods on one node have different hostnames).
fn host_id() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{}/{}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

/// A stable 64-bit digest (FNV-1a) of `s`: the static group's connection token.
fn digest(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where a group's ranks are and how long their registrations last.
pub struct Place<'a> {
    pub reg: Option<Arc<dyn iris_cluster::Registry>>,
    pub cluster: &'a str,
    pub ttl: std::time::Duration,
    pub device: Device,
}

/// Forms rank `rank` of `world` of the group `g` for `model`: through etcd when
/// given, else at the static `--tp-addrs`. Returns once the communicator joins every
/// rank.
pub async fn form(
    at: Place<'_>,
    model: &str,
    g: &GroupArgs,
    rank: usize,
    world: usize,
) -> anyhow::Result<Formed> {
    use anyhow::{bail, Context};
    let Place {
        reg,
        cluster,
        ttl,
        device,
    } = at;
    if rank >= world {
        bail!("--rank {rank} is not below --tp {world}");
    }
    if !["auto", "shm", "tcp", "nccl"].contains(&g.tp_transport.as_str()) {
        bail!(
            "--tp-transport {}: expected auto, shm, tcp or nccl",
            g.tp_transport
        );
    }
    let gpu = matches!(device, Device::Cuda(_));
    if g.tp_transport == "nccl" && !(gpu && cfg!(feature = "cuda")) {
        bail!("--tp-transport nccl: the ranks need --device cuda and a CUDA build");
    }
    let Some(reg) = reg else {
        if g.tp_addrs.len() != world {
            bail!(
                "rank {rank} of {world}: give --etcd, or --tp-addrs with {world} addresses \
                 (got {})",
                g.tp_addrs.len()
            );
        }
        if g.tp_transport == "shm" || g.tp_transport == "nccl" {
            bail!(
                "--tp-addrs forms a TCP group; {} needs --etcd (or a local --tp)",
                g.tp_transport
            );
        }
        let addrs = g.tp_addrs.clone();
        let token = digest(&format!("{model}/{}", g.group));
        let comm = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let at = &addrs[rank];
            let listener =
                std::net::TcpListener::bind(at).with_context(|| format!("binding {at}"))?;
            Ok(iris_comm::cpu::Tcp::join_bound(
                listener, &addrs, rank, token,
            )?)
        })
        .await??;
        return Ok(Formed {
            comm: Arc::new(iris_comm::cpu::CpuComm::new(comm)),
            prefix: None,
            ranks: Vec::new(),
            _leases: Vec::new(),
        });
    };
    let prefix = iris_cluster::group_prefix(cluster, model, &g.group);
    let listener = std::net::TcpListener::bind(g.tp_listen)
        .with_context(|| format!("binding {}", g.tp_listen))?;
    let me = RankEntry {
        rank,
        world,
        addr: match &g.tp_advertise {
            Some(a) => a.clone(),
            None => listener.local_addr()?.to_string(),
        },
        host: host_id(),
        nonce: nonce(),
    };
    let mut leases = vec![
        reg.register(
            format!("{prefix}ranks/{rank}"),
            serde_json::to_vec(&me)?,
            ttl,
        )
        .await?,
    ];
    tracing::info!(model, group = %g.group, rank, world, addr = %me.addr, "waiting for the group");
    let rv = if rank == 0 {
        let ranks = wait_for_ranks(&*reg, &prefix, &me, world).await?;
        let same_host = ranks.iter().all(|r| r.host == me.host);
        let transport = match g.tp_transport.as_str() {
            "auto" if gpu && cfg!(feature = "cuda") => "nccl",
            "auto" if same_host => "shm",
            "auto" => "tcp",
            "shm" if !same_host => bail!("--tp-transport shm: the ranks are on different hosts"),
            t => t,
        };
        let token = nonce();
        let rv = Rendezvous {
            token,
            transport: transport.into(),
            shm: (transport == "shm").then(|| {
                std::env::temp_dir()
                    .join(format!("iris-group-{token:016x}"))
                    .display()
                    .to_string()
            }),
            nccl: if transport == "nccl" {
                Some(nccl_id()?)
            } else {
                None
            },
            ranks,
        };
        leases.push(
            reg.register(format!("{prefix}rendezvous"), serde_json::to_vec(&rv)?, ttl)
                .await?,
        );
        rv
    } else {
        wait_for_rendezvous(&*reg, &prefix, &me).await?
    };
    tracing::info!(model, group = %g.group, rank, transport = %rv.transport, "joining the group");
    let joined = rv.clone();
    let comm = tokio::task::spawn_blocking(
        move || -> anyhow::Result<Arc<dyn iris_comm::Communicator>> {
            if let Some(id) = &joined.nccl {
                return nccl_join(device, rank, world, id);
            }
            Ok(Arc::new(match joined.shm.as_deref() {
                Some(path) => iris_comm::cpu::CpuComm::join("shm", path, rank, world)?,
                None => {
                    let addrs: Vec<String> = joined.ranks.iter().map(|r| r.addr.clone()).collect();
                    iris_comm::cpu::CpuComm::new(iris_comm::cpu::Tcp::join_bound(
                        listener,
                        &addrs,
                        rank,
                        joined.token,
                    )?)
                }
            }))
        },
    )
    .await??;
    Ok(Formed {
        comm,
        prefix: Some(prefix),
        ranks: rv.ranks,
        _leases: leases,
    })
}

/// A new NCCL unique id, hex (rank 0 of a GPU group).
fn nccl_id() -> anyhow::Result<String> {
    #[cfg(feature = "cuda")]
    {
        let id = iris_comm::nccl::unique_id()?;
        Ok(id.iter().map(|b| format!("{b:02x}")).collect())
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("NCCL needs a CUDA build")
}

/// Joins the NCCL group of the hex unique id `id` on `device`.
fn nccl_join(
    device: Device,
    rank: usize,
    world: usize,
    id: &str,
) -> anyhow::Result<Arc<dyn iris_comm::Communicator>> {
    #[cfg(feature = "cuda")]
    {
        let bytes = (0..id.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(id.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| anyhow::anyhow!("the rendezvous's NCCL id: {e}"))?;
        Ok(Arc::new(iris_comm::nccl::Nccl::join(
            device, rank, world, &bytes,
        )?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, rank, world, id);
        anyhow::bail!("the group runs on NCCL: this build has no CUDA")
    }
}

/// The rank registrations a watch of `…/ranks/` holds (those that parse).
fn registered_ranks(view: &iris_cluster::View) -> Vec<RankEntry> {
    view.0
        .values()
        .filter_map(|v| serde_json::from_slice(v).ok())
        .collect()
}

/// Rank 0: waits until ranks 0..`world` are registered, each for a group of `world`
/// (this registration as rank 0); returns them in rank order.
async fn wait_for_ranks(
    reg: &dyn iris_cluster::Registry,
    prefix: &str,
    me: &RankEntry,
    world: usize,
) -> anyhow::Result<Vec<RankEntry>> {
    let mut events = reg.watch(format!("{prefix}ranks/"));
    let mut view = iris_cluster::View::default();
    while let Some(ev) = events.recv().await {
        view.apply(ev);
        let seen = registered_ranks(&view);
        let ranks: Vec<Option<&RankEntry>> = (0..world)
            .map(|r| seen.iter().find(|e| e.rank == r && e.world == world))
            .collect();
        if let Some(other) = seen.iter().find(|e| e.world != world) {
            tracing::warn!(
                rank = other.rank,
                world = other.world,
                "a rank registered for another group size"
            );
        }
        if ranks[0].is_some_and(|r| r.nonce == me.nonce) && ranks.iter().all(Option::is_some) {
            return Ok(ranks.into_iter().flatten().cloned().collect());
        }
    }
    anyhow::bail!("the etcd watch ended before the group formed")
}

/// Ranks above 0: waits for rank 0's rendezvous that includes this registration.
async fn wait_for_rendezvous(
    reg: &dyn iris_cluster::Registry,
    prefix: &str,
    me: &RankEntry,
) -> anyhow::Result<Rendezvous> {
    let key = format!("{prefix}rendezvous");
    let mut events = reg.watch(key.clone());
    let mut view = iris_cluster::View::default();
    while let Some(ev) = events.recv().await {
        view.apply(ev);
        let Some(rv) = view
            .0
            .get(&key)
            .and_then(|v| serde_json::from_slice::<Rendezvous>(v).ok())
        else {
            continue;
        };
        if rv.ranks.get(me.rank).is_some_and(|r| r.nonce == me.nonce) {
            return Ok(rv);
        }
    }
    anyhow::bail!("the etcd watch ended before the group formed")
}

/// Rank 0 of an etcd group: breaks the group (`health`) when a rank of it leaves etcd
/// — its registration replaced (the rank restarted) at once, or missing for two lease
/// TTLs (its lease expired: the process is gone or cut off). Ends when the group breaks
/// or the registry is dropped.
pub fn watch_ranks(
    reg: Arc<dyn iris_cluster::Registry>,
    formed: &Formed,
    health: Arc<iris_engine::tp::GroupHealth>,
    ttl: std::time::Duration,
) {
    let Some(prefix) = formed.prefix.clone() else {
        return;
    };
    let ranks = formed.ranks.clone();
    tokio::spawn(async move {
        let mut events = reg.watch(format!("{prefix}ranks/"));
        let mut view = iris_cluster::View::default();
        let mut seen = Vec::new();
        let mut missing_since: Vec<Option<std::time::Instant>> = vec![None; ranks.len()];
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => {
                        view.apply(ev);
                        seen = registered_ranks(&view);
                    }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            if health.broken().is_some() {
                return;
            }
            for (r, want) in ranks.iter().enumerate() {
                let now = seen.iter().find(|e| e.rank == r);
                match now {
                    Some(e) if e.nonce == want.nonce => missing_since[r] = None,
                    Some(_) => {
                        health.fail(format!("rank {r} restarted (a new registration in etcd)"));
                        return;
                    }
                    None => {
                        let since = *missing_since[r].get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() > 2 * ttl {
                            health.fail(format!("rank {r}'s etcd registration expired"));
                            return;
                        }
                    }
                }
            }
        }
    });
}
