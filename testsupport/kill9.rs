//! Shared by the kill -9 tests of the bus and the store (included with `#[path]`): runs the test
//! binary's own `crash_child` test as a child process, waits until it has acknowledged writes,
//! lets it run on for a moment it does not choose, SIGKILLs it, and returns every line it printed
//! (its acknowledgement log: the independent oracle).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs one crash cycle of `crash_child` on `dir`; returns the child's stdout lines.
pub fn run_and_kill(dir: &std::path::Path, cycle: u64) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DMP_CRASH_DIR", dir)
        .env("DMP_CRASH_CYCLE", cycle.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    // Once it acknowledges writes (recovering a large journal takes a while in debug builds),
    // let it run on and kill -9 it at a moment it does not choose.
    let started = Instant::now();
    while !lines.lock().unwrap().iter().any(|l| l.starts_with("ack ")) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "cycle {cycle}: the child never acknowledged a write"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let wait = 200 + (dmp_core::clock::now_ms() as u64 % 700);
    std::thread::sleep(Duration::from_millis(wait));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    let lines = lines.lock().unwrap().clone();
    lines
}
