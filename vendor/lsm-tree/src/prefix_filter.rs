// dmp patch (see DMP-PATCH.md, change 3): row prefixes in the tables' Bloom filters.

//! A key's *prefix* is its bytes up to and including its first `0x00` byte (keys without one
//! have none). Tables register each distinct prefix's hash in their Bloom filter beside the
//! keys' hashes and say so in their metadata (`dmp#prefix_filter`), so a prefix scan whose
//! prefix contains a `0x00` byte (every key it can find has the same prefix) skips the tables
//! whose filter does not hold that prefix. Tables written without it (older files, partitioned
//! filters) are never skipped.

/// The byte that ends a key's prefix.
pub const SEPARATOR: u8 = 0;

/// The table metadata property that marks a table whose filter holds its keys' prefixes.
pub const META_KEY: &str = "dmp#prefix_filter";

/// The prefix of `key`: its bytes up to and including the first [`SEPARATOR`].
#[must_use]
pub fn extract(key: &[u8]) -> Option<&[u8]> {
    key.iter()
        .position(|b| *b == SEPARATOR)
        .and_then(|i| key.get(..=i))
}

/// The filter hash a prefix scan of `prefix` may skip tables by: that of the prefix every key
/// the scan can find shares, when `prefix` contains a [`SEPARATOR`].
#[must_use]
pub fn scan_hash(prefix: &[u8]) -> Option<u64> {
    extract(prefix).map(crate::table::filter::standard_bloom::Builder::get_hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PinningPolicy;
    use crate::SeqNo;
    use crate::{AbstractTree, AnyTree, Config, Guard, SequenceNumberCounter};
    use std::collections::BTreeMap;
    use test_log::test;

    const ROWS: usize = 40;

    fn key(row: usize, part: u32) -> Vec<u8> {
        let mut k = format!("row-{row}").into_bytes();
        k.push(SEPARATOR);
        k.extend_from_slice(&part.to_be_bytes());
        k
    }

    fn prefix(row: usize) -> Vec<u8> {
        let mut k = format!("row-{row}").into_bytes();
        k.push(SEPARATOR);
        k
    }

    /// Writes each row's parts into tables of four rows each (a row in two tables: rows of
    /// table t are 4t..4t+4 and 4t+2..4t+6), a later table overwriting one part of its rows and
    /// removing another; returns what a scan of each row must find.
    fn fill(tree: &AnyTree) -> crate::Result<BTreeMap<usize, Vec<(Vec<u8>, Vec<u8>)>>> {
        let mut truth: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut seqno = 0;
        for t in 0..(ROWS / 4) {
            for row in (4 * t..4 * t + 6).filter(|r| *r < ROWS) {
                for part in 0..3u32 {
                    let value = format!("t{t}-{row}-{part}").into_bytes();
                    tree.insert(key(row, part), value.clone(), seqno);
                    truth.insert(key(row, part), value);
                    seqno += 1;
                }
                if t > 0 && row < 4 * t + 2 {
                    tree.remove(key(row, 1), seqno);
                    truth.remove(&key(row, 1));
                    seqno += 1;
                }
            }
            tree.flush_active_memtable(0)?;
        }
        let mut rows: BTreeMap<usize, Vec<(Vec<u8>, Vec<u8>)>> = BTreeMap::new();
        for row in 0..ROWS {
            let p = prefix(row);
            rows.insert(
                row,
                truth
                    .iter()
                    .filter(|(k, _)| k.starts_with(&p))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
        }
        Ok(rows)
    }

    fn scan(tree: &AnyTree, row: usize) -> crate::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        tree.prefix(prefix(row), SeqNo::MAX, None)
            .map(|g| {
                let (k, v) = g.into_inner()?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn open(dir: &std::path::Path, pin: bool, partitioned: bool) -> crate::Result<AnyTree> {
        Config::new(
            dir,
            SequenceNumberCounter::default(),
            SequenceNumberCounter::default(),
        )
        .filter_block_pinning_policy(PinningPolicy::all(pin))
        .filter_block_partitioning_policy(PinningPolicy::all(partitioned))
        .open()
    }

    /// How many tables a scan of each row reads, and how many hold it; checks that a scan
    /// skips the others its key range would have it read.
    fn tables_read(tree: &AnyTree, row: usize) -> (usize, usize) {
        let hash = scan_hash(&prefix(row)).expect("a prefix with a separator");
        let p = prefix(row);
        let range = crate::range::prefix_to_range(&p);
        let bounds = (
            range.0.as_ref().map(|k| &**k),
            range.1.as_ref().map(|k| &**k),
        );
        let version = tree.current_version();
        let skippable = version
            .iter_tables()
            .filter(|t| t.check_key_range_overlap(&bounds) && !t.may_contain_prefix(hash))
            .count();
        crate::range::TABLES_SKIPPED.with(|n| n.set(0));
        drop(tree.prefix(&p, SeqNo::MAX, None));
        let skipped = crate::range::TABLES_SKIPPED.with(std::cell::Cell::get);
        assert_eq!(skippable, skipped, "tables the scan of row {row} skipped");
        let (mut read, mut holding) = (0, 0);
        for table in version.iter_tables() {
            let holds = table
                .iter()
                .filter_map(Result::ok)
                .any(|kv| kv.key.user_key.starts_with(&p));
            let may = table.may_contain_prefix(hash);
            assert!(
                may || !holds,
                "table {} holds row {row} but says not",
                table.id()
            );
            read += usize::from(may);
            holding += usize::from(holds);
        }
        (read, holding)
    }

    #[test]
    fn scans_skip_tables_without_the_prefix_and_find_every_part() -> crate::Result<()> {
        for pin in [true, false] {
            let dir = tempfile::tempdir()?;
            let tree = open(dir.path(), pin, false)?;
            let truth = fill(&tree)?;
            assert_eq!(ROWS / 4, tree.table_count());
            for table in tree.current_version().iter_tables() {
                assert!(
                    table.metadata.prefix_filter,
                    "table {} unmarked",
                    table.id()
                );
            }
            let (mut read, mut holding) = (0, 0);
            for (row, parts) in &truth {
                assert_eq!(
                    parts,
                    &scan(&tree, *row)?,
                    "row {row}, pinned filters {pin}"
                );
                let (r, h) = tables_read(&tree, *row);
                read += r;
                holding += h;
            }
            // Each row is in one or two of the ten tables; the filters let through at most a
            // tenth of the others (false positives), where scans without them read all ten.
            let others = ROWS * ROWS / 4 - holding;
            assert!(
                read <= holding + others / 10,
                "{read} tables read for {holding} holding"
            );

            // Compacted into fewer, larger tables: still marked, still right.
            tree.major_compact(u64::MAX, 0)?;
            for table in tree.current_version().iter_tables() {
                assert!(table.metadata.prefix_filter);
            }
            for (row, parts) in &truth {
                assert_eq!(parts, &scan(&tree, *row)?, "row {row} after compaction");
                tables_read(&tree, *row);
            }
        }
        Ok(())
    }

    #[test]
    fn tables_whose_filter_lacks_prefixes_are_always_read() -> crate::Result<()> {
        let dir = tempfile::tempdir()?;
        let tree = open(dir.path(), true, true)?;
        let truth = fill(&tree)?;
        for table in tree.current_version().iter_tables() {
            assert!(!table.metadata.prefix_filter);
        }
        for (row, parts) in &truth {
            assert_eq!(parts, &scan(&tree, *row)?);
            assert_eq!(ROWS / 4, tables_read(&tree, *row).0);
        }
        Ok(())
    }

    #[test]
    fn extract_ends_at_the_first_separator() {
        assert_eq!(Some(&b"uid\0"[..]), extract(b"uid\0\x01seq"));
        assert_eq!(Some(&b"\0"[..]), extract(b"\0\0"));
        assert_eq!(None, extract(b"uid"));
        assert_eq!(None, extract(b""));
    }

    #[test]
    fn a_scan_of_a_longer_prefix_checks_the_shorter() {
        assert_eq!(scan_hash(b"uid\0"), scan_hash(b"uid\0\x01"));
        assert_ne!(scan_hash(b"uid\0"), scan_hash(b"uie\0"));
        assert_eq!(None, scan_hash(b"uid"));
    }
}
