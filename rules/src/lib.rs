//! `dmp-rules`: segment rules.
//!
//! - The [`Rule`] trait: compiled-in plugins take the user's whole row (as a [`UserView`]) and the
//!   results of the segments evaluated before them, and say whether the user is in, with evidence
//!   (the matching events) and when the result can next change without a new event.
//! - [`builtin::builtin_rules`]: the explicit registry of compiled-in rules.
//! - A declarative language ([`lang`]) in TOML rule files ([`file`]) analysts edit without a
//!   deploy: field equals / contains / regex / in-list, counts in a time window, recency, first
//!   seen, AND / OR / NOT, other segments as inputs.
//! - [`RuleSet`]: built-in and file rules together, checked (unique ids, known references, no
//!   cycles) and ordered so that a segment's inputs are evaluated before it; live and shadow
//!   results kept apart.
//! - [`RuleWatcher`]: reloads a rule file when it changes; a bad file never replaces a good one.
//! - [`history`]: which of a user's events a rule set's results depend on, and a row pruned to
//!   them that evaluates alike (docs/adr/007: the segmenter's summaries are such rows).

pub mod builtin;
pub mod eval;
pub mod file;
pub mod history;
pub mod lang;
mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dmp_core::cell::{ATTR_PREFIX, FAMILY_EVENTS};
use dmp_core::{Projection, Row};

pub use eval::{Evidence, Outcome, UserView};

/// An error in a rule file, with its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {reason}")]
pub struct RuleError {
    /// The file.
    pub file: String,
    /// Line (from 1; 0 when the problem is the whole file).
    pub line: usize,
    /// Column (from 1).
    pub col: usize,
    /// What is wrong.
    pub reason: String,
}

/// Whether a rule's results reach partners and counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Published on `dmp.segments`, written to the row, counted.
    Live,
    /// Evaluated for a deterministic share of users; published on `dmp.segments.shadow` only.
    Shadow {
        /// Share of users evaluated, in (0, 1].
        sample: f64,
    },
}

/// A segment rule.
pub trait Rule: Send + Sync {
    /// Segment id.
    fn id(&self) -> &str;
    /// Rule version.
    fn version(&self) -> u32;
    /// Live or shadow.
    fn mode(&self) -> Mode;
    /// Segments this rule reads.
    fn depends_on(&self) -> Vec<String>;
    /// The qualifiers of family `e` this rule reads through [`UserView::events`]; `None` (the
    /// default): any. When every rule of a set names them, the segmenter's evaluations build only
    /// those cells of each event (events themselves, and `UserView::row`, stay whole).
    fn event_qualifiers(&self) -> Option<Vec<String>> {
        None
    }
    /// The events of a user this rule's result and recheck time depend on
    /// ([`history::HistoryNeeds`]); `None` (the default): any of them, so a rule set with this
    /// rule is evaluated over whole rows only.
    fn history_needs(&self) -> Option<history::HistoryNeeds> {
        None
    }
    /// Evaluates the rule for one user.
    fn evaluate(&self, user: &UserView<'_>, ctx: &Context<'_>) -> Outcome;
}

/// What a rule sees besides the user: the results of the segments evaluated before it, and
/// whether evidence is wanted (building it costs; the segmenter does not ask for it).
#[derive(Debug, Default)]
pub struct Context<'a> {
    /// Segment id -> whether the user is in it, for the segments evaluated earlier that some rule
    /// depends on ([`Rule::depends_on`]).
    pub segments: HashMap<&'a str, bool>,
    /// Fill [`Outcome::evidence`].
    pub explain: bool,
}

/// A rule from a rule file.
pub struct DeclaredRule {
    id: String,
    name: String,
    version: u32,
    mode: Mode,
    expr: lang::Expr,
}

impl DeclaredRule {
    /// The segment's display name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Rule for DeclaredRule {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn mode(&self) -> Mode {
        self.mode
    }
    fn depends_on(&self) -> Vec<String> {
        let mut refs = Vec::new();
        lang::segment_refs(&self.expr, &mut refs);
        refs
    }
    fn event_qualifiers(&self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        lang::event_qualifiers(&self.expr, &mut out);
        Some(out)
    }
    fn history_needs(&self) -> Option<history::HistoryNeeds> {
        history::HistoryNeeds::of_expr(&self.expr)
    }
    fn evaluate(&self, user: &UserView<'_>, ctx: &Context<'_>) -> Outcome {
        eval::Eval::run(&self.expr, user, ctx)
    }
}

/// The results of one evaluation of a user.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Live segments the user is in, with their outcomes.
    pub live: BTreeMap<String, Outcome>,
    /// Shadow segments the user is in (sampled users only).
    pub shadow: BTreeMap<String, Outcome>,
    /// The earliest time any result can change without a new event.
    pub recheck_at: Option<i64>,
}

/// Rules ready to run, in dependency order.
pub struct RuleSet {
    version: String,
    rules: Vec<Arc<dyn Rule>>,
    /// Per rule (same order): whether another rule reads its result (only those go into the
    /// [`Context`]).
    referenced: Vec<bool>,
    /// Evaluations so far; one in [`TIMING_SAMPLE`] times each rule.
    evaluations: std::sync::atomic::AtomicU64,
    /// The event qualifiers some rule reads (sorted), if every rule says which.
    event_qualifiers: Option<Vec<String>>,
    /// What an evaluation reads of a row, if every rule says which event cells it reads.
    projection: Option<Arc<Projection>>,
    /// The events the results depend on, if every rule says which.
    history: Option<history::HistoryNeeds>,
}

/// One evaluation in this many records the time of each rule.
pub const TIMING_SAMPLE: u64 = 64;

impl RuleSet {
    /// Checks and orders rules: unique ids, references to known segments, no cycles.
    pub fn new(
        version: String,
        rules: Vec<Arc<dyn Rule>>,
        origin: &str,
    ) -> Result<RuleSet, Vec<RuleError>> {
        let whole = |reason: String| RuleError {
            file: origin.to_string(),
            line: 0,
            col: 0,
            reason,
        };
        let mut errors = Vec::new();
        let mut by_id: BTreeMap<String, Arc<dyn Rule>> = BTreeMap::new();
        for r in rules {
            if by_id.insert(r.id().to_string(), r.clone()).is_some() {
                errors.push(whole(format!(
                    "segment id {:?} is defined twice (or clashes with a built-in rule)",
                    r.id()
                )));
            }
        }
        for r in by_id.values() {
            for d in r.depends_on() {
                if !by_id.contains_key(&d) {
                    errors.push(whole(format!(
                        "segment {} reads unknown segment {d:?}",
                        r.id()
                    )));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Depth-first topological order; a grey node met again is a cycle.
        let mut order = Vec::new();
        let mut state: HashMap<String, u8> = HashMap::new();
        fn visit(
            id: &str,
            by_id: &BTreeMap<String, Arc<dyn Rule>>,
            state: &mut HashMap<String, u8>,
            order: &mut Vec<Arc<dyn Rule>>,
            path: &mut Vec<String>,
        ) -> Result<(), String> {
            match state.get(id) {
                Some(2) => return Ok(()),
                Some(1) => {
                    path.push(id.to_string());
                    return Err(path.join(" -> "));
                }
                _ => {}
            }
            state.insert(id.to_string(), 1);
            path.push(id.to_string());
            for d in by_id[id].depends_on() {
                visit(&d, by_id, state, order, path)?;
            }
            path.pop();
            state.insert(id.to_string(), 2);
            order.push(by_id[id].clone());
            Ok(())
        }
        for id in by_id.keys() {
            let mut path = Vec::new();
            if let Err(cycle) = visit(id, &by_id, &mut state, &mut order, &mut path) {
                return Err(vec![whole(format!(
                    "segments depend on each other in a cycle: {cycle}"
                ))]);
            }
        }
        let read: std::collections::HashSet<String> =
            order.iter().flat_map(|r| r.depends_on()).collect();
        let referenced = order.iter().map(|r| read.contains(r.id())).collect();
        let event_qualifiers = order
            .iter()
            .map(|r| r.event_qualifiers())
            .collect::<Option<Vec<Vec<String>>>>()
            .map(|all| {
                let mut q: Vec<String> = all.into_iter().flatten().collect();
                q.sort_unstable();
                q.dedup();
                q
            });
        let projection = event_qualifiers.as_ref().map(|q| {
            Arc::new(Projection::new(
                FAMILY_EVENTS,
                q.iter().map(String::as_str),
                [ATTR_PREFIX],
            ))
        });
        let history = order
            .iter()
            .map(|r| r.history_needs())
            .collect::<Option<Vec<_>>>()
            .map(|all| {
                all.into_iter().fold(
                    history::HistoryNeeds::default(),
                    history::HistoryNeeds::merge,
                )
            });
        Ok(RuleSet {
            version,
            history,
            referenced,
            rules: order,
            evaluations: std::sync::atomic::AtomicU64::new(0),
            event_qualifiers,
            projection,
        })
    }

    /// Loads a rule file together with the built-in rules.
    pub fn load(path: &Path) -> Result<RuleSet, Vec<RuleError>> {
        let (version, mut rules) = file::load_rules(path)?;
        rules.extend(builtin::builtin_rules());
        RuleSet::new(version, rules, &path.display().to_string())
    }

    /// The rule set's version (`rules_version` of segment records).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Rules in evaluation order.
    pub fn rules(&self) -> &[Arc<dyn Rule>] {
        &self.rules
    }

    /// Evaluates every rule for one user at time `now` (no evidence: the segmenter's path).
    pub fn evaluate(&self, row: &Row, now: i64) -> Evaluation {
        self.evaluate_with(row, now, false)
    }

    /// Evaluates every rule, with the evidence of each match (`dmp rules test`, explain).
    pub fn explain(&self, row: &Row, now: i64) -> Evaluation {
        self.evaluate_with(row, now, true)
    }

    /// The event qualifiers the rules read, if every rule says which (`None`: any).
    pub fn event_qualifiers(&self) -> Option<&[String]> {
        self.event_qualifiers.as_deref()
    }

    /// What [`RuleSet::evaluate`] needs of a user's row when every rule says which event cells it
    /// reads (`None`: the whole row): family `e` projected to those cells and the custom
    /// attributes (user attributes come from them), with one marker per event for the rest. An
    /// event with none of the cells read is still an event: it counts in `count(true, …)` and
    /// can be the user's last event. The segmenter reads rows with it; `explain` needs the
    /// whole row.
    pub fn projection(&self) -> Option<&Arc<Projection>> {
        self.projection.as_ref()
    }

    /// The events of a user the results depend on, if every rule says which (`None`: any):
    /// [`RuleSet::evaluate`] gives the same segments and recheck time for a row pruned to them
    /// ([`history::HistoryNeeds::prune`]) as for the row.
    pub fn history_needs(&self) -> Option<&history::HistoryNeeds> {
        self.history.as_ref()
    }

    /// [`RuleSet::evaluate`], and the events the results depend on when the rule set is prunable
    /// (applied to `row`, they prune it as [`history::HistoryNeeds::prune`] does), from one view
    /// of the row.
    pub fn evaluate_and_prune(&self, row: &Row, now: i64) -> (Evaluation, Option<history::Kept>) {
        self.evaluate_and_prune_seeded(row, now, None)
    }

    /// [`RuleSet::evaluate_and_prune`] of a row pruned by an evaluation of this rule set, with
    /// events added newer or older than every event it kept: the conditions' matches among the
    /// kept events come from that evaluation's [`history::Kept::seeds`] instead of being tested
    /// again. The same results as without them (`tests/history.rs`).
    pub fn evaluate_and_prune_seeded(
        &self,
        row: &Row,
        now: i64,
        seeds: Option<&history::Seeds>,
    ) -> (Evaluation, Option<history::Kept>) {
        let user = match seeds {
            Some(seeds) if self.history.is_some() => {
                UserView::seeded(row, now, self.event_qualifiers.as_deref(), seeds)
            }
            _ => self.view(row, now, false),
        };
        let kept = self.history.as_ref().map(|h| h.kept(row, &user));
        (self.run(row, &user, false), kept)
    }

    fn view<'a>(&self, row: &'a Row, now: i64, explain: bool) -> UserView<'a> {
        // Evidence shows every cell of an event; evaluation needs only what the rules read.
        match (&self.event_qualifiers, explain) {
            (Some(only), false) => UserView::with_qualifiers(row, now, only),
            _ => UserView::new(row, now),
        }
    }

    fn evaluate_with(&self, row: &Row, now: i64, explain: bool) -> Evaluation {
        let user = self.view(row, now, explain);
        self.run(row, &user, explain)
    }

    fn run(&self, row: &Row, user: &UserView<'_>, explain: bool) -> Evaluation {
        let timed = self
            .evaluations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(TIMING_SAMPLE);
        let mut ctx = Context {
            segments: HashMap::new(),
            explain,
        };
        let mut out = Evaluation::default();
        for (r, referenced) in self.rules.iter().zip(&self.referenced) {
            if let Mode::Shadow { sample } = r.mode() {
                if !in_sample(&row.key, r.id(), sample) {
                    continue;
                }
            }
            let o = if timed {
                let started = std::time::Instant::now();
                let o = r.evaluate(user, &ctx);
                ::metrics::histogram!(metrics::RULE_DURATION, "rule" => r.id().to_string())
                    .record(started.elapsed().as_secs_f64());
                o
            } else {
                r.evaluate(user, &ctx)
            };
            if let Some(t) = o.recheck_at {
                out.recheck_at = Some(out.recheck_at.map_or(t, |x: i64| x.min(t)));
            }
            if *referenced {
                ctx.segments.insert(r.id(), o.matched);
            }
            if o.matched {
                match r.mode() {
                    Mode::Live => out.live.insert(r.id().to_string(), o),
                    Mode::Shadow { .. } => out.shadow.insert(r.id().to_string(), o),
                };
            }
        }
        out
    }
}

/// Whether a user is in a shadow rule's sample: deterministic per (uid, rule), so the same users
/// are evaluated every time.
pub fn in_sample(uid: &str, rule: &str, sample: f64) -> bool {
    if sample >= 1.0 {
        return true;
    }
    let mut key = Vec::with_capacity(uid.len() + rule.len() + 1);
    key.extend_from_slice(rule.as_bytes());
    key.push(0);
    key.extend_from_slice(uid.as_bytes());
    let h = dmp_core::partition::uid_hash(&key);
    ((h % 1_000_000) as f64) < sample * 1_000_000.0
}

/// Keeps the rule set of a file current: checks the file every `every` and swaps in a new rule
/// set when it changed and is valid. A bad file is reported and the last good rule set stays.
pub struct RuleWatcher {
    current: Arc<RwLock<Arc<RuleSet>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RuleWatcher {
    /// Loads `path` (it must be valid now) and starts watching it.
    pub fn start(path: PathBuf, every: Duration) -> Result<RuleWatcher, Vec<RuleError>> {
        let first = Arc::new(RuleSet::load(&path)?);
        let current = Arc::new(RwLock::new(first));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cur, st) = (current.clone(), stop.clone());
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, std::fs::read(p).ok()))
        };
        let mut last = stamp(&path);
        std::thread::Builder::new()
            .name("dmp-rules-watch".into())
            .spawn(move || {
                while !st.load(std::sync::atomic::Ordering::Acquire) {
                    std::thread::sleep(every);
                    let now = stamp(&path);
                    if now == last {
                        continue;
                    }
                    last = now;
                    match RuleSet::load(&path) {
                        Ok(set) => {
                            tracing::info!(version = set.version(), rules = set.rules().len(), "rules reloaded");
                            *cur.write().expect("not poisoned") = Arc::new(set);
                        }
                        Err(errors) => {
                            for e in &errors {
                                tracing::error!(error = %e, "rule file rejected; keeping the previous rules");
                            }
                        }
                    }
                }
            })
            .expect("spawning a thread");
        Ok(RuleWatcher { current, stop })
    }

    /// The rule set in force.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.read().expect("not poisoned").clone()
    }
}

impl Drop for RuleWatcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The evaluation a segmenter makes, repeated for an instruction count: under valgrind,
/// `RULES_N=1000` and `RULES_N=3000` runs of
/// `cargo test --release -p dmp-rules --lib cost -- --ignored` differ by 2000 evaluations (see
/// docs/benchmarks.md). Instruction counts do not move with the machine's noise as times do.
#[cfg(test)]
mod cost {
    use super::*;
    use dmp_core::{Cell, Projection};

    /// The loadtest's demo rules, which `dmp run --demo` serves too.
    const DEMO: &str = include_str!("../../loadtest/scenarios/demo-rules.toml");

    /// A user with 15 events (pages of cats and news sites, searches in Russian and English) as
    /// the segmenter reads it: the writer's cells, projected to what the rules read.
    fn row(now: i64, projection: &Projection) -> Row {
        let mut cells = Vec::new();
        for e in 0..15i64 {
            let ts = now - 3_600_000 + e * 1000;
            let (kind, url, q) = match e % 3 {
                0 => ("pageview", "https://cats.example/p/123", None),
                1 => ("search", "https://ya.ru/search", Some("корм для кошек")),
                _ => ("pageview", "https://news.example/2026/11/23/x", None),
            };
            let mut event = vec![
                ("ip", b"\x0a\x00\x00\x01".to_vec()),
                ("ref", b"https://ya.ru/".to_vec()),
                ("src", b"web".to_vec()),
                ("type", kind.as_bytes().to_vec()),
                ("ua", b"\x01\x02\x03\x04\x05\x06\x07\x08".to_vec()),
                ("ua.br", b"Chrome".to_vec()),
                ("ua.dev", b"desktop".to_vec()),
                ("ua.os", b"Windows".to_vec()),
                ("url", url.as_bytes().to_vec()),
            ];
            if let Some(q) = q {
                event.push(("q", q.as_bytes().to_vec()));
            }
            cells.extend(event.into_iter().map(|(q, v)| Cell::new("e", q, ts, v)));
        }
        cells.push(Cell::new(
            "m",
            "first_seen",
            now,
            now.to_be_bytes().to_vec(),
        ));
        cells.push(Cell::new(
            "s",
            "current",
            now,
            b"{\"cat_lovers\":1}".to_vec(),
        ));
        let mut row = Row {
            key: "u".into(),
            cells,
        };
        row.sort();
        row.cells = projection.apply(row.cells);
        row
    }

    #[test]
    #[ignore = "an instruction count under valgrind, see the module doc"]
    fn given_a_segmenter_row_when_evaluated_then_the_same_segments_each_time() {
        let now = 1_800_000_000_000;
        let (version, rules) = file::parse_rules("demo.toml", DEMO).unwrap();
        let set = RuleSet::new(version, rules, "demo.toml").unwrap();
        let row = row(now, set.projection().expect("the demo rules project"));
        let n: usize = std::env::var("RULES_N").map_or(1000, |v| v.parse().expect("a number"));
        for _ in 0..n {
            let e = set.evaluate(&row, now);
            assert_eq!(e.live.len(), 2);
            std::hint::black_box(e);
        }
        let e = set.evaluate(&row, now);
        let live: Vec<&str> = e.live.keys().map(String::as_str).collect();
        assert_eq!(live, ["cat_lovers", "news_readers"]);
    }
}
