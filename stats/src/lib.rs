//! `dmp-stats`: segment counters.
//!
//! - [`hll`]: HyperLogLog with Redis's algorithm (same hash, registers and estimator as
//!   PFADD/PFCOUNT), one byte per register for fast updates and merges;
//! - [`redis_format`]: the same sketch in Redis's own bytes (sparse and dense encodings, cached
//!   count), updated step for step as redis-server does, so our bytes equal `GET`'s (golden test
//!   against a real redis-server) and sketches taken from Redis load;
//! - [`counters`]: the [`SegmentCounters`] trait the segmenter hands live memberships to, and the
//!   embedded implementation (in memory, flushed to the embedded database, retention in days);
//! - [`redis_counters`]: the same in Redis through a Lua script (batched or per user);
//! - [`conformance`]: checks both backends pass;
//! - [`theta`]: theta (KMV) sketches kept beside the HyperLogLogs (embedded backend), which
//!   resolve intersections and differences HyperLogLog registers cannot;
//! - [`audience`]: estimates of segment expressions (and, or, not) over day ranges.

pub mod audience;
pub mod conformance;
pub mod counters;
pub mod hll;
pub mod joint;
pub mod redis_counters;
pub mod redis_format;
pub mod theta;

pub use counters::{
    day_of, days_before, epoch_ms_of, valid_day, EmbeddedCounters, SegmentCounters, StatsError, ALL,
};
pub use hll::Hll;
pub use redis_format::RedisHll;

/// Opens the counter backend named by `backends.stats`: `embedded` (needs the embedded database)
/// or `redis://host:port[/db]`.
pub fn open(
    url: &str,
    db: Option<&dmp_store::embedded::EmbeddedDatabase>,
    cfg: &dmp_core::config::StatsConfig,
) -> Result<std::sync::Arc<dyn SegmentCounters>, StatsError> {
    if url == "embedded" {
        let db = db.ok_or_else(|| {
            StatsError::Config(
                "backends.stats = \"embedded\" needs the embedded database in this process".into(),
            )
        })?;
        return Ok(std::sync::Arc::new(
            EmbeddedCounters::open(db)?
                .with_retention(cfg.retention_days)
                .with_theta(cfg.theta_lg_k),
        ));
    }
    if url.starts_with("redis://") {
        let opts = redis_counters::RedisOptions::from_config(url, cfg);
        return Ok(std::sync::Arc::new(redis_counters::RedisCounters::open(
            opts,
        )?));
    }
    Err(StatsError::Config(format!(
        "backends.stats: {url:?} is not \"embedded\" or a redis:// URL"
    )))
}
