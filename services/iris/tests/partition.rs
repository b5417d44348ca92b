//! Faults that are silence: every member on a host of its own (a network namespace,
//! `common::net`), etcd on another, and packets between them dropped, delayed or lost
//! while the processes live on — no reset ever comes. A decoder cut off mid-stream, an
//! encoder whose packets are dropped (one way) under load, a decoder cut off from etcd
//! alone, the ranks of a tensor-parallel group cut from each other, and a slow lossy
//! network between the gateway and the tiers. Each asserts on outcomes (every request
//! completes with the text of the run without fault) and counters (migrations, retries,
//! the members the gateway sees); the times measured are printed. Needs root.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::net::Net;
use common::*;
use iris_cluster::etcd_server::EtcdServer;
use iris_proto::v1 as pb;

const TTL: &str = "2";

/// Every client request's own deadline: a stream stuck on a silent member until TCP
/// gives up (minutes) fails the test with DEADLINE_EXCEEDED.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// A cluster on a network of hosts: `client` (this process), `etcd`, `gateway` and the
/// members named. Fields drop in order: the processes, then etcd, then the network.
struct Cluster {
    procs: Vec<(String, Proc)>,
    etcd: EtcdServer,
    _dir: tempfile::TempDir,
    net: Net,
}

impl Cluster {
    fn new(members: &[&str]) -> Cluster {
        let mut hosts = vec!["client", "etcd", "gateway"];
        hosts.extend(members);
        let net = Net::new(&hosts);
        let dir = tempfile::tempdir().unwrap();
        let etcd = EtcdServer::start_in_netns(
            dir.path().to_path_buf(),
            &net.netns("etcd").unwrap(),
            &net.ip("etcd"),
        )
        .unwrap();
        Cluster {
            procs: Vec::new(),
            etcd,
            _dir: dir,
            net,
        }
    }

    /// Starts `bin` on `host`, registered in etcd.
    fn start(&mut self, host: &str, bin: &str, extra: &[&str]) {
        let (model, ep) = (model_arg(), self.etcd.endpoint());
        let mut args = vec!["--model", &model, "--etcd", &ep];
        args.extend(["--cluster", "test", "--lease-ttl-s", TTL]);
        args.extend(extra);
        let p = spawn_on(&self.net.exec(host), &self.net.ip(host), bin, &args);
        self.procs.push((host.to_string(), p));
    }

    fn proc(&self, host: &str) -> &Proc {
        &self.procs.iter().find(|(h, _)| h == host).unwrap().1
    }

    /// The member addresses of `tier` registered in etcd.
    fn registered(&self, tier: &str) -> Vec<String> {
        members_at(&self.etcd.endpoint()).addrs(tier)
    }

    /// The members of `tier` the gateway routes to.
    fn seen(&self, tier: &str) -> usize {
        let http = &self.proc("gateway").http;
        let body = metrics_text(http);
        body.lines()
            .find(|l| l.starts_with("iris_members{") && l.contains(&format!("tier=\"{tier}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as usize
    }

    fn metric(&self, host: &str, name: &str) -> f64 {
        metric(&self.proc(host).http, name)
    }
}

/// One generation through the gateway at `addr` with the client's deadline: the
/// token ids, the text and the time to the first token.
async fn run(addr: &str, req: pb::GenerateRequest) -> Result<(Vec<u32>, String, Duration), String> {
    // The gateway ends a stream at its deadline; this bound holds even if it did not.
    tokio::time::timeout(
        REQUEST_DEADLINE + Duration::from_secs(5),
        run_once(addr, req),
    )
    .await
    .unwrap_or_else(|_| Err("no end within the deadline".into()))
}

async fn run_once(
    addr: &str,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, String, Duration), String> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(REQUEST_DEADLINE);
    generate(&mut client(addr).await, r)
        .await
        .map_err(|e| format!("{e:?}"))
}

type Outcome = Result<(Vec<u32>, String, Duration), String>;

/// Sends `reqs` at once; `during` runs (on this thread) while they stream.
fn at_once(
    rt: &tokio::runtime::Runtime,
    gateway: &str,
    reqs: &[pb::GenerateRequest],
    during: impl FnOnce(),
) -> Vec<Outcome> {
    let tasks: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (addr, r) = (gateway.to_string(), r.clone());
            rt.spawn(async move { run(&addr, r).await })
        })
        .collect();
    during();
    rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

fn one_by_one(
    rt: &tokio::runtime::Runtime,
    gateway: &str,
    reqs: &[pb::GenerateRequest],
) -> Vec<(Vec<u32>, String)> {
    reqs.iter()
        .map(|r| {
            let (ids, text, _) = rt.block_on(run(gateway, r.clone())).unwrap();
            (ids, text)
        })
        .collect()
}

fn assert_same(got: Vec<Outcome>, want: &[(Vec<u32>, String)], what: &str) {
    for (i, (g, w)) in got.into_iter().zip(want).enumerate() {
        let (ids, text, _) = g.unwrap_or_else(|e| panic!("{what}: request {i} failed: {e}"));
        assert_eq!(
            &(ids, text),
            w,
            "{what}: request {i} differs from the run without fault"
        );
    }
}

const ENCODER: &str = env!("CARGO_BIN_EXE_iris-encoder");
const CONNECTOR: &str = env!("CARGO_BIN_EXE_iris-connector");
const DECODER: &str = env!("CARGO_BIN_EXE_iris-decoder");
const GATEWAY: &str = env!("CARGO_BIN_EXE_iris-gateway");

#[test]
fn a_decoder_partitioned_mid_stream_hands_its_streams_over_and_rejoins_after_the_heal() {
    let mut c = Cluster::new(&["encoder", "connector", "d1", "d2"]);
    let slow = ["--test-step-delay-ms", "15"];
    c.start("encoder", ENCODER, &[]);
    c.start("connector", CONNECTOR, &[]);
    c.start("d1", DECODER, &slow);
    c.start("gateway", GATEWAY, &[]);
    eventually(Duration::from_secs(15), "members registered", || {
        c.registered("decoder").len() == 1 && c.seen("encoder") == 1 && c.seen("decoder") == 1
    });
    let rt = rt();
    let g = c.proc("gateway").grpc.clone();
    let reqs = mixed_requests();
    let want = one_by_one(&rt, &g, &reqs);
    c.start("d2", DECODER, &slow);
    eventually(Duration::from_secs(15), "d2 seen", || {
        c.seen("decoder") == 2
    });
    let d1 = c.proc("d1").grpc.clone();
    let before = c.metric("d2", "iris_decoder_requests_total");

    // Mid-stream (60 tokens at 15 ms a step take ~1 s), d1 goes silent: every packet
    // to and from it dropped, the process alive.
    let mut cut_at = None;
    let t0 = Instant::now();
    let got = at_once(&rt, &g, &reqs, || {
        std::thread::sleep(Duration::from_millis(400));
        c.net.isolate("d1");
        cut_at = Some(Instant::now());
    });
    let done = t0.elapsed();
    let cut_at = cut_at.unwrap();
    let moved = c.metric("gateway", "iris_migrations_total");
    println!(
        "decoder partitioned mid-stream: {moved} streams moved; the last finished {:?} after the cut ({} packets dropped)",
        (t0 + done).duration_since(cut_at),
        c.net.counters().dropped.load(Ordering::Relaxed)
    );
    assert_same(got, &want, "decoder partitioned");
    assert!(moved >= 1.0, "no stream moved");
    let on_d2 = c.metric("d2", "iris_decoder_requests_total") - before;
    assert!(on_d2 >= moved, "{on_d2} requests reached d2, {moved} moved");

    // Its lease lapses; the gateway stops routing to it.
    eventually(
        Duration::from_secs(20),
        "d1 leaves the gateway's view",
        || !c.registered("decoder").contains(&d1) && c.seen("decoder") == 1,
    );
    c.net.heal();
    let healed = Instant::now();
    eventually(Duration::from_secs(30), "d1 rejoins", || {
        c.registered("decoder").contains(&d1) && c.seen("decoder") == 2
    });
    println!(
        "after the heal, d1 was back in the gateway's view in {:?}",
        healed.elapsed()
    );
    // It gets work again: fresh images, four at a time.
    let before = c.metric("d1", "iris_decoder_requests_total");
    let fresh: Vec<_> = (0..8u8)
        .map(|k| request(PROMPT, vec![variant(k + 1)], 4))
        .collect();
    for r in at_once(&rt, &g, &fresh, || {}) {
        r.unwrap();
    }
    let took = c.metric("d1", "iris_decoder_requests_total") - before;
    println!("after the heal d1 served {took} of 8 new requests");
    assert!(took >= 1.0, "d1 got no work after the heal");
}

#[test]
fn a_decoder_drops_the_streams_of_a_gateway_gone_silent() {
    let mut c = Cluster::new(&["encoder", "connector", "decoder"]);
    c.start("encoder", ENCODER, &[]);
    c.start("connector", CONNECTOR, &[]);
    // 60 tokens at 150 ms a step: 9 s a stream, far past the cut and its detection.
    c.start("decoder", DECODER, &["--test-step-delay-ms", "150"]);
    c.start("gateway", GATEWAY, &[]);
    eventually(Duration::from_secs(15), "members seen", || {
        c.seen("decoder") == 1 && c.seen("encoder") == 1
    });
    let rt = rt();
    let g = c.proc("gateway").grpc.clone();
    let reqs = &mixed_requests()[..2];
    let mut cut_at = None;
    let mut dropped = Duration::ZERO;
    let got = at_once(&rt, &g, reqs, || {
        eventually(Duration::from_secs(20), "both streams running", || {
            c.metric("decoder", "iris_running_requests") == 2.0
        });
        // Only the gateway and the decoder lose each other; this test still reads the
        // decoder's metrics.
        c.net.cut("gateway", "decoder");
        cut_at = Some(Instant::now());
        eventually(
            Duration::from_secs(20),
            "the lost streams cancelled",
            || {
                c.metric("decoder", "iris_cancelled_requests") == 2.0
                    && c.metric("decoder", "iris_running_requests") == 0.0
            },
        );
        dropped = cut_at.unwrap().elapsed();
        c.net.heal();
    });
    println!("the decoder dropped both streams of its silent gateway {dropped:?} after the cut");
    // The gateway found the decoder silent too; with no other decoder the streams
    // ended UNAVAILABLE (each moved back to it once healed, or gave up).
    for r in got {
        if let Err(e) = r {
            assert!(e.contains("Unavailable"), "{e}");
        }
    }
}

#[test]
fn an_encoder_partitioned_under_steady_load_fails_no_request() {
    let mut c = Cluster::new(&["e1", "e2", "connector", "decoder"]);
    for h in ["e1", "e2"] {
        c.start(h, ENCODER, &[]);
    }
    c.start("connector", CONNECTOR, &[]);
    c.start("decoder", DECODER, &[]);
    c.start("gateway", GATEWAY, &[]);
    eventually(Duration::from_secs(15), "members seen", || {
        c.seen("encoder") == 2 && c.seen("decoder") == 1 && c.seen("connector") == 1
    });
    let g = c.proc("gateway").grpc.clone();
    // 60 requests, each with an image no one has seen, four at a time.
    let n = 60usize;
    let done = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (g, done, lat) = (g.clone(), done.clone(), lat.clone());
        std::thread::spawn(move || {
            rt().block_on(async {
                let next = Arc::new(AtomicUsize::new(0));
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        let (g, done, lat, next) =
                            (g.clone(), done.clone(), lat.clone(), next.clone());
                        tokio::spawn(async move {
                            loop {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                if i >= n {
                                    return;
                                }
                                let req = request(PROMPT, vec![variant(100 + i as u8)], 2);
                                let t0 = Instant::now();
                                let r = run(&g, req).await;
                                lat.lock().unwrap().push((t0, t0.elapsed(), r.err()));
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.await.unwrap();
                }
            })
        })
    };
    eventually(Duration::from_secs(60), "a third of the load done", || {
        done.load(Ordering::Relaxed) >= n / 3
    });
    let e1_before = c.metric("e1", "iris_encoder_requests_total");
    assert!(e1_before >= 1.0, "e1 encoded nothing before the cut");
    // One way: what e1 sends is lost (its answers, its keepalives to etcd); what is
    // sent to it arrives.
    c.net.silence("e1");
    let cut = Instant::now();
    load.join().unwrap();
    let lat = lat.lock().unwrap();
    let failed: Vec<_> = lat.iter().filter_map(|(_, _, e)| e.clone()).collect();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let (before, after): (Vec<_>, Vec<_>) = lat.iter().partition(|(t0, _, _)| *t0 < cut);
    let stats = |v: &[&(Instant, Duration, Option<String>)]| {
        let mut l: Vec<f64> = v.iter().map(|(_, d, _)| ms(d)).collect();
        l.sort_by(f64::total_cmp);
        (
            l.len(),
            l.get(l.len() / 2).copied().unwrap_or(0.0),
            l.last().copied().unwrap_or(0.0),
        )
    };
    let (retries, e2) = (
        c.metric("gateway", "iris_tier_retries_total"),
        c.metric("e2", "iris_encoder_requests_total"),
    );
    println!(
        "encoder's packets dropped (one way) under load: {} requests, {} failed; before the cut {:?} (n, p50 ms, max ms), from the cut {:?}; {retries} tier calls retried; e2 encoded {e2}",
        lat.len(),
        failed.len(),
        stats(&before),
        stats(&after),
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(lat.len(), n);
    assert!(retries >= 1.0, "no call met the silent encoder");
    eventually(
        Duration::from_secs(20),
        "e1 leaves the gateway's view",
        || c.seen("encoder") == 1,
    );
}

#[test]
fn a_decoder_cut_off_from_etcd_alone_finishes_its_streams_once_and_rejoins() {
    let mut c = Cluster::new(&["encoder", "connector", "d1", "d2"]);
    // 60 tokens at 60 ms a step: streams outlive the lease (2 s) by far.
    let slow = ["--test-step-delay-ms", "60"];
    c.start("encoder", ENCODER, &[]);
    c.start("connector", CONNECTOR, &[]);
    c.start("d1", DECODER, &slow);
    c.start("d2", DECODER, &slow);
    c.start("gateway", GATEWAY, &["--routing", "load"]);
    eventually(Duration::from_secs(15), "members seen", || {
        c.seen("encoder") == 1 && c.seen("decoder") == 2
    });
    let rt = rt();
    let g = c.proc("gateway").grpc.clone();
    let reqs = mixed_requests();
    let want = one_by_one(&rt, &g, &reqs);
    let d1 = c.proc("d1").grpc.clone();
    let served = |c: &Cluster| {
        c.metric("d1", "iris_decoder_requests_total")
            + c.metric("d2", "iris_decoder_requests_total")
    };
    let (before, d1_before) = (served(&c), c.metric("d1", "iris_decoder_requests_total"));

    // Six streams start on both decoders; then d1 loses etcd (and only etcd).
    let mut cut = None;
    let mut second = Vec::new();
    let mut d1_during = 0.0;
    let first = at_once(&rt, &g, &reqs, || {
        std::thread::sleep(Duration::from_millis(300));
        c.net.cut("d1", "etcd");
        cut = Some(Instant::now());
        // Its lease lapses: the gateway drops it while its streams run on.
        eventually(
            Duration::from_secs(20),
            "d1 leaves the gateway's view",
            || c.seen("decoder") == 1,
        );
        println!(
            "cut off from etcd: d1 left the gateway's view {:?} after the cut",
            cut.unwrap().elapsed()
        );
        d1_during = c.metric("d1", "iris_decoder_requests_total");
        // New work goes to d2 alone.
        second = at_once(&rt, &g, &reqs, || {});
    });
    let d1_after_second = c.metric("d1", "iris_decoder_requests_total");
    assert_same(first, &want, "streams running at the cut");
    assert_same(second, &want, "requests during the cut");
    assert!(d1_during - d1_before >= 1.0, "no stream was on d1");
    assert_eq!(
        d1_after_second, d1_during,
        "d1 took work while out of the view"
    );
    // Nothing served twice: no stream moved, and the decoders saw each request once.
    assert_eq!(c.metric("gateway", "iris_migrations_total"), 0.0);
    assert_eq!(served(&c) - before, 12.0, "requests served by the decoders");

    c.net.heal();
    let healed = Instant::now();
    eventually(
        Duration::from_secs(30),
        "d1 registered again and seen",
        || c.registered("decoder").contains(&d1) && c.seen("decoder") == 2,
    );
    println!(
        "after the heal: membership converged in {:?}",
        healed.elapsed()
    );
    let before = c.metric("d1", "iris_decoder_requests_total");
    let fresh: Vec<_> = (0..4)
        .map(|_| request(PROMPT, vec![image("scene.png")], 4))
        .collect();
    for r in at_once(&rt, &g, &fresh, || {}) {
        r.unwrap();
    }
    assert!(
        c.metric("d1", "iris_decoder_requests_total") > before,
        "d1 got no work after the heal"
    );
}

#[test]
fn a_slow_lossy_network_between_gateway_and_tiers_gives_the_same_text() {
    let mut c = Cluster::new(&["encoder", "connector", "decoder"]);
    c.start("encoder", ENCODER, &[]);
    c.start("connector", CONNECTOR, &[]);
    c.start("decoder", DECODER, &[]);
    c.start("gateway", GATEWAY, &["--visual-cache-bytes", "0"]);
    eventually(Duration::from_secs(15), "members seen", || {
        c.seen("encoder") == 1 && c.seen("decoder") == 1 && c.seen("connector") == 1
    });
    let rt = rt();
    let g = c.proc("gateway").grpc.clone();
    // Eight requests, each image new to the tiers' caches, greedy and seeded.
    let reqs = |first: u8| -> Vec<pb::GenerateRequest> {
        (0..8u8)
            .map(|k| {
                let mut r = request(PROMPT, vec![variant(first + k)], 24);
                if k % 2 == 1 {
                    r.sampling = Some(pb::SamplingParams {
                        temperature: 0.8,
                        seed: k as u64,
                        ..Default::default()
                    });
                }
                r
            })
            .collect()
    };
    let measure = |label: &str, out: &[Outcome], took: Duration| {
        let ok: Vec<_> = out.iter().filter_map(|r| r.as_ref().ok()).collect();
        let tokens: usize = ok.iter().map(|(ids, _, _)| ids.len()).sum();
        let mut ttft: Vec<f64> = ok.iter().map(|(_, _, t)| t.as_secs_f64() * 1e3).collect();
        ttft.sort_by(f64::total_cmp);
        println!(
            "{label}: {} requests in {:.2} s, {:.1} tokens/s, TTFT p50 {:.0} ms, max {:.0} ms",
            out.len(),
            took.as_secs_f64(),
            tokens as f64 / took.as_secs_f64(),
            ttft.get(ttft.len() / 2).copied().unwrap_or(0.0),
            ttft.last().copied().unwrap_or(0.0)
        );
    };
    let clean = reqs(10);
    let want = one_by_one(&rt, &g, &clean);
    let t0 = Instant::now();
    let base = at_once(&rt, &g, &reqs(30), || {});
    measure("clean network", &base, t0.elapsed());

    for tier in ["encoder", "connector", "decoder"] {
        c.net
            .degrade("gateway", tier, Duration::from_millis(200), 0.05);
    }
    // The requests of `want` again (their images may be in the encoder's and the
    // connector's caches), then requests with images no tier has seen.
    let t0 = Instant::now();
    let got = at_once(&rt, &g, &reqs(10), || {});
    measure("200 ms each way, 5% loss", &got, t0.elapsed());
    let fresh = reqs(50);
    let t0 = Instant::now();
    let got_fresh = at_once(&rt, &g, &fresh, || {});
    measure(
        "200 ms each way, 5% loss, new images",
        &got_fresh,
        t0.elapsed(),
    );
    let counters = c.net.counters();
    println!(
        "switch: {} packets delayed, {} lost; {} tier calls retried, {} streams moved",
        counters.delayed.load(Ordering::Relaxed),
        counters.lost.load(Ordering::Relaxed),
        c.metric("gateway", "iris_tier_retries_total"),
        c.metric("gateway", "iris_migrations_total"),
    );
    assert_same(got, &want, "slow lossy network");
    c.net.heal();
    let want_fresh = one_by_one(&rt, &g, &fresh);
    assert_same(got_fresh, &want_fresh, "slow lossy network, new images");
    assert!(counters.lost.load(Ordering::Relaxed) > 0);
}

/// A process that prints nothing (a follower rank), killed when dropped.
struct Quiet(std::process::Child);

impl Drop for Quiet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_tp_group_whose_ranks_lose_each_other_fails_over_to_another_decoder() {
    let mut c = Cluster::new(&["encoder", "connector", "a0", "a1", "d2"]);
    c.start("encoder", ENCODER, &[]);
    c.start("connector", CONNECTOR, &[]);
    // Group a: its two ranks on two hosts over TCP.
    let group = |host: &str, rank: &str| -> Vec<String> {
        [
            "--tp",
            "2",
            "--rank",
            rank,
            "--group",
            "a",
            "--tp-transport",
            "tcp",
            "--tp-listen",
            &format!("{}:0", c.net.ip(host)),
            "--test-step-delay-ms",
            "15",
        ]
        .map(String::from)
        .to_vec()
    };
    let a1 = {
        let (model, ep) = (model_arg(), c.etcd.endpoint());
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &c.net.netns("a1").unwrap()])
            .arg(DECODER)
            .args(["--model", &model, "--etcd", &ep, "--cluster", "test"])
            .args(["--lease-ttl-s", TTL])
            .args(group("a1", "1"))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        Quiet(cmd.spawn().unwrap())
    };
    let a0_args = group("a0", "0");
    let a0_args: Vec<&str> = a0_args.iter().map(|s| s.as_str()).collect();
    c.start("a0", DECODER, &a0_args);
    c.start("gateway", GATEWAY, &[]);
    eventually(Duration::from_secs(20), "group a seen", || {
        c.seen("decoder") == 1 && c.seen("encoder") == 1
    });
    let rt = rt();
    let g = c.proc("gateway").grpc.clone();
    let reqs = mixed_requests();
    let want = one_by_one(&rt, &g, &reqs);
    c.start("d2", DECODER, &["--test-step-delay-ms", "15"]);
    eventually(Duration::from_secs(15), "d2 seen", || {
        c.seen("decoder") == 2
    });
    let a0 = c.proc("a0").grpc.clone();
    let before = c.metric("a0", "iris_decoder_requests_total");

    // Mid-stream, the ranks lose each other (each still reaches etcd and the gateway).
    let mut cut_at = None;
    let got = at_once(&rt, &g, &reqs, || {
        std::thread::sleep(Duration::from_millis(400));
        c.net.cut("a0", "a1");
        cut_at = Some(Instant::now());
    });
    let took = cut_at.unwrap().elapsed();
    let (on_a, moved) = (
        c.metric("a0", "iris_decoder_requests_total") - before,
        c.metric("gateway", "iris_migrations_total"),
    );
    println!(
        "TP ranks cut from each other mid-stream: group a had {on_a} of 6 streams, {moved} moved; all done {took:?} after the cut"
    );
    assert_same(got, &want, "TP ranks cut apart");
    assert!(on_a >= 1.0, "no stream was on group a");
    assert!(moved >= 1.0, "no stream moved");
    // The broken group leaves the membership; its rank 0 stays up, refusing work.
    eventually(Duration::from_secs(20), "group a deregistered", || {
        !c.registered("decoder").contains(&a0) && c.seen("decoder") == 1
    });
    drop(a1);
}
