//! Helpers shared by the `dmp` binary's end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `dmp` binary under test, without the caller's RUST_LOG.
pub fn dmp() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dmp"));
    c.env_remove("RUST_LOG");
    c
}

/// A `dmp` child process that is killed when dropped, so a failing test never leaves it running.
pub struct Running(pub Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `dmp run` on a free port; returns the child and the base URL it printed.
pub fn start(data_dir: &std::path::Path, extra_env: &[(&str, &str)]) -> (Running, String) {
    let mut cmd = dmp();
    cmd.args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .expect("dmp run printed nothing")
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches('/')
        .to_string();
    (Running(child), url)
}

/// Starts `dmp run` with `rules` as its rule file (`dir/rules.toml`), data in `dir/data`.
pub fn start_with_rules(dir: &std::path::Path, rules: &str) -> (Running, String) {
    let path = dir.join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    start(
        &dir.join("data"),
        &[("DMP__SEGMENTER__RULES", path.to_str().unwrap())],
    )
}

/// `GET url` answered with JSON (any status), parsed.
pub async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// `GET url` answered with text (any status): `/metrics`.
pub async fn get_text(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// Posts `events` to `POST /v1/events` and expects 202.
pub async fn post_events(url: &str, events: &(impl serde::Serialize + ?Sized)) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .json(events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
}

/// Sends SIGTERM and waits (at most 20 s) for the process to exit.
pub fn sigterm(child: &mut Child) -> ExitStatus {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "dmp did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of the high offsets of `topic`'s partitions, read from `GET /v1/topics`.
pub fn topic_high(url: &str, topic: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-s", &format!("{url}/v1/topics")])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == topic)
        .map(|t| {
            t["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["high"].as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0)
}
