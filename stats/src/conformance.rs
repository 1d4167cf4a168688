//! One suite every counter backend passes (embedded in unit tests, Redis against a real
//! redis-server). Segment names carry a caller-chosen prefix so runs never meet in a shared Redis.

use crate::counters::{SegmentCounters, ALL};

/// A failed check: what was expected.
pub type CheckResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn err(e: crate::StatsError) -> String {
    e.to_string()
}

const DAY: u32 = 20_261_122;

type Check = fn(&dyn SegmentCounters, &str) -> CheckResult;

/// Runs every check; returns the names of the failed ones with the reason.
pub fn run(c: &dyn SegmentCounters, prefix: &str) -> Vec<(&'static str, String)> {
    let checks: [(&'static str, Check); 6] = [
        ("small_counts_are_exact", small_counts_are_exact),
        (
            "counts_are_visible_after_flush_within_hll_error",
            counts_are_visible_after_flush_within_hll_error,
        ),
        ("replays_do_not_inflate", replays_do_not_inflate),
        (
            "days_and_segments_are_separate",
            days_and_segments_are_separate,
        ),
        ("sketches_match_counts", sketches_match_counts),
        (
            "segments_lists_what_was_recorded",
            segments_lists_what_was_recorded,
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(name, f)| f(c, prefix).err().map(|e| (name, e)))
        .collect()
}

fn small_counts_are_exact(c: &dyn SegmentCounters, p: &str) -> CheckResult {
    let seg = format!("{p}small");
    for i in 0..7 {
        c.record(DAY, &format!("{p}u{i}"), &[&seg]);
    }
    c.flush().map_err(err)?;
    let n = c.count(&seg, DAY).map_err(err)?;
    // Exact unless two of the 7 share one of the 16384 registers (about 0.1% of runs).
    ensure!((6..=7).contains(&n), "7 users counted as {n}");
    ensure!(
        c.count(&format!("{p}nobody"), DAY).map_err(err)? == 0,
        "an unknown segment counts 0"
    );
    Ok(())
}

fn counts_are_visible_after_flush_within_hll_error(
    c: &dyn SegmentCounters,
    p: &str,
) -> CheckResult {
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    for i in 0..20_000 {
        let uid = format!("{p}user-{i}");
        if i % 4 == 0 {
            c.record(DAY, &uid, &[&a, &b]);
        } else {
            c.record(DAY, &uid, &[&a]);
        }
    }
    c.flush().map_err(err)?;
    let near = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.03;
    let (na, nb) = (
        c.count(&a, DAY).map_err(err)?,
        c.count(&b, DAY).map_err(err)?,
    );
    ensure!(near(na, 20_000), "a: {na} of 20000");
    ensure!(near(nb, 5_000), "b: {nb} of 5000");
    Ok(())
}

fn replays_do_not_inflate(c: &dyn SegmentCounters, p: &str) -> CheckResult {
    let seg = format!("{p}replayed");
    for _ in 0..3 {
        for i in 0..500 {
            c.record(DAY, &format!("{p}r{i}"), &[&seg]);
        }
        c.flush().map_err(err)?;
    }
    let once = c.count(&seg, DAY).map_err(err)?;
    for i in 0..500 {
        c.record(DAY, &format!("{p}r{i}"), &[&seg]);
    }
    c.flush().map_err(err)?;
    let again = c.count(&seg, DAY).map_err(err)?;
    ensure!(once == again, "{once} then {again} after a replay");
    Ok(())
}

fn days_and_segments_are_separate(c: &dyn SegmentCounters, p: &str) -> CheckResult {
    let (x, y) = (format!("{p}x"), format!("{p}y"));
    for i in 0..100 {
        c.record(DAY, &format!("{p}d{i}"), &[&x]);
    }
    for i in 0..30 {
        c.record(DAY + 1, &format!("{p}d{i}"), &[&y]);
    }
    c.flush().map_err(err)?;
    let got = [
        c.count(&x, DAY).map_err(err)?,
        c.count(&x, DAY + 1).map_err(err)?,
        c.count(&y, DAY).map_err(err)?,
        c.count(&y, DAY + 1).map_err(err)?,
    ];
    // Within HLL error (two users may share a register even at 100).
    let near = |g: u64, w: u64| g.abs_diff(w) <= (w * 3 / 100).max(2);
    ensure!(
        near(got[0], 100) && got[1] == 0 && got[2] == 0 && near(got[3], 30),
        "x/y by day: {got:?}, expected about [100, 0, 0, 30]"
    );
    Ok(())
}

fn sketches_match_counts(c: &dyn SegmentCounters, p: &str) -> CheckResult {
    let seg = format!("{p}sk");
    for i in 0..3_000 {
        c.record(DAY, &format!("{p}s{i}"), &[&seg]);
    }
    c.flush().map_err(err)?;
    let sketch = c
        .sketch(&seg, DAY)
        .map_err(err)?
        .ok_or("no sketch for a counted segment")?;
    let n = c.count(&seg, DAY).map_err(err)?;
    ensure!(
        sketch.count() == n,
        "sketch counts {} but count is {n}",
        sketch.count()
    );
    ensure!(
        c.sketch(&format!("{p}none"), DAY).map_err(err)?.is_none(),
        "a sketch for a segment nobody is in"
    );
    // Every recorded user is in the pseudo-segment `all` too.
    let all = c
        .sketch(ALL, DAY)
        .map_err(err)?
        .ok_or("no sketch for all")?;
    let mut union = all.clone();
    union.merge(&sketch);
    ensure!(
        union == all,
        "a user counted in a segment is missing from all"
    );
    Ok(())
}

fn segments_lists_what_was_recorded(c: &dyn SegmentCounters, p: &str) -> CheckResult {
    let seg = format!("{p}listed");
    c.record(DAY + 2, &format!("{p}l"), &[&seg]);
    c.flush().map_err(err)?;
    let all = c.segments().map_err(err)?;
    ensure!(
        all.contains(&(seg.clone(), DAY + 2)),
        "{seg} on {} missing from {} listed",
        DAY + 2,
        all.len()
    );
    ensure!(all.contains(&(ALL.to_string(), DAY + 2)), "all missing");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_counters_pass_the_suite() {
        let c = crate::EmbeddedCounters::in_memory();
        let failed = super::run(&c, "t:");
        assert!(failed.is_empty(), "{failed:?}");
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let c = crate::EmbeddedCounters::open(&db).unwrap();
        let failed = super::run(&c, "t:");
        assert!(failed.is_empty(), "{failed:?}");
    }
}
