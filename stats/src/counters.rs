//! Segment counters: one sketch per (segment, day) of the users evaluated in it.
//!
//! [`SegmentCounters`] is what the segmenter hands memberships to. [`EmbeddedCounters`] keeps the
//! sketches in memory, sharded over 16 locks so workers rarely meet, and flushes changed sketches
//! to the embedded database (keyspace `stats.hll`) every `flush()` call. A kill -9 loses at most
//! the updates since the last flush. HLL updates are idempotent, so the segmenter replaying a
//! change after a crash does not inflate a count.

use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;

use crate::hll::Hll;

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

#[derive(Default)]
struct Shard {
    /// segment -> day -> sketch (nested, so a lookup by `&str` allocates nothing).
    sketches: HashMap<Box<str>, HashMap<u32, Hll>, foldhash::fast::RandomState>,
    dirty: HashSet<(String, u32)>,
}

impl Shard {
    fn get(&self, segment: &str, day: u32) -> Option<&Hll> {
        self.sketches.get(segment)?.get(&day)
    }

    fn get_or_insert(&mut self, segment: &str, day: u32) -> &mut Hll {
        if !self.sketches.contains_key(segment) {
            self.sketches.insert(segment.into(), HashMap::new());
        }
        self.sketches
            .get_mut(segment)
            .expect("inserted above")
            .entry(day)
            .or_default()
    }

    fn keys(&self) -> Vec<(String, u32)> {
        self.sketches
            .iter()
            .flat_map(|(s, days)| days.keys().map(|d| (s.to_string(), *d)))
            .collect()
    }

    fn remove(&mut self, segment: &str, day: u32) {
        if let Some(days) = self.sketches.get_mut(segment) {
            days.remove(&day);
            if days.is_empty() {
                self.sketches.remove(segment);
            }
        }
    }
}

/// Counters kept in memory and flushed to the embedded database.
pub struct EmbeddedCounters {
    shards: Vec<Mutex<Shard>>,
    store: Option<(dmp_store::embedded::EmbeddedDatabase, fjall::Keyspace)>,
    /// Sketches of days older than this many days are dropped at flush (0: kept).
    retention_days: u32,
}

fn key(segment: &str, day: u32) -> Vec<u8> {
    let mut k = segment.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&day.to_be_bytes());
    k
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
        }
    }

    /// Drops sketches of days more than `days` before today at each flush.
    pub fn with_retention(mut self, days: u32) -> EmbeddedCounters {
        self.retention_days = days;
        self
    }

    /// Counters persisted in the embedded database; loads every stored sketch.
    pub fn open(
        db: &dmp_store::embedded::EmbeddedDatabase,
    ) -> Result<EmbeddedCounters, StatsError> {
        let ks = db.keyspace(KEYSPACE)?;
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
            *c.shards[shard_of(&segment)]
                .lock()
                .get_or_insert(&segment, day) = hll;
        }
        Ok(EmbeddedCounters {
            store: Some((db.clone(), ks)),
            ..c
        })
    }
}

impl SegmentCounters for EmbeddedCounters {
    fn record(&self, day: u32, uid: &str, segments: &[&str]) {
        for seg in segments.iter().copied().chain(std::iter::once(ALL)) {
            let mut shard = self.shards[shard_of(seg)].lock();
            if shard.get_or_insert(seg, day).add(uid.as_bytes()) {
                shard.dirty.insert((seg.to_string(), day));
            }
        }
    }

    fn count(&self, segment: &str, day: u32) -> Result<u64, StatsError> {
        Ok(self.shards[shard_of(segment)]
            .lock()
            .get(segment, day)
            .map_or(0, Hll::count))
    }

    fn sketch(&self, segment: &str, day: u32) -> Result<Option<Hll>, StatsError> {
        Ok(self.shards[shard_of(segment)]
            .lock()
            .get(segment, day)
            .cloned())
    }

    fn segments(&self) -> Result<Vec<(String, u32)>, StatsError> {
        let mut out: Vec<(String, u32)> =
            self.shards.iter().flat_map(|s| s.lock().keys()).collect();
        out.sort();
        Ok(out)
    }

    fn flush(&self) -> Result<(), StatsError> {
        let oldest = (self.retention_days > 0)
            .then(|| days_before(day_of(dmp_core::clock::now_ms()), self.retention_days));
        let mut expired = Vec::new();
        for shard in &self.shards {
            let mut s = shard.lock();
            if let Some(oldest) = oldest {
                let old: Vec<(String, u32)> =
                    s.keys().into_iter().filter(|(_, d)| *d < oldest).collect();
                for k in old {
                    s.remove(&k.0, k.1);
                    s.dirty.remove(&k);
                    expired.push(k);
                }
            }
        }
        let Some((db, ks)) = &self.store else {
            return Ok(());
        };
        let mut batch = db.db().batch().durability(db.batch_durability());
        for (seg, day) in expired {
            batch.remove(ks, key(&seg, day));
        }
        for shard in &self.shards {
            let mut s = shard.lock();
            let dirty: Vec<(String, u32)> = s.dirty.drain().collect();
            for k in dirty {
                if let Some(h) = s.get(&k.0, k.1) {
                    batch.insert(ks, key(&k.0, k.1), h.registers().to_vec());
                }
            }
        }
        batch.commit()?;
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
}
