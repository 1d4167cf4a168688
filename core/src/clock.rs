//! Wall-clock helpers. Everything in dmp speaks epoch milliseconds (`i64`), as Kafka and HBase do.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;
