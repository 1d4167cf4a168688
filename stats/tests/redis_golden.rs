//! Our HyperLogLog is Redis's: after the same PFADDs, our bytes equal what `GET` returns from a
//! real redis-server, byte for byte (sparse and dense, cached count included), our counts equal
//! PFCOUNT, merges equal PFMERGE, and sketches taken from Redis load.
//! Needs `DMP_TEST_REDIS=redis://127.0.0.1:PORT` (scripts/test.sh starts one).

use dmp_stats::{Hll, RedisHll};

fn redis() -> redis::Connection {
    let url =
        std::env::var("DMP_TEST_REDIS").expect("DMP_TEST_REDIS is not set (run scripts/test.sh)");
    redis::Client::open(url.as_str())
        .expect("redis url")
        .get_connection()
        .expect("the redis-server could not be reached")
}

fn get(con: &mut redis::Connection, key: &str) -> Vec<u8> {
    redis::cmd("GET").arg(key).query(con).unwrap()
}

fn del(con: &mut redis::Connection, key: &str) {
    let _: () = redis::cmd("DEL").arg(key).query(con).unwrap();
}

fn element(set: usize, i: usize) -> Vec<u8> {
    format!("uid-{set}-{i}-{}", i.wrapping_mul(7919)).into_bytes()
}

/// Grows one key to 10M elements in PFADDs of varying size, comparing bytes at checkpoints
/// (sparse at first, dense after), then PFCOUNT (which writes the cached count into the bytes),
/// then bytes again.
#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_same_pfadds_when_compared_then_bytes_and_counts_equal_redis_up_to_10m() {
    let mut con = redis();
    let key = format!("dmp:test:golden:{}", std::process::id());
    del(&mut con, &key);
    let mut ours = RedisHll::new();
    let checkpoints = [
        1usize, 2, 3, 10, 50, 100, 300, 500, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 100_000,
        1_000_000, 10_000_000,
    ];
    let (mut added, mut seen_sparse, mut seen_dense) = (0usize, 0, 0);
    for (c, &target) in checkpoints.iter().enumerate() {
        while added < target {
            // Batches of 1, 7, 1000 or 10000 elements: one PFADD each, on both sides.
            // (Past 10K elements always 10000, to keep the test quick.)
            let size = if target > 10_000 {
                10_000
            } else {
                [1usize, 7, 1_000, 10_000][c % 4]
            };
            let batch = size.min(target - added);
            let elements: Vec<Vec<u8>> = (added..added + batch).map(|i| element(0, i)).collect();
            let theirs: i64 = redis::cmd("PFADD")
                .arg(&key)
                .arg(&elements)
                .query(&mut con)
                .unwrap();
            let mine = ours.pfadd(elements.iter().map(Vec::as_slice));
            assert_eq!(mine, theirs == 1, "PFADD reply after {added} + {batch}");
            added += batch;
        }
        let bytes = get(&mut con, &key);
        assert!(
            bytes == ours.as_bytes(),
            "bytes differ after {added} elements ({:?}, redis {} bytes, first difference at {:?})",
            ours,
            bytes.len(),
            bytes.iter().zip(ours.as_bytes()).position(|(a, b)| a != b)
        );
        if ours.is_sparse() {
            seen_sparse += 1;
        } else {
            seen_dense += 1;
        }
        // Every other checkpoint: PFCOUNT, which caches the count in the value.
        if c % 2 == 0 {
            let theirs: u64 = redis::cmd("PFCOUNT").arg(&key).query(&mut con).unwrap();
            assert_eq!(ours.pfcount(), theirs, "PFCOUNT after {added}");
            assert_eq!(get(&mut con, &key), ours.as_bytes(), "cached count");
        }
        // A sketch taken from Redis loads and counts the same.
        let loaded = RedisHll::from_bytes(&bytes).unwrap();
        assert_eq!(loaded.count(), ours.count());
    }
    assert!(
        seen_sparse >= 5 && seen_dense >= 5,
        "{seen_sparse} {seen_dense}"
    );
    del(&mut con, &key);
}

/// Unions: PFMERGE of sparse with sparse (stays sparse), of sparse with dense, and into an
/// existing key, compared byte for byte; and multi-key PFCOUNT equals our merged count.
#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_sketches_when_merged_then_bytes_equal_pfmerge() {
    let mut con = redis();
    let run = std::process::id();
    let mut sketches = Vec::new();
    for (set, n) in [(1usize, 40usize), (2, 400), (3, 200_000), (4, 2_000)] {
        let key = format!("dmp:test:merge:{run}:{set}");
        del(&mut con, &key);
        let mut ours = RedisHll::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
            let elements: Vec<Vec<u8>> = chunk.iter().map(|i| element(set, *i)).collect();
            let _: i64 = redis::cmd("PFADD")
                .arg(&key)
                .arg(&elements)
                .query(&mut con)
                .unwrap();
            ours.pfadd(elements.iter().map(Vec::as_slice));
        }
        assert_eq!(get(&mut con, &key), ours.as_bytes(), "set {set}");
        sketches.push((key, ours));
    }
    for (dest, sources) in [(0usize, vec![1usize]), (1, vec![3]), (3, vec![0, 1, 2])] {
        let dest_key = format!("dmp:test:merge:{run}:dest{dest}");
        del(&mut con, &dest_key);
        // Start the destination as a copy of sketch `dest` on both sides.
        let _: () = redis::cmd("SET")
            .arg(&dest_key)
            .arg(sketches[dest].1.as_bytes())
            .query(&mut con)
            .unwrap();
        let mut ours = sketches[dest].1.clone();
        let mut cmd = redis::cmd("PFMERGE");
        cmd.arg(&dest_key);
        for s in &sources {
            cmd.arg(&sketches[*s].0);
        }
        let _: () = cmd.query(&mut con).unwrap();
        let refs: Vec<&RedisHll> = sources.iter().map(|s| &sketches[*s].1).collect();
        ours.pfmerge(&refs);
        assert_eq!(
            get(&mut con, &dest_key),
            ours.as_bytes(),
            "PFMERGE into {dest} from {sources:?} ({ours:?})"
        );
        let mut count = redis::cmd("PFCOUNT");
        count.arg(&sketches[dest].0);
        for s in &sources {
            count.arg(&sketches[*s].0);
        }
        let theirs: u64 = count.query(&mut con).unwrap();
        let mut union = sketches[dest].1.to_hll();
        for s in &sources {
            union.merge(&sketches[*s].1.to_hll());
        }
        assert_eq!(union.count(), theirs, "multi-key PFCOUNT");
        del(&mut con, &dest_key);
    }
    for (key, _) in sketches {
        del(&mut con, &key);
    }
}

/// The one-byte-register sketch the embedded counters use counts what Redis counts.
#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_same_elements_when_counted_then_raw_sketch_equals_redis_pfcount() {
    let mut con = redis();
    let run = std::process::id();
    for n in [1usize, 2, 10, 100, 1_000, 5_000, 20_000, 100_000, 300_000] {
        let key = format!("dmp:test:golden-raw:{run}:{n}");
        del(&mut con, &key);
        let mut ours = Hll::new();
        let elements: Vec<Vec<u8>> = (0..n).map(|i| element(9, i)).collect();
        for chunk in elements.chunks(10_000) {
            let _: i64 = redis::cmd("PFADD")
                .arg(&key)
                .arg(chunk)
                .query(&mut con)
                .unwrap();
        }
        for e in &elements {
            ours.add(e);
        }
        let theirs: u64 = redis::cmd("PFCOUNT").arg(&key).query(&mut con).unwrap();
        assert_eq!(ours.count(), theirs, "n = {n}");
        // And its registers written as Redis would write them count the same.
        assert_eq!(RedisHll::from_hll(&ours).count(), theirs);
        del(&mut con, &key);
    }
}
