//! The storage writer's loop: poll, decode, enrich, write, emit changes, commit.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use dmp_bus::{Bus, BusError, OffsetTracker, ProduceRecord, Record, TopicPartition};
use dmp_core::config::Topics;
use dmp_core::event::{EventLimits, EventRef};
use dmp_core::{DeadLetter, UserChange};
use dmp_store::{Put, StoreError, UserStore};

use crate::cells::{event_put, ua_dictionary_put};
use crate::enrich::Enricher;
use crate::metrics as m;

/// What can stop the storage writer.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The bus failed in a way retrying does not fix (for example, the topic does not exist).
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    /// The store failed in a way retrying does not fix.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Shutdown was asked for while a batch was still being retried; its offsets were not
    /// committed, so it will be read again.
    #[error("stopped before the batch could be written")]
    Interrupted,
}

/// One batch, processed.
#[derive(Debug, Default)]
pub struct Processed {
    /// Puts of the valid events (and new user-agent dictionary entries).
    pub puts: Vec<Put>,
    /// Dead-letter records of the invalid ones.
    pub dead: Vec<ProduceRecord>,
    /// Newest event time per uid.
    pub uids: HashMap<String, i64, foldhash::fast::RandomState>,
}

/// The role's name in readiness reports.
const ROLE: &str = "storage-writer";

/// The storage writer role.
pub struct StorageWriter {
    bus: Arc<dyn Bus>,
    store: Arc<dyn UserStore>,
    topics: Topics,
    group: String,
    batch_max: usize,
    limits: EventLimits,
    enricher: Enricher,
    ua_written: lru::LruCache<u64, ()>,
    /// The last batch's write time: each batch's is later (see [`next_write_time`]).
    last_write_time: i64,
    progress: Option<std::sync::Arc<dmp_core::health::Progress>>,
    suppressions: Option<std::sync::Arc<dmp_store::suppress::Suppressions>>,
    suppression_reload: Duration,
}

impl StorageWriter {
    /// A writer on `bus` and `store` with the given enricher.
    pub fn new(
        bus: Arc<dyn Bus>,
        store: Arc<dyn UserStore>,
        cfg: &dmp_core::Config,
        enricher: Enricher,
    ) -> StorageWriter {
        StorageWriter {
            bus,
            store,
            topics: cfg.topics.clone(),
            group: cfg.storage_writer.group.clone(),
            batch_max: cfg.storage_writer.batch_max_events,
            limits: EventLimits::default(),
            enricher,
            ua_written: lru::LruCache::new(NonZeroUsize::new(100_000).expect("non-zero")),
            last_write_time: i64::MIN,
            progress: None,
            suppressions: None,
            suppression_reload: Duration::from_millis(cfg.storage_writer.suppression_reload_ms),
        }
    }

    /// Decodes, validates and enriches a batch of records (no I/O). The records' values move
    /// into the cells (whose values are slices of them); a refused record keeps its value.
    pub fn process(&mut self, records: &mut [Record]) -> Processed {
        let mut out = Processed::default();
        out.puts.reserve(records.len());
        out.uids.reserve(records.len());
        let now = dmp_core::clock::now_ms();
        // Handles looked up once per batch and counts added once, not per event (a lookup hashes
        // the metric's name and labels).
        let wait = metrics::histogram!(m::WAIT);
        let mut written = 0u64;
        for r in records.iter_mut() {
            wait.record(((now - r.timestamp).max(0)) as f64 / 1000.0);
            let buf = bytes::Bytes::from(std::mem::take(&mut r.value));
            match EventRef::parse(&buf, r.timestamp, &self.limits) {
                Ok(ev)
                    if self
                        .suppressions
                        .as_ref()
                        .is_some_and(|s| s.is_suppressed(&ev.uid, now)) =>
                {
                    metrics::counter!(m::EVENTS, "outcome" => "suppressed").increment(1);
                }
                Ok(ev) => {
                    let en = self.enricher.enrich(ev.ip.as_deref(), ev.ua.as_deref());
                    if en.bad_ip {
                        metrics::counter!(m::BAD_IPS).increment(1);
                    }
                    if let (Some(ua), Some(s)) = (&en.ua, &ev.ua) {
                        if self.ua_written.put(ua.id, ()).is_none() {
                            out.puts.push(ua_dictionary_put(ua.id, s));
                        }
                    }
                    match out.uids.get_mut(&*ev.uid) {
                        Some(t) => *t = (*t).max(ev.ts),
                        None => {
                            out.uids.insert(ev.uid.to_string(), ev.ts);
                        }
                    }
                    out.puts.push(event_put(ev, &buf, &en));
                    written += 1;
                }
                Err(err) => {
                    r.value = buf.to_vec();
                    metrics::counter!(m::EVENTS, "outcome" => "dead_letter").increment(1);
                    metrics::counter!(m::DEAD_LETTERS, "reason" => err.reason()).increment(1);
                    out.dead
                        .push(r.dead_letter(ROLE, err.reason(), &err.to_string()));
                }
            }
        }
        metrics::counter!(m::EVENTS, "outcome" => "written").increment(written);
        out
    }

    /// Writes a processed batch: cells, then dead letters, then change records. Retries
    /// transient failures with backoff until `shutdown`.
    pub async fn write(
        &mut self,
        batch: Processed,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<usize, WriterError> {
        let Processed {
            mut puts,
            mut dead,
            uids,
        } = batch;
        // The write time stamps the rows (m:written) and the change records alike. The cell joins
        // each user's last put of the batch: one delta per event, not one more per user.
        let write_time = next_write_time(&mut self.last_write_time, dmp_core::clock::now_ms());
        let mut stamped: std::collections::HashSet<&str, foldhash::fast::RandomState> =
            std::collections::HashSet::with_capacity_and_hasher(uids.len(), Default::default());
        for p in puts.iter_mut().rev() {
            if uids.contains_key(&p.row) && stamped.insert(p.row.as_str()) {
                p.cells.push(crate::cells::written_cell(write_time));
            }
        }
        if !puts.is_empty() {
            let started = Instant::now();
            let rejected = self.put_with_retry(puts, shutdown).await?;
            dead.extend(rejected);
            metrics::histogram!(m::STORE_WRITE).record(started.elapsed().as_secs_f64());
        }
        if !dead.is_empty() {
            self.produce_with_retry(&self.topics.dead_letter.clone(), dead, shutdown)
                .await?;
        }
        let changes: Vec<ProduceRecord> = uids
            .into_iter()
            .map(|(uid, last_event_ts)| {
                let value = UserChange {
                    uid: uid.clone(),
                    ts: write_time,
                    last_event_ts,
                }
                .to_json();
                ProduceRecord {
                    key: uid.into_bytes(),
                    value,
                    timestamp: Some(write_time),
                }
            })
            .collect();
        let n = changes.len();
        if n > 0 {
            self.produce_with_retry(&self.topics.user_changes.clone(), changes, shutdown)
                .await?;
            metrics::counter!(m::CHANGES).increment(n as u64);
        }
        Ok(n)
    }

    /// Writes the puts; a batch the store rejects as a whole is retried put by put, and the puts
    /// it rejects alone become dead letters.
    async fn put_with_retry(
        &self,
        puts: Vec<Put>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Vec<ProduceRecord>, WriterError> {
        let puts = Arc::new(puts);
        let mut backoff = Duration::from_millis(100);
        loop {
            let (store, p) = (self.store.clone(), puts.clone());
            let r = tokio::task::spawn_blocking(move || store.put(&p))
                .await
                .expect("store put does not panic");
            match r {
                Ok(()) => return Ok(Vec::new()),
                Err(e) if e.kind() == dmp_core::ErrorKind::Rejected => {
                    let mut dead = Vec::new();
                    for p in puts.iter() {
                        if let Err(e) = self.store.put(std::slice::from_ref(p)) {
                            if e.kind() != dmp_core::ErrorKind::Rejected {
                                return Err(e.into());
                            }
                            dead.push(ProduceRecord::new(
                                p.row.clone().into_bytes(),
                                DeadLetter {
                                    reason: "store_rejected".into(),
                                    error: e.to_string(),
                                    stage: ROLE.into(),
                                    topic: self.topics.events.clone(),
                                    partition: 0,
                                    offset: 0,
                                    timestamp: dmp_core::clock::now_ms(),
                                    payload: format!("{:?}", p.cells),
                                }
                                .to_json(),
                            ));
                        }
                    }
                    return Ok(dead);
                }
                Err(e) => {
                    metrics::counter!(m::RETRIES, "stage" => "store").increment(1);
                    tracing::warn!(error = %e, "store write failed; retrying the batch");
                    self.sleep_or_stop(&mut backoff, shutdown).await?;
                }
            }
        }
    }

    async fn produce_with_retry(
        &self,
        topic: &str,
        records: Vec<ProduceRecord>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), WriterError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.bus.produce(topic, records.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e, BusError::UnknownTopic(_) | BusError::Rejected(_)) => {
                    return Err(e.into())
                }
                Err(e) => {
                    metrics::counter!(m::RETRIES, "stage" => "bus").increment(1);
                    tracing::warn!(error = %e, topic, "produce failed; retrying");
                    self.sleep_or_stop(&mut backoff, shutdown).await?;
                }
            }
        }
    }

    async fn sleep_or_stop(
        &self,
        backoff: &mut Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), WriterError> {
        if *shutdown.borrow() {
            return Err(WriterError::Interrupted);
        }
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {}
            _ = shutdown.changed() => return Err(WriterError::Interrupted),
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        Ok(())
    }

    /// Drops the events of users in `s` (deleted users), reloading it from the store.
    pub fn with_suppressions(
        mut self,
        s: std::sync::Arc<dmp_store::suppress::Suppressions>,
    ) -> StorageWriter {
        self.suppressions = Some(s);
        self
    }

    /// Reports progress (for readiness) into `p`.
    pub fn with_progress(mut self, p: std::sync::Arc<dmp_core::health::Progress>) -> StorageWriter {
        p.beat(ROLE);
        self.progress = Some(p);
        self
    }

    /// Runs until `shutdown` becomes true; commits what was written and leaves the group.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), WriterError> {
        let topic = self.topics.events.clone();
        let mut consumer = self
            .bus
            .consumer(&self.group, std::slice::from_ref(&topic))
            .await?;
        let mut tracker = OffsetTracker::new();
        tracing::info!(group = %self.group, topic = %topic, "storage writer started");
        let mut reloaded: Option<Instant> = None;
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            if let Some(s) = &self.suppressions {
                if reloaded.is_none_or(|t| t.elapsed() >= self.suppression_reload) {
                    let (s, store) = (s.clone(), self.store.clone());
                    let now = dmp_core::clock::now_ms();
                    match tokio::task::spawn_blocking(move || s.reload(store.as_ref(), now)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "reloading suppressed users failed")
                        }
                        Err(e) => tracing::warn!(error = %e, "reloading suppressed users failed"),
                    }
                    reloaded = Some(Instant::now());
                }
            }
            let mut records = tokio::select! {
                r = consumer.poll(self.batch_max, Duration::from_millis(200)) => match r {
                    Ok(r) => r,
                    Err(e) => break Err(WriterError::Bus(e)),
                },
                _ = shutdown.changed() => break Ok(()),
            };
            if let Some(p) = &self.progress {
                p.report(ROLE, consumer.health().max_poll_exceeded);
            }
            if records.is_empty() {
                if let Some(p) = &self.progress {
                    p.beat(ROLE);
                }
                continue;
            }
            let started = Instant::now();
            metrics::histogram!(m::BATCH_EVENTS).record(records.len() as f64);
            for r in &records {
                tracker.track(
                    &TopicPartition::new(r.topic.to_string(), r.partition),
                    r.offset,
                );
            }
            let processed = self.process(&mut records);
            match self.write(processed, &mut shutdown).await {
                Ok(_) => {}
                Err(WriterError::Interrupted) => break Ok(()),
                Err(e) => break Err(e),
            }
            for r in &records {
                tracker.done(
                    &TopicPartition::new(r.topic.to_string(), r.partition),
                    r.offset,
                );
            }
            let marks = tracker.committable();
            if let Err(e) = consumer.commit(&marks).await {
                break Err(e.into());
            }
            if let Some(p) = &self.progress {
                p.beat(ROLE);
            }
            metrics::histogram!(m::BATCH_DURATION).record(started.elapsed().as_secs_f64());
        };
        let closed = consumer.close().await;
        tracing::info!("storage writer stopped");
        result?;
        closed?;
        Ok(())
    }
}

/// A batch's write time: the clock, but always after the previous batch's. The segmenter's
/// dedupe skips a change whose write time an earlier read already saw; two batches stamped in the
/// same millisecond would make it skip the second batch's change although its read saw only the
/// first.
pub fn next_write_time(last: &mut i64, now: i64) -> i64 {
    let t = now.max(last.saturating_add(1));
    *last = t;
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn given_batches_in_one_millisecond_then_write_times_still_rise() {
        let mut last = i64::MIN;
        assert_eq!(super::next_write_time(&mut last, 1000), 1000);
        assert_eq!(super::next_write_time(&mut last, 1000), 1001);
        assert_eq!(super::next_write_time(&mut last, 1000), 1002);
        assert_eq!(
            super::next_write_time(&mut last, 999),
            1003,
            "a clock step back too"
        );
        assert_eq!(super::next_write_time(&mut last, 5000), 5000);
    }
}
