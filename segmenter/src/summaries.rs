//! Per-user summaries: a change evaluated from what it wrote, not from the whole row
//! (docs/adr/007).
//!
//! After a whole-row read, a worker keeps the user's row pruned to the events the rule set's
//! results depend on ([`dmp_rules::history::HistoryNeeds`]), with the store's cursor of that
//! read. For the user's next change it asks the store for the cells written since
//! ([`dmp_store::UserStore::get_since`]), adds them to the summary ([`extend`]) and evaluates
//! that: the same segments and recheck time as the whole row, at a cost that does not grow with
//! the history. [`extend`] refuses (and the worker reads the whole row) when that could differ:
//! a new event at a time from the oldest to the newest event the row held (it may merge into an
//! event pruned away, or into one kept so that it no longer matches where a pruned one did), or
//! a history large enough for the store's version or cell limits to cut it. An event older than
//! every event of the row (a partner's file of past events) is a new event like a newer one.
//!
//! Summaries are bounded per worker (`segmenter.summaries_per_worker`, least recently used
//! first out), never persisted, and tied to the rule set they were pruned for.

use std::num::NonZeroUsize;
use std::sync::Arc;

use dmp_core::cell::{same, FAMILY_EVENTS};
use dmp_core::{Cell, Row};
use dmp_rules::RuleSet;
use dmp_store::{ReadCursor, Schema};

/// One user's summary.
pub(crate) struct Summary {
    /// The rule set it was pruned for.
    pub rules: Arc<RuleSet>,
    /// Where the store's reads of the row left off.
    pub cursor: ReadCursor,
    /// The row as far as the rules go.
    pub pruned: Pruned,
}

/// A user's row as far as the rules go, and what the whole row holds.
#[derive(Debug, Clone)]
pub(crate) struct Pruned {
    /// The row pruned: the events the rules depend on, the newest event, the other families.
    pub row: Row,
    /// Events in the whole row (at most; overwrites and expiry make it fewer).
    pub events: usize,
    /// Cells in the whole row as read (at most, likewise).
    pub cells: usize,
    /// Time of the newest event seen.
    pub newest: i64,
    /// Time of the oldest event seen (`i64::MAX` when none): an event older than it cannot merge
    /// into one pruned away.
    pub oldest: i64,
    /// The rules' conditions' matches among the events kept, from the evaluation that pruned
    /// the row: the next evaluation does not test those events again.
    pub seeds: Option<dmp_rules::history::Seeds>,
}

/// `row` with its cells' values copied into one buffer of its own. A read's cells are slices of
/// the buffers they were read from (a whole cached row, a write); a summary kept for minutes
/// would keep those alive.
pub(crate) fn compact(mut row: Row) -> Row {
    let size: usize = row.cells.iter().map(|c| c.value.len()).sum();
    let mut buf = Vec::with_capacity(size);
    for c in &row.cells {
        buf.extend_from_slice(&c.value);
    }
    let buf = bytes::Bytes::from(buf);
    let mut at = 0;
    for c in &mut row.cells {
        let n = c.value.len();
        c.value = buf.slice(at..at + n);
        at += n;
    }
    row
}

/// Why a change was evaluated from the whole row rather than a summary (the metric's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No summary of the user (first seen, evicted, or summaries off).
    NoSummary,
    /// The summary was pruned for another rule set, or the rules are not prunable.
    Rules,
    /// A timer of the user fired (the whole row, as before).
    Timer,
    /// The store could not say what was written since.
    Store,
    /// A new event at a time from the oldest to the newest event the row held.
    OutOfOrder,
    /// A history near the store's version or cell limits.
    History,
}

impl Refused {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::NoSummary => "no_summary",
            Refused::Rules => "rules",
            Refused::Timer => "timer",
            Refused::Store => "store",
            Refused::OutOfOrder => "out_of_order",
            Refused::History => "history",
        }
    }

    /// Every reason, for resolving the metric handles once.
    pub const ALL: [Refused; 6] = [
        Refused::NoSummary,
        Refused::Rules,
        Refused::Timer,
        Refused::Store,
        Refused::OutOfOrder,
        Refused::History,
    ];
}

/// The summaries of a worker.
pub(crate) struct Summaries {
    map: Option<lru::LruCache<Box<str>, Summary>>,
}

impl Summaries {
    /// At most `capacity` users; 0: none kept.
    pub fn new(capacity: usize) -> Summaries {
        Summaries {
            map: NonZeroUsize::new(capacity).map(lru::LruCache::new),
        }
    }

    /// Whether summaries are kept at all.
    pub fn enabled(&self) -> bool {
        self.map.is_some()
    }

    /// Takes the user's summary out (it goes back with [`Summaries::put`] once evaluated).
    pub fn take(&mut self, uid: &str) -> Option<Summary> {
        self.map.as_mut()?.pop(uid)
    }

    /// Keeps a user's summary, the least recently used one out when full.
    pub fn put(&mut self, uid: &str, s: Summary) {
        if let Some(map) = &mut self.map {
            map.put(uid.into(), s);
        }
    }

    /// Summaries kept.
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }
}

/// The summary's row with the cells written since added, as a read of the whole row would give
/// what the rules depend on: a later write of a coordinate wins, each family's versions and TTL
/// apply as of `now`. Also the summary's new event count, cell count, newest and oldest event.
/// Refused when a new event's time is from the oldest to the newest event seen (an event at an
/// existing event's time merges into it, and that one may have been pruned away), or when the
/// history may reach half the `e` family's versions or `max_cells` (the store's cap on a read),
/// where the whole row's read would be cut.
pub(crate) fn extend(
    s: Pruned,
    new: Vec<Cell>,
    schema: &Schema,
    now: i64,
    max_cells: usize,
) -> Result<Pruned, Refused> {
    let mut times: Vec<i64> = new
        .iter()
        .filter(|c| same(&c.family, FAMILY_EVENTS))
        .map(|c| c.ts)
        .collect();
    times.sort_unstable();
    times.dedup();
    // An event newer than every event the row held, or older than all of them, is a new event.
    // One at another time may merge into an event pruned away (or change one kept, which may
    // then no longer match a condition that a pruned event matched): only the row can say.
    if times.iter().any(|t| *t <= s.newest && *t >= s.oldest) {
        return Err(Refused::OutOfOrder);
    }
    let events = s.events + times.len();
    let cells = s.cells + new.len();
    if near_limits(events, cells, schema, max_cells) {
        return Err(Refused::History);
    }
    let newest = times.last().copied().unwrap_or(s.newest).max(s.newest);
    let oldest = times.first().copied().unwrap_or(s.oldest).min(s.oldest);
    let old = s.row;
    let mut row = Row {
        key: old.key,
        cells: merge(old.cells, new),
    };
    schema.limit(&mut row.cells, now);
    Ok(Pruned {
        row,
        events,
        cells,
        newest,
        oldest,
        seeds: s.seeds,
    })
}

/// Whether a row of `events` events and `cells` cells may reach half the `e` family's versions or
/// half `max_cells` (the store's cap on a read), where a read of the whole row would be cut and a
/// summary would hold what the row no longer does.
pub(crate) fn near_limits(events: usize, cells: usize, schema: &Schema, max_cells: usize) -> bool {
    let versions = schema
        .family(FAMILY_EVENTS)
        .map_or(u32::MAX, |f| f.max_versions) as usize;
    events > versions / 2 || cells >= max_cells / 2
}

/// Two rows' cells in HBase order merged into one in that order; of two cells with the same
/// coordinates, `new`'s.
fn merge(old: Vec<Cell>, new: Vec<Cell>) -> Vec<Cell> {
    use std::cmp::Ordering;
    let mut out = Vec::with_capacity(old.len() + new.len());
    let (mut a, mut b) = (old.into_iter().peekable(), new.into_iter().peekable());
    loop {
        let o = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.cmp_hbase(y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => break,
        };
        match o {
            Ordering::Less => out.extend(a.next()),
            Ordering::Greater => out.extend(b.next()),
            Ordering::Equal => {
                a.next();
                out.extend(b.next());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(row: Row, events: usize, newest: i64) -> Pruned {
        Pruned {
            cells: row.cells.len(),
            row,
            events,
            newest,
            oldest: newest - 100,
            seeds: None,
        }
    }

    fn empty() -> Row {
        Row {
            key: "u".into(),
            cells: Vec::new(),
        }
    }

    #[test]
    fn given_newer_events_when_extended_then_they_join_and_limits_apply() {
        let schema = Schema::dmp_default();
        let now = 1_800_000_000_000;
        let old = Row {
            key: "u".into(),
            cells: vec![
                Cell::new("e", "url", now - 10, b"a".to_vec()),
                Cell::new("m", "written", now - 10, b"w1".to_vec()),
                Cell::new("s", "current", now - 5, b"{}".to_vec()),
            ],
        };
        let s = summary(old, 1, now - 10);
        let new = vec![
            Cell::new("e", "url", now - 1, b"b".to_vec()),
            Cell::new("m", "written", now - 1, b"w2".to_vec()),
        ];
        let p = extend(s.clone(), new, &schema, now, 100_000).unwrap();
        assert_eq!((p.events, p.cells, p.newest), (2, 5, now - 1));
        let row = p.row;
        let got: Vec<(&str, &str, i64)> = row.cells.iter().map(|c| c.coordinates()).collect();
        assert_eq!(
            got,
            vec![
                ("e", "url", now - 1),
                ("e", "url", now - 10),
                ("m", "written", now - 1), // one version kept: the newest
                ("s", "current", now - 5),
            ]
        );
        // Expired events go as a read drops them (the `e` family keeps 180 days).
        let later = now + 180 * dmp_core::clock::DAY_MS + 5;
        let p = extend(s.clone(), Vec::new(), &schema, later, 100_000).unwrap();
        assert!(p.row.cells.iter().all(|c| c.family != "e"));
    }

    #[test]
    fn given_an_event_older_than_every_event_of_the_row_when_extended_then_it_joins() {
        let schema = Schema::dmp_default();
        let now = 1_800_000_000_000;
        // The row held events from now - 110 to now - 10; the summary keeps now - 10 and
        // now - 50.
        let old = Row {
            key: "u".into(),
            cells: vec![
                Cell::new("e", "q", now - 50, b"cats".to_vec()),
                Cell::new("e", "url", now - 10, b"a".to_vec()),
            ],
        };
        let s = summary(old, 5, now - 10);
        let new = vec![
            Cell::new("e", "q", now - 200, b"dogs".to_vec()),
            Cell::new("e", "url", now - 200, b"c".to_vec()),
        ];
        let p = extend(s, new, &schema, now, 100_000).unwrap();
        assert_eq!((p.events, p.newest, p.oldest), (6, now - 10, now - 200));
        let got: Vec<(&str, &str, i64)> = p.row.cells.iter().map(|c| c.coordinates()).collect();
        assert_eq!(
            got,
            vec![
                ("e", "q", now - 50),
                ("e", "q", now - 200),
                ("e", "url", now - 10),
                ("e", "url", now - 200),
            ]
        );
    }

    #[test]
    fn given_an_event_within_the_rows_times_or_a_long_history_when_extended_then_refused() {
        let schema = Schema::dmp_default();
        let now = 1_800_000_000_000;
        // From the oldest (now - 110) to the newest, even at the time of an event the summary
        // keeps (now - 10): it may merge into an event pruned away, or change a kept one.
        let kept = Row {
            key: "u".into(),
            cells: vec![Cell::new("e", "url", now - 10, b"a".to_vec())],
        };
        let s = summary(kept, 10, now - 10);
        for ts in [now - 10, now - 11, now - 110] {
            let new = vec![Cell::new("e", "url", ts, b"x".to_vec())];
            assert_eq!(
                extend(s.clone(), new, &schema, now, 100_000).err(),
                Some(Refused::OutOfOrder)
            );
        }
        // Half the `e` family's 1000 versions, or half the read cap.
        let s = summary(empty(), 500, now - 10);
        let new = vec![Cell::new("e", "url", now, b"x".to_vec())];
        assert_eq!(
            extend(s.clone(), new.clone(), &schema, now, 100_000).err(),
            Some(Refused::History)
        );
        let s = summary(empty(), 10, now - 10);
        assert_eq!(
            extend(s.clone(), new.clone(), &schema, now, 2).err(),
            Some(Refused::History)
        );
        assert!(extend(s.clone(), new, &schema, now, 100_000).is_ok());
    }
}
