#![allow(missing_docs)] // bench binary
//! Accuracy of intersection estimates on synthetic sets with known truth (issue: sizes 10K..10M,
//! Jaccard 0.001..0.5; our estimator vs inclusion-exclusion vs Apache DataSketches theta
//! sketches with k = 4096; at least 3x smaller error than inclusion-exclusion where the
//! intersection is 1-10% of the union, no worse than theta, intervals covering the truth >= 90%).
//!
//! `cargo bench -p dmp-stats --bench accuracy` prints a Markdown table.
//! Knobs: `DMP_BENCH_MAX_N` (largest set size, default 10000000).

use datasketches::theta::{ThetaIntersection, ThetaSketchBuilder};
use dmp_stats::theta::{sample_hash, ThetaUpdate};
use dmp_stats::Hll;

/// The theta sketches kept beside the HLLs (the embedded backend's default).
const LG_K: u8 = dmp_stats::theta::DEFAULT_LG_K;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Trial {
    truth: f64,
    ie: f64,
    ie_se: f64,
    mle: f64,
    mle_se: f64,
    theta: f64,
    ours: dmp_stats::theta::Answer,
}

/// A = [0, n), B = [n - i, 2n - i): |A| = |B| = n, |A ∩ B| = i.
fn trial(n: u64, i: u64, seed: u64) -> Trial {
    let (mut ha, mut hb) = (Hll::new(), Hll::new());
    let mut ta = ThetaSketchBuilder::default().lg_k(12).build().unwrap();
    let mut tb = ThetaSketchBuilder::default().lg_k(12).build().unwrap();
    let (mut oa, mut ob) = (ThetaUpdate::new(LG_K), ThetaUpdate::new(LG_K));
    let base = seed << 40;
    for e in 0..2 * n - i {
        let v = mix(base + e);
        let hash = dmp_stats::hll::hash_of(&v.to_le_bytes());
        let sample = sample_hash(hash);
        if e < n {
            ha.add_hash(hash);
            ta.update(v);
            oa.update(sample);
        }
        if e >= n - i {
            hb.add_hash(hash);
            tb.update(v);
            ob.update(sample);
        }
    }
    let mut u = ha.clone();
    u.merge(&hb);
    let (ca, cb, cu) = (ha.count() as f64, hb.count() as f64, u.count() as f64);
    let rse = dmp_stats::audience::HLL_RSE;
    let ie = ca + cb - cu;
    let ie_se = ((ca * rse).powi(2) + (cb * rse).powi(2) + (cu * rse).powi(2)).sqrt();
    let j = dmp_stats::joint::estimate(&ha, &hb);
    let mut x = ThetaIntersection::default();
    x.update(&ta).unwrap();
    x.update(&tb).unwrap();
    let theta = x.to_sketch(true).map_or(0.0, |s| s.estimate());
    let ours = dmp_stats::theta::evaluate(&[&oa.compact(), &ob.compact()], None, |m| m == 3);
    Trial {
        truth: i as f64,
        ie,
        ie_se,
        mle: j.both,
        mle_se: j.se[2],
        theta,
        ours,
    }
}

/// How many times smaller `ours` is ("exact" when it has no error).
fn ratio(other: f64, ours: f64) -> String {
    if ours == 0.0 {
        "exact".into()
    } else {
        format!("{:.1}x", other / ours)
    }
}

fn rel_rmse(ts: &[Trial], f: impl Fn(&Trial) -> f64) -> f64 {
    let mse = ts.iter().map(|t| (f(t) - t.truth).powi(2)).sum::<f64>() / ts.len() as f64;
    mse.sqrt() / ts[0].truth
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let max_n: u64 = std::env::var("DMP_BENCH_MAX_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    println!("| n = \\|A\\| = \\|B\\| | Jaccard | intersection | trials | inclusion-exclusion | joint MLE (HLL only) | ours: theta k=2^{LG_K} | DataSketches theta k=4096 | ours vs IE | ours vs DataSketches | ours covered | MLE covered | IE covered |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut covered, mut total) = (0usize, 0usize);
    let (mut mle_covered, mut mle_total) = (0usize, 0usize);
    let mut seed = 1;
    for n in [10_000u64, 100_000, 1_000_000, 10_000_000] {
        if n > max_n {
            break;
        }
        let trials = match n {
            10_000 | 100_000 => 50,
            1_000_000 => 20,
            _ => 8,
        };
        for jac in [0.001f64, 0.01, 0.05, 0.1, 0.5] {
            let i = ((2 * n) as f64 * jac / (1.0 + jac)).round() as u64;
            let ts: Vec<Trial> = (0..trials)
                .map(|_| {
                    seed += 1;
                    trial(n, i, seed)
                })
                .collect();
            let cover = |est: fn(&Trial) -> (f64, f64)| {
                ts.iter()
                    .filter(|t| {
                        let (e, se) = est(t);
                        (e - t.truth).abs() <= 2.0 * se
                    })
                    .count()
            };
            let mle_cov = cover(|t| (t.mle, t.mle_se));
            let ours_cov = ts
                .iter()
                .filter(|t| t.ours.low <= t.truth && t.truth <= t.ours.high)
                .count();
            let ie_cov = cover(|t| (t.ie, t.ie_se));
            covered += ours_cov;
            mle_covered += mle_cov;
            mle_total += ts.len();
            total += ts.len();
            let (ie, mle, th, ours) = (
                rel_rmse(&ts, |t| t.ie),
                rel_rmse(&ts, |t| t.mle),
                rel_rmse(&ts, |t| t.theta),
                rel_rmse(&ts, |t| t.ours.estimate),
            );
            println!(
                "| {n} | {jac} | {i} | {trials} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {} | {} | {ours_cov}/{trials} | {mle_cov}/{trials} | {ie_cov}/{trials} |",
                ie * 100.0,
                mle * 100.0,
                ours * 100.0,
                th * 100.0,
                ratio(ie, ours),
                ratio(th, ours),
            );
        }
    }
    println!(
        "\nour intervals (score interval, two standard errors) covered the truth in {covered} of {total} trials ({:.1}%)",
        100.0 * covered as f64 / total as f64
    );
    println!(
        "joint MLE intervals covered the truth in {mle_covered} of {mle_total} trials ({:.1}%)",
        100.0 * mle_covered as f64 / mle_total as f64
    );
}
