//! Helpers shared by the service tests: server processes on loopback, gRPC clients,
//! metrics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iris_proto::v1 as pb;
use iris_proto::v1::gateway_client::GatewayClient;

pub mod net;

pub const MODEL: &str = "llava-tiny-hub-f32";
pub const PROMPT: &str = "USER: <image>\nWhat is in the picture? ASSISTANT:";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

/// A server process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub grpc: String,
    pub http: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(bin: &str, args: &[&str]) -> Proc {
    spawn_on(&[], "127.0.0.1", bin, args)
}

/// `spawn` with a command prefix (`ip netns exec NS`: on another host), listening on
/// `ip`.
pub fn spawn_on(prefix: &[String], ip: &str, bin: &str, args: &[&str]) -> Proc {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let (grpc, http) = (format!("{ip}:0"), format!("{ip}:0"));
    if !prefix.is_empty() {
        // A member on another host dies with the thread that started it (the partition
        // tests start every member on the test's thread), so a test killed by a
        // timeout leaves no server in a namespace.
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut child = cmd
        .args(args)
        .args(["--grpc-addr", &grpc, "--http-addr", &http])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("{bin} printed {line:?}"))
            .to_string()
    };
    Proc {
        grpc: field("grpc="),
        http: field("http="),
        child,
    }
}

pub fn model_arg() -> String {
    fixtures().join(MODEL).display().to_string()
}

pub fn serve() -> Proc {
    spawn(
        env!("CARGO_BIN_EXE_iris"),
        &["serve", "--model", &model_arg()],
    )
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub async fn client(addr: &str) -> GatewayClient<tonic::transport::Channel> {
    GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

pub fn request(prompt: &str, images: Vec<Vec<u8>>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: MODEL.into(),
        prompt: prompt.into(),
        images,
        max_tokens,
        ..Default::default()
    }
}

/// Token ids of a gRPC generation, and the time to its first token (`req` a
/// `GenerateRequest`, or a `tonic::Request` of one with a deadline set).
pub async fn generate(
    c: &mut GatewayClient<tonic::transport::Channel>,
    req: impl tonic::IntoRequest<pb::GenerateRequest>,
) -> Result<(Vec<u32>, String, Duration), tonic::Status> {
    let t0 = Instant::now();
    let mut s = c.generate(req).await?.into_inner();
    let (mut ids, mut ttft) = (Vec::new(), None);
    while let Some(ev) = s.message().await? {
        match ev.event {
            Some(pb::generate_event::Event::Token(t)) => {
                ttft.get_or_insert_with(|| t0.elapsed());
                ids.push(t.id);
            }
            Some(pb::generate_event::Event::Finished(f)) => {
                return Ok((ids, f.text, ttft.unwrap_or_default()))
            }
            None => {}
        }
    }
    panic!("the stream ended without finishing")
}

/// `POST /v1/chat/completions` with a JSON body to the HTTP address `http`.
pub fn post_chat(http: &str, body: &serde_json::Value) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new()
        .post(format!("http://{http}/v1/chat/completions"))
        .json(body)
        .send()
        .unwrap()
}

/// A process's `/metrics` page.
pub fn metrics_text(http: &str) -> String {
    use std::io::{Read, Write};
    // Plain HTTP/1.0 over a socket: usable inside and outside the async tests.
    let mut sock = std::net::TcpStream::connect(http).unwrap();
    write!(sock, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut body = String::new();
    sock.read_to_string(&mut body).unwrap();
    body
}

/// A counter's value on a process's `/metrics` (summed over its labels).
pub fn metric(http: &str, name: &str) -> f64 {
    metrics_text(http)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The fixture image with its red channel shifted by `k`: a different image (a cache
/// miss) of the same size.
pub fn variant(k: u8) -> Vec<u8> {
    let mut px = image::load_from_memory(&image("scene.png"))
        .unwrap()
        .to_rgb8();
    px.pixels_mut().for_each(|p| p[0] = p[0].wrapping_add(k));
    let mut out = Vec::new();
    px.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Sends SIGTERM (a clean stop) and waits for the process to exit.
pub fn terminate(p: &mut Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status();
    let _ = p.child.wait();
}

/// Polls `f` every 20 ms until it holds; panics after `limit` (a liveness bound).
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// A fixture's `golden.json`.
pub fn golden(fixture: &str) -> serde_json::Value {
    let path = fixtures().join(fixture).join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The ids under `key` of a golden.
pub fn golden_ids(golden: &serde_json::Value, key: &str) -> Vec<u32> {
    golden[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The image files a golden's prompt takes, read.
pub fn golden_images(golden: &serde_json::Value) -> Vec<Vec<u8>> {
    golden["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| image(f.as_str().unwrap()))
        .collect()
}

/// Seeded sampling (temperature 0.8, top-p 0.9).
pub fn sampled(seed: u64) -> iris_proto::v1::SamplingParams {
    iris_proto::v1::SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed,
        ..Default::default()
    }
}

/// Six 60-token requests about one image, greedy and seeded in turn.
pub fn mixed_requests() -> Vec<iris_proto::v1::GenerateRequest> {
    (0..6u64)
        .map(|i| {
            let mut r = request(PROMPT, vec![image("scene.png")], 60);
            if i % 2 == 1 {
                r.sampling = Some(sampled(i));
            }
            r
        })
        .collect()
}

/// The members registered in the etcd at `endpoint` (cluster `test`), read directly.
pub fn members_at(endpoint: &str) -> iris_cluster::View {
    use iris_cluster::Registry;
    let reg = iris_cluster::EtcdRegistry::new(&[endpoint.to_string()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kvs = rt
        .block_on(reg.get_prefix(iris_cluster::members_prefix("test")))
        .unwrap();
    let mut view = iris_cluster::View::default();
    view.apply(iris_cluster::WatchEvent::Snapshot(kvs));
    view
}
