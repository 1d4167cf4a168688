//! `dmp-store`: the wide-column user store, in HBase's model.
//!
//! Row = user (key = uid), families with a TTL and a number of versions kept per qualifier,
//! cells versioned by event time. The [`UserStore`] trait maps 1:1 onto HBase's Thrift2 API:
//! [`UserStore::put`] is `putMultiple` (a `TPut` per row), [`UserStore::get`] is `get` with a
//! `TGet` ([`Get`]: columns, time range, max versions, a cell cap; its [`Projection`] has no
//! `TGet` field: a Thrift backend applies [`Projection::apply`] to what it reads), [`UserStore::delete_row`] is
//! `deleteSingle` with a whole-row `TDelete`, [`UserStore::scan`] is `openScanner`/`getScannerRows`.
//! Writing the same cell (family, qualifier, version) again replaces its value, so replays are
//! idempotent.
//!
//! Backends are chosen by URL with [`open`]: `embedded` ([`embedded::EmbeddedStore`], fjall with
//! packed rows, the default). The HBase backend is a later piece of work and answers with a clear
//! error until it exists. Every backend runs [`conformance`]; [`Instrumented`] adds the same
//! metrics to any backend.

pub mod codec;
pub mod conformance;
pub mod embedded;
mod instrumented;
mod merge;
pub mod metrics;
mod row_cache;
pub mod suppress;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use dmp_core::{Cell, ErrorKind, Projection, Row};
pub use instrumented::Instrumented;

use dmp_core::config::FamilyConfig;

/// A store error: a kind usable as a metric label, and what happened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request was invalid (unknown family, bad row key); retrying will not help.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The backend failed underneath (I/O, corruption).
    #[error("store backend failed: {0}")]
    Backend(#[from] fjall::Error),
    /// A stored value could not be decoded.
    #[error("corrupt value under row {row:?}: {reason}")]
    Corrupt {
        /// The row.
        row: String,
        /// What was wrong.
        reason: String,
    },
    /// Another process holds the embedded database.
    #[error("data dir {path} is in use by another dmp process (stop it, or use its HTTP API)")]
    InUse {
        /// The data dir.
        path: String,
    },
    /// The embedded database was written by a newer dmp, in a row layout this build cannot read.
    #[error(
        "the embedded store's rows are in format {found}, written by a newer dmp; this build reads \
         up to format {supported}: run that version (or newer) on this data dir"
    )]
    NewerFormat {
        /// The format the database is marked with.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// The URL names a backend that is not available in this build.
    #[error("store backend {url:?} is not available: {reason}")]
    Unsupported {
        /// The configured URL.
        url: String,
        /// Why, and what to do about it.
        reason: String,
    },
}

impl StoreError {
    /// The metric label of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Rejected(_)
            | StoreError::Unsupported { .. }
            | StoreError::NewerFormat { .. } => ErrorKind::Rejected,
            StoreError::InUse { .. } => ErrorKind::Unavailable,
            StoreError::Backend(_) | StoreError::Corrupt { .. } => ErrorKind::Internal,
        }
    }
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Cells to write into one row (HBase `TPut`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// The row key (uid).
    pub row: String,
    /// The cells; each carries its own version.
    pub cells: Vec<Cell>,
}

/// What to read of one row (HBase `TGet`). The default reads every cell the families keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Get {
    /// The row key.
    pub row: String,
    /// Only these families (empty: all). `TGet.columns` with a family and no qualifier.
    pub families: Vec<String>,
    /// Only these (family, qualifier) columns (empty: all). `TGet.columns`.
    pub columns: Vec<(String, String)>,
    /// Only versions in `[min, max)`, epoch ms. `TGet.timeRange`.
    pub time_range: Option<(i64, i64)>,
    /// At most this many versions per qualifier, newest first (None: all kept). `TGet.maxVersions`.
    pub max_versions: Option<u32>,
    /// At most this many cells in all (None: the store's `max_row_cells`). `TGet.storeLimit`.
    pub max_cells: Option<usize>,
    /// Leave out the cells of one family the reader does not use, keeping when they were written
    /// (see [`Projection`]). Applied before the filters above.
    pub projection: Option<Arc<Projection>>,
}

impl Get {
    /// Reads the whole row.
    pub fn row(row: impl Into<String>) -> Get {
        Get {
            row: row.into(),
            ..Get::default()
        }
    }

    /// Whether this read filters the row's cells (families, columns, time range or versions;
    /// neither the projection nor the cell cap counts).
    pub fn filters(&self) -> bool {
        !self.families.is_empty()
            || !self.columns.is_empty()
            || self.time_range.is_some()
            || self.max_versions.is_some()
    }

    /// Whether a cell passes this read's column and time filters.
    pub fn selects(&self, cell: &Cell) -> bool {
        if !self.families.is_empty() && !self.families.iter().any(|f| *f == cell.family) {
            return false;
        }
        if !self.columns.is_empty()
            && !self
                .columns
                .iter()
                .any(|(f, q)| *f == cell.family && *q == cell.qualifier)
        {
            return false;
        }
        if let Some((min, max)) = self.time_range {
            if cell.ts < min || cell.ts >= max {
                return false;
            }
        }
        true
    }
}

/// The families of a store with their TTL and versions, as HBase's table schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    families: BTreeMap<String, FamilyConfig>,
}

impl Schema {
    /// A schema from the configured families.
    pub fn new(families: BTreeMap<String, FamilyConfig>) -> Schema {
        Schema { families }
    }

    /// dmp's own families with the built-in defaults (`e`, `s`, `m`).
    pub fn dmp_default() -> Schema {
        Schema::new(dmp_core::Config::defaults().store.families)
    }

    /// The settings of a family, if it exists.
    pub fn family(&self, name: &str) -> Option<&FamilyConfig> {
        self.families.get(name)
    }

    /// Every family.
    pub fn families(&self) -> impl Iterator<Item = (&String, &FamilyConfig)> {
        self.families.iter()
    }

    /// The TTL of a family in ms (None: forever).
    pub fn ttl_ms(&self, family: &str) -> Option<i64> {
        self.families
            .get(family)
            .and_then(|f| (f.ttl_days > 0).then(|| f.ttl_days as i64 * dmp_core::clock::DAY_MS))
    }

    /// Drops from `cells`, in HBase order, what a read as of `now` leaves out: cells of families
    /// not in the schema, versions beyond a family's `max_versions`, cells past its TTL. For
    /// cells put together outside the store (a segmenter's summary with the writes since), so
    /// they hold what a read of the row would.
    pub fn limit(&self, cells: &mut Vec<Cell>, now: i64) {
        merge::limit(cells, self, now);
    }
}

/// Where a read left off in a row's writes, for [`UserStore::get_since`]. Opaque; only the store
/// that gave it understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCursor {
    /// Which cached copy of the row the read came from.
    pub(crate) entry: u64,
    /// How many writes that copy had recorded.
    pub(crate) writes: u64,
}

/// The wide-column user store. Calls may block on I/O: call from worker threads or
/// `spawn_blocking`, not from an async task's hot loop.
pub trait UserStore: Send + Sync {
    /// Writes a batch of puts atomically (all or none) and durably per the store's fsync policy.
    fn put(&self, puts: &[Put]) -> Result<()>;
    /// Reads one row; `None` when it has no live cell.
    fn get(&self, get: &Get) -> Result<Option<Row>>;
    /// Reads one row as [`UserStore::get`] does, and where the read left off in the row's
    /// writes, when the store can later say what was written since ([`UserStore::get_since`]);
    /// by default it cannot (`None`).
    fn get_with_cursor(&self, get: &Get) -> Result<(Option<Row>, Option<ReadCursor>)> {
        Ok((self.get(get)?, None))
    }
    /// The cells written to `get.row` after the read that gave `cursor` (family by family as a
    /// read returns them: `get.projection` applied, TTL applied as of now, a later write of a
    /// coordinate winning, the families' version limits among these cells only, which a read of
    /// the whole row applies over all of them), and the new cursor. `None` when the store cannot
    /// tell (the row left its cache, a read folded later writes in, too many writes since, a
    /// `get` with filters other than a projection, a backend without a cursor): the caller then
    /// reads the row. Never a guess.
    fn get_since(&self, get: &Get, cursor: ReadCursor) -> Result<Option<(Vec<Cell>, ReadCursor)>> {
        let _ = (get, cursor);
        Ok(None)
    }
    /// Reads several rows (HBase `getMultiple`).
    fn get_many(&self, gets: &[Get]) -> Result<Vec<Option<Row>>> {
        gets.iter().map(|g| self.get(g)).collect()
    }
    /// Deletes a whole row, every family and version.
    fn delete_row(&self, row: &str) -> Result<()>;
    /// Deletes whole rows (a row may come twice; one that does not exist is no error). A backend
    /// that can does it in one write (the embedded store: one commit, where a `delete_row` each
    /// was a commit each); by default, [`UserStore::delete_row`] for each in turn.
    fn delete_rows(&self, rows: &[&str]) -> Result<()> {
        rows.iter().try_for_each(|r| self.delete_row(r))
    }
    /// Rows in key order, starting after `start_after` (or from the first), at most `limit`,
    /// each read with `template`'s filters.
    fn scan(&self, start_after: Option<&str>, limit: usize, template: &Get) -> Result<Vec<Row>>;
    /// Makes every acknowledged write durable on disk.
    fn flush(&self) -> Result<()>;
    /// The table schema.
    fn schema(&self) -> &Schema;
    /// A short name for logs and metric labels.
    fn backend_name(&self) -> &'static str;
}

/// Checks a row key: 1..=1024 bytes, no NUL (NUL terminates keys in the embedded layout).
pub fn check_row_key(row: &str) -> Result<()> {
    if row.is_empty() {
        return Err(StoreError::Rejected("empty row key".into()));
    }
    if row.len() > 1024 {
        return Err(StoreError::Rejected(format!(
            "row key is {} bytes, over the limit of 1024",
            row.len()
        )));
    }
    if row.as_bytes().contains(&0) {
        return Err(StoreError::Rejected("row key contains a NUL byte".into()));
    }
    Ok(())
}

/// Opens the store named by `url`. `embedded` needs the shared embedded database.
pub fn open(
    url: &str,
    db: Option<&embedded::EmbeddedDatabase>,
    cfg: &dmp_core::config::StoreConfig,
) -> Result<Arc<dyn UserStore>> {
    match url.split_once("://").map(|(s, _)| s).unwrap_or(url) {
        "embedded" => {
            let db = db.ok_or_else(|| StoreError::Unsupported {
                url: url.into(),
                reason: "the embedded store needs the embedded database to be opened".into(),
            })?;
            Ok(Arc::new(Instrumented::new(embedded::EmbeddedStore::open(
                db, cfg,
            )?)))
        }
        "hbase" => Err(StoreError::Unsupported {
            url: url.into(),
            reason: "the HBase Thrift backend is not implemented yet; use store = \"embedded\""
                .into(),
        }),
        other => Err(StoreError::Unsupported {
            url: url.into(),
            reason: format!("unknown scheme {other:?} (expected embedded or hbase://)"),
        }),
    }
}
