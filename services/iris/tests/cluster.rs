//! The cluster over a real etcd: members register under leases and the gateway follows
//! them (a new encoder gets work, a stopped one leaves at once, a killed one within the
//! TTL); a killed encoder under load loses no request; etcd going away for 10 s fails
//! nothing; a burst beyond the decoders' queues is refused at once with
//! RESOURCE_EXHAUSTED while every accepted request completes.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use iris_cluster::etcd_server::EtcdServer;
use iris_cluster::{EtcdRegistry, Registry};
use tonic::Code;

const TTL: &str = "2";

struct Etcd {
    server: EtcdServer,
    _dir: tempfile::TempDir,
}

fn etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    Etcd {
        server: EtcdServer::start_in(dir.path().to_path_buf()).unwrap(),
        _dir: dir,
    }
}

fn member(bin: &str, etcd: &Etcd, extra: &[&str]) -> Proc {
    member_of(bin, etcd, &model_arg(), extra)
}

/// A member serving the model folder `model`.
fn member_of(bin: &str, etcd: &Etcd, model: &str, extra: &[&str]) -> Proc {
    let ep = etcd.server.endpoint();
    let mut args = vec!["--model", model, "--etcd", &ep];
    args.extend(["--cluster", "test", "--lease-ttl-s", TTL]);
    args.extend(extra);
    spawn(bin, &args)
}

fn encoder(e: &Etcd) -> Proc {
    member(env!("CARGO_BIN_EXE_iris-encoder"), e, &[])
}

/// Registered member addresses of `tier`, read from etcd directly.
fn registered(e: &Etcd, tier: &str) -> Vec<String> {
    members_at(&e.server.endpoint()).addrs(tier)
}

/// The loads the members of `tier` report in etcd.
fn reported_loads(e: &Etcd, tier: &str) -> Vec<u32> {
    reported_loads_at(&e.server.endpoint(), tier)
}

fn reported_loads_at(endpoint: &str, tier: &str) -> Vec<u32> {
    members_at(endpoint)
        .loads(tier)
        .into_iter()
        .map(|(_, l)| l)
        .collect()
}

/// Requests with fresh images (so the encoders work), `n` of them, `conc` at a time;
/// returns each one's latency, panicking on any failure.
fn load(gateway: &str, n: usize, conc: usize, first: u8) -> Vec<Duration> {
    rt().block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(conc));
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (addr, sem) = (gateway.to_string(), sem.clone());
                let img = variant(first.wrapping_add(i as u8));
                tokio::spawn(async move {
                    let _permit = sem.acquire().await.unwrap();
                    let t0 = Instant::now();
                    let mut g = client(&addr).await;
                    generate(&mut g, request(PROMPT, vec![img], 2))
                        .await
                        .unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
                    t0.elapsed()
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

#[test]
fn the_gateway_follows_members_as_they_join_leave_and_die() {
    let e = etcd();
    let mut a = encoder(&e);
    let _c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &[]);
    let _d = member(env!("CARGO_BIN_EXE_iris-decoder"), &e, &[]);
    let g = member(env!("CARGO_BIN_EXE_iris-gateway"), &e, &[]);
    eventually(
        Duration::from_secs(10),
        "the gateway sees the tiers",
        || registered(&e, "decoder").len() == 1,
    );
    load(&g.grpc, 4, 2, 0);
    assert_eq!(metric(&a.http, "iris_encoder_requests_total"), 4.0);
    // A second encoder joins: the gateway starts using it, and under load both work.
    let mut b = encoder(&e);
    let mut k = 10u8;
    eventually(Duration::from_secs(15), "the gateway uses b", || {
        load(&g.grpc, 2, 2, k);
        k = k.wrapping_add(2);
        metric(&b.http, "iris_encoder_requests_total") > 0.0
    });
    let (a0, b0) = (
        metric(&a.http, "iris_encoder_requests_total"),
        metric(&b.http, "iris_encoder_requests_total"),
    );
    load(&g.grpc, 16, 4, 100);
    let (na, nb) = (
        metric(&a.http, "iris_encoder_requests_total"),
        metric(&b.http, "iris_encoder_requests_total"),
    );
    assert_eq!(na + nb, a0 + b0 + 16.0);
    assert!(
        na > a0 && nb > b0,
        "under load: a {} more, b {} more",
        na - a0,
        nb - b0
    );
    // A clean stop deregisters at once.
    terminate(&mut a);
    assert_eq!(registered(&e, "encoder"), vec![b.grpc.clone()]);
    load(&g.grpc, 3, 3, 160);
    assert_eq!(metric(&b.http, "iris_encoder_requests_total"), nb + 3.0);
    // kill -9: gone within the TTL.
    let c = encoder(&e);
    eventually(Duration::from_secs(10), "c registered", || {
        registered(&e, "encoder").len() == 2
    });
    b.child.kill().unwrap();
    let t0 = Instant::now();
    eventually(Duration::from_secs(10), "b expired", || {
        registered(&e, "encoder") == vec![c.grpc.clone()]
    });
    let took = t0.elapsed();
    println!("a kill -9ed encoder left the registry after {took:?} (TTL {TTL} s)");
    assert!(took <= Duration::from_millis(2000 + 1500), "{took:?}");
    load(&g.grpc, 3, 3, 180);
    assert_eq!(metric(&c.http, "iris_encoder_requests_total"), 3.0);
}

#[test]
fn a_killed_encoder_under_load_loses_no_request() {
    let e = etcd();
    let mut a = encoder(&e);
    let b = encoder(&e);
    let _c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &[]);
    let _d = member(env!("CARGO_BIN_EXE_iris-decoder"), &e, &[]);
    let g = member(env!("CARGO_BIN_EXE_iris-gateway"), &e, &[]);
    eventually(Duration::from_secs(10), "members registered", || {
        registered(&e, "encoder").len() == 2 && registered(&e, "decoder").len() == 1
    });
    let warm = load(&g.grpc, 8, 4, 0);
    let gw = g.grpc.clone();
    let steady = std::thread::spawn(move || load(&gw, 60, 4, 100));
    std::thread::sleep(Duration::from_millis(300));
    a.child.kill().unwrap();
    let lat = steady.join().expect("every request completes");
    let mut sorted = lat.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let max = *sorted.last().unwrap();
    println!(
        "kill -9 of one of two encoders under load: 60/60 completed; latency median {:?}, \
         max {:?} (warm median {:?})",
        median,
        max,
        warm[warm.len() / 2]
    );
    assert!(metric(&b.http, "iris_encoder_requests_total") > 0.0);
}

#[test]
fn etcd_away_for_ten_seconds_fails_nothing_and_members_come_back() {
    let mut e = etcd();
    let _a = encoder(&e);
    let _c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &[]);
    let _d = member(env!("CARGO_BIN_EXE_iris-decoder"), &e, &[]);
    let g = member(env!("CARGO_BIN_EXE_iris-gateway"), &e, &[]);
    eventually(Duration::from_secs(10), "members registered", || {
        registered(&e, "decoder").len() == 1 && registered(&e, "encoder").len() == 1
    });
    load(&g.grpc, 2, 2, 0);
    e.server.stop();
    // Requests keep flowing for the 10 s etcd is away.
    let t0 = Instant::now();
    let mut k = 10u8;
    while t0.elapsed() < Duration::from_secs(10) {
        load(&g.grpc, 2, 2, k);
        k = k.wrapping_add(2);
        std::thread::sleep(Duration::from_millis(200));
    }
    e.server.start().unwrap();
    eventually(Duration::from_secs(15), "members registered again", || {
        registered(&e, "encoder").len() == 1
            && registered(&e, "connector").len() == 1
            && registered(&e, "decoder").len() == 1
    });
    // The gateway resynced: a new encoder joins and gets work.
    let b = encoder(&e);
    eventually(Duration::from_secs(10), "b registered", || {
        registered(&e, "encoder").len() == 2
    });
    let t0 = Instant::now();
    while metric(&b.http, "iris_encoder_requests_total") == 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the gateway never used b"
        );
        load(&g.grpc, 4, 4, k);
        k = k.wrapping_add(4);
    }
}

#[test]
fn a_burst_beyond_capacity_is_refused_at_once_and_the_rest_completes() {
    let e = etcd();
    let _a = encoder(&e);
    let _c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &[]);
    let _d = member(
        env!("CARGO_BIN_EXE_iris-decoder"),
        &e,
        &[
            "--max-running",
            "2",
            "--max-waiting",
            "2",
            "--test-step-delay-ms",
            "5",
        ],
    );
    let g = member(env!("CARGO_BIN_EXE_iris-gateway"), &e, &[]);
    eventually(Duration::from_secs(10), "members registered", || {
        registered(&e, "decoder").len() == 1 && registered(&e, "encoder").len() == 1
    });
    let img = image("scene.png");
    // Watch the decoder's reported load during the burst.
    let max_load = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (max_load, watching) = (max_load.clone(), watching.clone());
        let endpoint = e.server.endpoint();
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let l = reported_loads_at(&endpoint, "decoder");
                max_load.fetch_max(
                    l.into_iter().max().unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (ok, refused, slowest_refusal) = rt().block_on(async {
        // Warm the visual cache so the burst reaches the decoder together.
        let mut c = client(&g.grpc).await;
        generate(&mut c, request(PROMPT, vec![img.clone()], 1))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let (addr, img) = (g.grpc.clone(), img.clone());
                tokio::spawn(async move {
                    let mut c = client(&addr).await;
                    let t0 = Instant::now();
                    (
                        generate(&mut c, request(PROMPT, vec![img], 200)).await,
                        t0.elapsed(),
                    )
                })
            })
            .collect();
        let (mut ok, mut refused, mut slowest) = (0, 0, Duration::ZERO);
        for t in tasks {
            match t.await.unwrap() {
                (Ok((ids, _, _)), _) => {
                    assert!(!ids.is_empty());
                    ok += 1;
                }
                (Err(s), took) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    refused += 1;
                    slowest = slowest.max(took);
                }
            }
        }
        (ok, refused, slowest)
    });
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    // The decoder reported its load while busy, and reports none once idle.
    assert!(
        max_load.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no load was reported"
    );
    eventually(Duration::from_secs(10), "idle load reported", || {
        reported_loads(&e, "decoder") == vec![0]
    });
    println!(
        "burst of 40: {ok} completed, {refused} refused (slowest refusal {slowest_refusal:?})"
    );
    assert!(
        ok >= 1 && refused > 0 && ok + refused == 40,
        "ok {ok}, refused {refused}"
    );
    assert!(
        slowest_refusal < Duration::from_secs(5),
        "{slowest_refusal:?}"
    );
}

/// Streams all of a generation's events: token ids and final text, or the error.
async fn stream_all(
    addr: &str,
    req: iris_proto::v1::GenerateRequest,
) -> Result<(Vec<u32>, String), tonic::Status> {
    let mut c = client(addr).await;
    generate(&mut c, req)
        .await
        .map(|(ids, text, _)| (ids, text))
}

/// What each of `reqs` gives through `gateway`, one at a time, with no failure.
fn one_by_one(
    rt: &tokio::runtime::Runtime,
    gateway: &str,
    reqs: &[iris_proto::v1::GenerateRequest],
) -> Vec<(Vec<u32>, String)> {
    rt.block_on(async {
        let mut out = Vec::new();
        for r in reqs {
            out.push(stream_all(gateway, r.clone()).await.unwrap());
        }
        out
    })
}

/// Sends `reqs` at once and calls `kill` after `after` (mid-stream).
fn streams_with_a_kill(
    rt: &tokio::runtime::Runtime,
    gateway: &str,
    reqs: &[iris_proto::v1::GenerateRequest],
    after: Duration,
    kill: impl FnOnce(),
) -> Vec<Result<(Vec<u32>, String), tonic::Status>> {
    rt.block_on(async {
        let tasks: Vec<_> = reqs
            .iter()
            .map(|r| {
                let (addr, r) = (gateway.to_string(), r.clone());
                tokio::spawn(async move { stream_all(&addr, r).await })
            })
            .collect();
        tokio::time::sleep(after).await;
        kill();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

#[test]
fn a_decoder_killed_mid_stream_hands_its_streams_to_another() {
    let e = etcd();
    let _a = encoder(&e);
    let _c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &[]);
    let slow = ["--test-step-delay-ms", "15"];
    let mut d1 = member(env!("CARGO_BIN_EXE_iris-decoder"), &e, &slow);
    let g = member(env!("CARGO_BIN_EXE_iris-gateway"), &e, &[]);
    eventually(Duration::from_secs(10), "members registered", || {
        registered(&e, "decoder").len() == 1 && registered(&e, "encoder").len() == 1
    });
    // Greedy and seeded requests; what each gives with no failure.
    let reqs = mixed_requests();
    let rt = rt();
    let want = one_by_one(&rt, &g.grpc, &reqs);
    let d2 = member(env!("CARGO_BIN_EXE_iris-decoder"), &e, &slow);
    eventually(Duration::from_secs(10), "d2 registered", || {
        registered(&e, "decoder").len() == 2
    });
    let before = metric(&d2.http, "iris_decoder_requests_total");
    // Mid-stream (60 tokens at 15 ms a step take ~1 s): kill -9 the first decoder.
    let got = streams_with_a_kill(&rt, &g.grpc, &reqs, Duration::from_millis(400), || {
        d1.child.kill().unwrap()
    });
    let moved = metric(&d2.http, "iris_decoder_requests_total") - before - 3.0;
    println!("decoder kill -9 mid-stream: {moved} of 6 streams moved to the other decoder");
    for (i, (g, w)) in got.into_iter().zip(&want).enumerate() {
        let g = g.unwrap_or_else(|e| panic!("stream {i} failed: {e:?}"));
        assert_eq!(&g, w, "stream {i} differs from the run without failure");
    }
    assert!(moved >= 1.0, "no stream was on the killed decoder");
    // The last decoder dies too: a stream ends with UNAVAILABLE, promptly.
    let mut d2 = d2;
    let t0 = Instant::now();
    let r = rt.block_on(async {
        let addr = g.grpc.clone();
        let req = reqs[0].clone();
        let task = tokio::spawn(async move { stream_all(&addr, req).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        d2.child.kill().unwrap();
        task.await.unwrap()
    });
    let e = r.expect_err("no decoder is left");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let took = t0.elapsed() - Duration::from_millis(300);
    println!("no decoder left: UNAVAILABLE {took:?} after the kill");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A model folder through separate tiers: HF's greedy ids for its golden request;
/// `prompt` about each of `files` alone, greedy and seeded in turn, one by one, then
/// all at once with the decoder serving them killed mid-stream — every stream equal to
/// its run without failure, the repeated images hitting the visual cache. Returns what
/// the decoders counted.
fn a_model_through_the_tiers(fixture: &str, prompt: &str, files: &[&str]) -> Counted {
    let e = etcd();
    let dir = fixtures().join(fixture).display().to_string();
    let _a = member_of(env!("CARGO_BIN_EXE_iris-encoder"), &e, &dir, &[]);
    let _c = member_of(env!("CARGO_BIN_EXE_iris-connector"), &e, &dir, &[]);
    let slow = ["--test-step-delay-ms", "15"];
    let mut d1 = member_of(env!("CARGO_BIN_EXE_iris-decoder"), &e, &dir, &slow);
    let g = member_of(env!("CARGO_BIN_EXE_iris-gateway"), &e, &dir, &[]);
    eventually(Duration::from_secs(10), "members registered", || {
        registered(&e, "decoder").len() == 1 && registered(&e, "connector").len() == 1
    });
    let golden = golden(fixture);
    let of = |prompt: &str, images: Vec<Vec<u8>>, n: u32| {
        let mut r = request(prompt, images, n);
        r.model = fixture.into();
        r
    };
    let rt = rt();
    let max = golden["max_new_tokens"].as_u64().unwrap() as u32;
    let prompt0 = golden["prompt"].as_str().unwrap();
    let (got, text) = rt
        .block_on(stream_all(
            &g.grpc,
            of(prompt0, golden_images(&golden), max),
        ))
        .unwrap();
    let want_ids = golden_ids(&golden, "token_ids");
    assert_eq!(
        got, want_ids,
        "{fixture}: HF's greedy ids through the tiers"
    );
    assert_eq!(text, golden["text"].as_str().unwrap());
    // The second half of the requests repeats the first half's images.
    let n = 2 * files.len();
    let reqs: Vec<_> = (0..n)
        .map(|i| {
            let mut r = of(prompt, vec![image(files[i % files.len()])], 60);
            if i % 2 == 1 {
                r.sampling = Some(sampled(i as u64));
            }
            r
        })
        .collect();
    let want = one_by_one(&rt, &g.grpc, &reqs);
    assert!(metric(&g.http, "iris_visual_cache_hits_total") >= files.len() as f64);
    let prefix_hits = metric(&d1.http, "iris_prefix_cache_hit_blocks");
    let cross1 = metric(&d1.http, "iris_cross_kv_computed");
    let d2 = member_of(env!("CARGO_BIN_EXE_iris-decoder"), &e, &dir, &slow);
    eventually(Duration::from_secs(10), "d2 registered", || {
        registered(&e, "decoder").len() == 2
    });
    let before = metric(&d2.http, "iris_decoder_requests_total");
    let got = streams_with_a_kill(&rt, &g.grpc, &reqs, Duration::from_millis(400), || {
        d1.child.kill().unwrap()
    });
    let moved = metric(&d2.http, "iris_decoder_requests_total") - before;
    println!("{fixture}: {moved} of {n} streams on the surviving decoder after the kill");
    for (i, (g, w)) in got.into_iter().zip(&want).enumerate() {
        let g = g.unwrap_or_else(|e| panic!("{fixture}: stream {i} failed: {e:?}"));
        assert_eq!(
            &g, w,
            "{fixture}: stream {i} differs from the run without failure"
        );
    }
    assert!(
        moved >= 1.0,
        "{fixture}: no stream moved off the killed decoder"
    );
    Counted {
        prefix_hits,
        cross1,
        cross2: metric(&d2.http, "iris_cross_kv_computed"),
        moved,
    }
}

/// What the decoders of [`a_model_through_the_tiers`] counted.
struct Counted {
    /// Prefix blocks the first decoder reused in the one-by-one run.
    prefix_hits: f64,
    /// Cross-attention K/V computations on the first decoder before the kill, and on
    /// the second after it.
    cross1: f64,
    cross2: f64,
    /// Streams the second decoder took.
    moved: f64,
}

/// LLaVA-NeXT through separate tiers: each image's placeholder count comes from its
/// header at the gateway, its size crosses to the connector (the packing) over gRPC,
/// and its variable-length visual tokens to the decoders (three sizes: 113, 95 and 95
/// visual tokens).
#[test]
fn llava_next_through_the_tiers_matches_hf_and_survives_a_decoder_kill() {
    let files = ["scene.png", "tall.jpg", "wide.png"];
    let c = a_model_through_the_tiers("llava-next-tiny-f32", PROMPT, &files);
    assert!(
        c.prefix_hits > 0.0,
        "repeated images reuse their prefix blocks"
    );
    assert_eq!(
        (c.cross1, c.cross2),
        (0.0, 0.0),
        "no cross-attention in LLaVA"
    );
}

/// BLIP-2 with T5 through separate tiers: the decoder runs the T5 encoder once per
/// sequence (the counter: once for each request it served, once more for each stream
/// moved to it), its output held as cross K/V for every step.
#[test]
fn blip2_t5_through_the_tiers_matches_hf_and_survives_a_decoder_kill() {
    let prompt = "Question: what is in the picture? Answer:";
    let files = ["scene.png", "tall.jpg"];
    let c = a_model_through_the_tiers("blip2-tiny-t5-f32", prompt, &files);
    // The golden request and the one-by-one run, each once.
    assert_eq!(c.cross1, 1.0 + 2.0 * files.len() as f64);
    assert_eq!(
        c.cross2, c.moved,
        "each moved stream's encoder ran once on arrival"
    );
}

#[test]
fn a_rolling_restart_of_every_member_under_load_fails_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    let e = etcd();
    let bins = [
        env!("CARGO_BIN_EXE_iris-encoder"),
        env!("CARGO_BIN_EXE_iris-connector"),
        env!("CARGO_BIN_EXE_iris-decoder"),
        env!("CARGO_BIN_EXE_iris-gateway"),
    ];
    // Two of each.
    let mut members: Vec<(usize, Proc)> = (0..8)
        .map(|i| (i / 2, member(bins[i / 2], &e, &[])))
        .collect();
    eventually(Duration::from_secs(15), "all registered", || {
        ["encoder", "connector", "decoder", "gateway"]
            .iter()
            .all(|t| registered(&e, t).len() == 2)
    });
    // The load balancer in front of the gateways: the live ones, in turn.
    let gateways = Arc::new(Mutex::new(
        members
            .iter()
            .filter(|(k, _)| *k == 3)
            .map(|(_, p)| p.grpc.clone())
            .collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let load = {
        let (gateways, stop, done, failed) =
            (gateways.clone(), stop.clone(), done.clone(), failed.clone());
        std::thread::spawn(move || {
            rt().block_on(async {
                let workers: Vec<_> = (0..3)
                    .map(|w| {
                        let (gateways, stop, done, failed) =
                            (gateways.clone(), stop.clone(), done.clone(), failed.clone());
                        tokio::spawn(async move {
                            let mut k = w as u8 * 80;
                            while !stop.load(Ordering::Relaxed) {
                                k = k.wrapping_add(1);
                                let req = request(PROMPT, vec![variant(k)], 12);
                                let mut last = None;
                                // Connection failures go to the other gateway, as a load
                                // balancer retries them; any other failure counts.
                                for attempt in 0..4 {
                                    let list = gateways.lock().unwrap().clone();
                                    let addr = list[(k as usize + attempt) % list.len()].clone();
                                    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!(
                                        "http://{addr}"
                                    ))
                                    .unwrap()
                                    .connect()
                                    .await
                                    else {
                                        continue;
                                    };
                                    let mut c =
                                        iris_proto::v1::gateway_client::GatewayClient::new(ch);
                                    match generate(&mut c, req.clone()).await {
                                        Ok(_) => {
                                            last = None;
                                            done.fetch_add(1, Ordering::Relaxed);
                                            break;
                                        }
                                        Err(s) => last = Some(s),
                                    }
                                    break;
                                }
                                if let Some(s) = last {
                                    failed.lock().unwrap().push(format!("{s:?}"));
                                }
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
    std::thread::sleep(Duration::from_millis(500));
    let tiers = ["encoder", "connector", "decoder", "gateway"];
    for slot in members.iter_mut() {
        let kind = slot.0;
        let fresh = member(bins[kind], &e, &[]);
        let new_addr = fresh.grpc.clone();
        eventually(
            Duration::from_secs(15),
            "the replacement registered",
            || registered(&e, tiers[kind]).contains(&new_addr),
        );
        if kind == 3 {
            gateways.lock().unwrap().push(new_addr.clone());
        }
        let (_, mut old) = std::mem::replace(slot, (kind, fresh));
        if kind == 3 {
            gateways.lock().unwrap().retain(|a| *a != old.grpc);
        }
        terminate(&mut old);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let failed = failed.lock().unwrap();
    println!(
        "rolling restart of 8 members under load: {} requests completed, {} failed",
        done.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(done.load(Ordering::Relaxed) > 20);
}

#[test]
fn the_model_registry_is_applied_and_shown_with_the_members() {
    let e = etcd();
    let _a = encoder(&e);
    eventually(Duration::from_secs(10), "the encoder registered", || {
        registered(&e, "encoder").len() == 1
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("models.json");
    std::fs::write(
        &file,
        r#"{"models": [{"id": "llava", "encoder": "clip-vit-l-336", "connector": "llava-mlp",
            "language_model": "vicuna-7b", "tp_size": 2}]}"#,
    )
    .unwrap();
    let iris = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_iris"))
            .args(args)
            .args(["--etcd", &e.server.endpoint(), "--cluster", "test"])
            .output()
            .unwrap()
    };
    let out = iris(&["cluster", "apply", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = iris(&["cluster", "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"][0]["id"], "llava");
    assert_eq!(v["models"][0]["tp_size"], 2);
    assert_eq!(v["members"][0]["tier"], "encoder");
    // A bad file is refused with a message.
    std::fs::write(&file, r#"{"models": [{"id": "x"}]}"#).unwrap();
    let out = iris(&["cluster", "apply", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("models file"));
}

/// A rank process, killed (and reaped) when dropped.
struct RankProc(std::process::Child);

impl Drop for RankProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A rank above 0 of decoder group `group` (it prints nothing: it only follows).
fn rank_process(e: Option<&Etcd>, group: &str, rank: usize, extra: &[&str]) -> RankProc {
    let m = model_arg();
    let r = rank.to_string();
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_iris-decoder"));
    c.args(["--model", &m, "--tp", "2", "--rank", &r, "--group", group]);
    if let Some(e) = e {
        c.args([
            "--etcd",
            &e.server.endpoint(),
            "--cluster",
            "test",
            "--lease-ttl-s",
            TTL,
        ]);
    }
    RankProc(
        c.args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The ranks of `group` registered in etcd.
fn group_ranks(e: &Etcd, group: &str) -> usize {
    let reg = EtcdRegistry::new(&[e.server.endpoint()]);
    let prefix = iris_cluster::group_prefix("test", MODEL, group) + "ranks/";
    rt().block_on(reg.get_prefix(prefix)).unwrap().len()
}

#[test]
fn a_killed_rank_breaks_its_group_and_another_group_finishes_its_streams() {
    let e = etcd();
    let _a = encoder(&e);
    let _c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &[]);
    let dec = env!("CARGO_BIN_EXE_iris-decoder");
    let slow = ["--test-step-delay-ms", "15"];
    // Group a (TCP): rank 0 first. It waits for rank 1 and registers nothing meanwhile.
    let a0 = {
        let ep = e.server.endpoint();
        std::thread::spawn(move || {
            let m = model_arg();
            spawn(
                dec,
                &[
                    "--model",
                    &m,
                    "--etcd",
                    &ep,
                    "--cluster",
                    "test",
                    "--lease-ttl-s",
                    TTL,
                    "--tp",
                    "2",
                    "--rank",
                    "0",
                    "--group",
                    "a",
                    "--tp-transport",
                    "tcp",
                    "--test-step-delay-ms",
                    "15",
                ],
            )
        })
    };
    eventually(Duration::from_secs(20), "rank 0 of a in etcd", || {
        group_ranks(&e, "a") == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        registered(&e, "decoder").is_empty(),
        "a group of one rank out of two registered as a decoder"
    );
    let mut a1 = rank_process(Some(&e), "a", 1, &["--tp-transport", "tcp"]);
    let a0 = a0.join().unwrap();
    // Group b: the ranks find they share a host and meet over shared memory.
    let mut b1 = rank_process(Some(&e), "b", 1, &slow);
    let b0 = member(
        dec,
        &e,
        &[&["--tp", "2", "--rank", "0", "--group", "b"][..], &slow].concat(),
    );
    // Load routing: with the prefix routing, the runs one by one below leave the
    // prompt's blocks in one group, which may then take every stream.
    let g = member(
        env!("CARGO_BIN_EXE_iris-gateway"),
        &e,
        &["--routing", "load"],
    );
    eventually(
        Duration::from_secs(20),
        "two groups, two decoder members",
        || {
            let mut d = registered(&e, "decoder");
            d.sort();
            let mut want = vec![a0.grpc.clone(), b0.grpc.clone()];
            want.sort();
            d == want && group_ranks(&e, "a") == 2 && group_ranks(&e, "b") == 2
        },
    );
    let reqs = mixed_requests();
    let rt = rt();
    let want = one_by_one(&rt, &g.grpc, &reqs);
    let count = |p: &Proc| metric(&p.http, "iris_decoder_requests_total");
    let (a_before, b_before) = (count(&a0), count(&b0));
    // Mid-stream (60 tokens at 15 ms a step take ~1 s): kill -9 rank 1 of group a.
    let got = streams_with_a_kill(&rt, &g.grpc, &reqs, Duration::from_millis(400), || {
        a1.0.kill().unwrap()
    });
    let (on_a, on_b) = (count(&a0) - a_before, count(&b0) - b_before);
    println!(
        "rank 1 of group a killed mid-stream: group a had taken {on_a} of 6 streams, group b \
         ran {on_b} ({} moved)",
        on_a + on_b - 6.0
    );
    for (i, (g, w)) in got.into_iter().zip(&want).enumerate() {
        let g = g.unwrap_or_else(|e| panic!("stream {i} failed: {e:?}"));
        assert_eq!(&g, w, "stream {i} differs from the run without failure");
    }
    assert!(on_a + on_b > 6.0, "no stream was on the broken group");
    // The broken group leaves the membership; its rank 0 stays up, refusing work.
    let took = eventually(Duration::from_secs(10), "group a deregistered", || {
        registered(&e, "decoder") == vec![b0.grpc.clone()]
    });
    println!("the broken group left the membership {took:?} after the streams ended");
    let mut a0 = a0;
    assert!(
        a0.child.try_wait().unwrap().is_none(),
        "rank 0 of the broken group exited"
    );
    // A rank of group b dies while the group is idle: rank 0 finds it gone between
    // steps and the group leaves too; with no decoder left a request is UNAVAILABLE.
    b1.0.kill().unwrap();
    let took = eventually(Duration::from_secs(10), "group b deregistered", || {
        registered(&e, "decoder").is_empty()
    });
    println!("an idle group whose rank 1 was killed left the membership in {took:?}");
    let r = rt.block_on(stream_all(&g.grpc, reqs[0].clone()));
    assert_eq!(r.expect_err("no decoder is left").code(), Code::Unavailable);
}

#[test]
fn a_group_meets_at_static_addresses_without_etcd() {
    let m = model_arg();
    let enc = spawn(env!("CARGO_BIN_EXE_iris-encoder"), &["--model", &m]);
    let con = spawn(env!("CARGO_BIN_EXE_iris-connector"), &["--model", &m]);
    let one = spawn(env!("CARGO_BIN_EXE_iris-decoder"), &["--model", &m]);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let addrs = format!("{},{}", free(), free());
    let health = free();
    let r1_args = ["--tp-addrs", &addrs, "--follower-health-addr", &health];
    let _r1 = rank_process(None, "s", 1, &r1_args);
    let r0 = spawn(
        env!("CARGO_BIN_EXE_iris-decoder"),
        &[
            "--model",
            &m,
            "--tp",
            "2",
            "--rank",
            "0",
            "--group",
            "s",
            "--tp-addrs",
            &addrs,
        ],
    );
    let gateway = |d: &Proc| {
        spawn(
            env!("CARGO_BIN_EXE_iris-gateway"),
            &[
                "--model",
                &m,
                "--encoder",
                &enc.grpc,
                "--connector",
                &con.grpc,
                "--decoder",
                &d.grpc,
            ],
        )
    };
    let (g1, g2) = (gateway(&one), gateway(&r0));
    let rt = rt();
    for seed in [0u64, 7] {
        let mut r = request(PROMPT, vec![image("scene.png")], 12);
        if seed > 0 {
            r.sampling = Some(sampled(seed));
        }
        let (want, got) = rt.block_on(async {
            (
                stream_all(&g1.grpc, r.clone()).await.unwrap(),
                stream_all(&g2.grpc, r).await.unwrap(),
            )
        });
        assert_eq!(
            got, want,
            "the group of two at --tp-addrs differs from one rank"
        );
    }
    // Rank 1 answers health probes while it follows (a pod of its own in Kubernetes).
    let status = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{health}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        c.check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// A copy of the fixture whose configuration differs by one unused key: another model
/// (another digest: its own visual-token keys) on the same vision tower.
fn model_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let src = fixtures().join(MODEL);
    let dst = dir.join("llava-copy");
    std::fs::create_dir(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = dst.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["iris_test_copy"] = serde_json::json!(true);
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    dst
}

#[test]
fn the_visual_cache_is_one_for_the_cluster() {
    let e = etcd();
    let tmp = tempfile::tempdir().unwrap();
    let copy = model_copy(tmp.path());
    let copy_arg = format!("llava-copy={}", copy.display());
    let models = ["--model", &copy_arg];
    let enc = env!("CARGO_BIN_EXE_iris-encoder");
    let (mut e1, e2) = (member(enc, &e, &models), member(enc, &e, &models));
    let c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &models);
    let dec = env!("CARGO_BIN_EXE_iris-decoder");
    let (_d1, _d2) = (member(dec, &e, &models), member(dec, &e, &models));
    // The gateways keep nothing themselves: every image goes to the cluster's cache.
    let no_l1 = [&models[..], &["--visual-cache-bytes", "0"]].concat();
    let gw = env!("CARGO_BIN_EXE_iris-gateway");
    let (ga, gb) = (member(gw, &e, &no_l1), member(gw, &e, &no_l1));
    eventually(Duration::from_secs(20), "the members registered", || {
        registered(&e, "encoder").len() == 2
            && registered(&e, "decoder").len() == 2
            && registered(&e, "connector").len() == 1
    });
    let encodes = || {
        metric(&e1.http, "iris_encoder_requests_total")
            + metric(&e2.http, "iris_encoder_requests_total")
    };
    let projections = || metric(&c.http, "iris_connector_requests_total");
    let rt = rt();
    let run = |gateway: &str, model: &str, img: Vec<u8>| {
        let mut r = request(PROMPT, vec![img], 4);
        r.model = model.into();
        rt.block_on(stream_all(gateway, r)).unwrap()
    };
    // 1. An image through gateway A, then B: one encode, one projection, same tokens;
    //    then for the other model on the same tower: its features are reused.
    let x = variant(250);
    let via_a = run(&ga.grpc, MODEL, x.clone());
    let via_b = run(&gb.grpc, MODEL, x.clone());
    assert_eq!(via_a, via_b);
    assert_eq!((encodes(), projections()), (1.0, 1.0));
    let other = run(&ga.grpc, "llava-copy", x);
    assert_eq!(other, via_a, "the copy has the same weights");
    assert_eq!(
        (encodes(), projections()),
        (1.0, 2.0),
        "the tower's features were shared"
    );
    // 2. 32 concurrent requests for one new image, half through each gateway: one encode.
    let y = variant(251);
    let outs: Vec<_> = rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let addr = if i % 2 == 0 {
                    ga.grpc.clone()
                } else {
                    gb.grpc.clone()
                };
                let r = request(PROMPT, vec![y.clone()], 4);
                tokio::spawn(async move { stream_all(&addr, r).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(outs.iter().all(|o| *o == outs[0]));
    assert_eq!(
        (encodes(), projections()),
        (2.0, 3.0),
        "32 requests for one image"
    );
    // 3. 200 images (one at a time: every key at its owner), then one encoder stops: the
    //    same images for the other model (new token keys, same tower) re-encode only the
    //    stopped encoder's share.
    let before = (
        metric(&e1.http, "iris_encoder_requests_total"),
        metric(&e2.http, "iris_encoder_requests_total"),
    );
    for k in 0..200u8 {
        run(&ga.grpc, MODEL, variant(k));
    }
    let owned = (
        metric(&e1.http, "iris_encoder_requests_total") - before.0,
        metric(&e2.http, "iris_encoder_requests_total") - before.1,
    );
    println!(
        "200 images: encoder 1 owned {}, encoder 2 {}",
        owned.0, owned.1
    );
    assert_eq!(owned.0 + owned.1, 200.0);
    assert!(owned.0 > 0.0 && owned.1 > 0.0, "{owned:?}");
    terminate(&mut e1);
    eventually(Duration::from_secs(10), "encoder 1 left", || {
        registered(&e, "encoder").len() == 1
    });
    let e2_before = metric(&e2.http, "iris_encoder_requests_total");
    for k in 0..200u8 {
        run(&gb.grpc, "llava-copy", variant(k));
    }
    let moved = metric(&e2.http, "iris_encoder_requests_total") - e2_before;
    println!(
        "encoder 1 stopped: {moved} of 200 images re-encoded (it owned {})",
        owned.0
    );
    assert_eq!(moved, owned.0, "only the stopped encoder's keys moved");
}

/// How many conversations [`conversations`] runs: an odd count, so that load-only routing
/// (ties taken in turn over two decoders) does not keep a conversation on one decoder by
/// accident.
const CONVERSATIONS: usize = 3;

/// [`CONVERSATIONS`] multi-turn conversations through `gateway`, their turns interleaved
/// (one request at a time): each turn's prompt is the last one, its answer and a new
/// question. Returns, per turn after the first, whether it ran on the decoder that ran
/// the turn before it and how many prefix blocks it hit there, and every turn's time
/// to first token with whether it was a first turn.
#[allow(clippy::type_complexity)]
fn conversations(
    gateway: &str,
    decoders: &[&Proc],
    first_image: u8,
) -> (Vec<(bool, f64)>, Vec<(bool, Duration)>) {
    let rt = rt();
    let count =
        |name: &str| -> Vec<f64> { decoders.iter().map(|d| metric(&d.http, name)).collect() };
    let images: Vec<Vec<u8>> = (0..CONVERSATIONS as u8)
        .map(|c| variant(first_image + c))
        .collect();
    let mut prompts = vec![PROMPT.to_string(); CONVERSATIONS];
    let mut last: Vec<Option<usize>> = vec![None; CONVERSATIONS];
    let (mut later, mut ttfts) = (Vec::new(), Vec::new());
    for turn in 0..3 {
        for c in 0..CONVERSATIONS {
            let reqs0 = count("iris_decoder_requests_total");
            let hits0 = count("iris_prefix_cache_hit_blocks");
            let (ids, text, ttft) = rt
                .block_on(async {
                    let mut g = client(gateway).await;
                    generate(&mut g, request(&prompts[c], vec![images[c].clone()], 8)).await
                })
                .unwrap();
            assert_eq!(ids.len(), 8);
            ttfts.push((turn == 0, ttft));
            let reqs1 = count("iris_decoder_requests_total");
            let hits1 = count("iris_prefix_cache_hit_blocks");
            let on = (0..decoders.len())
                .find(|&i| reqs1[i] > reqs0[i])
                .expect("some decoder ran it");
            if let Some(prev) = last[c] {
                later.push((on == prev, hits1[on] - hits0[on]));
            }
            last[c] = Some(on);
            prompts[c] = format!("{}{text} USER: Tell me more. ASSISTANT:", prompts[c]);
        }
    }
    (later, ttfts)
}

#[test]
fn each_turn_of_a_conversation_goes_to_the_decoder_holding_its_prefix() {
    let e = etcd();
    let _a = encoder(&e);
    let _c = member(env!("CARGO_BIN_EXE_iris-connector"), &e, &[]);
    let dec = env!("CARGO_BIN_EXE_iris-decoder");
    // Decode steps slow enough that a turn's prefix events reach the gateway long
    // before the turn ends.
    let slow = ["--test-step-delay-ms", "10"];
    let (d1, d2) = (member(dec, &e, &slow), member(dec, &e, &slow));
    let gw = env!("CARGO_BIN_EXE_iris-gateway");
    let kv = member(gw, &e, &[]);
    let by_load = member(gw, &e, &["--routing", "load"]);
    eventually(Duration::from_secs(20), "the members registered", || {
        registered(&e, "decoder").len() == 2 && registered(&e, "encoder").len() == 1
    });
    let (routed, kv_ttft) = conversations(&kv.grpc, &[&d1, &d2], 10);
    let (loaded, load_ttft) = conversations(&by_load.grpc, &[&d1, &d2], 20);
    let summary = |r: &[(bool, f64)]| {
        (
            r.iter().filter(|(same, _)| *same).count(),
            r.iter().map(|(_, h)| h).sum::<f64>(),
        )
    };
    let mean = |t: &[(bool, Duration)], later: bool| {
        let v: Vec<Duration> = t
            .iter()
            .filter(|(first, _)| *first != later)
            .map(|(_, d)| *d)
            .collect();
        v.iter().sum::<Duration>() / v.len() as u32
    };
    let (kv_same, kv_hits) = summary(&routed);
    let (load_same, load_hits) = summary(&loaded);
    let later = routed.len();
    println!(
        "multi-turn, {CONVERSATIONS} conversations x 3 turns: KV-aware routing put \
         {kv_same}/{later} later turns on the decoder holding their prefix ({kv_hits} prefix \
         blocks hit), load-only {load_same}/{later} ({load_hits} blocks); mean TTFT of later \
         turns {:?} vs {:?} (first turns {:?} vs {:?})",
        mean(&kv_ttft, true),
        mean(&load_ttft, true),
        mean(&kv_ttft, false),
        mean(&load_ttft, false),
    );
    for (i, (same, hits)) in routed.iter().enumerate() {
        assert!(
            *same,
            "turn {} of conversation {} left its prefix",
            i % 2 + 2,
            i / 2
        );
        assert!(
            *hits >= 1.0,
            "turn {} of conversation {} hit no block",
            i % 2 + 2,
            i / 2
        );
    }
    assert!(kv_hits > load_hits, "{kv_hits} vs {load_hits}");
}

/// One span as an OTLP receiver decoded it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace: Vec<u8>,
    span: Vec<u8>,
    parent: Vec<u8>,
    /// Start and end, ns since the Unix epoch.
    start: u64,
    end: u64,
}

/// An OTLP/HTTP receiver on loopback: every `ExportTraceServiceRequest` posted to
/// `/v1/traces`, decoded from the wire (protobuf). Returns its address and the spans.
fn otlp_receiver(rt: &tokio::runtime::Runtime) -> (String, Arc<std::sync::Mutex<Vec<Received>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use prost::Message as _;
    let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = spans.clone();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut got = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                        got.push(Received {
                            service: service.clone(),
                            name: s.name,
                            trace: s.trace_id,
                            span: s.span_id,
                            parent: s.parent_span_id,
                            start: s.start_time_unix_nano,
                            end: s.end_time_unix_nano,
                        });
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

/// Tracing across the tiers as separate processes: a client's `traceparent` (gRPC
/// metadata, then an HTTP header) is the root of one trace whose spans come from the
/// gateway, the encoder, the connector and the decoder, each parented inside it.
#[test]
fn one_request_is_one_trace_across_the_four_processes() {
    let rt = rt();
    let (collector, spans) = otlp_receiver(&rt);
    let e = etcd();
    let otlp = ["--otlp-endpoint", &collector];
    let mut procs = [
        member(env!("CARGO_BIN_EXE_iris-encoder"), &e, &otlp),
        member(env!("CARGO_BIN_EXE_iris-connector"), &e, &otlp),
        member(env!("CARGO_BIN_EXE_iris-decoder"), &e, &otlp),
        member(env!("CARGO_BIN_EXE_iris-gateway"), &e, &otlp),
    ];
    eventually(Duration::from_secs(10), "members registered", || {
        registered(&e, "decoder").len() == 1 && registered(&e, "connector").len() == 1
    });
    let (gateway_grpc, gateway_http) = (procs[3].grpc.clone(), procs[3].http.clone());
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (grpc_parent, http_parent) = ("00f067aa0ba902b7", "00f067aa0ba902b8");
    rt.block_on(async {
        let mut c = client(&gateway_grpc).await;
        let mut req = tonic::Request::new(request(PROMPT, vec![image("scene.png")], 4));
        let tp = format!("00-{trace_id}-{grpc_parent}-01");
        req.metadata_mut()
            .insert("traceparent", tp.parse().unwrap());
        let mut s = c.generate(req).await.unwrap().into_inner();
        while s.message().await.unwrap().is_some() {}
    });
    // The OpenAI API, a new image (a miss again), its parent in the HTTP header.
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(image("tall.jpg"))
    };
    let body = serde_json::json!({
        "model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{b64}")}},
            {"type": "text", "text": "What is it?"}]}],
    });
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{gateway_http}/v1/chat/completions"))
        .header("traceparent", format!("00-{trace_id}-{http_parent}-01"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // SIGTERM: each member flushes its batched spans as it stops.
    for p in procs.iter_mut().rev() {
        terminate(p);
    }
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let (trace, roots) = (hex(trace_id), [hex(grpc_parent), hex(http_parent)]);
    eventually(
        Duration::from_secs(10),
        "spans from the four services",
        || {
            let got = spans.lock().unwrap();
            ["gateway", "encoder", "connector", "decoder"]
                .iter()
                .all(|s| got.iter().any(|r| r.service.contains(&format!("iris-{s}"))))
        },
    );
    let got = spans.lock().unwrap().clone();
    let mine: Vec<&Received> = got.iter().filter(|r| r.trace == trace).collect();
    // The gateway's prefix watch on the decoder is a call of its own (a trace of its
    // own, started by no request); every other span is the client's.
    let others: Vec<&Received> = got
        .iter()
        .filter(|r| r.trace != trace && !r.name.ends_with("/WatchPrefixes"))
        .collect();
    assert!(
        others.is_empty(),
        "spans outside the client's trace: {others:#?}"
    );
    let ids: std::collections::HashSet<&Vec<u8>> = mine.iter().map(|r| &r.span).collect();
    for r in &mine {
        assert!(
            ids.contains(&r.parent) || roots.contains(&r.parent),
            "{} {}'s parent is outside the trace",
            r.service,
            r.name
        );
    }
    for root in &roots {
        let top: Vec<&&Received> = mine.iter().filter(|r| &r.parent == root).collect();
        assert!(
            !top.is_empty() && top.iter().all(|r| r.service.contains("iris-gateway")),
            "the client's span parents the gateway's: {top:#?}"
        );
    }
    // Each tier's spans hang under the gateway's: walk up to a root.
    let by_id: HashMap<&Vec<u8>, &&Received> = mine.iter().map(|r| (&r.span, r)).collect();
    for r in &mine {
        let mut at = *r;
        let mut hops = 0;
        while let Some(p) = by_id.get(&at.parent) {
            at = p;
            hops += 1;
            assert!(hops < 64, "a parent cycle");
        }
        assert!(
            at.service.contains("iris-gateway"),
            "{} {} is not under the gateway",
            r.service,
            r.name
        );
    }
    let names: std::collections::BTreeSet<&str> = mine.iter().map(|r| r.name.as_str()).collect();
    println!("one trace: {} spans from 4 services: {names:?}", mine.len());
    for want in [
        "gateway.generate",
        "gateway.image",
        "encoder.queue",
        "encoder.vit",
        "connector.project",
        "decoder.generate",
        "decoder.queue",
        "decoder.prefill",
        "decoder.decode",
    ] {
        assert!(names.contains(want), "no {want} span: {names:?}");
    }
    // The decoder's phases follow one another under each request's span: the queue
    // wait ends when the engine admits the request, its prefill when the first token
    // comes.
    let generates: Vec<&&Received> = mine
        .iter()
        .filter(|r| r.name == "decoder.generate")
        .collect();
    assert!(!generates.is_empty());
    for generate in generates {
        let phase = |name: &str| {
            let found: Vec<&&Received> = mine
                .iter()
                .filter(|r| r.name == name && r.parent == generate.span)
                .collect();
            assert_eq!(
                found.len(),
                1,
                "one {name} span under each decoder.generate"
            );
            *found[0]
        };
        let phases = ["decoder.queue", "decoder.prefill", "decoder.decode"].map(phase);
        for (p, next) in phases.iter().zip(&phases[1..]) {
            assert!(
                p.end <= next.start,
                "{} ends before {} starts",
                p.name,
                next.name
            );
        }
        for p in phases {
            assert!(
                generate.start <= p.start && p.end <= generate.end,
                "{}",
                p.name
            );
        }
    }
}
