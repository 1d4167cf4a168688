//! The embedded bus: topics, partitions and consumer groups on the fjall database the store
//! shares, for one process.
//!
//! Keyspaces:
//! ```text
//! bus.log   topic_id:u32 partition:u32 base_offset:u64     -> a chunk: count:varint, then per
//!                                                             record ts:i64 key_len:varint key
//!                                                             value_len:varint value; or, once
//!                                                             compacted, 0x00 span:varint
//!                                                             count:varint, then per record
//!                                                             delta:varint and the same fields
//! bus.tidx  topic_id:u32 partition:u32 ts:u64 offset:u64   -> ()   (only records that raise the
//!                                                                   partition's max timestamp)
//! bus.meta  "t" name                                        -> topic_id:u32 partitions:u32
//!                                                             [flags:u8, 1 = compacted]
//!           "s" topic_id partition base_offset              -> bytes:u64 max_ts:i64 (a segment)
//!           "l" topic_id partition                          -> low offset:u64
//!           "g" group_len:u16 group topic_id partition      -> committed offset:u64
//!           "c" topic_id partition                          -> cleaned up to:u64 kept:u64
//!                                                             tombstones:u64 at:i64
//! ```
//! As Kafka stores record batches, a produce stores each partition's records as chunks of up to
//! 1000 records under the offset of their first record: one LSM entry per partition and batch,
//! not per record. A read seeks to the chunk holding its start offset and decodes forward.
//! Chunks of [`BLOB_THRESHOLD`] bytes or more live in fjall's blob files (key-value separation):
//! flushes write them once and LSM compactions move only their keys.
//! A produce writes its chunks, their index entries and segment totals in one atomic batch (fsynced
//! first when `fsync_interval_ms = 0`), keeps the chunks in the in-memory tail (see
//! [`crate::tail`]: reads near the end of a partition are served from there), then publishes the
//! new high offsets and wakes consumers. Retention deletes whole segments (never the newest) past
//! the age or size bound. Compacted topics are never deleted by age or size. A compaction of a
//! partition (when the records written since its last one reach both `compact_min_dirty_records`
//! and the number it kept then, Kafka's dirty ratio of one half) maps each key of that dirty part
//! to its newest offset, then rewrites the partition's chunks up to there without the records a
//! newer one of the same key replaces, and without tombstones (empty values) older than
//! `tombstone_retention_hours`. (Their segment totals count what was written, not what is kept: no
//! retention reads them.) Offsets never change: a compacted chunk stores each record's distance
//! from its base. Each rewrite batch removes old chunks and inserts the chunks holding their
//! survivors atomically, and readers read from a snapshot (or the tail, from which a compaction
//! drops what it rewrote), so a reader sees a chunk either whole before or whole after compaction.
//! `seek_group_to_time` uses the time index: the first record whose timestamp reaches the target
//! among records that raised the partition's maximum, as Kafka's time index does.
//!
//! Group membership lives in memory: members join and leave, each join or leave bumps the group's
//! generation and partitions are spread over members in order. A member sees a new generation at
//! its next poll; commits for partitions it no longer owns are dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{Keyspace, OwnedWriteBatch, PersistMode, Readable};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use dmp_core::clock::now_ms;
use dmp_core::config::BusConfig;
use dmp_core::partition::partition_for_key;
use dmp_store::embedded::EmbeddedDatabase;

use crate::metrics as m;
use crate::tail::{PartitionTail, Tails};
use crate::{
    Bus, BusError, Cleanup, Consumer, ConsumerHealth, Delivered, PartitionOffsets, ProduceRecord,
    Record, Result, TopicInfo, TopicPartition,
};

const LOG: &str = "bus.log";
/// Chunks of this many bytes or more are stored apart from the keys, in blob files.
const BLOB_THRESHOLD: u32 = 4096;
const TIDX: &str = "bus.tidx";
const META: &str = "bus.meta";

#[derive(Debug, Clone, Copy)]
struct Segment {
    bytes: u64,
    max_ts: i64,
}

#[derive(Debug)]
struct PartitionState {
    /// Next offset to be written.
    next: u64,
    /// First offset kept.
    low: u64,
    /// Highest timestamp written (for the time index).
    max_ts: i64,
    /// Retention segments by base offset.
    segments: BTreeMap<u64, Segment>,
    /// Compacted topics: offsets below this have been compacted.
    cleaned: u64,
    /// Compacted topics: records kept below `cleaned` after the last compaction.
    clean_kept: u64,
    /// Compacted topics: tombstones among them.
    clean_tombstones: u64,
    /// Compacted topics: when the last compaction ran, epoch ms.
    cleaned_at: i64,
}

impl PartitionState {
    fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }
}

struct Topic {
    id: u32,
    name: Arc<str>,
    /// Compacted (keep the newest record per key) rather than deleted by age and size.
    compacted: bool,
    partitions: Vec<Mutex<PartitionState>>,
    /// Published high offsets (readers never look past them).
    high: Vec<AtomicU64>,
    /// Each partition's newest chunks, in memory.
    tails: Vec<Arc<PartitionTail>>,
    /// Serialises produces to this topic so offsets are assigned in commit order.
    produce_lock: Mutex<()>,
}

#[derive(Default)]
struct Group {
    generation: u64,
    /// member id -> subscribed topics, in join order.
    members: BTreeMap<u64, Vec<String>>,
}

struct Inner {
    db: EmbeddedDatabase,
    log: Keyspace,
    tidx: Keyspace,
    meta: Keyspace,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    groups: Mutex<HashMap<String, Group>>,
    next_member: AtomicU64,
    notify: Notify,
    cfg: BusConfig,
    /// One compaction at a time.
    compaction: Mutex<()>,
    /// The budget of the partitions' tails.
    tails: Tails,
}

/// The embedded bus. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

fn log_key(tid: u32, p: u32, offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&tid.to_be_bytes());
    k[4..8].copy_from_slice(&p.to_be_bytes());
    k[8..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn part_prefix(tid: u32, p: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&tid.to_be_bytes());
    k[4..].copy_from_slice(&p.to_be_bytes());
    k
}

fn tidx_key(tid: u32, p: u32, ts: i64, offset: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&part_prefix(tid, p));
    k[8..16].copy_from_slice(&(ts.max(0) as u64).to_be_bytes());
    k[16..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn meta_key(tag: u8, tid: u32, p: u32, extra: Option<u64>) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(&part_prefix(tid, p));
    if let Some(e) = extra {
        k.extend_from_slice(&e.to_be_bytes());
    }
    k
}

fn group_key(group: &str, tid: u32, p: u32) -> Vec<u8> {
    let mut k = vec![b'g'];
    k.extend_from_slice(&(group.len() as u16).to_be_bytes());
    k.extend_from_slice(group.as_bytes());
    k.extend_from_slice(&part_prefix(tid, p));
    k
}

fn be_u64(b: &[u8]) -> Result<u64> {
    b.get(..8)
        .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| BusError::Corrupt("short integer".into()))
}

/// Most records in one stored chunk.
const CHUNK_RECORDS: usize = 1000;

/// Most distinct keys one compaction pass maps (the rest waits for the next pass).
const MAX_DIRTY: usize = 2_000_000;

fn encode_chunk(records: &[(i64, &ProduceRecord)]) -> Vec<u8> {
    let size: usize = records
        .iter()
        .map(|(_, r)| 8 + 10 + r.key.len() + r.value.len())
        .sum();
    let mut out = Vec::with_capacity(5 + size);
    dmp_store::codec::put_varint(&mut out, records.len() as u64);
    for (ts, r) in records {
        out.extend_from_slice(&ts.to_be_bytes());
        dmp_store::codec::put_varint(&mut out, r.key.len() as u64);
        out.extend_from_slice(&r.key);
        dmp_store::codec::put_varint(&mut out, r.value.len() as u64);
        out.extend_from_slice(&r.value);
    }
    out
}

/// A compacted chunk: records with their distance from the chunk's base offset.
fn encode_sparse_chunk(base: u64, records: &[(u64, i64, &[u8], &[u8])]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| 8 + 20 + r.2.len() + r.3.len()).sum();
    let mut out = Vec::with_capacity(11 + size);
    out.push(0);
    let span = records.last().map_or(0, |r| r.0 - base + 1);
    dmp_store::codec::put_varint(&mut out, span);
    dmp_store::codec::put_varint(&mut out, records.len() as u64);
    for (offset, ts, key, value) in records {
        dmp_store::codec::put_varint(&mut out, offset - base);
        out.extend_from_slice(&ts.to_be_bytes());
        dmp_store::codec::put_varint(&mut out, key.len() as u64);
        out.extend_from_slice(key);
        dmp_store::codec::put_varint(&mut out, value.len() as u64);
        out.extend_from_slice(value);
    }
    out
}

/// A chunk's header: the offsets it spans from its base, the records it holds, and where its
/// records start. A written chunk has at least one record, so a leading 0 marks a compacted one.
fn chunk_header(mut buf: &[u8]) -> Result<(u64, u64, bool, &[u8])> {
    let first = dmp_store::codec::get_varint(&mut buf).map_err(BusError::Corrupt)?;
    if first != 0 {
        return Ok((first, first, false, buf));
    }
    let span = dmp_store::codec::get_varint(&mut buf).map_err(BusError::Corrupt)?;
    let count = dmp_store::codec::get_varint(&mut buf).map_err(BusError::Corrupt)?;
    Ok((span, count, true, buf))
}

/// Decodes a chunk, calling `f(index, ts, key, value)` for each record, where `index` is the
/// record's distance from the chunk's base offset; `f` returns false to stop.
fn decode_chunk(buf: &[u8], mut f: impl FnMut(u64, i64, &[u8], &[u8]) -> bool) -> Result<()> {
    let (_, count, sparse, mut buf) = chunk_header(buf)?;
    let truncated = || BusError::Corrupt("truncated record in chunk".into());
    for i in 0..count {
        let i = if sparse {
            dmp_store::codec::get_varint(&mut buf).map_err(BusError::Corrupt)?
        } else {
            i
        };
        if buf.len() < 8 {
            return Err(truncated());
        }
        let ts = i64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
        buf = &buf[8..];
        let klen = dmp_store::codec::get_varint(&mut buf).map_err(BusError::Corrupt)? as usize;
        if buf.len() < klen {
            return Err(truncated());
        }
        let (key, rest) = buf.split_at(klen);
        buf = rest;
        let vlen = dmp_store::codec::get_varint(&mut buf).map_err(BusError::Corrupt)? as usize;
        if buf.len() < vlen {
            return Err(truncated());
        }
        let (value, rest) = buf.split_at(vlen);
        buf = rest;
        if !f(i, ts, key, value) {
            break;
        }
    }
    Ok(())
}

impl EmbeddedBus {
    /// Opens the bus's keyspaces in the shared database and recovers every topic's offsets.
    pub fn open(db: &EmbeddedDatabase, cfg: &BusConfig) -> Result<EmbeddedBus> {
        let log = db.keyspace_with(LOG, |o| {
            o.with_kv_separation(Some(
                fjall::KvSeparationOptions::default().separation_threshold(BLOB_THRESHOLD),
            ))
        })?;
        let tidx = db.keyspace(TIDX)?;
        let meta = db.keyspace(META)?;
        let inner = Inner {
            db: db.clone(),
            log,
            tidx,
            meta,
            topics: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(1),
            notify: Notify::new(),
            cfg: cfg.clone(),
            compaction: Mutex::new(()),
            tails: Tails::new((cfg.tail_cache_mb as usize).saturating_mul(1 << 20)),
        };
        let bus = EmbeddedBus {
            inner: Arc::new(inner),
        };
        bus.recover()?;
        Ok(bus)
    }

    fn recover(&self) -> Result<()> {
        let inner = &self.inner;
        let mut topics = inner.topics.write();
        for kv in inner.meta.prefix(b"t") {
            let (k, v) = kv.into_inner()?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            if v.len() != 8 && v.len() != 9 {
                return Err(BusError::Corrupt(format!("topic entry of {name:?}")));
            }
            let id = u32::from_be_bytes(v[..4].try_into().expect("4 bytes"));
            let n = u32::from_be_bytes(v[4..8].try_into().expect("4 bytes"));
            let compacted = v.get(8).is_some_and(|f| f & 1 == 1);
            let mut parts = Vec::with_capacity(n as usize);
            let mut high = Vec::with_capacity(n as usize);
            for p in 0..n {
                let low = match inner.meta.get(meta_key(b'l', id, p, None))? {
                    Some(v) => be_u64(&v)?,
                    None => 0,
                };
                let next = match inner.log.prefix(part_prefix(id, p)).next_back() {
                    Some(kv) => {
                        let (k, v) = kv.into_inner()?;
                        be_u64(&k[8..])? + chunk_header(&v)?.0
                    }
                    None => low,
                }
                .max(low);
                let max_ts = match inner.tidx.prefix(part_prefix(id, p)).next_back() {
                    Some(kv) => be_u64(&kv.key()?[8..16])? as i64,
                    None => i64::MIN,
                };
                let mut segments = BTreeMap::new();
                for kv in inner.meta.prefix(meta_key(b's', id, p, None)) {
                    let (k, v) = kv.into_inner()?;
                    let base = be_u64(&k[9..])?;
                    if v.len() != 16 {
                        return Err(BusError::Corrupt("segment entry".into()));
                    }
                    segments.insert(
                        base,
                        Segment {
                            bytes: be_u64(&v[..8])?,
                            max_ts: be_u64(&v[8..])? as i64,
                        },
                    );
                }
                let (cleaned, clean_kept, clean_tombstones, cleaned_at) =
                    match inner.meta.get(meta_key(b'c', id, p, None))? {
                        Some(v) if v.len() == 32 => (
                            be_u64(&v[..8])?,
                            be_u64(&v[8..16])?,
                            be_u64(&v[16..24])?,
                            be_u64(&v[24..])? as i64,
                        ),
                        Some(_) => return Err(BusError::Corrupt("compaction entry".into())),
                        None => (0, 0, 0, 0),
                    };
                parts.push(Mutex::new(PartitionState {
                    next,
                    low,
                    max_ts,
                    segments,
                    cleaned,
                    clean_kept,
                    clean_tombstones,
                    cleaned_at,
                }));
                high.push(AtomicU64::new(next));
            }
            topics.insert(
                name.clone(),
                Arc::new(Topic {
                    id,
                    name: name.into(),
                    compacted,
                    tails: (0..n).map(|_| Arc::default()).collect(),
                    partitions: parts,
                    high,
                    produce_lock: Mutex::new(()),
                }),
            );
        }
        Ok(())
    }

    /// Bytes of produced chunks held in memory for reads at the tail (`bus.tail_cache_mb`).
    pub fn tail_bytes(&self) -> usize {
        self.inner.tails.bytes()
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.inner
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BusError::UnknownTopic(name.to_string()))
    }

    fn produce_sync(&self, topic: &str, records: Vec<ProduceRecord>) -> Result<Vec<Delivered>> {
        let t = self.topic(topic)?;
        let inner = &self.inner;
        let n = t.partitions.len() as u32;
        let now = now_ms();
        let seg_size = inner.cfg.segment_records;
        let _guard = t.produce_lock.lock();
        // Offsets are assigned from a snapshot of each partition, committed, then published.
        let mut next: Vec<u64> = t.partitions.iter().map(|p| p.lock().next).collect();
        let mut max_ts: Vec<i64> = t.partitions.iter().map(|p| p.lock().max_ts).collect();
        let mut seg_updates: BTreeMap<(u32, u64), Segment> = BTreeMap::new();
        let mut batch = inner
            .db
            .db()
            .batch()
            .durability(inner.db.batch_durability());
        let mut delivered = vec![
            Delivered {
                partition: 0,
                offset: 0
            };
            records.len()
        ];
        let mut bytes = 0u64;
        // The chunks for the tails, by partition in offset order.
        let mut chunks: Vec<(Arc<PartitionTail>, u64, bytes::Bytes)> = Vec::new();
        // Records of each partition, in input order.
        let mut by_partition: Vec<Vec<usize>> = vec![Vec::new(); n as usize];
        for (i, r) in records.iter().enumerate() {
            by_partition[partition_for_key(&r.key, n) as usize].push(i);
        }
        for (p, idxs) in by_partition.iter().enumerate() {
            for chunk in idxs.chunks(CHUNK_RECORDS) {
                let base = next[p];
                let mut stamped = Vec::with_capacity(chunk.len());
                let mut chunk_bytes = 0u64;
                let mut chunk_max_ts = i64::MIN;
                for (j, &i) in chunk.iter().enumerate() {
                    let r = &records[i];
                    let offset = base + j as u64;
                    let ts = r.timestamp.unwrap_or(now);
                    chunk_bytes += (r.key.len() + r.value.len()) as u64;
                    chunk_max_ts = chunk_max_ts.max(ts);
                    if ts > max_ts[p] {
                        max_ts[p] = ts;
                        batch.insert(
                            &inner.tidx,
                            tidx_key(t.id, p as u32, ts, offset),
                            Vec::<u8>::new(),
                        );
                    }
                    delivered[i] = Delivered {
                        partition: p as u32,
                        offset,
                    };
                    stamped.push((ts, r));
                }
                let value = bytes::Bytes::from(encode_chunk(&stamped));
                batch.insert(&inner.log, log_key(t.id, p as u32, base), value.clone());
                chunks.push((t.tails[p].clone(), base, value));
                next[p] += chunk.len() as u64;
                bytes += chunk_bytes;
                let seg_base = base - base % seg_size;
                let seg = seg_updates.entry((p as u32, seg_base)).or_insert_with(|| {
                    t.partitions[p]
                        .lock()
                        .segments
                        .get(&seg_base)
                        .copied()
                        .unwrap_or(Segment {
                            bytes: 0,
                            max_ts: i64::MIN,
                        })
                });
                seg.bytes += chunk_bytes;
                seg.max_ts = seg.max_ts.max(chunk_max_ts);
            }
        }
        for ((p, base), seg) in &seg_updates {
            let mut v = Vec::with_capacity(16);
            v.extend_from_slice(&seg.bytes.to_be_bytes());
            v.extend_from_slice(&seg.max_ts.to_be_bytes());
            batch.insert(&inner.meta, meta_key(b's', t.id, *p, Some(*base)), v);
        }
        batch.commit()?;
        // In the tails before the offsets are published: a reader that sees them finds them.
        inner.tails.push(chunks);
        for (p, part) in t.partitions.iter().enumerate() {
            let mut st = part.lock();
            st.next = next[p];
            st.max_ts = max_ts[p];
            for ((sp, base), seg) in &seg_updates {
                if *sp as usize == p {
                    st.segments.insert(*base, *seg);
                }
            }
            t.high[p].store(next[p], Ordering::Release);
        }
        drop(_guard);
        inner.notify.notify_waiters();
        metrics::counter!(m::PRODUCED_RECORDS, "backend" => "embedded")
            .increment(records.len() as u64);
        metrics::counter!(m::PRODUCED_BYTES, "backend" => "embedded").increment(bytes);
        Ok(delivered)
    }

    /// The key of the chunk holding `offset`: the last one whose base offset is at or before it
    /// (the key `offset` would have when there is none).
    fn chunk_holding(
        &self,
        snap: &fjall::Snapshot,
        tid: u32,
        p: u32,
        offset: u64,
    ) -> Result<Vec<u8>> {
        match snap
            .range(
                &self.inner.log,
                log_key(tid, p, 0)..=log_key(tid, p, offset),
            )
            .next_back()
        {
            Some(kv) => Ok(kv.key()?.to_vec()),
            None => Ok(log_key(tid, p, offset).to_vec()),
        }
    }

    /// Reads up to `max` records of one partition from `from`; returns the next position.
    fn read(&self, t: &Topic, p: u32, from: u64, max: usize, out: &mut Vec<Record>) -> Result<u64> {
        let high = t.high[p as usize].load(Ordering::Acquire);
        let low = t.partitions[p as usize].lock().low;
        let from = from.max(low);
        if from >= high || max == 0 {
            return Ok(from);
        }
        let mut pos = from;
        let mut taken = 0usize;
        // One allocation for the whole poll: growing record by record reallocates (and copies)
        // the vector a dozen times, each time into fresh memory the kernel must zero.
        out.reserve((high - from).min(max as u64) as usize);
        let mut take = |base: u64, chunk: &[u8]| -> Result<bool> {
            decode_chunk(chunk, |i, ts, key, value| {
                let offset = base + i;
                if offset < pos {
                    return true;
                }
                if offset >= high || taken >= max {
                    return false;
                }
                out.push(Record {
                    topic: t.name.clone(),
                    partition: p,
                    offset,
                    timestamp: ts,
                    key: key.to_vec(),
                    value: value.to_vec(),
                });
                taken += 1;
                pos = offset + 1;
                true
            })?;
            Ok(taken < max)
        };
        if let Some(chunks) = t.tails[p as usize].read(from, high) {
            metrics::counter!(m::TAIL_READS, "source" => "memory").increment(1);
            for (base, chunk) in chunks {
                if !take(base, &chunk)? {
                    break;
                }
            }
        } else {
            metrics::counter!(m::TAIL_READS, "source" => "database").increment(1);
            self.read_stored(t, p, from, high, &mut take)?;
        }
        if taken < max {
            // Everything below `high` was read: on a compacted topic the rest are gaps.
            pos = high;
        }
        Ok(pos)
    }

    /// Passes the stored chunks of a partition from the one holding `from` to `take(base,
    /// chunk)`, until it returns false or the chunks before `high` are done.
    fn read_stored(
        &self,
        t: &Topic,
        p: u32,
        from: u64,
        high: u64,
        take: &mut impl FnMut(u64, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        // One snapshot for the whole read: a compaction replaces chunks while we read.
        let snap = self.inner.db.db().snapshot();
        let end = log_key(t.id, p, high).to_vec();
        // A read mostly starts where a chunk starts (where the last read, or a produce, ended), and
        // a forward range from `from` finds that chunk first. Otherwise the chunk holding `from`
        // is found backwards, which costs more: a reverse range over the partition's tables (at
        // 30K events/s, 3% of the process's CPU when every read did it).
        let mut chunks = snap.range(
            &self.inner.log,
            log_key(t.id, p, from).to_vec()..end.clone(),
        );
        let mut first = None;
        if let Some(kv) = chunks.next() {
            let (k, v) = kv.into_inner_if(|k| k.len() == 16 && k[8..] == from.to_be_bytes())?;
            first = v.map(|v| (k, v));
        }
        if first.is_none() {
            let start = self.chunk_holding(&snap, t.id, p, from)?;
            chunks = snap.range(&self.inner.log, start..end);
        }
        let chunks = first
            .into_iter()
            .map(Ok)
            .chain(chunks.map(|kv| kv.into_inner()));
        for kv in chunks {
            let (k, v) = kv?;
            if !take(be_u64(&k[8..])?, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Applies retention now: deletes whole segments (never the newest one of a partition) older
    /// than `retention_hours` or beyond `retention_bytes`. Returns the records deleted.
    pub fn enforce_retention(&self, now: i64) -> Result<u64> {
        let topics: Vec<Arc<Topic>> = self.inner.topics.read().values().cloned().collect();
        let max_age = self.inner.cfg.retention_hours as i64 * 3_600_000;
        let mut deleted = 0;
        for t in topics.into_iter().filter(|t| !t.compacted) {
            for p in 0..t.partitions.len() as u32 {
                loop {
                    let victim = {
                        let st = t.partitions[p as usize].lock();
                        if st.segments.len() < 2 {
                            None
                        } else {
                            let (&base, seg) = st.segments.iter().next().expect("len >= 2");
                            let next_base = *st.segments.keys().nth(1).expect("len >= 2");
                            let too_old = seg.max_ts < now - max_age;
                            let too_big = st.bytes() > self.inner.cfg.retention_bytes;
                            (too_old || too_big).then_some((base, next_base))
                        }
                    };
                    let Some((base, next_base)) = victim else {
                        break;
                    };
                    deleted += self.delete_segment(&t, p, base, next_base)?;
                }
            }
        }
        if deleted > 0 {
            metrics::counter!(m::RETENTION_DELETED_RECORDS).increment(deleted);
        }
        Ok(deleted)
    }

    fn delete_segment(&self, t: &Topic, p: u32, base: u64, next_base: u64) -> Result<u64> {
        let inner = &self.inner;
        // Chunks are assigned to the segment of their first offset; the new low is the first
        // offset of the next segment's first chunk.
        let new_low = match inner
            .log
            .range(log_key(t.id, p, next_base)..log_key(t.id, p, u64::MAX))
            .next()
        {
            Some(kv) => be_u64(&kv.key()?[8..])?,
            None => next_base,
        };
        // Raise `low` first (durably), so readers skip what is being deleted.
        inner.meta.insert(
            meta_key(b'l', t.id, p, None),
            new_low.to_be_bytes().to_vec(),
        )?;
        t.partitions[p as usize].lock().low = new_low;
        inner.tails.drop_below(&t.tails[p as usize], new_low);
        let mut deleted = 0u64;
        let mut batch = inner.db.db().batch();
        for kv in inner
            .log
            .range(log_key(t.id, p, base)..log_key(t.id, p, next_base))
        {
            let (k, v) = kv.into_inner()?;
            deleted += chunk_header(&v)?.1;
            batch.remove(&inner.log, k);
            if batch.len() >= 10_000 {
                std::mem::replace(&mut batch, inner.db.db().batch()).commit()?;
            }
        }
        for kv in inner.tidx.prefix(part_prefix(t.id, p)) {
            let k = kv.key()?;
            if be_u64(&k[16..])? >= new_low {
                break;
            }
            batch.remove(&inner.tidx, k);
        }
        batch.remove(&inner.meta, meta_key(b's', t.id, p, Some(base)));
        batch.commit()?;
        t.partitions[p as usize].lock().segments.remove(&base);
        Ok(deleted)
    }

    /// Starts a background thread that applies retention and compaction every `every` until the
    /// bus is dropped.
    pub fn spawn_retention(&self, every: Duration) {
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("dmp-bus-retention".into())
            .spawn(move || {
                // Background work, like the database's own flushes and compactions.
                if let Some(inner) = weak.upgrade() {
                    inner.db.lower_to_background_priority();
                }
                loop {
                    std::thread::sleep(every);
                    let Some(inner) = weak.upgrade() else { break };
                    let bus = EmbeddedBus { inner };
                    if let Err(e) = bus.enforce_retention(now_ms()) {
                        tracing::error!(error = %e, "bus retention failed");
                    }
                    if let Err(e) = bus.compact(now_ms(), false) {
                        tracing::error!(error = %e, "bus compaction failed");
                    }
                }
            })
            .expect("spawning a thread");
    }

    /// Compacts every partition of every compacted topic that is due (all of them with `force`):
    /// see the module documentation. A partition is also due when its last compaction kept
    /// tombstones and ran longer ago than their retention. Returns the records removed.
    pub fn compact(&self, now: i64, force: bool) -> Result<u64> {
        let _one = self.inner.compaction.lock();
        let topics: Vec<Arc<Topic>> = self.inner.topics.read().values().cloned().collect();
        let mut removed = 0;
        for t in topics.into_iter().filter(|t| t.compacted) {
            for p in 0..t.partitions.len() as u32 {
                let high = t.high[p as usize].load(Ordering::Acquire);
                let (cleaned, kept, tombstones, at) = {
                    let st = t.partitions[p as usize].lock();
                    (
                        st.cleaned,
                        st.clean_kept,
                        st.clean_tombstones,
                        st.cleaned_at,
                    )
                };
                let dirty = high.saturating_sub(cleaned);
                let due = dirty >= self.inner.cfg.compact_min_dirty_records && dirty >= kept;
                let retention = self.inner.cfg.tombstone_retention_hours as i64 * 3_600_000;
                let expiring = tombstones > 0 && now.saturating_sub(at) >= retention;
                if force || due || expiring {
                    removed += self.compact_partition(&t, p, now)?;
                }
            }
        }
        if removed > 0 {
            metrics::counter!(m::COMPACTED_RECORDS).increment(removed);
        }
        Ok(removed)
    }

    /// Compacts one partition up to a bounded dirty part; returns the records removed.
    fn compact_partition(&self, t: &Topic, p: u32, now: i64) -> Result<u64> {
        let inner = &self.inner;
        let started = Instant::now();
        let snap = inner.db.db().snapshot();
        let high = t.high[p as usize].load(Ordering::Acquire);
        let cleaned = t.partitions[p as usize].lock().cleaned;
        let tombstone_before =
            now.saturating_sub(inner.cfg.tombstone_retention_hours as i64 * 3_600_000);
        // 1. The newest offset of each key written since the last compaction, over whole chunks
        // of at most MAX_DIRTY records, so the map's memory is bounded.
        let mut newest: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut end = cleaned;
        let first = self.chunk_holding(&snap, t.id, p, cleaned)?;
        for kv in snap.range(&inner.log, first..log_key(t.id, p, high).to_vec()) {
            let (k, v) = kv.into_inner()?;
            let base = be_u64(&k[8..])?;
            let span = chunk_header(&v)?.0;
            decode_chunk(&v, |i, _, key, _| {
                if base + i >= cleaned {
                    newest.insert(key.to_vec(), base + i);
                }
                true
            })?;
            end = base + span;
            if newest.len() >= MAX_DIRTY {
                break;
            }
        }
        let end = end.max(cleaned);
        // 2. Rewrite every chunk below `end`: survivors are regrouped into chunks of up to
        // CHUNK_RECORDS. Each batch replaces whole old chunks with the chunks of their survivors
        // (a key both removed and rewritten is only written: one batch must not do both).
        let mut old_keys: Vec<Vec<u8>> = Vec::new();
        let mut new_chunks: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut pending: Vec<(u64, i64, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut removed = 0u64;
        let mut kept = 0u64;
        let mut tombstones = 0u64;
        let regroup = |pending: &mut Vec<(u64, i64, Vec<u8>, Vec<u8>)>,
                       upto: usize,
                       new_chunks: &mut BTreeMap<Vec<u8>, Vec<u8>>| {
            for group in pending[..upto].chunks(CHUNK_RECORDS) {
                let base = group[0].0;
                let refs: Vec<(u64, i64, &[u8], &[u8])> = group
                    .iter()
                    .map(|(o, ts, k, v)| (*o, *ts, k.as_slice(), v.as_slice()))
                    .collect();
                new_chunks.insert(
                    log_key(t.id, p, base).to_vec(),
                    encode_sparse_chunk(base, &refs),
                );
            }
            pending.drain(..upto);
        };
        let write = |old_keys: &mut Vec<Vec<u8>>,
                     new_chunks: &mut BTreeMap<Vec<u8>, Vec<u8>>|
         -> OwnedWriteBatch {
            let mut batch = inner.db.db().batch();
            for k in old_keys.drain(..) {
                if !new_chunks.contains_key(&k) {
                    batch.remove(&inner.log, k);
                }
            }
            for (k, v) in std::mem::take(new_chunks) {
                batch.insert(&inner.log, k, v);
            }
            batch
        };
        for kv in snap.range(&inner.log, log_key(t.id, p, 0)..log_key(t.id, p, end)) {
            let (k, v) = kv.into_inner()?;
            let base = be_u64(&k[8..])?;
            old_keys.push(k.to_vec());
            decode_chunk(&v, |i, ts, key, value| {
                let offset = base + i;
                let replaced = newest.get(key).is_some_and(|&n| n > offset);
                let expired_tombstone = value.is_empty() && ts < tombstone_before;
                if replaced || expired_tombstone {
                    removed += 1;
                } else {
                    kept += 1;
                    tombstones += value.is_empty() as u64;
                    pending.push((offset, ts, key.to_vec(), value.to_vec()));
                }
                true
            })?;
            // Commit only at old-chunk boundaries, with every survivor of those chunks written.
            if old_keys.len() >= 256 {
                let all = pending.len();
                regroup(&mut pending, all, &mut new_chunks);
                write(&mut old_keys, &mut new_chunks).commit()?;
            } else if pending.len() >= CHUNK_RECORDS {
                let full = pending.len() - pending.len() % CHUNK_RECORDS;
                regroup(&mut pending, full, &mut new_chunks);
            }
        }
        let all = pending.len();
        regroup(&mut pending, all, &mut new_chunks);
        let mut batch = write(&mut old_keys, &mut new_chunks);
        let mut c = end.to_be_bytes().to_vec();
        c.extend_from_slice(&kept.to_be_bytes());
        c.extend_from_slice(&tombstones.to_be_bytes());
        c.extend_from_slice(&now.to_be_bytes());
        batch.insert(&inner.meta, meta_key(b'c', t.id, p, None), c);
        batch.commit()?;
        {
            let mut st = t.partitions[p as usize].lock();
            st.cleaned = end;
            st.clean_kept = kept;
            st.clean_tombstones = tombstones;
            st.cleaned_at = now;
        }
        // Reads of the rewritten offsets go to the database, and see what compaction kept.
        inner.tails.drop_below(&t.tails[p as usize], end);
        tracing::debug!(
            topic = %t.name, partition = p, end, kept, removed,
            took_ms = started.elapsed().as_millis() as u64, "compacted"
        );
        Ok(removed)
    }

    fn committed_sync(&self, group: &str, t: &Topic, p: u32) -> Result<Option<u64>> {
        match self.inner.meta.get(group_key(group, t.id, p))? {
            Some(v) => Ok(Some(be_u64(&v)?)),
            None => Ok(None),
        }
    }

    fn offsets_for_time_sync(&self, t: &Topic, ts: i64) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(t.partitions.len());
        for p in 0..t.partitions.len() as u32 {
            let high = t.high[p as usize].load(Ordering::Acquire);
            let low = t.partitions[p as usize].lock().low;
            let upper = part_prefix(t.id, p + 1);
            let found = self
                .inner
                .tidx
                .range(tidx_key(t.id, p, ts, 0).to_vec()..upper.to_vec())
                .next();
            let off = match found {
                Some(kv) => be_u64(&kv.key()?[16..])?.max(low),
                None => high,
            };
            out.push(off.min(high));
        }
        Ok(out)
    }

    fn commit_sync(&self, group: &str, offsets: &[(Arc<Topic>, u32, u64)]) -> Result<()> {
        let inner = &self.inner;
        let mut batch = inner
            .db
            .db()
            .batch()
            .durability(inner.db.batch_durability());
        for (t, p, off) in offsets {
            batch.insert(
                &inner.meta,
                group_key(group, t.id, *p),
                off.to_be_bytes().to_vec(),
            );
        }
        batch.commit()?;
        Ok(())
    }

    /// Makes everything acknowledged durable on disk now.
    pub fn sync(&self) -> Result<()> {
        self.inner.db.db().persist(PersistMode::SyncData)?;
        Ok(())
    }

    fn assignment_for(&self, group: &str, member: u64) -> (u64, Vec<(Arc<Topic>, u32)>) {
        let groups = self.inner.groups.lock();
        let Some(g) = groups.get(group) else {
            return (0, Vec::new());
        };
        let topics = self.inner.topics.read();
        // Every (topic, partition) any member subscribes to, spread round-robin over the members
        // subscribed to that topic, in member order.
        let mut subscribed: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (id, ts) in &g.members {
            for t in ts {
                subscribed.entry(t.as_str()).or_default().push(*id);
            }
        }
        let mut mine = Vec::new();
        for (name, members) in subscribed {
            let Some(t) = topics.get(name) else { continue };
            for p in 0..t.partitions.len() as u32 {
                if members[p as usize % members.len()] == member {
                    mine.push((t.clone(), p));
                }
            }
        }
        (g.generation, mine)
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        cleanup: Cleanup,
    ) -> Result<bool> {
        dmp_core::config::check_topic_name("topic", name)
            .map_err(|e| BusError::Rejected(e.to_string()))?;
        if partitions == 0 || partitions > 1024 {
            return Err(BusError::Rejected(format!(
                "a topic has 1 to 1024 partitions, not {partitions}"
            )));
        }
        let mut topics = self.inner.topics.write();
        if topics.contains_key(name) {
            return Ok(false);
        }
        let id = topics.values().map(|t| t.id + 1).max().unwrap_or(1);
        let compacted = cleanup == Cleanup::Compact;
        let mut v = id.to_be_bytes().to_vec();
        v.extend_from_slice(&partitions.to_be_bytes());
        if compacted {
            v.push(1);
        }
        let mut key = vec![b't'];
        key.extend_from_slice(name.as_bytes());
        self.inner.meta.insert(key, v)?;
        self.inner.db.db().persist(PersistMode::SyncData)?;
        topics.insert(
            name.to_string(),
            Arc::new(Topic {
                id,
                name: name.into(),
                compacted,
                partitions: (0..partitions)
                    .map(|_| {
                        Mutex::new(PartitionState {
                            next: 0,
                            low: 0,
                            max_ts: i64::MIN,
                            segments: BTreeMap::new(),
                            cleaned: 0,
                            clean_kept: 0,
                            clean_tombstones: 0,
                            cleaned_at: 0,
                        })
                    })
                    .collect(),
                high: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
                tails: (0..partitions).map(|_| Arc::default()).collect(),
                produce_lock: Mutex::new(()),
            }),
        );
        // Members subscribed before the topic existed now get its partitions.
        for g in self.inner.groups.lock().values_mut() {
            if g.members.values().any(|ts| ts.iter().any(|t| t == name)) {
                g.generation += 1;
            }
        }
        Ok(true)
    }

    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        let mut out: Vec<TopicInfo> = self
            .inner
            .topics
            .read()
            .values()
            .map(|t| TopicInfo {
                name: t.name.to_string(),
                partitions: t.partitions.len() as u32,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn produce(&self, topic: &str, records: Vec<ProduceRecord>) -> Result<Vec<Delivered>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let bus = self.clone();
        let topic_owned = topic.to_string();
        // A fsync per batch blocks: keep it off the async workers.
        let r = if self.inner.db.sync_each_batch() {
            tokio::task::spawn_blocking(move || bus.produce_sync(&topic_owned, records))
                .await
                .map_err(|e| BusError::Backend(e.to_string()))?
        } else {
            bus.produce_sync(&topic_owned, records)
        };
        metrics::histogram!(m::PRODUCE_DURATION, "backend" => "embedded")
            .record(start.elapsed().as_secs_f64());
        if let Err(e) = &r {
            metrics::counter!(m::ERRORS, "backend" => "embedded", "kind" => e.kind().as_str())
                .increment(1);
        }
        r
    }

    async fn consumer(&self, group: &str, topics: &[String]) -> Result<Box<dyn Consumer>> {
        if group.is_empty() || group.len() > 255 {
            return Err(BusError::Rejected("a group id is 1 to 255 bytes".into()));
        }
        if topics.is_empty() {
            return Err(BusError::Rejected("subscribe to at least one topic".into()));
        }
        let id = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        {
            let mut groups = self.inner.groups.lock();
            let g = groups.entry(group.to_string()).or_default();
            g.members.insert(id, topics.to_vec());
            g.generation += 1;
        }
        Ok(Box::new(EmbeddedConsumer {
            bus: self.clone(),
            group: group.to_string(),
            member: id,
            generation: u64::MAX,
            owned: Vec::new(),
            positions: HashMap::new(),
            cursor: 0,
            closed: false,
        }))
    }

    async fn offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>> {
        let t = self.topic(topic)?;
        Ok((0..t.partitions.len() as u32)
            .map(|p| PartitionOffsets {
                partition: p,
                low: t.partitions[p as usize].lock().low,
                high: t.high[p as usize].load(Ordering::Acquire),
            })
            .collect())
    }

    async fn committed(&self, group: &str, topic: &str) -> Result<Vec<Option<u64>>> {
        let t = self.topic(topic)?;
        (0..t.partitions.len() as u32)
            .map(|p| self.committed_sync(group, &t, p))
            .collect()
    }

    async fn offsets_for_time(&self, topic: &str, ts_ms: i64) -> Result<Vec<u64>> {
        let t = self.topic(topic)?;
        self.offsets_for_time_sync(&t, ts_ms)
    }

    async fn commit_group(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<()> {
        let t = self.topic(topic)?;
        if let Some(g) = self.inner.groups.lock().get(group) {
            if !g.members.is_empty() {
                return Err(BusError::Rejected(format!(
                    "group {group:?} has {} live member(s); stop them before moving its offsets",
                    g.members.len()
                )));
            }
        }
        let mut commits = Vec::with_capacity(offsets.len());
        for &(p, o) in offsets {
            if p as usize >= t.partitions.len() {
                return Err(BusError::Rejected(format!(
                    "topic {topic:?} has no partition {p} (it has {})",
                    t.partitions.len()
                )));
            }
            commits.push((t.clone(), p, o));
        }
        self.commit_sync(group, &commits)
    }

    fn backend_name(&self) -> &'static str {
        "embedded"
    }
}

/// A member of an embedded consumer group.
pub struct EmbeddedConsumer {
    bus: EmbeddedBus,
    group: String,
    member: u64,
    generation: u64,
    owned: Vec<(Arc<Topic>, u32)>,
    positions: HashMap<(u32, u32), u64>,
    /// Round-robin start among owned partitions, so one busy partition cannot starve the others.
    cursor: usize,
    closed: bool,
}

impl EmbeddedConsumer {
    fn refresh_assignment(&mut self) -> Result<()> {
        let (generation, owned) = self.bus.assignment_for(&self.group, self.member);
        if generation == self.generation {
            return Ok(());
        }
        let mut positions = HashMap::new();
        for (t, p) in &owned {
            let key = (t.id, *p);
            let pos = match self.positions.get(&key) {
                Some(pos) => *pos,
                None => match self.bus.committed_sync(&self.group, t, *p)? {
                    Some(o) => o,
                    None => t.partitions[*p as usize].lock().low,
                },
            };
            positions.insert(key, pos);
        }
        if generation != 0 && !owned.is_empty() {
            metrics::counter!(m::REBALANCES, "backend" => "embedded", "event" => "assign")
                .increment(1);
        }
        self.generation = generation;
        self.owned = owned;
        self.positions = positions;
        Ok(())
    }

    fn try_read(&mut self, max: usize) -> Result<Vec<Record>> {
        let mut out = Vec::with_capacity(max.min(1024));
        let n = self.owned.len();
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let (t, p) = &self.owned[(self.cursor + i) % n];
            let key = (t.id, *p);
            let from = self.positions[&key];
            let pos = self.bus.read(t, *p, from, max - out.len(), &mut out)?;
            self.positions.insert(key, pos);
        }
        if n > 0 {
            self.cursor = (self.cursor + 1) % n;
        }
        Ok(out)
    }

    fn leave(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut groups = self.bus.inner.groups.lock();
        if let Some(g) = groups.get_mut(&self.group) {
            g.members.remove(&self.member);
            g.generation += 1;
        }
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>> {
        if self.closed {
            return Err(BusError::Closed);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let inner = self.bus.inner.clone();
        loop {
            let notified = inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.refresh_assignment()?;
            let out = self.try_read(max)?;
            if !out.is_empty() {
                metrics::counter!(m::CONSUMED_RECORDS, "backend" => "embedded")
                    .increment(out.len() as u64);
                return Ok(out);
            }
            // Wake on new records, and at least every 100 ms to see rebalances.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_millis(100));
            if tokio::time::timeout_at(wake, notified).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Ok(Vec::new());
            }
        }
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        let (_, owned) = self.bus.assignment_for(&self.group, self.member);
        owned
            .iter()
            .map(|(t, p)| TopicPartition::new(t.name.to_string(), *p))
            .collect()
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let (_, owned) = self.bus.assignment_for(&self.group, self.member);
        let commits: Vec<(Arc<Topic>, u32, u64)> = offsets
            .iter()
            .filter_map(|(tp, off)| {
                owned
                    .iter()
                    .find(|(t, p)| *t.name == *tp.topic && *p == tp.partition)
                    .map(|(t, p)| (t.clone(), *p, *off))
            })
            .collect();
        if commits.is_empty() {
            return Ok(());
        }
        if self.bus.inner.db.sync_each_batch() {
            let bus = self.bus.clone();
            let group = self.group.clone();
            tokio::task::spawn_blocking(move || bus.commit_sync(&group, &commits))
                .await
                .map_err(|e| BusError::Backend(e.to_string()))?
        } else {
            self.bus.commit_sync(&self.group, &commits)
        }
    }

    fn health(&self) -> ConsumerHealth {
        ConsumerHealth::default()
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.leave();
        Ok(())
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.leave();
    }
}
