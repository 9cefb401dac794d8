//! Per-slot user ids: with `--slot-uids FIRST-LAST`, every worker runs as a
//! uid of its own from that range (its group the same number), held for the
//! worker's life and returned when it ends. Calls of different slots, and so
//! of different tenants, can then neither signal, trace nor read each
//! other's processes and files, which one shared unprivileged user allows.
//! The range must be unused on the machine (like a subordinate-uid range:
//! no account owns it).

use std::{
    collections::BTreeSet,
    ops::RangeInclusive,
    sync::{Arc, Mutex},
};

/// The free uids of the range.
#[derive(Debug)]
pub struct SlotUids {
    range: RangeInclusive<u32>,
    free: Mutex<BTreeSet<u32>>,
}

/// A uid held by one worker; returned to the pool when dropped.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    pool: Arc<SlotUids>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool.free.lock().expect("uid pool lock poisoned").insert(self.uid);
    }
}

impl SlotUids {
    /// Parses `FIRST-LAST` (at most 65,536 uids, none of them root's).
    pub fn parse(text: &str) -> Result<Arc<Self>, String> {
        let bad = || format!("--slot-uids takes FIRST-LAST, two user ids, got {text:?}");
        let (first, last) = text.split_once('-').ok_or_else(bad)?;
        let first: u32 = first.trim().parse().map_err(|_| bad())?;
        let last: u32 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first || last - first >= 65_536 {
            return Err(format!(
                "--slot-uids {text}: the range must be non-empty, at most 65,536 ids, and not include root's 0"
            ));
        }
        Ok(Arc::new(Self {
            free: Mutex::new((first..=last).collect()),
            range: first..=last,
        }))
    }

    /// A free uid, if any is left.
    pub fn take(self: &Arc<Self>) -> Option<UidLease> {
        let uid = self.free.lock().expect("uid pool lock poisoned").pop_first()?;
        Some(UidLease {
            uid,
            pool: self.clone(),
        })
    }

    pub fn range(&self) -> &RangeInclusive<u32> {
        &self.range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_holds_a_uid_of_its_own_until_it_ends() {
        let pool = SlotUids::parse("5000-5001").unwrap();
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(pool.take().is_none(), "two workers, two uids");
        let freed = a.uid;
        drop(a);
        assert_eq!(pool.take().unwrap().uid, freed);
        for bad in ["0-10", "10-5", "5", "a-b", "1-100000"] {
            assert!(SlotUids::parse(bad).is_err(), "{bad}");
        }
    }
}
