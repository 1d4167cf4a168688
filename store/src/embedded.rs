//! The embedded store on fjall, and the embedded database the bus and the store share.
//!
//! Layout, in keyspace `store.rows` (keys sort by uid, as HBase rows do):
//! ```text
//! uid 0x00 0x00                     -> packed cells of the row's base (everything repacked so far)
//! uid 0x00 0x01 seq:u64be           -> packed cells of one later write (a "delta")
//! uid 0x00 0x02 family 0x00 qualifier -> seq:u64be, then the packed cell of the column's newest
//!                                      write (a "slot"; families kept at one version only)
//! ```
//! A put appends one delta per row and never reads (a slot's write, below, checks one version),
//! so writes cost what the new cells cost. A read takes the row's prefix (base, a few deltas, its
//! slots), merges them in write order (a later write of the same cell wins), then applies TTL,
//! versions and the read's filters. When a read finds more than `repack_after_deltas` deltas it
//! repacks the row into one base, under a per-row lock striped over 1024 mutexes, dropping
//! expired cells and surplus versions, and folding the slots in. A compaction filter drops
//! expired cells from values it rewrites, so TTL is enforced on disk, not only at read.
//!
//! **Slots.** A put whose cells all belong to families kept at one version (`max_versions = 1`:
//! the segmenter's write-back of `s:evaluated`, `s:current`, …) overwrites one slot per column
//! instead of appending a delta. Such a write replaces what it overwrites, so it adds nothing for
//! a read to merge or a repack to fold, and no delta to delete later: the segmenter writes one at
//! every evaluation, and as deltas they were about two in five of the rows' writes. A slot keeps
//! the column's newest version only: under the row's lock, a write older than the slot's version
//! (which no read could see) is dropped, and any other write replaces it. The slot carries its
//! write's sequence number, so it merges in write order with the deltas.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fjall::compaction::filter::{CompactionFilter, Context, Factory, ItemAccessor, Verdict};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;

use dmp_core::config::{Embedded, StoreConfig};
use dmp_core::{Cell, Row};

use crate::row_cache::RowCache;
use crate::{check_row_key, codec, Get, Put, Result, Schema, StoreError, UserStore};

/// Name of the keyspace holding rows.
pub const ROWS_KEYSPACE: &str = "store.rows";
/// The byte after `uid 0x00` that tells a row's parts apart (see the module doc).
const BASE: u8 = 0;
const DELTA: u8 = 1;
const SLOT: u8 = 2;
/// Bytes of the sequence number before a slot's packed cell.
const SLOT_SEQ: usize = 8;
const META_KEYSPACE: &str = "store.meta";
const SEQ_KEY: &[u8] = b"seq.reserved";
/// The rows keyspace's layout version (u32 big-endian) in the meta keyspace.
const FORMAT_KEY: &[u8] = b"rows.format";
/// The layout this build writes and reads: 1, a base and deltas per row; 2, slots as well
/// (a build of format 1 would take a slot for the base). A database marked with a newer format
/// is refused at open. Databases written before the marker are format 1 or 2, which this build
/// reads; it marks them 2.
pub const ROWS_FORMAT: u32 = 2;
const SEQ_BLOCK: u64 = 1 << 24;
const LOCK_STRIPES: usize = 1024;
/// Tables in L0 that start a compaction into L1 (fjall's default is 4). Each L0 -> L1 compaction
/// rewrites the overlapping part of L1, which with users' random keys is all of it, so waiting
/// for more tables rewrites L1 less often. 8 against 4 at 50K events/s: the embedded storage's
/// CPU 0.0089 -> 0.0063 s per 1K events. 16 against 8 over 150 s at 30K events/s: 0.0074 / 0.0065
/// against 0.0083 / 0.0076 (docs/benchmarks.md, "Long runs"). More L0 tables are more places an
/// uncached read's prefix scan looks: in 40-s runs with a 512 MiB row cache 16 made the
/// segmenter slower, but with the 2 GiB row cache few reads miss it, and over 150 s the
/// segmenter's cost per evaluation was the same. Since then the tables' filters hold the rows'
/// prefixes (`uid 0x00`; vendored lsm-tree, `vendor/lsm-tree/DMP-PATCH.md`), and a scan skips
/// the tables without its row. fjall stores the strategy with a keyspace when
/// it creates it, so a database created before keeps the threshold it was created with.
///
/// It must stay well under fjall's write stall (writes slowed from 20 L0 tables) and halt (30,
/// `vendor/fjall/src/keyspace/mod.rs`): with 32, writes halted at 30 tables waiting for a
/// compaction that would only start at 32, and the storage writer stopped for good.
const L0_COMPACTION_TABLES: u8 = 16;
const _: () = assert!(L0_COMPACTION_TABLES < 20, "under fjall's write stall");
/// A cached row is repacked after this many times `repack_after_deltas` writes. Reads of a cached
/// row do not pay for its deltas (the cache holds it merged), so the repack only bounds the
/// deltas an uncached read would meet; and each repack writes the whole row, which flushes and
/// compactions then carry. 16 against 4: the embedded storage's CPU per event 11–22% lower over
/// 150 s at 30K events/s (docs/benchmarks.md, "Long runs").
const CACHED_REPACK_FACTOR: usize = 16;

/// A row cache of `capacity` bytes, and (when on) a thread `dmp-row-cache` that sets its gauges
/// every second (`dmp_store_row_cache_bytes`, `dmp_store_row_cache_rows`: sizing
/// `store.row_cache_mb` to the active users' rows needs to see how full it is) until the cache is
/// dropped.
fn row_cache_with_gauges(capacity: usize) -> Arc<RowCache> {
    let cache = Arc::new(RowCache::new(capacity));
    if cache.enabled() {
        let weak = Arc::downgrade(&cache);
        let spawned = std::thread::Builder::new()
            .name("dmp-row-cache".into())
            .spawn(move || {
                let bytes = metrics::gauge!(crate::metrics::ROW_CACHE_BYTES);
                let rows = metrics::gauge!(crate::metrics::ROW_CACHE_ROWS);
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let Some(cache) = weak.upgrade() else { break };
                    let (b, n) = cache.usage();
                    bytes.set(b as f64);
                    rows.set(n as f64);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for the row cache's gauges");
        }
    }
    cache
}

/// The embedded fjall database shared by the embedded bus and store, with its fsync policy.
/// Cloning is cheap; the upkeep thread (`dmp-db`: the periodic fsync, the memtable gauges) stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct EmbeddedDatabase {
    db: Database,
    memtable_bytes: u64,
    sync_each_batch: bool,
    background_nice: u64,
    _syncer: Arc<Syncer>,
}

struct Syncer {
    stop: Arc<AtomicBool>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.lock().take() {
            let _ = h.join();
        }
    }
}

/// Makes the journal durable without holding fjall's journal lock through the fsync: the
/// journal's userspace buffer goes to the OS under the lock (fast), then the journal files are
/// fsynced through descriptors of our own. `persist(SyncData)` would hold the lock for the whole
/// fsync, and every write of every role would wait behind a slow disk (measured: p99 stalls of
/// 100+ ms in the segmenter's change-to-segment latency).
fn sync_journals(db: &Database, dir: &std::path::Path) -> std::io::Result<()> {
    db.persist(PersistMode::Buffer)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "jnl") {
            match std::fs::File::open(&path) {
                Ok(f) => f.sync_data()?,
                // Rotated away and deleted meanwhile: its data is in tables fjall wrote.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Opens the database from a thread of its own at nice value `nice`. fjall starts its worker
/// threads (memtable flushes, compactions) while it opens, and a thread starts with the nice
/// value of the thread that creates it: they run at `nice`, and so do the threads they start
/// (`lsm-reaper`). The caller's own priority is not changed.
fn open_in_background(
    builder: fjall::DatabaseBuilder<Database>,
    nice: u64,
) -> fjall::Result<Database> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("dmp-db-open".into())
            .spawn_scoped(s, move || {
                lower_priority(nice);
                builder.open()
            })
            .expect("spawning a thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Raises the calling thread's nice value to `nice` (see [`dmp_core::priority::lower_to`]).
fn lower_priority(nice: u64) {
    dmp_core::priority::lower_to(nice, "the database's background threads");
}

impl EmbeddedDatabase {
    /// Opens (or creates) the database at `path` with the memory bounds of `cfg` and the store's
    /// TTL compaction filter for `schema`.
    pub fn open(path: &std::path::Path, cfg: &Embedded, schema: &Schema) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::Backend(fjall::Error::from(e)))?;
        let ttl = Arc::new(TtlFactory {
            schema: schema.clone(),
        });
        let builder = Database::builder(path)
            .cache_size(cfg.cache_mb * 1024 * 1024)
            .max_journaling_size(cfg.journal_mb * 1024 * 1024)
            .with_compaction_filter_factories(Arc::new(move |keyspace: &str| {
                (keyspace == ROWS_KEYSPACE).then(|| ttl.clone() as Arc<dyn Factory>)
            }));
        let db = open_in_background(builder, cfg.background_nice).map_err(|e| match e {
            fjall::Error::Locked => StoreError::InUse {
                path: path.display().to_string(),
            },
            e => StoreError::Backend(e),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        // The database's upkeep: the periodic fsync (when batches are not each fsynced) and,
        // every second, the gauges of its memtables. Flushes that stop (as fjall's did once,
        // vendor/fjall/DMP-PATCH.md change 2) show there first: sealed memtables that stay and a
        // write buffer that only grows.
        let handle = {
            let (db2, stop2) = (db.clone(), stop.clone());
            let fsync_every =
                (cfg.fsync_interval_ms > 0).then(|| Duration::from_millis(cfg.fsync_interval_ms));
            let dir = path.to_path_buf();
            Some(
                std::thread::Builder::new()
                    .name("dmp-db".into())
                    .spawn(move || {
                        let gauges_every = Duration::from_secs(1);
                        let tick = fsync_every
                            .unwrap_or(gauges_every)
                            .min(Duration::from_millis(100));
                        let (mut synced, mut sampled) = (std::time::Instant::now(), None);
                        while !stop2.load(Ordering::Acquire) {
                            if sampled
                                .is_none_or(|t: std::time::Instant| t.elapsed() >= gauges_every)
                            {
                                sampled = Some(std::time::Instant::now());
                                metrics::gauge!(crate::metrics::WRITE_BUFFER_BYTES)
                                    .set(db2.write_buffer_size() as f64);
                                metrics::gauge!(crate::metrics::SEALED_MEMTABLES)
                                    .set(db2.outstanding_flushes() as f64);
                            }
                            // Wake often enough to stop promptly.
                            std::thread::sleep(tick);
                            if let Some(every) = fsync_every {
                                if synced.elapsed() >= every {
                                    synced = std::time::Instant::now();
                                    if let Err(e) = sync_journals(&db2, &dir) {
                                        tracing::error!(error = %e, "periodic fsync failed");
                                    }
                                }
                            }
                        }
                    })
                    .expect("spawning a thread"),
            )
        };
        Ok(EmbeddedDatabase {
            db,
            memtable_bytes: cfg.memtable_mb * 1024 * 1024,
            sync_each_batch: cfg.fsync_interval_ms == 0,
            background_nice: cfg.background_nice,
            _syncer: Arc::new(Syncer {
                stop,
                handle: Mutex::new(handle),
            }),
        })
    }

    /// The fjall database.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Opens (or creates) a keyspace with the configured memtable bound.
    pub fn keyspace(&self, name: &str) -> Result<Keyspace, fjall::Error> {
        self.keyspace_with(name, |o| o)
    }

    /// Opens (or creates) a keyspace with the configured memtable bound and further options.
    pub fn keyspace_with(
        &self,
        name: &str,
        more: impl FnOnce(KeyspaceCreateOptions) -> KeyspaceCreateOptions,
    ) -> Result<Keyspace, fjall::Error> {
        let bytes = self.memtable_bytes;
        self.db.keyspace(name, || {
            more(
                KeyspaceCreateOptions::default()
                    .max_memtable_size(bytes)
                    .compaction_strategy(Arc::new(
                        fjall::compaction::Leveled::default()
                            .with_l0_threshold(L0_COMPACTION_TABLES),
                    )),
            )
        })
    }

    /// Gives the calling thread the priority of the database's background threads
    /// (`embedded.background_nice`): for threads that do upkeep work of their own on the
    /// database, such as the embedded bus's retention and compaction.
    pub fn lower_to_background_priority(&self) {
        lower_priority(self.background_nice);
    }

    /// Whether every batch is fsynced before it is acknowledged.
    pub fn sync_each_batch(&self) -> bool {
        self.sync_each_batch
    }

    /// The durability to request for an acknowledged batch: written to the OS at least (fjall
    /// otherwise keeps the journal write in a userspace buffer that a kill -9 loses), fsynced
    /// when `fsync_interval_ms = 0`.
    pub fn batch_durability(&self) -> Option<PersistMode> {
        Some(if self.sync_each_batch {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        })
    }

    /// Bytes on disk (journal and tables).
    pub fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Bytes of block cache in use, and its capacity.
    pub fn cache_usage(&self) -> (u64, u64) {
        (self.db.cache_size(), self.db.cache_capacity())
    }

    /// Bytes in memtables now.
    pub fn write_buffer_size(&self) -> u64 {
        self.db.write_buffer_size()
    }
}

/// The embedded store.
pub struct EmbeddedStore {
    db: EmbeddedDatabase,
    rows: Keyspace,
    meta: Keyspace,
    schema: Schema,
    max_row_cells: usize,
    repack_after: usize,
    seq: AtomicU64,
    seq_reserved: Mutex<u64>,
    locks: Vec<Mutex<()>>,
    cache: Arc<RowCache>,
    /// Row cache hits and misses (handles registered at open: a lookup per read costs).
    cache_hits: metrics::Counter,
    cache_misses: metrics::Counter,
}

impl EmbeddedStore {
    /// Opens the store's keyspaces in the shared database.
    pub fn open(db: &EmbeddedDatabase, cfg: &StoreConfig) -> Result<EmbeddedStore> {
        let rows = db.keyspace(ROWS_KEYSPACE)?;
        let meta = db.keyspace(META_KEYSPACE)?;
        match meta.get(FORMAT_KEY)? {
            Some(v) => {
                let found = u32::from_be_bytes(<[u8; 4]>::try_from(&v[..]).map_err(|_| {
                    StoreError::Corrupt {
                        row: "rows.format (store.meta)".into(),
                        reason: format!("{} bytes, not 4", v.len()),
                    }
                })?);
                if found > ROWS_FORMAT {
                    return Err(StoreError::NewerFormat {
                        found,
                        supported: ROWS_FORMAT,
                    });
                }
                if found < ROWS_FORMAT {
                    meta.insert(FORMAT_KEY, ROWS_FORMAT.to_be_bytes())?;
                }
            }
            None => meta.insert(FORMAT_KEY, ROWS_FORMAT.to_be_bytes())?,
        }
        let reserved = match meta.get(SEQ_KEY)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
            _ => 0,
        };
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let start = reserved.max(now_ns);
        Ok(EmbeddedStore {
            db: db.clone(),
            rows,
            meta,
            schema: Schema::new(cfg.families.clone()),
            max_row_cells: cfg.max_row_cells,
            repack_after: cfg.repack_after_deltas,
            seq: AtomicU64::new(start),
            seq_reserved: Mutex::new(reserved),
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            cache: row_cache_with_gauges(cfg.row_cache_mb as usize * 1024 * 1024),
            cache_hits: metrics::counter!(crate::metrics::ROW_CACHE_HITS),
            cache_misses: metrics::counter!(crate::metrics::ROW_CACHE_MISSES),
        })
    }

    /// Drops every row from the row cache, as eviction would (the next reads go to the LSM).
    pub fn clear_row_cache(&self) {
        self.cache.clear();
    }

    /// Bytes held by the row cache and the rows in it.
    pub fn row_cache_usage(&self) -> (usize, usize) {
        self.cache.usage()
    }

    /// Cells physically stored for a row (before merging, TTL and versions): for tests and ops.
    pub fn stored_cells(&self, row: &str) -> Result<usize> {
        let raw = self.read_parts(row)?;
        let mut n = 0;
        for value in raw.base.iter().chain(&raw.writes) {
            codec::walk(value, |_| {
                n += 1;
                Ok(false)
            })
            .map_err(|reason| corrupt(row, reason))?;
        }
        Ok(n)
    }

    /// Bytes of the rows keyspace on disk (tables and blobs, not the journal).
    pub fn rows_disk_space(&self) -> u64 {
        self.rows.disk_space()
    }

    /// Flushes the rows memtable to a table and compacts, so disk figures are settled.
    pub fn settle(&self) -> Result<()> {
        self.rows.rotate_memtable_and_wait()?;
        self.rows.major_compact()?;
        Ok(())
    }

    fn lock_for(&self, row: &str) -> &Mutex<()> {
        &self.locks[Self::stripe(row)]
    }

    fn stripe(row: &str) -> usize {
        (dmp_core::partition::uid_hash(row.as_bytes()) % LOCK_STRIPES as u64) as usize
    }

    /// Locks the rows' stripes, each once, in stripe order (so two callers never wait on each
    /// other in a cycle).
    fn lock_rows<'a>(
        &self,
        rows: impl Iterator<Item = &'a str>,
    ) -> Vec<parking_lot::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = rows.map(Self::stripe).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|i| self.locks[i].lock()).collect()
    }

    /// Whether a put goes to slots: every cell of it is in a family kept at one version.
    fn slotted(&self, put: &Put) -> bool {
        put.cells.iter().all(|c| {
            self.schema
                .family(&c.family)
                .is_some_and(|f| f.max_versions == 1)
        })
    }

    /// The version in a row's slot (None: no slot), from the row cache when it holds the row,
    /// else from the LSM. The caller holds the row's lock. A slot that cannot be read counts as
    /// none, so the write replaces it rather than failing (and being retried) for ever.
    fn slot_version(&self, row: &str, key: &[u8]) -> Result<Option<i64>> {
        if let Some(cached) = self.cache.slot_version(row, key) {
            return Ok(cached);
        }
        let Some(value) = self.rows.get(key)? else {
            return Ok(None);
        };
        match slot_parts(&value) {
            Ok((_, ts)) => Ok(Some(ts)),
            Err(reason) => {
                tracing::warn!(row, %reason, "unreadable slot; the write replaces it");
                Ok(None)
            }
        }
    }

    /// Scans the raw parts of a row: the base (sorted, one version per coordinate, as repacked)
    /// and the values of later writes (deltas and slots) in write order, with the deltas'
    /// sequence numbers and the slots' keys.
    fn read_parts(&self, row: &str) -> Result<RawRow> {
        let mut prefix = Vec::with_capacity(row.len() + 1);
        prefix.extend_from_slice(row.as_bytes());
        prefix.push(0);
        let mut raw = RawRow::default();
        let mut slots = Vec::new();
        for kv in self.rows.prefix(&prefix) {
            let (key, value) = kv.into_inner()?;
            let value = bytes::Bytes::from(value);
            match key.get(prefix.len()) {
                Some(&DELTA) => {
                    let seq = key
                        .len()
                        .checked_sub(8)
                        .and_then(|at| key[at..].try_into().ok())
                        .map(u64::from_be_bytes)
                        .ok_or_else(|| corrupt(row, "a delta key without its sequence".into()))?;
                    raw.delta_seqs.push(seq);
                    raw.writes.push(value);
                }
                Some(&SLOT) => {
                    let (seq, ts) = slot_parts(&value).map_err(|reason| corrupt(row, reason))?;
                    slots.push((seq, value.slice(SLOT_SEQ..)));
                    raw.slots.push((key.to_vec(), ts));
                }
                _ => raw.base = Some(value),
            }
        }
        if !slots.is_empty() {
            // Deltas come in sequence order (their keys'); slots merge in among them.
            let mut writes: Vec<(u64, bytes::Bytes)> = raw
                .delta_seqs
                .iter()
                .copied()
                .zip(std::mem::take(&mut raw.writes))
                .chain(slots)
                .collect();
            writes.sort_by_key(|(seq, _)| *seq);
            raw.writes = writes.into_iter().map(|(_, v)| v).collect();
        }
        Ok(raw)
    }

    /// Reads a row from its base and writes (oldest first) as of now (see [`crate::merge`]),
    /// with the merge packed when `pack`. The LSM read and the cached read both go through it.
    fn read_merged(
        &self,
        row: &str,
        base: Option<&bytes::Bytes>,
        writes: &[&bytes::Bytes],
        projection: Option<&crate::Projection>,
        pack: bool,
    ) -> Result<crate::merge::Merged> {
        let now = dmp_core::clock::now_ms();
        crate::merge::read(base, writes, &self.schema, now, projection, pack)
            .map_err(|reason| corrupt(row, reason))
    }

    /// [`EmbeddedStore::read_merged`] of cached writes (with their sequence numbers, in the order
    /// recorded): merged in write order, as the LSM read merges them.
    fn read_cached_writes(
        &self,
        row: &str,
        base: Option<&bytes::Bytes>,
        mut writes: Vec<(u64, bytes::Bytes)>,
        projection: Option<&crate::Projection>,
        pack: bool,
    ) -> Result<crate::merge::Merged> {
        writes.sort_unstable_by_key(|(seq, _)| *seq);
        let writes: Vec<&bytes::Bytes> = writes.iter().map(|(_, v)| v).collect();
        self.read_merged(row, base, &writes, projection, pack)
    }

    /// [`EmbeddedStore::read_merged`] of a row's parts as stored.
    fn read_raw(
        &self,
        row: &str,
        raw: &RawRow,
        projection: Option<&crate::Projection>,
        pack: bool,
    ) -> Result<crate::merge::Merged> {
        let writes: Vec<&bytes::Bytes> = raw.writes.iter().collect();
        self.read_merged(row, raw.base.as_ref(), &writes, projection, pack)
    }

    fn repack(&self, row: &str) -> Result<()> {
        let _guard = self.lock_for(row).lock();
        let raw = self.read_parts(row)?;
        if raw.delta_seqs.is_empty() {
            return Ok(());
        }
        let merged = self.read_raw(row, &raw, None, true)?;
        let base = merged.packed.unwrap_or_default(); // there were writes: packed
        let slot_keys: Vec<Vec<u8>> = raw.slots.into_iter().map(|(k, _)| k).collect();
        self.write_repack(row, base.into(), &raw.delta_seqs, &slot_keys)
    }

    /// Commits a repack: `base` (packed cells; an empty one removes the base) replaces the row's
    /// base, and the deltas (by sequence number) and slots (by key) merged into it are removed,
    /// in one batch. The caller holds the row's lock.
    fn write_repack(
        &self,
        row: &str,
        base: bytes::Bytes,
        delta_seqs: &[u64],
        slot_keys: &[Vec<u8>],
    ) -> Result<()> {
        let mut base_key = row.as_bytes().to_vec();
        base_key.extend_from_slice(&[0, BASE]);
        let mut batch = self.db.db.batch().durability(self.db.batch_durability());
        if base.len() <= 1 {
            batch.remove(&self.rows, base_key);
        } else {
            batch.insert(&self.rows, base_key, base);
        }
        for seq in delta_seqs {
            batch.remove(&self.rows, delta_key(row, *seq));
        }
        for k in slot_keys {
            batch.remove(&self.rows, k.as_slice());
        }
        batch.commit()?;
        metrics::counter!(crate::metrics::REPACKS).increment(1);
        Ok(())
    }

    /// Repacks a cached row: its merged value becomes the base and the deltas the cache lists are
    /// removed, with no LSM read. Skipped when a write arrived since the last merge.
    fn repack_cached(&self, row: &str) -> Result<()> {
        let _guard = self.lock_for(row).lock();
        let Some(plan) = self.cache.repack_plan(row) else {
            return Ok(());
        };
        if plan.delta_seqs.is_empty() {
            return Ok(());
        }
        self.write_repack(row, plan.base, &plan.delta_seqs, &plan.slot_keys)?;
        self.cache.repacked(row, &plan.delta_seqs, &plan.slot_keys);
        Ok(())
    }

    /// A read served by the row cache: the cached base and the writes since, merged (TTL and
    /// versions applied as of now). The merge goes back to the cache (a copy of the row's bytes;
    /// the next read then has no write to merge).
    ///
    /// A read that takes a cursor folds the writes into the cached row (the next read then has
    /// none to merge); a plain read (a lookup) leaves up to `MAX_SINCE_WRITES` of them as they
    /// are, so that it does not end the cursor of the segmenter's last read of the row.
    fn get_cached(
        &self,
        row: &str,
        cached: crate::row_cache::Cached,
        projection: Option<&crate::Projection>,
        with_cursor: bool,
    ) -> Result<Vec<Cell>> {
        // (`cached.writes` and `cached.id` are the read's cursor, taken by the caller.)
        let fold = with_cursor || cached.pending.len() > crate::row_cache::MAX_SINCE_WRITES;
        let merged =
            self.read_cached_writes(row, Some(&cached.base), cached.pending, projection, fold)?;
        if let Some(packed) = merged.packed {
            self.cache.merged(row, cached.writes, packed.into());
        }
        if cached.deltas_on_disk > self.repack_after * CACHED_REPACK_FACTOR {
            self.repack_cached(row)?;
        }
        Ok(merged.cells)
    }

    /// A read of one row; with a cursor (the read the segmenter builds on), or a plain one.
    fn read_row(
        &self,
        get: &Get,
        with_cursor: bool,
    ) -> Result<(Option<Row>, Option<crate::ReadCursor>)> {
        check_row_key(&get.row)?;
        let projection = get.projection.as_deref();
        let mut cursor = None;
        let cells = if let Some(cached) = self.cache.get(&get.row) {
            self.cache_hits.increment(1);
            cursor = Some(crate::ReadCursor {
                entry: cached.id,
                writes: cached.writes,
            });
            self.get_cached(&get.row, cached, projection, with_cursor)?
        } else {
            // Taken before the read: a write the read does not see moves it (see row_cache).
            let generation = self.cache.generation(&get.row);
            let raw = self.read_parts(&get.row)?;
            let needs_repack = raw.delta_seqs.len() > self.repack_after;
            let (delta_seqs, slots) = if self.cache.enabled() && !needs_repack {
                (raw.delta_seqs.clone(), raw.slots.clone())
            } else {
                // A repack below removes every delta and slot the read saw (and any later one
                // would have moved the generation, so the row would not be cached).
                (Vec::new(), Vec::new())
            };
            let merged = self.read_raw(&get.row, &raw, projection, self.cache.enabled())?;
            if needs_repack {
                self.repack(&get.row)?;
            }
            if self.cache.enabled() {
                self.cache_misses.increment(1);
                // A buffer of the cache's own, not a slice of an LSM block.
                let base = match (merged.packed, &raw.base) {
                    (Some(packed), _) => packed.into(),
                    (None, Some(base)) => bytes::Bytes::copy_from_slice(base),
                    (None, None) => codec::packed_with_capacity(0).into(),
                };
                cursor = self
                    .cache
                    .insert(&get.row, generation, base, delta_seqs, slots)
                    .map(|entry| crate::ReadCursor { entry, writes: 0 });
            }
            merged.cells
        };
        let cells = self.filter(get, cells);
        let row = (!cells.is_empty()).then(|| Row {
            key: get.row.clone(),
            cells,
        });
        Ok((row, cursor.filter(|_| with_cursor)))
    }

    fn next_seqs(&self, n: u64, batch: &mut fjall::OwnedWriteBatch) -> u64 {
        let start = self.seq.fetch_add(n, Ordering::Relaxed);
        let end = start + n;
        let mut reserved = self.seq_reserved.lock();
        if end > *reserved {
            *reserved = end + SEQ_BLOCK;
            batch.insert(&self.meta, SEQ_KEY, reserved.to_be_bytes().to_vec());
        }
        start
    }

    fn filter(&self, get: &Get, mut cells: Vec<Cell>) -> Vec<Cell> {
        let cap = get.max_cells.unwrap_or(self.max_row_cells);
        if !get.filters() {
            // The whole row (the segmenter's read): only the cap applies.
            cells.truncate(cap);
            return cells;
        }
        let mut out = Vec::with_capacity(cells.len().min(cap));
        let mut versions = 0u32;
        let mut prev: Option<(compact_str::CompactString, compact_str::CompactString)> = None;
        for c in cells {
            if out.len() >= cap {
                break;
            }
            if !get.selects(&c) {
                continue;
            }
            if let Some(max) = get.max_versions {
                let same = prev
                    .as_ref()
                    .is_some_and(|(f, q)| *f == c.family && *q == c.qualifier);
                versions = if same { versions + 1 } else { 1 };
                if !same {
                    prev = Some((c.family.clone(), c.qualifier.clone()));
                }
                if versions > max {
                    continue;
                }
            }
            out.push(c);
        }
        out
    }
}

/// A row's parts as stored.
#[derive(Default)]
struct RawRow {
    /// The base: packed cells in HBase order.
    base: Option<bytes::Bytes>,
    /// Packed cells of later writes (deltas and slots), in write order.
    writes: Vec<bytes::Bytes>,
    /// The deltas' sequence numbers (their keys' order), which give their keys.
    delta_seqs: Vec<u64>,
    /// The slots' keys and versions.
    slots: Vec<(Vec<u8>, i64)>,
}

/// One cell of a put bound for a slot.
struct SlotWrite<'a> {
    key: Vec<u8>,
    /// The put's index.
    put: usize,
    seq: u64,
    cell: &'a Cell,
}

/// The key of `row`'s delta of sequence `seq`.
fn delta_key(row: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(row.len() + 10);
    key.extend_from_slice(row.as_bytes());
    key.extend_from_slice(&[0, DELTA]);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The key of the slot of column `family:qualifier` of `row` (family names have no NUL byte).
fn slot_key(row: &str, family: &str, qualifier: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(row.len() + 3 + family.len() + qualifier.len());
    key.extend_from_slice(row.as_bytes());
    key.extend_from_slice(&[0, SLOT]);
    key.extend_from_slice(family.as_bytes());
    key.push(0);
    key.extend_from_slice(qualifier.as_bytes());
    key
}

/// Whether a key of the rows keyspace is a slot's (row keys have no NUL byte).
fn is_slot_key(key: &[u8]) -> bool {
    key.iter()
        .position(|b| *b == 0)
        .is_some_and(|i| key.get(i + 1) == Some(&SLOT))
}

/// A slot's value: its write's sequence number and its cell's version.
fn slot_parts(value: &[u8]) -> std::result::Result<(u64, i64), String> {
    let (seq, cells) = value
        .split_at_checked(SLOT_SEQ)
        .ok_or_else(|| "a slot shorter than its sequence number".to_string())?;
    let mut ts = None;
    codec::any_cell(cells, |_, t| {
        ts = Some(t);
        true
    })?;
    let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
    ts.map(|ts| (seq, ts))
        .ok_or_else(|| "a slot with no cell".to_string())
}

/// Of the slot writes of one batch, in put order, the one each slot keeps: the newest version,
/// and of equal versions the last written.
fn newest_per_slot(mut writes: Vec<SlotWrite<'_>>) -> Vec<SlotWrite<'_>> {
    // Stable: writes of one slot stay in put order.
    writes.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out: Vec<SlotWrite<'_>> = Vec::with_capacity(writes.len());
    for w in writes {
        match out.last_mut() {
            Some(last) if last.key == w.key => {
                if w.cell.ts >= last.cell.ts {
                    *last = w;
                }
            }
            _ => out.push(w),
        }
    }
    out
}

fn corrupt(row: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        row: row.to_string(),
        reason,
    }
}

impl UserStore for EmbeddedStore {
    fn put(&self, puts: &[Put]) -> Result<()> {
        for p in puts {
            check_row_key(&p.row)?;
            for c in &p.cells {
                if self.schema.family(&c.family).is_none() {
                    return Err(StoreError::Rejected(format!(
                        "unknown column family {:?} in row {:?}",
                        c.family, p.row
                    )));
                }
            }
        }
        let mut batch = self.db.db.batch().durability(self.db.batch_durability());
        let mut seq = self.next_seqs(puts.len() as u64, &mut batch);
        let mut kvs = Vec::with_capacity(puts.len());
        let mut slots: Vec<SlotWrite> = Vec::new();
        for (i, p) in puts.iter().enumerate() {
            if p.cells.is_empty() {
                continue;
            }
            if self.slotted(p) {
                for c in &p.cells {
                    slots.push(SlotWrite {
                        key: slot_key(&p.row, &c.family, &c.qualifier),
                        put: i,
                        seq,
                        cell: c,
                    });
                }
            } else {
                let value = bytes::Bytes::from(codec::encode(&p.cells));
                kvs.push((delta_key(&p.row, seq), value, i, seq));
            }
            seq += 1;
        }
        // In key order: consecutive memtable inserts then walk nearby skiplist nodes (that are in
        // cache) instead of a random path each. Keys are unique (sequence numbers).
        kvs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, value, _, _) in &kvs {
            batch.insert(&self.rows, key.as_slice(), value.clone());
        }
        // Slots: the rows' locks from the check of each slot's version to the cache's update, so
        // a repack (which removes the slots it folds) or another slot write cannot come between.
        let slots = newest_per_slot(slots);
        let _locks = self.lock_rows(slots.iter().map(|w| puts[w.put].row.as_str()));
        let mut written = Vec::with_capacity(slots.len());
        for w in slots {
            let row = &puts[w.put].row;
            if self.slot_version(row, &w.key)? > Some(w.cell.ts) {
                continue; // older than the column's newest version: no read would see it
            }
            let mut value = Vec::with_capacity(SLOT_SEQ + 64);
            value.extend_from_slice(&w.seq.to_be_bytes());
            value.extend_from_slice(&codec::encode(std::slice::from_ref(w.cell)));
            let value = bytes::Bytes::from(value);
            batch.insert(&self.rows, w.key.as_slice(), value.clone());
            written.push((w, value));
        }
        batch.commit()?;
        if self.cache.enabled() {
            for (_, value, i, seq) in kvs {
                self.cache.written(&puts[i].row, seq, value);
            }
            for (w, value) in written {
                let cells = value.slice(SLOT_SEQ..);
                self.cache
                    .written_slot(&puts[w.put].row, w.seq, cells, w.key, w.cell.ts);
            }
        }
        Ok(())
    }

    fn get(&self, get: &Get) -> Result<Option<Row>> {
        Ok(self.read_row(get, false)?.0)
    }

    fn get_with_cursor(&self, get: &Get) -> Result<(Option<Row>, Option<crate::ReadCursor>)> {
        self.read_row(get, true)
    }

    fn get_since(
        &self,
        get: &Get,
        cursor: crate::ReadCursor,
    ) -> Result<Option<(Vec<Cell>, crate::ReadCursor)>> {
        check_row_key(&get.row)?;
        if get.filters() || get.max_cells.is_some() {
            return Ok(None); // only a projection is applied to the writes since
        }
        let Some(since) = self.cache.since(&get.row, cursor) else {
            return Ok(None);
        };
        // The writes alone, with nothing under them.
        let projection = get.projection.as_deref();
        let merged = self.read_cached_writes(&get.row, None, since.writes, projection, false)?;
        Ok(Some((merged.cells, since.cursor)))
    }

    fn delete_row(&self, row: &str) -> Result<()> {
        self.delete_rows(&[row])
    }

    fn delete_rows(&self, rows: &[&str]) -> Result<()> {
        for row in rows {
            check_row_key(row)?;
        }
        if rows.is_empty() {
            return Ok(());
        }
        // Under the rows' locks, which repacks and slot writes take too, so neither comes between
        // a row's scan and the commit (a delta written meanwhile survives: a write after the
        // delete, as the old code had it).
        let _locks = self.lock_rows(rows.iter().copied());
        let mut batch = self.db.db.batch().durability(self.db.batch_durability());
        let mut prefix = Vec::new();
        for row in rows {
            prefix.clear();
            prefix.extend_from_slice(row.as_bytes());
            prefix.push(0);
            for kv in self.rows.prefix(&prefix) {
                batch.remove(&self.rows, kv.key()?);
            }
        }
        batch.commit()?;
        for row in rows {
            self.cache.remove(row);
        }
        Ok(())
    }

    fn scan(&self, start_after: Option<&str>, limit: usize, template: &Get) -> Result<Vec<Row>> {
        let mut out = Vec::new();
        // Keys are `uid 0x00 …`; the first key after every key of `start_after` is `start_after 0x01`.
        let start: Vec<u8> = match start_after {
            Some(r) => {
                let mut k = r.as_bytes().to_vec();
                k.push(1);
                k
            }
            None => Vec::new(),
        };
        let mut last: Option<Vec<u8>> = None;
        for kv in self.rows.range(start..) {
            if out.len() >= limit {
                break;
            }
            let key = kv.key()?;
            let Some(end) = key.iter().position(|b| *b == 0) else {
                continue;
            };
            let row = &key[..end];
            if last.as_deref() == Some(row) {
                continue;
            }
            last = Some(row.to_vec());
            let row = String::from_utf8_lossy(row).into_owned();
            let get = Get {
                row,
                ..template.clone()
            };
            if let Some(r) = self.get(&get)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        self.db.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn backend_name(&self) -> &'static str {
        "embedded"
    }
}

/// Drops expired cells from the values compaction rewrites.
struct TtlFactory {
    schema: Schema,
}

impl Factory for TtlFactory {
    fn name(&self) -> &str {
        "dmp-store-ttl"
    }

    fn make_filter(&self, _ctx: &Context) -> Box<dyn CompactionFilter> {
        let now = dmp_core::clock::now_ms();
        Box::new(TtlFilter {
            cutoffs: self
                .schema
                .families()
                .filter_map(|(name, _)| {
                    self.schema
                        .ttl_ms(name)
                        .map(|ttl| (name.clone(), now - ttl))
                })
                .collect(),
            dropped: 0,
        })
    }
}

struct TtlFilter {
    /// Families with a TTL, and the version before which their cells are expired.
    cutoffs: Vec<(String, i64)>,
    dropped: u64,
}

impl TtlFilter {
    fn expired(&self, family: &[u8], ts: i64) -> bool {
        self.cutoffs
            .iter()
            .any(|(f, cutoff)| f.as_bytes() == family && ts < *cutoff)
    }
}

impl CompactionFilter for TtlFilter {
    fn filter_item(
        &mut self,
        item: ItemAccessor<'_>,
        _ctx: &Context,
    ) -> fjall::compaction::filter::CompactionFilterResult {
        if self.cutoffs.is_empty() {
            return Ok(Verdict::Keep);
        }
        let stored = bytes::Bytes::from(item.value()?);
        // A slot's cell comes after its sequence number, which a rewrite keeps.
        let seq_len = if is_slot_key(item.key()) { SLOT_SEQ } else { 0 };
        if stored.len() < seq_len {
            return Ok(Verdict::Keep); // a value we cannot read: never dropped
        }
        let value = stored.slice(seq_len..);
        // Nearly every value has no expired cell: find that out without decoding it.
        if !codec::any_cell(&value, |f, ts| self.expired(f, ts)).unwrap_or(false) {
            return Ok(Verdict::Keep); // nothing expired, or a value we cannot read: never dropped
        }
        let mut keep = Vec::new();
        let mut dropped = 0u64;
        let decoded = codec::decode(&value, |c| {
            if self.expired(c.family.as_bytes(), c.ts) {
                dropped += 1;
            } else {
                keep.push(c);
            }
        });
        if decoded.is_err() || dropped == 0 {
            return Ok(Verdict::Keep); // never drop what we cannot read
        }
        self.dropped += dropped;
        if keep.is_empty() {
            Ok(Verdict::Remove)
        } else {
            let mut rewritten = stored[..seq_len].to_vec();
            rewritten.extend_from_slice(&codec::encode(&keep));
            Ok(Verdict::ReplaceValue(rewritten.into()))
        }
    }

    fn finish(self: Box<Self>) {
        if self.dropped > 0 {
            metrics::counter!(crate::metrics::TTL_DROPPED_CELLS).increment(self.dropped);
        }
    }
}

/// Opens a store in `dir` with default settings, for tests and benches.
pub fn open_temp(dir: &std::path::Path) -> Result<(EmbeddedDatabase, EmbeddedStore)> {
    open_temp_with(dir, &dmp_core::Config::defaults())
}

/// Opens a store in `dir` with the embedded and store settings of `cfg`, for tests and benches.
pub fn open_temp_with(
    dir: &std::path::Path,
    cfg: &dmp_core::Config,
) -> Result<(EmbeddedDatabase, EmbeddedStore)> {
    let db = EmbeddedDatabase::open(dir, &cfg.embedded, &Schema::new(cfg.store.families.clone()))?;
    let store = EmbeddedStore::open(&db, &cfg.store)?;
    Ok((db, store))
}

/// Forces compaction of the rows keyspace (runs the TTL filter over everything).
pub fn major_compact(store: &EmbeddedStore) -> Result<()> {
    store.settle()
}
