//! Joint maximum-likelihood estimation of `|A \ B|`, `|B \ A|` and `|A ∩ B|` from the registers
//! of two HyperLogLog sketches, after O. Ertl, "New cardinality estimation algorithms for
//! HyperLogLog sketches" (2017), which estimates the three together from how the two sketches'
//! registers compare instead of subtracting noisy union counts.
//!
//! Model (Poisson approximation, as in the paper): the elements of `A \ B`, `B \ A` and `A ∩ B`
//! reach each register at rates `a`, `b` and `x` (the cardinalities over the 16384 registers).
//! A register's value is the largest rank among its elements, and a rank is at least `k` with
//! probability `2^-(k-1)` (up to 51, the 50 hash bits all zero). So with `f(k) = 2^-k` (and
//! `f(51) = 0`):
//!
//! `P(K_A <= k1, K_B <= k2) = exp(-(a f(k1) + b f(k2) + x f(min(k1, k2))))`
//!
//! and the probability of each register pair `(k1, k2)` follows by differences, written so that
//! no two nearly equal numbers are subtracted (see [`pair_ln_p`]). The log-likelihood sums the
//! pairs' log-probabilities (2704 possible pairs, counted once per sketch pair), and is
//! maximised over `(ln a, ln b, ln x)` by Nelder-Mead. Standard errors come from the observed
//! Fisher information (the inverse Hessian at the maximum).

use crate::hll::{Hll, REGISTERS};

const Q: usize = 50;
const VALUES: usize = Q + 2; // register values 0..=51

fn f(k: usize) -> f64 {
    if k > Q {
        0.0
    } else {
        (-(k as f64)).exp2()
    }
}

/// `f(k-1) - f(k)` for `k >= 1`.
fn d(k: usize) -> f64 {
    if k > Q {
        f(Q)
    } else {
        (-(k as f64)).exp2()
    }
}

/// `ln P(max rank = k)` for a Poisson(μ) stream of elements.
fn ln_g(mu: f64, k: usize) -> f64 {
    if k == 0 {
        -mu
    } else {
        -mu * f(k) + (-(-mu * d(k)).exp_m1()).ln()
    }
}

/// `ln P(K_A = k1, K_B = k2)` with per-register rates `a`, `b`, `x`.
pub(crate) fn pair_ln_p(a: f64, b: f64, x: f64, k1: usize, k2: usize) -> f64 {
    use std::cmp::Ordering;
    match k1.cmp(&k2) {
        Ordering::Less => ln_g(a + x, k1) + ln_g(b, k2),
        Ordering::Greater => ln_g(a, k1) + ln_g(b + x, k2),
        Ordering::Equal if k1 == 0 => -(a + b + x),
        Ordering::Equal => {
            let dk = d(k1);
            // 1 - e^{-(a+x)d} - e^{-(b+x)d} + e^{-(a+b+x)d}
            //   = (1 - e^{-xd}) + e^{-xd} (1 - e^{-ad}) (1 - e^{-bd})
            let bracket =
                -(-x * dk).exp_m1() + (-x * dk).exp() * (-a * dk).exp_m1() * (-b * dk).exp_m1();
            -(a + b + x) * f(k1) + bracket.ln()
        }
    }
}

/// The three estimated cardinalities with standard errors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Joint {
    /// `|A \ B|`.
    pub a_only: f64,
    /// `|B \ A|`.
    pub b_only: f64,
    /// `|A ∩ B|`.
    pub both: f64,
    /// Standard errors of the three, in the same order.
    pub se: [f64; 3],
}

/// The register pairs of two sketches: (k1, k2, how many registers).
fn pairs(a: &Hll, b: &Hll) -> Vec<(usize, usize, f64)> {
    let mut n = vec![0u32; VALUES * VALUES];
    for (r1, r2) in a.registers().iter().zip(b.registers()) {
        n[(*r1 as usize).min(VALUES - 1) * VALUES + (*r2 as usize).min(VALUES - 1)] += 1;
    }
    n.iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| (i / VALUES, i % VALUES, *c as f64))
        .collect()
}

fn nll(p: &[(usize, usize, f64)], a: f64, b: f64, x: f64) -> f64 {
    -p.iter()
        .map(|(k1, k2, n)| n * pair_ln_p(a, b, x, *k1, *k2))
        .sum::<f64>()
}

/// Nelder-Mead minimisation of `f` from `start` with initial steps `step`.
fn nelder_mead(f: impl Fn(&[f64; 3]) -> f64, start: [f64; 3], step: f64) -> [f64; 3] {
    let mut simplex: Vec<([f64; 3], f64)> = (0..4)
        .map(|i| {
            let mut p = start;
            if i > 0 {
                p[i - 1] += step;
            }
            (p, f(&p))
        })
        .collect();
    for _ in 0..3000 {
        simplex.sort_by(|l, r| l.1.total_cmp(&r.1));
        let (best, worst) = (simplex[0].1, simplex[3].1);
        if (worst - best).abs() <= 1e-10 * best.abs().max(1e-10) {
            break;
        }
        let mut c = [0.0; 3];
        for (p, _) in &simplex[..3] {
            for k in 0..3 {
                c[k] += p[k] / 3.0;
            }
        }
        let towards = |t: f64| {
            let mut p = [0.0; 3];
            for k in 0..3 {
                p[k] = c[k] + t * (simplex[3].0[k] - c[k]);
            }
            p
        };
        let r = towards(-1.0);
        let fr = f(&r);
        if fr < simplex[0].1 {
            let e = towards(-2.0);
            let fe = f(&e);
            simplex[3] = if fe < fr { (e, fe) } else { (r, fr) };
        } else if fr < simplex[2].1 {
            simplex[3] = (r, fr);
        } else {
            let (ct, fc) = if fr < simplex[3].1 {
                let p = towards(-0.5);
                (p, f(&p))
            } else {
                let p = towards(0.5);
                (p, f(&p))
            };
            if fc < simplex[3].1.min(fr) {
                simplex[3] = (ct, fc);
            } else {
                // Shrink towards the best point.
                let b0 = simplex[0].0;
                for (p, fp) in simplex.iter_mut().skip(1) {
                    for k in 0..3 {
                        p[k] = b0[k] + 0.5 * (p[k] - b0[k]);
                    }
                    *fp = f(p);
                }
            }
        }
    }
    simplex.sort_by(|l, r| l.1.total_cmp(&r.1));
    simplex[0].0
}

/// Inverse of a symmetric 3x3 matrix (None when singular or not positive definite).
fn inverse(m: [[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    if !(det.is_finite() && det > 0.0 && m[0][0] > 0.0) {
        return None;
    }
    let mut inv = [[0.0; 3]; 3];
    for (i, row) in inv.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let (r0, r1) = ((j + 1) % 3, (j + 2) % 3);
            let (c0, c1) = ((i + 1) % 3, (i + 2) % 3);
            *v = (m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]) / det;
        }
    }
    Some(inv)
}

/// Estimates `|A \ B|`, `|B \ A|` and `|A ∩ B|` jointly from two sketches.
pub fn estimate(a: &Hll, b: &Hll) -> Joint {
    let m = REGISTERS as f64;
    let p = pairs(a, b);
    // Start from inclusion-exclusion on the unions, kept positive.
    let (ca, cb) = (a.count() as f64, b.count() as f64);
    let mut u = a.clone();
    u.merge(b);
    let cu = u.count() as f64;
    if cu == 0.0 {
        return Joint {
            a_only: 0.0,
            b_only: 0.0,
            both: 0.0,
            se: [0.0; 3],
        };
    }
    let floor = 1e-3_f64.max(cu * 1e-6) / m;
    let x0 = ((ca + cb - cu) / m).max(floor.max(0.01 * ca.min(cb) / m));
    let a0 = (ca / m - x0).max(floor);
    let b0 = (cb / m - x0).max(floor);
    // Bounded below so that a set absent on one side cannot drive a rate to exactly 0.
    let lo = (1e-4 / m).ln();
    let clamp = |t: &[f64; 3]| t.map(|v| v.max(lo));
    let obj = |t: &[f64; 3]| {
        let t = clamp(t);
        nll(&p, t[0].exp(), t[1].exp(), t[2].exp())
    };
    let best = clamp(&nelder_mead(obj, [a0.ln(), b0.ln(), x0.ln()], 0.3));
    let est = best.map(f64::exp);
    // Observed information: the Hessian of the negative log-likelihood in (a, b, x).
    let g = |v: [f64; 3]| nll(&p, v[0].max(1e-12), v[1].max(1e-12), v[2].max(1e-12));
    let h: [f64; 3] = est.map(|v| (v * 1e-3).max(1e-6));
    let mut hess = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let at = |si: f64, sj: f64| {
                let mut v = est;
                v[i] += si * h[i];
                v[j] += sj * h[j];
                g(v)
            };
            hess[i][j] = (at(1.0, 1.0) - at(1.0, -1.0) - at(-1.0, 1.0) + at(-1.0, -1.0))
                / (4.0 * h[i] * h[j]);
        }
    }
    // Fallback errors: the unions' own (0.81% each), as inclusion-exclusion would have them.
    let rse = crate::audience::HLL_RSE;
    let fallback = [
        ((cu * rse).powi(2) + (cb * rse).powi(2)).sqrt(),
        ((cu * rse).powi(2) + (ca * rse).powi(2)).sqrt(),
        ((ca * rse).powi(2) + (cb * rse).powi(2) + (cu * rse).powi(2)).sqrt(),
    ];
    let se = match inverse(hess) {
        Some(cov) => [0, 1, 2].map(|k| {
            let v = cov[k][k];
            if v.is_finite() && v > 0.0 {
                v.sqrt() * m
            } else {
                fallback[k]
            }
        }),
        None => fallback,
    };
    Joint {
        a_only: est[0] * m,
        b_only: est[1] * m,
        both: est[2] * m,
        se,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_probabilities_sum_to_one() {
        for (a, b, x) in [(0.1, 0.2, 0.05), (3.0, 1.0, 10.0), (500.0, 2.0, 0.001)] {
            let total: f64 = (0..VALUES)
                .flat_map(|k1| (0..VALUES).map(move |k2| (k1, k2)))
                .map(|(k1, k2)| pair_ln_p(a, b, x, k1, k2).exp())
                .sum();
            assert!((total - 1.0).abs() < 1e-9, "{a} {b} {x}: {total}");
        }
    }

    fn sets(only_a: u64, only_b: u64, both: u64, seed: u64) -> (Hll, Hll) {
        let (mut a, mut b) = (Hll::new(), Hll::new());
        let e = |i: u64| format!("{seed}-{i}").into_bytes();
        for i in 0..only_a {
            a.add(&e(i));
        }
        for i in only_a..only_a + only_b {
            b.add(&e(i));
        }
        for i in only_a + only_b..only_a + only_b + both {
            a.add(&e(i));
            b.add(&e(i));
        }
        (a, b)
    }

    #[test]
    fn given_known_sets_when_estimated_jointly_then_close_and_covered() {
        for (oa, ob, both) in [
            (50_000u64, 50_000u64, 50_000u64),
            (100_000, 60_000, 5_000),
            (3_000, 2_000, 1_000),
            (200_000, 200_000, 0),
        ] {
            let (a, b) = sets(oa, ob, both, oa + both);
            let j = estimate(&a, &b);
            let tol = |truth: u64, got: f64, se: f64| {
                (got - truth as f64).abs() <= 3.0 * se + 0.02 * truth as f64 + 5.0
            };
            assert!(tol(both, j.both, j.se[2]), "both {both}: {j:?}");
            assert!(tol(oa, j.a_only, j.se[0]), "a only {oa}: {j:?}");
            assert!(tol(ob, j.b_only, j.se[1]), "b only {ob}: {j:?}");
        }
    }

    /// Over repeated trials, the joint estimate of a small intersection has a smaller error than
    /// inclusion-exclusion on the same sketches.
    #[test]
    fn given_small_intersections_when_compared_then_joint_beats_inclusion_exclusion() {
        let (mut err_joint, mut err_ie) = (0.0, 0.0);
        for seed in 0..8 {
            let (a, b) = sets(200_000, 200_000, 8_000, 1000 + seed);
            let j = estimate(&a, &b);
            let mut u = a.clone();
            u.merge(&b);
            let ie = a.count() as f64 + b.count() as f64 - u.count() as f64;
            err_joint += (j.both - 8_000.0).powi(2);
            err_ie += (ie - 8_000.0).powi(2);
        }
        eprintln!(
            "rmse over 8 trials: joint {:.0}, inclusion-exclusion {:.0}",
            (err_joint / 8.0).sqrt(),
            (err_ie / 8.0).sqrt()
        );
        assert!(
            err_joint * 4.0 < err_ie,
            "rmse joint {:.0} vs inclusion-exclusion {:.0}",
            (err_joint / 8.0).sqrt(),
            (err_ie / 8.0).sqrt()
        );
    }
}
