//! The packed encoding of cells in one value of the embedded store.
//!
//! ```text
//! value := 0x01 cell*
//! cell  := family_len:u8 family qualifier_len:varint qualifier ts:zigzag-varint value_len:varint value
//! ```
//! A 6-cell pageview costs about 6 * (2 + 4 + 6 + 1) bytes of framing plus its strings, before
//! the block compression of the LSM.

use dmp_core::Cell;

const FORMAT: u8 = 1;

/// Encodes cells into one packed value, in a buffer of exactly its size (the value is kept as is
/// by the memtable and the row cache, so spare capacity would be memory nobody counts).
pub fn encode(cells: &[Cell]) -> Vec<u8> {
    let size: usize = cells
        .iter()
        .map(|c| {
            1 + c.family.len()
                + varint_len(c.qualifier.len() as u64)
                + c.qualifier.len()
                + varint_len(zigzag(c.ts))
                + varint_len(c.value.len() as u64)
                + c.value.len()
        })
        .sum();
    let mut out = Vec::with_capacity(1 + size);
    out.push(FORMAT);
    for c in cells {
        encode_cell(&mut out, c);
    }
    out
}

/// An empty packed value with room for `size` more bytes of cell encodings.
pub(crate) fn packed_with_capacity(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + size);
    out.push(FORMAT);
    out
}

/// Appends one cell.
pub fn encode_cell(out: &mut Vec<u8>, c: &Cell) {
    debug_assert!(c.family.len() <= 255);
    out.push(c.family.len() as u8);
    out.extend_from_slice(c.family.as_bytes());
    put_varint(out, c.qualifier.len() as u64);
    out.extend_from_slice(c.qualifier.as_bytes());
    put_varint(out, zigzag(c.ts));
    put_varint(out, c.value.len() as u64);
    out.extend_from_slice(&c.value);
}

/// One cell of a packed value as stored, borrowed: names as bytes, the value as its range in the
/// packed value, and the cell's whole encoding (to copy it into another packed value as is).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawCell<'a> {
    pub family: &'a [u8],
    pub qualifier: &'a [u8],
    pub ts: i64,
    pub value: (u32, u32),
    pub encoded: &'a [u8],
}

impl RawCell<'_> {
    /// HBase order: family, qualifier, then newest version first.
    #[inline]
    pub fn cmp_key(&self, other: &RawCell<'_>) -> std::cmp::Ordering {
        dmp_core::cell::cmp_name(self.family, other.family)
            .then_with(|| dmp_core::cell::cmp_name(self.qualifier, other.qualifier))
            .then_with(|| other.ts.cmp(&self.ts))
    }

    /// Whether two cells have the same coordinates (family, qualifier, version).
    #[inline]
    pub fn same_coordinates(&self, other: &RawCell<'_>) -> bool {
        self.ts == other.ts
            && dmp_core::cell::same_bytes(self.qualifier, other.qualifier)
            && dmp_core::cell::same_bytes(self.family, other.family)
    }

    /// The cell, its value a slice of `packed` (the value this cell was walked from).
    pub fn to_cell(self, packed: &bytes::Bytes) -> Result<Cell, String> {
        Ok(self.to_cell_named(name(self.family)?, name(self.qualifier)?, packed))
    }

    /// [`RawCell::to_cell`] with names already made from this cell's (shared with the cell
    /// before it in the same column, say).
    #[inline]
    pub fn to_cell_named(
        self,
        family: compact_str::CompactString,
        qualifier: compact_str::CompactString,
        packed: &bytes::Bytes,
    ) -> Cell {
        Cell {
            family,
            qualifier,
            ts: self.ts,
            value: packed.slice(self.value.0 as usize..self.value.1 as usize),
        }
    }
}

/// Walks a packed value's cells, calling `f` for each until it answers `true`; returns whether
/// one did. The one parser of the format: [`decode`] and [`any_cell`] both go through it.
pub(crate) fn walk<'a>(
    value: &'a [u8],
    mut f: impl FnMut(RawCell<'a>) -> Result<bool, String>,
) -> Result<bool, String> {
    if value.len() > u32::MAX as usize {
        return Err("packed value over 4 GiB".into());
    }
    let mut buf = value;
    match buf.split_first() {
        Some((&FORMAT, rest)) => buf = rest,
        Some((v, _)) => return Err(format!("unknown value format {v}")),
        None => return Err("empty value".into()),
    }
    let take = |buf: &mut &'_ [u8], len: usize, what: &str| -> Result<(), String> {
        if buf.len() < len {
            return Err(format!("truncated {what}"));
        }
        *buf = &buf[len..];
        Ok(())
    };
    while let Some((&flen, rest)) = buf.split_first() {
        let cell_start = value.len() - buf.len();
        buf = rest;
        let family = buf.get(..flen as usize).unwrap_or_default();
        take(&mut buf, flen as usize, "cell")?;
        let qlen = get_varint(&mut buf)? as usize;
        let qualifier = buf.get(..qlen).unwrap_or_default();
        take(&mut buf, qlen, "cell")?;
        let ts = unzigzag(get_varint(&mut buf)?);
        let vlen = get_varint(&mut buf)? as usize;
        let start = value.len() - buf.len();
        take(&mut buf, vlen, "cell value")?;
        let end = value.len() - buf.len();
        let cell = RawCell {
            family,
            qualifier,
            ts,
            value: (start as u32, end as u32),
            encoded: &value[cell_start..end],
        };
        if f(cell)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Decodes a packed value, calling `f` for each cell. Cell values are slices of `value`.
pub fn decode(value: &bytes::Bytes, mut f: impl FnMut(Cell)) -> Result<(), String> {
    walk(value, |c| {
        f(c.to_cell(value)?);
        Ok(false)
    })
    .map(|_| ())
}

/// Whether any cell of a packed value has `f(family, version)` true, without building cells (no
/// strings, no value slices): what the TTL compaction filter asks of every value it rewrites,
/// nearly always to hear no. Names are not checked to be UTF-8 here; `decode` does.
pub fn any_cell(value: &[u8], mut f: impl FnMut(&[u8], i64) -> bool) -> Result<bool, String> {
    walk(value, |c| Ok(f(c.family, c.ts)))
}

fn name(bytes: &[u8]) -> Result<compact_str::CompactString, String> {
    std::str::from_utf8(bytes)
        .map(Into::into)
        .map_err(|_| "family or qualifier is not UTF-8".to_string())
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Bytes of `v` as an unsigned LEB128 varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint.
#[inline(always)]
pub fn get_varint(buf: &mut &[u8]) -> Result<u64, String> {
    match varint(buf) {
        Some(v) => Ok(v),
        None => Err(varint_error(buf)),
    }
}

/// [`get_varint`] without the error's text (built by [`varint_error`] when needed): `buf` is
/// left as it was when there is no varint.
#[inline(always)]
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let (&b, rest) = buf.split_first()?;
    if b < 0x80 {
        *buf = rest;
        return Some(b as u64);
    }
    // Up to 8 bytes at once (a timestamp in ms is 6): the first byte without the continuation
    // bit ends it; the 7-bit groups are packed together without a loop.
    if let Some(word) = buf.first_chunk::<8>() {
        let w = u64::from_le_bytes(*word);
        let ends = !w & 0x8080_8080_8080_8080;
        if ends != 0 {
            let len = (ends.trailing_zeros() / 8 + 1) as usize;
            let mut x = (w & 0x7f7f_7f7f_7f7f_7f7f) & (u64::MAX >> (64 - 8 * len));
            x = ((x & 0x7f00_7f00_7f00_7f00) >> 1) | (x & 0x007f_007f_007f_007f);
            x = ((x & 0x3fff_0000_3fff_0000) >> 2) | (x & 0x0000_3fff_0000_3fff);
            x = ((x & 0x0fff_ffff_0000_0000) >> 4) | (x & 0x0000_0000_0fff_ffff);
            *buf = &buf[len..];
            return Some(x);
        }
    }
    varint_slow(buf)
}

#[inline(never)]
fn varint_slow(buf: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().take(10).enumerate() {
        v |= ((b & 0x7f) as u64) << (7 * i);
        if b < 0x80 {
            *buf = &buf[i + 1..];
            return Some(v);
        }
    }
    None
}

/// Why `buf` does not start with a varint.
#[cold]
fn varint_error(buf: &[u8]) -> String {
    if buf.len() < 10 && buf.iter().all(|b| b & 0x80 != 0) {
        "truncated varint".into()
    } else {
        "varint too long".into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn given_cells_when_encoded_then_the_buffer_is_exactly_the_value() {
        let cells: Vec<dmp_core::Cell> = [
            0i64,
            1,
            -1,
            63,
            64,
            1 << 20,
            1_795_000_000_000,
            i64::MIN,
            i64::MAX,
        ]
        .iter()
        .enumerate()
        .map(|(i, ts)| dmp_core::Cell::new("e", "q".repeat(i * 40), *ts, vec![7u8; i * 50]))
        .collect();
        let v = super::encode(&cells);
        assert_eq!(v.len(), v.capacity());
        for v in [0u64, 1, 127, 128, 16383, 16384, u64::MAX] {
            let mut out = Vec::new();
            super::put_varint(&mut out, v);
            assert_eq!(super::varint_len(v), out.len(), "{v}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn given_any_number_when_varint_coded_then_it_reads_back_whatever_follows(
            v in prop_oneof![any::<u64>(), 0u64..300, (0u32..64).prop_map(|b| 1u64 << b)],
            tail in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let mut out = Vec::new();
            super::put_varint(&mut out, v);
            prop_assert_eq!(out.len(), super::varint_len(v));
            let len = out.len();
            out.extend_from_slice(&tail);
            let mut buf = &out[..];
            prop_assert_eq!(super::get_varint(&mut buf), Ok(v));
            prop_assert_eq!(buf, &tail[..]);
            // Cut short: an error, never a wrong number.
            let mut cut = &out[..len - 1];
            prop_assert!(super::get_varint(&mut cut).is_err());
        }
    }

    proptest! {
        #[test]
        fn given_any_cells_when_encoded_then_decode_returns_them(
            cells in proptest::collection::vec(
                ("[a-z]{1,3}", "[a-z.]{0,12}", any::<i64>(), proptest::collection::vec(any::<u8>(), 0..40)),
                0..20)
        ) {
            let cells: Vec<Cell> = cells.into_iter().map(|(f, q, ts, v)| Cell::new(f, q, ts, v)).collect();
            let mut back = Vec::new();
            decode(&encode(&cells).into(), |c| back.push(c)).unwrap();
            prop_assert_eq!(back, cells);
        }
    }

    proptest! {
        #[test]
        fn given_any_cells_when_scanned_then_any_cell_agrees_with_decode(
            cells in proptest::collection::vec(
                ("[a-z]{1,3}", "[a-z.]{0,12}", any::<i64>(), proptest::collection::vec(any::<u8>(), 0..40)),
                0..20),
            cut in any::<i64>(),
        ) {
            let cells: Vec<Cell> = cells.into_iter().map(|(f, q, ts, v)| Cell::new(f, q, ts, v)).collect();
            let value = encode(&cells);
            let old_e = |f: &[u8], ts: i64| f == b"e" && ts < cut;
            prop_assert_eq!(
                any_cell(&value, old_e).unwrap(),
                cells.iter().any(|c| old_e(c.family.as_bytes(), c.ts))
            );
            for len in 0..value.len() {
                // A cut value is an error or a walk of the cells before the cut, never a panic.
                let _ = any_cell(&value[..len], |_, _| false);
            }
        }
    }

    #[test]
    fn given_truncated_value_when_decoded_then_error_not_panic() {
        let v = encode(&[Cell::new("e", "url", 5, b"https://x".to_vec())]);
        for cut in 0..v.len() {
            let r = decode(&bytes::Bytes::copy_from_slice(&v[..cut]), |_| {});
            if cut < v.len() {
                assert!(r.is_err() || cut == 1, "cut {cut}");
            }
        }
    }
}
