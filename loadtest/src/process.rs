//! The dmp under test: `dmp run` as a child process with the scenario's backends and keys, and
//! what `/proc` says about it (CPU seconds per role, from thread names, and peak memory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::scenario::Scenario;

/// A running `dmp run`.
pub struct DmpProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// From spawn to `/readyz` answering 200.
    pub cold_start: Duration,
    /// The topics' names (unique per run on Kafka, so runs never share a topic).
    pub segments_topic: String,
}

/// Finds the `dmp` binary: `--dmp`, else next to this executable (same cargo target directory).
/// Under `cargo run` (which sets `CARGO`), it first builds `dmp` with the same profile, so the
/// binary under test is never stale.
pub fn find_dmp(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe()?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = me
            .parent()
            .and_then(|d| d.file_name())
            .is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "dmp", "--bin", "dmp"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo build -p dmp")?;
        if !status.success() {
            bail!("cargo build -p dmp failed");
        }
    }
    let candidate = me.with_file_name("dmp");
    if candidate.exists() {
        return Ok(candidate);
    }
    bail!(
        "no dmp binary next to {}: build it (cargo build --release -p dmp) or pass --dmp PATH",
        me.display()
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl DmpProcess {
    /// Starts `dmp run` on a fresh data directory under `dir` with the scenario's backends, the
    /// demo rules, and `extra` configuration keys on top of the scenario's; waits until ready.
    pub async fn start(
        dmp: &Path,
        dir: &Path,
        scenario: &Scenario,
        extra: &[(&str, &str)],
        run_id: &str,
    ) -> anyhow::Result<DmpProcess> {
        std::fs::create_dir_all(dir)?;
        let rules = dir.join("rules.toml");
        std::fs::write(&rules, crate::generator::DEMO_RULES)?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(dmp);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("DMP__SEGMENTER__RULES", &rules)
            .env("DMP__BACKENDS__BUS", &scenario.dmp.bus)
            .env("DMP__BACKENDS__STATS", &scenario.dmp.stats)
            .env("DMP__SPILL__DIR", dir.join("spill"))
            // dmp's log level: warnings, unless DMP_LOADTEST_DMP_LOG says otherwise (a run that
            // looks into a stall can ask for fjall's debug lines, timestamped in dmp.log).
            .env(
                "RUST_LOG",
                std::env::var("DMP_LOADTEST_DMP_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dmp.log"))?);
        let mut segments_topic = "dmp.segments".to_string();
        if scenario.dmp.bus.starts_with("kafka://") {
            // A broker is shared between runs: every topic and group of this run is its own.
            for (key, base) in [
                ("EVENTS", "dmp.events"),
                ("USER_CHANGES", "dmp.user-changes"),
                ("SEGMENTS", "dmp.segments"),
                ("SEGMENTS_CURRENT", "dmp.segments.current"),
                ("SEGMENTS_SHADOW", "dmp.segments.shadow"),
                ("DEAD_LETTER", "dmp.dead-letter"),
            ] {
                let name = format!("{base}.{run_id}");
                if key == "SEGMENTS" {
                    segments_topic = name.clone();
                }
                cmd.env(format!("DMP__TOPICS__{key}"), name);
            }
            cmd.env(
                "DMP__STORAGE_WRITER__GROUP",
                format!("storage-writer.{run_id}"),
            );
            cmd.env("DMP__SEGMENTER__GROUP", format!("segmenter.{run_id}"));
        }
        for (k, v) in scenario
            .dmp
            .config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra.iter().copied())
        {
            cmd.env(format!("DMP__{}", k.to_uppercase().replace('.', "__")), v);
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", dmp.display()))?;
        let http = reqwest::Client::new();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "dmp run exited with {status} before it was ready; see {}",
                    dir.join("dmp.log").display()
                );
            }
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                bail!(
                    "dmp run was not ready within 60 s; see {}",
                    dir.join("dmp.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(DmpProcess {
            cold_start: started.elapsed(),
            child,
            url,
            segments_topic,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the graceful stop (kills after `patience`). Returns whether it
    /// stopped by itself with success.
    pub fn stop(mut self, patience: Duration) -> anyhow::Result<bool> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DmpProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The role a thread of `dmp run` works for, from its name.
pub fn role_of(thread: &str) -> &'static str {
    if thread.starts_with("dmp-segmenter") {
        "segmenter"
    } else if thread.starts_with("dmp-writer") {
        "storage-writer"
    } else if thread.starts_with("dmp-rt") {
        // The API (ingest, lookups, partner stream) and the segmenter's poll loop.
        "api"
    } else if thread.starts_with("fjall")
        || thread == "lsm-reaper"
        || thread == "dmp-db"
        // Its name in builds before fb96684, which `--dmp` can still run side by side.
        || thread == "dmp-fsync"
        || thread == "dmp-bus-retenti"
        || thread == "dmp-row-cache"
    {
        "embedded-storage"
    } else if thread.starts_with("rdk:") || thread == "dmp-kafka-poll" {
        "kafka-client"
    } else if thread == "dmp-stats-redis" {
        "counters"
    } else {
        "other"
    }
}

/// Clock ticks per second of `/proc/*/stat` times (asked of `getconf` once).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds used so far by each role of process `pid`, summed over its threads (threads that
/// ended are in `other` via the process total).
pub fn cpu_by_role(pid: u32) -> BTreeMap<&'static str, f64> {
    role_times(pid).0
}

/// [`cpu_by_role`], and the seconds each role's threads have spent so far runnable but waiting
/// for a CPU (`/proc/<pid>/task/<tid>/schedstat`, its second field; empty where the kernel
/// keeps no such times). A role that waits while it has work could have used more CPU than it
/// got: the machine was full.
pub fn role_times(pid: u32) -> (BTreeMap<&'static str, f64>, BTreeMap<&'static str, f64>) {
    let tick = clock_ticks();
    let mut out: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut waits: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut threads_total = 0.0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            if let Some((comm, secs)) = parse_stat(&stat, tick) {
                let role = role_of(&comm);
                *out.entry(role).or_default() += secs;
                threads_total += secs;
                if let Some(wait) = std::fs::read_to_string(t.path().join("schedstat"))
                    .ok()
                    .and_then(|s| parse_schedstat_wait(&s))
                {
                    *waits.entry(role).or_default() += wait;
                }
            }
        }
    }
    // Threads that already ended count in the process's own total only.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if let Some((_, total)) = parse_stat(&stat, tick) {
            if total > threads_total {
                *out.entry("other").or_default() += total - threads_total;
            }
        }
    }
    (out, waits)
}

/// Seconds runnable but waiting for a CPU, from a `schedstat` line: on-CPU ns, waiting ns,
/// timeslices.
fn parse_schedstat_wait(line: &str) -> Option<f64> {
    let ns: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// (comm, utime + stime in seconds) of a `/proc/…/stat` line.
fn parse_stat(stat: &str, tick: f64) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    // After the comm: state is field 3, utime field 14, stime field 15 (1-based, whole line).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / tick))
}

/// Peak resident memory of `pid` (VmHWM), bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// CPU seconds of this process (the loadtest itself).
pub fn own_cpu() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s, clock_ticks()))
        .map_or(0.0, |(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_spaces_and_parens_in_the_name() {
        let line = "1234 (dmp-rt (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        let (comm, secs) = parse_stat(line, 100.0).unwrap();
        assert_eq!(comm, "dmp-rt (x) y");
        assert!((secs - 3.0).abs() < 1e-9);
    }

    #[test]
    fn schedstat_lines_give_the_time_waiting_for_a_cpu() {
        assert_eq!(parse_schedstat_wait("927961 1500000000 2\n"), Some(1.5));
        assert_eq!(parse_schedstat_wait("927961"), None);
        assert_eq!(parse_schedstat_wait(""), None);
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_by_role(pid).values().sum::<f64>() > 0.0);
        // Where the kernel keeps scheduler times, the roles' waits are there, none negative.
        let (cpu, waits) = role_times(pid);
        if std::path::Path::new("/proc/self/schedstat").exists() {
            assert!(!waits.is_empty());
            assert!(
                waits.keys().all(|r| cpu.contains_key(r)),
                "{waits:?} {cpu:?}"
            );
            assert!(waits.values().all(|w| *w >= 0.0));
        }
        assert!(peak_rss(pid).unwrap() > 1 << 20);
        assert_eq!(role_of("dmp-segmenter-1"), "segmenter");
        assert_eq!(role_of("dmp-writer"), "storage-writer");
        assert_eq!(role_of("lsm-reaper"), "embedded-storage");
        assert_eq!(role_of("dmp-db"), "embedded-storage");
        assert_eq!(role_of("dmp-row-cache"), "embedded-storage");
    }
}
