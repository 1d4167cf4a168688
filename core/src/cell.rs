//! Cells and rows of the HBase model: row key = uid; a cell is (family, qualifier, version) ->
//! value, where the version is the event time in milliseconds.
//!
//! Families used by dmp: [`FAMILY_EVENTS`] (`e`, event attributes), [`FAMILY_SEGMENTS`] (`s`,
//! current memberships with `since`) and [`FAMILY_META`] (`m`, first seen, bot flag).

use bytes::Bytes;
use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Family `e`: event attributes (`url`, `ref`, `q`, `ip`, `ua`, `geo`, `src`, `type`, `a.<name>`).
pub const FAMILY_EVENTS: &str = "e";
/// Family `s`: current segment memberships.
pub const FAMILY_SEGMENTS: &str = "s";
/// Family `m`: meta (first seen, bot flag).
pub const FAMILY_META: &str = "m";
/// Qualifier prefix of custom attributes in family `e` (`a.<name>`).
pub const ATTR_PREFIX: &str = "a.";

/// One versioned cell.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cell {
    /// Column family (inline up to 24 bytes: no allocation for dmp's names).
    pub family: CompactString,
    /// Qualifier within the family (inline up to 24 bytes).
    pub qualifier: CompactString,
    /// Version: event time in epoch milliseconds.
    pub ts: i64,
    /// The value (shares the buffer it was read from: no copy per cell).
    pub value: Bytes,
}

impl Cell {
    /// A cell from its parts.
    pub fn new(
        family: impl Into<CompactString>,
        qualifier: impl Into<CompactString>,
        ts: i64,
        value: impl Into<Bytes>,
    ) -> Cell {
        Cell {
            family: family.into(),
            qualifier: qualifier.into(),
            ts,
            value: value.into(),
        }
    }

    /// The order of two cells in a row, HBase's: family, qualifier ascending, version descending
    /// (equal for the same coordinates).
    pub fn cmp_hbase(&self, other: &Cell) -> std::cmp::Ordering {
        cmp_name(self.family.as_bytes(), other.family.as_bytes())
            .then_with(|| cmp_name(self.qualifier.as_bytes(), other.qualifier.as_bytes()))
            .then_with(|| other.ts.cmp(&self.ts))
    }

    /// The coordinates that identify a cell: writing the same coordinates twice replaces the value.
    pub fn coordinates(&self) -> (&str, &str, i64) {
        (&self.family, &self.qualifier, self.ts)
    }
}

/// A row as read: its key and its cells ordered by family, qualifier, then newest version first
/// (HBase's order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The row key (the uid).
    pub key: String,
    /// Cells in HBase order.
    pub cells: Vec<Cell>,
}

impl Row {
    /// Cells of one family and qualifier, newest first.
    pub fn versions<'a>(
        &'a self,
        family: &'a str,
        qualifier: &'a str,
    ) -> impl Iterator<Item = &'a Cell> + 'a {
        self.cells
            .iter()
            .filter(move |c| same(&c.family, family) && same(&c.qualifier, qualifier))
    }

    /// The newest cell of one family and qualifier.
    pub fn latest(&self, family: &str, qualifier: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| same(&c.family, family) && same(&c.qualifier, qualifier))
    }

    /// [`Row::latest`] by binary search, for a row in HBase order (as every read of the store
    /// returns it): what the segmenter asks of each user's row several times per evaluation,
    /// often for a column the row lacks, which a scan would find only at the end.
    pub fn latest_in_order(&self, family: &str, qualifier: &str) -> Option<&Cell> {
        debug_assert!(
            self.cells.is_sorted_by(|a, b| a.cmp_hbase(b).is_le()),
            "row {:?} not in HBase order",
            self.key
        );
        let (f, q) = (family.as_bytes(), qualifier.as_bytes());
        let first = self.cells.partition_point(|c| {
            cmp_name(c.family.as_bytes(), f)
                .then_with(|| cmp_name(c.qualifier.as_bytes(), q))
                .is_lt()
        });
        self.cells
            .get(first)
            .filter(|c| same(&c.family, family) && same(&c.qualifier, qualifier))
    }

    /// Sorts cells into HBase order (family, qualifier ascending; version descending).
    pub fn sort(&mut self) {
        self.cells.sort_by(Cell::cmp_hbase);
    }
}
/// Leaves out the cells of one family whose qualifier a reader does not use, and keeps *when*
/// they happened: each version at which any cell was left out comes back once as a key-only
/// cell of that family with an empty qualifier (a marker), before the family's other cells
/// (HBase order). For readers that group a family's cells by version and read only some
/// qualifiers: the segmenter's rules group family `e` into events by time and read a few of its
/// columns, and an event with none of them still counts as an event.
///
/// TTL and versions apply first, to every cell, so the markers are exactly the versions the
/// left-out columns hold in a full read. Rows that store cells under an empty qualifier in the
/// projected family should not be read with a projection. [`Projection::apply`] is the
/// definition, in memory; the embedded store applies it while decoding (`Get::projection`), so
/// left-out cells are never built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// The projected family.
    pub family: String,
    /// Qualifiers kept.
    pub qualifiers: Vec<String>,
    /// Qualifier prefixes kept (`a.` keeps every custom attribute).
    pub prefixes: Vec<String>,
}

impl Projection {
    /// A projection of `family` keeping `qualifiers` and every qualifier starting with one of
    /// `prefixes`.
    pub fn new<'a>(
        family: &str,
        qualifiers: impl IntoIterator<Item = &'a str>,
        prefixes: impl IntoIterator<Item = &'a str>,
    ) -> Projection {
        Projection {
            family: family.into(),
            qualifiers: qualifiers.into_iter().map(Into::into).collect(),
            prefixes: prefixes.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether cells of `qualifier` (in the projected family) are kept.
    pub fn keeps(&self, qualifier: &[u8]) -> bool {
        self.qualifiers
            .iter()
            .any(|q| same_bytes(q.as_bytes(), qualifier))
            || self
                .prefixes
                .iter()
                .any(|p| qualifier.starts_with(p.as_bytes()))
    }

    /// The marker of version `ts`.
    pub fn marker(&self, ts: i64) -> Cell {
        Cell::new(self.family.as_str(), "", ts, Bytes::new())
    }

    /// The projection of `cells` (in HBase order): the definition, for backends with no native
    /// projection and for tests.
    pub fn apply(&self, cells: Vec<Cell>) -> Vec<Cell> {
        let mut out = Vec::with_capacity(cells.len());
        let mut marks = Vec::new();
        let mut family_at = None;
        for c in cells {
            if c.family == self.family {
                family_at.get_or_insert(out.len());
                if !self.keeps(c.qualifier.as_bytes()) {
                    marks.push(c.ts);
                    continue;
                }
            }
            out.push(c);
        }
        marks.sort_unstable_by(|a, b| b.cmp(a));
        marks.dedup();
        if let Some(at) = family_at {
            out.splice(at..at, marks.into_iter().map(|ts| self.marker(ts)));
        }
        out
    }
}

/// Equality of the short strings cells are made of (families, qualifiers, most values): lengths
/// first, then one or two word compares, instead of a call into `memcmp`. Merges and rule
/// evaluation compare them for every cell.
#[inline]
pub fn same(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

/// [`same`] for bytes.
#[inline]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let w8 = |s: &[u8], i: usize| u64::from_ne_bytes(s[i..i + 8].try_into().expect("8 bytes"));
    let w4 = |s: &[u8], i: usize| u32::from_ne_bytes(s[i..i + 4].try_into().expect("4 bytes"));
    match n {
        0 => true,
        // Every index of 1 to 3 bytes, with no call to `memcmp` (names are often this short).
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

/// Byte order of two names, compared in place when short (families and qualifiers are a few
/// bytes: a call to `memcmp` for each costs more than the compare), as `<[u8]>::cmp` does.
#[inline]
pub fn cmp_name(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let n = a.len().min(b.len());
    if n > 16 {
        return a.cmp(b);
    }
    for i in 0..n {
        if a[i] != b[i] {
            return a[i].cmp(&b[i]);
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn given_a_row_in_order_when_a_column_is_looked_up_then_the_search_finds_what_the_scan_does(
            cells in proptest::collection::vec(("[ems]{1,2}", "[a-c]{0,3}", -3i64..3), 0..30),
            family in "[ems]{1,2}",
            qualifier in "[a-c]{0,3}",
        ) {
            let mut row = super::Row {
                key: "u".into(),
                cells: cells.into_iter().map(|(f, q, ts)| super::Cell::new(f, q, ts, Vec::new())).collect(),
            };
            row.sort();
            prop_assert_eq!(row.latest_in_order(&family, &qualifier), row.latest(&family, &qualifier));
            for c in &row.cells {
                prop_assert_eq!(row.latest_in_order(&c.family, &c.qualifier), row.latest(&c.family, &c.qualifier));
            }
        }
    }

    #[test]
    fn short_string_equality_agrees_with_eq() {
        let words = [
            "",
            "a",
            "ab",
            "abc",
            "abcd",
            "abce",
            "abcde",
            "search",
            "searcH",
            "pageview",
            "purchase",
            "smartphone",
            "smartphonf",
            "Novosibirsk",
            "site1.example",
            "site1.examplf",
            "0123456789abcdef",
            "0123456789abcdeF",
            "0123456789abcdefg",
            "0123456789abcdefh",
            "Новосибирск",
        ];
        for a in words {
            for b in words {
                assert_eq!(super::same(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn given_any_names_when_compared_then_byte_order(
            a in proptest::collection::vec(any::<u8>(), 0..24),
            b in proptest::collection::vec(any::<u8>(), 0..24),
            shared in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            prop_assert_eq!(super::cmp_name(&a, &b), a.cmp(&b));
            // Names that share a prefix differ late, or only in length.
            let (x, y) = ([&shared[..], &a].concat(), [&shared[..], &b].concat());
            prop_assert_eq!(super::cmp_name(&x, &y), x.cmp(&y));
            prop_assert_eq!(super::cmp_name(&x, &shared), x.cmp(&shared));
        }
    }
}
