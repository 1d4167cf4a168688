//! Segment counters: one sketch per (segment, day) of the users evaluated in it.
//!
//! [`SegmentCounters`] is what the segmenter hands memberships to. [`EmbeddedCounters`] keeps the
//! sketches in memory, sharded over 16 locks so workers rarely meet, and flushes changed sketches
//! to the embedded database (keyspace `stats.hll`) every `flush()` call. A kill -9 loses at most
//! the updates since the last flush. HLL updates are idempotent, so the segmenter replaying a
//! change after a crash does not inflate a count.
//!
//! Beside each HyperLogLog the embedded backend keeps a theta sketch ([`crate::theta`], keyspace
//! `stats.theta`) for audience intersections. Its records per (segment, day):
//! - a full record (the compact sketch, sorted), rewritten when the sketch lowers its threshold,
//!   after [`MAX_DELTAS`] delta records, and when the sketch leaves memory;
//! - delta records: the hashes added since the previous flush, so a flush writes what changed,
//!   not the whole sketch.
//!
//! Days within two days of today stay in memory while written; older ones are read from disk when
//! asked for, or when a late event reaches them (then they leave at the next flush).

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::hll::Hll;
use crate::theta::{Added, Theta, ThetaUpdate};

/// Counter failures.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The embedded database failed.
    #[error("counter storage failed: {0}")]
    Storage(#[from] fjall::Error),
    /// A stored sketch could not be read.
    #[error("corrupt sketch {0}")]
    Corrupt(String),
    /// Redis failed or is unreachable.
    #[error("redis: {0}")]
    Redis(String),
    /// The configuration names no usable backend.
    #[error("{0}")]
    Config(String),
}

/// The pseudo-segment every evaluated user is counted in (NOT needs it).
pub const ALL: &str = "all";

/// A day as `yyyymmdd` (UTC) from epoch ms.
pub fn day_of(ms: i64) -> u32 {
    let days = ms.div_euclid(dmp_core::clock::DAY_MS);
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (y * 10_000 + m * 100 + d) as u32
}

/// Where segment memberships are counted.
pub trait SegmentCounters: Send + Sync {
    /// Counts `uid` on `day` in each of `segments` and in [`ALL`].
    fn record(&self, day: u32, uid: &str, segments: &[&str]);
    /// The estimated number of distinct users of `segment` on `day`.
    fn count(&self, segment: &str, day: u32) -> Result<u64, StatsError> {
        Ok(self.sketch(segment, day)?.map_or(0, |h| h.count()))
    }
    /// The sketch of `segment` on `day` (None: nobody counted).
    fn sketch(&self, segment: &str, day: u32) -> Result<Option<Hll>, StatsError>;
    /// The union of `segment`'s sketches over `days` (None: nobody on any of them).
    fn range_sketch(&self, segment: &str, days: &[u32]) -> Result<Option<Hll>, StatsError> {
        let mut out: Option<Hll> = None;
        for d in days {
            if let Some(h) = self.sketch(segment, *d)? {
                match &mut out {
                    Some(o) => o.merge(&h),
                    None => out = Some(h),
                }
            }
        }
        Ok(out)
    }
    /// The theta sketch of `segment` on `day`, from backends that keep them (None: this backend
    /// keeps none, or nobody was counted).
    fn theta(&self, _segment: &str, _day: u32) -> Result<Option<Theta>, StatsError> {
        Ok(None)
    }
    /// The union of `segment`'s theta sketches over `days`; None when this backend keeps none.
    fn range_theta(&self, _segment: &str, _days: &[u32]) -> Result<Option<Theta>, StatsError> {
        Ok(None)
    }
    /// Every (segment, day) with a sketch.
    fn segments(&self) -> Result<Vec<(String, u32)>, StatsError>;
    /// Makes recorded updates durable.
    fn flush(&self) -> Result<(), StatsError>;
    /// The backend's name (`embedded`, `redis`).
    fn backend_name(&self) -> &'static str;
}

/// The day `days` before `day` (both `yyyymmdd`).
pub fn days_before(day: u32, days: u32) -> u32 {
    day_of(epoch_ms_of(day) - days as i64 * dmp_core::clock::DAY_MS)
}

/// Epoch ms of the start of a `yyyymmdd` day (UTC).
pub fn epoch_ms_of(day: u32) -> i64 {
    // Days-from-civil (H. Hinnant).
    let (y, m, d) = (
        (day / 10_000) as i64,
        ((day / 100) % 100) as i64,
        (day % 100) as i64,
    );
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * dmp_core::clock::DAY_MS
}

/// Whether `day` is a real `yyyymmdd` date.
pub fn valid_day(day: u32) -> bool {
    day_of(epoch_ms_of(day)) == day && (19_700_101..=99_991_231).contains(&day)
}

const SHARDS: usize = 16;
const KEYSPACE: &str = "stats.hll";
const THETA_KEYSPACE: &str = "stats.theta";
/// Delta records of one theta sketch before they are folded into its full record.
pub const MAX_DELTAS: u32 = 32;
/// Theta sketches of days this many days before today or older leave memory after a flush.
const THETA_HOT_DAYS: u32 = 3;
/// Element hashes a (segment, day) collects before it applies them to its sketches in one pass
/// (the registers and the theta table are then walked while in cache, instead of a cache miss
/// or two per update: 100 segments' sketches do not fit in a core's cache).
const PENDING_MAX: usize = 4096;

/// One (segment, day) in memory.
#[derive(Default)]
struct DayCounters {
    hll: Hll,
    /// None: no theta sketches kept, or this day's is on disk only.
    theta: Option<ThetaState>,
    /// Element hashes recorded, not applied yet.
    pending: Vec<u64>,
    /// Changed since the last flush (as far as applied).
    dirty: bool,
}

impl DayCounters {
    /// Applies the pending hashes to the HLL and the theta sketch (if in memory);
    /// `keep_fresh`: remember hashes added to the theta sketch for a delta record.
    fn apply(&mut self, keep_fresh: bool) {
        if self.pending.is_empty() {
            return;
        }
        for h in &self.pending {
            self.dirty |= self.hll.add_hash(*h);
        }
        if let Some(t) = &mut self.theta {
            let theta = t.sketch.theta();
            let samples: Vec<u64> = self
                .pending
                .iter()
                .map(|h| crate::theta::sample_hash(*h))
                .filter(|s| *s < theta)
                .collect();
            let ThetaState {
                sketch,
                fresh,
                rewrite,
                ..
            } = t;
            let dirty = &mut self.dirty;
            sketch.update_many(&samples, |s, added| match added {
                Added::No => {}
                Added::Inserted => {
                    if keep_fresh {
                        fresh.push(s);
                    }
                    *dirty = true;
                }
                Added::Rebuilt => {
                    fresh.clear();
                    *rewrite = true;
                    *dirty = true;
                }
            });
        }
        self.pending.clear();
    }
}

/// A theta sketch in memory and what its stored records lack.
struct ThetaState {
    sketch: ThetaUpdate,
    /// Hashes added since the last flush (written as one delta record).
    fresh: Vec<u64>,
    /// The threshold fell (or the stored records could not be read): write a full record and
    /// drop the deltas.
    rewrite: bool,
    /// Delta records on disk.
    deltas: u32,
    /// The stored delta count is unknown (a read failed): delete deltas by scanning.
    scan_deltas: bool,
}

impl ThetaState {
    fn new(sketch: ThetaUpdate) -> ThetaState {
        ThetaState {
            sketch,
            fresh: Vec::new(),
            rewrite: false,
            deltas: 0,
            scan_deltas: false,
        }
    }
}

#[derive(Default)]
struct Shard {
    /// segment -> day -> counters (nested, so a lookup by `&str` allocates nothing).
    days: HashMap<Box<str>, HashMap<u32, DayCounters>, foldhash::fast::RandomState>,
}

impl Shard {
    #[cfg(test)]
    fn get(&self, segment: &str, day: u32) -> Option<&DayCounters> {
        self.days.get(segment)?.get(&day)
    }

    fn get_mut(&mut self, segment: &str, day: u32) -> Option<&mut DayCounters> {
        self.days.get_mut(segment)?.get_mut(&day)
    }

    fn get_or_insert(&mut self, segment: &str, day: u32) -> &mut DayCounters {
        if !self.days.contains_key(segment) {
            self.days.insert(segment.into(), HashMap::new());
        }
        self.days
            .get_mut(segment)
            .expect("inserted above")
            .entry(day)
            .or_default()
    }

    fn keys(&self) -> Vec<(String, u32)> {
        self.days
            .iter()
            .flat_map(|(s, days)| days.keys().map(|d| (s.to_string(), *d)))
            .collect()
    }

    fn remove(&mut self, segment: &str, day: u32) {
        if let Some(days) = self.days.get_mut(segment) {
            days.remove(&day);
            if days.is_empty() {
                self.days.remove(segment);
            }
        }
    }
}

/// Counters kept in memory and flushed to the embedded database.
pub struct EmbeddedCounters {
    shards: Vec<Mutex<Shard>>,
    store: Option<Stored>,
    /// Sketches of days older than this many days are dropped at flush (0: kept).
    retention_days: u32,
    /// `lg k` of the theta sketches kept beside the HLLs (None: none kept).
    theta_lg_k: Option<u8>,
}

struct Stored {
    db: dmp_store::embedded::EmbeddedDatabase,
    hll: fjall::Keyspace,
    theta: fjall::Keyspace,
}

fn key(segment: &str, day: u32) -> Vec<u8> {
    let mut k = segment.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&day.to_be_bytes());
    k
}

/// A theta sketch's full record: `key` then 0.
fn full_key(segment: &str, day: u32) -> Vec<u8> {
    let mut k = key(segment, day);
    k.push(0);
    k
}

/// A theta sketch's delta record `seq`: `key`, 1, then `seq`.
fn delta_key(segment: &str, day: u32, seq: u32) -> Vec<u8> {
    let mut k = key(segment, day);
    k.push(1);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// What a (segment, day)'s theta records on disk hold.
struct StoredTheta {
    /// The threshold and sorted hashes of the full record and every delta.
    sketch: Theta,
    deltas: u32,
}

fn read_theta(
    ks: &fjall::Keyspace,
    segment: &str,
    day: u32,
) -> Result<Option<StoredTheta>, StatsError> {
    let prefix = key(segment, day);
    let corrupt = |why: &str| StatsError::Corrupt(format!("theta of {segment} on {day}: {why}"));
    let mut full: Option<Theta> = None;
    let mut added: Vec<u64> = Vec::new();
    let mut deltas = 0u32;
    for kv in ks.prefix(&prefix) {
        let (k, v) = kv.into_inner()?;
        match k.get(prefix.len()) {
            Some(0) => full = Some(Theta::from_bytes(&v).map_err(|e| corrupt(e.0))?),
            Some(1) => {
                if v.len() % 8 != 0 {
                    return Err(corrupt("delta record length"));
                }
                added.extend(
                    v.chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                );
                deltas += 1;
            }
            _ => return Err(corrupt("record kind")),
        }
    }
    if full.is_none() && deltas == 0 {
        return Ok(None);
    }
    let sketch = full.unwrap_or_default().with_added(added);
    Ok(Some(StoredTheta { sketch, deltas }))
}

fn shard_of(segment: &str) -> usize {
    (dmp_core::partition::uid_hash(segment.as_bytes()) % SHARDS as u64) as usize
}

impl EmbeddedCounters {
    /// Counters that live in memory only (tests, `dmp rules test`).
    pub fn in_memory() -> EmbeddedCounters {
        EmbeddedCounters {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            store: None,
            retention_days: 0,
            theta_lg_k: Some(crate::theta::DEFAULT_LG_K),
        }
    }

    /// Keeps theta sketches of `2^lg_k` hashes beside the HLLs (0: none).
    pub fn with_theta(mut self, lg_k: u8) -> EmbeddedCounters {
        self.theta_lg_k = (lg_k > 0).then_some(lg_k);
        self
    }

    /// Drops sketches of days more than `days` before today at each flush.
    pub fn with_retention(mut self, days: u32) -> EmbeddedCounters {
        self.retention_days = days;
        self
    }

    /// Counters persisted in the embedded database; loads every stored HyperLogLog (theta
    /// sketches are read when needed).
    pub fn open(
        db: &dmp_store::embedded::EmbeddedDatabase,
    ) -> Result<EmbeddedCounters, StatsError> {
        let ks = db.keyspace(KEYSPACE)?;
        let theta = db.keyspace(THETA_KEYSPACE)?;
        let c = EmbeddedCounters::in_memory();
        for kv in ks.iter() {
            let (k, v) = kv.into_inner()?;
            let sep = k
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| StatsError::Corrupt("key".into()))?;
            let segment = String::from_utf8_lossy(&k[..sep]).into_owned();
            let day = u32::from_be_bytes(
                k[sep + 1..]
                    .try_into()
                    .map_err(|_| StatsError::Corrupt(segment.clone()))?,
            );
            let hll =
                Hll::from_registers(&v).ok_or_else(|| StatsError::Corrupt(segment.clone()))?;
            c.shards[shard_of(&segment)]
                .lock()
                .get_or_insert(&segment, day)
                .hll = hll;
        }
        Ok(EmbeddedCounters {
            store: Some(Stored {
                db: db.clone(),
                hll: ks,
                theta,
            }),
            ..c
        })
    }

    /// The theta sketch of a day to update: from its stored records, else new.
    fn load_theta(&self, segment: &str, day: u32, lg_k: u8) -> ThetaState {
        let loaded = match &self.store {
            Some(st) => read_theta(&st.theta, segment, day),
            None => Ok(None),
        };
        match loaded {
            Ok(Some(t)) => ThetaState {
                deltas: t.deltas,
                ..ThetaState::new(ThetaUpdate::from_parts(
                    lg_k,
                    t.sketch.theta(),
                    t.sketch.hashes().iter().copied(),
                ))
            },
            Ok(None) => ThetaState::new(ThetaUpdate::new(lg_k)),
            Err(e) => {
                // Start over: the next flush replaces the unreadable records.
                tracing::error!(segment, day, error = %e, "theta sketch unreadable; starting it again");
                metrics::counter!("dmp_stats_theta_reset_total").increment(1);
                ThetaState {
                    rewrite: true,
                    scan_deltas: true,
                    ..ThetaState::new(ThetaUpdate::new(lg_k))
                }
            }
        }
    }
}

/// Puts the removal of every theta record of (`segment`, `day`) into `batch`.
fn remove_records(
    batch: &mut fjall::OwnedWriteBatch,
    ks: &fjall::Keyspace,
    segment: &str,
    day: u32,
) -> Result<(), StatsError> {
    for kv in ks.prefix(key(segment, day)) {
        batch.remove(ks, kv.key()?.to_vec());
    }
    Ok(())
}

/// Puts a theta sketch's pending changes into `batch`: a delta record of its fresh hashes, or a
/// full record (and no deltas) when its threshold fell, its deltas are many, or `fold` asks (the
/// sketch is about to leave memory: stored whole and sorted, it is read back in one piece).
fn write_theta(
    batch: &mut fjall::OwnedWriteBatch,
    ks: &fjall::Keyspace,
    segment: &str,
    day: u32,
    st: &mut ThetaState,
    fold: bool,
) -> Result<(), StatsError> {
    let unfolded = st.deltas > 0 || !st.fresh.is_empty();
    if st.rewrite || st.deltas >= MAX_DELTAS || (fold && unfolded) {
        if st.scan_deltas {
            remove_records(batch, ks, segment, day)?;
        } else {
            for seq in 0..st.deltas {
                batch.remove(ks, delta_key(segment, day, seq));
            }
        }
        batch.insert(ks, full_key(segment, day), st.sketch.compact().to_bytes());
        st.deltas = 0;
        st.rewrite = false;
        st.scan_deltas = false;
        st.fresh.clear();
    } else if !st.fresh.is_empty() {
        let mut v = Vec::with_capacity(st.fresh.len() * 8);
        for h in st.fresh.drain(..) {
            v.extend_from_slice(&h.to_le_bytes());
        }
        batch.insert(ks, delta_key(segment, day, st.deltas), v);
        st.deltas += 1;
    }
    Ok(())
}

impl SegmentCounters for EmbeddedCounters {
    fn record(&self, day: u32, uid: &str, segments: &[&str]) {
        let hash = crate::hll::hash_of(uid.as_bytes());
        let keep_fresh = self.store.is_some();
        for seg in segments.iter().copied().chain(std::iter::once(ALL)) {
            let mut shard = self.shards[shard_of(seg)].lock();
            let d = shard.get_or_insert(seg, day);
            if let (Some(lg_k), None) = (self.theta_lg_k, &d.theta) {
                d.theta = Some(self.load_theta(seg, day, lg_k));
            }
            d.pending.push(hash);
            if d.pending.len() >= PENDING_MAX {
                d.apply(keep_fresh);
            }
        }
    }

    fn count(&self, segment: &str, day: u32) -> Result<u64, StatsError> {
        let keep_fresh = self.store.is_some();
        Ok(self.shards[shard_of(segment)]
            .lock()
            .get_mut(segment, day)
            .map_or(0, |d| {
                d.apply(keep_fresh);
                d.hll.count()
            }))
    }

    fn sketch(&self, segment: &str, day: u32) -> Result<Option<Hll>, StatsError> {
        let keep_fresh = self.store.is_some();
        Ok(self.shards[shard_of(segment)]
            .lock()
            .get_mut(segment, day)
            .map(|d| {
                d.apply(keep_fresh);
                d.hll.clone()
            }))
    }

    fn theta(&self, segment: &str, day: u32) -> Result<Option<Theta>, StatsError> {
        if self.theta_lg_k.is_none() {
            return Ok(None);
        }
        let keep_fresh = self.store.is_some();
        let held = self.shards[shard_of(segment)]
            .lock()
            .get_mut(segment, day)
            .and_then(|d| {
                d.apply(keep_fresh);
                d.theta.as_mut().map(|t| t.sketch.compact())
            });
        if held.is_some() {
            return Ok(held);
        }
        match &self.store {
            Some(st) => Ok(read_theta(&st.theta, segment, day)?.map(|t| t.sketch)),
            None => Ok(None),
        }
    }

    fn range_theta(&self, segment: &str, days: &[u32]) -> Result<Option<Theta>, StatsError> {
        let Some(lg_k) = self.theta_lg_k else {
            return Ok(None);
        };
        let mut parts = Vec::new();
        for d in days {
            match self.theta(segment, *d)? {
                Some(t) => parts.push(t),
                // Counted before theta sketches were kept: the range has none to answer from.
                None if self.count(segment, *d)? > 0 => return Ok(None),
                None => {}
            }
        }
        Ok(Some(Theta::union(&parts, 1 << lg_k)))
    }

    fn segments(&self) -> Result<Vec<(String, u32)>, StatsError> {
        let mut out: Vec<(String, u32)> =
            self.shards.iter().flat_map(|s| s.lock().keys()).collect();
        out.sort();
        Ok(out)
    }

    fn flush(&self) -> Result<(), StatsError> {
        let today = day_of(dmp_core::clock::now_ms());
        let oldest = (self.retention_days > 0).then(|| days_before(today, self.retention_days));
        let mut expired = Vec::new();
        for shard in &self.shards {
            let mut s = shard.lock();
            if let Some(oldest) = oldest {
                let old: Vec<(String, u32)> =
                    s.keys().into_iter().filter(|(_, d)| *d < oldest).collect();
                for (seg, day) in old {
                    s.remove(&seg, day);
                    expired.push((seg, day));
                }
            }
        }
        let Some(st) = &self.store else {
            return Ok(());
        };
        let cold = days_before(today, THETA_HOT_DAYS);
        let mut batch = st.db.db().batch().durability(st.db.batch_durability());
        for (seg, day) in expired {
            batch.remove(&st.hll, key(&seg, day));
            remove_records(&mut batch, &st.theta, &seg, day)?;
        }
        let mut written: Vec<(usize, String, u32)> = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let mut s = shard.lock();
            for (seg, days) in s.days.iter_mut() {
                for (day, d) in days.iter_mut() {
                    d.apply(true);
                    let fold = *day <= cold;
                    let folding = fold && d.theta.as_ref().is_some_and(|t| t.deltas > 0);
                    if !d.dirty && !folding {
                        continue;
                    }
                    if d.dirty {
                        batch.insert(&st.hll, key(seg, *day), d.hll.registers().to_vec());
                    }
                    if let Some(t) = &mut d.theta {
                        write_theta(&mut batch, &st.theta, seg, *day, t, fold)?;
                    }
                    d.dirty = false;
                    written.push((i, seg.to_string(), *day));
                }
            }
        }
        if let Err(e) = batch.commit() {
            // Nothing of this flush is on disk: write everything again next time.
            for (i, seg, day) in written {
                let mut s = self.shards[i].lock();
                if let Some(d) = s.get_mut(&seg, day) {
                    d.dirty = true;
                    if let Some(t) = &mut d.theta {
                        t.rewrite = true;
                        t.scan_deltas = true;
                    }
                }
            }
            return Err(e.into());
        }
        // Cold sketches whose records hold everything leave memory (a late event reads them back).
        for shard in &self.shards {
            let mut s = shard.lock();
            for days in s.days.values_mut() {
                for (day, d) in days.iter_mut() {
                    let on_disk = d
                        .theta
                        .as_ref()
                        .is_some_and(|t| !t.rewrite && t.deltas == 0 && t.fresh.is_empty());
                    if *day <= cold && !d.dirty && d.pending.is_empty() && on_disk {
                        d.theta = None;
                    }
                }
            }
        }
        Ok(())
    }

    fn backend_name(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_epoch_ms_when_converted_then_utc_day() {
        assert_eq!(day_of(0), 19_700_101);
        assert_eq!(day_of(1_795_341_600_000), 20_261_122);
        assert_eq!(day_of(951_782_400_000), 20_000_229); // a leap day
    }

    #[test]
    fn given_memberships_when_recorded_then_counted_per_segment_and_day_and_in_all() {
        let c = EmbeddedCounters::in_memory();
        for i in 0..1000 {
            let uid = format!("u{i}");
            let segs: Vec<&str> = if i % 2 == 0 { vec!["even"] } else { vec![] };
            c.record(20_261_122, &uid, &segs);
            c.record(20_261_122, &uid, &segs); // replays do not inflate
        }
        let near = |a: u64, b: u64| (a as f64 - b as f64).abs() <= b as f64 * 0.03;
        assert!(near(c.count("even", 20_261_122).unwrap(), 500));
        assert!(near(c.count(ALL, 20_261_122).unwrap(), 1000));
        assert_eq!(c.count("even", 20_261_123).unwrap(), 0);
    }

    #[test]
    fn given_flushed_counters_when_reopened_then_counts_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let c = EmbeddedCounters::open(&db).unwrap();
        for i in 0..300 {
            c.record(20_261_122, &format!("u{i}"), &["cats"]);
        }
        c.flush().unwrap();
        let before = c.count("cats", 20_261_122).unwrap();
        drop(c);
        let again = EmbeddedCounters::open(&db).unwrap();
        assert_eq!(again.count("cats", 20_261_122).unwrap(), before);
        assert_eq!(again.count(ALL, 20_261_122).unwrap(), before);
    }

    #[test]
    fn given_days_when_converted_then_round_trip_and_invalid_dates_are_refused() {
        for day in [19_700_101, 20_000_229, 20_261_122, 20_261_231, 20_270_101] {
            assert_eq!(day_of(epoch_ms_of(day)), day);
            assert!(valid_day(day));
        }
        assert_eq!(days_before(20_260_301, 1), 20_260_228);
        assert_eq!(days_before(20_240_301, 1), 20_240_229);
        for bad in [20_260_230, 20_261_301, 20_261_100, 19_691_231, 2_026_112] {
            assert!(!valid_day(bad), "{bad}");
        }
    }

    #[test]
    fn given_retention_when_flushed_then_old_days_are_dropped_on_disk_too() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let today = day_of(dmp_core::clock::now_ms());
        let c = EmbeddedCounters::open(&db).unwrap().with_retention(30);
        c.record(today, "u", &["cats"]);
        c.record(days_before(today, 30), "u", &["cats"]);
        c.record(days_before(today, 31), "u", &["cats"]);
        c.flush().unwrap();
        assert_eq!(c.count("cats", days_before(today, 30)).unwrap(), 1);
        assert_eq!(c.count("cats", days_before(today, 31)).unwrap(), 0);
        drop(c);
        let again = EmbeddedCounters::open(&db).unwrap();
        assert_eq!(
            again.segments().unwrap().len(),
            4,
            "cats and all, two days each"
        );
    }

    fn theta_records(db: &dmp_store::embedded::EmbeddedDatabase) -> Vec<Vec<u8>> {
        let ks = db.keyspace(THETA_KEYSPACE).unwrap();
        ks.iter().map(|kv| kv.key().unwrap().to_vec()).collect()
    }

    #[test]
    fn given_theta_sketches_when_flushed_then_reopened_with_the_sample_of_the_last_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let today = day_of(dmp_core::clock::now_ms());
        // k = 1024: the sketch lowers its threshold many times over 30K users (full records),
        // and grows between flushes (delta records).
        let c = EmbeddedCounters::open(&db).unwrap().with_theta(10);
        for i in 0..30_000 {
            c.record(today, &format!("u{i}"), &["cats"]);
            if i % 700 == 0 {
                c.flush().unwrap();
            }
        }
        c.flush().unwrap();
        let flushed = c.theta("cats", today).unwrap().unwrap();
        assert!(!flushed.is_exact());
        let err = (flushed.estimate() - 30_000.0).abs() / 30_000.0;
        assert!(err < 0.15, "{}", flushed.estimate());
        // Not flushed: lost with the process, as the HLL updates are.
        for i in 30_000..31_000 {
            c.record(today, &format!("u{i}"), &["cats"]);
        }
        drop(c);
        let again = EmbeddedCounters::open(&db).unwrap().with_theta(10);
        assert_eq!(again.theta("cats", today).unwrap().unwrap(), flushed);
        // Updates go on from the stored sketch.
        again.record(today, "late", &["cats"]);
        again.flush().unwrap();
        let t = again.theta("cats", today).unwrap().unwrap();
        assert!(t.hashes().len() >= flushed.hashes().len() - 1);
    }

    #[test]
    fn given_many_small_flushes_when_written_then_deltas_are_folded_into_the_full_record() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let today = day_of(dmp_core::clock::now_ms());
        let c = EmbeddedCounters::open(&db).unwrap().with_theta(12);
        for round in 0..(MAX_DELTAS as usize + 5) {
            for i in 0..10 {
                c.record(today, &format!("u{round}-{i}"), &["dogs"]);
            }
            c.flush().unwrap();
        }
        let prefix = key("dogs", today);
        let records = theta_records(&db)
            .into_iter()
            .filter(|k| k.starts_with(&prefix))
            .count();
        assert!(records <= MAX_DELTAS as usize + 1, "{records} records");
        let t = c.theta("dogs", today).unwrap().unwrap();
        assert!(t.is_exact());
        assert_eq!(t.hashes().len(), (MAX_DELTAS as usize + 5) * 10);
        drop(c);
        let again = EmbeddedCounters::open(&db).unwrap().with_theta(12);
        assert_eq!(again.theta("dogs", today).unwrap().unwrap(), t);
    }

    #[test]
    fn given_an_old_day_when_flushed_then_its_theta_leaves_memory_and_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let old = days_before(day_of(dmp_core::clock::now_ms()), 10);
        let c = EmbeddedCounters::open(&db).unwrap().with_theta(10);
        for i in 0..5_000 {
            c.record(old, &format!("u{i}"), &["birds"]);
        }
        c.flush().unwrap();
        let in_memory = |c: &EmbeddedCounters| {
            c.shards[shard_of("birds")]
                .lock()
                .get("birds", old)
                .is_some_and(|d| d.theta.is_some())
        };
        assert!(!in_memory(&c), "an old day leaves memory after its flush");
        let t = c.theta("birds", old).unwrap().unwrap();
        assert!((t.estimate() - 5_000.0).abs() < 1_000.0, "{}", t.estimate());
        // A late event reads it back, adds, and it leaves again after the next flush.
        for i in 5_000..5_200 {
            c.record(old, &format!("u{i}"), &["birds"]);
        }
        assert!(in_memory(&c));
        c.flush().unwrap();
        assert!(!in_memory(&c));
        let after = c.theta("birds", old).unwrap().unwrap();
        assert!(after.estimate() > t.estimate() * 0.9);
        drop(c);
        let again = EmbeddedCounters::open(&db).unwrap().with_theta(10);
        assert_eq!(again.theta("birds", old).unwrap().unwrap(), after);
    }

    #[test]
    fn given_retention_when_flushed_then_theta_records_go_too() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let today = day_of(dmp_core::clock::now_ms());
        let c = EmbeddedCounters::open(&db).unwrap().with_retention(30);
        c.record(days_before(today, 31), "u", &["cats"]);
        c.record(today, "u", &["cats"]);
        c.flush().unwrap();
        let days: std::collections::BTreeSet<u32> = theta_records(&db)
            .iter()
            .map(|k| {
                let sep = k.iter().position(|b| *b == 0).unwrap();
                u32::from_be_bytes(k[sep + 1..sep + 5].try_into().unwrap())
            })
            .collect();
        assert_eq!(days.into_iter().collect::<Vec<_>>(), vec![today]);
    }

    #[test]
    fn given_an_unreadable_theta_record_when_updated_then_started_again_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let today = day_of(dmp_core::clock::now_ms());
        let ks = db.keyspace(THETA_KEYSPACE).unwrap();
        ks.insert(full_key("cats", today), b"garbage".to_vec())
            .unwrap();
        ks.insert(delta_key("cats", today, 0), vec![1u8; 8])
            .unwrap();
        let c = EmbeddedCounters::open(&db).unwrap();
        assert!(c.theta("cats", today).is_err(), "reads name the corruption");
        c.record(today, "u1", &["cats"]);
        c.flush().unwrap();
        let t = c.theta("cats", today).unwrap().unwrap();
        assert_eq!(t.hashes().len(), 1);
        assert_eq!(
            theta_records(&db)
                .iter()
                .filter(|k| k.starts_with(&key("cats", today)))
                .count(),
            1,
            "the bad records were replaced by one full record"
        );
    }
}
