//! `dmp-stats`: segment counters.
//!
//! - [`hll`]: HyperLogLog with Redis's algorithm (same hash, registers and estimator as
//!   PFADD/PFCOUNT; checked against a real redis-server by the golden test);
//! - [`counters`]: the [`SegmentCounters`] trait the segmenter hands live memberships to, and the
//!   embedded implementation (in memory, flushed to the embedded database).
//!
//! Not built yet (stats issue): Redis's byte format and sparse encoding, the `redis` backend
//! with its Lua script, retention, and the audience estimators and API.

pub mod counters;
pub mod hll;

pub use counters::{day_of, EmbeddedCounters, SegmentCounters, StatsError, ALL};
pub use hll::Hll;
