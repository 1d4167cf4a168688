//! Theta sketches kept beside the HyperLogLogs, for intersections and differences.
//!
//! A theta sketch (K. Beyer et al.'s KMV, as in Apache DataSketches) keeps every element whose
//! 64-bit sample hash is below a threshold `theta`, and lowers `theta` so that about `k` hashes
//! stay. The retained hashes are a uniform sample of the set at rate `theta / 2^64`, and the same
//! element has the same hash in every sketch. So for any expression of segments, the sample
//! elements below the smallest `theta` of the sketches involved can be tested one by one
//! ("in A, not in B, in C?"), and the count that passes divided by the rate estimates the
//! expression's users. That resolves an intersection of 1% of a union with a few hundred
//! samples, where subtracting HyperLogLog counts cannot (docs/benchmarks.md has the figures).
//!
//! - [`ThetaUpdate`]: the sketch being written: an open-addressing table of hashes that grows to
//!   `2k` slots, and at three quarters full keeps its `k` smallest hashes (quickselect) and lowers
//!   `theta` to the next one. Memory: at most `16k` bytes.
//! - [`Theta`]: the compact form: `theta` and the sorted hashes below it (at most `12k` bytes
//!   stored, `1.5k` hashes). Sketches of several days merge with [`Theta::union`].
//! - [`evaluate`]: an expression's estimate with its standard error and interval.
//!
//! The sample hash is a bijective mix of the HyperLogLog's MurmurHash64A, so both sketches hash
//! each element once, and the sample is independent of the registers: the audience estimator
//! combines the two answers as independent measurements.

/// `lg k` when the configuration does not say (k = 32768 hashes).
pub const DEFAULT_LG_K: u8 = 15;
/// Smallest accepted `lg k`.
pub const MIN_LG_K: u8 = 8;
/// Largest accepted `lg k`.
pub const MAX_LG_K: u8 = 20;
/// `theta` of a sketch that still holds every element (sampling rate 1).
pub const EXACT: u64 = u64::MAX;

const FORMAT: u8 = 1;
const TWO_64: f64 = 18_446_744_073_709_551_616.0;

/// The sample hash of an element from its HyperLogLog hash ([`crate::hll::hash_of`]): the
/// SplitMix64 finaliser (a bijection), kept inside `1..u64::MAX` (0 marks an empty slot, and
/// [`EXACT`] must stay above every hash).
pub fn sample_hash(hll_hash: u64) -> u64 {
    let mut z = hll_hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.clamp(1, u64::MAX - 1)
}

/// The sampling rate a `theta` stands for.
pub fn rate(theta: u64) -> f64 {
    if theta == EXACT {
        1.0
    } else {
        theta as f64 / TWO_64
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The hash was above `theta` or already held.
    No,
    /// The hash was added.
    Inserted,
    /// The hash was added, then the sketch kept its `k` smallest hashes and lowered `theta`:
    /// hashes added before may be gone.
    Rebuilt,
}

/// A theta sketch being updated.
#[derive(Clone)]
pub struct ThetaUpdate {
    k: usize,
    theta: u64,
    table: Vec<u64>,
    count: usize,
    /// The hashes sorted, as of the last [`ThetaUpdate::compact`] (valid unless rebuilt since).
    sorted: Vec<u64>,
    sorted_valid: bool,
    /// Hashes added since `sorted` was made.
    since: Vec<u64>,
}

impl std::fmt::Debug for ThetaUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ThetaUpdate(k {}, {} hashes, rate {})",
            self.k,
            self.count,
            rate(self.theta)
        )
    }
}

impl ThetaUpdate {
    /// An empty sketch keeping about `2^lg_k` hashes.
    pub fn new(lg_k: u8) -> ThetaUpdate {
        let lg_k = lg_k.clamp(MIN_LG_K, MAX_LG_K);
        ThetaUpdate {
            k: 1 << lg_k,
            theta: EXACT,
            table: vec![0; 16],
            count: 0,
            sorted: Vec::new(),
            sorted_valid: false,
            since: Vec::new(),
        }
    }

    /// A sketch holding `hashes` (all below `theta`) that goes on from there.
    pub fn from_parts(lg_k: u8, theta: u64, hashes: impl IntoIterator<Item = u64>) -> ThetaUpdate {
        let mut s = ThetaUpdate::new(lg_k);
        s.theta = theta;
        for h in hashes {
            s.update(h);
        }
        s
    }

    /// `k`, the hashes kept after a rebuild.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The current threshold.
    pub fn theta(&self) -> u64 {
        self.theta
    }

    /// Hashes held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no hash is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn max_slots(&self) -> usize {
        2 * self.k
    }

    /// Adds a [`sample_hash`].
    pub fn update(&mut self, hash: u64) -> Added {
        if hash >= self.theta || hash == 0 {
            return Added::No;
        }
        if !insert(&mut self.table, hash) {
            return Added::No;
        }
        self.count += 1;
        if self.sorted_valid {
            if self.since.len() < self.k {
                self.since.push(hash);
            } else {
                self.sorted_valid = false;
                self.since.clear();
            }
        }
        if self.count * 4 <= self.table.len() * 3 {
            return Added::Inserted;
        }
        if self.table.len() < self.max_slots() {
            let entries: Vec<u64> = self.hashes().collect();
            self.table = vec![0; (self.table.len() * 4).min(self.max_slots())];
            for h in entries {
                insert(&mut self.table, h);
            }
            return Added::Inserted;
        }
        self.sorted_valid = false;
        self.since.clear();
        // Full: keep the k smallest, theta becomes the next one.
        let mut entries: Vec<u64> = self.hashes().collect();
        let (_, nth, _) = entries.select_nth_unstable(self.k);
        self.theta = *nth;
        entries.truncate(self.k);
        self.table.iter_mut().for_each(|s| *s = 0);
        for h in &entries {
            insert(&mut self.table, *h);
        }
        self.count = entries.len();
        Added::Rebuilt
    }

    /// Adds many [`sample_hash`]es, telling `added` what each did. The table slots of each
    /// group of 16 are read first, independently of each other, so their cache misses overlap
    /// instead of following one another.
    pub fn update_many(&mut self, hashes: &[u64], mut added: impl FnMut(u64, Added)) {
        for group in hashes.chunks(16) {
            let mask = self.table.len() - 1;
            let touched = group
                .iter()
                .fold(0u64, |acc, h| acc ^ self.table[(*h as usize) & mask]);
            std::hint::black_box(touched);
            for h in group {
                added(*h, self.update(*h));
            }
        }
    }

    /// The hashes held, in table order.
    pub fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|h| *h != 0)
    }

    /// The compact form (sorted). The sorted hashes are kept, so asking again after a few
    /// updates sorts only those (unless the threshold fell in between).
    pub fn compact(&mut self) -> Theta {
        if !self.sorted_valid {
            self.sorted = self.hashes().collect();
            self.sorted.sort_unstable();
            self.sorted_valid = true;
        } else if !self.since.is_empty() {
            self.since.sort_unstable();
            self.sorted = merge_below(&self.sorted, &self.since, EXACT, usize::MAX);
        }
        self.since.clear();
        Theta {
            theta: self.theta,
            hashes: self.sorted.clone(),
        }
    }
}

/// Inserts into a linear-probing table; false when already there.
fn insert(table: &mut [u64], hash: u64) -> bool {
    let mask = table.len() - 1;
    let mut i = (hash as usize) & mask;
    loop {
        match table[i] {
            0 => {
                table[i] = hash;
                return true;
            }
            h if h == hash => return false,
            _ => i = (i + 1) & mask,
        }
    }
}

/// A compact theta sketch: `theta` and the sorted hashes below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Theta {
    theta: u64,
    hashes: Vec<u64>,
}

impl Default for Theta {
    fn default() -> Self {
        Theta {
            theta: EXACT,
            hashes: Vec::new(),
        }
    }
}

/// A stored sketch that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("theta sketch: {0}")]
pub struct FormatError(pub &'static str);

impl Theta {
    /// A sketch from its threshold and hashes (any order, duplicates and hashes at or above
    /// `theta` dropped).
    pub fn new(theta: u64, mut hashes: Vec<u64>) -> Theta {
        hashes.retain(|h| *h < theta && *h != 0);
        hashes.sort_unstable();
        hashes.dedup();
        Theta { theta, hashes }
    }

    /// The sketch with more hashes (any order, duplicates and those at or above its threshold
    /// dropped): only they are sorted, then merged in (a full record and its deltas).
    pub fn with_added(self, more: Vec<u64>) -> Theta {
        if more.is_empty() {
            return self;
        }
        let more = Theta::new(self.theta, more);
        Theta {
            hashes: merge_below(&self.hashes, &more.hashes, self.theta, usize::MAX),
            theta: self.theta,
        }
    }

    /// The threshold.
    pub fn theta(&self) -> u64 {
        self.theta
    }

    /// The sorted hashes.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Whether the sketch still holds every element.
    pub fn is_exact(&self) -> bool {
        self.theta == EXACT
    }

    /// The estimated number of distinct elements.
    pub fn estimate(&self) -> f64 {
        self.hashes.len() as f64 / rate(self.theta)
    }

    /// Serialised: format byte, theta (LE), count (LE u32), hashes (LE).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + 8 * self.hashes.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.theta.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u32).to_le_bytes());
        for h in &self.hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out
    }

    /// Parses [`Theta::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Theta, FormatError> {
        if bytes.len() < 13 || bytes[0] != FORMAT {
            return Err(FormatError("unknown format"));
        }
        let theta = u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(bytes[9..13].try_into().expect("4 bytes")) as usize;
        let body = &bytes[13..];
        if body.len() != n * 8 {
            return Err(FormatError("length does not match the count"));
        }
        let hashes: Vec<u64> = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if hashes.windows(2).any(|w| w[0] >= w[1]) || hashes.last().is_some_and(|h| *h >= theta) {
            return Err(FormatError("hashes not sorted below theta"));
        }
        Ok(Theta { theta, hashes })
    }

    /// The union of sketches (several days of one segment), keeping at most `k` hashes or as
    /// many as the largest input holds, whichever is more (a day's sketch holds up to `1.5k`,
    /// and a one-day union stays exact while it is): the threshold is the smallest of theirs,
    /// lowered further to keep that many.
    pub fn union(sketches: &[Theta], k: usize) -> Theta {
        let theta = sketches.iter().map(|s| s.theta).min().unwrap_or(EXACT);
        let k = sketches.iter().map(|s| s.hashes.len()).fold(k, usize::max);
        let acc = match sketches {
            [] => Vec::new(),
            [one] => one.hashes[..one.hashes.partition_point(|h| *h < theta)].to_vec(),
            [a, b] => merge_below(&a.hashes, &b.hashes, theta, k + 1),
            many => union_many(many, theta, k + 1),
        };
        let mut out = Theta { theta, hashes: acc };
        if out.hashes.len() > k {
            out.theta = out.hashes[k];
            out.hashes.truncate(k);
        }
        out
    }
}

/// The sorted distinct values of many sorted lists below `theta`: at least the `cap` smallest
/// (all of them when fewer). The value range is cut into buckets of about 128 values (the lists
/// are uniform samples), and each bucket's values from every list are sorted together while in
/// cache: several times faster than a heap when the lists repeat each other (the same users on
/// many days).
fn union_many(sketches: &[Theta], theta: u64, cap: usize) -> Vec<u64> {
    let lists: Vec<&[u64]> = sketches
        .iter()
        .map(|s| &s.hashes[..s.hashes.partition_point(|h| *h < theta)])
        .collect();
    let total: usize = lists.iter().map(|l| l.len()).sum();
    let buckets = (total / 128).max(1) as u64;
    let width = (theta / buckets).max(1);
    let mut at = vec![0usize; lists.len()];
    let mut acc: Vec<u64> = Vec::with_capacity(cap.min(total) + 256);
    let mut scratch: Vec<u64> = Vec::with_capacity(512);
    let mut lo = 0u64;
    while acc.len() < cap && lo < theta {
        let hi = lo.saturating_add(width).min(theta);
        scratch.clear();
        for (l, p) in lists.iter().zip(at.iter_mut()) {
            let mut end = *p;
            while end < l.len() && l[end] < hi {
                end += 1;
            }
            scratch.extend_from_slice(&l[*p..end]);
            *p = end;
        }
        scratch.sort_unstable();
        scratch.dedup();
        acc.extend_from_slice(&scratch);
        lo = hi;
    }
    acc
}

/// The sorted union of two sorted lists, below `theta`, at most `cap` long.
fn merge_below(a: &[u64], b: &[u64], theta: u64, cap: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity((a.len() + b.len()).min(cap));
    let (mut i, mut j) = (0, 0);
    while out.len() < cap {
        let next = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x < y => {
                i += 1;
                *x
            }
            (Some(x), Some(y)) if x > y => {
                j += 1;
                *y
            }
            (Some(x), Some(_)) => {
                i += 1;
                j += 1;
                *x
            }
            (Some(x), None) => {
                i += 1;
                *x
            }
            (None, Some(y)) => {
                j += 1;
                *y
            }
            (None, None) => break,
        };
        if next >= theta {
            break;
        }
        out.push(next);
    }
    out
}

/// An expression's estimate from theta sketches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    /// Estimated users.
    pub estimate: f64,
    /// Standard error (0 when every sketch was exact).
    pub se: f64,
    /// Low end of the interval (two standard errors, score interval of the sample count).
    pub low: f64,
    /// High end.
    pub high: f64,
    /// Sample elements the expression selected.
    pub samples: u64,
    /// The sampling rate used (the smallest of the sketches').
    pub rate: f64,
}

/// Estimates the elements `selects` picks: bit `i` of its argument is set when the element is
/// in `leaves[i]`. `universe` (the pseudo-segment `all`) supplies the elements in no leaf, needed
/// when `selects(0)` is true.
pub fn evaluate(
    leaves: &[&Theta],
    universe: Option<&Theta>,
    selects: impl Fn(u32) -> bool,
) -> Answer {
    assert!(leaves.len() < 32, "at most 31 leaves");
    let theta = leaves
        .iter()
        .copied()
        .chain(universe)
        .map(|s| s.theta)
        .min()
        .unwrap_or(EXACT);
    let lists: Vec<&[u64]> = leaves
        .iter()
        .copied()
        .chain(universe)
        .map(|s| &s.hashes[..s.hashes.partition_point(|h| *h < theta)])
        .collect();
    let mut heads = vec![0usize; lists.len()];
    let mut selected = 0u64;
    loop {
        let mut min = u64::MAX;
        for (l, h) in lists.iter().zip(&heads) {
            if let Some(v) = l.get(*h) {
                min = min.min(*v);
            }
        }
        if min == u64::MAX {
            break;
        }
        let mut mask = 0u32;
        for (i, (l, h)) in lists.iter().zip(heads.iter_mut()).enumerate() {
            if l.get(*h) == Some(&min) {
                *h += 1;
                if i < leaves.len() {
                    mask |= 1 << i;
                }
            }
        }
        if selects(mask) {
            selected += 1;
        }
    }
    let p = rate(theta);
    let x = selected as f64;
    // Score interval of a binomial count with the finite-population factor (1 - p), two
    // standard errors: mu with (x - mu)^2 <= 4 (1 - p) mu.
    let c = 4.0 * (1.0 - p);
    let half = (c * x + c * c / 4.0).sqrt();
    Answer {
        estimate: x / p,
        se: (x.max(1.0) * (1.0 - p)).sqrt() / p,
        low: (x + c / 2.0 - half).max(0.0) / p,
        high: (x + c / 2.0 + half) / p,
        samples: selected,
        rate: p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hll::hash_of;

    fn h(i: u64) -> u64 {
        sample_hash(hash_of(format!("u{i}").as_bytes()))
    }

    fn sketch(range: std::ops::Range<u64>, lg_k: u8) -> ThetaUpdate {
        let mut s = ThetaUpdate::new(lg_k);
        for i in range {
            s.update(h(i));
        }
        s
    }

    #[test]
    fn given_fewer_than_k_elements_when_sketched_then_exact() {
        let mut s = sketch(0..1000, 10);
        assert_eq!(s.theta(), EXACT);
        assert_eq!(s.len(), 1000);
        assert_eq!(s.compact().estimate(), 1000.0);
        let mut again = s.clone();
        assert_eq!(again.update(h(5)), Added::No, "duplicates are not added");
    }

    #[test]
    fn given_many_elements_when_sketched_then_k_to_1_5k_kept_and_estimate_close() {
        for n in [10_000u64, 200_000] {
            let mut s = sketch(0..n, 12);
            assert!((4096..=6144).contains(&s.len()), "{n}: {} kept", s.len());
            let c = s.compact();
            let err = (c.estimate() - n as f64).abs() / n as f64;
            assert!(err < 0.05, "{n}: {}", c.estimate());
            // The sample is exactly the elements below theta.
            let below = (0..n).filter(|i| h(*i) < c.theta()).count();
            assert_eq!(below, c.hashes().len());
        }
    }

    #[test]
    fn given_compact_sketch_when_serialised_then_round_trip_and_corruption_refused() {
        let c = sketch(0..50_000, 10).compact();
        let bytes = c.to_bytes();
        assert_eq!(Theta::from_bytes(&bytes).unwrap(), c);
        assert!(Theta::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut unsorted = bytes.clone();
        unsorted[13..21].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Theta::from_bytes(&unsorted).is_err());
        assert!(Theta::from_bytes(&[9; 20]).is_err());
    }

    #[test]
    fn given_days_when_unioned_then_sample_of_the_union() {
        let days = [sketch(0..30_000, 10), sketch(20_000..60_000, 10)];
        let compact: Vec<Theta> = days.into_iter().map(|mut d| d.compact()).collect();
        let u = Theta::union(&compact, 1024);
        let keep = compact.iter().map(|d| d.hashes().len()).max().unwrap();
        assert_eq!(u.hashes().len(), keep);
        let below = (0..60_000).filter(|i| h(*i) < u.theta()).count();
        assert_eq!(below, keep, "every element below the union's theta is held");
        let err = (u.estimate() - 60_000.0).abs() / 60_000.0;
        assert!(err < 0.15, "{}", u.estimate());
    }

    #[test]
    fn given_expression_when_evaluated_then_truth_inside_interval() {
        // a = 0..60K, b = 40K..100K, all = 0..150K.
        let (a, b, all) = (
            sketch(0..60_000, 12).compact(),
            sketch(40_000..100_000, 12).compact(),
            sketch(0..150_000, 12).compact(),
        );
        type Selects<'a> = &'a dyn Fn(u32) -> bool;
        let cases: [(&str, f64, Selects); 4] = [
            ("a and b", 20_000.0, &|m| m == 3),
            ("a and not b", 40_000.0, &|m| m == 1),
            ("a or b", 100_000.0, &|m| m != 0),
            ("not (a or b)", 50_000.0, &|m| m == 0),
        ];
        for (name, truth, f) in cases {
            let ans = evaluate(&[&a, &b], Some(&all), f);
            assert!(
                ans.low <= truth && truth <= ans.high,
                "{name}: {ans:?} vs {truth}"
            );
            assert!(
                (ans.estimate - truth).abs() < 4.0 * ans.se,
                "{name}: {ans:?}"
            );
        }
        // Exact sketches give exact answers with no spread.
        let (x, y) = (sketch(0..300, 12).compact(), sketch(200..400, 12).compact());
        let ans = evaluate(&[&x, &y], None, |m| m == 3);
        assert_eq!(
            (ans.estimate, ans.low, ans.high, ans.se),
            (100.0, 100.0, 100.0, 0.0)
        );
    }

    #[test]
    fn given_rebuilt_sketch_when_restored_from_parts_then_same_sample() {
        let s = sketch(0..100_000, 10);
        let c = s.clone().compact();
        let mut back = ThetaUpdate::from_parts(10, c.theta(), c.hashes().iter().copied());
        assert_eq!(back.compact(), c);
    }

    #[test]
    fn given_updates_between_compactions_when_compacted_then_same_as_from_scratch() {
        let mut s = ThetaUpdate::new(10);
        for round in 0..40u64 {
            for i in round * 100..round * 100 + 100 {
                s.update(h(i));
            }
            let fresh = Theta::new(s.theta(), s.hashes().collect());
            assert_eq!(s.compact(), fresh, "round {round}");
        }
    }

    #[test]
    fn given_many_days_when_unioned_then_same_as_unioning_everything() {
        let days: Vec<Theta> = (0..7u64)
            .map(|d| sketch(d * 3_000..d * 3_000 + 5_000, 10).compact())
            .collect();
        let u = Theta::union(&days, 1024);
        let theta = days.iter().map(Theta::theta).min().unwrap();
        let mut all: Vec<u64> = days.iter().flat_map(|d| d.hashes().to_vec()).collect();
        all.retain(|x| *x < theta);
        all.sort_unstable();
        all.dedup();
        // As many as the largest day holds (more than k = 1024).
        let keep = days.iter().map(|d| d.hashes().len()).max().unwrap();
        assert!(keep > 1024);
        assert_eq!(u.hashes(), &all[..keep]);
        assert_eq!(u.theta(), all[keep]);
        // One day alone comes back whole: an exact sketch stays exact.
        let one = sketch(0..1500, 10).compact();
        assert!(one.is_exact());
        assert_eq!(Theta::union(std::slice::from_ref(&one), 1024), one);
    }
}
