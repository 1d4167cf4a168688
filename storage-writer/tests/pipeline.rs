//! End-to-end within one process, as `dmp run` wires it: HTTP ingest -> dmp.events -> storage
//! writer -> user store rows + dmp.user-changes (+ dmp.dead-letter), on the embedded bus and on a
//! real Kafka-protocol broker, plus the spill path with a real outage.

#[path = "../../testsupport/ingest.rs"]
mod ingest;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use dmp_api::ingest::Ingest;
use dmp_api::spill::Spill;
use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, ProduceRecord};
use dmp_core::{Config, DeadLetter, UserChange};
use dmp_storage_writer::enrich::{Enricher, IpMode, SHIPPED_CRAWLER_LIST};
use dmp_storage_writer::StorageWriter;
use dmp_store::embedded::{EmbeddedDatabase, EmbeddedStore};
use dmp_store::{Get, Schema, UserStore};
use tokio::sync::watch;

struct Pipeline {
    _dir: tempfile::TempDir,
    cfg: Config,
    bus: Arc<dyn Bus>,
    store: Arc<EmbeddedStore>,
    url: String,
    stop: watch::Sender<bool>,
    writer: tokio::task::JoinHandle<()>,
}

async fn start(bus: Option<Arc<dyn Bus>>, topics_suffix: &str) -> Pipeline {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::defaults();
    cfg.data_dir = dir.path().to_path_buf();
    if !topics_suffix.is_empty() {
        for t in [
            &mut cfg.topics.events,
            &mut cfg.topics.user_changes,
            &mut cfg.topics.dead_letter,
            &mut cfg.topics.segments,
            &mut cfg.topics.segments_shadow,
        ] {
            t.push_str(topics_suffix);
        }
        cfg.storage_writer.group.push_str(topics_suffix);
    }
    cfg.topics.partitions = 4;
    let ingest::Served {
        store,
        bus,
        url,
        stop,
        rx,
        ..
    } = ingest::serve(&cfg, bus).await;
    let enricher = Enricher::new(IpMode::Truncate, Vec::new(), SHIPPED_CRAWLER_LIST).unwrap();
    let writer = StorageWriter::new(bus.clone(), store.clone(), &cfg, enricher);
    let writer = tokio::spawn(async move { writer.run(rx).await.unwrap() });
    Pipeline {
        _dir: dir,
        cfg,
        bus,
        store,
        url,
        stop,
        writer,
    }
}

async fn read_topic(
    bus: &dyn Bus,
    topic: &str,
    n: usize,
    patience: Duration,
) -> Vec<dmp_bus::Record> {
    let group = format!("reader-{}", dmp_core::clock::now_ms());
    let mut c = bus.consumer(&group, &[topic.to_string()]).await.unwrap();
    let deadline = tokio::time::Instant::now() + patience;
    let mut out = Vec::new();
    while out.len() < n && tokio::time::Instant::now() < deadline {
        out.extend(c.poll(1000, Duration::from_millis(200)).await.unwrap());
    }
    c.close().await.unwrap();
    out
}

async fn wait_for_row(store: &EmbeddedStore, uid: &str, patience: Duration) -> dmp_core::Row {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(row) = store.get(&Get::row(uid)).unwrap() {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "row {uid} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post(url: &str, ctype: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn check_http_to_row_and_change(p: &Pipeline, patience: Duration) {
    let ts = dmp_core::clock::now_ms() - 5000;
    let body = serde_json::json!([
        {"uid": "anna", "ts": ts, "type": "search", "q": "ипотека", "url": "https://bank.example/mortgage",
         "ip": "178.49.0.1", "ua": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
         "attrs": {"gender": "f"}},
        {"uid": "bot-1", "ts": ts, "ua": "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)"},
        {"ts": ts}
    ]);
    let (status, answer) = post(
        &p.url,
        "application/json",
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["errors"][0]["index"], 2);
    assert_eq!(answer["errors"][0]["reason"], "missing_uid");

    let row = wait_for_row(&p.store, "anna", patience).await;
    let cell = |q: &str| row.latest("e", q).map(|c| c.value.to_vec());
    assert_eq!(cell("q"), Some("ипотека".as_bytes().to_vec()));
    assert_eq!(cell("type"), Some(b"search".to_vec()));
    assert_eq!(
        cell("ip"),
        Some(vec![178, 49, 0, 0]),
        "IP stored truncated, as an integer"
    );
    assert_eq!(cell("a.gender"), Some(b"f".to_vec()));
    assert_eq!(cell("src"), Some(b"http".to_vec()));
    // One `ua` cell: the dictionary id, then browser, OS and device class, each ended by a 0.
    let ua = cell("ua").unwrap();
    let parts: Vec<&str> = std::str::from_utf8(&ua[8..]).unwrap().split('\0').collect();
    assert!(parts[0].starts_with("Firefox"), "{parts:?}");
    assert!(parts[1].starts_with("Linux"), "{parts:?}");
    assert_eq!(parts[2..], ["pc", ""]);
    assert_eq!(cell("ua.br"), None, "no cell per part");
    assert_eq!(
        row.latest("e", "q").unwrap().ts,
        ts,
        "cell version = event time"
    );
    let first_seen = row.latest("m", "first_seen").unwrap();
    assert_eq!(first_seen.value.to_vec(), ts.to_be_bytes().to_vec());
    let bot = wait_for_row(&p.store, "bot-1", patience).await;
    assert_eq!(
        bot.latest("m", "crawler").map(|c| c.value.to_vec()),
        Some(b"1".to_vec())
    );
    // The user agent's string is in the dictionary row.
    let ua_id = u64::from_be_bytes(
        bot.latest("e", "ua").unwrap().value[..8]
            .try_into()
            .unwrap(),
    );
    let dict = p
        .store
        .get(&Get::row(dmp_storage_writer::cells::ua_dictionary_row(
            ua_id,
        )))
        .unwrap()
        .unwrap();
    assert!(String::from_utf8(dict.cells[0].value.to_vec())
        .unwrap()
        .contains("YandexBot"));

    // NDJSON lines go on to the bus as they came, with the arrival time and the default source
    // appended when a line has none.
    let before = dmp_core::clock::now_ms();
    let lines = format!(
        "{{\"uid\":\"nd-1\",\"ts\":{ts},\"type\":\"pageview\",\"url\":\"https://a.example/\"}}\r\n\
         {{\"uid\":\"nd-2\",\"type\":\"pageview\",\"src\":\"partner-7\"}}\n\
         {{\"uid\":\"nd-3\",\"ts\":null,\"src\":null,\"q\":\"\\\"кот\\\"\"}}\n"
    );
    let (status, answer) = post(&p.url, "application/x-ndjson", lines.into_bytes()).await;
    let after = dmp_core::clock::now_ms();
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 3, "{answer}");
    let nd1 = wait_for_row(&p.store, "nd-1", patience).await;
    assert_eq!(nd1.latest("e", "src").unwrap().value.to_vec(), b"http");
    assert_eq!(nd1.latest("e", "url").unwrap().ts, ts);
    let nd2 = wait_for_row(&p.store, "nd-2", patience).await;
    assert_eq!(nd2.latest("e", "src").unwrap().value.to_vec(), b"partner-7");
    let arrived = nd2.latest("e", "type").unwrap().ts;
    assert!(
        (before..=after).contains(&arrived),
        "{arrived} not in [{before}, {after}]"
    );
    let nd3 = wait_for_row(&p.store, "nd-3", patience).await;
    assert_eq!(nd3.latest("e", "src").unwrap().value.to_vec(), b"http");
    let q = nd3.latest("e", "q").unwrap();
    assert_eq!(q.value.to_vec(), "\"кот\"".as_bytes());
    assert!(
        (before..=after).contains(&q.ts),
        "a null ts is the arrival time"
    );

    let changes = read_topic(p.bus.as_ref(), &p.cfg.topics.user_changes, 2, patience).await;
    let uids: BTreeSet<String> = changes
        .iter()
        .map(|r| UserChange::from_json(&r.value).unwrap().uid)
        .collect();
    assert!(uids.contains("anna") && uids.contains("bot-1"), "{uids:?}");
    let anna = changes
        .iter()
        .map(|r| (r, UserChange::from_json(&r.value).unwrap()))
        .find(|(_, c)| c.uid == "anna")
        .unwrap();
    assert_eq!(anna.1.last_event_ts, ts);
    assert_eq!(
        anna.0.timestamp, anna.1.ts,
        "message timestamp = write time"
    );
    assert_eq!(anna.0.key, b"anna");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_embedded_pipeline_when_events_posted_then_rows_and_changes_appear() {
    let p = start(None, "").await;
    check_http_to_row_and_change(&p, Duration::from_secs(10)).await;
    let _ = p.stop.send(true);
    p.writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka-protocol broker: run scripts/test.sh"]
async fn given_kafka_pipeline_when_events_posted_then_rows_and_changes_appear() {
    let broker =
        std::env::var("DMP_TEST_KAFKA").expect("DMP_TEST_KAFKA is not set (run scripts/test.sh)");
    let mut kcfg = Config::defaults().kafka;
    kcfg.consumer
        .insert("session.timeout.ms".into(), "6000".into());
    let bus: Arc<dyn Bus> =
        Arc::new(dmp_bus::kafka::KafkaBus::from_url(&format!("kafka://{broker}"), &kcfg).unwrap());
    let p = start(Some(bus), &format!("-e2e-{}", dmp_core::clock::now_ms())).await;
    check_http_to_row_and_change(&p, Duration::from_secs(60)).await;
    let _ = p.stop.send(true);
    p.writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_invalid_records_on_the_topic_when_written_then_dead_lettered_with_reason_and_good_ones_kept(
) {
    let p = start(None, "").await;
    // A partner producing straight to dmp.events, some of it garbage.
    let records = vec![
        ProduceRecord::new("x", b"{\"uid\":\"good-1\",\"url\":\"https://a/\"}".to_vec()),
        ProduceRecord::new("x", b"{not json".to_vec()),
        ProduceRecord::new("x", b"{\"url\":\"https://a/\"}".to_vec()),
        ProduceRecord::new("x", vec![0xff, 0xfe, b'{']),
        ProduceRecord::new(
            "x",
            format!("{{\"uid\":\"{}\"}}", "u".repeat(300)).into_bytes(),
        ),
        ProduceRecord::new(
            "y",
            b"{\"uid\":\"good-2\",\"ts\":\"2026-11-20T10:00:00Z\"}".to_vec(),
        ),
    ];
    p.bus.produce(&p.cfg.topics.events, records).await.unwrap();
    let dead = read_topic(
        p.bus.as_ref(),
        &p.cfg.topics.dead_letter,
        4,
        Duration::from_secs(10),
    )
    .await;
    let reasons: BTreeMap<String, DeadLetter> = dead
        .iter()
        .map(|r| serde_json::from_slice::<DeadLetter>(&r.value).unwrap())
        .map(|d| (d.reason.clone(), d))
        .collect();
    let names: Vec<&str> = reasons.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        vec!["malformed_json", "missing_uid", "not_utf8", "uid_too_long"]
    );
    let m = &reasons["missing_uid"];
    assert_eq!(m.stage, "storage-writer");
    assert_eq!(m.topic, p.cfg.topics.events);
    assert!(m.payload.contains("https://a/"));
    wait_for_row(&p.store, "good-1", Duration::from_secs(10)).await;
    let g2 = wait_for_row(&p.store, "good-2", Duration::from_secs(10)).await;
    let first_seen = g2.latest("m", "first_seen").unwrap();
    assert_eq!(
        first_seen.value.to_vec(),
        1_795_168_800_000i64.to_be_bytes().to_vec()
    );
    let _ = p.stop.send(true);
    p.writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_ingest_body_problems_when_posted_then_clear_4xx() {
    let p = start(None, "").await;
    let (s, a) = post(&p.url, "application/json", b"[{\"uid\":".to_vec()).await;
    assert_eq!(s, 400);
    assert!(a["error"].as_str().unwrap().contains("malformed JSON"));
    let (s, a) = post(&p.url, "text/csv", b"uid\nx".to_vec()).await;
    assert_eq!(s, 415);
    assert!(a["error"]
        .as_str()
        .unwrap()
        .contains("application/x-ndjson"));
    let (s, a) = post(
        &p.url,
        "application/json",
        vec![b' '; p.cfg.api.max_body_bytes + 1],
    )
    .await;
    assert_eq!(s, 413);
    assert!(
        a["error"].as_str().unwrap().contains("api.max_body_bytes"),
        "{a}"
    );
    let many: Vec<serde_json::Value> = (0..p.cfg.api.max_batch_events + 1)
        .map(|i| serde_json::json!({"uid": format!("u{i}")}))
        .collect();
    let (s, a) = post(
        &p.url,
        "application/json",
        serde_json::to_vec(&many).unwrap(),
    )
    .await;
    assert_eq!(s, 413);
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("api.max_batch_events"),
        "{a}"
    );
    let (s, _) = post(&p.url, "application/json", b"[{\"ts\":1}]".to_vec()).await;
    assert_eq!(s, 400, "a batch with nothing valid is a 400");
    // gzip: bad, then a bomb that decompresses past the limit, then a good one.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/events", p.url))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(b"definitely not gzip".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("gzip"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b'\n'; p.cfg.api.max_body_bytes + 10])
        .unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < p.cfg.api.max_body_bytes);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/events", p.url))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"{\"uid\":\"gz-1\"}\n\n{\"uid\":\"gz-2\"}\n")
        .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/events", p.url))
        .header("content-type", "application/x-ndjson; charset=utf-8")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    wait_for_row(&p.store, "gz-2", Duration::from_secs(10)).await;
    let _ = p.stop.send(true);
    p.writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_pixel_when_called_then_gif_cookie_and_event_from_request_headers() {
    let p = start(None, "").await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/px.gif?q=cats&a.campaign=c7", p.url))
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
        )
        .header("referer", "https://pets.example/cats")
        .header("x-forwarded-for", "178.49.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "image/gif");
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("no-store"));
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("dmp_uid=") && cookie.contains("Max-Age="),
        "{cookie}"
    );
    let uid = cookie["dmp_uid=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(uid.len(), 32);
    assert_eq!(&r.bytes().await.unwrap()[..6], b"GIF89a");
    let row = wait_for_row(&p.store, &uid, Duration::from_secs(10)).await;
    let cell = |q: &str| row.latest("e", q).map(|c| c.value.to_vec());
    assert_eq!(cell("url"), Some(b"https://pets.example/cats".to_vec()));
    assert_eq!(cell("q"), Some(b"cats".to_vec()));
    assert_eq!(cell("src"), Some(b"pixel".to_vec()));
    assert_eq!(cell("a.campaign"), Some(b"c7".to_vec()));
    assert_eq!(
        cell("ip"),
        Some(vec![127, 0, 0, 0]),
        "no trusted proxy header configured: the peer address"
    );
    // The cookie is reused: no new uid.
    let r = client
        .get(format!("{}/px.gif?url=https://pets.example/dogs", p.url))
        .header("cookie", format!("other=1; dmp_uid={uid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("set-cookie").is_none());
    // A bad uid is a 400 with the reason.
    let r = client
        .get(format!("{}/px.gif?uid={}", p.url, "x".repeat(300)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("uid"));
    let _ = p.stop.send(true);
    p.writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_missing_topic_when_ingesting_then_events_spill_and_replay_once_it_exists() {
    // A real failure of the real embedded bus: dmp.events does not exist (yet).
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::defaults();
    let db = EmbeddedDatabase::open(dir.path(), &cfg.embedded, &Schema::dmp_default()).unwrap();
    let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap());
    let spill = Arc::new(Spill::open(&dir.path().join("spill"), 1 << 20).unwrap());
    let ingest = Ingest::new(
        bus.clone(),
        "late.events".into(),
        spill.clone(),
        cfg.api.clone(),
    );
    let events: Vec<dmp_core::Event> = (0..50)
        .map(|i| {
            dmp_core::Event::parse(
                format!("{{\"uid\":\"s{i}\"}}").as_bytes(),
                1000,
                &Default::default(),
            )
            .unwrap()
        })
        .collect();
    assert_eq!(
        ingest.submit(&events[..30]).await.unwrap(),
        dmp_api::ingest::Landing::Spill
    );
    assert_eq!(
        ingest.submit(&events[30..]).await.unwrap(),
        dmp_api::ingest::Landing::Spill
    );
    assert!(spill.pending_bytes() > 0);
    // Still down: replay keeps everything.
    assert_eq!(
        spill
            .replay(bus.as_ref(), "late.events", Duration::from_secs(1))
            .await
            .unwrap(),
        0
    );
    // A crash left a torn frame at the end of the file (never acknowledged).
    drop(ingest);
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("spill/spill.log"))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
    }
    let spill = Spill::open(&dir.path().join("spill"), 1 << 20).unwrap();
    bus.create_topic("late.events", 2).await.unwrap();
    assert_eq!(
        spill
            .replay(bus.as_ref(), "late.events", Duration::from_secs(1))
            .await
            .unwrap(),
        50
    );
    assert_eq!(spill.pending_bytes(), 0);
    let got = read_topic(bus.as_ref(), "late.events", 50, Duration::from_secs(5)).await;
    let uids: BTreeSet<String> = got
        .iter()
        .map(|r| {
            dmp_core::Event::parse(&r.value, 0, &Default::default())
                .unwrap()
                .uid
        })
        .collect();
    assert_eq!(got.len(), 50, "nothing lost, nothing doubled");
    assert_eq!(uids.len(), 50);
    assert!(
        got.iter().all(|r| r.timestamp > 1000),
        "message time is the original arrival time"
    );
    // Replaying again sends nothing.
    assert_eq!(
        spill
            .replay(bus.as_ref(), "late.events", Duration::from_secs(1))
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Tansu broker binary: run scripts/test.sh"]
async fn given_broker_stopped_when_ingesting_then_spilled_and_replayed_after_restart() {
    let tansu = std::env::var("DMP_TEST_TANSU")
        .expect("DMP_TEST_TANSU (the tansu binary) is not set (run scripts/test.sh)");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let start_broker = || {
        std::process::Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_port = || {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("broker did not start");
    };
    let mut broker = start_broker();
    wait_port();
    let mut kcfg = Config::defaults().kafka;
    kcfg.produce_timeout_ms = 3000;
    let url = format!("kafka://127.0.0.1:{port}");
    let bus: Arc<dyn Bus> = Arc::new(dmp_bus::kafka::KafkaBus::from_url(&url, &kcfg).unwrap());
    bus.create_topic("spill.events", 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spill = Arc::new(Spill::open(dir.path(), 1 << 20).unwrap());
    let mut api = Config::defaults().api;
    api.ingest_timeout_ms = 1000;
    let ingest = Ingest::new(bus.clone(), "spill.events".into(), spill.clone(), api);
    let ev = |i: usize| {
        dmp_core::Event::parse(
            format!("{{\"uid\":\"k{i}\"}}").as_bytes(),
            1000,
            &Default::default(),
        )
        .unwrap()
    };
    let before: Vec<_> = (0..10).map(ev).collect();
    assert_eq!(
        ingest.submit(&before).await.unwrap(),
        dmp_api::ingest::Landing::Bus
    );
    broker.kill().unwrap(); // the broker goes away
    broker.wait().unwrap();
    let during: Vec<_> = (10..40).map(ev).collect();
    for chunk in during.chunks(10) {
        assert_eq!(
            ingest.submit(chunk).await.unwrap(),
            dmp_api::ingest::Landing::Spill
        );
    }
    let mut broker = start_broker(); // back (memory storage: empty)
    wait_port();
    let bus2: Arc<dyn Bus> = Arc::new(dmp_bus::kafka::KafkaBus::from_url(&url, &kcfg).unwrap());
    bus2.create_topic("spill.events", 2).await.unwrap();
    let mut replayed = 0;
    for _ in 0..20 {
        replayed += spill
            .replay(bus2.as_ref(), "spill.events", Duration::from_secs(5))
            .await
            .unwrap();
        if spill.pending_bytes() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(replayed, 30);
    let got = read_topic(bus2.as_ref(), "spill.events", 30, Duration::from_secs(60)).await;
    let uids: BTreeSet<String> = got
        .iter()
        .map(|r| {
            dmp_core::Event::parse(&r.value, 0, &Default::default())
                .unwrap()
                .uid
        })
        .collect();
    let want: BTreeSet<String> = (10..40).map(|i| format!("k{i}")).collect();
    assert!(
        want.is_subset(&uids),
        "spilled events missing after replay: {:?}",
        want.difference(&uids).collect::<Vec<_>>()
    );
    broker.kill().unwrap();
    let _ = broker.wait();
}
