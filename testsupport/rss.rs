//! Shared by the tests of memory (included with `#[path]`): a process's resident size as Linux
//! reports it in `/proc/…/status`.

/// The resident size (`VmRSS`) of process `pid`, or of this process with None, in MiB.
pub fn rss_mb(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(&path).expect("Linux reports a process's status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib / 1024
}
