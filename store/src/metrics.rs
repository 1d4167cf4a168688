//! The store's metrics, declared once. Labels: `backend`, `op`, `kind` (all bounded).

/// Cells written (counter).
pub const WRITE_CELLS: &str = "dmp_store_write_cells_total";
/// Rows written (counter).
pub const WRITE_ROWS: &str = "dmp_store_write_rows_total";
/// Duration of an operation, by `op` (histogram, seconds).
pub const OP_DURATION: &str = "dmp_store_operation_duration_seconds";
/// Cells returned per row read (histogram).
pub const READ_CELLS: &str = "dmp_store_read_cells";
/// Rows repacked into one value (counter).
pub const REPACKS: &str = "dmp_store_repacks_total";
/// Errors by `op` and `kind` (counter).
pub const ERRORS: &str = "dmp_store_errors_total";
/// Cells dropped by TTL during compaction (counter).
pub const TTL_DROPPED_CELLS: &str = "dmp_store_ttl_dropped_cells_total";
/// Whole-row reads the embedded store answered from its row cache (counter).
pub const ROW_CACHE_HITS: &str = "dmp_store_row_cache_hits_total";
/// Whole-row reads that went to the LSM while the row cache is on (counter).
pub const ROW_CACHE_MISSES: &str = "dmp_store_row_cache_misses_total";
/// Bytes the embedded store's row cache holds, of `store.row_cache_mb` (gauge, every second).
pub const ROW_CACHE_BYTES: &str = "dmp_store_row_cache_bytes";
/// Rows in the embedded store's row cache (gauge, every second).
pub const ROW_CACHE_ROWS: &str = "dmp_store_row_cache_rows";
/// Bytes in the embedded database's memtables, bus and store together (gauge, sampled every
/// second). Bounded by about 2 x 5 x `embedded.memtable_mb` while flushes keep up.
pub const WRITE_BUFFER_BYTES: &str = "dmp_store_write_buffer_bytes";
/// Memtables of the embedded database sealed and waiting to be flushed (gauge, every second).
pub const SEALED_MEMTABLES: &str = "dmp_store_sealed_memtables";
