//! Kafka-compatible partitioning: `toPositive(murmur2(key)) % partitions`, exactly as the Java
//! client's default partitioner does for keyed records. Both bus backends use it, so a partner
//! producing to `dmp.events` with the Java client lands each user on the partition we would.

/// Kafka's `Utils.murmur2` (seed `0x9747b28c`), returning the same signed 32-bit value.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() == 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key` among `partitions`.
///
/// # Panics
/// When `partitions` is zero.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

/// A 64-bit hash of a uid for sharding users to workers (independent of the partitioning, so that
/// the users of one partition spread over every worker).
pub fn uid_hash(uid: &[u8]) -> u64 {
    // FNV-1a, then a murmur3 finaliser for avalanche.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn given_kafka_test_vectors_when_hashing_then_murmur2_matches_java() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2(key),
                *want,
                "key {:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    /// Partition numbers the Java client computes (`toPositive(murmur2(k)) % n`) for those keys.
    #[test]
    fn given_kafka_keys_when_partitioning_then_partition_matches_java_default_partitioner() {
        // -973932308 & 0x7fffffff = 1173551340; % 8 = 4, % 12 = 0, % 3 = 0
        assert_eq!(partition_for_key(b"21", 8), 4);
        assert_eq!(partition_for_key(b"21", 12), 0);
        // -790332482 & 0x7fffffff = 1357151166; % 8 = 6, % 10 = 6
        assert_eq!(partition_for_key(b"foobar", 8), 6);
        assert_eq!(partition_for_key(b"foobar", 10), 6);
        // 479470107 % 8 = 3, % 7 = 479470107 - 68495729*7 = 4
        assert_eq!(partition_for_key(b"abc", 8), 3);
        assert_eq!(partition_for_key(b"abc", 7), 4);
        assert_eq!(partition_for_key(b"anything", 1), 0);
    }

    #[test]
    fn given_many_uids_when_hashing_then_workers_get_an_even_share() {
        let mut counts = [0u32; 4];
        for i in 0..40_000 {
            counts[(uid_hash(format!("user-{i}").as_bytes()) % 4) as usize] += 1;
        }
        for c in counts {
            assert!(
                (9_000..11_000).contains(&c),
                "uneven shard sizes {counts:?}"
            );
        }
    }
}
