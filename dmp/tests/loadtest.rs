//! The loadtest's short scenarios as correctness tests (never timing assertions): a fresh
//! `dmp run`, open-loop traffic with sessions, bots, partner dumps and the daily curve, then
//! every user against the ground truth, audience estimates against the true sizes, and the
//! report with its charts. On embedded backends through the HTTP ingest (also with dedupe and
//! the blacklist off) and through `dmp import`, and on Kafka + Redis straight onto the bus.

use std::path::{Path, PathBuf};

use dmp_loadtest::{report, run, scenario::Scenario};

fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../loadtest/scenarios")
        .join(name);
    Scenario::load(&path).unwrap()
}

fn dmp() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dmp"))
}

/// Runs, writes the report, checks the verdict and the report's files; returns the report.
async fn run_and_report(s: &Scenario) -> run::Report {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(&s.name);
    let report = run::run(s, &dmp(), &out).await.unwrap();
    report::write(&report, &out).unwrap();
    report::verdict(&report).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"]["name"], s.name.as_str());
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| main |"), "{summary}");
    for chart in ["throughput", "latency", "shares", "cpu", "audience"] {
        let path = out.join(format!("main-{chart}.png"));
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), (1000, 500), "{}", path.display());
    }
    report
}

fn check_main_phase(p: &run::Phase, users: usize) {
    assert_eq!(p.driven.acked, p.driven.offered, "every event acknowledged");
    assert!(p.driven.offered > 0);
    let c = p.correctness.as_ref().unwrap();
    assert!(
        c.users as usize > users / 5,
        "{} of {users} users active",
        c.users
    );
    assert_eq!(c.wrong_total, 0, "{:?}", c.wrong);
    assert!(
        p.segment_records > 0,
        "segment records read from the partner stream"
    );
    assert!(p.event_to_segment_ms.count > 0);
    assert!(p.stored_rate > 0.0);
    assert!(p.cpu_per_1k_events["total"] > 0.0);
    assert!(
        p.loadtest_cpu_per_1k_events > 0.0,
        "the loadtest's own CPU is sampled"
    );
    assert!(p.samples.len() >= 3);
    assert!(!p.audience.is_empty() && p.audience.iter().all(|a| a.within));
    assert!(p.graceful_stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_ci_scenario_when_run_then_every_user_matches_the_ground_truth() {
    let s = scenario("ci.toml");
    let report = run_and_report(&s).await;
    assert_eq!(report.phases.len(), 3, "both on, blacklist off, both off");
    let (on, no_bl, off) = (&report.phases[0], &report.phases[1], &report.phases[2]);
    check_main_phase(on, s.users);
    let shares = on.share_evaluated + on.share_duplicate + on.share_bot;
    assert!((shares - 1.0).abs() < 0.05, "shares add up: {shares}");
    assert!(on.share_bot > 0.0, "bots were caught by the blacklist");
    assert_eq!(no_bl.share_bot, 0.0, "no blacklist in the second phase");
    assert_eq!(off.share_bot, 0.0, "no blacklist in the third phase");
    assert_eq!(off.share_duplicate, 0.0, "no dedupe in the third phase");
    for p in [no_bl, off] {
        assert_eq!(
            p.correctness.as_ref().unwrap().wrong_total,
            0,
            "{}",
            p.label
        );
    }
    assert!(report.dedupe_saving.as_ref().unwrap()["total: both off / both on"] > 0.0);
    let l = on.lookups.as_ref().unwrap();
    assert_eq!(l.errors, 0);
    assert!(l.latency_ms.count > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_files_scenario_when_imported_then_every_user_matches_the_ground_truth() {
    let s = scenario("ci-files.toml");
    let report = run_and_report(&s).await;
    check_main_phase(&report.phases[0], s.users);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka-protocol broker and redis-server: run scripts/test.sh"]
async fn given_kafka_and_redis_when_events_go_onto_the_bus_then_every_user_matches_the_ground_truth(
) {
    for var in ["DMP_TEST_KAFKA", "DMP_TEST_REDIS"] {
        assert!(
            std::env::var(var).is_ok(),
            "{var} is not set: this real-service test needs it (run scripts/test.sh)"
        );
    }
    let s = scenario("ci-kafka.toml");
    let report = run_and_report(&s).await;
    check_main_phase(&report.phases[0], s.users);
}
