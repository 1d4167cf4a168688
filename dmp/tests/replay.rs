//! `dmp replay` moves a consumer group back or forward in time on the embedded bus (the Kafka
//! implementation of the same bus call is covered by the bus conformance suite).

mod common;

use std::time::{Duration, Instant};

use common::{dmp, post_events, sigterm, start, topic_high};

fn offsets(out: &std::process::Output) -> Vec<u64> {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("partition "))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_consumed_topic_when_replayed_then_group_moves_to_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, url) = start(&data, &[]);
    let events: Vec<serde_json::Value> = (0..40)
        .map(|i| serde_json::json!({"uid": format!("u{i}"), "url": "https://news.example/"}))
        .collect();
    post_events(&url, &events).await;
    let started = Instant::now();
    while topic_high(&url, "dmp.user-changes") < 40 {
        assert!(started.elapsed() < Duration::from_secs(20), "not written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let high = topic_high(&url, "dmp.events");
    assert!(sigterm(&mut child).success());

    let replay = |args: &[&str]| {
        dmp()
            .args([
                "replay",
                "--group",
                "storage-writer",
                "--topic",
                "dmp.events",
            ])
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    // Back an hour: every record again.
    let back = offsets(&replay(&["--since", "1h"]));
    assert!(!back.is_empty());
    assert_eq!(back.iter().sum::<u64>(), 0, "{back:?}");
    // Forward past the end: nothing left.
    let later = (dmp_core::clock::now_ms() + 3_600_000).to_string();
    let fwd = offsets(&replay(&["--from", &later]));
    assert_eq!(fwd.iter().sum::<u64>(), high, "{fwd:?}");
    // An RFC 3339 instant works too.
    let rfc = offsets(&replay(&["--from", "2020-01-01T00:00:00Z"]));
    assert_eq!(rfc.iter().sum::<u64>(), 0);
    // Bad durations name the flag.
    let bad = replay(&["--since", "2w"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since"));
}
