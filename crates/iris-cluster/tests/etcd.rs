//! The etcd registry against a real etcd: registrations appear in watches, vanish at
//! once when closed and within the TTL when their process dies, and survive an etcd
//! restart (the watch resyncs, the registration is renewed).

use std::time::{Duration, Instant};

use iris_cluster::etcd_server::EtcdServer;
use iris_cluster::{member_key, members_prefix, EtcdRegistry, Member, Registry, View};
use tokio::sync::mpsc;

fn member(addr: &str) -> Vec<u8> {
    serde_json::to_vec(&Member {
        tier: "encoder".into(),
        addr: addr.into(),
        models: vec!["m".into()],
        load: 0,
    })
    .unwrap()
}

/// Applies watch events until `want` holds, or panics after `limit`.
async fn until(
    w: &mut mpsc::Receiver<iris_cluster::WatchEvent>,
    view: &mut View,
    limit: Duration,
    want: impl Fn(&View) -> bool,
) -> Duration {
    let t0 = Instant::now();
    while !want(view) {
        let left = limit
            .checked_sub(t0.elapsed())
            .expect("timed out waiting for the view");
        match tokio::time::timeout(left, w.recv()).await {
            Ok(Some(ev)) => view.apply(ev),
            _ => panic!("timed out; view: {:?}", view.addrs("encoder")),
        }
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_follow_lease_life_and_survive_an_etcd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdServer::start_in(dir.path().to_path_buf()).unwrap();
    let reg = EtcdRegistry::new(&[etcd.endpoint()]);
    let ttl = Duration::from_secs(2);
    let a = reg
        .register(member_key("t", "encoder", "a"), member("a:1"), ttl)
        .await
        .unwrap();
    let mut w = reg.watch(members_prefix("t"));
    let mut view = View::default();
    until(&mut w, &mut view, Duration::from_secs(5), |v| {
        v.addrs("encoder") == ["a:1"]
    })
    .await;

    // A process that dies without closing: its key goes within the TTL.
    let endpoint = etcd.endpoint();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let lease = rt
            .block_on(EtcdRegistry::new(&[endpoint]).register(
                member_key("t", "encoder", "b"),
                member("b:1"),
                Duration::from_secs(2),
            ))
            .unwrap();
        std::mem::forget(lease);
        rt.shutdown_background();
    })
    .join()
    .unwrap();
    until(&mut w, &mut view, Duration::from_secs(5), |v| {
        v.addrs("encoder").len() == 2
    })
    .await;
    let gone = until(&mut w, &mut view, Duration::from_secs(10), |v| {
        v.addrs("encoder") == ["a:1"]
    })
    .await;
    assert!(
        gone <= Duration::from_secs(2) + Duration::from_millis(1500),
        "{gone:?}"
    );

    // etcd away for a while: the watch resyncs and `a` is still registered after.
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.start().unwrap();
    let mut fresh = View::default();
    let mut w2 = reg.watch(members_prefix("t"));
    until(&mut w2, &mut fresh, Duration::from_secs(15), |v| {
        v.addrs("encoder") == ["a:1"]
    })
    .await;
    // Closing removes it at once.
    a.close().await;
    until(&mut w, &mut view, Duration::from_secs(5), |v| {
        v.addrs("encoder").is_empty()
    })
    .await;
}

/// A member whose load changes more often than the keep-alive period stays registered:
/// updating the value must not postpone the lease's keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_updated_often_keeps_its_lease_alive() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start_in(dir.path().to_path_buf()).unwrap();
    let reg = EtcdRegistry::new(&[etcd.endpoint()]);
    let (tx, rx) = tokio::sync::watch::channel(member("a:1"));
    let lease = reg
        .register_updating(member_key("t", "encoder", "a"), rx, Duration::from_secs(1))
        .await
        .unwrap();
    let mut w = reg.watch(members_prefix("t"));
    let mut view = View::default();
    until(&mut w, &mut view, Duration::from_secs(5), |v| {
        v.addrs("encoder") == ["a:1"]
    })
    .await;
    // Three TTLs of updates every 150 ms: not one delete.
    let t0 = Instant::now();
    let mut load = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        load += 1;
        let mut m: Member = serde_json::from_slice(&member("a:1")).unwrap();
        m.load = load;
        tx.send(serde_json::to_vec(&m).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        while let Ok(ev) = w.try_recv() {
            assert!(
                !matches!(ev, iris_cluster::WatchEvent::Delete(_)),
                "the registration lapsed after {:?}",
                t0.elapsed()
            );
            view.apply(ev);
        }
    }
    assert_eq!(view.addrs("encoder"), ["a:1"]);
    lease.close().await;
}
