//! One async lock per key (a span, a checkpoint, a file), made when first asked for and
//! forgotten once nobody holds or waits for it: concurrent reads that need the same span, or
//! fills of the same file, do the work once, one after the other, and the map holds only the
//! keys in use.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// Locks by key (see the module doc).
pub struct KeyedLocks<K> {
    locks: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone> Default for KeyedLocks<K> {
    fn default() -> Self {
        KeyedLocks {
            locks: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyedLocks<K> {
    /// Waits until no one else holds `key`'s lock, then holds it until the guard is dropped.
    pub async fn lock(&self, key: K) -> KeyedGuard<'_, K> {
        let lock = self
            .locks
            .lock()
            .expect("keyed locks")
            .entry(key.clone())
            .or_default()
            .clone();
        KeyedGuard {
            owner: self,
            key,
            guard: Some(lock.lock_owned().await),
        }
    }
}

/// A held key; released (and forgotten unless someone waits for it) on drop.
pub struct KeyedGuard<'a, K: Hash + Eq + Clone> {
    owner: &'a KeyedLocks<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Clone> Drop for KeyedGuard<'_, K> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        // Under the map's lock, where every new holder takes its reference: the map's and this
        // guard's references alone mean that no one waits, so the key can be forgotten.
        let mut locks = self.owner.locks.lock().expect("keyed locks");
        if Arc::strong_count(OwnedMutexGuard::mutex(&guard)) <= 2 {
            locks.remove(&self.key);
        }
        drop(guard);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Keys the map holds.
    fn keys(locks: &KeyedLocks<usize>) -> usize {
        locks.locks.lock().unwrap().len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holders_of_one_key_take_turns_and_the_key_is_forgotten_after() {
        let locks = Arc::new(KeyedLocks::<usize>::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, most) = (locks.clone(), inside.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let _held = locks.lock(7).await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1, "two held one key at once");
        assert_eq!(keys(&locks), 0, "keys left behind");
    }

    #[tokio::test]
    async fn a_key_someone_waits_for_is_kept_until_the_last_lets_go() {
        let locks = Arc::new(KeyedLocks::<usize>::default());
        let first = locks.lock(1).await;
        let other = locks.lock(2).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _held = locks.lock(1).await;
            })
        };
        // Let the waiter take its reference and wait.
        while Arc::strong_count(locks.locks.lock().unwrap().get(&1).unwrap()) < 3 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert!(
            locks.locks.lock().unwrap().contains_key(&1),
            "forgotten while waited for: a third caller would not wait for the waiter"
        );
        waiter.await.unwrap();
        assert_eq!(keys(&locks), 1, "key 1 forgotten, key 2 still held");
        drop(other);
        assert_eq!(keys(&locks), 0);
    }
}
