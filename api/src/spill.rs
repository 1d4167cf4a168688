//! The spill file: where ingest puts events while the bus is unavailable, so it can still answer
//! 2xx without losing them.
//!
//! `spill.log` holds frames `len:u32le crc32:u32le payload`, with payload
//! `timestamp:i64le key_len:u32le key value`. An append is fsynced before the request is
//! answered. `spill.pos` holds the offset replayed so far (fsynced after each chunk the bus
//! acknowledged). When everything is replayed, both files go back to zero. A torn frame at the
//! end (a crash during an append that was therefore never acknowledged) is cut off on replay.
//! Replaying twice after a crash is harmless: the storage writer's cell writes are idempotent.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use dmp_bus::{Bus, ProduceRecord};

/// Spill metrics.
pub mod metrics_names {
    /// Bytes waiting in the spill (gauge).
    pub const BYTES: &str = "dmp_ingest_spill_bytes";
    /// Age of the oldest event waiting in the spill (gauge, seconds).
    pub const OLDEST_AGE: &str = "dmp_ingest_spill_oldest_age_seconds";
    /// Events written to the spill (counter).
    pub const SPILLED: &str = "dmp_ingest_spilled_events_total";
    /// Events replayed from the spill to the bus (counter).
    pub const REPLAYED: &str = "dmp_ingest_spill_replayed_events_total";
    /// Torn or corrupt frames cut off the end of the spill (counter).
    pub const CORRUPT: &str = "dmp_ingest_spill_corrupt_frames_total";
}
use metrics_names as mn;

/// Spill failures.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The spill reached `spill.max_bytes`.
    #[error("the bus is unavailable and the spill file is full ({bytes} of {limit} bytes)")]
    Full {
        /// Bytes in use.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The file could not be written.
    #[error("spill file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

struct Files {
    log: File,
    len: u64,
    pos: u64,
}

/// The spill of one process.
pub struct Spill {
    dir: PathBuf,
    max_bytes: u64,
    files: Mutex<Files>,
}

const MAX_FRAME: usize = 64 << 20;

impl Spill {
    /// Opens (or creates) the spill in `dir`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spill, SpillError> {
        let io = |source| SpillError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(dir.join("spill.log"))
            .map_err(io)?;
        let len = log.metadata().map_err(io)?.len();
        let pos = match std::fs::read(dir.join("spill.pos")) {
            Ok(b) if b.len() == 8 => u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            _ => 0,
        }
        .min(len);
        Ok(Spill {
            dir: dir.to_path_buf(),
            max_bytes,
            files: Mutex::new(Files { log, len, pos }),
        })
    }

    fn io(&self, source: std::io::Error) -> SpillError {
        SpillError::Io {
            path: self.dir.join("spill.log").display().to_string(),
            source,
        }
    }

    /// Bytes waiting to be replayed.
    pub fn pending_bytes(&self) -> u64 {
        let f = self.files.lock();
        f.len - f.pos
    }

    /// Appends records and fsyncs them. Only after this returns may the caller acknowledge.
    pub fn append(&self, records: &[ProduceRecord]) -> Result<(), SpillError> {
        let mut buf = Vec::new();
        for r in records {
            let mut payload = Vec::with_capacity(16 + r.key.len() + r.value.len());
            payload.extend_from_slice(
                &r.timestamp
                    .unwrap_or_else(dmp_core::clock::now_ms)
                    .to_le_bytes(),
            );
            payload.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
            payload.extend_from_slice(&r.key);
            payload.extend_from_slice(&r.value);
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        let mut f = self.files.lock();
        let used = f.len - f.pos;
        if used + buf.len() as u64 > self.max_bytes {
            return Err(SpillError::Full {
                bytes: used,
                limit: self.max_bytes,
            });
        }
        f.log.write_all(&buf).map_err(|e| self.io(e))?;
        f.log.sync_data().map_err(|e| self.io(e))?;
        f.len += buf.len() as u64;
        metrics::counter!(mn::SPILLED).increment(records.len() as u64);
        metrics::gauge!(mn::BYTES).set((f.len - f.pos) as f64);
        Ok(())
    }

    /// Reads up to `max` records from the replay position: (records, end position).
    fn read_chunk(f: &mut Files, max: usize) -> std::io::Result<(Vec<ProduceRecord>, u64, bool)> {
        let mut out = Vec::new();
        let mut at = f.pos;
        let mut reader = f.log.try_clone()?;
        reader.seek(SeekFrom::Start(at))?;
        let mut torn = false;
        while out.len() < max && at < f.len {
            let mut head = [0u8; 8];
            if f.len - at < 8 || reader.read_exact(&mut head).is_err() {
                torn = true;
                break;
            }
            let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
            if !(12..=MAX_FRAME).contains(&len) || f.len - at - 8 < len as u64 {
                torn = true;
                break;
            }
            let mut payload = vec![0u8; len];
            reader.read_exact(&mut payload)?;
            if crc32fast::hash(&payload) != crc {
                torn = true;
                break;
            }
            let ts = i64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
            let klen = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes")) as usize;
            if 12 + klen > len {
                torn = true;
                break;
            }
            out.push(ProduceRecord {
                key: payload[12..12 + klen].to_vec(),
                value: payload[12 + klen..].to_vec(),
                timestamp: Some(ts),
            });
            at += 8 + len as u64;
        }
        Ok((out, at, torn))
    }

    fn store_pos(&self, pos: u64) -> std::io::Result<()> {
        let tmp = self.dir.join("spill.pos.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&pos.to_le_bytes())?;
        f.sync_data()?;
        std::fs::rename(tmp, self.dir.join("spill.pos"))
    }

    /// Replays everything spilled to `topic`. Returns how many records went to the bus; stops at
    /// the first bus failure (the rest waits for the next attempt).
    pub async fn replay(
        &self,
        bus: &dyn Bus,
        topic: &str,
        timeout: Duration,
    ) -> Result<u64, SpillError> {
        let mut replayed = 0u64;
        loop {
            let (records, end, torn) = {
                let mut f = self.files.lock();
                if f.pos >= f.len {
                    if f.len > 0 {
                        f.log.set_len(0).map_err(|e| self.io(e))?;
                        f.log.sync_data().map_err(|e| self.io(e))?;
                        f.len = 0;
                        f.pos = 0;
                        self.store_pos(0).map_err(|e| self.io(e))?;
                    }
                    metrics::gauge!(mn::BYTES).set(0.0);
                    metrics::gauge!(mn::OLDEST_AGE).set(0.0);
                    return Ok(replayed);
                }
                Self::read_chunk(&mut f, 1000).map_err(|e| self.io(e))?
            };
            if let Some(first) = records.first() {
                let age = (dmp_core::clock::now_ms() - first.timestamp.unwrap_or(0)).max(0);
                metrics::gauge!(mn::OLDEST_AGE).set(age as f64 / 1000.0);
            }
            let n = records.len() as u64;
            if n > 0 {
                match tokio::time::timeout(timeout, bus.produce(topic, records)).await {
                    Ok(Ok(_)) => {}
                    _ => return Ok(replayed),
                }
            }
            let mut f = self.files.lock();
            if torn {
                // Never acknowledged: cut it off so the spill can drain.
                tracing::warn!(at = end, "cutting a torn frame off the spill file");
                metrics::counter!(mn::CORRUPT).increment(1);
                f.log.set_len(end).map_err(|e| self.io(e))?;
                f.len = end;
            }
            f.pos = end;
            self.store_pos(end).map_err(|e| self.io(e))?;
            metrics::gauge!(mn::BYTES).set((f.len - f.pos) as f64);
            metrics::counter!(mn::REPLAYED).increment(n);
            replayed += n;
        }
    }

    /// Replays in the background every `every` until `shutdown`.
    pub fn spawn_replay(
        self: &Arc<Self>,
        bus: Arc<dyn Bus>,
        topic: String,
        every: Duration,
        timeout: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let spill = self.clone();
        tokio::spawn(async move {
            loop {
                if spill.pending_bytes() > 0 {
                    match spill.replay(bus.as_ref(), &topic, timeout).await {
                        Ok(n) if n > 0 => tracing::info!(records = n, "replayed spilled events"),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "spill replay failed"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.changed() => return,
                }
            }
        })
    }
}
