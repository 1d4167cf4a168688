//! `dmp-storage-writer`: events on `dmp.events` become cells in the user store, then one record
//! per changed user on `dmp.user-changes`.
//!
//! For each batch polled from consumer group `storage-writer` ([`writer::StorageWriter`]):
//! 1. each record is decoded and validated as an [`dmp_core::Event`] (its default `ts` is the
//!    message timestamp); an invalid one goes to `dmp.dead-letter` with the reason;
//! 2. each event is enriched ([`enrich::Enricher`]: IP as an integer after the privacy setting,
//!    geo from GeoLite2-City, user agent dictionary id, browser / OS / device, crawler flag) and
//!    turned into cells ([`cells`]);
//! 3. the cells of the whole batch are written in one store batch;
//! 4. one [`dmp_core::UserChange`] per distinct uid is produced on `dmp.user-changes` (message
//!    timestamp = write time);
//! 5. only then are the batch's offsets committed.
//!
//! A crash anywhere replays the batch: cell writes are idempotent, and a change record may be
//! emitted twice, which the segmenter's dedupe absorbs. Store or bus failures retry the batch with
//! backoff and never commit past it.

pub mod cells;
pub mod enrich;
mod metrics;
pub mod writer;

pub use enrich::{Enricher, Enrichment};
pub use writer::StorageWriter;
