//! The CPU communicator across real processes: this test binary starts itself once per
//! rank (`rank_process`, which does nothing unless `IRIS_COMM_RANK` is set) over shared
//! memory and over TCP, for groups of 2, 3 and 4, and every rank checks every
//! collective's result exactly.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};

use iris_comm::cpu::{CpuComm, Tcp};
use iris_comm::shm::Shm;
use iris_comm::Communicator;
use iris_tensor::Tensor;

fn value(rank: usize, i: usize) -> f32 {
    ((rank * 7919 + i * 31) % 1000) as f32 / 64.0 - 7.0
}

/// What each rank runs: every collective, checked against what the ranks sent.
fn check(comm: &dyn Communicator) {
    let (rank, world) = (comm.rank(), comm.world_size());
    // All-reduce: small (a decode step's hidden state) and past a slot (rounds).
    for n in [2048usize, 700_001] {
        let mine = Tensor::from_f32((0..n).map(|i| value(rank, i)).collect(), &[n]).unwrap();
        let sum = comm.all_reduce_sum(mine).unwrap().to_f32_vec();
        for (i, s) in sum.iter().enumerate() {
            // Summed in rank order on every rank: the same bits everywhere.
            let want = (0..world).fold(0f32, |a, r| a + value(r, i));
            assert_eq!(
                s.to_bits(),
                want.to_bits(),
                "rank {rank}: all-reduce[{i}] of {n}"
            );
        }
    }
    // All-gather of [2, rank + 1] pieces: side by side in rank order.
    let d = rank + 1;
    let piece: Vec<f32> = (0..2 * d).map(|i| (rank * 100 + i) as f32).collect();
    let all = comm
        .all_gather(&Tensor::from_f32(piece, &[2, d]).unwrap())
        .unwrap();
    let total: usize = (1..=world).sum();
    assert_eq!(all.shape(), &[2, total]);
    let v = all.to_f32_vec();
    let mut col = 0;
    for r in 0..world {
        for c in 0..r + 1 {
            for row in 0..2 {
                assert_eq!(
                    v[row * total + col + c],
                    (r * 100 + row * (r + 1) + c) as f32
                );
            }
        }
        col += r + 1;
    }
    // Broadcast of bytes from the last rank, larger than a slot.
    let root = world - 1;
    let msg: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let mine = if rank == root {
        msg.clone()
    } else {
        vec![1, 2, 3]
    };
    assert_eq!(comm.broadcast_bytes(&mine, root).unwrap(), msg);
    assert!(comm.broadcast_bytes(&mine, world).is_err());
    comm.barrier().unwrap();
}

#[test]
fn rank_process() {
    let Ok(rank) = std::env::var("IRIS_COMM_RANK") else {
        return; // not started as a rank
    };
    let rank: usize = rank.parse().unwrap();
    let world: usize = std::env::var("IRIS_COMM_WORLD").unwrap().parse().unwrap();
    let group = std::env::var("IRIS_COMM_GROUP").unwrap();
    let transport = std::env::var("IRIS_COMM_TRANSPORT").unwrap();
    if std::env::var_os("IRIS_COMM_DIE").is_some() {
        // The dead-rank case: rank 1 joins, then exits; rank 0 sees it gone between
        // collectives (`check`), and its next collective fails.
        let comm = match transport.as_str() {
            "shm" => {
                CpuComm::new(Shm::join(std::path::Path::new(&group), rank, world, 1 << 20).unwrap())
            }
            _ => {
                let addrs: Vec<SocketAddr> = group.split(',').map(|a| a.parse().unwrap()).collect();
                CpuComm::new(Tcp::join(&addrs, rank).unwrap())
            }
        };
        comm.barrier().unwrap();
        if rank == 0 {
            comm.check().expect("every rank is there");
        }
        comm.barrier().unwrap();
        if rank == 1 {
            std::process::exit(0);
        }
        let t0 = std::time::Instant::now();
        let err = loop {
            match comm.check() {
                Err(e) => break e.to_string(),
                Ok(()) => {
                    assert!(
                        t0.elapsed() < std::time::Duration::from_secs(20),
                        "never seen gone"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        };
        assert!(err.contains("rank 1") && err.contains("gone"), "{err}");
        let err = comm
            .all_reduce_sum(Tensor::from_f32(vec![1.0; 8], &[8]).unwrap())
            .unwrap_err()
            .to_string();
        let why = if transport == "shm" {
            "rank 1's process is gone"
        } else {
            "tcp exchange"
        };
        assert!(err.contains(why), "{err}");
        return;
    }
    match transport.as_str() {
        "shm" => {
            let t = Shm::join(std::path::Path::new(&group), rank, world, 1 << 20).unwrap();
            check(&CpuComm::new(t));
        }
        "tcp" => {
            let addrs: Vec<SocketAddr> = group.split(',').map(|a| a.parse().unwrap()).collect();
            check(&CpuComm::new(Tcp::join(&addrs, rank).unwrap()));
        }
        other => panic!("transport {other}"),
    }
}

/// Starts `world` rank processes and waits for them all; each must pass `check`.
fn run_group(transport: &str, world: usize, group: &str) {
    run_group_with(transport, world, group, &[]);
}

fn run_group_with(transport: &str, world: usize, group: &str, env: &[(&str, &str)]) {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "rank_process",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env("IRIS_COMM_RANK", rank.to_string())
                .env("IRIS_COMM_WORLD", world.to_string())
                .env("IRIS_COMM_GROUP", group)
                .env("IRIS_COMM_TRANSPORT", transport)
                .envs(env.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{transport} world {world}: rank {rank} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn shared_memory_collectives_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    for world in [2, 3, 4] {
        let path = dir.path().join(format!("group-{world}"));
        run_group("shm", world, path.to_str().unwrap());
        assert!(
            !path.exists(),
            "the group's file is removed once every rank mapped it"
        );
    }
}

/// A rank whose process is gone is seen gone between collectives (`check`) and fails
/// the others' next collective — over shared memory not after the barrier's 30 s (its
/// process id is in the shared header), even while the dead process is a zombie its
/// parent has not reaped; over TCP from the closed connection.
#[test]
fn a_dead_rank_fails_the_next_collective() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dies");
    run_group_with("shm", 2, path.to_str().unwrap(), &[("IRIS_COMM_DIE", "1")]);
    let addrs: Vec<String> = (0..2)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        })
        .collect();
    run_group_with("tcp", 2, &addrs.join(","), &[("IRIS_COMM_DIE", "1")]);
}

#[test]
fn tcp_collectives_across_processes() {
    for world in [2, 3, 4] {
        // Free ports: bound and released (the ranks bind them right after).
        let addrs: Vec<String> = (0..world)
            .map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            })
            .collect();
        run_group("tcp", world, &addrs.join(","));
    }
}

#[test]
fn a_group_of_one_is_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let t = Shm::join(&dir.path().join("one"), 0, 1, 1024).unwrap();
    let comm = CpuComm::new(t);
    let x = Tensor::from_f32(vec![1.0, -2.0], &[1, 2]).unwrap();
    assert_eq!(
        comm.all_reduce_sum(x.clone()).unwrap().to_f32_vec(),
        vec![1.0, -2.0]
    );
    assert_eq!(comm.all_gather(&x).unwrap().shape(), &[1, 2]);
    assert_eq!(comm.broadcast_bytes(b"hi", 0).unwrap(), b"hi");
    assert!(Shm::join(&dir.path().join("bad"), 2, 2, 1024).is_err());
}
