//! The CPU communicator: ranks as separate processes, every collective built on one
//! primitive of a byte transport — each rank's bytes to every rank (`exchange`). With
//! the few ranks a CPU group has (2–8) and a decode step's sizes (a few KiB to MiB),
//! gathering whole buffers and reducing locally is one round trip, fewer than a ring's
//! 2(N−1); every rank sums the same buffers in rank order, so every rank gets the same
//! bits. Two transports: shared memory between the processes of one host
//! ([`crate::shm::Shm`]) and TCP between hosts ([`Tcp`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use iris_tensor::{DType, Tensor};

use crate::{Communicator, Error, Result};

/// Moves bytes between the ranks of a group.
pub trait Transport: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `data`, indexed by rank (this rank's included). Every rank must
    /// call it, in the same order of operations.
    fn exchange(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Whether the other ranks are still there (see [`Communicator::check`]).
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// A [`Communicator`] over a byte transport.
#[derive(Debug)]
pub struct CpuComm {
    t: Box<dyn Transport>,
    /// Collectives run and the time spent in them (for benchmarks).
    calls: std::sync::atomic::AtomicU64,
    nanos: std::sync::atomic::AtomicU64,
}

impl CpuComm {
    pub fn new(t: impl Transport + 'static) -> CpuComm {
        CpuComm {
            t: Box::new(t),
            calls: Default::default(),
            nanos: Default::default(),
        }
    }

    /// Collectives run so far and the seconds spent in them (waiting for the other
    /// ranks included).
    pub fn time_in_collectives(&self) -> (u64, f64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.calls.load(Relaxed),
            self.nanos.load(Relaxed) as f64 * 1e-9,
        )
    }

    fn exchange(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let t = Instant::now();
        let out = self.t.exchange(data);
        self.calls.fetch_add(1, Relaxed);
        self.nanos.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        out
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Where `world` ranks on this machine meet over `transport`: for `shm` a file name in
/// the temporary folder (unique to this process and `tag`), for `tcp` `world` free
/// loopback addresses, comma-separated.
pub fn local_group(transport: &str, world: usize, tag: &str) -> Result<String> {
    match transport {
        "shm" => Ok(std::env::temp_dir()
            .join(format!("iris-{tag}-{}", std::process::id()))
            .display()
            .to_string()),
        "tcp" => (0..world)
            .map(|_| {
                // Bound and released: the ranks bind them right after.
                TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.to_string())
                    .map_err(|e| Error::Collective(format!("tcp: a free port: {e}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(|a| a.join(",")),
        other => Err(Error::Collective(format!(
            "transport `{other}`: expected shm or tcp"
        ))),
    }
}

impl CpuComm {
    /// Joins `group` (see [`local_group`]; for `tcp` every rank's address) as `rank` of
    /// `world` over `transport`.
    pub fn join(transport: &str, group: &str, rank: usize, world: usize) -> Result<CpuComm> {
        match transport {
            "shm" => Ok(CpuComm::new(crate::shm::Shm::join(
                std::path::Path::new(group),
                rank,
                world,
                crate::shm::DEFAULT_SLOT_BYTES,
            )?)),
            "tcp" => {
                let addrs = group
                    .split(',')
                    .map(|a| a.parse())
                    .collect::<std::result::Result<Vec<SocketAddr>, _>>()
                    .map_err(|e| Error::Collective(format!("tcp group `{group}`: {e}")))?;
                if addrs.len() != world {
                    return Err(Error::Collective(format!(
                        "tcp group of {} addresses for {world} ranks",
                        addrs.len()
                    )));
                }
                Ok(CpuComm::new(Tcp::join(&addrs, rank)?))
            }
            other => Err(Error::Collective(format!(
                "transport `{other}`: expected shm or tcp"
            ))),
        }
    }
}

impl Communicator for CpuComm {
    fn rank(&self) -> usize {
        self.t.rank()
    }

    fn world_size(&self) -> usize {
        self.t.world_size()
    }

    fn all_reduce_sum(&self, t: Tensor) -> Result<Tensor> {
        if self.world_size() == 1 {
            return Ok(t);
        }
        let device = t.device();
        let mine = t.host_f32()?;
        let all = self.exchange(&f32_bytes(&mine))?;
        let mut sum = vec![0f32; mine.len()];
        for (r, b) in all.iter().enumerate() {
            if b.len() != mine.len() * 4 {
                return Err(Error::Collective(format!(
                    "all-reduce: rank {r} sent {} values, this rank {}",
                    b.len() / 4,
                    mine.len()
                )));
            }
            for (s, x) in sum.iter_mut().zip(bytes_f32(b)) {
                *s += x;
            }
        }
        Ok(Tensor::from_f32(sum, t.shape())?.to_device(device)?)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if self.world_size() == 1 {
            return Ok(t.to_dtype(DType::F32)?);
        }
        let rows = t.rows();
        let all = self.exchange(&f32_bytes(&t.host_f32()?))?;
        let parts = all
            .iter()
            .enumerate()
            .map(|(r, b)| {
                let v = bytes_f32(b);
                if rows == 0 || !v.len().is_multiple_of(rows) {
                    return Err(Error::Collective(format!(
                        "all-gather: rank {r} sent {} values for {rows} rows",
                        v.len()
                    )));
                }
                let d = v.len() / rows;
                Ok(Tensor::from_f32(v, &[rows, d])?)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = parts.iter().collect();
        Ok(Tensor::cat_cols(&refs)?.to_device(t.device())?)
    }

    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        if root >= self.world_size() {
            return Err(Error::BadRank {
                rank: root,
                world_size: self.world_size(),
            });
        }
        let mine = if self.rank() == root { data } else { &[] };
        Ok(self.exchange(mine)?.swap_remove(root))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(&[]).map(|_| ())
    }

    fn check(&self) -> Result<()> {
        self.t.check()
    }
}

/// A full mesh of TCP connections (`TCP_NODELAY`), one per pair of ranks: for ranks on
/// different hosts.
#[derive(Debug)]
pub struct Tcp {
    rank: usize,
    /// Connections to every other rank, by rank (`None` at this rank's index): a
    /// handle that writes and one that reads, so sending and receiving never wait on
    /// each other.
    peers: Vec<Option<Peer>>,
}

#[derive(Debug)]
struct Peer {
    writer: Mutex<TcpStream>,
    reader: Mutex<TcpStream>,
}

impl Peer {
    fn new(s: TcpStream) -> std::io::Result<Peer> {
        Ok(Peer {
            reader: Mutex::new(s.try_clone()?),
            writer: Mutex::new(s),
        })
    }
}

/// How long ranks wait for each other while the group forms.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A peer cut off by a partition sends no reset: the kernel probes an idle
/// connection after 1 s without traffic, every second, and gives up after 3
/// unanswered probes; data left unacknowledged for 5 s fails the connection too
/// (`TCP_USER_TIMEOUT`). A collective waiting on such a peer then fails (the group
/// breaks, its streams move) instead of waiting for TCP's own timeout (minutes). A
/// slow rank is not silent: its kernel answers the probes while it computes.
fn detect_silence(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt reads one c_int from a live stack value, on a socket
        // that stays open for the call.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 5000)
}

impl Tcp {
    /// Joins the group whose ranks listen at `addrs` (rank `r` at `addrs[r]`): binds
    /// this rank's address, connects to the ranks below it and accepts the ranks above.
    pub fn join(addrs: &[SocketAddr], rank: usize) -> Result<Tcp> {
        let at = addrs.get(rank).ok_or(Error::BadRank {
            rank,
            world_size: addrs.len(),
        })?;
        let listener =
            TcpListener::bind(at).map_err(|e| Error::Collective(format!("tcp bind {at}: {e}")))?;
        let names: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        Tcp::join_bound(listener, &names, rank, 0)
    }

    /// [`Tcp::join`] with this rank's listener already bound (to the address the
    /// others know as `addrs[rank]`); the others' addresses may be host names,
    /// resolved as the connections are made (a peer's name may appear late). Each
    /// connection opens with `token` and its rank: a connection with another token (a
    /// rank of an earlier group at the same address, a stray client) is closed and
    /// the wait goes on.
    pub fn join_bound(
        listener: TcpListener,
        addrs: &[String],
        rank: usize,
        token: u64,
    ) -> Result<Tcp> {
        let n = addrs.len();
        if rank >= n {
            return Err(Error::BadRank {
                rank,
                world_size: n,
            });
        }
        let io = |what: &str, e: std::io::Error| Error::Collective(format!("tcp {what}: {e}"));
        let mut peers: Vec<Option<Peer>> = (0..n).map(|_| None).collect();
        let deadline = Instant::now() + JOIN_TIMEOUT;
        for (r, addr) in addrs.iter().enumerate().take(rank) {
            let mut s = loop {
                match TcpStream::connect(addr.as_str()) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io(&format!("connect to rank {r}"), e)),
                }
            };
            s.set_nodelay(true).map_err(|e| io("nodelay", e))?;
            detect_silence(&s).map_err(|e| io("keepalive", e))?;
            let mut hello = token.to_le_bytes().to_vec();
            hello.extend_from_slice(&(rank as u64).to_le_bytes());
            s.write_all(&hello).map_err(|e| io("hello", e))?;
            peers[r] = Some(Peer::new(s).map_err(|e| io("clone", e))?);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| io("listener", e))?;
        let mut waiting = n - rank - 1;
        while waiting > 0 {
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(Error::Collective(format!(
                            "tcp: {waiting} rank(s) above {rank} did not connect in {JOIN_TIMEOUT:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(io("accept", e)),
            };
            let hello = (|| -> std::io::Result<[u8; 16]> {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut b = [0u8; 16];
                s.read_exact(&mut b)?;
                s.set_read_timeout(None)?;
                s.set_nodelay(true)?;
                detect_silence(&s)?;
                Ok(b)
            })();
            let Ok(b) = hello else { continue };
            let (t, r) = (
                u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(b[8..].try_into().expect("8 bytes")) as usize,
            );
            if t != token || r <= rank || r >= n || peers[r].is_some() {
                continue;
            }
            peers[r] = Some(Peer::new(s).map_err(|e| io("clone", e))?);
            waiting -= 1;
        }
        Ok(Tcp { rank, peers })
    }
}

impl Transport for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    /// A peer whose connection the other end closed (its process died and the
    /// kernel closed its socket) is gone: `poll` reports the hang-up even while bytes
    /// the peer sent before dying are still unread.
    fn check(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        for (r, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            // The reader's descriptor (the writer shares its socket); a reader busy
            // in an exchange will hear of a hang-up itself.
            let fd = match p.reader.try_lock() {
                Ok(s) => s.as_raw_fd(),
                Err(_) => continue,
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: poll reads and writes the one pollfd given, for a socket that
            // stays open while `self` lives, and does not block (timeout 0).
            #[allow(unsafe_code)]
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(Error::Collective(format!(
                    "tcp: rank {r} is gone (its connection closed)"
                )));
            }
        }
        Ok(())
    }

    fn world_size(&self) -> usize {
        self.peers.len()
    }

    fn exchange(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let io = |e: std::io::Error| Error::Collective(format!("tcp exchange: {e}"));
        let n = self.peers.len();
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
        out[self.rank] = data.to_vec();
        let peers: Vec<(usize, &Peer)> = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(r, p)| p.as_ref().map(|p| (r, p)))
            .collect();
        // Sending on one thread and receiving on another: two ranks sending each other
        // more than a socket buffer at once cannot deadlock.
        std::thread::scope(|scope| -> Result<()> {
            let sender = scope.spawn(|| -> Result<()> {
                for (_, p) in &peers {
                    let mut s = p
                        .writer
                        .lock()
                        .map_err(|_| Error::Collective("tcp: poisoned".into()))?;
                    s.write_all(&(data.len() as u64).to_le_bytes())
                        .map_err(io)?;
                    s.write_all(data).map_err(io)?;
                }
                Ok(())
            });
            for (r, p) in &peers {
                let mut s = p
                    .reader
                    .lock()
                    .map_err(|_| Error::Collective("tcp: poisoned".into()))?;
                let mut len = [0u8; 8];
                s.read_exact(&mut len).map_err(io)?;
                let len = u64::from_le_bytes(len) as usize;
                let mut buf = vec![0u8; len];
                s.read_exact(&mut buf).map_err(io)?;
                out[*r] = buf;
            }
            sender
                .join()
                .map_err(|_| Error::Collective("tcp: the sending thread panicked".into()))?
        })?;
        Ok(out)
    }
}
