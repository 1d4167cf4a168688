//! One segmenter worker: a thread (pinned when asked) that owns its dedupe and blacklist, and
//! handles the users sharded to it: their changes and their due re-evaluation timers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmp_bus::{Bus, ProduceRecord, TopicPartition};
use dmp_core::cell::{FAMILY_META, FAMILY_SEGMENTS};
use dmp_core::config::{SegmenterConfig, Topics};
use dmp_core::segment::same_segments;
use dmp_core::{Cell, DeadLetter, Row, SegmentUpdate, UserChange};
use dmp_rules::history::Kept;
use dmp_rules::RuleSet;
use dmp_store::{Get, Put, ReadCursor, StoreError, UserStore};

use crate::blacklist::{self, Limits, Verdict};
use crate::metrics as m;
use crate::summaries::{self, Pruned, Refused, Summaries, Summary};
use crate::timers::{self, Due};
use crate::users::Users;

/// The dead-letter reason of a change whose user's row cannot be read.
pub const UNREADABLE_ROW: &str = "unreadable_row";

/// A change (or a due timer) handed to a worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// The user.
    pub uid: String,
    /// The change's write time (`UserChange.ts`).
    pub ts: i64,
    /// Its message timestamp.
    pub msg_ts: i64,
    /// The change's `last_event_ts` (0 for a timer).
    pub last_event_ts: i64,
    /// Where it came from, to report it done.
    pub tp: TopicPartition,
    /// Its offset.
    pub offset: u64,
    /// A due re-evaluation timer rather than a change: nothing to report done, the timer row to
    /// delete once the user is evaluated.
    pub timer: Option<Due>,
}

/// Where the current rules come from.
pub trait RulesSource: Send + Sync {
    /// The rule set in force.
    fn current(&self) -> Arc<RuleSet>;
}

impl RulesSource for dmp_rules::RuleWatcher {
    fn current(&self) -> Arc<RuleSet> {
        dmp_rules::RuleWatcher::current(self)
    }
}

/// A fixed rule set.
pub struct FixedRules(pub Arc<RuleSet>);

impl RulesSource for FixedRules {
    fn current(&self) -> Arc<RuleSet> {
        self.0.clone()
    }
}

pub use dmp_core::segment::{evaluated, memberships, Evaluated, Memberships, EVALUATED};

pub(crate) struct Worker {
    pub index: usize,
    pub store: Arc<dyn UserStore>,
    pub bus: Arc<dyn Bus>,
    pub rules: Arc<dyn RulesSource>,
    pub topics: Topics,
    pub cfg: SegmenterConfig,
    pub jobs: Receiver<Job>,
    pub done: tokio::sync::mpsc::UnboundedSender<(TopicPartition, u64)>,
    pub counters: Option<Arc<dyn dmp_stats::SegmentCounters>>,
    /// The store's cap on the cells of a read (`store.max_row_cells`): a summary is kept only of
    /// rows well under it, whose reads it does not cut.
    pub max_row_cells: usize,
}

/// Where an evaluation's row came from.
enum Source {
    /// The user's summary with the cells written since (its row is the evaluation's).
    Summary(Pruned, ReadCursor),
    /// A read of the whole row, and the store's cursor of it.
    Whole(Option<ReadCursor>),
}

/// This worker's metrics, resolved once (a macro call per change or evaluation looks the key up
/// in the registry each time).
struct Counters {
    received: metrics::Counter,
    duplicate: metrics::Counter,
    bot: metrics::Counter,
    throttled: metrics::Counter,
    backfill: metrics::Counter,
    backfill_held: metrics::Gauge,
    wait: metrics::Histogram,
    evaluated_change: metrics::Counter,
    evaluated_timer: metrics::Counter,
    row_cells: metrics::Histogram,
    evaluation_time: metrics::Histogram,
    published_live: metrics::Counter,
    published_shadow: metrics::Counter,
    end_to_end: metrics::Histogram,
    from_summary: metrics::Counter,
    /// By [`Refused`], in the order of [`Refused::ALL`].
    from_row: Vec<metrics::Counter>,
    summaries: metrics::Gauge,
}

struct State {
    users: Users,
    /// Users' summaries, to evaluate a change from what it wrote.
    summaries: Summaries,
    /// Changes of throttled users held back, by when they fall due (each time's in arrival order).
    deferred: BTreeMap<i64, Vec<Job>>,
    /// Backfill changes held back behind live ones.
    backfill: Backfill,
}

impl Counters {
    fn new(index: usize) -> Counters {
        let label = index.to_string();
        Counters {
            received: metrics::counter!(m::RECEIVED, "worker" => label.clone()),
            duplicate: metrics::counter!(m::SKIPPED_DUPLICATE, "worker" => label.clone()),
            bot: metrics::counter!(m::SKIPPED_BOT, "worker" => label.clone()),
            throttled: metrics::counter!(m::THROTTLED, "worker" => label.clone()),
            backfill: metrics::counter!(m::BACKFILL, "worker" => label.clone()),
            backfill_held: metrics::gauge!(m::BACKFILL_HELD, "worker" => label),
            wait: metrics::histogram!(m::WAIT),
            evaluated_change: metrics::counter!(m::EVALUATED, "trigger" => "change"),
            evaluated_timer: metrics::counter!(m::EVALUATED, "trigger" => "timer"),
            row_cells: metrics::histogram!(m::ROW_CELLS),
            evaluation_time: metrics::histogram!(m::EVALUATION_TIME),
            published_live: metrics::counter!(m::PUBLISHED, "topic_kind" => "live"),
            published_shadow: metrics::counter!(m::PUBLISHED, "topic_kind" => "shadow"),
            end_to_end: metrics::histogram!(m::END_TO_END),
            from_summary: metrics::counter!(m::FROM_SUMMARY),
            from_row: Refused::ALL
                .iter()
                .map(|r| metrics::counter!(m::FROM_ROW, "reason" => r.as_str()))
                .collect(),
            summaries: metrics::gauge!(m::SUMMARIES, "worker" => index.to_string()),
        }
    }
}

impl State {
    fn new(cfg: &SegmenterConfig) -> State {
        State {
            summaries: Summaries::new(cfg.summaries_per_worker),
            users: Users::new(
                cfg.dedupe_capacity,
                Limits {
                    window_ms: cfg.blacklist_window_secs as i64 * 1000,
                    max: cfg.blacklist_max_changes,
                    ban_ms: cfg.blacklist_ban_secs as i64 * 1000,
                },
            ),
            deferred: BTreeMap::new(),
            backfill: Backfill::new(cfg.backfill_max_held),
        }
    }
}

/// Most changes a worker takes from its queue for one batch, and most held backfill it adds to
/// one.
const BATCH_MAX: usize = 1000;

/// Backfill changes held back behind live ones, in arrival order, each with when it must be
/// handled at the latest.
struct Backfill {
    held: VecDeque<(i64, Job)>,
    max: usize,
}

impl Backfill {
    fn new(max: usize) -> Backfill {
        Backfill {
            held: VecDeque::new(),
            max,
        }
    }

    /// Room for this many more.
    fn room(&self) -> usize {
        self.max.saturating_sub(self.held.len())
    }

    fn hold(&mut self, due: i64, j: Job) {
        self.held.push_back((due, j));
    }

    /// Up to `n` held changes due at `now`, oldest first. Dues are in arrival order (arrival time
    /// plus one fixed wait), so the due ones are at the front.
    fn take_due(&mut self, now: i64, n: usize) -> Vec<Job> {
        let due = self
            .held
            .iter()
            .take(n)
            .take_while(|(at, _)| *at <= now)
            .count();
        self.held.drain(..due).map(|(_, j)| j).collect()
    }

    /// Up to `n` held changes, oldest first, due or not (the worker has nothing live to do).
    fn take(&mut self, n: usize) -> Vec<Job> {
        let n = n.min(self.held.len());
        self.held.drain(..n).map(|(_, j)| j).collect()
    }

    fn len(&self) -> usize {
        self.held.len()
    }
}

/// When a change counts as backfill: its newest event is more than `age_ms` older than its
/// write (by the writer's clock, both of them). A change without an event time is not.
fn is_backfill(j: &Job, age_ms: i64) -> bool {
    j.last_event_ts > 0 && j.ts.saturating_sub(j.last_event_ts) > age_ms
}

/// Which held backfill joins a batch.
#[derive(Clone, Copy)]
enum Backlog {
    /// What has waited the longest wait.
    Due,
    /// The oldest, due or not: no live change is queued.
    Idle,
}

/// Why a change of a batch is not handled with it.
#[derive(Clone, Copy)]
enum Hold {
    /// The throttle holds it until then.
    Throttle(i64),
    /// Backfill, behind live changes.
    Backfill,
}

impl State {
    /// Deferred changes due at `now`, in order.
    fn take_due(&mut self, now: i64) -> Vec<Job> {
        let later = self.deferred.split_off(&(now + 1));
        std::mem::replace(&mut self.deferred, later)
            .into_values()
            .flatten()
            .collect()
    }
}

/// When a user counts as busy enough to throttle: more than `after` changes within the
/// blacklist's window; then at most one evaluation per `interval_ms`.
#[derive(Clone, Copy)]
struct Throttle {
    after: f64,
    interval_ms: i64,
}

/// What made a user due for evaluation (the `trigger` label of `EVALUATED`).
#[derive(Clone, Copy)]
enum Trigger {
    Change,
    Timer,
}

/// Why a user is evaluated in a batch.
struct Reason {
    trigger: Trigger,
    partition: u32,
    /// The user's latest change in the batch, for a dead letter when the row cannot be read.
    /// None: only timers fired.
    change: Option<Origin>,
    /// Timer rows that fired for the user.
    fired: Vec<String>,
}

impl Reason {
    /// A change of the user, from `j`.
    fn change(j: &Job) -> Reason {
        Reason {
            trigger: Trigger::Change,
            partition: j.tp.partition,
            change: Some(change_of(j)),
            fired: Vec::new(),
        }
    }
}

/// What one batch produces.
#[derive(Default)]
struct Output {
    puts: Vec<Put>,
    live: Vec<ProduceRecord>,
    shadow: Vec<ProduceRecord>,
    /// Timer rows to delete once the rest is durable.
    deletes: Vec<String>,
    /// Dead letters: changes of users whose rows cannot be read.
    dead: Vec<ProduceRecord>,
}

/// A change's offset, message timestamp and record fields (its uid is the user's).
#[derive(Clone, Copy)]
struct Origin {
    offset: u64,
    msg_ts: i64,
    ts: i64,
    last_event_ts: i64,
}

fn change_of(j: &Job) -> Origin {
    Origin {
        offset: j.offset,
        msg_ts: j.msg_ts,
        ts: j.ts,
        last_event_ts: j.last_event_ts,
    }
}

/// Adds a change of `j.uid` to the users to evaluate. Another change of a user already there is
/// a duplicate: the one read covers both.
fn add_change(users: &mut BTreeMap<String, Reason>, j: &Job, counters: &Counters) {
    match users.get_mut(&j.uid) {
        Some(r) if matches!(r.trigger, Trigger::Change) => counters.duplicate.increment(1),
        Some(r) => {
            r.trigger = Trigger::Change;
            r.partition = j.tp.partition;
            r.change = Some(change_of(j));
        }
        None => {
            users.insert(j.uid.clone(), Reason::change(j));
        }
    }
}

impl Worker {
    pub fn run(self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let counters = Counters::new(self.index);
        let mut st = State::new(&self.cfg);
        loop {
            // The next change, or none when a deferred one falls due first. Held backfill waits
            // for a moment with no live change queued: then it is handled instead.
            let first = if st.backfill.len() > 0 {
                match self.jobs.try_recv() {
                    Ok(j) => Some(j),
                    Err(TryRecvError::Empty) => {
                        self.take_batch(&rt, &mut st, &counters, None, Backlog::Idle);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match st.deferred.keys().next().copied() {
                    None => match self.jobs.recv() {
                        Ok(j) => Some(j),
                        Err(_) => break,
                    },
                    Some(due) => match due - dmp_core::clock::now_ms() {
                        wait if wait <= 0 => None,
                        wait => match self.jobs.recv_timeout(Duration::from_millis(wait as u64)) {
                            Ok(j) => Some(j),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => break,
                        },
                    },
                }
            };
            if let Some(first) = first.as_ref().filter(|j| j.timer.is_none()) {
                if self.cfg.coalesce_ms > 0 {
                    // Let the user's burst land first: changes written meanwhile join this
                    // batch (or are skipped as seen by its read). The change's time is the
                    // writer's clock: never wait longer than the window, whatever the skew
                    // between the two hosts.
                    let window = self.cfg.coalesce_ms as i64;
                    let wait = (first.ts + window - dmp_core::clock::now_ms()).min(window);
                    if wait > 0 {
                        std::thread::sleep(Duration::from_millis(wait as u64));
                    }
                }
            }
            self.take_batch(&rt, &mut st, &counters, first, Backlog::Due);
        }
        // Stopping: changes still held back are evaluated now, so every change handed to this
        // worker is reported done.
        let mut held: Vec<Job> = std::mem::take(&mut st.deferred)
            .into_values()
            .flatten()
            .collect();
        held.extend(st.backfill.take(usize::MAX));
        counters.backfill_held.set(0.0);
        while !held.is_empty() {
            let chunk: Vec<Job> = held.drain(..held.len().min(BATCH_MAX)).collect();
            self.handle(&rt, &mut st, &counters, Vec::new(), chunk);
        }
        tracing::debug!(worker = self.index, "segmenter worker stopped");
    }

    /// Takes a batch after `first` (none: only held back changes, due or, idle, backfill): the
    /// changes queued now, and the held back ones `backlog` says, and handles it.
    fn take_batch(
        &self,
        rt: &tokio::runtime::Runtime,
        st: &mut State,
        counters: &Counters,
        first: Option<Job>,
        backlog: Backlog,
    ) {
        let mut batch: Vec<Job> = first.into_iter().collect();
        while matches!(backlog, Backlog::Due) && batch.len() < BATCH_MAX {
            match self.jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let now = dmp_core::clock::now_ms();
        let mut due = st.take_due(now);
        due.extend(match backlog {
            Backlog::Due => st.backfill.take_due(now, BATCH_MAX),
            Backlog::Idle => st.backfill.take(BATCH_MAX),
        });
        self.handle(rt, st, counters, batch, due);
        counters.backfill_held.set(st.backfill.len() as f64);
    }

    /// The age past which a change is backfill, when backfill waits behind live changes (it
    /// needs the dedupe: a held change is skipped when a read of the user already saw it).
    fn backfill_age(&self) -> Option<i64> {
        (self.cfg.backfill_age_ms > 0 && self.cfg.dedupe).then_some(self.cfg.backfill_age_ms as i64)
    }

    /// The throttle, when it is on (it needs the blacklist's change counts and the dedupe's
    /// newest write seen).
    fn throttle(&self) -> Option<Throttle> {
        (self.cfg.throttle_after_changes > 0 && self.cfg.blacklist && self.cfg.dedupe).then_some(
            Throttle {
                after: self.cfg.throttle_after_changes as f64,
                interval_ms: self.cfg.throttle_interval_ms as i64,
            },
        )
    }

    /// Handles a batch of changes and due timers, and `due`: changes held back by the throttle
    /// that fall due now (counted when they arrived).
    fn handle(
        &self,
        rt: &tokio::runtime::Runtime,
        st: &mut State,
        counters: &Counters,
        batch: Vec<Job>,
        due: Vec<Job>,
    ) {
        let now = dmp_core::clock::now_ms();
        let throttle = self.throttle();
        // Users to evaluate: from changes that need a read, and from due timers. Without dedupe,
        // a user's second change in the batch goes to a second round, and so on.
        let mut users: BTreeMap<String, Reason> = BTreeMap::new();
        let mut rounds: Vec<BTreeMap<String, Reason>> = Vec::new();
        let mut new_bots = Vec::new();
        let mut dropped_timers = Vec::new();
        // Held back changes now due: the user may have been blacklisted since, or read.
        for j in &due {
            if self.cfg.blacklist && st.users.banned(&j.uid, now) {
                counters.bot.increment(1);
            } else if !st.users.get(&j.uid, now).0.seen.needs_read(j.ts) {
                counters.duplicate.increment(1);
            } else {
                add_change(&mut users, j, counters);
            }
        }
        // Whether and why each change of the batch is held back (none: handled now).
        let mut held: Vec<Option<Hold>> = vec![None; batch.len()];
        let backfill_age = self.backfill_age();
        let mut backfill_room = st.backfill.room();
        for (i, j) in batch.iter().enumerate() {
            if let Some(t) = &j.timer {
                if self.cfg.blacklist && st.users.banned(&j.uid, now) {
                    dropped_timers.push(t.key.clone());
                    continue;
                }
                users
                    .entry(j.uid.clone())
                    .or_insert_with(|| Reason {
                        trigger: Trigger::Timer,
                        partition: t.pending.partition,
                        change: None,
                        fired: Vec::new(),
                    })
                    .fired
                    .push(t.key.clone());
                continue;
            }
            counters.received.increment(1);
            counters
                .wait
                .record(((now - j.msg_ts).max(0)) as f64 / 1000.0);
            // One lookup of the user's state for all checks (none when both are off).
            let mut state =
                (self.cfg.blacklist || self.cfg.dedupe).then(|| st.users.get(&j.uid, now));
            // The blacklist counts the change when the user made it, not when it is read here.
            let at = blacklist::change_time(j.ts, j.last_event_ts);
            let verdict = match &mut state {
                Some((user, limits)) if self.cfg.blacklist => user.rate.check(at, now, limits),
                _ => Verdict::Pass,
            };
            match verdict {
                Verdict::Pass => {}
                Verdict::NewBot => {
                    metrics::counter!(m::BOTS).increment(1);
                    counters.bot.increment(1);
                    new_bots.push(j.uid.clone());
                    continue;
                }
                Verdict::Bot => {
                    counters.bot.increment(1);
                    continue;
                }
            }
            if !self.cfg.dedupe {
                if !users.contains_key(&j.uid) {
                    users.insert(j.uid.clone(), Reason::change(j));
                } else if let Some(r) = rounds.iter_mut().find(|r| !r.contains_key(&j.uid)) {
                    r.insert(j.uid.clone(), Reason::change(j));
                } else {
                    rounds.push(BTreeMap::from([(j.uid.clone(), Reason::change(j))]));
                }
                continue;
            }
            let Some((user, limits)) = state else {
                add_change(&mut users, j, counters);
                continue;
            };
            if !user.seen.needs_read(j.ts) {
                counters.duplicate.increment(1);
                continue;
            }
            // Backfill waits behind live changes, unless this batch reads the user anyway.
            if backfill_age.is_some_and(|age| is_backfill(j, age))
                && backfill_room > 0
                && !users.contains_key(&j.uid)
            {
                held[i] = Some(Hold::Backfill);
                backfill_room -= 1;
                counters.backfill.increment(1);
                continue;
            }
            // A busy user read moments ago waits for its next evaluation (whatever the skew
            // between the writer's clock and this one, no longer than the interval).
            if let (Some(t), Some(seen)) = (throttle, user.seen.last()) {
                let due = (seen + t.interval_ms).min(now + t.interval_ms);
                if due > now
                    && !users.contains_key(&j.uid)
                    && user.rate.estimate(at, limits) > t.after
                {
                    held[i] = Some(Hold::Throttle(due));
                    counters.throttled.increment(1);
                    continue;
                }
            }
            add_change(&mut users, j, counters);
        }
        if !users.is_empty() || !new_bots.is_empty() || !dropped_timers.is_empty() {
            let mut out = self.evaluate(st, counters, users, new_bots);
            out.deletes.extend(dropped_timers);
            self.write(rt, out);
        }
        for round in rounds {
            let out = self.evaluate(st, counters, round, Vec::new());
            self.write(rt, out);
        }
        // Done once what they caused is durable; held back changes when they are handled.
        for (j, held) in batch
            .into_iter()
            .zip(held)
            .chain(due.into_iter().map(|j| (j, None)))
        {
            match held {
                Some(Hold::Throttle(at)) => {
                    st.deferred.entry(at).or_default().push(j);
                }
                Some(Hold::Backfill) => {
                    let due = now.saturating_add(self.cfg.backfill_max_wait_ms as i64);
                    st.backfill.hold(due, j);
                }
                None if j.timer.is_none() => {
                    let _ = self.done.send((j.tp, j.offset));
                }
                None => {}
            }
        }
    }

    fn evaluate(
        &self,
        st: &mut State,
        counters: &Counters,
        users: BTreeMap<String, Reason>,
        new_bots: Vec<String>,
    ) -> Output {
        let mut out = Output::default();
        let rules = self.rules.current();
        let now = dmp_core::clock::now_ms();
        for uid in new_bots {
            out.puts.push(Put {
                row: uid,
                cells: vec![Cell::new(FAMILY_META, "bot", now, b"1".to_vec())],
            });
        }
        for (uid, reason) in users {
            let (row, source) = match self.row_for(st, counters, &uid, &reason, &rules, now) {
                Ok(r) => r,
                Err(e) => {
                    // Reading it again would fail again: the change goes to the dead letters
                    // (the user's fired timers are deleted: the next change or timer retries).
                    tracing::warn!(uid, error = %e, "row cannot be read; change dead-lettered");
                    metrics::counter!(m::DEAD_LETTERS, "reason" => UNREADABLE_ROW).increment(1);
                    out.dead.push(self.unreadable(&uid, &reason, &e));
                    out.deletes.extend(reason.fired);
                    continue;
                }
            };
            match reason.trigger {
                Trigger::Timer => counters.evaluated_timer.increment(1),
                Trigger::Change => counters.evaluated_change.increment(1),
            }
            out.deletes.extend(reason.fired);
            if let Source::Whole(_) = source {
                counters
                    .row_cells
                    .record(row.as_ref().map_or(0, |r| r.cells.len()) as f64);
            }
            if let Some(w) = row.as_ref().and_then(dmp_storage_writer::cells::written_of) {
                st.users.read(&uid, now, w);
            }
            let Some(row) = row else { continue };
            // Every cell this evaluation writes to the user's row goes in one put (one delta).
            let mut row_cells: Vec<Cell> = Vec::with_capacity(4);
            let started = Instant::now();
            // With the events the user's summary keeps, from the same view, when one is kept.
            let (eval, kept) = if st.summaries.enabled() && !matches!(source, Source::Whole(None)) {
                // From a summary: its events' matches as its evaluation found them.
                let seeds = match &source {
                    Source::Summary(p, _) => p.seeds.as_ref(),
                    Source::Whole(_) => None,
                };
                rules.evaluate_and_prune_seeded(&row, now, seeds)
            } else {
                (rules.evaluate(&row, now), None)
            };
            if let Some(c) = &self.counters {
                let live: Vec<&str> = eval.live.keys().map(String::as_str).collect();
                c.record(dmp_stats::day_of(now), &uid, &live);
            }
            counters
                .evaluation_time
                .record(started.elapsed().as_secs_f64());
            // The newest event's time (0: none) and the oldest's (i64::MAX: none).
            let (last_event_ts, oldest_event_ts) = row
                .cells
                .iter()
                .filter(|c| c.family == dmp_core::cell::FAMILY_EVENTS)
                .fold((None, i64::MAX), |(newest, oldest), c| {
                    (newest.max(Some(c.ts)), oldest.min(c.ts))
                });
            let last_event_ts = last_event_ts.unwrap_or(0);
            for (qualifier, results, records, published) in [
                (
                    "current",
                    &eval.live,
                    &mut out.live,
                    &counters.published_live,
                ),
                (
                    "shadow",
                    &eval.shadow,
                    &mut out.shadow,
                    &counters.published_shadow,
                ),
            ] {
                // Nearly always the same segments as stored: checked in place, without the map.
                if same_segments(&row, qualifier, results.keys().map(String::as_str)) {
                    continue;
                }
                // Changed: the stored memberships' sinces for the segments the user keeps.
                let before = memberships(Some(&row), qualifier);
                let mut after = Memberships::new();
                for id in results.keys() {
                    after.insert(id.clone(), before.get(id).copied().unwrap_or(now));
                }
                let added: Vec<String> = after
                    .keys()
                    .filter(|k| !before.contains_key(*k))
                    .cloned()
                    .collect();
                let removed: Vec<String> = before
                    .keys()
                    .filter(|k| !after.contains_key(*k))
                    .cloned()
                    .collect();
                let update = SegmentUpdate {
                    uid: uid.clone(),
                    segments: after.keys().cloned().collect(),
                    added,
                    removed,
                    evaluated_at: now,
                    last_event_ts,
                    rules_version: rules.version().to_string(),
                };
                records.push(ProduceRecord::new(
                    uid.clone().into_bytes(),
                    update.to_json(),
                ));
                row_cells.push(Cell::new(
                    FAMILY_SEGMENTS,
                    qualifier,
                    now,
                    serde_json::to_vec(&after).expect("a map serialises"),
                ));
                published.increment(1);
                if qualifier == "current" && last_event_ts > 0 {
                    counters
                        .end_to_end
                        .record(((now - last_event_ts).max(0)) as f64 / 1000.0);
                }
            }
            // When and with what the user was last evaluated (for point lookups), in the same
            // batch as the memberships.
            row_cells.push(Cell::new(
                FAMILY_SEGMENTS,
                EVALUATED,
                now,
                serde_json::to_vec(&Evaluated {
                    at: now,
                    last_event_ts,
                    rules_version: rules.version().to_string(),
                })
                .expect("a struct serialises"),
            ));
            // The next re-evaluation, durable: recorded in the row and as a timer row.
            let plan = timers::plan(
                timers::recorded(&row),
                eval.recheck_at.map(|t| t.max(now + 1)),
                reason.partition,
                now,
            );
            if let Some(cell) = plan.recheck {
                row_cells.push(cell);
            }
            if let Some(p) = plan.create {
                metrics::counter!(m::TIMERS_SCHEDULED).increment(1);
                let put = timers::timer_put(&uid, p);
                // A fired timer rewritten under the same key must not be deleted after.
                out.deletes.retain(|k| *k != put.row);
                out.puts.push(put);
            }
            if let Some(p) = plan.delete {
                out.deletes.push(p.row_key(&uid));
            }
            if let Some(kept) = kept {
                // The row is pruned in place: its cells move to the summary.
                let cells = row.cells.len();
                let mut pruned = row;
                kept.apply(&mut pruned);
                self.keep_summary(
                    st,
                    &uid,
                    &rules,
                    cells,
                    pruned,
                    kept,
                    (oldest_event_ts, last_event_ts),
                    source,
                );
            }
            out.puts.push(Put {
                row: uid,
                cells: row_cells,
            });
        }
        counters.summaries.set(st.summaries.len() as f64);
        out
    }

    /// The row to evaluate `uid` with: its summary and the cells written since when that gives
    /// what the whole row would (see `summaries`), else the whole row read.
    fn row_for(
        &self,
        st: &mut State,
        counters: &Counters,
        uid: &str,
        reason: &Reason,
        rules: &Arc<RuleSet>,
        now: i64,
    ) -> Result<(Option<Row>, Source), StoreError> {
        let get = Get {
            projection: rules.projection().cloned(),
            ..Get::row(uid)
        };
        let refused = match st.summaries.take(uid) {
            None => Refused::NoSummary,
            Some(_) if !reason.fired.is_empty() || matches!(reason.trigger, Trigger::Timer) => {
                Refused::Timer
            }
            Some(s) if !Arc::ptr_eq(&s.rules, rules) => Refused::Rules,
            Some(s) => match self.store.get_since(&get, s.cursor) {
                Ok(Some((cells, cursor))) => {
                    match summaries::extend(
                        s.pruned,
                        cells,
                        self.store.schema(),
                        now,
                        self.max_row_cells,
                    ) {
                        Ok(mut p) => {
                            counters.from_summary.increment(1);
                            let row = std::mem::take(&mut p.row);
                            return Ok((Some(row), Source::Summary(p, cursor)));
                        }
                        Err(r) => r,
                    }
                }
                Ok(None) => Refused::Store,
                Err(e) => {
                    tracing::warn!(uid, error = %e, "reading the writes since failed; reading the row");
                    Refused::Store
                }
            },
        };
        let i = Refused::ALL.iter().position(|r| *r == refused).unwrap_or(0);
        counters.from_row[i].increment(1);
        let (row, cursor) = self.read(&get)?;
        Ok((row, Source::Whole(cursor)))
    }

    /// Keeps the user's summary after an evaluation of a row of `cells` cells, `pruned` to the
    /// events the rules depend on (`events` in all, from `oldest` to `newest`): from the summary
    /// it came from, or from the whole row read (when the store gave a cursor and the row is well
    /// under its limits).
    #[allow(clippy::too_many_arguments)]
    fn keep_summary(
        &self,
        st: &mut State,
        uid: &str,
        rules: &Arc<RuleSet>,
        cells: usize,
        pruned: Row,
        kept: Kept,
        (oldest, newest): (i64, i64),
        source: Source,
    ) {
        let events = kept.events;
        let (pruned, cursor) = match source {
            Source::Summary(mut p, cursor) => {
                // The new cells' values are slices of the cache's copies of whole writes.
                p.row = summaries::compact(pruned);
                p.seeds = Some(kept.seeds);
                (p, cursor)
            }
            Source::Whole(Some(cursor)) => {
                if summaries::near_limits(events, cells, self.store.schema(), self.max_row_cells) {
                    return;
                }
                (
                    Pruned {
                        // Its values are slices of the whole cached row: copied out.
                        row: summaries::compact(pruned),
                        events,
                        cells,
                        newest,
                        oldest,
                        seeds: Some(kept.seeds),
                    },
                    cursor,
                )
            }
            Source::Whole(None) => return,
        };
        st.summaries.put(
            uid,
            Summary {
                rules: rules.clone(),
                cursor,
                pruned,
            },
        );
    }

    /// Reads a user's row, retrying the store's failures, but not a row that cannot be read
    /// (refused, or stored bytes that do not decode): that error comes back.
    fn read(&self, get: &Get) -> Result<(Option<Row>, Option<ReadCursor>), StoreError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store.get_with_cursor(get) {
                Ok(r) => return Ok(r),
                Err(e @ (StoreError::Rejected(_) | StoreError::Corrupt { .. })) => return Err(e),
                Err(e) => {
                    metrics::counter!(m::RETRIES).increment(1);
                    tracing::warn!(error = %e, "store read failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The dead letter of a user whose row cannot be read: its change (or, when only timers
    /// fired, the timer rows, offset 0).
    fn unreadable(&self, uid: &str, reason: &Reason, e: &StoreError) -> ProduceRecord {
        let (offset, timestamp, payload) = match reason.change {
            Some(o) => {
                let change = UserChange {
                    uid: uid.to_string(),
                    ts: o.ts,
                    last_event_ts: o.last_event_ts,
                };
                (
                    o.offset,
                    o.msg_ts,
                    DeadLetter::payload_of(&change.to_json()),
                )
            }
            None => (
                0,
                dmp_core::clock::now_ms(),
                format!("due timers {:?}", reason.fired),
            ),
        };
        ProduceRecord::new(
            uid.as_bytes().to_vec(),
            DeadLetter {
                reason: UNREADABLE_ROW.into(),
                error: e.to_string(),
                stage: "segmenter".into(),
                topic: self.topics.user_changes.clone(),
                partition: reason.partition,
                offset,
                timestamp,
                payload,
            }
            .to_json(),
        )
    }

    fn write(&self, rt: &tokio::runtime::Runtime, out: Output) {
        let mut backoff = Duration::from_millis(50);
        if !out.puts.is_empty() {
            while let Err(e) = self.store.put(&out.puts) {
                metrics::counter!(m::RETRIES).increment(1);
                tracing::warn!(error = %e, "writing memberships failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        // The current-state topic gets the same records: compaction keeps each user's newest.
        for (topic, records) in [
            (&self.topics.segments, &out.live),
            (&self.topics.segments_current, &out.live),
            (&self.topics.segments_shadow, &out.shadow),
            (&self.topics.dead_letter, &out.dead),
        ] {
            if records.is_empty() {
                continue;
            }
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = rt.block_on(self.bus.produce(topic, records.clone())) {
                metrics::counter!(m::RETRIES).increment(1);
                tracing::warn!(error = %e, topic = %topic, "publishing failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        // Fired and replaced timers go last: a crash before leaves an extra timer, not a lost one.
        // All of them in one delete (one commit in the embedded store).
        let mut deletes = out.deletes;
        deletes.sort_unstable();
        deletes.dedup();
        if !deletes.is_empty() {
            let keys: Vec<&str> = deletes.iter().map(String::as_str).collect();
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = self.store.delete_rows(&keys) {
                metrics::counter!(m::RETRIES).increment(1);
                tracing::warn!(error = %e, "deleting fired timers failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(uid: &str, ts: i64, last_event_ts: i64) -> Job {
        Job {
            uid: uid.into(),
            ts,
            msg_ts: ts,
            last_event_ts,
            tp: TopicPartition::new("dmp.user-changes", 0),
            offset: 0,
            timer: None,
        }
    }

    #[test]
    fn given_changes_when_classified_then_only_old_events_are_backfill() {
        let hour = 3_600_000;
        assert!(is_backfill(&job("u", 10 * hour, 8 * hour), hour));
        assert!(
            !is_backfill(&job("u", 10 * hour, 9 * hour), hour),
            "exactly the age"
        );
        assert!(!is_backfill(&job("u", 10 * hour, 10 * hour - 5), hour));
        assert!(
            !is_backfill(&job("u", 10 * hour, 11 * hour), hour),
            "an event ahead of the writer's clock"
        );
        assert!(!is_backfill(&job("u", 10 * hour, 0), hour), "no event time");
    }

    #[test]
    fn given_held_backfill_when_taken_then_due_ones_first_in_order_and_bounded() {
        let mut b = Backfill::new(3);
        assert_eq!(b.room(), 3);
        b.hold(100, job("a", 1, 0));
        b.hold(200, job("b", 2, 0));
        b.hold(300, job("c", 3, 0));
        assert_eq!(b.room(), 0);
        let uids = |v: Vec<Job>| v.into_iter().map(|j| j.uid).collect::<Vec<_>>();
        assert!(b.take_due(99, 10).is_empty());
        assert_eq!(uids(b.take_due(250, 1)), ["a"], "at most n");
        assert_eq!(uids(b.take_due(250, 10)), ["b"]);
        assert_eq!(b.len(), 1);
        assert_eq!(uids(b.take(10)), ["c"], "idle: due or not");
        assert_eq!(b.len(), 0);
        assert!(b.take(10).is_empty());
    }
}

/// What an evaluation costs in instructions, counted under callgrind (a count does not move with
/// the machine's noise, as the loadtest's CPU figures do): users with a page or a search a
/// round, as the storage writer writes them, evaluated by a worker after each round, from their
/// summaries after the first; each user's segments are then checked against its whole row. Run
/// it twice with `COST_ROUNDS` apart and subtract (docs/benchmarks.md, "Instructions per
/// evaluation"):
///
/// ```text
/// cargo test --release -p dmp-segmenter --lib --no-run
/// COST_ROUNDS=10 valgrind --tool=callgrind --toggle-collect='*Worker::evaluate*' \
///     --toggle-collect='*Worker::write*' <the test binary> worker::cost --test-threads=1
/// ```
#[cfg(test)]
mod cost {
    use super::*;
    use dmp_bus::embedded::EmbeddedBus;
    use dmp_store::embedded::{EmbeddedDatabase, EmbeddedStore};

    /// The loadtest's rules (the `peak` scenario's).
    const DEMO: &str = include_str!("../../loadtest/scenarios/demo-rules.toml");
    const USERS: i64 = 200;

    /// User `u`'s event of round `r` at `ts`, written at `written`: the cells the storage writer
    /// puts for it (its own `event_cells`, with `en` its enrichment of the IP and user agent).
    fn event(
        u: i64,
        r: i64,
        ts: i64,
        written: i64,
        en: &dmp_storage_writer::enrich::Enrichment,
    ) -> Vec<Cell> {
        let (kind, url, q) = match (u + r) % 5 {
            0 => ("pageview", "https://cats.example/p/123", None),
            1 => ("search", "https://ya.ru/search", Some("корм для кошек")),
            2 => ("pageview", "https://news.example/2026/11/23/x", None),
            3 => ("pageview", "https://bank.example/mortgage", None),
            _ => (
                "search",
                "https://www.google.com/search",
                Some("car service near me"),
            ),
        };
        let ev = dmp_core::Event {
            uid: String::new(),
            ts,
            kind: Some(kind.into()),
            url: Some(url.into()),
            referrer: Some("https://ya.ru/".into()),
            q: q.map(str::to_string),
            ip: None,
            ua: None,
            src: Some("web".into()),
            attrs: Default::default(),
        };
        let mut cells = dmp_storage_writer::cells::event_cells(ev, en);
        cells.push(dmp_storage_writer::cells::written_cell(written));
        cells
    }

    #[test]
    fn given_users_changing_in_rounds_when_evaluated_then_from_summaries_and_right() {
        let rounds: i64 = std::env::var("COST_ROUNDS").map_or(10, |v| v.parse().expect("a number"));
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = dmp_core::Config::defaults();
        cfg.data_dir = dir.path().to_path_buf();
        let db =
            EmbeddedDatabase::open(dir.path(), &cfg.embedded, &dmp_store::Schema::dmp_default())
                .unwrap();
        let store: Arc<dyn UserStore> = Arc::new(EmbeddedStore::open(&db, &cfg.store).unwrap());
        let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(dmp_bus::ensure_topics(bus.as_ref(), &cfg.topics))
            .unwrap();
        let (version, rules) = dmp_rules::file::parse_rules("demo.toml", DEMO).unwrap();
        let set = Arc::new(RuleSet::new(version, rules, "demo.toml").unwrap());
        let (_jobs, rx) = std::sync::mpsc::sync_channel(1);
        let (done, _done) = tokio::sync::mpsc::unbounded_channel();
        let w = Worker {
            index: 0,
            store: store.clone(),
            bus,
            rules: Arc::new(FixedRules(set.clone())),
            topics: cfg.topics.clone(),
            cfg: cfg.segmenter.clone(),
            jobs: rx,
            done,
            counters: None,
            max_row_cells: cfg.store.max_row_cells,
        };
        let counters = Counters::new(0);
        let mut st = State::new(&w.cfg);
        let en = dmp_storage_writer::enrich::Enricher::new(
            dmp_storage_writer::enrich::IpMode::Full,
            Vec::new(),
            dmp_storage_writer::enrich::SHIPPED_CRAWLER_LIST,
        )
        .unwrap()
        .enrich(
            Some("10.0.0.1"),
            Some("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"),
        );
        let uid = |u: i64| format!("{:016x}", (u as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let start = dmp_core::clock::now_ms() - 3_600_000;
        for r in 0..rounds {
            let mut puts = Vec::new();
            let mut users = BTreeMap::new();
            for u in 0..USERS {
                let ts = start + r * 1000 + u;
                let written = ts + 10;
                puts.push(Put {
                    row: uid(u),
                    cells: event(u, r, ts, written, &en),
                });
                let job = Job {
                    uid: uid(u),
                    ts: written,
                    msg_ts: written,
                    last_event_ts: ts,
                    tp: TopicPartition::new("dmp.user-changes", 0),
                    offset: (r * USERS + u) as u64,
                    timer: None,
                };
                users.insert(uid(u), Reason::change(&job));
            }
            store.put(&puts).unwrap();
            let out = w.evaluate(&mut st, &counters, users, Vec::new());
            w.write(&rt, out);
        }
        assert_eq!(
            st.summaries.len(),
            USERS as usize,
            "every user has a summary"
        );
        let now = dmp_core::clock::now_ms();
        for u in 0..USERS {
            let row = store.get(&Get::row(uid(u))).unwrap().unwrap();
            let whole: Vec<String> = set.evaluate(&row, now).live.into_keys().collect();
            let written: Vec<String> = memberships(Some(&row), "current").into_keys().collect();
            assert_eq!(written, whole, "user {u}");
        }
    }
}
