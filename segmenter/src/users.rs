//! What a worker remembers per user, in one LRU: the newest write its reads saw ([`Seen`], for
//! the dedupe) and the user's change rate ([`Rate`], for the blacklist).
//!
//! One entry per user means one hash lookup per change for both checks (they were two LRUs,
//! three lookups per change: at 50K events/s the blacklist's alone was 5% of the segmenter's
//! CPU). Eviction forgets both at once, which costs an extra read, or a bot counted from zero
//! again, and never a missed update.

use std::num::NonZeroUsize;

use crate::blacklist::{Limits, Rate};
use crate::dedupe::Seen;

/// One user's state.
#[derive(Debug, Clone)]
pub struct User {
    /// The newest write a read saw.
    pub seen: Seen,
    /// Changes counted for the blacklist.
    pub rate: Rate,
}

/// The users a worker remembers, at most `capacity` (least recently used go first).
pub struct Users {
    map: lru::LruCache<Box<str>, User>,
    limits: Limits,
}

impl Users {
    /// Room for `capacity` users, with the blacklist's `limits`.
    pub fn new(capacity: usize, limits: Limits) -> Users {
        Users {
            map: lru::LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
            limits,
        }
    }

    /// The user's state (a fresh one first seen at `now` if not remembered), and the blacklist's
    /// limits to check its rate with. A remembered user costs one lookup that misses the CPU's
    /// caches and one that hits them (keys are `Box<str>`, 8 bytes less per user than `String`,
    /// which `LruCache::get_or_insert_mut_ref` would need).
    pub fn get(&mut self, uid: &str, now: i64) -> (&mut User, &Limits) {
        let limits = &self.limits;
        if self.map.get_mut(uid).is_none() {
            self.map.put(
                uid.into(),
                User {
                    seen: Seen::default(),
                    rate: Rate::new(now, limits),
                },
            );
        }
        let user = self.map.get_mut(uid).expect("just found or put");
        (user, limits)
    }

    /// Whether `uid` is blacklisted at `now` (without counting a change or touching recency).
    pub fn banned(&self, uid: &str, now: i64) -> bool {
        self.map.peek(uid).is_some_and(|u| u.rate.banned(now))
    }

    /// A read of `uid` at `now` saw writes up to `written` (the row's `m:written`).
    pub fn read(&mut self, uid: &str, now: i64, written: i64) {
        self.get(uid, now).0.seen.read(written);
    }

    /// Users remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blacklist::Verdict;

    fn limits() -> Limits {
        Limits {
            window_ms: 60_000,
            max: 2,
            ban_ms: 3_600_000,
        }
    }

    #[test]
    fn given_user_when_read_and_counted_then_one_entry_holds_both() {
        let mut users = Users::new(10, limits());
        let now = 1_000_000_000;
        users.read("u", now, 500);
        let (u, l) = users.get("u", now);
        assert!(!u.seen.needs_read(500));
        assert_eq!(u.rate.check(now, l), Verdict::Pass);
        assert_eq!(users.len(), 1);
        for _ in 0..2 {
            let (u, l) = users.get("u", now);
            u.rate.check(now, l);
        }
        assert!(users.banned("u", now + 1));
        assert!(
            !users.get("u", now).0.seen.needs_read(400),
            "still remembered"
        );
    }

    #[test]
    fn given_full_when_new_user_then_least_recently_used_is_forgotten() {
        let mut users = Users::new(2, limits());
        users.read("a", 0, 10);
        users.read("b", 0, 20);
        users.get("a", 0); // a is now the most recent
        users.read("c", 0, 30);
        assert_eq!(users.len(), 2);
        assert!(users.get("b", 0).0.seen.needs_read(20), "b was evicted");
        assert!(!users.get("c", 0).0.seen.needs_read(30));
    }
}
