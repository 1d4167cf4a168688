//! The storage writer's metrics, declared once.

/// Events read from `dmp.events`, by `outcome` (`written`, `dead_letter`) (counter).
pub const EVENTS: &str = "dmp_storage_writer_events_total";
/// Events sent to the dead-letter topic, by `reason` (a fixed set of codes) (counter).
pub const DEAD_LETTERS: &str = "dmp_storage_writer_dead_letters_total";
/// Events whose `ip` was not an address (stored without ip and geo) (counter).
pub const BAD_IPS: &str = "dmp_storage_writer_bad_ips_total";
/// Time an event waited in `dmp.events` before it was read, from its message timestamp
/// (histogram, seconds).
pub const WAIT: &str = "dmp_storage_writer_topic_wait_seconds";
/// Events per batch (histogram).
pub const BATCH_EVENTS: &str = "dmp_storage_writer_batch_events";
/// Time to write a batch's cells to the store (histogram, seconds).
pub const STORE_WRITE: &str = "dmp_storage_writer_store_write_seconds";
/// Time from reading a batch to its changes being emitted (histogram, seconds).
pub const BATCH_DURATION: &str = "dmp_storage_writer_batch_duration_seconds";
/// Records emitted on `dmp.user-changes` (counter).
pub const CHANGES: &str = "dmp_storage_writer_changes_emitted_total";
/// Store or bus failures that made a batch retry, by `stage` (counter).
pub const RETRIES: &str = "dmp_storage_writer_retries_total";
