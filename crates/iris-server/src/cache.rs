//! The gateway's visual-token cache: content-addressed (BLAKE3 of the image bytes plus
//! a digest of the model's encoder, connector and preprocessing), bounded by bytes,
//! least recently used out first. Concurrent requests for the same uncached image wait
//! for one encode (single-flight); when every waiter has gone, the encode is dropped
//! too, so a cancelled client frees the tiers' work.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::error::ServeError;
use futures::future::{FutureExt, Shared};
use iris_tensor::Tensor;

use crate::metrics::Metrics;

pub type Key = [u8; 32];

type Flight = Shared<Pin<Box<dyn Future<Output = Result<Arc<Tensor>, ServeError>> + Send>>>;

enum Entry {
    Ready {
        tokens: Arc<Tensor>,
        bytes: usize,
        tick: u64,
    },
    Pending {
        flight: Flight,
        waiters: usize,
    },
}

struct Inner {
    entries: HashMap<Key, Entry>,
    by_use: BTreeMap<u64, Key>,
    bytes: usize,
    tick: u64,
}

pub struct VisualCache {
    inner: Mutex<Inner>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

/// Whether a lookup found the tokens ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
}

/// Takes a waiter off a pending entry when dropped; the last one takes the entry.
struct Waiter<'a> {
    cache: &'a VisualCache,
    key: Key,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut g = self.cache.inner.lock().expect("cache lock");
        if let Some(Entry::Pending { waiters, .. }) = g.entries.get_mut(&self.key) {
            *waiters -= 1;
            if *waiters == 0 {
                g.entries.remove(&self.key);
            }
        }
    }
}

impl VisualCache {
    pub fn new(capacity_bytes: usize, metrics: Arc<Metrics>) -> Self {
        VisualCache {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                by_use: BTreeMap::new(),
                bytes: 0,
                tick: 0,
            }),
            capacity: capacity_bytes,
            metrics,
        }
    }

    pub fn key(model_digest: &[u8; 32], image: &[u8]) -> Key {
        VisualCache::key_of(model_digest, blake3::hash(image).as_bytes())
    }

    /// The key of an image whose BLAKE3 is `image_hash` under `digest`.
    pub fn key_of(digest: &[u8; 32], image_hash: &Key) -> Key {
        let mut h = blake3::Hasher::new();
        h.update(digest);
        h.update(image_hash);
        *h.finalize().as_bytes()
    }

    /// What is held under `key`, if it is ready (a hit, made the most recently used).
    pub fn get(&self, key: &Key) -> Option<Arc<Tensor>> {
        let mut g = self.inner.lock().expect("cache lock");
        g.tick += 1;
        let now = g.tick;
        let inner = &mut *g;
        match inner.entries.get_mut(key) {
            Some(Entry::Ready { tokens, tick, .. }) => {
                inner.by_use.remove(tick);
                *tick = now;
                inner.by_use.insert(now, *key);
                self.metrics.cache_hits.inc();
                Some(tokens.clone())
            }
            _ => None,
        }
    }

    /// The visual tokens under `key`, from the cache or from `compute` (run once for
    /// all concurrent callers with this key).
    pub async fn get_or_compute<F>(
        &self,
        key: Key,
        compute: F,
    ) -> Result<(Arc<Tensor>, Lookup), ServeError>
    where
        F: Future<Output = Result<Tensor, ServeError>> + Send + 'static,
    {
        let flight = {
            let mut g = self.inner.lock().expect("cache lock");
            g.tick += 1;
            let now = g.tick;
            let inner = &mut *g;
            match inner.entries.get_mut(&key) {
                Some(Entry::Ready { tokens, tick, .. }) => {
                    inner.by_use.remove(tick);
                    *tick = now;
                    inner.by_use.insert(now, key);
                    self.metrics.cache_hits.inc();
                    return Ok((tokens.clone(), Lookup::Hit));
                }
                Some(Entry::Pending { flight, waiters }) => {
                    *waiters += 1;
                    flight.clone()
                }
                None => {
                    self.metrics.cache_misses.inc();
                    let fut: Pin<Box<dyn Future<Output = _> + Send>> =
                        Box::pin(async move { compute.await.map(Arc::new) });
                    let flight = fut.shared();
                    inner.entries.insert(
                        key,
                        Entry::Pending {
                            flight: flight.clone(),
                            waiters: 1,
                        },
                    );
                    flight
                }
            }
        };
        let waiter = Waiter { cache: self, key };
        let result = flight.await;
        let mut g = self.inner.lock().expect("cache lock");
        std::mem::forget(waiter);
        let pending = matches!(g.entries.get(&key), Some(Entry::Pending { .. }));
        match (&result, pending) {
            (Ok(tokens), true) => {
                let bytes = tokens.elem_count() * 4;
                g.tick += 1;
                let tick = g.tick;
                g.entries.insert(
                    key,
                    Entry::Ready {
                        tokens: tokens.clone(),
                        bytes,
                        tick,
                    },
                );
                g.by_use.insert(tick, key);
                g.bytes += bytes;
                self.evict(&mut g);
            }
            (Err(_), true) => {
                g.entries.remove(&key);
            }
            _ => {}
        }
        self.metrics.cache_bytes.set(g.bytes as i64);
        result.map(|t| (t, Lookup::Miss))
    }

    fn evict(&self, g: &mut Inner) {
        while g.bytes > self.capacity {
            let Some((_, key)) = g.by_use.pop_first() else {
                return;
            };
            if let Some(Entry::Ready { bytes, .. }) = g.entries.remove(&key) {
                g.bytes -= bytes;
                self.metrics.cache_evictions.inc();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("cache lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn tokens(n: usize) -> Tensor {
        Tensor::from_f32(vec![1.0; n], &[n, 1]).unwrap()
    }

    #[tokio::test]
    async fn concurrent_misses_compute_once_and_lru_evicts_by_bytes() {
        let cache = Arc::new(VisualCache::new(100 * 4, Arc::new(Metrics::new())));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, runs) = (cache.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_compute([1; 32], async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(tokens(40))
                    })
                    .await
                    .unwrap()
                    .0
                    .rows()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 40);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let hit = cache
            .get_or_compute([1; 32], async { Ok(tokens(1)) })
            .await
            .unwrap();
        assert_eq!((hit.0.rows(), hit.1), (40, Lookup::Hit));
        // 40 + 40 fit in 100; a third evicts the least recently used ([2]).
        cache
            .get_or_compute([2; 32], async { Ok(tokens(40)) })
            .await
            .unwrap();
        cache
            .get_or_compute([1; 32], async { Ok(tokens(1)) })
            .await
            .unwrap();
        cache
            .get_or_compute([3; 32], async { Ok(tokens(40)) })
            .await
            .unwrap();
        assert_eq!(cache.bytes(), 320);
        let again = cache
            .get_or_compute([2; 32], async { Ok(tokens(7)) })
            .await
            .unwrap();
        assert_eq!((again.0.rows(), again.1), (7, Lookup::Miss));
        let kept = cache
            .get_or_compute([1; 32], async { Ok(tokens(9)) })
            .await
            .unwrap();
        assert_eq!(kept.1, Lookup::Hit);
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_encode_is_not_cached() {
        let cache = Arc::new(VisualCache::new(1 << 20, Arc::new(Metrics::new())));
        let e = cache
            .get_or_compute([5; 32], async { Err(ServeError::bad_input("bad")) })
            .await;
        assert!(e.is_err());
        // Abandoned: the only waiter gives up; the next caller computes afresh.
        let c = cache.clone();
        let slow = tokio::spawn(async move {
            c.get_or_compute([6; 32], async {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                Ok(tokens(1))
            })
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        slow.abort();
        let _ = slow.await;
        let r = cache
            .get_or_compute([6; 32], async { Ok(tokens(2)) })
            .await
            .unwrap();
        assert_eq!((r.0.rows(), r.1), (2, Lookup::Miss));
    }
}
