//! Cluster membership and the model registry. A [`Registry`] puts keys under a lease
//! kept alive in the background (so a dead process's keys vanish within the TTL, and a
//! lease etcd lost is granted and the key put again), and watches a prefix: one
//! snapshot, then put / delete deltas, and a fresh snapshot after every reconnect. The
//! etcd implementation is what a cluster uses; the in-memory one serves `iris serve`
//! and unit tests.
//!
//! Keys: `/iris/<cluster>/members/<tier>/<id>` → [`Member`] (JSON), attached to the
//! member's lease; `/iris/<cluster>/models/<id>` → [`ModelEntry`] (JSON);
//! `/iris/<cluster>/groups/<model>/<group>/…` where a tensor-parallel decoder group's
//! ranks meet ([`group_prefix`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A running service as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `encoder`, `connector`, `decoder` or `gateway`.
    pub tier: String,
    /// Its gRPC address as others reach it.
    pub addr: String,
    pub models: Vec<String>,
    /// Work in hand (queued and running requests), refreshed while it lives.
    #[serde(default)]
    pub load: u32,
}

/// Which parts make a served model (the model registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    pub encoder: String,
    pub connector: String,
    pub language_model: String,
    #[serde(default = "one")]
    pub tp_size: u32,
}

fn one() -> u32 {
    1
}

pub fn members_prefix(cluster: &str) -> String {
    format!("/iris/{cluster}/members/")
}

pub fn member_key(cluster: &str, tier: &str, id: &str) -> String {
    format!("/iris/{cluster}/members/{tier}/{id}")
}

/// Where the ranks of tensor-parallel group `group` of `model` meet: `ranks/<rank>`
/// (each rank, under its lease) and `rendezvous` (rank 0's, once all are there).
pub fn group_prefix(cluster: &str, model: &str, group: &str) -> String {
    format!("/iris/{cluster}/groups/{model}/{group}/")
}

pub fn models_prefix(cluster: &str) -> String {
    format!("/iris/{cluster}/models/")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Everything under the prefix now (first, and again after a reconnect).
    Snapshot(Vec<(String, Vec<u8>)>),
    Put(String, Vec<u8>),
    Delete(String),
}

/// A registration; `close` deletes its key at once (dropping it does too, in the
/// background).
pub struct Lease {
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl Lease {
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let (done, wait) = oneshot::channel();
            if stop.send(done).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let (done, _) = oneshot::channel();
            let _ = stop.send(done);
        }
    }
}

#[async_trait::async_trait]
pub trait Registry: Send + Sync {
    /// Puts `key` = `value` under a lease of `ttl`, kept alive until the `Lease` closes.
    /// Returns once the key is in place.
    async fn register(&self, key: String, value: Vec<u8>, ttl: Duration) -> Result<Lease> {
        let (_tx, rx) = watch::channel(value);
        self.register_updating(key, rx, ttl).await
    }
    /// `register`, putting the value again (under the same lease) whenever `value`
    /// changes.
    async fn register_updating(
        &self,
        key: String,
        value: watch::Receiver<Vec<u8>>,
        ttl: Duration,
    ) -> Result<Lease>;
    async fn put(&self, key: String, value: Vec<u8>) -> Result<()>;
    async fn get_prefix(&self, prefix: String) -> Result<Vec<(String, Vec<u8>)>>;
    /// Watches `prefix` until the receiver is dropped.
    fn watch(&self, prefix: String) -> mpsc::Receiver<WatchEvent>;
}

// ---------------------------------------------------------------- etcd

/// etcd (v3 API) at `endpoints`.
#[derive(Clone)]
pub struct EtcdRegistry {
    endpoints: Vec<String>,
    access: EtcdAccess,
}

/// How to reach a secured etcd: a user and password (etcd's auth), TLS (its CA, and a
/// client certificate for `--client-cert-auth`).
#[derive(Clone, Default)]
pub struct EtcdAccess {
    pub user: Option<(String, String)>,
    pub tls: Option<etcd_client::TlsOptions>,
}

const RETRY: Duration = Duration::from_millis(300);

impl EtcdRegistry {
    pub fn new(endpoints: &[String]) -> EtcdRegistry {
        EtcdRegistry::with_access(endpoints, EtcdAccess::default())
    }

    pub fn with_access(endpoints: &[String], access: EtcdAccess) -> EtcdRegistry {
        EtcdRegistry {
            endpoints: endpoints.to_vec(),
            access,
        }
    }

    async fn client(&self) -> Result<etcd_client::Client> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some((user, password)) = &self.access.user {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &self.access.tls {
            opts = opts.with_tls(tls.clone());
        }
        Ok(etcd_client::Client::connect(&self.endpoints, Some(opts)).await?)
    }
}

enum SessionEnd {
    Stopped(oneshot::Sender<()>),
    Lost(Error),
}

impl EtcdRegistry {
    /// One lease's life: grant, put, keep alive until stopped (revoke) or lost.
    async fn lease_session(
        &self,
        key: &str,
        value: &mut watch::Receiver<Vec<u8>>,
        ttl: Duration,
        registered: &mut Option<oneshot::Sender<()>>,
        stop: &mut oneshot::Receiver<oneshot::Sender<()>>,
    ) -> SessionEnd {
        let run = async {
            let mut c = self.client().await?;
            let lease = c.lease_grant(ttl.as_secs().max(1) as i64, None).await?.id();
            let opts = etcd_client::PutOptions::new().with_lease(lease);
            let v = value.borrow_and_update().clone();
            c.put(key, v, Some(opts.clone())).await?;
            if let Some(r) = registered.take() {
                let _ = r.send(());
            }
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            let mut kv = c.clone();
            Ok::<_, Error>((c, lease, async move {
                // One ticker for the whole session: value updates must not postpone
                // the keep-alive (a member whose load changes often would lapse).
                let every = (ttl / 3).max(Duration::from_millis(200));
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut updating = true;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            keeper.keep_alive().await?;
                            match stream.message().await? {
                                Some(r) if r.ttl() > 0 => {}
                                _ => return Err::<(), Error>(Error::Other("the lease expired".into())),
                            }
                        }
                        changed = value.changed(), if updating => {
                            if changed.is_ok() {
                                let v = value.borrow_and_update().clone();
                                kv.put(key, v, Some(opts.clone())).await?;
                            } else {
                                // The sender is gone: the value stays as it is.
                                updating = false;
                            }
                        }
                    }
                }
            }))
        };
        tokio::select! {
            r = run => match r {
                Err(e) => SessionEnd::Lost(e),
                Ok((mut c, lease, keep)) => tokio::select! {
                    e = keep => SessionEnd::Lost(e.err().unwrap_or(Error::Other("keep-alive ended".into()))),
                    done = &mut *stop => {
                        let _ = c.lease_revoke(lease).await;
                        SessionEnd::Stopped(done.unwrap_or_else(|_| oneshot::channel().0))
                    }
                },
            },
            done = &mut *stop => SessionEnd::Stopped(done.unwrap_or_else(|_| oneshot::channel().0)),
        }
    }

    async fn watch_session(&self, prefix: &str, tx: &mpsc::Sender<WatchEvent>) -> Result<()> {
        let mut c = self.client().await?;
        let snap = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await?;
        let rev = snap.header().map_or(0, |h| h.revision());
        let kvs = snap
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        if tx.send(WatchEvent::Snapshot(kvs)).await.is_err() {
            return Ok(());
        }
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let mut stream = c.watch(prefix, Some(opts)).await?;
        // A watch stream stays quiet while etcd is away: ask for progress now and then,
        // so a dead connection shows up as an error and the loop resyncs.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = tick.tick() => {
                    stream.request_progress().await?;
                    continue;
                }
            };
            let Some(resp) = msg else {
                return Err(Error::Other("the watch ended".into()));
            };
            if resp.canceled() {
                return Err(Error::Other("the watch was cancelled".into()));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let e = match ev.event_type() {
                    etcd_client::EventType::Put => WatchEvent::Put(key, kv.value().to_vec()),
                    etcd_client::EventType::Delete => WatchEvent::Delete(key),
                };
                if tx.send(e).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    async fn register_updating(
        &self,
        key: String,
        mut value: watch::Receiver<Vec<u8>>,
        ttl: Duration,
    ) -> Result<Lease> {
        let (stop_tx, mut stop) = oneshot::channel::<oneshot::Sender<()>>();
        let (reg_tx, reg_rx) = oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let mut registered = Some(reg_tx);
            loop {
                match this
                    .lease_session(&key, &mut value, ttl, &mut registered, &mut stop)
                    .await
                {
                    SessionEnd::Stopped(done) => {
                        let _ = done.send(());
                        return;
                    }
                    SessionEnd::Lost(e) => {
                        tracing::warn!(%key, "registration lost, registering again: {e}");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), reg_rx).await {
            Ok(Ok(())) => Ok(Lease {
                stop: Some(stop_tx),
            }),
            _ => Err(Error::Other(format!(
                "could not register with etcd at {:?}",
                self.endpoints
            ))),
        }
    }

    async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        self.client().await?.put(key, value, None).await?;
        Ok(())
    }

    async fn get_prefix(&self, prefix: String) -> Result<Vec<(String, Vec<u8>)>> {
        let r = self
            .client()
            .await?
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }

    fn watch(&self, prefix: String) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                if let Err(e) = this.watch_session(&prefix, &tx).await {
                    tracing::warn!(%prefix, "watch interrupted, resyncing: {e}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        });
        rx
    }
}

// ---------------------------------------------------------------- memory

type Watchers = Vec<(String, mpsc::Sender<WatchEvent>)>;
type Shared = Arc<Mutex<(BTreeMap<String, Vec<u8>>, Watchers)>>;

/// The registry in one process (no expiry: its members live as long as it does).
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    inner: Shared,
}

impl MemoryRegistry {
    fn set(&self, key: String, value: Option<Vec<u8>>) {
        let mut g = self.inner.lock().expect("registry lock");
        let ev = match value {
            Some(v) => {
                g.0.insert(key.clone(), v.clone());
                WatchEvent::Put(key.clone(), v)
            }
            None => {
                g.0.remove(&key);
                WatchEvent::Delete(key.clone())
            }
        };
        g.1.retain(|(p, tx)| !key.starts_with(p.as_str()) || tx.try_send(ev.clone()).is_ok());
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register_updating(
        &self,
        key: String,
        mut value: watch::Receiver<Vec<u8>>,
        _ttl: Duration,
    ) -> Result<Lease> {
        self.set(key.clone(), Some(value.borrow_and_update().clone()));
        let (stop, mut wait) = oneshot::channel::<oneshot::Sender<()>>();
        let this = self.clone();
        tokio::spawn(async move {
            let done = loop {
                tokio::select! {
                    done = &mut wait => break done,
                    changed = value.changed() => match changed {
                        Ok(()) => this.set(key.clone(), Some(value.borrow_and_update().clone())),
                        Err(_) => break (&mut wait).await,
                    },
                }
            };
            this.set(key, None);
            if let Ok(done) = done {
                let _ = done.send(());
            }
        });
        Ok(Lease { stop: Some(stop) })
    }

    async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        self.set(key, Some(value));
        Ok(())
    }

    async fn get_prefix(&self, prefix: String) -> Result<Vec<(String, Vec<u8>)>> {
        let g = self.inner.lock().expect("registry lock");
        Ok(g.0
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn watch(&self, prefix: String) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(1024);
        let mut g = self.inner.lock().expect("registry lock");
        let snap =
            g.0.range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        let _ = tx.try_send(WatchEvent::Snapshot(snap));
        g.1.push((prefix, tx));
        rx
    }
}

/// A watched prefix's current contents, kept up to date from a watch's events.
#[derive(Debug, Default, Clone)]
pub struct View(pub BTreeMap<String, Vec<u8>>);

impl View {
    pub fn apply(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Snapshot(kvs) => self.0 = kvs.into_iter().collect(),
            WatchEvent::Put(k, v) => {
                self.0.insert(k, v);
            }
            WatchEvent::Delete(k) => {
                self.0.remove(&k);
            }
        }
    }

    /// Each member of `tier` and the load it reports.
    pub fn loads(&self, tier: &str) -> Vec<(String, u32)> {
        self.0
            .values()
            .filter_map(|v| serde_json::from_slice::<Member>(v).ok())
            .filter(|m| m.tier == tier)
            .map(|m| (m.addr, m.load))
            .collect()
    }

    /// The members of `tier` (their addresses, sorted).
    pub fn addrs(&self, tier: &str) -> Vec<String> {
        let mut a: Vec<String> = self
            .0
            .values()
            .filter_map(|v| serde_json::from_slice::<Member>(v).ok())
            .filter(|m| m.tier == tier)
            .map(|m| m.addr)
            .collect();
        a.sort();
        a.dedup();
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_registry_watch_sees_snapshot_puts_and_deletes() {
        let r = MemoryRegistry::default();
        let m = |addr: &str| {
            serde_json::to_vec(&Member {
                tier: "encoder".into(),
                addr: addr.into(),
                models: vec!["m".into()],
                load: 0,
            })
            .unwrap()
        };
        let a = r
            .register(
                member_key("c", "encoder", "a"),
                m("a:1"),
                Duration::from_secs(3),
            )
            .await
            .unwrap();
        let mut w = r.watch(members_prefix("c"));
        let mut view = View::default();
        view.apply(w.recv().await.unwrap());
        assert_eq!(view.addrs("encoder"), vec!["a:1"]);
        let b = r
            .register(
                member_key("c", "encoder", "b"),
                m("b:1"),
                Duration::from_secs(3),
            )
            .await
            .unwrap();
        view.apply(w.recv().await.unwrap());
        assert_eq!(view.addrs("encoder"), vec!["a:1", "b:1"]);
        a.close().await;
        view.apply(w.recv().await.unwrap());
        assert_eq!(view.addrs("encoder"), vec!["b:1"]);
        drop(b);
        view.apply(w.recv().await.unwrap());
        assert!(view.addrs("encoder").is_empty());
    }
}
pub mod etcd_server;
