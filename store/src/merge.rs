//! Merging a row's packed parts without building cells, and decoding the result.
//!
//! A row is stored as a base (packed cells in HBase order, one value per coordinate) and the
//! packed writes since. [`merge`] walks them as borrowed cells (names and values stay in their
//! buffers: no string, no value slice, no allocation per cell), places each written cell in the
//! base by binary search (a later write of a coordinate wins), applies each family's TTL and
//! versions, and copies the surviving cells' encodings into one packed value. That value is what
//! a read decodes, what the row cache keeps and what a repack writes as the new base.
//!
//! [`decode`] builds the cells a reader asked for, with a [`Projection`] applied while walking:
//! left-out cells are never built.

use bytes::Bytes;
use dmp_core::Cell;

use crate::codec::{self, RawCell};
use crate::{Projection, Schema};

/// Packed bytes per cell, a little under an event cell's usual size: vectors sized by it rarely
/// grow (and copy) while a row is read.
const CELL_BYTES: usize = 16;

/// A row read from its parts.
pub(crate) struct Merged {
    /// The merge as one packed value (HBase order, TTL and versions applied), when asked for and
    /// there were writes to merge (with none, the base is the merge).
    pub packed: Option<Vec<u8>>,
    /// The cells the read keeps, projected.
    pub cells: Vec<Cell>,
}

/// Reads a row from its `base` (None: the row has no base) and `writes` (packed values, oldest
/// write first) as of `now`: the latest write of a coordinate wins, TTL and versions apply, then
/// `projection`. With `pack`, the merge also comes back as one packed value. Cell values are
/// slices of the buffers they were read from.
pub(crate) fn read(
    base: Option<&Bytes>,
    writes: &[&Bytes],
    schema: &Schema,
    now: i64,
    projection: Option<&Projection>,
    pack: bool,
) -> Result<Merged, String> {
    if let (None, false, Some(p)) = (base, pack, projection) {
        if let Some(m) = read_writes_projected(writes, schema, now, p)? {
            return Ok(m);
        }
    }
    let limits = Limits::new(schema, now);
    let empty = Bytes::new();
    let base = base.unwrap_or(&empty);
    if writes.is_empty() {
        // The base is the merge: one walk, nothing to pack.
        let mut sink = Sink {
            limits,
            packed: None,
            out: Cells::new(projection, base.len() / CELL_BYTES),
        };
        if !base.is_empty() {
            codec::walk(base, |c| {
                sink.emit(c, base)?;
                Ok(false)
            })?;
        }
        return Ok(Merged {
            packed: None,
            cells: sink.out.finish(),
        });
    }
    // The base's cells, for the written cells' places to be found by binary search.
    let mut cells: Vec<RawCell<'_>> = Vec::with_capacity(base.len() / CELL_BYTES);
    if !base.is_empty() {
        codec::walk(base, |c| {
            cells.push(c);
            Ok(false)
        })?;
    }
    // Cells of the writes with the write they are in (i: writes[i - 1]) and their place in write
    // order (of two cells of one coordinate, in one write or two, the later one wins).
    let mut deltas: Vec<(RawCell<'_>, u32, u32)> = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        codec::walk(w, |c| {
            let n = deltas.len() as u32;
            deltas.push((c, i as u32 + 1, n));
            Ok(false)
        })?;
    }
    newest_per_coordinate(&mut deltas);
    let written: usize = deltas.iter().map(|d| d.0.encoded.len()).sum();
    let mut sink = Sink {
        limits,
        // The base's cells and the writes' (less when a write replaces a cell or limits drop).
        packed: pack.then(|| codec::packed_with_capacity(base.len().saturating_sub(1) + written)),
        out: Cells::new(projection, cells.len() + deltas.len()),
    };
    // Each written cell's place in the base by binary search; the cells go to the sink in
    // order as they are placed (not into a merged vector first: it was the row's size again).
    let mut rest = &cells[..];
    for (d, src, _) in deltas {
        let before = rest.partition_point(|c| c.cmp_key(&d).is_lt());
        for c in &rest[..before] {
            sink.emit(*c, base)?;
        }
        rest = &rest[before..];
        if rest.first().is_some_and(|c| c.same_coordinates(&d)) {
            rest = &rest[1..]; // a later write replaces the base's value
        }
        sink.emit(d, writes[src as usize - 1])?;
    }
    for c in rest {
        sink.emit(*c, base)?;
    }
    let Sink {
        mut packed, out, ..
    } = sink;
    if let Some(p) = &mut packed {
        p.shrink_to_fit(); // exact size when cells were replaced or dropped (the cache keeps it)
    }
    Ok(Merged {
        packed,
        cells: out.finish(),
    })
}

/// Written cells (each with the write it is in and its place in write order) into HBase order,
/// only the newest write of each coordinate kept. Unstable, with the write order as the last
/// key: a stable sort allocated its scratch buffer at every read.
fn newest_per_coordinate(deltas: &mut Vec<(RawCell<'_>, u32, u32)>) {
    deltas.sort_unstable_by(|a, b| a.0.cmp_key(&b.0).then(b.2.cmp(&a.2)));
    deltas.dedup_by(|later, earlier| later.0.same_coordinates(&earlier.0));
}

/// [`read`] of writes alone, unpacked, with a projection (what was written since a read): the
/// left-out columns' cells are never sorted or built, only their versions kept for the markers.
/// None (the general path then) when a left-out column may hold more versions than its family
/// keeps, where the general path's limits would drop some.
fn read_writes_projected(
    writes: &[&Bytes],
    schema: &Schema,
    now: i64,
    p: &Projection,
) -> Result<Option<Merged>, String> {
    let family = p.family.as_bytes();
    let max_versions = schema.family(&p.family).map_or(0, |f| f.max_versions) as usize;
    let cutoff = schema.ttl_ms(&p.family).map_or(i64::MIN, |ttl| now - ttl);
    let mut deltas: Vec<(RawCell<'_>, u32, u32)> = Vec::new();
    let mut marks: Vec<i64> = Vec::new();
    let mut left_out = 0usize;
    for (i, w) in writes.iter().enumerate() {
        codec::walk(w, |c| {
            if dmp_core::cell::same_bytes(c.family, family) && !p.keeps(c.qualifier) {
                left_out += 1;
                if c.ts >= cutoff {
                    marks.push(c.ts);
                }
            } else {
                let n = deltas.len() as u32;
                deltas.push((c, i as u32 + 1, n));
            }
            Ok(false)
        })?;
    }
    if left_out > max_versions {
        return Ok(None);
    }
    newest_per_coordinate(&mut deltas);
    let mut sink = Sink {
        limits: Limits::new(schema, now),
        packed: None,
        out: Cells::new(Some(p), deltas.len()),
    };
    for (d, src, _) in deltas {
        sink.emit(d, writes[src as usize - 1])?;
    }
    let mut cells = sink.out.finish();
    if !marks.is_empty() {
        marks.sort_unstable_by(|a, b| b.cmp(a));
        marks.dedup();
        // Where the projected family's cells start (or would).
        let at = cells.partition_point(|c| c.family.as_str() < p.family.as_str());
        cells.splice(at..at, marks.iter().map(|ts| p.marker(*ts)));
    }
    Ok(Some(Merged {
        packed: None,
        cells,
    }))
}

/// Where a merge's cells go, in HBase order: through the limits, into the packed value (when
/// one is made) and the read's cells.
struct Sink<'s, 'p, 'a> {
    limits: Limits<'s, 'a>,
    packed: Option<Vec<u8>>,
    out: Cells<'p, 'a>,
}

impl<'a> Sink<'_, '_, 'a> {
    /// Adds `c`, a cell of the packed value `buf`, unless the limits leave it out.
    #[inline]
    fn emit(&mut self, c: RawCell<'a>, buf: &Bytes) -> Result<(), String> {
        let next = self.limits.keeps(&c);
        if let Next::Dropped = next {
            return Ok(());
        }
        if let Some(p) = &mut self.packed {
            p.extend_from_slice(c.encoded);
        }
        self.out.push(c, buf, next)
    }
}

/// Which cells of a row, met in HBase order, a read keeps: not those of families no longer in
/// the schema (invisible, as in HBase), versions beyond a family's `max_versions`, or cells past
/// its TTL.
struct Limits<'s, 'a> {
    schema: &'s Schema,
    now: i64,
    /// The previous cell's family and qualifier.
    prev: Option<(&'a [u8], &'a [u8])>,
    max_versions: u32,
    cutoff: i64,
    versions: u32,
    /// Whether the previous cell was kept.
    prev_kept: bool,
}

/// What [`Limits::keeps`] says of a cell, and how a kept one stands to the cell kept before it
/// (so that [`Cells::push`] need not compare the names again).
#[derive(Debug, Clone, Copy)]
enum Next {
    /// Left out.
    Dropped,
    /// Kept, right after a kept cell: whether of its family, and of its column.
    After {
        same_family: bool,
        same_column: bool,
    },
    /// Kept, first or after cells left out: the names are to be compared.
    Unknown,
}

impl<'s, 'a> Limits<'s, 'a> {
    fn new(schema: &'s Schema, now: i64) -> Self {
        Limits {
            schema,
            now,
            prev: None,
            max_versions: 0,
            cutoff: i64::MIN,
            versions: 0,
            prev_kept: false,
        }
    }

    /// Whether `c`, the cell after the previous one asked about, is kept.
    #[inline]
    fn keeps(&mut self, c: &RawCell<'a>) -> Next {
        self.keeps_parts(c.family, c.qualifier, c.ts)
    }

    /// [`Limits::keeps`] of a cell given by its family, qualifier and version.
    #[inline]
    fn keeps_parts(&mut self, family: &'a [u8], qualifier: &'a [u8], ts: i64) -> Next {
        let same_family = self
            .prev
            .is_some_and(|(f, _)| dmp_core::cell::same_bytes(f, family));
        if !same_family {
            let name = std::str::from_utf8(family).unwrap_or("");
            self.max_versions = self.schema.family(name).map_or(0, |f| f.max_versions);
            self.cutoff = self
                .schema
                .ttl_ms(name)
                .map_or(i64::MIN, |ttl| self.now - ttl);
        }
        let same_column = same_family
            && self
                .prev
                .is_some_and(|(_, q)| dmp_core::cell::same_bytes(q, qualifier));
        self.versions = if same_column { self.versions + 1 } else { 1 };
        self.prev = Some((family, qualifier));
        let kept = self.versions <= self.max_versions && ts >= self.cutoff;
        let next = match (kept, self.prev_kept) {
            (false, _) => Next::Dropped,
            (true, true) => Next::After {
                same_family,
                same_column,
            },
            (true, false) => Next::Unknown,
        };
        self.prev_kept = kept;
        next
    }
}

/// Drops from `cells`, in HBase order, what a read would leave out as of `now`: cells of
/// families not in `schema`, versions beyond a family's `max_versions`, cells past its TTL (the
/// same [`Limits`] a read applies to packed cells).
pub(crate) fn limit(cells: &mut Vec<Cell>, schema: &Schema, now: i64) {
    let keep: Vec<bool> = {
        let mut limits = Limits::new(schema, now);
        cells
            .iter()
            .map(|c| {
                let next = limits.keeps_parts(c.family.as_bytes(), c.qualifier.as_bytes(), c.ts);
                !matches!(next, Next::Dropped)
            })
            .collect()
    };
    let mut keep = keep.into_iter();
    cells.retain(|_| keep.next().unwrap_or(false));
}

/// The cells a read returns, built as they are met in HBase order, with a projection applied:
/// left-out cells are never built, their versions become markers.
struct Cells<'p, 'a> {
    projection: Option<&'p Projection>,
    cells: Vec<Cell>,
    /// Versions of the left-out columns so far, newest first, once each.
    marks: Vec<i64>,
    /// Versions of the left-out column being read (a column is a run of falling versions).
    run: Vec<i64>,
    /// Where the projected family starts in `cells`.
    family_at: Option<usize>,
    /// The previous cell's qualifier in the projected family and whether it was kept.
    prev: Option<(&'a [u8], bool)>,
    /// Whether the previous cell was of the projected family.
    in_family: bool,
    /// The last cell built: its family and qualifier as stored, and its index in `cells`. A
    /// column is a run of versions: the next cell of it shares the names instead of checking
    /// and copying them again.
    last: Option<(&'a [u8], &'a [u8], usize)>,
}

impl<'p, 'a> Cells<'p, 'a> {
    fn new(projection: Option<&'p Projection>, capacity: usize) -> Self {
        // About one version per event, of several cells each.
        let versions = if projection.is_some() {
            capacity / 4
        } else {
            0
        };
        Cells {
            projection,
            cells: Vec::with_capacity(capacity),
            marks: Vec::with_capacity(versions),
            run: Vec::with_capacity(versions),
            family_at: None,
            prev: None,
            in_family: false,
            last: None,
        }
    }

    /// Adds `c`, a cell of the packed value `buf`, kept by the limits as `next` says.
    #[inline]
    fn push(&mut self, c: RawCell<'a>, buf: &Bytes, next: Next) -> Result<(), String> {
        let (same_family, same_column) = match next {
            Next::After {
                same_family,
                same_column,
            } => (Some(same_family), Some(same_column)),
            _ => (None, None),
        };
        if let Some(p) = self.projection {
            self.in_family = match same_family {
                Some(true) => self.in_family,
                _ => dmp_core::cell::same_bytes(c.family, p.family.as_bytes()),
            };
            if self.in_family {
                self.family_at.get_or_insert(self.cells.len());
                let kept = match (same_column, self.prev) {
                    (Some(true), Some((_, kept))) => kept,
                    (None, Some((q, kept))) if dmp_core::cell::same_bytes(q, c.qualifier) => kept,
                    _ => {
                        self.end_column();
                        p.keeps(c.qualifier)
                    }
                };
                self.prev = Some((c.qualifier, kept));
                if !kept {
                    self.run.push(c.ts);
                    return Ok(());
                }
            } else if self.prev.take().is_some() {
                self.end_column();
            }
        }
        // The cell before, if of the same column, was built (a left-out column is left out
        // whole) and is the last one.
        let same = match (same_column, self.last) {
            (Some(true), Some((_, _, i))) => Some(i),
            (None, Some((f, q, i)))
                if dmp_core::cell::same_bytes(q, c.qualifier)
                    && dmp_core::cell::same_bytes(f, c.family) =>
            {
                Some(i)
            }
            _ => None,
        };
        let cell = match same {
            Some(i) => {
                let same = &self.cells[i];
                c.to_cell_named(same.family.clone(), same.qualifier.clone(), buf)
            }
            None => c.to_cell(buf)?,
        };
        self.last = Some((c.family, c.qualifier, self.cells.len()));
        self.cells.push(cell);
        Ok(())
    }

    /// Adds the versions of the left-out column just read to the marks. Columns of one row
    /// mostly hold the same versions (every event has them), so that is usually a compare.
    fn end_column(&mut self) {
        if self.run.is_empty() || self.run == self.marks {
            // nothing new
        } else if self.marks.is_empty() {
            std::mem::swap(&mut self.marks, &mut self.run);
        } else {
            // Merge two falling lists, once each.
            let mut merged = Vec::with_capacity(self.marks.len() + self.run.len());
            let (mut a, mut b) = (self.marks.iter().peekable(), self.run.iter().peekable());
            while let (Some(&&x), Some(&&y)) = (a.peek(), b.peek()) {
                merged.push(x.max(y));
                if x >= y {
                    a.next();
                }
                if y >= x {
                    b.next();
                }
            }
            merged.extend(a);
            merged.extend(b);
            self.marks = merged;
        }
        self.run.clear();
    }

    fn finish(mut self) -> Vec<Cell> {
        self.end_column();
        if let (Some(p), Some(at)) = (self.projection, self.family_at) {
            self.cells
                .splice(at..at, self.marks.iter().map(|ts| p.marker(*ts)));
        }
        self.cells
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schema() -> Schema {
        Schema::dmp_default()
    }

    /// Families that keep every version, forever.
    fn keep_all() -> Schema {
        let f = dmp_core::config::FamilyConfig {
            ttl_days: 0,
            max_versions: 100_000,
        };
        Schema::new(["e", "m", "s"].map(|n| (n.to_string(), f)).into())
    }

    proptest! {
        #[test]
        fn given_any_row_when_decoded_with_a_projection_then_it_is_the_projection_of_the_whole_row(
            cells in proptest::collection::vec(
                (prop_oneof![Just("e"), Just("m"), Just("s")],
                 prop_oneof![Just("url"), Just("q"), Just("ua"), Just("ip"), Just("a.x"), Just("a.y"), Just("type")],
                 0i64..40,
                 proptest::collection::vec(any::<u8>(), 0..6)),
                0..60),
            keep in proptest::collection::vec(prop_oneof![Just("url"), Just("q"), Just("type"), Just("zz")], 0..3),
            prefixes in proptest::collection::vec(prop_oneof![Just("a."), Just("u")], 0..2),
        ) {
            let mut row = dmp_core::Row {
                key: "u".into(),
                cells: cells.into_iter().map(|(f, q, ts, v)| Cell::new(f, q, ts, v)).collect(),
            };
            row.sort();
            row.cells.dedup_by(|a, b| a.coordinates() == b.coordinates());
            let p = Projection::new("e", keep.iter().copied(), prefixes.iter().copied());
            let packed = Bytes::from(codec::encode(&row.cells));
            let s = keep_all();
            prop_assert_eq!(read(Some(&packed), &[], &s, 0, Some(&p), false).unwrap().cells, p.apply(row.cells.clone()));
            prop_assert_eq!(read(Some(&packed), &[], &s, 0, None, false).unwrap().cells, row.cells.clone());
            // The same cells as a base and a write: the merge path projects the same way.
            let (a, b) = row.cells.split_at(row.cells.len() / 2);
            let (a, b) = (Bytes::from(codec::encode(a)), Bytes::from(codec::encode(b)));
            let m = read(Some(&a), &[&b], &s, 0, Some(&p), true).unwrap();
            prop_assert_eq!(m.cells, p.apply(row.cells.clone()));
            prop_assert_eq!(m.packed, Some(codec::encode(&row.cells)));
            // Writes alone, unpacked (the projected fast path), as the general path reads them.
            let general = read(None, &[&a, &b], &s, 0, Some(&p), true).unwrap();
            let fast = read(None, &[&a, &b], &s, 0, Some(&p), false).unwrap();
            prop_assert_eq!(&fast.cells, &general.cells);
            prop_assert_eq!(fast.cells, p.apply(row.cells.clone()));
        }
    }

    /// Cells of a few families, qualifiers and versions, so that writes often meet the base's
    /// coordinates and each other's.
    fn cells_strategy(max: usize) -> impl Strategy<Value = Vec<Cell>> {
        proptest::collection::vec(
            (
                prop_oneof![Just("e"), Just("m"), Just("s")],
                prop_oneof![
                    Just("url"),
                    Just("q"),
                    Just("ua"),
                    Just("a.x"),
                    Just("type")
                ],
                0i64..12,
                proptest::collection::vec(any::<u8>(), 0..4),
            ),
            0..max,
        )
        .prop_map(|cells| {
            cells
                .into_iter()
                .map(|(f, q, ts, v)| Cell::new(f, q, ts, v))
                .collect()
        })
    }

    /// The model of a merge: cells by coordinates, each applied in order (a later cell wins,
    /// within one write too), in HBase order.
    fn latest_wins(cells: impl IntoIterator<Item = Cell>) -> Vec<Cell> {
        let mut model: std::collections::BTreeMap<(String, String, std::cmp::Reverse<i64>), Cell> =
            Default::default();
        for c in cells {
            let key = (
                c.family.to_string(),
                c.qualifier.to_string(),
                std::cmp::Reverse(c.ts),
            );
            model.insert(key, c);
        }
        model.into_values().collect()
    }

    proptest! {
        /// Writes read alone with a projection and no packing take the projected fast path: it
        /// gives what the general path gives, whatever the writes share, under either schema.
        #[test]
        fn given_writes_alone_when_read_projected_then_the_fast_path_agrees_with_the_general_one(
            writes in proptest::collection::vec(cells_strategy(12), 1..4),
            keep in proptest::collection::vec(prop_oneof![Just("url"), Just("q"), Just("type")], 0..3),
            now in prop_oneof![Just(0i64), Just(10 * 86_400_000)],
        ) {
            let packed: Vec<Bytes> = writes.iter().map(|w| Bytes::from(codec::encode(w))).collect();
            let refs: Vec<&Bytes> = packed.iter().collect();
            let p = Projection::new("e", keep.iter().copied(), ["a."]);
            let short_ttl = {
                let mut f = Schema::dmp_default().families().map(|(n, c)| (n.clone(), *c)).collect::<std::collections::BTreeMap<_, _>>();
                f.get_mut("e").unwrap().ttl_days = 1;
                Schema::new(f)
            };
            for s in [keep_all(), Schema::dmp_default(), short_ttl] {
                let general = read(None, &refs, &s, now, Some(&p), true).unwrap();
                let fast = read(None, &refs, &s, now, Some(&p), false).unwrap();
                prop_assert_eq!(fast.cells, general.cells);
            }
        }
    }

    proptest! {
        #[test]
        fn given_a_base_and_overlapping_writes_when_merged_then_the_latest_write_of_each_coordinate_wins(
            base in cells_strategy(40),
            writes in proptest::collection::vec(cells_strategy(12), 1..4),
            keep in proptest::collection::vec(prop_oneof![Just("url"), Just("q"), Just("zz")], 0..3),
        ) {
            let mut base_row = dmp_core::Row { key: "u".into(), cells: base };
            base_row.sort();
            base_row.cells.dedup_by(|a, b| a.coordinates() == b.coordinates());
            let expected = latest_wins(base_row.cells.iter().chain(writes.iter().flatten()).cloned());
            let base = Bytes::from(codec::encode(&base_row.cells));
            let writes: Vec<Bytes> = writes.iter().map(|w| Bytes::from(codec::encode(w))).collect();
            let writes: Vec<&Bytes> = writes.iter().collect();
            let s = keep_all();
            let m = read(Some(&base), &writes, &s, 0, None, true).unwrap();
            prop_assert_eq!(m.packed, Some(codec::encode(&expected)));
            prop_assert_eq!(m.cells, expected.clone());
            let p = Projection::new("e", keep.iter().copied(), ["a."]);
            let m = read(Some(&base), &writes, &s, 0, Some(&p), false).unwrap();
            prop_assert_eq!(m.cells, p.apply(expected.clone()));
            // With no base, the writes alone.
            let m = read(None, &writes, &s, 0, None, true).unwrap();
            let alone = latest_wins(writes.iter().flat_map(|w| {
                let mut v = Vec::new();
                codec::decode(w, |c| v.push(c)).unwrap();
                v
            }));
            prop_assert_eq!(m.cells, alone);
        }
    }

    #[test]
    fn given_expired_cells_when_read_then_they_are_left_out() {
        let now = 1_800_000_000_000;
        let s = schema();
        let fresh = Cell::new("e", "url", now - 1, b"a".to_vec());
        let old = Cell::new("e", "url", 1, b"b".to_vec());
        let base = Bytes::from(codec::encode(&[fresh.clone(), old]));
        let m = read(Some(&base), &[], &s, now, None, true).unwrap();
        assert_eq!((m.packed, m.cells), (None, vec![fresh.clone()]));
        let bot = Cell::new("m", "bot", now, b"1".to_vec());
        let write = Bytes::from(codec::encode(std::slice::from_ref(&bot)));
        let m = read(Some(&base), &[&write], &s, now, None, true).unwrap();
        assert_eq!(m.packed, Some(codec::encode(&[fresh.clone(), bot.clone()])));
        assert_eq!(m.cells, vec![fresh, bot]);
    }

    #[test]
    fn given_cells_put_together_when_limited_then_what_a_read_of_them_keeps() {
        let now = 1_800_000_000_000;
        let s = schema();
        let cells = vec![
            Cell::new("e", "url", now - 1, b"a".to_vec()),
            Cell::new("e", "url", 1, b"b".to_vec()), // past the TTL
            Cell::new("m", "written", now, b"w2".to_vec()),
            Cell::new("m", "written", now - 5, b"w1".to_vec()), // one version kept
            Cell::new("x", "gone", now, b"?".to_vec()),         // no such family
        ];
        let mut limited = cells.clone();
        s.limit(&mut limited, now);
        let read_back = read(
            Some(&Bytes::from(codec::encode(&cells))),
            &[],
            &s,
            now,
            None,
            false,
        )
        .unwrap()
        .cells;
        assert_eq!(limited, read_back);
        assert_eq!(limited, vec![cells[0].clone(), cells[2].clone()]);
    }
}

/// The read a segmenter makes, repeated for an instruction count: under valgrind,
/// `MERGE_N=1000` and `MERGE_N=3000` runs of
/// `cargo test --release -p dmp-store --lib merge::cost -- --ignored` differ by 2000 reads (see
/// docs/benchmarks.md). Instruction counts do not move with the machine's noise as times do.
#[cfg(test)]
mod cost {
    use super::*;

    /// A user's row of `events` events of 9 cells each (the storage writer's), and the
    /// segmenter's cells in `m` and `s`, in HBase order.
    fn row(events: i64, t0: i64) -> Vec<Cell> {
        let mut cells = Vec::new();
        for e in 0..events {
            let ts = t0 + e * 1000;
            for (q, v) in [
                ("ip", &b"\x0a\x00\x00\x01"[..]),
                ("ref", b"https://ya.ru/search?q=x"),
                ("src", b"web"),
                ("type", b"pageview"),
                ("ua", b"\x01\x02\x03\x04\x05\x06\x07\x08"),
                ("ua.browser", b"Chrome"),
                ("ua.device", b"desktop"),
                ("ua.os", b"Windows"),
                ("url", b"https://cats.example/p/123"),
            ] {
                cells.push(Cell::new("e", q, ts, v.to_vec()));
            }
        }
        cells.push(Cell::new("m", "first_seen", t0, t0.to_be_bytes().to_vec()));
        cells.push(Cell::new("m", "written", t0, t0.to_be_bytes().to_vec()));
        cells.push(Cell::new(
            "s",
            "current",
            t0,
            b"{\"cat_lovers\":1}".to_vec(),
        ));
        cells.push(Cell::new("s", "evaluated", t0, EVALUATED.to_vec()));
        let mut r = dmp_core::Row {
            key: "u".into(),
            cells,
        };
        r.sort();
        r.cells
    }

    const EVALUATED: &[u8] = b"{\"at\":1,\"last_event_ts\":2,\"rules_version\":\"demo-1\"}";

    /// 15 events cached, then the writer's next event and the segmenter's last write, read
    /// with the demo rules' projection.
    #[test]
    #[ignore = "an instruction count under valgrind, see the module doc"]
    fn given_a_cached_row_and_two_writes_when_read_then_the_merge_each_time() {
        let t0 = 1_800_000_000_000;
        let s = Schema::dmp_default();
        let p = Projection::new("e", ["q", "type", "url"], ["a."]);
        let cells = row(15, t0);
        let base = Bytes::from(codec::encode(&cells));
        let mut event = row(1, t0 + 20_000);
        event.retain(|c| c.family == "e");
        event.push(Cell::new(
            "m",
            "written",
            t0 + 20_001,
            t0.to_be_bytes().to_vec(),
        ));
        let evaluated = [Cell::new("s", "evaluated", t0 + 19_000, EVALUATED.to_vec())];
        let (w1, w2) = (
            Bytes::from(codec::encode(&evaluated)),
            Bytes::from(codec::encode(&event)),
        );
        let mut all = dmp_core::Row {
            key: "u".into(),
            cells: [cells, event, evaluated.to_vec()].concat(),
        };
        all.sort();
        // Families `m` and `s` keep one version.
        all.cells
            .dedup_by(|later, newer| later.family != "e" && later.qualifier == newer.qualifier);
        let expected = p.apply(all.cells);
        let n: usize = std::env::var("MERGE_N").map_or(1000, |v| v.parse().expect("a number"));
        for _ in 0..n {
            let m = read(Some(&base), &[&w1, &w2], &s, t0 + 100_000, Some(&p), true).unwrap();
            assert_eq!(m.cells.len(), expected.len());
            std::hint::black_box(m);
        }
        let m = read(Some(&base), &[&w1, &w2], &s, t0 + 100_000, Some(&p), true).unwrap();
        assert_eq!(m.cells, expected);
    }
}
