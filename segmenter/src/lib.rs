//! `dmp-segmenter`: user changes to segments.
//!
//! Consumer group `segmenter` on `dmp.user-changes`. The poll loop ([`Segmenter::run`]) shards
//! users by uid hash to worker threads (one per core by default, each pinned to a core unless
//! `pin_cores` is off, at nice value `worker_nice`), over bounded queues. Each worker owns its
//! caches, so the hot path takes no locks:
//! 1. [`blacklist`]: a user changing more than `blacklist_max_changes` times per window is a bot,
//!    skipped before any read and flagged `m:bot` once;
//! 2. [`dedupe`]: a change whose write a previous read already saw is skipped (both checks keep
//!    their per-user state in one map, [`users`]: one lookup per change);
//! 3. the user's whole row is read and every rule runs ([`dmp_rules::RuleSet`], hot-reloaded);
//! 4. when the live set changes, a [`dmp_core::SegmentUpdate`] goes to `dmp.segments` and the set
//!    (with `since`) to `s:current` in the row; shadow results go to `dmp.segments.shadow` and
//!    `s:shadow` only;
//! 5. users whose results can change with time (windows, recency) are re-evaluated when the
//!    earliest can change: durable timers in the user store ([`timers`]), scanned by the poll
//!    loop for the partitions it owns and handed to the user's worker like changes.
//!
//! Offsets are committed as the contiguous watermark of changes the workers finished. A record
//! that is not a change ([`BAD_CHANGE`]) and a change of a user whose row cannot be read
//! ([`UNREADABLE_ROW`]: refused, or stored bytes that do not decode) go to `dmp.dead-letter`
//! with the reason, and count as finished once their dead letter is on the topic.
//!
//! 6. live memberships are counted per day ([`dmp_stats::SegmentCounters`], with the pseudo-segment
//!    `all`; bots are never counted since they are never evaluated); counters are flushed before
//!    offsets are committed.

pub mod blacklist;
pub mod dedupe;
mod metrics;
use crate::metrics as m;
mod summaries;
pub mod timers;
pub mod users;
mod worker;

// The unit tests allocate as the `dmp` binary does (`worker::cost` counts instructions).
#[cfg(test)]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use dmp_bus::{Bus, BusError, OffsetTracker, TopicPartition};
use dmp_core::{Config, UserChange};
use dmp_rules::RuleSet;
use dmp_store::UserStore;

pub use worker::{
    evaluated, memberships, Evaluated, FixedRules, Memberships, RulesSource, EVALUATED,
    UNREADABLE_ROW,
};

/// What can stop the segmenter.
#[derive(Debug, thiserror::Error)]
pub enum SegmenterError {
    /// The bus failed.
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    /// The rule file is invalid at start.
    #[error("rules: {0}")]
    Rules(String),
}

/// The segmenter role.
pub struct Segmenter {
    bus: Arc<dyn Bus>,
    store: Arc<dyn UserStore>,
    cfg: Config,
    rules: Arc<dyn RulesSource>,
    counters: Option<Arc<dyn dmp_stats::SegmentCounters>>,
    progress: Option<Arc<dmp_core::health::Progress>>,
}

/// The role's name in readiness reports.
const ROLE: &str = "segmenter";

impl Segmenter {
    /// A segmenter with the rules of `cfg.segmenter.rules` (watched), or the built-in rules.
    pub fn new(
        bus: Arc<dyn Bus>,
        store: Arc<dyn UserStore>,
        cfg: &Config,
    ) -> Result<Segmenter, SegmenterError> {
        let rules: Arc<dyn RulesSource> = if cfg.segmenter.rules.is_empty() {
            let set = RuleSet::new(
                "builtin".into(),
                dmp_rules::builtin::builtin_rules(),
                "built-in rules",
            )
            .map_err(|e| SegmenterError::Rules(format!("{e:?}")))?;
            Arc::new(FixedRules(Arc::new(set)))
        } else {
            let w = dmp_rules::RuleWatcher::start(
                cfg.segmenter.rules.clone().into(),
                Duration::from_millis(cfg.segmenter.reload_interval_ms),
            )
            .map_err(|e| {
                SegmenterError::Rules(
                    e.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
            Arc::new(w)
        };
        Ok(Segmenter::with_rules(bus, store, cfg, rules))
    }

    /// A segmenter with a given rules source.
    pub fn with_rules(
        bus: Arc<dyn Bus>,
        store: Arc<dyn UserStore>,
        cfg: &Config,
        rules: Arc<dyn RulesSource>,
    ) -> Segmenter {
        Segmenter {
            bus,
            store,
            cfg: cfg.clone(),
            rules,
            counters: None,
            progress: None,
        }
    }

    /// Reports progress (for readiness) into `p`: a beat whenever the committed position moves
    /// or nothing is in flight.
    pub fn with_progress(mut self, p: Arc<dmp_core::health::Progress>) -> Segmenter {
        p.beat(ROLE);
        self.progress = Some(p);
        self
    }

    /// Counts every evaluated user's live segments (and the pseudo-segment `all`) per day.
    /// Counters are flushed before each offset commit.
    pub fn with_counters(mut self, counters: Arc<dyn dmp_stats::SegmentCounters>) -> Segmenter {
        self.counters = Some(counters);
        self
    }

    /// Runs until `shutdown`; then workers finish their queues, finished work is committed and
    /// the member leaves its group.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), SegmenterError> {
        let sc = self.cfg.segmenter.clone();
        // Cores this process can use at a time (its affinity, or a CPU quota below it).
        let usable = std::thread::available_parallelism().ok().map(|n| n.get());
        let n = if sc.workers == 0 {
            usable.unwrap_or(1)
        } else {
            sc.workers
        };
        let cores = if sc.pin_cores {
            let cores = core_affinity::get_core_ids().unwrap_or_default();
            let usable = usable.unwrap_or(cores.len());
            pin_targets(cores, usable)
        } else {
            Vec::new()
        };
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut senders: Vec<SyncSender<worker::Job>> = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        let nice = sc.worker_nice;
        for i in 0..n {
            let (tx, rx) = sync_channel(sc.queue_capacity);
            senders.push(tx);
            let w = worker::Worker {
                index: i,
                store: self.store.clone(),
                bus: self.bus.clone(),
                rules: self.rules.clone(),
                topics: self.cfg.topics.clone(),
                cfg: sc.clone(),
                jobs: rx,
                done: done_tx.clone(),
                counters: self.counters.clone(),
                max_row_cells: self.cfg.store.max_row_cells,
            };
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("dmp-segmenter-{i}"))
                    .spawn(move || {
                        if let Some(c) = core {
                            if !core_affinity::set_for_current(c) {
                                tracing::warn!(worker = i, "could not pin the worker to a core");
                            }
                        }
                        dmp_core::priority::lower_to(nice, "the segmenter's workers");
                        w.run()
                    })
                    .expect("spawning a worker"),
            );
        }
        drop(done_tx);
        let topic = self.cfg.topics.user_changes.clone();
        let mut consumer = self
            .bus
            .consumer(&sc.group, std::slice::from_ref(&topic))
            .await?;
        let mut tracker = OffsetTracker::new();
        let mut tick = tokio::time::interval(Duration::from_millis(sc.commit_interval_ms));
        let mut timer_tick =
            tokio::time::interval(Duration::from_millis(sc.timer_scan_interval_ms));
        timer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Timer rows handed to workers and seen again by the last scan (not yet deleted).
        let mut in_flight: HashSet<String> = HashSet::new();
        tracing::info!(
            workers = n,
            pinned = !cores.is_empty(),
            rules = self.rules.current().version(),
            "segmenter started"
        );
        let result: Result<(), SegmenterError> = 'run: loop {
            tokio::select! {
                _ = shutdown.changed() => break 'run Ok(()),
                _ = tick.tick() => {
                    while let Ok((tp, off)) = done_rx.try_recv() { tracker.done(&tp, off); }
                    if let Some(p) = &self.progress {
                        p.report(ROLE, consumer.health().max_poll_exceeded);
                        if tracker.in_flight() == 0 { p.beat(ROLE); }
                    }
                    let marks = tracker.committable();
                    if !marks.is_empty() {
                        // The counters of the work being committed are durable first.
                        if let Some(c) = &self.counters {
                            if let Err(e) = c.flush() {
                                tracing::warn!(error = %e, "counter flush failed; not committing yet");
                                continue 'run;
                            }
                        }
                        if let Err(e) = consumer.commit(&marks).await { break 'run Err(e.into()); }
                        if let Some(p) = &self.progress { p.beat(ROLE); }
                    }
                }
                _ = timer_tick.tick() => {
                    let partitions: Vec<u32> = consumer
                        .assignment()
                        .into_iter()
                        .filter(|tp| tp.topic == topic)
                        .map(|tp| tp.partition)
                        .collect();
                    let store = self.store.clone();
                    let max = sc.timer_scan_max;
                    let now = dmp_core::clock::now_ms();
                    let scanned = tokio::task::spawn_blocking(move || {
                        let mut due = Vec::new();
                        for p in partitions {
                            match timers::scan_due(store.as_ref(), p, now, max) {
                                Ok(d) => due.extend(d),
                                Err(e) => {
                                    ::metrics::counter!(m::TIMER_SCAN_ERRORS).increment(1);
                                    tracing::warn!(partition = p, error = %e, "scanning due timers failed");
                                }
                            }
                        }
                        due
                    })
                    .await
                    .unwrap_or_default();
                    let mut seen = HashSet::with_capacity(scanned.len());
                    for due in scanned {
                        seen.insert(due.key.clone());
                        if in_flight.contains(&due.key) {
                            continue;
                        }
                        ::metrics::counter!(m::TIMERS_FIRED).increment(1);
                        let job = worker::Job {
                            uid: due.uid.clone(),
                            ts: due.pending.due,
                            msg_ts: due.pending.due,
                            last_event_ts: 0,
                            tp: TopicPartition::new(topic.clone(), due.pending.partition),
                            offset: 0,
                            timer: Some(due),
                        };
                        if !dispatch(&senders, job, &mut done_rx, &mut tracker).await {
                            break 'run Ok(());
                        }
                    }
                    in_flight = seen;
                }
                r = consumer.poll(5000, Duration::from_millis(100)) => {
                    let records = match r { Ok(r) => r, Err(e) => break 'run Err(e.into()) };
                    // Records that are not changes: done once their dead letters are durable.
                    let mut dead = Vec::new();
                    for r in records {
                        let tp = TopicPartition::new(r.topic.to_string(), r.partition);
                        tracker.track(&tp, r.offset);
                        let change = match UserChange::from_json(&r.value) {
                            Ok(c) => c,
                            Err(e) => {
                                ::metrics::counter!(m::BAD_CHANGES).increment(1);
                                ::metrics::counter!(m::DEAD_LETTERS, "reason" => BAD_CHANGE).increment(1);
                                let d = r.dead_letter(ROLE, BAD_CHANGE, &format!("not a user change: {e}"));
                                dead.push((tp, r.offset, d));
                                continue;
                            }
                        };
                        let job = worker::Job { uid: change.uid, ts: change.ts, msg_ts: r.timestamp, last_event_ts: change.last_event_ts, tp, offset: r.offset, timer: None };
                        if !dispatch(&senders, job, &mut done_rx, &mut tracker).await {
                            break 'run Ok(());
                        }
                    }
                    if !dead.is_empty() {
                        let records = dead.iter().map(|(_, _, d)| d.clone()).collect();
                        if !self.dead_letter(records, &mut shutdown).await {
                            break 'run Ok(());
                        }
                        for (tp, offset, _) in &dead {
                            tracker.done(tp, *offset);
                        }
                    }
                }
            }
        };
        drop(senders);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        if joined.is_err() {
            tracing::error!("a segmenter worker panicked");
        }
        while let Ok((tp, off)) = done_rx.try_recv() {
            tracker.done(&tp, off);
        }
        let marks = tracker.committable();
        if !marks.is_empty() {
            let flushed = self.counters.as_ref().map_or(Ok(()), |c| c.flush());
            match flushed {
                Ok(()) => consumer.commit(&marks).await?,
                Err(e) => {
                    tracing::warn!(error = %e, "counter flush failed at shutdown; offsets not committed")
                }
            }
        }
        consumer.close().await?;
        tracing::info!("segmenter stopped");
        result
    }

    /// Produces `dead` to the dead-letter topic, retrying with backoff. False when `shutdown`
    /// came first (the records stay undone, so they are read again after a restart).
    async fn dead_letter(
        &self,
        dead: Vec<dmp_bus::ProduceRecord>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let topic = &self.cfg.topics.dead_letter;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.bus.produce(topic, dead.clone()).await {
                Ok(_) => return true,
                Err(e) => {
                    ::metrics::counter!(m::RETRIES).increment(1);
                    tracing::warn!(error = %e, topic = %topic, "publishing a dead letter failed; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// The cores to pin the workers to (worker i to the i-th, round robin): the `cores` the process
/// may run on, unless it may use fewer of them at a time (`usable`, `available_parallelism`: a
/// cgroup CPU quota, as a container's CPU limit sets). Then the workers stay unpinned: they
/// would all land on the first cores, where every other process under a quota on the same host
/// pins its own.
fn pin_targets<C>(cores: Vec<C>, usable: usize) -> Vec<C> {
    if usable < cores.len() {
        tracing::info!(
            cores = cores.len(),
            usable,
            "segmenter workers not pinned: the process's CPU is limited by a quota, not to cores"
        );
        return Vec::new();
    }
    cores
}

/// The dead-letter reason of a change record that is not a `UserChange`.
pub const BAD_CHANGE: &str = "bad_change";

/// Hands `job` to the worker of its user (sharded by uid hash), waiting for room in that
/// worker's bounded queue; finished work keeps being collected meanwhile, and the Kafka consumer
/// keeps polling on its own thread. False when the workers are gone.
async fn dispatch(
    senders: &[SyncSender<worker::Job>],
    mut job: worker::Job,
    done_rx: &mut tokio::sync::mpsc::UnboundedReceiver<(TopicPartition, u64)>,
    tracker: &mut OffsetTracker,
) -> bool {
    let w = (dmp_core::partition::uid_hash(job.uid.as_bytes()) % senders.len() as u64) as usize;
    loop {
        match senders[w].try_send(job) {
            Ok(()) => return true,
            Err(TrySendError::Full(j)) => {
                job = j;
                while let Ok((tp, off)) = done_rx.try_recv() {
                    tracker.done(&tp, off);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pin_targets;

    #[test]
    fn given_cores_when_a_quota_allows_fewer_then_workers_are_not_pinned() {
        // A 2-core machine, or a cpuset of cores 4-5: pinned to them.
        assert_eq!(pin_targets(vec![0, 1], 2), [0, 1]);
        assert_eq!(pin_targets(vec![4, 5], 2), [4, 5]);
        // A container limited to 2 CPUs by a quota on a 16-core host: not pinned.
        assert!(pin_targets((0..16).collect(), 2).is_empty());
    }
}
