//! `dmp-stats`: segment counters.
//!
//! - [`hll`]: HyperLogLog with Redis's algorithm (same hash, registers and estimator as
//!   PFADD/PFCOUNT), one byte per register for fast updates and merges;
//! - [`redis_format`]: the same sketch in Redis's own bytes (sparse and dense encodings, cached
//!   count), updated step for step as redis-server does, so our bytes equal `GET`'s (golden test
//!   against a real redis-server) and sketches taken from Redis load;
//! - [`counters`]: the [`SegmentCounters`] trait the segmenter hands live memberships to, and the
//!   embedded implementation (in memory, flushed to the embedded database).
//!
//! Not built yet (stats issue): the `redis` counter backend with its Lua script, retention, and
//! the audience estimators and API.

pub mod counters;
pub mod hll;
pub mod redis_format;

pub use counters::{day_of, EmbeddedCounters, SegmentCounters, StatsError, ALL};
pub use hll::Hll;
pub use redis_format::RedisHll;
