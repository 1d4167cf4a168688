//! End-to-end tests of the `dmp` binary: `dmp run` boots, serves the API and stops cleanly on
//! SIGTERM; `dmp topics` and `dmp config check` work and fail with clear errors and exit codes.

mod common;
#[path = "../../testsupport/rss.rs"]
mod rss;

use std::time::{Duration, Instant};

use common::{dmp, post_events, sigterm, start, topic_high};

#[tokio::test]
async fn given_empty_data_dir_when_dmp_runs_then_api_answers_and_sigterm_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (mut child, url) = start(dir.path(), &[]);
    let http = reqwest::Client::new();
    let health = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    eprintln!("dmp run: cold start to ready in {:?}", started.elapsed());
    let topics: serde_json::Value = common::get_json(&http, format!("{url}/v1/topics")).await;
    let names: Vec<&str> = topics
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for t in [
        "dmp.events",
        "dmp.user-changes",
        "dmp.segments",
        "dmp.segments.shadow",
        "dmp.dead-letter",
    ] {
        assert!(names.contains(&t), "topic {t} missing from {names:?}");
    }
    assert_eq!(topics[0]["partitions"].as_array().unwrap().len(), 8);
    let metrics = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    // The embedded database's memtables are sampled every second: what an operator watches for
    // flushes that stop (sealed memtables that stay, a write buffer that only grows).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = common::get_text(&http, format!("{url}/metrics")).await;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        };
        match (
            value("dmp_store_write_buffer_bytes"),
            value("dmp_store_sealed_memtables"),
        ) {
            (Some(bytes), Some(sealed)) => {
                assert!(bytes >= 0.0 && sealed >= 0.0, "{bytes} {sealed}");
                break;
            }
            _ => assert!(
                Instant::now() < deadline,
                "no memtable gauges in /metrics:\n{text}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // While it runs, the data dir is locked: a second process says so clearly.
    let out = dmp()
        .args(["topics", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another dmp process"));

    let status = sigterm(&mut child);
    assert!(status.success(), "dmp run exited with {status}");

    // After it stopped, the topics are still there.
    let out = dmp()
        .args(["topics", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dmp.user-changes"), "{text}");
}

#[test]
fn given_bad_config_when_any_command_runs_then_exit_2_names_the_key() {
    let out = dmp()
        .args(["config", "check"])
        .env("DMP__TOPICS__PARTITIONS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("topics.partitions"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dmp.toml");
    std::fs::write(&file, "[bus]\nretention_hourz = 3\n").unwrap();
    let out = dmp()
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("retention_hourz"));

    let out = dmp().args(["config", "check"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("[topics]"));

    let out = dmp().args(["no-such-command"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn given_memory_pretouch_when_dmp_runs_then_that_memory_is_resident_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    // Without: the resident size of an idle `dmp run`.
    let (mut plain, url) = start(dir.path(), &[]);
    let http = reqwest::Client::new();
    let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let idle = rss::rss_mb(Some(plain.id()));
    assert!(sigterm(&mut plain).success());

    let (mut child, url) = start(dir.path(), &[("DMP__MEMORY__PRETOUCH_MB", "512")]);
    // The URL is printed once it serves, after the pretouch: the memory is already there.
    let with = rss::rss_mb(Some(child.id()));
    assert!(
        with >= idle + 480,
        "512 MiB pretouched, but resident {with} MiB against {idle} MiB without"
    );
    let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let now = dmp_core::clock::now_ms();
    let events: Vec<serde_json::Value> = (0..200)
        .map(|i| serde_json::json!({"uid": format!("u{i}"), "ts": now - i, "url": "https://a.example/"}))
        .collect();
    post_events(&url, &events).await;
    assert!(sigterm(&mut child).success());

    // More than the machine has: refused before anything starts, naming the key.
    let out = dmp()
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("DMP__MEMORY__PRETOUCH_MB", "1048576")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("memory.pretouch_mb") && err.contains("more than this machine's memory"),
        "{err}"
    );
}

#[test]
fn given_embedded_bus_when_topics_created_then_listed_with_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dmp()
        .args([
            "topics",
            "create",
            "--topic",
            "partner.x",
            "--partitions",
            "3",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("partner.x: created with 3 partitions"));
    let out = dmp()
        .args(["topics", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("partner.x")).count(),
        3,
        "{text}"
    );
    let out = dmp()
        .args(["topics", "create", "--topic", "bad topic!", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad topic!"));
}

#[test]
#[ignore = "needs a Kafka-protocol broker: run scripts/test.sh"]
fn given_kafka_bus_when_topics_created_then_broker_lists_them() {
    let broker =
        std::env::var("DMP_TEST_KAFKA").expect("DMP_TEST_KAFKA is not set (run scripts/test.sh)");
    let topic = format!("cli.check-{}", std::process::id());
    let url = format!("kafka://{broker}");
    let out = dmp()
        .args(["topics", "create", "--topic", &topic, "--partitions", "2"])
        .env("DMP__BACKENDS__BUS", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dmp()
        .args(["topics", "list"])
        .env("DMP__BACKENDS__BUS", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with(&topic)).count(),
        2,
        "{text}"
    );
}

#[test]
fn given_rule_files_when_checked_and_tested_then_segments_and_reasons_are_shown() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../rules/examples");
    let out = dmp()
        .args(["rules", "check", &format!("{root}/dmp-rules.toml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("women_cats_old_car_service"));

    let out = dmp()
        .args([
            "rules",
            "test",
            &format!("{root}/dmp-rules.toml"),
            "--events",
            &format!("{root}/sample-events.jsonl"),
            "--now",
            "2026-11-22T10:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |uid: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{uid}:")))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line("olga").contains("women_cats_old_car_service"),
        "{text}"
    );
    assert!(line("anna").contains("mortgage_seekers"), "{text}");
    assert!(!line("anna").contains("women"), "{text}");
    assert!(line("bot-7").contains("known_crawler"), "{text}");
    assert!(
        text.contains("mortgage_seekers <- 2026-11-20T09:00:00"),
        "evidence: {text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "version = \"1\"\n[[segment]]\nid = \"x\"\nwhen = '''any(type == \"a\") and colour'''\n",
    )
    .unwrap();
    let out = dmp().args(["rules", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4:"), "{err}");
    assert!(err.contains("unknown name \"colour\""), "{err}");
}

#[tokio::test]
async fn given_dmp_run_with_rules_when_events_posted_then_segment_records_appear_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../rules/examples/dmp-rules.toml"
    );
    let (mut child, url) = start(dir.path(), &[("DMP__SEGMENTER__RULES", rules)]);
    let now = dmp_core::clock::now_ms();
    let events: Vec<serde_json::Value> = (0..3)
        .map(|i| serde_json::json!({"uid": "anna", "ts": now - 1000 * i, "type": "search", "q": "ипотека"}))
        .collect();
    let posted = std::time::Instant::now();
    post_events(&url, &events).await;
    while topic_high(&url, "dmp.segments") == 0 {
        assert!(
            posted.elapsed() < std::time::Duration::from_secs(10),
            "no segment record 10 s after the post"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eprintln!(
        "post -> segment record on dmp.segments in {:?}",
        posted.elapsed()
    );
    assert!(sigterm(&mut child).success());
}
