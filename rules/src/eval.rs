//! Evaluation of a checked expression over a user's row.
//!
//! The row's cells of family `e` that share a version (the event time) form one event. Aggregates
//! (`count`, `any`, `since`) walk the events newest first and stop at their window; `any` and a
//! count compared with a number (`count(c, w) >= n`) stop at the match that decides them. Each
//! matched event becomes evidence. Each aggregate also says when its result can change without a
//! new event (the deciding match leaving the window, a recency bound passing):
//! [`Outcome::recheck_at`], which the segmenter uses to re-evaluate users whose memberships
//! expire.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

use dmp_core::cell::{same, same_bytes, FAMILY_EVENTS, FAMILY_META};
use dmp_core::Row;

use crate::lang::{CmpOp, Cond, Expr, Field, Pred};

/// One event of a user: its time and its cells (qualifier, value).
#[derive(Debug, Clone)]
pub struct EventView<'a> {
    /// Event time (ms).
    pub ts: i64,
    /// Cells of family `e` with this version, each with its value as text, lowercased on first
    /// use (for `contains` and hosts). One allocation per event.
    cells: Vec<EventCell<'a>>,
    /// Index in `cells` of each well-known qualifier ([`crate::lang::SLOTS`]); `u16::MAX`: absent.
    slots: [u16; crate::lang::SLOTS.len()],
    /// Parts derived once per event, as byte ranges: host and path (in the text) of `url` (0)
    /// and `ref` (1), on first use (rules that read neither, or only the host, do not pay for the
    /// rest); the three parts of `geo`. A host is a range in the text when it is lowercase ASCII
    /// there (nearly always), else in the lowercased text (`true`).
    hosts: [std::cell::OnceCell<(u32, u32, bool)>; 2],
    paths: [std::cell::OnceCell<(u32, u32)>; 2],
    geo: [Option<(u32, u32)>; 3],
    /// The ranges in the `ua` cell's value of the user agent's three parts (None: no such cell,
    /// or one written before the parts moved into it), on first use.
    ua: std::cell::OnceCell<Option<[(u32, u32); 3]>>,
}

#[derive(Debug, Clone)]
struct EventCell<'a> {
    qualifier: &'a str,
    value: &'a [u8],
    /// The value as text: itself when it is UTF-8, else a lossy copy made on first use (binary
    /// values such as `ip` are seldom read as text, and the copy allocates).
    text: Text<'a>,
    low: std::cell::OnceCell<Option<String>>,
}

#[derive(Debug, Clone)]
enum Text<'a> {
    Utf8(&'a str),
    Binary(std::cell::OnceCell<String>),
}

impl<'a> EventCell<'a> {
    fn text(&self) -> &str {
        match &self.text {
            Text::Utf8(s) => s,
            Text::Binary(copy) => {
                copy.get_or_init(|| String::from_utf8_lossy(self.value).into_owned())
            }
        }
    }
}

/// Where the parts of the URL in `slot` (`url`: 1, `ref`: 2, [`crate::lang::SLOTS`]) are kept in
/// an [`EventView`]: 0 and 1.
fn url_index(slot: usize) -> usize {
    usize::from(slot != 1)
}

fn range_in(outer: &str, inner: &str) -> (u32, u32) {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    (start as u32, (start + inner.len()) as u32)
}

impl<'a> EventView<'a> {
    /// The event's cells of family `e`: (qualifier, value).
    pub fn cells(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.cells.iter().map(|c| (c.qualifier, c.value))
    }

    fn index(&self, q: &str) -> Option<usize> {
        self.cells.iter().position(|c| c.qualifier == q)
    }

    fn slot(&self, s: usize) -> Option<usize> {
        let i = self.slots[s];
        (i != u16::MAX).then_some(i as usize)
    }

    /// The text of cell `i`, and its lowercased copy made on first use.
    fn text(&self, i: usize) -> (&str, &std::cell::OnceCell<Option<String>>) {
        let c = &self.cells[i];
        (c.text(), &c.low)
    }

    /// Groups one run of cells of the same time.
    fn new(ts: i64, run: &[&'a dmp_core::Cell]) -> EventView<'a> {
        let mut slots = [u16::MAX; crate::lang::SLOTS.len()];
        let cells: Vec<EventCell<'a>> = run
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (qualifier, value) = (c.qualifier.as_str(), &c.value[..]);
                if let Some(s) = crate::lang::slot_of(qualifier) {
                    slots[s] = i as u16;
                }
                EventCell {
                    qualifier,
                    value,
                    text: match std::str::from_utf8(value) {
                        Ok(s) => Text::Utf8(s),
                        Err(_) => Text::Binary(std::cell::OnceCell::new()),
                    },
                    low: std::cell::OnceCell::new(),
                }
            })
            .collect();
        let mut geo = [None; 3];
        if slots[6] != u16::MAX {
            let t: &str = cells[slots[6] as usize].text();
            for (k, part) in t.split('/').take(3).enumerate() {
                geo[k] = Some(range_in(t, part));
            }
        }
        EventView {
            ts,
            cells,
            slots,
            hosts: Default::default(),
            paths: Default::default(),
            geo,
            ua: std::cell::OnceCell::new(),
        }
    }

    /// A part of the user agent ([`crate::lang::UA_PARTS`]): from the `ua` cell (after its
    /// 8-byte id, each part ended by a 0 byte), or, in rows written before the parts moved into
    /// it (an 8-byte `ua`), from the part's own cell.
    fn ua_part(&self, part: usize) -> Option<&str> {
        let value = self.slot(crate::lang::SLOT_UA).map(|i| self.cells[i].value);
        match self.ua.get_or_init(|| value.and_then(ua_parts)) {
            Some(ranges) => {
                let (a, b) = ranges[part];
                std::str::from_utf8(value?.get(a as usize..b as usize)?).ok()
            }
            None => self.slot(7 + part).map(|i| self.text(i).0),
        }
    }

    /// The host of the URL in `slot` (`url` or `ref`), lowercase: `host` of the lowercased
    /// text. When the text's own host is lowercase ASCII that is the same slice (lowercasing maps
    /// letters to letters, so the delimiters `host` looks for stay where they are around it), and
    /// the rest of the URL is neither checked nor lowercased.
    #[inline(always)]
    fn host_of(&self, slot: usize) -> Option<&str> {
        let (t, low) = self.text(self.slot(slot)?);
        let (a, b, in_low) = *self.hosts[url_index(slot)].get_or_init(|| {
            let h = host(t);
            if h.bytes().all(|c| c.is_ascii() && !c.is_ascii_uppercase()) {
                let (a, b) = range_in(t, h);
                (a, b, false)
            } else {
                let low = lowered(t, low);
                let (a, b) = range_in(low, host(low));
                (a, b, true)
            }
        });
        let s = if in_low { lowered(t, low) } else { t };
        s.get(a as usize..b as usize)
    }

    /// The path of the URL in `slot` (`url` or `ref`), as stored.
    #[inline(always)]
    fn path_of(&self, slot: usize) -> Option<&str> {
        let t = self.text(self.slot(slot)?).0;
        let (a, b) = *self.paths[url_index(slot)].get_or_init(|| range_in(t, path(t)));
        t.get(a as usize..b as usize)
    }
}

/// A user's row as rules see it, built once per evaluation.
#[derive(Debug, Clone)]
pub struct UserView<'a> {
    /// The user's whole row.
    pub row: &'a Row,
    /// The user.
    pub uid: &'a str,
    /// Evaluation time (ms).
    pub now: i64,
    /// Events, newest first.
    pub events: Vec<EventView<'a>>,
    attrs: HashMap<&'a str, &'a [u8]>,
    first_seen: Option<i64>,
    /// The matches found so far of each event-local condition tested (by its id): the rules
    /// and the pruning of one evaluation test each event against a condition once.
    matches: RefCell<Vec<Matches>>,
    /// The conditions' matches among `events[start..end]`, known from the evaluation that
    /// pruned the row to those events ([`crate::history::Seeds`]): not tested again.
    seeded: Option<(usize, usize, &'a crate::history::Seeds)>,
}

/// The events found so far matching one event-local condition.
#[derive(Debug, Clone)]
struct Matches {
    /// The condition's id.
    cond: u64,
    /// Times of the matching events, newest first.
    times: Vec<i64>,
    /// How many events (newest first) have been tested.
    tested: usize,
    /// How many of `times` are the newest matches: all of them, unless the seeded events'
    /// matches were taken from [`UserView::seeded`] and those were only their `k` newest.
    valid: usize,
    /// The seeded events are tested like the others (a scan asked for more than was seeded).
    unseeded: bool,
}

impl<'a> UserView<'a> {
    /// Groups a row's cells into events.
    pub fn new(row: &'a Row, now: i64) -> UserView<'a> {
        UserView::build(row, now, None)
    }

    /// Groups a row's cells into events that hold only the cells of the `only` qualifiers (sorted):
    /// the events are the same (every cell of family `e` still makes its time an event), the
    /// cells no rule reads are not built. `row` stays whole.
    pub fn with_qualifiers(row: &'a Row, now: i64, only: &[String]) -> UserView<'a> {
        UserView::build(row, now, Some(only))
    }

    /// [`UserView::with_qualifiers`] (every qualifier when `only` is `None`) of a row pruned
    /// with `seeds` and extended with events newer or older than every event kept: the kept
    /// events' matches come from `seeds`. Ignored unless the row holds exactly the kept events
    /// in their span (an event expired, or one added among them).
    pub fn seeded(
        row: &'a Row,
        now: i64,
        only: Option<&[String]>,
        seeds: &'a crate::history::Seeds,
    ) -> UserView<'a> {
        let mut user = UserView::build(row, now, only);
        if seeds.events > 0 {
            // Events come newest first.
            let start = user.events.partition_point(|e| e.ts > seeds.newest);
            let end = user.events.partition_point(|e| e.ts >= seeds.oldest);
            if end - start == seeds.events {
                user.seeded = Some((start, end, seeds));
            }
        }
        user
    }

    fn build(row: &'a Row, now: i64, only: Option<&[String]>) -> UserView<'a> {
        let mut attrs = HashMap::new();
        let mut first_seen = None;
        for c in &row.cells {
            if same(&c.family, FAMILY_EVENTS) {
                if let Some(a) = c.qualifier.strip_prefix(dmp_core::cell::ATTR_PREFIX) {
                    // Cells come newest first per qualifier: keep the first seen.
                    attrs.entry(a).or_insert(&c.value[..]);
                }
            } else if c.family == FAMILY_META && c.qualifier == "first_seen" && c.value.len() == 8 {
                first_seen = Some(i64::from_be_bytes(
                    c.value[..8].try_into().expect("8 bytes"),
                ));
            }
        }
        let events = group_events(&row.cells, only);
        UserView {
            row,
            uid: &row.key,
            now,
            events,
            attrs,
            first_seen,
            matches: RefCell::new(Vec::new()),
            seeded: None,
        }
    }

    /// Time of the newest event (ms).
    pub fn last_event_ts(&self) -> Option<i64> {
        self.events.first().map(|e| e.ts)
    }
}

/// Columns beyond which [`group_events`] sorts instead of merging.
const MERGE_MAX_COLUMNS: usize = 64;

/// The cells of family `e` grouped into events: by time, newest first, each event's cells in row
/// order. In a row in HBase order each column (qualifier) is a run of versions, newest first, so
/// the events come from merging the runs: the newest head time is the next event, and every run
/// whose head has that time gives it a cell. That is a few compares per event instead of sorting
/// every cell. Rows not in that order (many short runs) are sorted.
fn group_events<'a>(cells: &'a [dmp_core::Cell], only: Option<&[String]>) -> Vec<EventView<'a>> {
    // Runs [start, end) of one qualifier with strictly falling times.
    let mut runs: Vec<(usize, usize)> = Vec::with_capacity(16);
    for (i, c) in cells.iter().enumerate() {
        if !same(&c.family, FAMILY_EVENTS) {
            continue;
        }
        match runs.last_mut() {
            Some(run)
                if run.1 == i
                    && cells[i - 1].ts > c.ts
                    && same(&cells[i - 1].qualifier, &c.qualifier) =>
            {
                run.1 += 1
            }
            _ => runs.push((i, i + 1)),
        }
    }
    if runs.len() > MERGE_MAX_COLUMNS {
        return group_events_by_sort(cells, only);
    }
    let wanted: Vec<bool> = runs
        .iter()
        .map(|r| wanted(only, &cells[r.0].qualifier))
        .collect();
    // At least as many events as the longest column has versions.
    let mut events = Vec::with_capacity(runs.iter().map(|r| r.1 - r.0).max().unwrap_or(0));
    let mut event: Vec<&dmp_core::Cell> = Vec::with_capacity(runs.len());
    while let Some(ts) = runs
        .iter()
        .filter(|r| r.0 < r.1)
        .map(|r| cells[r.0].ts)
        .max()
    {
        event.clear();
        for (r, wanted) in runs.iter_mut().zip(&wanted) {
            if r.0 < r.1 && cells[r.0].ts == ts {
                if *wanted {
                    event.push(&cells[r.0]);
                }
                r.0 += 1;
            }
        }
        events.push(EventView::new(ts, &event));
    }
    events
}

/// Whether cells of `qualifier` are built (`only`: the sorted qualifiers rules read; None: all).
fn wanted(only: Option<&[String]>, qualifier: &str) -> bool {
    only.is_none_or(|q| q.binary_search_by(|x| x.as_str().cmp(qualifier)).is_ok())
}

/// [`group_events`] for any order of cells: (time, index) pairs sorted newest first.
fn group_events_by_sort<'a>(
    cells: &'a [dmp_core::Cell],
    only: Option<&[String]>,
) -> Vec<EventView<'a>> {
    let mut order: Vec<(std::cmp::Reverse<i64>, u32)> = cells
        .iter()
        .enumerate()
        .filter(|(_, c)| c.family == FAMILY_EVENTS)
        .map(|(i, c)| (std::cmp::Reverse(c.ts), i as u32))
        .collect();
    order.sort_unstable();
    order
        .chunk_by(|a, b| a.0 == b.0)
        .map(|run| {
            let event: Vec<&dmp_core::Cell> = run
                .iter()
                .map(|(_, i)| &cells[*i as usize])
                .filter(|c| wanted(only, &c.qualifier))
                .collect();
            EventView::new(run[0].0 .0, &event)
        })
        .collect()
}

/// An event that made an aggregate match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// Its time (ms).
    pub ts: i64,
    /// Its cells, as text (values cut to 120 characters).
    pub cells: Vec<(String, String)>,
}

/// The result of one rule for one user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the user is in the segment.
    pub matched: bool,
    /// The events that made it so (at most 10 per aggregate).
    pub evidence: Vec<Evidence>,
    /// When the result can change with no new event (ms); None: only a new event can change it.
    pub recheck_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Bool(bool),
    Num(f64),
    Str(Cow<'a, str>),
    Dur(i64),
    Missing,
}

/// The lowercased text, made on first use: `t` itself when lowercasing would not change it (most
/// URLs, hosts and queries, in any script), else a lowercased copy kept in `low`.
fn lowered<'v>(t: &'v str, low: &'v std::cell::OnceCell<Option<String>>) -> &'v str {
    low.get_or_init(|| (!is_lowercase(t)).then(|| t.to_lowercase()))
        .as_deref()
        .unwrap_or(t)
}

/// Whether `t.to_lowercase()` is `t`, without building it: every character maps to itself.
/// Lowercase letters do (a test checks every `char`), so only other letters are looked up.
fn is_lowercase(t: &str) -> bool {
    if t.is_ascii() {
        return !t.bytes().any(|b| b.is_ascii_uppercase());
    }
    t.chars().all(|c| {
        if c.is_ascii() {
            return !c.is_ascii_uppercase();
        }
        // Russian first: a range compare, where `is_lowercase` searches a table.
        if matches!(c, 'а'..='я' | 'ё')
            || c.is_lowercase()
            || !c.is_alphanumeric() && !c.is_uppercase()
        {
            // Neither a capital nor a titlecase letter (those are alphanumeric).
            return true;
        }
        let mut l = c.to_lowercase();
        l.next() == Some(c) && l.next().is_none()
    })
}

fn text(v: &[u8]) -> Cow<'_, str> {
    // The validating fast path first; invalid bytes (never written by dmp) get replaced.
    match std::str::from_utf8(v) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(v),
    }
}

/// What follows the first `://` of a URL (the whole text when there is none). A byte scan: the
/// substring search `split_once("://")` builds a searcher per call, and this runs twice an event.
fn after_scheme(url: &str) -> &str {
    let b = url.as_bytes();
    let mut from = 0;
    while let Some(p) = b[from..].iter().position(|&c| c == b':') {
        let colon = from + p;
        if b[colon + 1..].starts_with(b"//") {
            return &url[colon + 3..];
        }
        from = colon + 1;
    }
    url
}

fn host(url: &str) -> &str {
    let rest = after_scheme(url);
    let end = rest
        .bytes()
        .position(|c| matches!(c, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    let authority = match authority.bytes().rposition(|c| c == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    match authority.bytes().position(|c| c == b':') {
        Some(port) => &authority[..port],
        None => authority,
    }
}

fn path(url: &str) -> &str {
    let rest = after_scheme(url);
    let Some(start) = rest.bytes().position(|c| c == b'/') else {
        return "/";
    };
    let p = &rest[start..];
    &p[..p
        .bytes()
        .position(|c| matches!(c, b'?' | b'#'))
        .unwrap_or(p.len())]
}

/// The times of the `k` newest events of `user` matching `cond`, newest first (every one when
/// fewer match), whatever their age. `cond` is event-local (the only kind
/// [`crate::history::HistoryNeeds`] keeps matches of): the walk is the view's, shared with the
/// rules' tests of it.
pub(crate) fn newest_matches(cond: &Cond, user: &UserView<'_>, k: usize) -> Vec<i64> {
    debug_assert!(
        cond.event_local,
        "only an event-local condition's matches are kept"
    );
    let segments = HashMap::new();
    let mut e = Eval {
        user,
        segments: &segments,
        explain: false,
        evidence: Vec::new(),
        recheck: None,
    };
    let i = e.scan_local(cond, k, i64::MIN);
    let all = user.matches.borrow();
    all[i].times.iter().take(k).copied().collect()
}

/// The evaluation of one rule: collects evidence and the recheck time.
pub struct Eval<'v> {
    user: &'v UserView<'v>,
    segments: &'v HashMap<&'v str, bool>,
    explain: bool,
    /// Times of the events that matched (the evidence is built from them only if the rule does).
    evidence: Vec<i64>,
    recheck: Option<i64>,
}

impl<'v> Eval<'v> {
    /// Evaluates `expr` for `user`, with the results of the segments evaluated before it.
    pub fn run(expr: &'v Expr, user: &'v UserView<'v>, ctx: &'v crate::Context<'v>) -> Outcome {
        let mut e = Eval {
            user,
            segments: &ctx.segments,
            explain: ctx.explain,
            evidence: Vec::new(),
            recheck: None,
        };
        let matched = matches!(e.user_value(expr), Value::Bool(true));
        Outcome {
            matched,
            evidence: if matched {
                e.build_evidence()
            } else {
                Vec::new()
            },
            recheck_at: e.recheck,
        }
    }

    fn recheck_at(&mut self, t: i64) {
        if t > self.user.now {
            self.recheck = Some(self.recheck.map_or(t, |r| r.min(t)));
        }
    }

    fn user_value(&mut self, e: &'v Expr) -> Value<'v> {
        self.value(e, None)
    }

    /// Lowercased text of an expression for `contains`, without allocating for event fields and
    /// literals (lowercased when the rule was parsed).
    fn lower(&mut self, e: &'v Expr, ev: Option<&'v EventView<'v>>) -> Option<Cow<'v, str>> {
        match (e, ev) {
            (Expr::Field(f), Some(ev)) => field_text(f, ev, true),
            (Expr::Str(s), _) => Some(Cow::Borrowed(s.as_str())),
            _ => match self.value(e, ev) {
                Value::Str(s) => Some(Cow::Owned(s.to_lowercase())),
                _ => None,
            },
        }
    }

    fn value(&mut self, e: &'v Expr, ev: Option<&'v EventView<'v>>) -> Value<'v> {
        match e {
            Expr::Bool(b) => Value::Bool(*b),
            Expr::Num(n) => Value::Num(*n),
            Expr::Str(s) => Value::Str(Cow::Borrowed(s.as_str())),
            Expr::Dur(d) => Value::Dur(*d),
            Expr::Field(f) => ev
                .and_then(|ev| field_text(f, ev, false))
                .map_or(Value::Missing, Value::Str),
            Expr::Attr(a) => self
                .user
                .attrs
                .get(a.as_str())
                .map_or(Value::Missing, |v| Value::Str(text(v))),
            Expr::FirstSeen => self
                .user
                .first_seen
                .map_or(Value::Missing, |t| Value::Dur(self.user.now - t)),
            Expr::Segment(s) => {
                Value::Bool(self.segments.get(s.as_str()).copied().unwrap_or(false))
            }
            Expr::Not(x) => match self.value(x, ev) {
                Value::Bool(b) => Value::Bool(!b),
                _ => Value::Bool(true),
            },
            Expr::And(xs) => Value::Bool(xs.iter().all(|x| self.value(x, ev) == Value::Bool(true))),
            Expr::Or(xs) => Value::Bool(xs.iter().any(|x| self.value(x, ev) == Value::Bool(true))),
            // Fast paths for the commonest shapes: an event field against literals.
            Expr::Cmp(a, op @ (CmpOp::Eq | CmpOp::Ne), b)
                if matches!(
                    (a.as_ref(), b.as_ref(), ev),
                    (Expr::Field(_), Expr::Str(_), Some(_))
                ) =>
            {
                let (Expr::Field(f), Expr::Str(lit), Some(ev)) = (a.as_ref(), b.as_ref(), ev)
                else {
                    unreachable!("matched above")
                };
                match field_text(f, ev, false) {
                    Some(t) => Value::Bool((t.as_ref() == lit.as_str()) == (*op == CmpOp::Eq)),
                    None => Value::Bool(false),
                }
            }
            Expr::In(a, items)
                if ev.is_some()
                    && matches!(a.as_ref(), Expr::Field(_))
                    && items.iter().all(|i| matches!(i, Expr::Str(_))) =>
            {
                let (Expr::Field(f), Some(ev)) = (a.as_ref(), ev) else {
                    unreachable!("matched above")
                };
                let Some(t) = field_text(f, ev, false) else {
                    return Value::Bool(false);
                };
                Value::Bool(
                    items
                        .iter()
                        .any(|i| matches!(i, Expr::Str(l) if l.as_str() == t.as_ref())),
                )
            }
            Expr::Cmp(a, op, b) => {
                if let (Expr::Since(cond), Expr::Dur(d)) = (a.as_ref(), b.as_ref()) {
                    // Walk the events once: the newest match gives the value and the recheck time.
                    let newest = self.newest(cond);
                    if let Some(t) = newest {
                        self.edge(t, *op, *d);
                    }
                    let l = newest.map_or(Value::Missing, |t| Value::Dur(self.user.now - t));
                    return Value::Bool(compare(&l, *op, &Value::Dur(*d)));
                }
                if let Some((cond, window, k, negated)) = count_threshold(a, *op, b) {
                    return Value::Bool(self.count_at_least(cond, window, k) != negated);
                }
                self.time_bound(a, *op, b);
                let (l, r) = (self.value(a, ev), self.value(b, ev));
                Value::Bool(compare(&l, *op, &r))
            }
            Expr::Contains(a, b) => match (self.lower(a, ev), self.lower(b, ev)) {
                (Some(h), Some(n)) => Value::Bool(h.contains(n.as_ref())),
                _ => Value::Bool(false),
            },
            Expr::Matches(a, re) => match self.value(a, ev) {
                Value::Str(s) => Value::Bool(re.is_match(&s)),
                _ => Value::Bool(false),
            },
            Expr::In(a, items) => {
                let v = self.value(a, ev);
                if v == Value::Missing {
                    return Value::Bool(false);
                }
                let found = items.iter().any(|i| self.value(i, ev) == v);
                Value::Bool(found)
            }
            Expr::ToNum(x) => match self.value(x, ev) {
                Value::Str(s) => s.trim().parse::<f64>().map_or(Value::Missing, Value::Num),
                _ => Value::Missing,
            },
            Expr::Count(cond, window) => Value::Num(self.aggregate(cond, *window) as f64),
            Expr::Any(cond, window) => Value::Bool(self.any(cond, *window)),
            // Only the newest matching event matters (and is the evidence).
            Expr::Since(cond) => self
                .newest(cond)
                .map_or(Value::Missing, |t| Value::Dur(self.user.now - t)),
        }
    }

    /// Tests a compiled event condition.
    fn test(&mut self, p: &'v Pred, ev: &'v EventView<'v>) -> bool {
        match p {
            Pred::Const(b) => *b,
            Pred::Eq { field, lit, eq } => {
                field_raw(field, ev).is_some_and(|t| same(t, lit) == *eq)
            }
            Pred::In { field, lits } => {
                field_raw(field, ev).is_some_and(|t| lits.iter().any(|l| same(l, t)))
            }
            Pred::Contains { field, needle } => {
                field_text(field, ev, true).is_some_and(|t| t.contains(needle.as_ref()))
            }
            Pred::Prefix { field, lit } => field_raw(field, ev).is_some_and(|t| {
                let (t, l) = (t.as_bytes(), lit.as_bytes());
                t.len() >= l.len() && same_bytes(&t[..l.len()], l)
            }),
            Pred::Regex { field, re } => field_raw(field, ev).is_some_and(|t| re.is_match(t)),
            Pred::And(xs) => xs.iter().all(|x| self.test(x, ev)),
            Pred::Or(xs) => xs.iter().any(|x| self.test(x, ev)),
            Pred::Not(x) => !self.test(x, ev),
            Pred::Expr(e) => self.value(e, Some(ev)) == Value::Bool(true),
        }
    }

    /// Tests the events of the view, newest first, against an event-local `cond` from where
    /// the last test of it stopped, until `k` matches are known or the next event is older than
    /// `from`. Returns the index of the condition's matches in the view.
    fn scan_local(&mut self, cond: &'v Cond, k: usize, from: i64) -> usize {
        let user = self.user;
        let mut all = user.matches.borrow_mut();
        let i = match all.iter().position(|m| m.cond == cond.id) {
            Some(i) => i,
            None => {
                all.push(Matches {
                    cond: cond.id,
                    times: Vec::new(),
                    tested: 0,
                    valid: usize::MAX,
                    unseeded: false,
                });
                all.len() - 1
            }
        };
        let m = &mut all[i];
        if k > m.valid {
            // The seeded events gave their k newest matches, and this scan needs more: test
            // every event from the newest.
            *m = Matches {
                cond: cond.id,
                times: Vec::new(),
                tested: 0,
                valid: usize::MAX,
                unseeded: true,
            };
        }
        while m.times.len() < k {
            let Some(ev) = user.events.get(m.tested) else {
                break;
            };
            if ev.ts < from {
                break;
            }
            if let Some((start, end, seeds)) = user.seeded {
                if m.tested == start && !m.unseeded {
                    match seeds.of(cond.id) {
                        // Every match of the seeded events, or enough of their newest.
                        Some((times, kept)) if times.len() < kept || m.times.len() + kept >= k => {
                            m.times.extend_from_slice(times);
                            if times.len() >= kept {
                                // Only their k newest: a scan for more starts again.
                                m.valid = m.times.len();
                            }
                            m.tested = end;
                            continue;
                        }
                        _ => m.unseeded = true,
                    }
                }
            }
            m.tested += 1;
            // An event-local condition reads no aggregate, so it never looks at the matches.
            if self.test(&cond.pred, ev) {
                m.times.push(ev.ts);
            }
        }
        i
    }

    /// The time of the `k`-th newest event (k >= 1) matching an event-local `cond`, if it is no
    /// older than `from`: whether at least `k` events from `from` on match.
    fn kth_local(&mut self, cond: &'v Cond, k: usize, from: i64) -> Option<i64> {
        let i = self.scan_local(cond, k, from);
        let all = self.user.matches.borrow();
        all[i].times.get(k - 1).copied().filter(|t| *t >= from)
    }

    /// The newest event matching `cond` (recorded as evidence).
    fn newest(&mut self, cond: &'v Cond) -> Option<i64> {
        if cond.event_local && !self.explain {
            return self.kth_local(cond, 1, i64::MIN);
        }
        let user = self.user;
        let ev = user.events.iter().find(|ev| self.test(&cond.pred, ev))?;
        self.note(ev);
        Some(ev.ts)
    }

    /// Whether an event within the window matches. The result changes when the newest match
    /// leaves the window, so that is the recheck time; only explanations walk on for evidence.
    fn any(&mut self, cond: &'v Cond, window: Option<i64>) -> bool {
        let from = window.map_or(i64::MIN, |w| self.user.now - w);
        if cond.event_local && !self.explain {
            let newest = self.kth_local(cond, 1, from);
            if let (Some(w), Some(t)) = (window, newest) {
                self.recheck_at(t + w + 1);
            }
            return newest.is_some();
        }
        let user = self.user;
        let mut found = false;
        for ev in &user.events {
            if ev.ts < from {
                break;
            }
            if self.test(&cond.pred, ev) {
                if !found {
                    if let Some(w) = window {
                        self.recheck_at(ev.ts + w + 1);
                    }
                    found = true;
                }
                self.note(ev);
                if !self.explain {
                    break;
                }
            }
        }
        found
    }

    /// When `anchor + d` compared with `op` flips.
    fn edge(&mut self, anchor: i64, op: CmpOp, d: i64) {
        let edge = match op {
            CmpOp::Lt | CmpOp::Ge => anchor + d,
            CmpOp::Le | CmpOp::Gt => anchor + d + 1,
            _ => return,
        };
        self.recheck_at(edge);
    }

    /// `since(…) <= 7d` and `first_seen <= 30d` change as time passes: note when.
    fn time_bound(&mut self, a: &'v Expr, op: CmpOp, b: &'v Expr) {
        let Expr::Dur(d) = b else { return };
        let anchor = match a {
            Expr::Since(cond) => self.aggregate_quiet(cond),
            Expr::FirstSeen => self.user.first_seen,
            _ => None,
        };
        if let Some(t) = anchor {
            let edge = match op {
                CmpOp::Lt | CmpOp::Ge => t + d,
                CmpOp::Le | CmpOp::Gt => t + d + 1,
                _ => return,
            };
            self.recheck_at(edge);
        }
    }

    fn aggregate_quiet(&mut self, cond: &'v Cond) -> Option<i64> {
        let events = &self.user.events;
        events
            .iter()
            .find(|ev| self.test(&cond.pred, ev))
            .map(|ev| ev.ts)
    }

    /// Records an event as evidence (at most 10 per rule).
    fn note(&mut self, ev: &EventView<'_>) {
        if self.explain && self.evidence.len() < 10 && !self.evidence.contains(&ev.ts) {
            self.evidence.push(ev.ts);
        }
    }

    /// The evidence of the recorded events.
    fn build_evidence(&self) -> Vec<Evidence> {
        self.evidence
            .iter()
            .filter_map(|ts| self.user.events.iter().find(|e| e.ts == *ts))
            .map(|ev| Evidence {
                ts: ev.ts,
                cells: ev.cells.iter().flat_map(evidence_cells).collect(),
            })
            .collect()
    }

    /// Whether at least `k` events within the window match `cond`: the walk stops at the `k`-th
    /// match (explanations walk on for evidence). The answer changes without a new event only
    /// when it is yes and the `k`-th newest match leaves the window, so that is the recheck time
    /// (a no can only stay a no as time passes).
    fn count_at_least(&mut self, cond: &'v Cond, window: Option<i64>, k: u32) -> bool {
        if k == 0 {
            return true;
        }
        let from = window.map_or(i64::MIN, |w| self.user.now - w);
        if cond.event_local && !self.explain {
            let kth = self.kth_local(cond, k as usize, from);
            if let (Some(w), Some(t)) = (window, kth) {
                // The window includes its edge (`ts >= now - w`): the match leaves one ms after.
                self.recheck_at(t + w + 1);
            }
            return kth.is_some();
        }
        let user = self.user;
        let mut n = 0u32;
        let mut kth = None;
        for ev in &user.events {
            if ev.ts < from {
                break;
            }
            if self.test(&cond.pred, ev) {
                n += 1;
                self.note(ev);
                if n == k {
                    kth = Some(ev.ts);
                    if !self.explain {
                        break;
                    }
                }
            }
        }
        if let (Some(w), Some(t)) = (window, kth) {
            // The window includes its edge (`ts >= now - w`): the match leaves one ms after.
            self.recheck_at(t + w + 1);
        }
        kth.is_some()
    }

    /// Matching events within the window. Records evidence and when the oldest match leaves the
    /// window (the count drops then).
    fn aggregate(&mut self, cond: &'v Cond, window: Option<i64>) -> usize {
        let from = window.map_or(i64::MIN, |w| self.user.now - w);
        let user = self.user;
        let mut n = 0;
        let mut oldest = None;
        for ev in &user.events {
            if ev.ts < from {
                break;
            }
            if self.test(&cond.pred, ev) {
                n += 1;
                oldest = Some(ev.ts);
                self.note(ev);
            }
        }
        if let (Some(w), Some(o)) = (window, oldest) {
            // The window includes its edge (`ts >= now - w`): the oldest match leaves one ms after.
            self.recheck_at(o + w + 1);
        }
        n
    }
}

/// A cell of an event as evidence shows it: (qualifier, text cut to 120 characters). The `ua`
/// cell shows as its dictionary id in hex (as in the dictionary row's key) and its parts as
/// `ua.br`, `ua.os` and `ua.dev` (the cells older rows hold them in).
fn evidence_cells(c: &EventCell<'_>) -> Vec<(String, String)> {
    let cut = |mut s: String| {
        if s.chars().count() > 120 {
            s = s.chars().take(120).collect::<String>() + "…";
        }
        s
    };
    if c.qualifier == crate::lang::SLOTS[crate::lang::SLOT_UA] {
        if let Some(id) = c.value.first_chunk::<8>() {
            let mut out = vec![(
                c.qualifier.to_string(),
                format!("{:016x}", u64::from_be_bytes(*id)),
            )];
            for (q, (a, b)) in crate::lang::UA_PARTS
                .iter()
                .zip(ua_parts(c.value).into_iter().flatten())
            {
                let part = &c.value[a as usize..b as usize];
                out.push((
                    q.to_string(),
                    cut(String::from_utf8_lossy(part).into_owned()),
                ));
            }
            return out;
        }
    }
    vec![(c.qualifier.to_string(), cut(c.text().to_string()))]
}

/// The ranges in a `ua` cell's value of the user agent's parts: after the 8-byte id, three, each
/// ended by a 0 byte. None for an 8-byte value (a row written before the parts moved into the
/// cell) or one that is not that shape.
fn ua_parts(value: &[u8]) -> Option<[(u32, u32); 3]> {
    let mut ranges = [(0u32, 0u32); 3];
    let mut start = 8;
    for r in &mut ranges {
        let end = start + value.get(start..)?.iter().position(|b| *b == 0)?;
        *r = (start as u32, end as u32);
        start = end + 1;
    }
    Some(ranges)
}

/// The text of a field of an event as stored (hosts lowercase).
fn field_raw<'v>(f: &Field, ev: &'v EventView<'v>) -> Option<&'v str> {
    let sub = |s: &'v str, (a, b): (u32, u32)| s.get(a as usize..b as usize);
    match f {
        Field::Slot(s) => ev.slot(*s).map(|i| ev.text(i).0),
        Field::Cell(q) => ev.index(q).map(|i| ev.text(i).0),
        Field::Host(s) => ev.host_of(*s),
        Field::Path(s) => ev.path_of(*s),
        Field::Geo(part) => sub(ev.text(ev.slot(6)?).0, ev.geo[*part]?),
        Field::Ua(part) => ev.ua_part(*part),
    }
}

/// The text of a field of an event, borrowed from the view (`lower`: its lowercased copy).
/// Hosts are always lowercase.
fn field_text<'v>(f: &Field, ev: &'v EventView<'v>, lower: bool) -> Option<Cow<'v, str>> {
    let at = |i: usize, low: bool| -> &'v str {
        let (t, l) = ev.text(i);
        if low {
            lowered(t, l)
        } else {
            t
        }
    };
    let slice = |s: &'v str, (a, b): (u32, u32)| Cow::Borrowed(&s[a as usize..b as usize]);
    match f {
        Field::Slot(s) => ev.slot(*s).map(|i| Cow::Borrowed(at(i, lower))),
        Field::Cell(q) => ev.index(q).map(|i| Cow::Borrowed(at(i, lower))),
        Field::Host(s) => ev.host_of(*s).map(Cow::Borrowed),
        Field::Path(s) => {
            let p = ev.path_of(*s)?;
            Some(if lower {
                Cow::Owned(p.to_lowercase())
            } else {
                Cow::Borrowed(p)
            })
        }
        Field::Geo(part) => {
            let i = ev.slot(6)?;
            let r = ev.geo[*part]?;
            let g = slice(at(i, false), r);
            Some(if lower {
                Cow::Owned(g.to_lowercase())
            } else {
                g
            })
        }
        Field::Ua(part) => {
            let t = ev.ua_part(*part)?;
            Some(if lower && !is_lowercase(t) {
                Cow::Owned(t.to_lowercase())
            } else {
                Cow::Borrowed(t)
            })
        }
    }
}

/// A count compared with a number literal, either side (`count(c, w) >= 3`, `2 < count(c)`), as
/// `(c, w, k, negated)`: the comparison is `count >= k`, negated when `negated`. A count is a
/// whole number, so `> n` is `>= floor(n) + 1` and `< n` is not `>= ceil(n)`. `==` and `!=`
/// need the exact count and are not rewritten.
pub(crate) fn count_threshold<'e>(
    a: &'e Expr,
    op: CmpOp,
    b: &'e Expr,
) -> Option<(&'e Cond, Option<i64>, u32, bool)> {
    let (cond, window, op, n) = match (a, b) {
        (Expr::Count(c, w), Expr::Num(n)) => (c, *w, op, *n),
        (Expr::Num(n), Expr::Count(c, w)) => {
            let mirrored = match op {
                CmpOp::Lt => CmpOp::Gt,
                CmpOp::Le => CmpOp::Ge,
                CmpOp::Gt => CmpOp::Lt,
                CmpOp::Ge => CmpOp::Le,
                other => other,
            };
            (c, *w, mirrored, *n)
        }
        _ => return None,
    };
    if n.is_nan() {
        return None;
    }
    let (k, negated) = match op {
        CmpOp::Ge => (n.ceil(), false),
        CmpOp::Gt => (n.floor() + 1.0, false),
        CmpOp::Lt => (n.ceil(), true),
        CmpOp::Le => (n.floor() + 1.0, true),
        CmpOp::Eq | CmpOp::Ne => return None,
    };
    // Saturating: a threshold below one always holds, one beyond u32 never does.
    Some((
        cond,
        window,
        k.clamp(0.0, f64::from(u32::MAX)) as u32,
        negated,
    ))
}

fn compare(l: &Value<'_>, op: CmpOp, r: &Value<'_>) -> bool {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (l, r) {
        (Value::Num(a), Value::Num(b)) => a.partial_cmp(b),
        (Value::Dur(a), Value::Dur(b)) => Some(a.cmp(b)),
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        _ => None, // anything compared with a missing value is false, != included
    };
    let Some(o) = ord else { return false };
    match op {
        CmpOp::Eq => o == Ordering::Equal,
        CmpOp::Ne => o != Ordering::Equal,
        CmpOp::Lt => o == Ordering::Less,
        CmpOp::Le => o != Ordering::Greater,
        CmpOp::Gt => o == Ordering::Greater,
        CmpOp::Ge => o != Ordering::Less,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_every_char_when_asked_if_lowercase_then_it_agrees_with_to_lowercase() {
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let t = c.to_string();
            assert_eq!(
                is_lowercase(&t),
                t.to_lowercase() == t,
                "{c:?} (U+{:04X})",
                c as u32
            );
        }
        for t in [
            "корм для кошек",
            "Корм",
            "ipoteka ИПОТЕКА",
            "ΟΔΟΣ",
            "straße",
            "ǅ",
            "日本語",
        ] {
            assert_eq!(is_lowercase(t), t.to_lowercase() == t, "{t}");
            let low = std::cell::OnceCell::new();
            assert_eq!(lowered(t, &low), t.to_lowercase());
        }
    }

    #[test]
    fn given_text_when_lowercased_then_copied_only_when_not_already_lowercase() {
        for (t, want, copied) in [
            ("https://cats.example/a", "https://cats.example/a", false),
            ("https://Cats.Example/A", "https://cats.example/a", true),
            ("ипотека", "ипотека", false),
            ("корм для Кошек", "корм для кошек", true),
            ("ИПОТЕКА", "ипотека", true),
        ] {
            let low = std::cell::OnceCell::new();
            assert_eq!(lowered(t, &low), want);
            assert_eq!(low.get().unwrap().is_some(), copied, "{t}");
        }
    }

    /// The compiled form of every event condition shape agrees with the interpreter, event by
    /// event, including missing fields, case, non-ASCII text and regexes that are only prefixes.
    #[test]
    fn compiled_conditions_agree_with_the_interpreter() {
        use dmp_core::Cell;
        let conds = [
            r#"type == "search""#,
            r#"type != "search""#,
            r#""search" == type"#,
            r#"url.host in ["bank.example", "cats.example"]"#,
            r#"url.host == "bank.example" and not (q contains "loan")"#,
            r#"q contains "ипотека" or q contains "mortgage""#,
            r#"url.path ~ "^/item/1""#,
            r#"url.path ~ "^/item/[0-9]+$""#,
            r#"url ~ "(?i)BANK""#,
            r#"geo.city == "Novosibirsk" and ua.device == "smartphone""#,
            r#"geo.country in ["RU", "KZ"] and not (type == "pageview")"#,
            r#"attr("plan") == "gold""#,
            r#"attr("plan") != "gold""#,
            r#"ref.host == "search.example" or src == "app""#,
            r#"num(attr("price")) > 100"#,
            r#"true"#,
            r#"not (type in ["search", "purchase"])"#,
        ];
        let events: [&[(&str, &str)]; 7] = [
            &[
                ("type", "search"),
                ("q", "Mortgage rates"),
                ("url", "https://Bank.Example/item/12?x"),
            ],
            &[
                ("type", "purchase"),
                ("url", "https://cats.example/item/1"),
                ("a.price", "250"),
            ],
            &[
                ("type", "pageview"),
                ("geo", "RU/Novosibirsk Oblast/Novosibirsk"),
                ("ua.dev", "smartphone"),
            ],
            &[
                ("type", "search"),
                ("q", "ИПОТЕКА в Новосибирске"),
                ("ref", "https://search.example/?q=1"),
            ],
            &[("src", "app"), ("a.plan", "gold"), ("geo", "KZ//")],
            &[
                ("type", "pageview"),
                ("url", "/item/1x"),
                ("a.price", "n/a"),
            ],
            &[],
        ];
        let now = 1_700_000_000_000i64;
        let mut row = Row {
            key: "u".into(),
            cells: Vec::new(),
        };
        for (i, ev) in events.iter().enumerate() {
            for (q, v) in ev.iter() {
                row.cells
                    .push(Cell::new("e", *q, now - i as i64, v.as_bytes().to_vec()));
            }
        }
        row.sort();
        let user = UserView::new(&row, now);
        let ctx = crate::Context {
            segments: HashMap::new(),
            explain: false,
        };
        for src in conds {
            let parsed = crate::lang::parse(&format!("any({src})")).unwrap();
            let Expr::Any(cond, _) = &parsed else {
                unreachable!()
            };
            for ev in &user.events {
                let mut e = Eval {
                    user: &user,
                    segments: &ctx.segments,
                    explain: false,
                    evidence: Vec::new(),
                    recheck: None,
                };
                let compiled = e.test(&cond.pred, ev);
                let interpreted = e.value(&cond.expr, Some(ev)) == Value::Bool(true);
                assert_eq!(compiled, interpreted, "{src} on the event at {}", ev.ts);
            }
        }
        // And the shapes compile as intended (not all through the fallback).
        let shape = |src: &str| {
            let Expr::Any(c, _) = crate::lang::parse(&format!("any({src})")).unwrap() else {
                unreachable!()
            };
            c.pred
        };
        assert!(matches!(
            shape(r#"url.path ~ "^/item/1""#),
            Pred::Prefix { .. }
        ));
        assert!(matches!(
            shape(r#"url.path ~ "^/item/[0-9]""#),
            Pred::Regex { .. }
        ));
        assert!(matches!(shape(r#"q contains "x""#), Pred::Contains { .. }));
        assert!(matches!(shape(r#"type in ["a", "b"]"#), Pred::In { .. }));
        assert!(matches!(shape(r#"num(attr("p")) > 1"#), Pred::Expr(_)));
    }

    /// An event as (time, its cells as (qualifier, value)).
    type Grouped = (i64, Vec<(String, Vec<u8>)>);

    fn grouped(events: &[EventView<'_>]) -> Vec<Grouped> {
        events
            .iter()
            .map(|e| {
                (
                    e.ts,
                    e.cells()
                        .map(|(q, v)| (q.to_string(), v.to_vec()))
                        .collect(),
                )
            })
            .collect()
    }

    proptest::proptest! {
        /// Merging a row's columns gives the events sorting gives, in HBase order and in any
        /// other (where the merge falls back to sorting when the runs are many).
        #[test]
        fn given_any_row_when_events_are_grouped_then_merging_columns_equals_sorting(
            cells in proptest::collection::vec((0u8..3, 0u8..12, 0i64..40), 0..200),
            hbase_order in proptest::bool::ANY,
        ) {
            let mut row = Row {
                key: "u".into(),
                cells: cells
                    .iter()
                    .map(|&(f, q, t)| {
                        dmp_core::Cell::new(["e", "m", "s"][f as usize], format!("q{q}"), t, vec![q, t as u8])
                    })
                    .collect(),
            };
            if hbase_order {
                row.sort();
            }
            let merged = group_events(&row.cells, None);
            let sorted = group_events_by_sort(&row.cells, None);
            proptest::prop_assert_eq!(grouped(&merged), grouped(&sorted));
            // Building only some qualifiers keeps every event and drops exactly the other cells.
            let only = vec!["q1".to_string(), "q4".to_string()];
            let keep = |g: Vec<Grouped>| -> Vec<Grouped> {
                g.into_iter()
                    .map(|(ts, cells)| (ts, cells.into_iter().filter(|(q, _)| only.contains(q)).collect()))
                    .collect()
            };
            proptest::prop_assert_eq!(grouped(&group_events(&row.cells, Some(&only))), keep(grouped(&sorted)));
            proptest::prop_assert_eq!(grouped(&group_events_by_sort(&row.cells, Some(&only))), keep(grouped(&sorted)));
        }
    }

    #[test]
    fn slot_of_names_each_well_known_qualifier_and_nothing_else() {
        for (i, q) in crate::lang::SLOTS.iter().enumerate() {
            assert_eq!(crate::lang::slot_of(q), Some(i), "{q}");
        }
        for q in [
            "",
            "urls",
            "Url",
            "a.url",
            "ua.",
            "ua.device",
            "geo.city",
            "qq",
        ] {
            assert_eq!(crate::lang::slot_of(q), None, "{q}");
        }
    }

    #[test]
    fn given_urls_when_split_then_host_and_path() {
        assert_eq!(
            host("https://User@Bank.Example:443/a/b?x#y"),
            "Bank.Example"
        );
        assert_eq!(host("bank.example/x"), "bank.example");
        assert_eq!(path("https://bank.example/a/b?x#y"), "/a/b");
        assert_eq!(path("https://bank.example"), "/");
        assert_eq!(host("mailto:x://a.example:1/p"), "a.example");
        assert_eq!(path("a:b://c/d"), "/d");
    }

    /// The splitting as first written with `str` searches, which the byte scans must agree with.
    fn host_by_search(url: &str) -> &str {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        authority.split(':').next().unwrap_or(authority)
    }

    fn path_by_search(url: &str) -> &str {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let Some(start) = rest.find('/') else {
            return "/";
        };
        let p = &rest[start..];
        &p[..p.find(['?', '#']).unwrap_or(p.len())]
    }

    proptest::proptest! {
        #[test]
        fn given_any_text_when_split_then_host_and_path_agree_with_str_searches(
            url in "[a-z:/?#@.Ё]{0,24}"
        ) {
            proptest::prop_assert_eq!(host(&url), host_by_search(&url));
            proptest::prop_assert_eq!(path(&url), path_by_search(&url));
        }

        /// An event's host of `url` and of `ref` is the host of the lowercased text, whether its
        /// own host is lowercase ASCII (read in place) or not (read in the lowercased copy).
        #[test]
        fn given_any_url_then_the_events_host_is_that_of_the_lowercased_text(
            url in "[a-zA-Z:/?#@.ЁёİΣσ]{0,24}",
            referrer in "(https?://[a-zA-Z.İ]{0,8}/)?[a-zA-Z:/.Ё]{0,12}",
        ) {
            let cells = [
                dmp_core::Cell::new(FAMILY_EVENTS, "ref", 1, referrer.as_bytes().to_vec()),
                dmp_core::Cell::new(FAMILY_EVENTS, "url", 1, url.as_bytes().to_vec()),
            ];
            let refs: Vec<&dmp_core::Cell> = cells.iter().collect();
            let ev = EventView::new(1, &refs);
            for (slot, text) in [(1, &url), (2, &referrer)] {
                let want = text.to_lowercase();
                // Twice: the second answer comes from the range kept by the first.
                proptest::prop_assert_eq!(ev.host_of(slot), Some(host(&want)));
                proptest::prop_assert_eq!(ev.host_of(slot), Some(host(&want)));
            }
        }
    }
}
