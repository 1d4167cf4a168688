//! Durable re-evaluation timers.
//!
//! A user whose segments can change with time alone (a window, a recency bound) must be
//! re-evaluated when the earliest of them can change, even if no event ever arrives again and even
//! across restarts. The schedule lives in the user store, so it is as durable as the rows:
//! - a timer row `\x01timer/<partition>/<due>/<uid>` per pending re-evaluation (partition of
//!   `dmp.user-changes`, zero-padded; due in ms, zero-padded, so due timers are a key prefix);
//! - the user's own row records its pending timer in `s:recheck` (`<partition>/<due>`), so a later
//!   evaluation finds and replaces it.
//!
//! The poll loop scans the due timers of the partitions it owns ([`scan_due`]) and hands them to
//! the worker of the user like changes; the worker evaluates the user, writes the next timer
//! ([`plan`]) and only then deletes the fired one, so a crash leaves an extra timer (an extra
//! evaluation, harmless), never a missing one.

use dmp_core::cell::{FAMILY_META, FAMILY_SEGMENTS};
use dmp_core::{Cell, Row};
use dmp_store::{Get, Put, UserStore};

/// Row-key prefix of every timer row. `\x01` sorts before any printable uid.
pub const PREFIX: &str = "\u{1}timer/";
/// The qualifier (family `s`) where a user's pending timer is recorded.
pub const RECHECK: &str = "recheck";

/// A pending timer: the partition whose owner fires it, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Partition of `dmp.user-changes` the user belongs to.
    pub partition: u32,
    /// Due time, ms since the epoch.
    pub due: i64,
}

impl Pending {
    /// The timer row's key for `uid`.
    pub fn row_key(&self, uid: &str) -> String {
        format!(
            "{}{:05}/{:020}/{uid}",
            PREFIX,
            self.partition,
            self.due.max(0)
        )
    }

    /// Parses `s:recheck`.
    pub fn parse(value: &[u8]) -> Option<Pending> {
        let s = std::str::from_utf8(value).ok()?;
        let (p, d) = s.split_once('/')?;
        Some(Pending {
            partition: p.parse().ok()?,
            due: d.parse().ok()?,
        })
    }

    fn encode(&self) -> Vec<u8> {
        format!("{}/{}", self.partition, self.due).into_bytes()
    }
}

/// The pending timer recorded in a user's row (in HBase order, as read from the store).
pub fn recorded(row: &Row) -> Option<Pending> {
    row.latest_in_order(FAMILY_SEGMENTS, RECHECK)
        .and_then(|c| Pending::parse(&c.value))
}

/// What to write after evaluating a user.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Cells for the user's row (`s:recheck`), if it changes.
    pub recheck: Option<Cell>,
    /// A timer row to create.
    pub create: Option<Pending>,
    /// A timer row to delete (after the writes are durable).
    pub delete: Option<Pending>,
}

/// Decides how the schedule changes when a user evaluated at `now` (in `partition`) was recorded
/// with `old` and now needs re-evaluation at `next`.
///
/// A still-pending old timer that fires no later than needed is kept: it fires, the user is
/// evaluated and the right time is scheduled then. This keeps active users of recency rules (whose
/// recheck moves with every event) from rewriting their timer on every evaluation.
pub fn plan(old: Option<Pending>, next: Option<i64>, partition: u32, now: i64) -> Plan {
    if let Some(o) = old {
        if o.due > now && next.is_none_or(|n| o.due <= n) {
            return Plan::default();
        }
    }
    let create = next.map(|due| Pending { partition, due });
    if old.is_none() && create.is_none() {
        return Plan::default();
    }
    let value = create.map_or_else(Vec::new, |c| c.encode());
    Plan {
        recheck: Some(Cell::new(FAMILY_SEGMENTS, RECHECK, now, value)),
        create,
        delete: old.filter(|o| Some(*o) != create),
    }
}

/// The put creating a timer row.
pub fn timer_put(uid: &str, p: Pending) -> Put {
    Put {
        row: p.row_key(uid),
        cells: vec![Cell::new(FAMILY_META, "t", p.due, Vec::new())],
    }
}

/// A due timer found by [`scan_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The timer row's key.
    pub key: String,
    /// The user.
    pub uid: String,
    /// The timer.
    pub pending: Pending,
}

/// Parses a timer row key.
pub fn parse_key(key: &str) -> Option<Due> {
    let rest = key.strip_prefix(PREFIX)?;
    let (p, rest) = rest.split_once('/')?;
    let (d, uid) = rest.split_once('/')?;
    Some(Due {
        key: key.to_string(),
        uid: uid.to_string(),
        pending: Pending {
            partition: p.parse().ok()?,
            due: d.parse().ok()?,
        },
    })
}

/// The timers of `partition` due at `now`, oldest first, at most `max`.
pub fn scan_due(
    store: &dyn UserStore,
    partition: u32,
    now: i64,
    max: usize,
) -> dmp_store::Result<Vec<Due>> {
    let prefix = format!("{PREFIX}{partition:05}/");
    let template = Get {
        families: vec![FAMILY_META.to_string()],
        ..Get::default()
    };
    let mut out = Vec::new();
    let mut after = prefix.clone();
    // The scan has no end key: pages start small (usually few timers are due) and grow while
    // every row of a page is due.
    let mut page_size = 16;
    while out.len() < max {
        let page = store.scan(Some(&after), (max - out.len()).min(page_size), &template)?;
        page_size = (page_size * 4).min(1000);
        let Some(last) = page.last() else { break };
        after = last.key.clone();
        for row in &page {
            let Some(due) = row
                .key
                .starts_with(&prefix)
                .then(|| parse_key(&row.key))
                .flatten()
            else {
                return Ok(out);
            };
            if due.pending.due > now {
                return Ok(out);
            }
            out.push(due);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(partition: u32, due: i64) -> Pending {
        Pending { partition, due }
    }

    #[test]
    fn keys_sort_by_partition_then_due() {
        let a = p(1, 9_000).row_key("zed");
        let b = p(1, 10_000).row_key("abe");
        let c = p(2, 5).row_key("abe");
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(parse_key(&b).unwrap().uid, "abe");
        assert_eq!(parse_key(&b).unwrap().pending, p(1, 10_000));
        assert_eq!(parse_key("\u{1}timer/x/1/u"), None);
        assert_eq!(
            parse_key(&p(3, 7).row_key("a/b")).unwrap().uid,
            "a/b",
            "a uid may contain slashes"
        );
    }

    #[test]
    fn recheck_value_round_trips() {
        let v = p(7, 123).encode();
        assert_eq!(Pending::parse(&v), Some(p(7, 123)));
        assert_eq!(Pending::parse(b""), None);
        assert_eq!(Pending::parse(b"x/1"), None);
    }

    #[test]
    fn nothing_before_and_nothing_needed_writes_nothing() {
        assert_eq!(plan(None, None, 0, 100), Plan::default());
    }

    #[test]
    fn first_timer_is_created_and_recorded() {
        let pl = plan(None, Some(500), 3, 100);
        assert_eq!(pl.create, Some(p(3, 500)));
        assert_eq!(pl.delete, None);
        assert_eq!(&pl.recheck.unwrap().value[..], b"3/500");
    }

    #[test]
    fn pending_earlier_timer_is_kept() {
        assert_eq!(plan(Some(p(3, 400)), Some(500), 3, 100), Plan::default());
        assert_eq!(plan(Some(p(3, 500)), Some(500), 3, 100), Plan::default());
        // No longer needed but still pending: it fires and cleans up then.
        assert_eq!(plan(Some(p(3, 400)), None, 3, 100), Plan::default());
    }

    #[test]
    fn later_pending_timer_is_replaced_by_an_earlier_one() {
        let pl = plan(Some(p(3, 900)), Some(500), 3, 100);
        assert_eq!(pl.create, Some(p(3, 500)));
        assert_eq!(pl.delete, Some(p(3, 900)));
    }

    #[test]
    fn fired_timer_is_replaced_or_cleared() {
        let pl = plan(Some(p(3, 90)), Some(500), 3, 100);
        assert_eq!(pl.create, Some(p(3, 500)));
        assert_eq!(pl.delete, Some(p(3, 90)));
        let pl = plan(Some(p(3, 90)), None, 3, 100);
        assert_eq!(pl.create, None);
        assert_eq!(pl.delete, Some(p(3, 90)));
        assert!(pl.recheck.unwrap().value.is_empty());
    }

    #[test]
    fn due_timers_are_scanned_per_partition_in_due_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let mut puts = vec![
            timer_put("u1", p(1, 300)),
            timer_put("u2", p(1, 100)),
            timer_put("u3", p(1, 900)),
            timer_put("u4", p(2, 50)),
            timer_put("u5", p(0, 50)),
        ];
        puts.push(Put {
            row: "plain-user".into(),
            cells: vec![Cell::new("e", "type", 1, b"x".to_vec())],
        });
        store.put(&puts).unwrap();
        let due = scan_due(&store, 1, 500, 100).unwrap();
        let uids: Vec<&str> = due.iter().map(|d| d.uid.as_str()).collect();
        assert_eq!(uids, vec!["u2", "u1"]);
        assert_eq!(scan_due(&store, 1, 500, 1).unwrap().len(), 1);
        assert_eq!(scan_due(&store, 2, 10, 100).unwrap(), vec![]);
        assert_eq!(scan_due(&store, 2, 50, 100).unwrap()[0].uid, "u4");
        store.delete_row(&due[0].key).unwrap();
        assert_eq!(scan_due(&store, 1, 500, 100).unwrap()[0].uid, "u1");
    }
}
