//! Shared by the kill -9 tests of the bus and the store (included with `#[path]`): runs the test
//! binary's own `crash_child` test as a child process, waits until it has acknowledged writes,
//! lets it run on for a moment it does not choose, SIGKILLs it, and returns every line it printed
//! whole (its acknowledgement log: the independent oracle).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs one crash cycle of `crash_child` on `dir`; returns the child's stdout lines, each ended
/// by its newline: a line the kill cut short (a long acknowledgement goes out in several writes)
/// is left out, as its acknowledgement was never finished.
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
            whole_lines(BufReader::new(out), |l| lines.lock().unwrap().push(l))
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

/// Calls `f` with each line of `out` that its newline ended. `lines()` would also return a last
/// line cut short, without telling.
fn whole_lines(mut out: impl BufRead, mut f: impl FnMut(String)) {
    let mut line = Vec::new();
    while out.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        if line.pop() == Some(b'\n') {
            f(String::from_utf8_lossy(&line).into_owned());
        }
        line.clear();
    }
}

#[test]
fn given_output_cut_short_by_the_kill_then_only_its_whole_lines_count() {
    let mut got = Vec::new();
    whole_lines(&b"ack 1 c0-b1-u0 c0-b1-u1\nack 2 c0-b2-u0 c0-b"[..], |l| {
        got.push(l)
    });
    assert_eq!(got, ["ack 1 c0-b1-u0 c0-b1-u1"]);
    got.clear();
    whole_lines(&b"ack 1 a\n\nack 2 b\n"[..], |l| got.push(l));
    assert_eq!(got, ["ack 1 a", "", "ack 2 b"]);
}
