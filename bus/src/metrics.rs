//! The bus's metrics, declared once. Labels: `backend`, `topic` (a handful of configured names),
//! `kind` (bounded).

/// Records produced (counter).
pub const PRODUCED_RECORDS: &str = "dmp_bus_produced_records_total";
/// Bytes produced, keys and values (counter).
pub const PRODUCED_BYTES: &str = "dmp_bus_produced_bytes_total";
/// Time a produce batch took to be acknowledged (histogram, seconds).
pub const PRODUCE_DURATION: &str = "dmp_bus_produce_duration_seconds";
/// Records handed to consumers (counter).
pub const CONSUMED_RECORDS: &str = "dmp_bus_consumed_records_total";
/// Embedded reads of a partition by `source`: `memory` (its tail) or `database` (counter).
pub const TAIL_READS: &str = "dmp_bus_tail_reads_total";
/// Bytes the embedded bus keeps in its partitions' tails (gauge).
pub const TAIL_BYTES: &str = "dmp_bus_tail_bytes";
/// Errors by `kind` (counter).
pub const ERRORS: &str = "dmp_bus_errors_total";
/// Records deleted by retention (counter).
pub const RETENTION_DELETED_RECORDS: &str = "dmp_bus_retention_deleted_records_total";
/// Records removed from compacted topics by compaction (counter).
pub const COMPACTED_RECORDS: &str = "dmp_bus_compacted_records_total";
/// Times a Kafka consumer exceeded `max.poll.interval.ms` (counter).
pub const MAX_POLL_EXCEEDED: &str = "dmp_bus_max_poll_exceeded_total";
/// Times a Kafka consumer paused its partitions because the application was behind (counter).
pub const CONSUMER_PAUSES: &str = "dmp_bus_consumer_pauses_total";
/// Records buffered in a Kafka consumer, not yet handed out (gauge).
pub const CONSUMER_BUFFERED_RECORDS: &str = "dmp_bus_consumer_buffered_records";
/// Partition rebalances seen by a consumer, by `event` (assign, revoke) (counter).
pub const REBALANCES: &str = "dmp_bus_rebalances_total";
