//! `dmp import` against a running `dmp run` (embedded bus): bad lines reported with line numbers,
//! TSV and gzip JSONL, and an import killed midway resumed without duplicating rows.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{dmp, sigterm, start, topic_high};

use dmp_store::{Get, UserStore};

fn stop(mut child: common::Running) {
    let status = sigterm(&mut child);
    assert!(status.success(), "dmp run exited with {status}");
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn given_gzip_jsonl_with_bad_lines_when_import_killed_and_rerun_then_it_resumes_without_duplicates()
{
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (child, url) = start(&data, &[]);
    // 40,000 lines: even lines carry a ts, odd ones do not; every 1000th is bad.
    let file = dir.path().join("partner.jsonl.gz");
    let base_ts = dmp_core::clock::now_ms() - 86_400_000;
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&file).unwrap(),
        flate2::Compression::fast(),
    );
    let mut bad = 0;
    for i in 1..=40_000u64 {
        if i % 1000 == 0 {
            bad += 1;
            if i % 2000 == 0 {
                writeln!(gz, "{{\"url\":\"https://x/{i}\"}}").unwrap();
            } else {
                writeln!(gz, "this is not json {i}").unwrap();
            }
        } else if i % 2 == 0 {
            writeln!(
                gz,
                "{{\"uid\":\"t{}\",\"ts\":{},\"url\":\"https://x/{i}\"}}",
                i % 200,
                base_ts + i as i64
            )
            .unwrap();
        } else {
            writeln!(gz, "{{\"uid\":\"n{}\",\"url\":\"https://x/{i}\"}}", i % 200).unwrap();
        }
    }
    gz.finish().unwrap();

    // First run: killed once a few batches are acknowledged.
    let mut first = dmp()
        .args([
            "import",
            "--source",
            "partner-a",
            "--batch",
            "500",
            "--api",
            &url,
        ])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = dir.path().join("partner.jsonl.gz.dmp-import");
    wait_until("a checkpoint", || {
        std::fs::read(&ckpt)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["lines_done"].as_u64().unwrap_or(0) >= 5000)
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let done: serde_json::Value = serde_json::from_slice(&std::fs::read(&ckpt).unwrap()).unwrap();
    let done = done["lines_done"].as_u64().unwrap();
    assert!(
        done < 40_000,
        "the first run finished before it was killed ({done})"
    );

    // Second run resumes.
    let out = dmp()
        .args([
            "import",
            "--source",
            "partner-a",
            "--batch",
            "500",
            "--api",
            &url,
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("resuming after line {done}")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("events imported"), "{stdout}");
    assert!(
        stdout.contains("line 39000: malformed JSON") || stdout.contains("more"),
        "{stdout}"
    );
    let rejects = std::fs::read_to_string(dir.path().join("partner.jsonl.gz.rejects")).unwrap();
    assert_eq!(rejects.lines().count(), bad, "{rejects}");
    assert!(
        rejects.contains("line 2000: missing field `uid`"),
        "{rejects}"
    );
    assert!(rejects.contains("line 1000: malformed JSON"), "{rejects}");

    // Everything reaches the store, then check the rows with the database closed by dmp.
    wait_until("the storage writer to catch up", || {
        topic_high(&url, "dmp.user-changes") > 0
            && topic_high(&url, "dmp.events") >= 40_000 - bad as u64
    });
    std::thread::sleep(Duration::from_secs(2));
    stop(child);
    let (_db, store) = dmp_store::embedded::open_temp(&data).unwrap();
    for k in (0..200).step_by(2) {
        let row = store.get(&Get::row(format!("t{k}"))).unwrap().unwrap();
        let versions = row.versions("e", "url").count();
        let want = (1..=40_000u64)
            .filter(|i| i % 2 == 0 && i % 1000 != 0 && i % 200 == k)
            .count();
        assert_eq!(
            versions, want,
            "t{k}: every line with its own ts is one version, none doubled"
        );
        assert_eq!(
            row.latest("e", "src").unwrap().value.to_vec(),
            b"partner-a".to_vec()
        );
    }
    for k in (1..200).step_by(2) {
        let row = store.get(&Get::row(format!("n{k}"))).unwrap().unwrap();
        assert_eq!(
            row.versions("e", "url").count(),
            1,
            "n{k}: lines without ts share the import's first start time, also after the resume"
        );
    }
}

#[test]
fn given_tsv_with_header_when_imported_then_columns_map_to_fields_and_bad_rows_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (child, url) = start(&data, &[]);
    let file = dir.path().join("crm.tsv");
    std::fs::write(
        &file,
        "uid\tts\turl\ta.gender\n\
         alice\t2026-11-21T10:00:00Z\thttps://cats.example/\tf\n\
         bob\t\thttps://cars.example/\tm\n\
         \t2026-11-21T10:00:00Z\thttps://x/\tf\n\
         carol\tyesterday\thttps://x/\tf\n\
         dave\tonly-two-fields\n",
    )
    .unwrap();
    let out = dmp()
        .args(["import", "--source", "crm", "--api", &url])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 events imported, 3 lines rejected"),
        "{stdout}"
    );
    assert!(stdout.contains("line 4: missing field `uid`"), "{stdout}");
    assert!(stdout.contains("line 5: field `ts`"), "{stdout}");
    assert!(
        stdout.contains("line 6: 2 fields, but the header has 4 columns"),
        "{stdout}"
    );
    wait_until("rows", || topic_high(&url, "dmp.user-changes") >= 2);
    std::thread::sleep(Duration::from_millis(500));
    stop(child);
    let (_db, store) = dmp_store::embedded::open_temp(&data).unwrap();
    let alice = store.get(&Get::row("alice")).unwrap().unwrap();
    assert_eq!(
        alice.latest("e", "a.gender").unwrap().value.to_vec(),
        b"f".to_vec()
    );
    assert_eq!(
        alice.latest("e", "src").unwrap().value.to_vec(),
        b"crm".to_vec()
    );

    // A header with an unknown column is refused before anything is sent.
    let bad = dir.path().join("bad.tsv");
    std::fs::write(&bad, "uid\tcolour\nx\tred\n").unwrap();
    let out = dmp()
        .args(["import", "--source", "crm", "--api", &url])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown column \"colour\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka-protocol broker: run scripts/test.sh"]
async fn given_kafka_bus_when_importing_then_lines_are_produced_straight_to_the_topic() {
    let broker =
        std::env::var("DMP_TEST_KAFKA").expect("DMP_TEST_KAFKA is not set (run scripts/test.sh)");
    let url = format!("kafka://{broker}");
    let topic = format!("import.events-{}", dmp_core::clock::now_ms());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.jsonl");
    let mut lines = String::new();
    for i in 0..100 {
        lines.push_str(&format!("{{\"uid\":\"k{i}\",\"url\":\"https://x/{i}\"}}\n"));
    }
    lines.push_str("{\"url\":\"no uid\"}\nbroken\n");
    std::fs::write(&file, lines).unwrap();
    let out = dmp()
        .args(["import", "--source", "kafka-partner"])
        .arg(&file)
        .env("DMP__BACKENDS__BUS", &url)
        .env("DMP__TOPICS__EVENTS", &topic)
        .output()
        .unwrap();
    // The topic does not exist yet: a clear failure, nothing silently dropped.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = dmp()
        .args(["topics", "create", "--topic", &topic, "--partitions", "2"])
        .env("DMP__BACKENDS__BUS", &url)
        .status()
        .unwrap();
    assert!(status.success());
    let out = dmp()
        .args(["import", "--source", "kafka-partner", "--restart"])
        .arg(&file)
        .env("DMP__BACKENDS__BUS", &url)
        .env("DMP__TOPICS__EVENTS", &topic)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("100 events imported, 2 lines rejected"),
        "{stdout}"
    );
    let bus =
        dmp_bus::kafka::KafkaBus::from_url(&url, &dmp_core::Config::defaults().kafka).unwrap();
    let mut c = dmp_bus::Bus::consumer(&bus, "import-check", std::slice::from_ref(&topic))
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 100 && tokio::time::Instant::now() < deadline {
        for r in c.poll(500, Duration::from_millis(200)).await.unwrap() {
            let ev =
                dmp_core::Event::parse(&r.value, dmp_core::clock::now_ms(), &Default::default())
                    .unwrap();
            assert_eq!(ev.src.as_deref(), Some("kafka-partner"));
            seen.insert(ev.uid);
        }
    }
    assert_eq!(seen.len(), 100);
}
