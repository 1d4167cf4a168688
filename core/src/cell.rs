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
            .filter(move |c| c.family == family && c.qualifier == qualifier)
    }

    /// The newest cell of one family and qualifier.
    pub fn latest(&self, family: &str, qualifier: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.family == family && c.qualifier == qualifier)
    }

    /// Sorts cells into HBase order (family, qualifier ascending; version descending).
    pub fn sort(&mut self) {
        self.cells.sort_by(|a, b| {
            (
                a.family.as_str(),
                a.qualifier.as_str(),
                std::cmp::Reverse(a.ts),
            )
                .cmp(&(
                    b.family.as_str(),
                    b.qualifier.as_str(),
                    std::cmp::Reverse(b.ts),
                ))
        });
    }
}
