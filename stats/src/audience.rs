//! Audience estimates: how many users are in an expression of segments over a range of days.
//!
//! Expressions: segment ids combined with `and`, `or`, `not` (also `&`, `|`, `!`) and
//! parentheses; `not` is relative to the pseudo-segment [`ALL`] (every evaluated user). Each
//! segment's sketch over the range is the union (register-wise max) of its daily sketches.
//!
//! When the backend keeps theta sketches beside the HyperLogLogs (the embedded one does,
//! [`crate::theta`]), they answer first, for every shape of expression:
//! - `exact`: every sketch involved still held all its users (up to `k` per day), so the answer
//!   is a count;
//! - `union+theta`: a plain union, counted by the merged HyperLogLog and by the theta sample,
//!   the two combined by inverse variance;
//! - `theta`: anything else, from the sample elements below the smallest threshold, each tested
//!   against the expression; the interval is the score interval of that sample count. It is
//!   4-100x more accurate than inclusion-exclusion where the answer is 0.1-10% of the union
//!   (docs/benchmarks.md).
//!
//! Without theta sketches (the Redis backend, or a day counted before they were kept), the
//! HyperLogLogs answer, by the shape of the expression (`P`, `Q`: one segment or an `or` of
//! segments):
//! - `P` (a union): the merged sketch's count (`method: "union"`);
//! - `P and Q`, `P and not Q`, `not P`: the joint maximum-likelihood estimate of the two sketches'
//!   difference and intersection from their registers ([`crate::joint`], `method: "joint-mle"`),
//!   with its standard error from the Fisher information. On intersections that are a few percent
//!   of the union it is several times more accurate than inclusion-exclusion (docs/benchmarks.md);
//! - anything else: inclusion-exclusion on HyperLogLog unions (`method: "inclusion-exclusion"`):
//!   with the k segments of the expression, every Venn region is a signed sum of union counts,
//!   and the answer is the sum of the regions the expression selects. Each union count has a
//!   relative standard error of 1.04/sqrt(16384) = 0.81%, added in quadrature.
//!
//! Intervals are two standard errors. `too_small` flags answers whose interval is wider than the
//! answer itself: an intersection too small a share of the union to be resolved.

use std::collections::BTreeSet;

use crate::counters::{days_before, epoch_ms_of, valid_day, SegmentCounters, StatsError, ALL};
use crate::hll::Hll;

/// Most segments in one expression (2^k union counts are computed).
pub const MAX_SEGMENTS: usize = 10;
/// Longest day range.
pub const MAX_DAYS: u32 = 366;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// A segment id.
    Segment(String),
    /// not.
    Not(Box<Expr>),
    /// and.
    And(Box<Expr>, Box<Expr>),
    /// or.
    Or(Box<Expr>, Box<Expr>),
}

/// A bad expression: the character position (1-based) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at character {pos}: {reason}")]
pub struct ExprError {
    /// 1-based character position.
    pub pos: usize,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Id(String),
    And,
    Or,
    Not,
    Open,
    Close,
    End,
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ExprError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push((Tok::Open, pos));
                i += 1;
            }
            ')' => {
                out.push((Tok::Close, pos));
                i += 1;
            }
            '&' => {
                out.push((Tok::And, pos));
                i += 1;
            }
            '|' => {
                out.push((Tok::Or, pos));
                i += 1;
            }
            '!' => {
                out.push((Tok::Not, pos));
                i += 1;
            }
            c if c.is_alphanumeric() || "_-.:".contains(c) => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || "_-.:".contains(chars[i])) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                out.push((
                    match word.to_ascii_lowercase().as_str() {
                        "and" => Tok::And,
                        "or" => Tok::Or,
                        "not" => Tok::Not,
                        _ => Tok::Id(word),
                    },
                    pos,
                ));
            }
            other => {
                return Err(ExprError {
                    pos,
                    reason: format!("unexpected character {other:?}"),
                })
            }
        }
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> &(Tok, usize) {
        &self.toks[self.at]
    }
    fn next(&mut self) -> (Tok, usize) {
        let t = self.toks[self.at].clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        t
    }
    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut e = self.and()?;
        while self.peek().0 == Tok::Or {
            self.next();
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }
    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut e = self.unary()?;
        while self.peek().0 == Tok::And {
            self.next();
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }
    fn unary(&mut self) -> Result<Expr, ExprError> {
        match self.next() {
            (Tok::Not, _) => Ok(Expr::Not(Box::new(self.unary()?))),
            (Tok::Open, pos) => {
                let e = self.or()?;
                match self.next() {
                    (Tok::Close, _) => Ok(e),
                    (_, p) => Err(ExprError {
                        pos: p,
                        reason: format!("missing `)` for the `(` at character {pos}"),
                    }),
                }
            }
            (Tok::Id(s), _) => Ok(Expr::Segment(s)),
            (Tok::End, pos) => Err(ExprError {
                pos,
                reason: "the expression ends where a segment id was expected".into(),
            }),
            (t, pos) => Err(ExprError {
                pos,
                reason: format!("expected a segment id, `not` or `(`, found {t:?}"),
            }),
        }
    }
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    let mut p = Parser {
        toks: lex(src)?,
        at: 0,
    };
    let e = p.or()?;
    match p.peek() {
        (Tok::End, _) => Ok(e),
        (t, pos) => Err(ExprError {
            pos: *pos,
            reason: format!("unexpected {t:?} (missing `and` / `or`?)"),
        }),
    }
}

impl Expr {
    fn segments(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::Segment(s) => {
                out.insert(s.clone());
            }
            Expr::Not(x) => x.segments(out),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.segments(out);
                b.segments(out);
            }
        }
    }

    /// Whether a user with these memberships (bit i: segment i of `ids`) is selected.
    fn selects(&self, ids: &[String], member: u32) -> bool {
        match self {
            Expr::Segment(s) => {
                let i = ids.iter().position(|x| x == s).expect("collected ids");
                member & (1 << i) != 0
            }
            Expr::Not(x) => !x.selects(ids, member),
            Expr::And(a, b) => a.selects(ids, member) && b.selects(ids, member),
            Expr::Or(a, b) => a.selects(ids, member) || b.selects(ids, member),
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Estimated users.
    pub estimate: u64,
    /// Low end of the interval (two standard errors).
    pub low: u64,
    /// High end.
    pub high: u64,
    /// The estimator used.
    pub method: &'static str,
    /// The interval is wider than the estimate: not to be trusted.
    pub too_small: bool,
    /// Users in the union of the expression's segments (and in `all` when it uses `not`).
    pub union: u64,
    /// Each segment's users over the range.
    pub segments: std::collections::BTreeMap<String, u64>,
}

/// Relative standard error of one HyperLogLog count (16384 registers).
pub const HLL_RSE: f64 = 1.04 / 128.0;

/// A `yyyymmdd` day from `YYYY-MM-DD`.
pub fn parse_day(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let day = digits(0..4)? * 10_000 + digits(5..7)? * 100 + digits(8..10)?;
    valid_day(day).then_some(day)
}

/// `YYYY-MM-DD` of a `yyyymmdd` day.
pub fn format_day(day: u32) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        day / 10_000,
        (day / 100) % 100,
        day % 100
    )
}

/// The days from `from` to `to`, both included; an error naming the problem otherwise.
pub fn days(from: u32, to: u32) -> Result<Vec<u32>, String> {
    if from > to {
        return Err(format!(
            "from {} is after to {}",
            format_day(from),
            format_day(to)
        ));
    }
    let n = (epoch_ms_of(to) - epoch_ms_of(from)) / dmp_core::clock::DAY_MS + 1;
    if n > MAX_DAYS as i64 {
        return Err(format!("{n} days asked, at most {MAX_DAYS}"));
    }
    Ok((0..n as u32).rev().map(|k| days_before(to, k)).collect())
}

/// The segments of `e` when it is one segment or an `or` of segments.
fn union_of(e: &Expr) -> Option<Vec<&str>> {
    match e {
        Expr::Segment(s) => Some(vec![s.as_str()]),
        Expr::Or(a, b) => {
            let mut v = union_of(a)?;
            v.extend(union_of(b)?);
            Some(v)
        }
        _ => None,
    }
}

/// Which two-sketch question an expression is.
enum Shape<'e> {
    /// `P`.
    Union(Vec<&'e str>),
    /// `P and Q`.
    Both(Vec<&'e str>, Vec<&'e str>),
    /// `P and not Q` (`not Q` alone: P is `all`).
    Only(Vec<&'e str>, Vec<&'e str>),
}

fn shape(e: &Expr) -> Option<Shape<'_>> {
    if let Some(u) = union_of(e) {
        return Some(Shape::Union(u));
    }
    match e {
        Expr::Not(q) => Some(Shape::Only(vec![ALL], union_of(q)?)),
        Expr::And(l, r) => match (l.as_ref(), r.as_ref()) {
            (p, Expr::Not(q)) | (Expr::Not(q), p) => Some(Shape::Only(union_of(p)?, union_of(q)?)),
            (p, q) => Some(Shape::Both(union_of(p)?, union_of(q)?)),
        },
        _ => None,
    }
}

fn answer(est: f64, se: f64, method: &'static str, union: f64, sizes: Sizes) -> Estimate {
    let est = est.max(0.0);
    let half = 2.0 * se;
    Estimate {
        estimate: est.round() as u64,
        low: (est - half).max(0.0).round() as u64,
        high: (est + half).round() as u64,
        method,
        too_small: half > est,
        union: union.round() as u64,
        segments: sizes,
    }
}

type Sizes = std::collections::BTreeMap<String, u64>;

/// A theta answer and a HyperLogLog answer (`estimate`, standard error) of the same question
/// combined as independent measurements, weighted by inverse variance: (estimate, standard
/// error). An exact theta answer (every sketch still held all its elements) is taken as is.
pub fn combine(t: &crate::theta::Answer, hll: f64, hll_se: f64) -> (f64, f64) {
    if t.se == 0.0 {
        return (t.estimate, 0.0);
    }
    if !(hll_se.is_finite() && hll_se > 0.0) {
        return (t.estimate, t.se);
    }
    let (wt, wh) = (t.se.powi(-2), hll_se.powi(-2));
    (
        (wt * t.estimate + wh * hll) / (wt + wh),
        (wt + wh).sqrt().recip(),
    )
}

/// Estimates the users of `expr` over `days`.
pub fn estimate(
    c: &dyn SegmentCounters,
    expr: &Expr,
    days: &[u32],
) -> Result<Estimate, AudienceError> {
    let mut set = BTreeSet::new();
    expr.segments(&mut set);
    let ids: Vec<String> = set.into_iter().collect();
    if ids.len() > MAX_SEGMENTS {
        return Err(AudienceError::TooManySegments(ids.len()));
    }
    let k = ids.len();
    let mut sketches = Vec::with_capacity(k);
    let mut sizes = std::collections::BTreeMap::new();
    for id in &ids {
        let h = c.range_sketch(id, days)?.unwrap_or_default();
        sizes.insert(id.clone(), h.count());
        sketches.push(h);
    }
    if let Some(t) = theta_estimate(c, expr, &ids, &sketches, days, &mut sizes)? {
        return Ok(t);
    }
    if let Some(sh) = shape(expr) {
        let union = |segs: &[&str]| -> Result<Hll, StatsError> {
            let mut h = Hll::new();
            for s in segs {
                match ids.iter().position(|i| i == s) {
                    Some(i) => h.merge(&sketches[i]),
                    None => h.merge(&c.range_sketch(s, days)?.unwrap_or_default()),
                }
            }
            Ok(h)
        };
        return Ok(match sh {
            Shape::Union(p) => {
                let n = union(&p)?.count() as f64;
                answer(n, n * HLL_RSE, "union", n, sizes)
            }
            Shape::Both(p, q) => {
                let (hp, hq) = (union(&p)?, union(&q)?);
                let j = crate::joint::estimate(&hp, &hq);
                let mut u = hp;
                u.merge(&hq);
                answer(j.both, j.se[2], "joint-mle", u.count() as f64, sizes)
            }
            Shape::Only(p, q) => {
                let (hp, hq) = (union(&p)?, union(&q)?);
                let j = crate::joint::estimate(&hp, &hq);
                let mut u = hp;
                u.merge(&hq);
                answer(j.a_only, j.se[0], "joint-mle", u.count() as f64, sizes)
            }
        });
    }
    // Union counts of every subset of the segments (bit i: segment i).
    let mut unions = vec![0f64; 1 << k];
    let mut merged: Vec<Option<Hll>> = vec![None; 1 << k];
    merged[0] = Some(Hll::new());
    for mask in 1usize..(1 << k) {
        let low = mask.trailing_zeros() as usize;
        let mut h = merged[mask & (mask - 1)]
            .clone()
            .expect("smaller masks first");
        h.merge(&sketches[low]);
        unions[mask] = h.count() as f64;
        merged[mask] = Some(h);
    }
    let full = (1usize << k) - 1;
    // The universe: `all` (only needed when the users in no segment are selected).
    let outside_selected = expr.selects(&ids, 0);
    let universe = if outside_selected {
        let mut all = c.range_sketch(ALL, days)?.unwrap_or_default();
        all.merge(merged[full].as_ref().expect("computed"));
        all.count() as f64
    } else {
        unions[full]
    };
    // Each union count's coefficient in the answer, to sum the estimate and its variance.
    let mut coef = vec![0i64; 1 << k];
    let mut coef_universe = 0i64;
    for inside in 0u32..(1 << k) {
        if !expr.selects(&ids, inside) {
            continue;
        }
        if inside == 0 {
            // Users in none of the segments: universe - union of all of them.
            coef_universe += 1;
            coef[full] -= 1;
            continue;
        }
        // Region (inside I, outside O = the rest): sum over non-empty J of I of
        // (-1)^(|J|+1) u(J | O), minus u(O).
        let outside = full as u32 & !inside;
        let mut j = inside;
        while j > 0 {
            let sign = if j.count_ones() % 2 == 1 { 1 } else { -1 };
            coef[(j | outside) as usize] += sign;
            j = (j - 1) & inside;
        }
        coef[outside as usize] -= 1;
    }
    let mut value = coef_universe as f64 * universe;
    let mut variance = (coef_universe as f64 * universe * HLL_RSE).powi(2);
    for (mask, c) in coef.iter().enumerate() {
        if *c != 0 && mask != 0 {
            value += *c as f64 * unions[mask];
            variance += (*c as f64 * unions[mask] * HLL_RSE).powi(2);
        }
    }
    let bound = if outside_selected {
        universe
    } else {
        unions[full]
    };
    Ok(answer(
        value.clamp(0.0, bound),
        variance.sqrt(),
        "inclusion-exclusion",
        bound,
        sizes,
    ))
}

/// The estimate from theta sketches, when the backend keeps them for every segment involved (and
/// for `all` when the expression selects users in none of its segments). A plain union is also
/// counted by the merged HyperLogLog, and the two are combined. The answer takes `sizes`, where a
/// segment whose sketches still hold all its users gets its exact size.
fn theta_estimate(
    c: &dyn SegmentCounters,
    expr: &Expr,
    ids: &[String],
    sketches: &[Hll],
    days: &[u32],
    sizes: &mut Sizes,
) -> Result<Option<Estimate>, StatsError> {
    let mut leaves = Vec::with_capacity(ids.len());
    for id in ids {
        match c.range_theta(id, days)? {
            Some(t) => leaves.push(t),
            None => return Ok(None),
        }
    }
    let outside_selected = expr.selects(ids, 0);
    let universe = if outside_selected {
        match c.range_theta(ALL, days)? {
            Some(t) => Some(t),
            None => return Ok(None),
        }
    } else {
        None
    };
    for (id, t) in ids.iter().zip(&leaves) {
        if t.is_exact() {
            sizes.insert(id.clone(), t.hashes().len() as u64);
        }
    }
    let sizes = std::mem::take(sizes);
    let refs: Vec<&crate::theta::Theta> = leaves.iter().collect();
    let t = crate::theta::evaluate(&refs, universe.as_ref(), |m| expr.selects(ids, m));
    if t.se == 0.0 {
        // Every sketch still held all its users: the answer is a count, not an estimate, and so
        // is the union.
        let all = crate::theta::evaluate(&refs, universe.as_ref(), |m| outside_selected || m != 0);
        return Ok(Some(answer(t.estimate, 0.0, "exact", all.estimate, sizes)));
    }
    // The HyperLogLogs' union: the answer's `union`, and a plain union's second measurement.
    let mut merged = Hll::new();
    for h in sketches {
        merged.merge(h);
    }
    if outside_selected {
        merged.merge(&c.range_sketch(ALL, days)?.unwrap_or_default());
    }
    let union = merged.count() as f64;
    if union_of(expr).is_some() {
        let (est, se) = combine(&t, union, union * HLL_RSE);
        return Ok(Some(answer(est, se, "union+theta", union, sizes)));
    }
    let est = t.estimate;
    Ok(Some(Estimate {
        estimate: est.round() as u64,
        low: t.low.round() as u64,
        high: t.high.round() as u64,
        method: "theta",
        too_small: (t.high - t.low) / 2.0 > est,
        union: union.round() as u64,
        segments: sizes,
    }))
}

/// Why an estimate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AudienceError {
    /// Too many segments for inclusion-exclusion.
    #[error("{0} segments in the expression, at most {MAX_SEGMENTS}")]
    TooManySegments(usize),
    /// The counters failed.
    #[error(transparent)]
    Stats(#[from] StatsError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedCounters;

    #[test]
    fn given_expressions_when_parsed_then_precedence_and_errors_with_positions() {
        let e = parse("a and not b or (c & !d)").unwrap();
        let seg = |s: &str| Box::new(Expr::Segment(s.into()));
        assert_eq!(
            e,
            Expr::Or(
                Box::new(Expr::And(seg("a"), Box::new(Expr::Not(seg("b"))))),
                Box::new(Expr::And(seg("c"), Box::new(Expr::Not(seg("d"))))),
            )
        );
        let err = |s: &str| parse(s).unwrap_err();
        assert_eq!(err("a and").pos, 6);
        assert_eq!(err("a b").pos, 3);
        assert!(err("a b").reason.contains("missing `and` / `or`"));
        assert_eq!(err("(a or b").pos, 8);
        assert!(err("(a or b").reason.contains("missing `)`"));
        assert_eq!(err("a + b").pos, 3);
        assert_eq!(err("").pos, 1);
    }

    #[test]
    fn given_dates_when_parsed_then_checked() {
        assert_eq!(parse_day("2026-11-22"), Some(20_261_122));
        assert_eq!(parse_day("2026-02-30"), None);
        assert_eq!(parse_day("2026-1-2"), None);
        assert_eq!(format_day(20_261_122), "2026-11-22");
        assert_eq!(days(20_261_130, 20_261_202).unwrap().len(), 3);
        assert!(days(20_261_202, 20_261_130).is_err());
        assert!(days(20_250_101, 20_261_231).is_err());
    }

    /// Known sets: a = users 0..6000, b = 4000..10000, c = 9000..9500, all = 0..20000.
    fn counters(theta_lg_k: u8) -> EmbeddedCounters {
        let c = EmbeddedCounters::in_memory().with_theta(theta_lg_k);
        for u in 0..20_000 {
            let mut segs = Vec::new();
            if u < 6_000 {
                segs.push("a");
            }
            if (4_000..10_000).contains(&u) {
                segs.push("b");
            }
            if (9_000..9_500).contains(&u) {
                segs.push("c");
            }
            // Spread over two days; a user seen on both days counts once over the range.
            c.record(20_261_121 + (u % 2) as u32, &format!("u{u}"), &segs);
            if u % 10 == 0 {
                c.record(20_261_122, &format!("u{u}"), &segs);
            }
        }
        c
    }

    #[test]
    fn given_hll_only_counters_when_estimated_then_truth_is_inside_the_interval() {
        let c = counters(0);
        let range = days(20_261_121, 20_261_122).unwrap();
        for (src, truth) in CASES {
            let e = estimate(&c, &parse(src).unwrap(), &range).unwrap();
            assert!(
                e.low <= truth && truth <= e.high,
                "{src}: truth {truth}, got {e:?}"
            );
            let err = (e.estimate as f64 - truth as f64).abs() / truth as f64;
            assert!(err < 0.1, "{src}: {e:?} vs {truth}");
            let method = match src {
                "a" | "a or b" => "union",
                "a and b" | "a and not b" | "not a" | "b and c" | "not (a or b or c)"
                | "(a or b) and not c" => "joint-mle",
                _ => "inclusion-exclusion",
            };
            assert_eq!(e.method, method, "{src}");
        }
        // One day only: half the users (plus the tenth recorded twice).
        let one = estimate(&c, &parse("a").unwrap(), &[20_261_121]).unwrap();
        assert!((2_800..3_200).contains(&one.estimate), "{one:?}");
    }

    const CASES: [(&str, u64); 10] = [
        ("a", 6_000u64),
        ("a or b", 10_000),
        ("a and b", 2_000),
        ("a and not b", 4_000),
        ("not a", 14_000),
        ("(a or b) and not c", 9_500),
        ("b and c", 500),
        ("not (a or b or c)", 10_000),
        ("(a and b) or c", 2_500),
        ("a and b and not c", 2_000),
    ];

    #[test]
    fn given_theta_sketches_holding_every_user_when_estimated_then_exact_counts() {
        let c = counters(15);
        let range = days(20_261_121, 20_261_122).unwrap();
        for (src, truth) in CASES {
            let e = estimate(&c, &parse(src).unwrap(), &range).unwrap();
            assert_eq!(
                (e.estimate, e.low, e.high, e.method, e.too_small),
                (truth, truth, truth, "exact", false),
                "{src}"
            );
            for (seg, n) in [("a", 6_000), ("b", 6_000), ("c", 500)] {
                assert!(
                    e.segments.get(seg).is_none_or(|got| *got == n),
                    "{src}: {e:?}"
                );
            }
            // `all` joins the union when the expression selects users outside its segments.
            let union = match src {
                "a" | "b and c" => 6_000,
                "not a" | "not (a or b or c)" => 20_000,
                _ => 10_000,
            };
            assert_eq!(e.union, union, "{src}: {e:?}");
        }
    }

    #[test]
    fn given_sampling_theta_sketches_when_estimated_then_truth_inside_the_interval() {
        // k = 1024 of up to 20000 users a day: every sketch samples.
        let c = counters(10);
        let range = days(20_261_121, 20_261_122).unwrap();
        for (src, truth) in CASES {
            let e = estimate(&c, &parse(src).unwrap(), &range).unwrap();
            // Fixed data, ten answers: each two-standard-error interval misses one time in
            // twenty, so allow three (a biased estimator still fails).
            let slack = (e.high - e.low) / 4;
            assert!(
                e.low.saturating_sub(slack) <= truth && truth <= e.high + slack,
                "{src}: truth {truth}, got {e:?}"
            );
            let method = if src.contains("and") || src.contains("not") {
                "theta"
            } else {
                "union+theta"
            };
            assert_eq!(e.method, method, "{src}");
        }
    }

    #[test]
    fn given_theta_days_missing_when_estimated_then_hll_methods_answer() {
        // Theta sketches only from some day on: the range before it has none to answer from.
        let c = EmbeddedCounters::in_memory().with_theta(0);
        c.record(20_261_120, "u1", &["a", "b"]);
        let with = EmbeddedCounters::in_memory();
        with.record(20_261_121, "u1", &["a", "b"]);
        assert!(with.range_theta("a", &[20_261_121]).unwrap().is_some());
        assert!(c.range_theta("a", &[20_261_120]).unwrap().is_none());
        let e = estimate(&c, &parse("a and b").unwrap(), &[20_261_120]).unwrap();
        assert_eq!(e.method, "joint-mle");
    }

    /// 200K users: x = the first 100K plus `both`, y = the rest.
    fn tiny_overlap(theta_lg_k: u8, both: u32) -> EmbeddedCounters {
        let c = EmbeddedCounters::in_memory().with_theta(theta_lg_k);
        for u in 0..200_000 {
            let segs: &[&str] = if u < 100_000 {
                &["x"]
            } else if u < 100_000 + both {
                &["x", "y"]
            } else {
                &["y"]
            };
            c.record(20_261_122, &format!("u{u}"), segs);
        }
        c
    }

    #[test]
    fn given_tiny_intersection_when_estimated_by_theta_then_flagged_too_small() {
        let c = tiny_overlap(10, 3);
        let e = estimate(&c, &parse("x and y").unwrap(), &[20_261_122]).unwrap();
        assert_eq!(e.method, "theta");
        assert!(e.too_small, "3 of a 200K union: {e:?}");
        assert!(e.low <= 3 && 3 <= e.high, "{e:?}");
    }

    #[test]
    fn given_tiny_intersection_when_estimated_then_flagged_too_small() {
        let c = tiny_overlap(0, 50);
        let e = estimate(&c, &parse("x and y").unwrap(), &[20_261_122]).unwrap();
        assert!(e.too_small, "50 of a 200K union: {e:?}");
        assert!(e.low <= 50 && 50 <= e.high, "{e:?}");
        assert_eq!(e.method, "joint-mle");
    }

    #[test]
    fn given_too_many_segments_when_estimated_then_refused() {
        let c = EmbeddedCounters::in_memory();
        let src = (0..11)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(" or ");
        assert!(matches!(
            estimate(&c, &parse(&src).unwrap(), &[20_261_122]),
            Err(AudienceError::TooManySegments(11))
        ));
    }
}
