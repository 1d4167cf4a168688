//! Users deleted on request stay suppressed for a while, so that events still on their way (or
//! sent by a tracker that did not hear of the deletion) do not bring them back.
//!
//! The suppression is a row `\x01suppressed/<uid>` whose cell `m:until` holds the end (epoch ms,
//! 8 bytes big-endian), so every process sharing the store sees it. [`Suppressions`] is the
//! in-memory set a storage writer checks per event: deletions made by the same process are in
//! it at once; the others arrive at the next [`Suppressions::reload`].

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::{Get, Put, Result, UserStore};
use dmp_core::Cell;

/// Row-key prefix of suppression rows.
pub const PREFIX: &str = "\u{1}suppressed/";

/// The suppression row of a user.
pub fn row_key(uid: &str) -> String {
    format!("{PREFIX}{uid}")
}

/// The put that suppresses `uid` until `until` (epoch ms).
pub fn put(uid: &str, until: i64) -> Put {
    Put {
        row: row_key(uid),
        cells: vec![Cell::new(
            dmp_core::cell::FAMILY_META,
            "until",
            until,
            until.to_be_bytes().to_vec(),
        )],
    }
}

/// Suppressed users and until when.
#[derive(Debug, Default)]
pub struct Suppressions {
    until: RwLock<HashMap<String, i64>>,
}

impl Suppressions {
    /// Whether `uid` is suppressed at `now`.
    pub fn is_suppressed(&self, uid: &str, now: i64) -> bool {
        let map = self.until.read();
        !map.is_empty() && map.get(uid).is_some_and(|u| *u > now)
    }

    /// Adds one (a deletion made in this process).
    pub fn insert(&self, uid: &str, until: i64) {
        self.until.write().insert(uid.to_string(), until);
    }

    /// Replaces the set with the store's current suppression rows; expired ones are deleted
    /// from the store. Returns how many are in force.
    pub fn reload(&self, store: &dyn UserStore, now: i64) -> Result<usize> {
        let template = Get {
            families: vec![dmp_core::cell::FAMILY_META.to_string()],
            ..Get::default()
        };
        let mut found = HashMap::new();
        let mut after = PREFIX.to_string();
        loop {
            let page = store.scan(Some(&after), 1000, &template)?;
            let Some(last) = page.last() else { break };
            after = last.key.clone();
            let mut done = false;
            for row in &page {
                let Some(uid) = row.key.strip_prefix(PREFIX) else {
                    done = true;
                    break;
                };
                let until = row
                    .latest(dmp_core::cell::FAMILY_META, "until")
                    .and_then(|c| {
                        c.value
                            .get(..8)
                            .map(|b| i64::from_be_bytes(b.try_into().expect("8 bytes")))
                    })
                    .unwrap_or(0);
                if until > now {
                    found.insert(uid.to_string(), until);
                } else {
                    store.delete_row(&row.key)?;
                }
            }
            if done || page.len() < 1000 {
                break;
            }
        }
        let n = found.len();
        // Keep in-process insertions newer than the store's view.
        let mut map = self.until.write();
        for (uid, until) in map.iter() {
            if *until > now && !found.contains_key(uid) {
                found.insert(uid.clone(), *until);
            }
        }
        *map = found;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_suppression_rows_when_reloaded_then_in_force_ones_apply_and_expired_go() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, store) = crate::embedded::open_temp(dir.path()).unwrap();
        store
            .put(&[put("anna", 2_000), put("old", 500), put("bob", 3_000)])
            .unwrap();
        store
            .put(&[Put {
                row: "plain".into(),
                cells: vec![Cell::new("e", "type", 1, b"x".to_vec())],
            }])
            .unwrap();
        let s = Suppressions::default();
        assert_eq!(s.reload(&store, 1_000).unwrap(), 2);
        assert!(s.is_suppressed("anna", 1_000));
        assert!(!s.is_suppressed("anna", 2_000), "ends at until");
        assert!(!s.is_suppressed("old", 1_000));
        assert!(!s.is_suppressed("plain", 1_000));
        assert!(
            store.get(&Get::row(row_key("old"))).unwrap().is_none(),
            "expired row deleted"
        );
        s.insert("carl", 5_000);
        s.reload(&store, 1_000).unwrap();
        assert!(
            s.is_suppressed("carl", 1_000),
            "in-process insertions survive a reload"
        );
    }
}
