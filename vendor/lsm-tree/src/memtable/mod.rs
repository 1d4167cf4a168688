// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use crate::key::InternalKey;
use crate::{
    value::{InternalValue, SeqNo, UserValue},
    ValueType,
};
use crossbeam_skiplist::SkipMap;
use std::cmp::Ordering;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, AtomicU64};

/// A memtable key: an [`InternalKey`] with the first 16 bytes of its user key held inline
/// (dmp patch, see `DMP-PATCH.md`).
///
/// The skiplist compares a key with one node per level. An [`InternalKey`]'s user key lives on
/// the heap, so each comparison loads another cache line besides the node's; the head, in the
/// node, decides every comparison of keys that differ in their first 16 bytes without it.
/// Heads are big-endian and zero-padded, so when two heads differ their order is the user
/// keys' order; equal heads fall back to the whole key.
#[derive(Clone)]
pub struct MemtableKey {
    head: [u64; 2],
    key: InternalKey,
}

impl MemtableKey {
    fn new(key: InternalKey) -> Self {
        let mut bytes = [0u8; 16];
        let n = key.user_key.len().min(16);
        bytes[..n].copy_from_slice(&key.user_key[..n]);
        let (a, b) = bytes.split_at(8);
        #[expect(clippy::expect_used, reason = "two halves of 8 bytes")]
        let head = [
            u64::from_be_bytes(a.try_into().expect("8 bytes")),
            u64::from_be_bytes(b.try_into().expect("8 bytes")),
        ];
        Self { head, key }
    }

    /// The key.
    pub fn key(&self) -> &InternalKey {
        &self.key
    }
}

impl PartialEq for MemtableKey {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.key == other.key
    }
}

impl Eq for MemtableKey {}

impl PartialOrd for MemtableKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MemtableKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.head
            .cmp(&other.head)
            .then_with(|| self.key.cmp(&other.key))
    }
}

fn bound(b: Bound<&InternalKey>) -> Bound<MemtableKey> {
    match b {
        Bound::Included(k) => Bound::Included(MemtableKey::new(k.clone())),
        Bound::Excluded(k) => Bound::Excluded(MemtableKey::new(k.clone())),
        Bound::Unbounded => Bound::Unbounded,
    }
}

pub use crate::tree::inner::MemtableId;

/// The memtable serves as an intermediary, ephemeral, sorted storage for new items
///
/// When the Memtable exceeds some size, it should be flushed to a table.
pub struct Memtable {
    #[doc(hidden)]
    pub id: MemtableId,

    /// The actual content, stored in a lock-free skiplist.
    #[doc(hidden)]
    pub items: SkipMap<MemtableKey, UserValue>,

    /// Approximate active memtable size.
    ///
    /// If this grows too large, a flush is triggered.
    pub(crate) approximate_size: AtomicU64,

    /// Highest encountered sequence number.
    ///
    /// This is used so that `get_highest_seqno` has O(1) complexity.
    pub(crate) highest_seqno: AtomicU64,

    pub(crate) requested_rotation: AtomicBool,
}

impl Memtable {
    /// Returns the memtable ID.
    pub fn id(&self) -> MemtableId {
        self.id
    }

    /// Returns `true` if the memtable was already flagged for rotation.
    pub fn is_flagged_for_rotation(&self) -> bool {
        self.requested_rotation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flags the memtable as requested for rotation.
    pub fn flag_rotated(&self) {
        self.requested_rotation
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    #[doc(hidden)]
    #[must_use]
    pub fn new(id: MemtableId) -> Self {
        Self {
            id,
            items: SkipMap::default(),
            approximate_size: AtomicU64::default(),
            highest_seqno: AtomicU64::default(),
            requested_rotation: AtomicBool::default(),
        }
    }

    /// Creates an iterator over all items.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = InternalValue> + '_ {
        self.items.iter().map(|entry| InternalValue {
            key: entry.key().key.clone(),
            value: entry.value().clone(),
        })
    }

    /// Creates an iterator over a range of items.
    pub(crate) fn range<'a, R: RangeBounds<InternalKey> + 'a>(
        &'a self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = InternalValue> + 'a {
        let range = (bound(range.start_bound()), bound(range.end_bound()));
        self.items.range(range).map(|entry| InternalValue {
            key: entry.key().key.clone(),
            value: entry.value().clone(),
        })
    }

    /// Returns the item by key if it exists.
    ///
    /// The item with the highest seqno will be returned, if `seqno` is None.
    #[doc(hidden)]
    pub fn get(&self, key: &[u8], seqno: SeqNo) -> Option<InternalValue> {
        if seqno == 0 {
            return None;
        }

        // NOTE: This range start deserves some explanation...
        // InternalKeys are multi-sorted by 2 categories: user_key and Reverse(seqno). (tombstone doesn't really matter)
        // We search for the lowest entry that is greater or equal the user's prefix key
        // and has the seqno (or lower) we want (because the seqno is stored in reverse order)
        //
        // Example: We search for "abc"
        //
        // key -> seqno
        //
        // a   -> 7
        // abc -> 5 <<< This is the lowest key (highest seqno) that matches the key with seqno=None
        // abc -> 4
        // abc -> 3 <<< If searching for abc and seqno=4, we would get this
        // abcdef -> 6
        // abcdef -> 5
        //
        let lower_bound = MemtableKey::new(InternalKey::new(key, seqno - 1, ValueType::Value));

        let mut iter = self
            .items
            .range(lower_bound..)
            .take_while(|entry| &*entry.key().key.user_key == key);

        iter.next().map(|entry| InternalValue {
            key: entry.key().key.clone(),
            value: entry.value().clone(),
        })
    }

    /// Gets approximate size of memtable in bytes.
    pub fn size(&self) -> u64 {
        self.approximate_size
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts the number of items in the memtable.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Returns `true` if the memtable is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Inserts an item into the memtable
    #[doc(hidden)]
    pub fn insert(&self, item: InternalValue) -> (u64, u64) {
        #[expect(
            clippy::expect_used,
            reason = "keys are limited to 16-bit length + values are limited to 32-bit length"
        )]
        let item_size = (item.key.user_key.len()
            + item.value.len()
            + std::mem::size_of::<InternalValue>()
            + std::mem::size_of::<[u64; 2]>())
        .try_into()
        .expect("should fit into u64");

        let size_before = self
            .approximate_size
            .fetch_add(item_size, std::sync::atomic::Ordering::AcqRel);

        let key = InternalKey::new(item.key.user_key, item.key.seqno, item.key.value_type);
        self.items.insert(MemtableKey::new(key), item.value);

        self.highest_seqno
            .fetch_max(item.key.seqno, std::sync::atomic::Ordering::AcqRel);

        (item_size, size_before + item_size)
    }

    /// Returns the highest sequence number in the memtable.
    pub fn get_highest_seqno(&self) -> Option<SeqNo> {
        if self.is_empty() {
            None
        } else {
            Some(
                self.highest_seqno
                    .load(std::sync::atomic::Ordering::Acquire),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ValueType;
    use test_log::test;

    #[test]
    #[expect(clippy::unwrap_used)]
    fn memtable_mvcc_point_read() {
        let memtable = Memtable::new(0);

        memtable.insert(InternalValue::from_components(
            *b"hello-key-999991",
            *b"hello-value-999991",
            0,
            ValueType::Value,
        ));

        let item = memtable.get(b"hello-key-99999", SeqNo::MAX);
        assert_eq!(None, item);

        let item = memtable.get(b"hello-key-999991", SeqNo::MAX);
        assert_eq!(*b"hello-value-999991", &*item.unwrap().value);

        memtable.insert(InternalValue::from_components(
            *b"hello-key-999991",
            *b"hello-value-999991-2",
            1,
            ValueType::Value,
        ));

        let item = memtable.get(b"hello-key-99999", SeqNo::MAX);
        assert_eq!(None, item);

        let item = memtable.get(b"hello-key-999991", SeqNo::MAX);
        assert_eq!((*b"hello-value-999991-2"), &*item.unwrap().value);

        let item = memtable.get(b"hello-key-99999", 1);
        assert_eq!(None, item);

        let item = memtable.get(b"hello-key-999991", 1);
        assert_eq!((*b"hello-value-999991"), &*item.unwrap().value);

        let item = memtable.get(b"hello-key-99999", 2);
        assert_eq!(None, item);

        let item = memtable.get(b"hello-key-999991", 2);
        assert_eq!((*b"hello-value-999991-2"), &*item.unwrap().value);
    }

    /// Keys that share prefixes of every length around the head's 16 bytes, with zero bytes (the
    /// heads' padding) and 0xFF bytes in them.
    fn tricky_keys(rng: &mut impl rand::Rng, n: usize) -> Vec<Vec<u8>> {
        let alphabet = [0u8, 1, b'a', b'b', 0xFF];
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(n);
        for _ in 0..n {
            // Half of them extend a prefix of an earlier key (cut anywhere, 16 included).
            let mut key = match keys.len() {
                0 => Vec::new(),
                k if rng.random_bool(0.5) => {
                    let other = &keys[rng.random_range(0..k)];
                    other[..rng.random_range(0..=other.len())].to_vec()
                }
                _ => Vec::new(),
            };
            let extra = rng.random_range(usize::from(key.is_empty())..=12);
            key.extend((0..extra).map(|_| alphabet[rng.random_range(0..alphabet.len())]));
            keys.push(key);
        }
        keys
    }

    // dmp patch: a memtable key orders as its internal key does.
    #[test]
    fn memtable_key_orders_as_internal_key() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut keys = tricky_keys(&mut rng, 400);
        keys.push(vec![0; 16]);
        keys.push(vec![0; 17]);
        keys.push(vec![]);
        keys.push(b"aaaaaaaaaaaaaaaa".to_vec());
        keys.push(b"aaaaaaaaaaaaaaaa\0".to_vec());
        keys.push(b"aaaaaaaaaaaaaaaa\x01".to_vec());
        let internal: Vec<InternalKey> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| InternalKey::new(k.clone(), (i % 3) as SeqNo, ValueType::Value))
            .collect();
        for a in &internal {
            for b in &internal {
                let (ma, mb) = (MemtableKey::new(a.clone()), MemtableKey::new(b.clone()));
                assert_eq!(a.cmp(b), ma.cmp(&mb), "{a:?} against {b:?}");
                assert_eq!(a == b, ma == mb, "{a:?} against {b:?}");
            }
        }
    }

    // dmp patch: iteration, ranges and reads see the keys in their internal order.
    #[test]
    #[expect(clippy::unwrap_used)]
    fn memtable_iterates_and_reads_in_internal_key_order() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let memtable = Memtable::new(0);
        let mut expected = Vec::new();
        for (i, k) in tricky_keys(&mut rng, 2_000).into_iter().enumerate() {
            let v = InternalValue::from_components(
                k,
                (i as u64).to_be_bytes(),
                i as SeqNo,
                ValueType::Value,
            );
            memtable.insert(v.clone());
            expected.push(v);
        }
        expected.sort_by(|a, b| a.key.cmp(&b.key));
        let got: Vec<InternalValue> = memtable.iter().collect();
        assert_eq!(expected, got);
        let (lo, hi) = (&expected[500].key, &expected[1500].key);
        let got: Vec<InternalValue> = memtable.range(lo.clone()..hi.clone()).collect();
        assert_eq!(&expected[500..1500], &got[..]);
        let got: Vec<InternalValue> = memtable.range(lo.clone()..=hi.clone()).rev().collect();
        let want: Vec<InternalValue> = expected[500..=1500].iter().rev().cloned().collect();
        assert_eq!(want, got);
        // The newest version of each key, as a point read sees it.
        for v in &expected {
            let newest = expected
                .iter()
                .filter(|e| e.key.user_key == v.key.user_key)
                .max_by_key(|e| e.key.seqno)
                .unwrap();
            assert_eq!(
                Some(newest),
                memtable.get(&v.key.user_key, SeqNo::MAX).as_ref()
            );
        }
    }

    #[test]
    fn memtable_get() {
        let memtable = Memtable::new(0);

        let value =
            InternalValue::from_components(b"abc".to_vec(), b"abc".to_vec(), 0, ValueType::Value);

        memtable.insert(value.clone());

        assert_eq!(Some(value), memtable.get(b"abc", SeqNo::MAX));
    }

    #[test]
    fn memtable_get_highest_seqno() {
        let memtable = Memtable::new(0);

        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            0,
            ValueType::Value,
        ));
        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            1,
            ValueType::Value,
        ));
        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            2,
            ValueType::Value,
        ));
        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            3,
            ValueType::Value,
        ));
        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            4,
            ValueType::Value,
        ));

        assert_eq!(
            Some(InternalValue::from_components(
                b"abc".to_vec(),
                b"abc".to_vec(),
                4,
                ValueType::Value,
            )),
            memtable.get(b"abc", SeqNo::MAX)
        );
    }

    #[test]
    fn memtable_get_prefix() {
        let memtable = Memtable::new(0);

        memtable.insert(InternalValue::from_components(
            b"abc0".to_vec(),
            b"abc".to_vec(),
            0,
            ValueType::Value,
        ));
        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            255,
            ValueType::Value,
        ));

        assert_eq!(
            Some(InternalValue::from_components(
                b"abc".to_vec(),
                b"abc".to_vec(),
                255,
                ValueType::Value,
            )),
            memtable.get(b"abc", SeqNo::MAX)
        );

        assert_eq!(
            Some(InternalValue::from_components(
                b"abc0".to_vec(),
                b"abc".to_vec(),
                0,
                ValueType::Value,
            )),
            memtable.get(b"abc0", SeqNo::MAX)
        );
    }

    #[test]
    fn memtable_get_old_version() {
        let memtable = Memtable::new(0);

        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            0,
            ValueType::Value,
        ));
        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            99,
            ValueType::Value,
        ));
        memtable.insert(InternalValue::from_components(
            b"abc".to_vec(),
            b"abc".to_vec(),
            255,
            ValueType::Value,
        ));

        assert_eq!(
            Some(InternalValue::from_components(
                b"abc".to_vec(),
                b"abc".to_vec(),
                255,
                ValueType::Value,
            )),
            memtable.get(b"abc", SeqNo::MAX)
        );

        assert_eq!(
            Some(InternalValue::from_components(
                b"abc".to_vec(),
                b"abc".to_vec(),
                99,
                ValueType::Value,
            )),
            memtable.get(b"abc", 100)
        );

        assert_eq!(
            Some(InternalValue::from_components(
                b"abc".to_vec(),
                b"abc".to_vec(),
                0,
                ValueType::Value,
            )),
            memtable.get(b"abc", 50)
        );
    }
}
