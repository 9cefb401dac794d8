//! What the node's caches (environments, images) share: leases that keep
//! an entry from eviction while a slot or warm worker uses it, and work
//! done once per key however many slots ask at once.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::sync::OnceCell;

/// A hold on cache entries: an entry with a holder is never evicted. Slots
/// hold one; warm workers keep theirs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lease(#[allow(dead_code)] Vec<Arc<()>>);

impl Lease {
    /// One hold on both.
    pub(crate) fn and(mut self, other: Lease) -> Self {
        self.0.extend(other.0);
        self
    }
}

/// The holders of a cache's entries, by key.
#[derive(Default)]
pub(crate) struct Leases(Mutex<HashMap<String, Arc<()>>>);

impl Leases {
    pub(crate) fn lease(&self, key: &str) -> Lease {
        let mut tokens = self.0.lock().expect("leases lock poisoned");
        Lease(vec![tokens.entry(key.to_string()).or_default().clone()])
    }

    pub(crate) fn in_use(&self, key: &str) -> bool {
        let tokens = self.0.lock().expect("leases lock poisoned");
        tokens.get(key).is_some_and(|t| Arc::strong_count(t) > 1)
    }
}

/// Work (a build, a pull) run once per key: whoever asks first runs it,
/// the others asking meanwhile wait for its result. Once done the key is
/// forgotten, so a later caller looks on disk again (and retries a
/// failure).
pub(crate) struct OncePerKey<T>(Mutex<HashMap<String, Arc<OnceCell<T>>>>);

impl<T> Default for OncePerKey<T> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T: Clone> OncePerKey<T> {
    pub(crate) async fn run<F: Future<Output = T>>(&self, key: &str, work: impl FnOnce() -> F) -> T {
        let cell = self
            .0
            .lock()
            .expect("work lock poisoned")
            .entry(key.to_string())
            .or_default()
            .clone();
        let result = cell.get_or_init(work).await.clone();
        self.0.lock().expect("work lock poisoned").remove(key);
        result
    }
}
