//! The embedded store's cache of recently read rows, kept up to date by every write.
//!
//! A segmenter reads a user's whole row moments after the storage writer appended to it, and the
//! LSM range read of the row's base and deltas was most of the segmenter's CPU. The cache holds,
//! per row, the merged row as one packed value (the base a repack would write) plus the packed
//! values written since, so a read merges two or three buffers instead of iterating every LSM
//! table that may hold the row, and puts its merge back.
//!
//! **Coherence.** A cached entry is always the merge of every committed write of its row:
//! - a write commits to the LSM first, then, under the entry's shard lock, appends its packed
//!   cells to the entry (if the row is cached) and bumps the shard's generation;
//! - a read that misses notes the shard's generation *before* it reads the LSM and inserts what
//!   it read only if the generation has not moved. A write that the read's snapshot did not see
//!   either bumped the generation before the insert (nothing is inserted) or finds the inserted
//!   entry and appends itself to it;
//! - deleting a row removes its entry and bumps the generation the same way.
//!
//! The entry also lists the row's delta records and slots on disk (the slots with their
//! versions, which a slot write checks), so a repack writes the cached merged row as the new base
//! and removes exactly those deltas and slots, without reading the LSM.
//!
//! **Bounds.** The cache is split into [`SHARDS`] shards, each an LRU bounded in bytes (packed
//! values, the deltas' sequence numbers, slot keys and a fixed overhead per entry); a row larger
//! than an eighth of a shard is not cached. Values are copies in buffers of the cache's own, never
//! slices of LSM blocks.

use bytes::Bytes;
use parking_lot::Mutex;

/// Number of independently locked shards.
pub const SHARDS: usize = 256;
/// Bytes counted per entry beyond its buffers (map slot, LRU links, vectors).
const ENTRY_OVERHEAD: usize = 160;

/// One cached row.
pub(crate) struct Entry {
    /// The merged row, packed: cells in HBase order, one value per coordinate (a read applies
    /// TTL and versions again as of its time).
    pub base: Bytes,
    /// Packed cells of writes after `base` with their sequence numbers (the delta keys' order:
    /// a higher one wins a coordinate), in the order they were recorded.
    pub pending: Vec<(u64, Bytes)>,
    /// The sequence numbers of the row's delta records on disk (a delta's key is the row, `0x00
    /// 0x01` and its sequence number), in the order they were recorded.
    pub delta_seqs: Vec<u64>,
    /// The row's slots on disk: keys and versions (see `embedded`'s module doc).
    pub slots: Vec<(Vec<u8>, i64)>,
    /// Writes recorded since the entry was inserted.
    pub writes: u64,
    /// This copy of the row, among all the cache has held (for [`crate::ReadCursor`]).
    pub id: u64,
    /// How many of `writes` `base` holds: `pending` holds the rest, in the order recorded.
    pub folded: u64,
    /// Bytes of `pending`'s values (kept as they change, so sizing an entry does not walk it).
    pending_bytes: usize,
    /// Bytes counted for `slots` (kept as they change, so sizing an entry does not read them:
    /// a write of events would otherwise load the slots' list of every row it appends to).
    slot_bytes: usize,
}

impl Entry {
    fn bytes(&self, row: &str) -> usize {
        debug_assert_eq!(self.slot_bytes, slots_bytes(&self.slots));
        ENTRY_OVERHEAD
            + row.len()
            + self.base.len()
            + self.pending_bytes
            + self.pending.len() * std::mem::size_of::<(u64, Bytes)>()
            + self.delta_seqs.len() * 8
            + self.slot_bytes
    }
}

/// Bytes counted for one slot.
fn slot_bytes(key: &[u8]) -> usize {
    key.len() + 32
}

/// Bytes counted for a list of slots.
fn slots_bytes(slots: &[(Vec<u8>, i64)]) -> usize {
    slots.iter().map(|(k, _)| slot_bytes(k)).sum()
}

struct Shard {
    map: lru::LruCache<Box<str>, Entry>,
    bytes: usize,
    generation: u64,
}

/// What a cached read returns: the row's packed parts, and how many delta records it has on disk.
pub(crate) struct Cached {
    pub base: Bytes,
    pub pending: Vec<(u64, Bytes)>,
    pub deltas_on_disk: usize,
    /// The entry's write count, for [`RowCache::merged`].
    pub writes: u64,
    /// The entry's id: with `writes`, where a read of it left off ([`crate::ReadCursor`]).
    pub id: u64,
}

/// A cached row's writes after a cursor, for [`crate::UserStore::get_since`].
pub(crate) struct Since {
    /// Packed cells of each write after the cursor, with its sequence number.
    pub writes: Vec<(u64, Bytes)>,
    /// Where this leaves off.
    pub cursor: crate::ReadCursor,
}

/// Writes after a cursor beyond which [`RowCache::since`] answers none: the caller reads the row,
/// which folds them into the base (and lets a repack run).
pub(crate) const MAX_SINCE_WRITES: usize = 32;

/// What a repack from the cache writes and removes.
pub(crate) struct RepackPlan {
    /// The merged row, the new base.
    pub base: Bytes,
    /// The sequence numbers of the row's deltas on disk.
    pub delta_seqs: Vec<u64>,
    /// The row's slots on disk.
    pub slot_keys: Vec<Vec<u8>>,
}

/// The cache (see the module doc). Capacity 0 turns it off: every call is a no-op or a miss.
pub(crate) struct RowCache {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    /// The next entry's id.
    next_id: std::sync::atomic::AtomicU64,
}

impl RowCache {
    /// A cache of at most `capacity` bytes in all.
    pub fn new(capacity: usize) -> RowCache {
        let shards = if capacity == 0 { 0 } else { SHARDS };
        RowCache {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        map: lru::LruCache::unbounded(),
                        bytes: 0,
                        generation: 0,
                    })
                })
                .collect(),
            shard_capacity: capacity / SHARDS.max(1),
            next_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Whether the cache is on.
    pub fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    fn shard(&self, row: &str) -> &Mutex<Shard> {
        let h = dmp_core::partition::uid_hash(row.as_bytes());
        // The high bits: the low ones pick the store's lock stripe and the bus partition.
        &self.shards[(h >> 40) as usize % self.shards.len()]
    }

    /// The row's shard generation, to pass to [`RowCache::insert`] after reading the LSM.
    pub fn generation(&self, row: &str) -> u64 {
        if !self.enabled() {
            return 0;
        }
        self.shard(row).lock().generation
    }

    /// The cached row, most recently used now.
    pub fn get(&self, row: &str) -> Option<Cached> {
        if !self.enabled() {
            return None;
        }
        let mut shard = self.shard(row).lock();
        let e = shard.map.get(row)?;
        Some(Cached {
            base: e.base.clone(),
            pending: e.pending.clone(),
            deltas_on_disk: e.delta_seqs.len(),
            writes: e.writes,
            id: e.id,
        })
    }

    /// The writes of a cached row after `cursor`, if the cache still holds them apart: the same
    /// copy of the row (not evicted, deleted or read in again since), no read having folded
    /// writes after the cursor into the base, and at most [`MAX_SINCE_WRITES`] of them.
    pub fn since(&self, row: &str, cursor: crate::ReadCursor) -> Option<Since> {
        if !self.enabled() {
            return None;
        }
        let mut shard = self.shard(row).lock();
        let e = shard.map.get(row)?;
        if e.id != cursor.entry || e.folded > cursor.writes || cursor.writes > e.writes {
            return None;
        }
        let skip = (cursor.writes - e.folded) as usize;
        let new = e.pending.get(skip..)?;
        if new.len() > MAX_SINCE_WRITES {
            return None;
        }
        Some(Since {
            writes: new.to_vec(),
            cursor: crate::ReadCursor {
                entry: e.id,
                writes: e.writes,
            },
        })
    }

    /// Caches a row read from the LSM when no write or delete touched its shard since
    /// `generation` was taken (before the read). `base` must be a buffer of its own. Returns
    /// the new entry's id when it was cached.
    pub fn insert(
        &self,
        row: &str,
        generation: u64,
        base: Bytes,
        delta_seqs: Vec<u64>,
        slots: Vec<(Vec<u8>, i64)>,
    ) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Entry {
            slot_bytes: slots_bytes(&slots),
            base,
            pending: Vec::new(),
            delta_seqs,
            slots,
            writes: 0,
            id,
            folded: 0,
            pending_bytes: 0,
        };
        let size = entry.bytes(row);
        if size > self.shard_capacity / 8 {
            return None;
        }
        let mut shard = self.shard(row).lock();
        if shard.generation != generation || shard.map.contains(row) {
            return None;
        }
        shard.map.put(row.into(), entry);
        shard.bytes += size;
        self.evict(&mut shard);
        // Evicted at once (a shard smaller than the row): nothing to say later.
        shard.map.contains(row).then_some(id)
    }

    /// Changes a cached row under its shard's lock, keeping the shard's byte count: a row grown
    /// past the size limit leaves the cache, and the shard is trimmed to its capacity. `write`
    /// (a committed write) moves the shard's generation first, cached row or not.
    fn update(&self, row: &str, write: bool, change: impl FnOnce(&mut Entry)) {
        if !self.enabled() {
            return;
        }
        let mut guard = self.shard(row).lock();
        let shard = &mut *guard;
        if write {
            shard.generation += 1;
        }
        let Some(e) = shard.map.peek_mut(row) else {
            return;
        };
        let before = e.bytes(row);
        change(e);
        let after = e.bytes(row);
        shard.bytes = shard.bytes + after - before;
        if after > self.shard_capacity / 8 {
            let gone = shard.map.pop(row).map(|e| e.bytes(row)).unwrap_or(0);
            shard.bytes -= gone;
        }
        self.evict(shard);
    }

    /// Records a committed write of packed `cells` as the delta of sequence `seq`.
    pub fn written(&self, row: &str, seq: u64, cells: Bytes) {
        self.update(row, true, |e| {
            e.pending_bytes += cells.len();
            e.pending.push((seq, cells));
            e.delta_seqs.push(seq);
            e.writes += 1;
        });
    }

    /// Records a committed slot write of packed `cell` (version `ts`, sequence `seq`) under slot
    /// key `key`: a write to merge like any other, that replaces the slot's version.
    pub fn written_slot(&self, row: &str, seq: u64, cell: Bytes, key: Vec<u8>, ts: i64) {
        self.update(row, true, |e| {
            e.pending_bytes += cell.len();
            e.pending.push((seq, cell));
            e.writes += 1;
            match e.slots.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = ts,
                None => {
                    e.slot_bytes += slot_bytes(&key);
                    e.slots.push((key, ts));
                }
            }
        });
    }

    /// The version in a cached row's slot `key`: `Some(None)` when the row is cached with no
    /// such slot, `None` when the row is not cached.
    pub fn slot_version(&self, row: &str, key: &[u8]) -> Option<Option<i64>> {
        if !self.enabled() {
            return None;
        }
        let shard = self.shard(row).lock();
        let e = shard.map.peek(row)?;
        Some(e.slots.iter().find(|(k, _)| k == key).map(|(_, ts)| *ts))
    }

    /// Replaces a cached row's parts with their merge `base`, when nothing was written since the
    /// read that saw `writes` (otherwise leaves them; the next read merges again).
    pub fn merged(&self, row: &str, writes: u64, base: Bytes) {
        self.update(row, false, |e| {
            if e.writes == writes {
                e.base = base;
                e.pending.clear();
                e.pending_bytes = 0;
                e.folded = writes;
            }
        });
    }

    /// The merged row and the keys of the deltas and slots it folds in, to repack from the
    /// cache, if the row is cached with no write since its last merge.
    pub fn repack_plan(&self, row: &str) -> Option<RepackPlan> {
        if !self.enabled() {
            return None;
        }
        let shard = self.shard(row).lock();
        let e = shard.map.peek(row)?;
        e.pending.is_empty().then(|| RepackPlan {
            base: e.base.clone(),
            delta_seqs: e.delta_seqs.clone(),
            slot_keys: e.slots.iter().map(|(k, _)| k.clone()).collect(),
        })
    }

    /// Forgets the deltas and slots a committed repack removed.
    pub fn repacked(&self, row: &str, deltas: &[u64], slots: &[Vec<u8>]) {
        self.update(row, false, |e| {
            // Removed deltas are the oldest ones, in order.
            let n = e
                .delta_seqs
                .iter()
                .zip(deltas)
                .take_while(|(a, b)| a == b)
                .count();
            e.delta_seqs.drain(..n);
            e.slots.retain(|(k, _)| !slots.contains(k));
            e.slot_bytes = slots_bytes(&e.slots);
        });
    }

    /// Forgets a row (after its deletion committed).
    pub fn remove(&self, row: &str) {
        if !self.enabled() {
            return;
        }
        let mut guard = self.shard(row).lock();
        let shard = &mut *guard;
        shard.generation += 1;
        if let Some(e) = shard.map.pop(row) {
            shard.bytes -= e.bytes(row);
        }
    }

    /// Drops every cached row, as eviction would.
    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut s = s.lock();
            s.map.clear();
            s.bytes = 0;
        }
    }

    /// Bytes held and rows cached, over all shards.
    pub fn usage(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(b, n), s| {
            let s = s.lock();
            (b + s.bytes, n + s.map.len())
        })
    }

    fn evict(&self, shard: &mut Shard) {
        while shard.bytes > self.shard_capacity {
            match shard.map.pop_lru() {
                Some((row, e)) => shard.bytes -= e.bytes(&row),
                None => break,
            }
        }
    }
}
