//! HyperLogLog with Redis's algorithm: MurmurHash64A (seed `0xadc83b19`), 16384 registers (the
//! low 14 bits of the hash pick the register, the rank of the other 50 bits plus one is the
//! value), and Redis 7's estimator (Ertl's improved raw estimator). The same elements give the
//! same registers and the same count as `PFADD`/`PFCOUNT`.
//!
//! Registers are kept one byte each in memory (fast to update and merge); [`crate::redis_format`]
//! reads and writes Redis's own bytes (sparse and dense encodings).

/// Registers: 2^14.
pub const REGISTERS: usize = 1 << 14;
const P: u32 = 14;
const Q: u32 = 64 - P;
const ALPHA_INF: f64 = 0.721_347_520_444_481_7;

/// Redis's MurmurHash64A.
pub fn murmur64a(key: &[u8], seed: u64) -> u64 {
    const M: u64 = 0xc6a4_a793_5bd1_e995;
    const R: u32 = 47;
    let mut h: u64 = seed ^ (key.len() as u64).wrapping_mul(M);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let mut k = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h ^= k;
        h = h.wrapping_mul(M);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate() {
            h ^= (*b as u64) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> R;
    h = h.wrapping_mul(M);
    h ^= h >> R;
    h
}

/// An element's hash, as Redis's HyperLogLog computes it.
pub fn hash_of(element: &[u8]) -> u64 {
    murmur64a(element, 0xadc8_3b19)
}

/// The register and value an element sets.
pub fn register_of(element: &[u8]) -> (usize, u8) {
    register_of_hash(hash_of(element))
}

/// The register and value an element with this [`hash_of`] sets.
pub fn register_of_hash(hash: u64) -> (usize, u8) {
    let index = (hash & (REGISTERS as u64 - 1)) as usize;
    let rest = (hash >> P) | (1u64 << Q);
    (index, (rest.trailing_zeros() + 1) as u8)
}

/// One sketch.
#[derive(Clone, PartialEq, Eq)]
pub struct Hll {
    registers: Box<[u8]>,
}

impl Default for Hll {
    fn default() -> Self {
        Hll::new()
    }
}

impl std::fmt::Debug for Hll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hll(~{})", self.count())
    }
}

impl Hll {
    /// An empty sketch.
    pub fn new() -> Hll {
        Hll {
            registers: vec![0u8; REGISTERS].into_boxed_slice(),
        }
    }

    /// Adds an element; true when a register changed (as PFADD's reply).
    pub fn add(&mut self, element: &[u8]) -> bool {
        self.add_hash(hash_of(element))
    }

    /// Adds an element by its [`hash_of`] (callers that need the hash for more than this).
    pub fn add_hash(&mut self, hash: u64) -> bool {
        let (i, v) = register_of_hash(hash);
        if self.registers[i] < v {
            self.registers[i] = v;
            true
        } else {
            false
        }
    }

    /// Merges another sketch in (PFMERGE): the union.
    pub fn merge(&mut self, other: &Hll) {
        for (a, b) in self.registers.iter_mut().zip(other.registers.iter()) {
            *a = (*a).max(*b);
        }
    }

    /// The estimated number of distinct elements, as Redis 7's PFCOUNT computes it.
    pub fn count(&self) -> u64 {
        let mut histo = [0u32; 64];
        for r in self.registers.iter() {
            histo[*r as usize] += 1;
        }
        estimate(&histo)
    }

    /// Sets register `i` to at least `v`; true when it changed.
    pub fn raise(&mut self, i: usize, v: u8) -> bool {
        if self.registers[i] < v {
            self.registers[i] = v;
            true
        } else {
            false
        }
    }

    /// The raw registers (one byte each), for persistence.
    pub fn registers(&self) -> &[u8] {
        &self.registers
    }

    /// A sketch from raw registers; None when the length or a value is wrong.
    pub fn from_registers(bytes: &[u8]) -> Option<Hll> {
        (bytes.len() == REGISTERS && bytes.iter().all(|r| *r as u32 <= Q + 1)).then(|| Hll {
            registers: bytes.to_vec().into_boxed_slice(),
        })
    }
}

/// Redis 7's estimate from the histogram of register values (Ertl's improved raw estimator).
pub(crate) fn estimate(histo: &[u32; 64]) -> u64 {
    let m = REGISTERS as f64;
    let mut z = m * tau((m - histo[Q as usize + 1] as f64) / m);
    for j in (1..=Q as usize).rev() {
        z += histo[j] as f64;
        z *= 0.5;
    }
    z += m * sigma(histo[0] as f64 / m);
    (ALPHA_INF * m * m / z).round() as u64
}

fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let prev = z;
        z += x * y;
        y += y;
        if prev == z {
            return z;
        }
    }
}

fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let prev = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if prev == z {
            return z / 3.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_known_sets_when_counted_then_within_hll_error() {
        for n in [0u64, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000] {
            let mut h = Hll::new();
            for i in 0..n {
                h.add(format!("user-{i}").as_bytes());
            }
            let c = h.count() as f64;
            let err = if n == 0 {
                c
            } else {
                (c - n as f64).abs() / n as f64
            };
            assert!(
                err <= 0.03 || (n <= 100 && (c - n as f64).abs() <= 1.0),
                "n {n}: count {c}"
            );
        }
    }

    #[test]
    fn given_two_sets_when_merged_then_union_is_counted() {
        let (mut a, mut b) = (Hll::new(), Hll::new());
        for i in 0..50_000 {
            a.add(format!("u{i}").as_bytes());
        }
        for i in 25_000..75_000 {
            b.add(format!("u{i}").as_bytes());
        }
        a.merge(&b);
        let c = a.count() as f64;
        assert!((c - 75_000.0).abs() / 75_000.0 < 0.03, "{c}");
        let back = Hll::from_registers(a.registers()).unwrap();
        assert_eq!(back, a);
        assert!(Hll::from_registers(&[0u8; 10]).is_none());
    }
}
