//! HyperLogLog in Redis's own bytes: the value `GET` returns for a key written by `PFADD`.
//!
//! Layout (Redis 7): a 16-byte header, `HYLL`, the encoding (0 dense, 1 sparse), three unused
//! bytes and the cached cardinality (8 bytes, little endian; the top bit of the last byte set
//! means "stale"), then the registers:
//! - dense: 16384 registers of 6 bits, packed least significant bit first (12288 bytes);
//! - sparse: run-length opcodes. `00xxxxxx` ZERO: `x+1` zero registers (1..=64);
//!   `01xxxxxx yyyyyyyy` XZERO: `(x << 8 | y) + 1` zero registers (1..=16384); `1vvvvvxx` VAL:
//!   `x+1` registers (1..=4) of value `v+1` (1..=32).
//!
//! [`RedisHll`] updates the bytes the way redis-server does, step for step: a sparse update
//! splits the opcode covering the register and then merges equal neighbouring VALs, and the
//! sketch turns dense when a value exceeds 32 or the sparse bytes would exceed
//! `hll-sparse-max-bytes` (3000 by default). Two writers applying the same PFADDs in the same
//! order produce the same bytes, which the golden test checks against a real redis-server.

use crate::hll::{estimate, register_of, Hll, REGISTERS};

/// Header bytes.
pub const HEADER: usize = 16;
/// Bytes of a dense sketch.
pub const DENSE_SIZE: usize = HEADER + REGISTERS * 6 / 8;
/// Redis's default `hll-sparse-max-bytes`.
pub const SPARSE_MAX_BYTES: usize = 3000;

const DENSE: u8 = 0;
const SPARSE: u8 = 1;
const VAL_MAX_VALUE: u8 = 32;
const VAL_MAX_LEN: usize = 4;
const ZERO_MAX_LEN: usize = 64;
const XZERO_MAX_LEN: usize = 16384;
const REGISTER_MAX: u8 = 63;

/// Why bytes are not a HyperLogLog Redis would accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than the header or without the `HYLL` magic.
    #[error("not a HyperLogLog: {0}")]
    NotHll(&'static str),
    /// An encoding other than dense or sparse.
    #[error("unknown HyperLogLog encoding {0}")]
    Encoding(u8),
    /// A dense sketch of the wrong size.
    #[error("dense HyperLogLog of {0} bytes, expected {DENSE_SIZE}")]
    DenseSize(usize),
    /// Sparse opcodes that do not cover exactly 16384 registers.
    #[error("sparse HyperLogLog covering {0} registers, expected 16384")]
    SparseCoverage(usize),
}

/// A sketch as Redis stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisHll {
    bytes: Vec<u8>,
    sparse_max: usize,
}

impl std::fmt::Debug for RedisHll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RedisHll({}, {} bytes)",
            if self.is_sparse() { "sparse" } else { "dense" },
            self.bytes.len()
        )
    }
}

impl Default for RedisHll {
    fn default() -> Self {
        RedisHll::new()
    }
}

#[inline]
fn is_xzero(b: u8) -> bool {
    b & 0xc0 == 0x40
}
#[inline]
fn is_zero(b: u8) -> bool {
    b & 0xc0 == 0
}
#[inline]
fn zero_len(b: u8) -> usize {
    (b & 0x3f) as usize + 1
}
#[inline]
fn xzero_len(b0: u8, b1: u8) -> usize {
    (((b0 & 0x3f) as usize) << 8 | b1 as usize) + 1
}
#[inline]
fn val_value(b: u8) -> u8 {
    ((b >> 2) & 0x1f) + 1
}
#[inline]
fn val_len(b: u8) -> usize {
    (b & 0x3) as usize + 1
}
#[inline]
fn val(value: u8, len: usize) -> u8 {
    0x80 | ((value - 1) << 2) | (len - 1) as u8
}
/// A run of zeros as one ZERO or XZERO opcode.
fn zeros(len: usize, out: &mut Vec<u8>) {
    if len > ZERO_MAX_LEN {
        out.push(0x40 | ((len - 1) >> 8) as u8);
        out.push(((len - 1) & 0xff) as u8);
    } else {
        out.push((len - 1) as u8);
    }
}

fn dense_get(regs: &[u8], i: usize) -> u8 {
    let bit = i * 6;
    let (byte, fb) = (bit / 8, bit % 8);
    let lo = (regs[byte] >> fb) as u16;
    let hi = regs.get(byte + 1).map_or(0, |b| (*b as u16) << (8 - fb));
    ((lo | hi) & REGISTER_MAX as u16) as u8
}

fn dense_put(regs: &mut [u8], i: usize, v: u8) {
    let bit = i * 6;
    let (byte, fb) = (bit / 8, bit % 8);
    let word = (v as u16) << fb;
    let mask = (REGISTER_MAX as u16) << fb;
    regs[byte] = (regs[byte] & !(mask as u8)) | word as u8;
    if fb > 2 {
        regs[byte + 1] = (regs[byte + 1] & !((mask >> 8) as u8)) | (word >> 8) as u8;
    }
}

impl RedisHll {
    /// An empty sketch as `PFADD` creates it: sparse, one XZERO opcode, cached count 0.
    pub fn new() -> RedisHll {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(b"HYLL");
        bytes.extend_from_slice(&[SPARSE, 0, 0, 0]);
        bytes.extend_from_slice(&[0; 8]);
        zeros(XZERO_MAX_LEN, &mut bytes);
        RedisHll {
            bytes,
            sparse_max: SPARSE_MAX_BYTES,
        }
    }

    /// The same with another `hll-sparse-max-bytes`.
    pub fn with_sparse_max(sparse_max: usize) -> RedisHll {
        RedisHll {
            sparse_max,
            ..RedisHll::new()
        }
    }

    /// Loads bytes taken from Redis (`GET key`), checking them as Redis does and more (sparse
    /// opcodes must cover every register).
    pub fn from_bytes(bytes: &[u8]) -> Result<RedisHll, FormatError> {
        if bytes.len() < HEADER {
            return Err(FormatError::NotHll("shorter than the header"));
        }
        if &bytes[..4] != b"HYLL" {
            return Err(FormatError::NotHll("no HYLL magic"));
        }
        match bytes[4] {
            DENSE if bytes.len() != DENSE_SIZE => Err(FormatError::DenseSize(bytes.len())),
            DENSE => Ok(()),
            SPARSE => {
                let covered = sparse_runs(&bytes[HEADER..]).map(|(len, _)| len).sum();
                if covered == REGISTERS {
                    Ok(())
                } else {
                    Err(FormatError::SparseCoverage(covered))
                }
            }
            e => Err(FormatError::Encoding(e)),
        }?;
        Ok(RedisHll {
            bytes: bytes.to_vec(),
            sparse_max: SPARSE_MAX_BYTES,
        })
    }

    /// The bytes, as `GET` returns them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the sparse encoding is in use.
    pub fn is_sparse(&self) -> bool {
        self.bytes[4] == SPARSE
    }

    /// Adds elements as one `PFADD`; true when a register changed (its reply).
    pub fn pfadd<'a>(&mut self, elements: impl IntoIterator<Item = &'a [u8]>) -> bool {
        let mut updated = false;
        for e in elements {
            let (i, v) = register_of(e);
            updated |= self.set(i, v);
        }
        if updated {
            self.invalidate();
        }
        updated
    }

    /// Sets register `i` to at least `v`, as Redis does (may turn the sketch dense); true when
    /// it changed. The cached count is not touched (see [`RedisHll::invalidate`]).
    pub fn set(&mut self, i: usize, v: u8) -> bool {
        if self.is_sparse() {
            self.sparse_set(i, v)
        } else {
            self.dense_set(i, v)
        }
    }

    /// Marks the cached count stale (as every write command does).
    pub fn invalidate(&mut self) {
        self.bytes[15] |= 0x80;
    }

    /// `PFCOUNT` of this one key: the cached count when fresh, otherwise computed and cached.
    pub fn pfcount(&mut self) -> u64 {
        if self.bytes[15] & 0x80 == 0 {
            return u64::from_le_bytes(self.bytes[8..16].try_into().expect("8 bytes"));
        }
        let c = self.count();
        self.bytes[8..16].copy_from_slice(&c.to_le_bytes());
        c
    }

    /// The estimate, computed from the registers (the cache is neither read nor written).
    pub fn count(&self) -> u64 {
        let mut histo = [0u32; 64];
        if self.is_sparse() {
            for (len, v) in sparse_runs(&self.bytes[HEADER..]) {
                histo[v as usize] += len as u32;
            }
        } else {
            for i in 0..REGISTERS {
                histo[dense_get(&self.bytes[HEADER..], i) as usize] += 1;
            }
        }
        estimate(&histo)
    }

    /// The registers, one byte each.
    pub fn to_hll(&self) -> Hll {
        let mut regs = vec![0u8; REGISTERS];
        self.max_into(&mut regs);
        Hll::from_registers(&regs).expect("registers of a checked sketch")
    }

    /// Merges this sketch's registers into `h` (the union).
    pub fn max_into_hll(&self, h: &mut Hll) {
        let mut regs = h.registers().to_vec();
        self.max_into(&mut regs);
        *h = Hll::from_registers(&regs).expect("registers of checked sketches");
    }

    /// `regs[i] = max(regs[i], register i)`.
    fn max_into(&self, regs: &mut [u8]) {
        if self.is_sparse() {
            let mut i = 0;
            for (len, v) in sparse_runs(&self.bytes[HEADER..]) {
                if v > 0 {
                    for r in &mut regs[i..i + len] {
                        *r = (*r).max(v);
                    }
                }
                i += len;
            }
        } else {
            for (i, r) in regs.iter_mut().enumerate() {
                *r = (*r).max(dense_get(&self.bytes[HEADER..], i));
            }
        }
    }

    /// `PFMERGE self sources…`: the union, written the way Redis writes it (dense when any input
    /// is dense, otherwise register by register into the sparse encoding).
    pub fn pfmerge(&mut self, sources: &[&RedisHll]) {
        let mut max = vec![0u8; REGISTERS];
        self.max_into(&mut max);
        let mut dense = !self.is_sparse();
        for s in sources {
            s.max_into(&mut max);
            dense |= !s.is_sparse();
        }
        if dense && self.is_sparse() {
            self.make_dense();
        }
        for (i, v) in max.into_iter().enumerate() {
            if v > 0 {
                self.set(i, v);
            }
        }
        self.invalidate();
    }

    /// A sketch with these registers, built as Redis would by setting them in index order.
    pub fn from_hll(h: &Hll) -> RedisHll {
        let mut r = RedisHll::new();
        for (i, v) in h.registers().iter().enumerate() {
            if *v > 0 {
                r.set(i, (*v).min(REGISTER_MAX));
            }
        }
        r.invalidate();
        r
    }

    fn dense_set(&mut self, i: usize, v: u8) -> bool {
        let regs = &mut self.bytes[HEADER..];
        if dense_get(regs, i) < v {
            dense_put(regs, i, v);
            true
        } else {
            false
        }
    }

    fn make_dense(&mut self) {
        let mut dense = vec![0u8; DENSE_SIZE];
        dense[..HEADER].copy_from_slice(&self.bytes[..HEADER]);
        dense[4] = DENSE;
        let mut i = 0;
        for (len, v) in sparse_runs(&self.bytes[HEADER..]) {
            if v > 0 {
                for j in i..i + len {
                    dense_put(&mut dense[HEADER..], j, v);
                }
            }
            i += len;
        }
        self.bytes = dense;
    }

    fn promote(&mut self, i: usize, v: u8) -> bool {
        self.make_dense();
        self.dense_set(i, v)
    }

    fn sparse_set(&mut self, index: usize, count: u8) -> bool {
        if count > VAL_MAX_VALUE {
            return self.promote(index, count);
        }
        // Step 1: the opcode covering `index`, and the one before it.
        let end = self.bytes.len();
        let mut p = HEADER;
        let mut prev: Option<usize> = None;
        let mut first = 0;
        let mut span;
        loop {
            if p >= end {
                return false; // checked on load: cannot happen
            }
            let b = self.bytes[p];
            let oplen;
            if is_zero(b) {
                span = zero_len(b);
                oplen = 1;
            } else if is_xzero(b) {
                span = xzero_len(b, self.bytes[p + 1]);
                oplen = 2;
            } else {
                span = val_len(b);
                oplen = 1;
            }
            if index < first + span {
                break;
            }
            prev = Some(p);
            p += oplen;
            first += span;
        }
        let b = self.bytes[p];
        let (zero, xzero) = (is_zero(b), is_xzero(b));
        // Step 2: the trivial cases, then the split.
        if !zero && !xzero {
            if val_value(b) >= count {
                return false;
            }
            if span == 1 {
                self.bytes[p] = val(count, 1);
                self.merge_vals(prev);
                return true;
            }
        }
        if zero && span == 1 {
            self.bytes[p] = val(count, 1);
            self.merge_vals(prev);
            return true;
        }
        let last = first + span - 1;
        let mut seq: Vec<u8> = Vec::with_capacity(5);
        if zero || xzero {
            if index != first {
                zeros(index - first, &mut seq);
            }
            seq.push(val(count, 1));
            if index != last {
                zeros(last - index, &mut seq);
            }
        } else {
            let current = val_value(b);
            if index != first {
                seq.push(val(current, index - first));
            }
            seq.push(val(count, 1));
            if index != last {
                seq.push(val(current, last - index));
            }
        }
        // Step 3: replace the opcode, unless the sketch would grow past the sparse limit.
        let oldlen = if xzero { 2 } else { 1 };
        if seq.len() > oldlen && self.bytes.len() + seq.len() - oldlen > self.sparse_max {
            return self.promote(index, count);
        }
        self.bytes.splice(p..p + oldlen, seq);
        self.merge_vals(prev);
        true
    }

    /// Step 4: merges equal adjacent VAL opcodes, scanning up to 5 opcodes from `prev`.
    fn merge_vals(&mut self, prev: Option<usize>) {
        let mut p = prev.unwrap_or(HEADER);
        let mut scan = 5;
        while p < self.bytes.len() && scan > 0 {
            scan -= 1;
            let b = self.bytes[p];
            if is_xzero(b) {
                p += 2;
                continue;
            }
            if is_zero(b) {
                p += 1;
                continue;
            }
            if let Some(&next) = self.bytes.get(p + 1) {
                if next & 0x80 != 0 && val_value(b) == val_value(next) {
                    let len = val_len(b) + val_len(next);
                    if len <= VAL_MAX_LEN {
                        self.bytes[p + 1] = val(val_value(b), len);
                        self.bytes.remove(p);
                        continue; // try to merge the result with its right neighbour
                    }
                }
            }
            p += 1;
        }
    }
}

/// The (length, value) runs of sparse opcodes; stops at a truncated XZERO.
fn sparse_runs(ops: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    let mut p = 0;
    std::iter::from_fn(move || {
        let b = *ops.get(p)?;
        if is_zero(b) {
            p += 1;
            Some((zero_len(b), 0))
        } else if is_xzero(b) {
            let b1 = *ops.get(p + 1)?;
            p += 2;
            Some((xzero_len(b, b1), 0))
        } else {
            p += 1;
            Some((val_len(b), val_value(b)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elements(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("e{i}").into_bytes()).collect()
    }

    #[test]
    fn new_sketch_is_the_bytes_pfadd_creates() {
        let h = RedisHll::new();
        assert_eq!(
            h.as_bytes(),
            &[b'H', b'Y', b'L', b'L', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 0xff]
        );
        assert_eq!(h.count(), 0);
    }

    #[test]
    fn dense_registers_round_trip_without_touching_neighbours() {
        let mut regs = vec![0u8; REGISTERS * 6 / 8];
        let mut expect = vec![0u8; REGISTERS];
        let mut x: u32 = 12345;
        for round in 0..3 {
            for (i, e) in expect.iter_mut().enumerate() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let v = ((x >> 16) as u8) & REGISTER_MAX;
                if round == 0 || i % 3 == round {
                    dense_put(&mut regs, i, v);
                    *e = v;
                }
            }
            for (i, e) in expect.iter().enumerate() {
                assert_eq!(dense_get(&regs, i), *e, "register {i}, round {round}");
            }
        }
    }

    #[test]
    fn sparse_and_raw_registers_agree_until_and_after_promotion() {
        let mut r = RedisHll::new();
        let mut raw = Hll::new();
        let mut promoted_at = None;
        for (n, e) in elements(20_000).iter().enumerate() {
            let a = r.pfadd([e.as_slice()]);
            let b = raw.add(e);
            assert_eq!(a, b, "element {n}");
            if promoted_at.is_none() && !r.is_sparse() {
                promoted_at = Some(n);
            }
            if n % 997 == 0 || n < 50 {
                assert_eq!(r.to_hll(), raw, "after {n}");
                assert_eq!(r.count(), raw.count(), "after {n}");
                assert!(r.as_bytes().len() <= SPARSE_MAX_BYTES || !r.is_sparse());
            }
        }
        assert!(
            promoted_at.is_some(),
            "20K elements exceed the sparse limit"
        );
        assert_eq!(r.as_bytes().len(), DENSE_SIZE);
        assert_eq!(r.to_hll(), raw);
        // Loading our own bytes gives the same sketch.
        assert_eq!(RedisHll::from_bytes(r.as_bytes()).unwrap().to_hll(), raw);
    }

    #[test]
    fn sparse_opcodes_stay_canonical_enough_to_cover_every_register() {
        let mut r = RedisHll::with_sparse_max(1 << 20); // never promote by size
        for e in elements(3_000) {
            r.pfadd([e.as_slice()]);
            let covered: usize = sparse_runs(&r.as_bytes()[HEADER..]).map(|x| x.0).sum();
            assert_eq!(covered, REGISTERS);
        }
        assert!(r.is_sparse());
    }

    #[test]
    fn pfcount_caches_and_writes_invalidate() {
        let mut r = RedisHll::new();
        r.pfadd([b"a".as_slice(), b"b"]);
        assert_eq!(r.as_bytes()[15], 0x80, "stale after a write");
        assert_eq!(r.pfcount(), 2);
        assert_eq!(&r.as_bytes()[8..16], &2u64.to_le_bytes());
        assert!(!r.pfadd([b"a".as_slice()]), "no register changed");
        assert_eq!(r.as_bytes()[15], 0, "an unchanged sketch keeps its cache");
        r.pfadd([b"c".as_slice()]);
        assert_eq!(r.as_bytes()[8], 2, "the old count stays, marked stale");
        assert_eq!(r.as_bytes()[15], 0x80);
        assert_eq!(r.pfcount(), 3);
    }

    #[test]
    fn merge_is_the_union_and_stays_sparse_only_when_every_input_is() {
        let (mut a, mut b) = (RedisHll::new(), RedisHll::new());
        for e in elements(300) {
            a.pfadd([e.as_slice()]);
        }
        for e in elements(600).split_off(300) {
            b.pfadd([e.as_slice()]);
        }
        let mut u = Hll::new();
        u.merge(&a.to_hll());
        u.merge(&b.to_hll());
        let mut m = RedisHll::new();
        m.pfmerge(&[&a, &b]);
        assert!(m.is_sparse());
        assert_eq!(m.to_hll(), u);
        let mut big = RedisHll::new();
        for e in elements(50_000) {
            big.pfadd([e.as_slice()]);
        }
        assert!(!big.is_sparse());
        let mut m2 = a.clone();
        m2.pfmerge(&[&big]);
        assert!(!m2.is_sparse());
        let mut u2 = big.to_hll();
        u2.merge(&a.to_hll());
        assert_eq!(m2.to_hll(), u2);
    }

    #[test]
    fn bad_bytes_are_rejected_with_the_reason() {
        assert!(matches!(
            RedisHll::from_bytes(b"HY"),
            Err(FormatError::NotHll(_))
        ));
        assert!(matches!(
            RedisHll::from_bytes(b"XYLL\x01\0\0\0\0\0\0\0\0\0\0\0\x7f\xff"),
            Err(FormatError::NotHll(_))
        ));
        assert_eq!(
            RedisHll::from_bytes(b"HYLL\x07\0\0\0\0\0\0\0\0\0\0\0\x7f\xff"),
            Err(FormatError::Encoding(7))
        );
        assert_eq!(
            RedisHll::from_bytes(b"HYLL\x00\0\0\0\0\0\0\0\0\0\0\0\x7f\xff"),
            Err(FormatError::DenseSize(18))
        );
        assert_eq!(
            RedisHll::from_bytes(b"HYLL\x01\0\0\0\0\0\0\0\0\0\0\0\x7f\xfe"),
            Err(FormatError::SparseCoverage(16383))
        );
    }
}
