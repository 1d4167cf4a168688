//! Evaluation of a checked expression over a user's row.
//!
//! The row's cells of family `e` that share a version (the event time) form one event. Aggregates
//! (`count`, `any`, `since`) walk the events newest first and stop at their window. Each matched
//! event becomes evidence. Each aggregate also says when its result can change without a new event
//! (an event leaving a window, a recency bound passing): [`Outcome::recheck_at`], which the
//! segmenter uses to re-evaluate users whose memberships expire.

use std::borrow::Cow;
use std::collections::HashMap;

use dmp_core::cell::{FAMILY_EVENTS, FAMILY_META};
use dmp_core::Row;

use crate::lang::{CmpOp, Expr, Field};

/// One event of a user: its time and its cells (qualifier, value).
#[derive(Debug, Clone)]
pub struct EventView<'a> {
    /// Event time (ms).
    pub ts: i64,
    /// Cells of family `e` with this version.
    pub cells: Vec<(&'a str, &'a [u8])>,
    /// The same cells as text, and lowercased on first use (for `contains` and hosts).
    text: Vec<(Cow<'a, str>, std::cell::OnceCell<String>)>,
    /// Index in `cells` of each well-known qualifier ([`crate::lang::SLOTS`]); `u16::MAX`: absent.
    slots: [u16; crate::lang::SLOTS.len()],
    /// Parts derived once per event, as byte ranges: host (in the lowercased text) and path (in
    /// the text) of `url` (0) and `ref` (1); the three parts of `geo`.
    hosts: [Option<(u32, u32)>; 2],
    paths: [Option<(u32, u32)>; 2],
    geo: [Option<(u32, u32)>; 3],
}

fn range_in(outer: &str, inner: &str) -> (u32, u32) {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    (start as u32, (start + inner.len()) as u32)
}

impl<'a> EventView<'a> {
    fn index(&self, q: &str) -> Option<usize> {
        self.cells.iter().position(|(k, _)| *k == q)
    }

    fn slot(&self, s: usize) -> Option<usize> {
        let i = self.slots[s];
        (i != u16::MAX).then_some(i as usize)
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
}

impl<'a> UserView<'a> {
    /// Groups a row's cells into events.
    pub fn new(row: &'a Row, now: i64) -> UserView<'a> {
        // Cells of family `e` by time, newest first; runs of one time are one event.
        let mut timed: Vec<(i64, &'a str, &'a [u8])> = Vec::with_capacity(row.cells.len());
        let mut attrs = HashMap::new();
        let mut first_seen = None;
        for c in &row.cells {
            if c.family == FAMILY_EVENTS {
                timed.push((c.ts, c.qualifier.as_str(), &c.value[..]));
                if let Some(a) = c.qualifier.strip_prefix("a.") {
                    // Cells come newest first per qualifier: keep the first seen.
                    attrs.entry(a).or_insert(&c.value[..]);
                }
            } else if c.family == FAMILY_META && c.qualifier == "first_seen" && c.value.len() == 8 {
                first_seen = Some(i64::from_be_bytes(
                    c.value[..8].try_into().expect("8 bytes"),
                ));
            }
        }
        timed.sort_by_key(|c| std::cmp::Reverse(c.0));
        let events = timed
            .chunk_by(|a, b| a.0 == b.0)
            .map(|run| {
                (
                    run[0].0,
                    run.iter().map(|(_, q, v)| (*q, *v)).collect::<Vec<_>>(),
                )
            })
            .map(|(ts, cells)| {
                let text: Vec<(Cow<'_, str>, std::cell::OnceCell<String>)> = cells
                    .iter()
                    .map(|(_, v)| (String::from_utf8_lossy(v), std::cell::OnceCell::new()))
                    .collect();
                let mut slots = [u16::MAX; crate::lang::SLOTS.len()];
                for (i, (q, _)) in cells.iter().enumerate() {
                    if let Some(s) = crate::lang::slot_of(q) {
                        slots[s] = i as u16;
                    }
                }
                let mut hosts = [None; 2];
                let mut paths = [None; 2];
                for (k, slot) in [1usize, 2].into_iter().enumerate() {
                    if slots[slot] != u16::MAX {
                        let (t, low) = &text[slots[slot] as usize];
                        let low = low.get_or_init(|| t.to_lowercase());
                        hosts[k] = Some(range_in(low, host(low)));
                        paths[k] = Some(range_in(t, path(t)));
                    }
                }
                let mut geo = [None; 3];
                if slots[6] != u16::MAX {
                    let t: &str = &text[slots[6] as usize].0;
                    for (k, part) in t.split('/').take(3).enumerate() {
                        geo[k] = Some(range_in(t, part));
                    }
                }
                EventView {
                    ts,
                    cells,
                    text,
                    slots,
                    hosts,
                    paths,
                    geo,
                }
            })
            .collect();
        UserView {
            row,
            uid: &row.key,
            now,
            events,
            attrs,
            first_seen,
        }
    }

    /// Time of the newest event (ms).
    pub fn last_event_ts(&self) -> Option<i64> {
        self.events.first().map(|e| e.ts)
    }
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

fn text(v: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(v)
}

fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    authority.split(':').next().unwrap_or(authority)
}

fn path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let Some(start) = rest.find('/') else {
        return "/";
    };
    let p = &rest[start..];
    &p[..p.find(['?', '#']).unwrap_or(p.len())]
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
            Expr::Count(cond, window) => {
                let (n, _) = self.aggregate(cond, *window);
                Value::Num(n as f64)
            }
            Expr::Any(cond, window) => {
                let (n, _) = self.aggregate(cond, *window);
                Value::Bool(n > 0)
            }
            Expr::Since(cond) => {
                // Only the newest matching event matters (and is the evidence).
                let user = self.user;
                match user
                    .events
                    .iter()
                    .find(|ev| self.value(cond, Some(ev)) == Value::Bool(true))
                {
                    Some(ev) => {
                        self.note(ev);
                        Value::Dur(user.now - ev.ts)
                    }
                    None => Value::Missing,
                }
            }
        }
    }

    /// The newest event matching `cond` (recorded as evidence).
    fn newest(&mut self, cond: &'v Expr) -> Option<i64> {
        let user = self.user;
        let ev = user
            .events
            .iter()
            .find(|ev| self.value(cond, Some(ev)) == Value::Bool(true))?;
        self.note(ev);
        Some(ev.ts)
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

    fn aggregate_quiet(&mut self, cond: &'v Expr) -> Option<i64> {
        let events = &self.user.events;
        events
            .iter()
            .find(|ev| self.value(cond, Some(ev)) == Value::Bool(true))
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
                cells: ev
                    .cells
                    .iter()
                    .zip(&ev.text)
                    .map(|((q, _), (t, _))| {
                        let mut s = t.to_string();
                        if s.chars().count() > 120 {
                            s = s.chars().take(120).collect::<String>() + "…";
                        }
                        (q.to_string(), s)
                    })
                    .collect(),
            })
            .collect()
    }

    /// Matching events within the window: (count, newest matching time). Records evidence and
    /// when the oldest match leaves the window.
    fn aggregate(&mut self, cond: &'v Expr, window: Option<i64>) -> (usize, Option<i64>) {
        let from = window.map_or(i64::MIN, |w| self.user.now - w);
        let user = self.user;
        let mut n = 0;
        let mut newest = None;
        let mut oldest = None;
        for ev in &user.events {
            if ev.ts < from {
                break;
            }
            if self.value(cond, Some(ev)) == Value::Bool(true) {
                n += 1;
                newest.get_or_insert(ev.ts);
                oldest = Some(ev.ts);
                self.note(ev);
            }
        }
        if let (Some(w), Some(o)) = (window, oldest) {
            // The window includes its edge (`ts >= now - w`): the oldest match leaves one ms after.
            self.recheck_at(o + w + 1);
        }
        (n, newest)
    }
}

/// The text of a field of an event, borrowed from the view (`lower`: its lowercased copy).
/// Hosts are always lowercase.
fn field_text<'v>(f: &Field, ev: &'v EventView<'v>, lower: bool) -> Option<Cow<'v, str>> {
    let at = |i: usize, low: bool| -> &'v str {
        let (t, l) = &ev.text[i];
        if low {
            l.get_or_init(|| t.to_lowercase()).as_str()
        } else {
            t.as_ref()
        }
    };
    let slice = |s: &'v str, (a, b): (u32, u32)| Cow::Borrowed(&s[a as usize..b as usize]);
    let which = |slot: usize| usize::from(slot != 1); // url: 0, ref: 1
    match f {
        Field::Slot(s) => ev.slot(*s).map(|i| Cow::Borrowed(at(i, lower))),
        Field::Cell(q) => ev.index(q).map(|i| Cow::Borrowed(at(i, lower))),
        Field::Host(s) => {
            let i = ev.slot(*s)?;
            ev.hosts[which(*s)].map(|r| slice(at(i, true), r))
        }
        Field::Path(s) => {
            let i = ev.slot(*s)?;
            let r = ev.paths[which(*s)]?;
            let p = slice(at(i, false), r);
            Some(if lower {
                Cow::Owned(p.to_lowercase())
            } else {
                p
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
    }
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
    fn given_urls_when_split_then_host_and_path() {
        assert_eq!(
            host("https://User@Bank.Example:443/a/b?x#y"),
            "Bank.Example"
        );
        assert_eq!(host("bank.example/x"), "bank.example");
        assert_eq!(path("https://bank.example/a/b?x#y"), "/a/b");
        assert_eq!(path("https://bank.example"), "/");
    }
}
