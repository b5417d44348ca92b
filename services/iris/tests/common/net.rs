//! A network of hosts for partition tests: each host a network namespace (host 0 is
//! this test process's own) with a TUN interface whose packets a switch in this
//! process carries to the host they are addressed to — or drops, delays, or loses, by
//! rules the test sets between pairs of hosts and clears with `heal`.
//!
//! This kernel has no `netem` queueing discipline (`tc qdisc … netem` is "unknown"),
//! so delay and loss are the switch's, applied to every IP packet as netem would (a
//! fixed delay per direction, order kept; loss drawn per packet). A cut drops packets
//! silently: no reset, no ICMP — the peer just goes quiet. Needs root and `ip`.
#![allow(unsafe_code)]

use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What happens to packets from one host to another.
#[derive(Clone, Copy, Default, Debug)]
struct Rule {
    cut: bool,
    delay: Duration,
    /// Probability a packet is lost.
    loss: f64,
}

#[derive(Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub lost: AtomicU64,
    pub delayed: AtomicU64,
}

struct Delayed {
    at: Instant,
    seq: u64,
    to: usize,
    packet: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    // The earliest first (BinaryHeap is a max-heap).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Switch {
    tuns: Vec<File>,
    rules: Mutex<HashMap<(usize, usize), Rule>>,
    queue: Mutex<BinaryHeap<Delayed>>,
    wake: Condvar,
    stop: AtomicBool,
    seq: AtomicU64,
    rng: Mutex<u64>,
    counters: Counters,
}

/// Every host's address: 10.77.0.(10 + index).
fn ip_of(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

fn host_of(dst: &[u8]) -> Option<usize> {
    (dst[..3] == [10, 77, 0]).then(|| (dst[3] as usize).checked_sub(10))?
}

impl Switch {
    fn random(&self) -> f64 {
        let mut s = self.rng.lock().unwrap();
        // xorshift64*
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn send(&self, to: usize, packet: &[u8]) {
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        // One write is one packet; a full queue or a host gone just loses it.
        let _ = (&self.tuns[to]).write(packet);
    }

    fn route(&self, from: usize, packet: Vec<u8>) {
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return;
        }
        let Some(to) = host_of(&packet[16..20]).filter(|&h| h < self.tuns.len()) else {
            return;
        };
        let rule = self
            .rules
            .lock()
            .unwrap()
            .get(&(from, to))
            .copied()
            .unwrap_or_default();
        if rule.cut {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if rule.loss > 0.0 && self.random() < rule.loss {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if rule.delay.is_zero() {
            return self.send(to, &packet);
        }
        self.counters.delayed.fetch_add(1, Ordering::Relaxed);
        self.queue.lock().unwrap().push(Delayed {
            at: Instant::now() + rule.delay,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            to,
            packet,
        });
        self.wake.notify_one();
    }

    /// Reads packets from host `from`'s interface until stopped.
    fn read_from(&self, from: usize) {
        let fd = self.tuns[from].as_raw_fd();
        let mut buf = vec![0u8; 65536];
        while !self.stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd for a descriptor that lives as long as the switch.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n <= 0 {
                continue;
            }
            match (&self.tuns[from]).read(&mut buf) {
                Ok(n) if n > 0 => self.route(from, buf[..n].to_vec()),
                _ => {}
            }
        }
    }

    /// Sends delayed packets when their time comes, until stopped.
    fn release(&self) {
        let mut q = self.queue.lock().unwrap();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            match q.peek() {
                Some(d) if d.at <= now => {
                    let d = q.pop().unwrap();
                    self.send(d.to, &d.packet);
                }
                Some(d) => {
                    let wait = d.at - now;
                    q = self.wake.wait_timeout(q, wait).unwrap().0;
                }
                None => {
                    q = self
                        .wake
                        .wait_timeout(q, Duration::from_millis(100))
                        .unwrap()
                        .0
                }
            }
        }
    }
}

/// The network; taken down (namespaces deleted, the switch stopped) when dropped.
pub struct Net {
    switch: Arc<Switch>,
    names: Vec<String>,
    threads: Vec<JoinHandle<()>>,
    _lock: File,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip`");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens a TUN interface named `name` (no packet information header).
fn tun(name: &str) -> File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq-sized struct we own.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(
        r,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    f
}

impl Net {
    /// Hosts `names[0]` (this process's namespace) and one namespace each for the
    /// others. Partition tests take a lock so that one network exists at a time.
    pub fn new(names: &[&str]) -> Net {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "partition tests need root (network namespaces, TUN interfaces)"
        );
        let lock = File::create(std::env::temp_dir().join("iris-net-test.lock")).unwrap();
        // SAFETY: flock on a descriptor we own; blocks until the other test is done.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        // Namespaces a killed earlier run left behind.
        let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or("");
            if ns.starts_with("iris-h") {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        let mut tuns = Vec::new();
        for (i, _) in names.iter().enumerate() {
            let dev = format!("iris-h{i}");
            let f = tun(&dev);
            let addr = format!("{}/32", ip_of(i));
            if i == 0 {
                ip(&["addr", "add", &addr, "dev", &dev]);
                ip(&["link", "set", &dev, "up"]);
                ip(&["route", "add", "10.77.0.0/24", "dev", &dev]);
            } else {
                ip(&["netns", "add", &dev]);
                ip(&["link", "set", &dev, "netns", &dev]);
                ip(&["-n", &dev, "link", "set", "lo", "up"]);
                ip(&["-n", &dev, "addr", "add", &addr, "dev", &dev]);
                ip(&["-n", &dev, "link", "set", &dev, "up"]);
                ip(&["-n", &dev, "route", "add", "10.77.0.0/24", "dev", &dev]);
            }
            tuns.push(f);
        }
        let switch = Arc::new(Switch {
            tuns,
            rules: Mutex::new(HashMap::new()),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            rng: Mutex::new(0x9E37_79B9_7F4A_7C15),
            counters: Counters::default(),
        });
        let mut threads = Vec::new();
        for i in 0..names.len() {
            let s = switch.clone();
            threads.push(std::thread::spawn(move || s.read_from(i)));
        }
        let s = switch.clone();
        threads.push(std::thread::spawn(move || s.release()));
        Net {
            switch,
            names: names.iter().map(|s| s.to_string()).collect(),
            threads,
            _lock: lock,
        }
    }

    fn index(&self, host: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == host)
            .unwrap_or_else(|| panic!("no host `{host}`"))
    }

    /// The address of `host`.
    pub fn ip(&self, host: &str) -> String {
        ip_of(self.index(host))
    }

    /// The namespace of `host` (`None`: this process's).
    pub fn netns(&self, host: &str) -> Option<String> {
        match self.index(host) {
            0 => None,
            i => Some(format!("iris-h{i}")),
        }
    }

    /// The command prefix that runs a program on `host`.
    pub fn exec(&self, host: &str) -> Vec<String> {
        self.netns(host).map_or_else(Vec::new, |ns| {
            vec!["ip".into(), "netns".into(), "exec".into(), ns]
        })
    }

    fn set(&self, from: &str, to: &str, f: impl Fn(&mut Rule)) {
        let key = (self.index(from), self.index(to));
        f(self.switch.rules.lock().unwrap().entry(key).or_default());
    }

    /// Drops every packet from `from` to `to` (one way).
    pub fn cut_one_way(&self, from: &str, to: &str) {
        self.set(from, to, |r| r.cut = true);
    }

    /// Drops every packet between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Cuts `host` off from every other host.
    pub fn isolate(&self, host: &str) {
        for other in self.names.clone() {
            if other != host {
                self.cut(host, &other);
            }
        }
    }

    /// Drops every packet `host` sends, to any host; packets to it still arrive (its
    /// answers are lost, the requests reach it).
    pub fn silence(&self, host: &str) {
        for other in self.names.clone() {
            if other != host {
                self.cut_one_way(host, &other);
            }
        }
    }

    /// Delays each packet between `a` and `b` by `delay` each way and loses each with
    /// probability `loss`.
    pub fn degrade(&self, a: &str, b: &str, delay: Duration, loss: f64) {
        for (x, y) in [(a, b), (b, a)] {
            self.set(x, y, |r| {
                r.delay = delay;
                r.loss = loss;
            });
        }
    }

    /// Clears every rule: packets flow again.
    pub fn heal(&self) {
        self.switch.rules.lock().unwrap().clear();
    }

    pub fn counters(&self) -> &Counters {
        &self.switch.counters
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.switch.stop.store(true, Ordering::Relaxed);
        self.switch.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for i in 1..self.names.len() {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("iris-h{i}")])
                .status();
        }
    }
}
