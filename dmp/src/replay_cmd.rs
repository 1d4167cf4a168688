//! `dmp replay --group NAME [--topic T] (--since 24h | --from TIME)`: moves a consumer group back
//! (or forward) to a time on the configured bus, so a partner re-reads what it lost or a role
//! reprocesses. The group must have no live member (stop its consumers first; on the embedded bus,
//! stop `dmp run`, which owns the data dir).

use anyhow::Context;

use crate::{backends, out};

/// Arguments of `dmp replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The consumer group to move.
    #[arg(long)]
    pub group: String,
    /// The topic (default: `topics.segments`, what partners read).
    #[arg(long)]
    pub topic: Option<String>,
    /// How far back: a number and a unit, s, m, h or d (e.g. 24h).
    #[arg(long, conflicts_with = "from", required_unless_present = "from")]
    pub since: Option<String>,
    /// An instant: RFC 3339 (2026-11-21T10:00:00Z) or epoch milliseconds.
    #[arg(long)]
    pub from: Option<String>,
}

/// `24h` -> milliseconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = n.parse().ok()?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms)
}

fn parse_instant(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Runs the command.
pub async fn run(cfg: dmp_core::Config, args: ReplayArgs) -> anyhow::Result<()> {
    let ts = match (&args.since, &args.from) {
        (Some(d), _) => {
            let back = parse_duration(d).with_context(|| {
                format!("--since {d:?}: expected a number and s, m, h or d (e.g. 24h)")
            })?;
            dmp_core::clock::now_ms() - back
        }
        (None, Some(t)) => parse_instant(t).with_context(|| {
            format!("--from {t:?}: expected RFC 3339 (2026-11-21T10:00:00Z) or epoch ms")
        })?,
        (None, None) => anyhow::bail!("give --since or --from"),
    };
    let topic = args.topic.clone().unwrap_or(cfg.topics.segments.clone());
    let (db, bus) = backends::Backends::open_bus_only(&cfg)?;
    let offsets = bus
        .seek_group_to_time(&args.group, &topic, ts)
        .await
        .with_context(|| format!("cannot move group {:?} on {topic}", args.group))?;
    out(format_args!(
        "group {} on {topic} moved to {}:",
        args.group,
        chrono::DateTime::from_timestamp_millis(ts)
            .map_or_else(|| ts.to_string(), |t| t.to_rfc3339())
    ))?;
    for (p, o) in offsets.iter().enumerate() {
        out(format_args!("  partition {p}: offset {o}"))?;
    }
    drop(bus);
    backends::close_db(db.as_ref())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_parse_with_units() {
        use super::parse_duration as d;
        assert_eq!(d("24h"), Some(86_400_000));
        assert_eq!(d("90s"), Some(90_000));
        assert_eq!(d("7d"), Some(7 * 86_400_000));
        assert_eq!(d("15m"), Some(900_000));
        assert_eq!(d("24"), None);
        assert_eq!(d("h"), None);
        assert_eq!(d("2w"), None);
    }
}
