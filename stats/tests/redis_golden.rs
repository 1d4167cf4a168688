//! Our HyperLogLog counts what a real redis-server counts for the same elements.
//! Needs `DMP_TEST_REDIS=redis://127.0.0.1:PORT` (scripts/test.sh starts one).

use dmp_stats::Hll;

#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_same_elements_when_counted_then_equals_redis_pfcount() {
    let url =
        std::env::var("DMP_TEST_REDIS").expect("DMP_TEST_REDIS is not set (run scripts/test.sh)");
    let mut con = redis::Client::open(url.as_str())
        .expect("redis url")
        .get_connection()
        .expect("the redis-server could not be reached");
    let run = std::process::id();
    for n in [1usize, 2, 10, 100, 1_000, 5_000, 20_000, 100_000, 300_000] {
        let key = format!("dmp:test:golden:{run}:{n}");
        let _: () = redis::cmd("DEL").arg(&key).query(&mut con).unwrap();
        let mut ours = Hll::new();
        let elements: Vec<String> = (0..n).map(|i| format!("uid-{i}-{}", i * 7919)).collect();
        for chunk in elements.chunks(10_000) {
            let _: i64 = redis::cmd("PFADD")
                .arg(&key)
                .arg(chunk)
                .query(&mut con)
                .unwrap();
        }
        for e in &elements {
            ours.add(e.as_bytes());
        }
        let theirs: u64 = redis::cmd("PFCOUNT").arg(&key).query(&mut con).unwrap();
        assert_eq!(ours.count(), theirs, "n = {n}");
        let _: () = redis::cmd("DEL").arg(&key).query(&mut con).unwrap();
    }
}
