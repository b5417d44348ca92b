//! The shared-memory transport: the ranks of one host map one file under `/dev/shm`
//! (or any folder), each writes its bytes into its own slot, and a counter in the same
//! memory is the barrier. Two sets of slots alternate between operations, so a rank
//! writing the next operation's bytes never overwrites what another rank is still
//! reading (every rank has passed the previous barrier before anyone passes the next).
//! Larger messages than a slot go in several rounds.
//!
//! Layout: a 64-byte header (magic, world size, slot bytes, the barrier counter), then
//! `2 × world` slots of `8 + slot_bytes` bytes (a length, then data).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use crate::cpu::Transport;
use crate::{Error, Result};

const MAGIC: u64 = 0x4952_4953_5348_4d31; // "IRISSHM1"
/// Magic, world, slot bytes, the barrier counter, then each rank's process id.
const PIDS: usize = 4;
/// The most ranks a group may have (their process ids fill the header).
pub const MAX_RANKS: usize = 60;
const HEADER: usize = 8 * (PIDS + MAX_RANKS);

/// Default bytes a rank can send per round (a decode step's all-reduce is a few KiB).
pub const DEFAULT_SLOT_BYTES: usize = 4 << 20;

/// How long a rank waits at a barrier for the others before the operation fails (a
/// rank that died never arrives).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Shm {
    rank: usize,
    world: usize,
    slot_bytes: usize,
    map: MmapMut,
    /// Barriers this rank has passed.
    passed: std::sync::Mutex<u64>,
    path: PathBuf,
}

impl std::fmt::Debug for Shm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Shm(rank {} of {}, {})",
            self.rank,
            self.world,
            self.path.display()
        )
    }
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Collective(format!("shared memory {what}: {e}"))
}

impl Shm {
    /// Joins the group of `world` ranks that share `path` (a name unique to the group:
    /// rank 0 creates the file, the others wait for it), `slot_bytes` a rank's bytes a
    /// round. The file is removed once every rank has mapped it.
    pub fn join(path: &Path, rank: usize, world: usize, slot_bytes: usize) -> Result<Shm> {
        if rank >= world {
            return Err(Error::BadRank {
                rank,
                world_size: world,
            });
        }
        if world > MAX_RANKS {
            return Err(Error::Collective(format!(
                "shared memory: {world} ranks, at most {MAX_RANKS}"
            )));
        }
        let len = HEADER + 2 * world * (8 + slot_bytes);
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        let file = if rank == 0 {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| io(&format!("create {}", path.display()), e))?;
            f.set_len(len as u64).map_err(|e| io("size", e))?;
            f
        } else {
            loop {
                match OpenOptions::new().read(true).write(true).open(path) {
                    Ok(f) if f.metadata().map(|m| m.len()).unwrap_or(0) == len as u64 => break f,
                    _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                    Ok(_) => return Err(Error::Collective(format!(
                        "shared memory {}: not the size of a group of {world} with slots of {slot_bytes}",
                        path.display()
                    ))),
                    Err(e) => return Err(io(&format!("open {}", path.display()), e)),
                }
            }
        };
        // SAFETY: the file is this group's alone (rank 0 created it exclusively); every
        // access to the mapping goes through the header's atomics or a rank's own slot,
        // ordered by the barrier.
        #[allow(unsafe_code)]
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| io("map", e))?;
        let shm = Shm {
            rank,
            world,
            slot_bytes,
            map,
            passed: std::sync::Mutex::new(0),
            path: path.to_path_buf(),
        };
        if rank == 0 {
            shm.word(1).store(world as u64, Ordering::Relaxed);
            shm.word(2).store(slot_bytes as u64, Ordering::Relaxed);
            shm.word(0).store(MAGIC, Ordering::Release);
        } else {
            while shm.word(0).load(Ordering::Acquire) != MAGIC {
                if Instant::now() > deadline {
                    return Err(Error::Collective(
                        "shared memory: rank 0 never initialised".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if shm.word(1).load(Ordering::Relaxed) != world as u64
                || shm.word(2).load(Ordering::Relaxed) != slot_bytes as u64
            {
                return Err(Error::Collective(
                    "shared memory: another group's file (world size or slot size differ)".into(),
                ));
            }
        }
        shm.word(PIDS + rank)
            .store(u64::from(std::process::id()), Ordering::Release);
        // Everyone has mapped it: the name can go (the mapping lives on).
        shm.barrier()?;
        if rank == 0 {
            std::fs::remove_file(path).map_err(|e| io("remove", e))?;
        }
        Ok(shm)
    }

    /// A rank whose process is gone (it died, or was killed), if any.
    fn gone(&self) -> Option<usize> {
        (0..self.world).find(|&r| {
            let pid = self.word(PIDS + r).load(Ordering::Acquire);
            pid != 0 && pid != u64::from(std::process::id()) && !alive(pid as i32)
        })
    }

    /// The `i`-th 8-byte word of the header.
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < HEADER / 8);
        // SAFETY: the mapping is page-aligned and at least HEADER bytes long, so word
        // `i` is an aligned u64 inside it; AtomicU64 has u64's layout, and all ranks
        // access these words only atomically.
        #[allow(unsafe_code)]
        unsafe {
            &*(self.map.as_ptr().add(8 * i) as *const AtomicU64)
        }
    }

    fn slot_offset(&self, set: usize, rank: usize) -> usize {
        HEADER + (set * self.world + rank) * (8 + self.slot_bytes)
    }

    /// Waits until every rank has arrived here as often as this one.
    fn barrier(&self) -> Result<()> {
        let mut passed = self
            .passed
            .lock()
            .map_err(|_| Error::Collective("shared memory: poisoned".into()))?;
        let target = (*passed + 1) * self.world as u64;
        let counter = self.word(3);
        counter.fetch_add(1, Ordering::AcqRel);
        let start = Instant::now();
        let mut spins = 0u32;
        while counter.load(Ordering::Acquire) < target {
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else if spins < 4000 {
                std::thread::yield_now();
            } else {
                // Another rank is descheduled or gone: stop burning its core, and every
                // few milliseconds look whether a rank's process still exists.
                std::thread::sleep(Duration::from_micros(50));
                if spins.is_multiple_of(64) {
                    if let Some(r) = self.gone() {
                        return Err(Error::Collective(format!(
                            "shared memory: rank {r}'s process is gone"
                        )));
                    }
                }
                if start.elapsed() > BARRIER_TIMEOUT {
                    return Err(Error::Collective(format!(
                        "shared memory: {} of {} ranks reached the barrier in {BARRIER_TIMEOUT:?}",
                        counter.load(Ordering::Acquire) - *passed * self.world as u64,
                        self.world
                    )));
                }
            }
        }
        *passed += 1;
        Ok(())
    }

    /// One round: every rank's `data` (at most a slot).
    fn round(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let set = (*self
            .passed
            .lock()
            .map_err(|_| Error::Collective("shared memory: poisoned".into()))?
            % 2) as usize;
        let at = self.slot_offset(set, self.rank);
        // SAFETY: this rank's slot in the current set is written only by this rank, and
        // no rank reads it until the barrier below; the range is inside the mapping.
        #[allow(unsafe_code)]
        unsafe {
            let p = self.map.as_ptr().add(at) as *mut u8;
            std::ptr::copy_nonoverlapping((data.len() as u64).to_le_bytes().as_ptr(), p, 8);
            std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(8), data.len());
        }
        self.barrier()?;
        (0..self.world)
            .map(|r| {
                let at = self.slot_offset(set, r);
                let len = u64::from_le_bytes(self.map[at..at + 8].try_into().expect("8 bytes"));
                if len as usize > self.slot_bytes {
                    return Err(Error::Collective(format!(
                        "shared memory: rank {r} wrote {len} bytes"
                    )));
                }
                Ok(self.map[at + 8..at + 8 + len as usize].to_vec())
            })
            .collect()
    }
}

impl Transport for Shm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn check(&self) -> Result<()> {
        match self.gone() {
            Some(r) => Err(Error::Collective(format!(
                "shared memory: rank {r}'s process is gone"
            ))),
            None => Ok(()),
        }
    }

    fn exchange(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        if data.len() <= self.slot_bytes {
            // The common case: one round, the length travels with the data.
            let first = self.round(data)?;
            if first.iter().all(|b| b.len() < self.slot_bytes) {
                return Ok(first);
            }
            // Someone filled a whole slot: lengths first, then the rest, in rounds.
            return self.rounds(data, first);
        }
        let first = self.round(&data[..self.slot_bytes])?;
        self.rounds(data, first)
    }
}

impl Shm {
    /// Continues an exchange whose first round was full for some rank: each rank's
    /// total length, then rounds of at most a slot until every rank's data is through.
    fn rounds(&self, data: &[u8], first: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let lens: Vec<usize> = self
            .round(&(data.len() as u64).to_le_bytes())?
            .iter()
            .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])) as usize)
            .collect();
        let mut out = first;
        let mut sent = out[self.rank].len();
        while out.iter().zip(&lens).any(|(o, &l)| o.len() < l) {
            let end = (sent + self.slot_bytes).min(data.len());
            let got = self.round(&data[sent..end])?;
            sent = end;
            for (o, g) in out.iter_mut().zip(got) {
                o.extend_from_slice(&g);
            }
        }
        Ok(out)
    }
}

/// Whether process `pid` is running: it exists (signal 0 checks without sending
/// anything) and is not a zombie (exited, not yet reaped by its parent — a rank's
/// parent is often the rank 0 that is asking).
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only asks whether the process exists.
    #[allow(unsafe_code)]
    let r = unsafe { libc::kill(pid, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // `/proc/<pid>/stat`: "pid (comm) S ...", the state after the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => r == 0,
    }
}
