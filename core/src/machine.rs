//! What the machine gives this process: its memory, or less where the process's control group
//! (a container's memory limit) allows less. Read by `dmp run` (`memory.pretouch_mb` may not
//! ask for more) and by the loadtest (a drive made ahead may not need more than half).

/// Bytes in a MiB.
const MIB: u64 = 1 << 20;

/// The memory this process may use in MiB: the machine's (`/proc/meminfo`), or less when its
/// control group allows less. None where neither says.
pub fn memory_mb() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024)
        });
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let limits = limit_files(&groups).into_iter().filter_map(|file| {
        let bytes: u64 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
        Some(bytes / MIB)
    });
    total.into_iter().chain(limits).min()
}

/// The files holding the memory limits of the cgroups in `proc_self_cgroup` (the text of
/// `/proc/self/cgroup`): "0::/path" is cgroup v2 (`memory.max`; its "max", no limit, does not
/// parse as a number), "N:memory:/path" v1 (`memory.limit_in_bytes`; no limit is a number larger
/// than any machine's memory). In a container with its own cgroup namespace the path is "/".
fn limit_files(proc_self_cgroup: &str) -> Vec<String> {
    proc_self_cgroup
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            let path = path.trim_end_matches('/');
            match controllers {
                "" => Some(format!("/sys/fs/cgroup{path}/memory.max")),
                c if c.split(',').any(|c| c == "memory") => {
                    Some(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
                }
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_cgroups_v1_and_v2_when_read_then_their_memory_limit_files_are_named() {
        let v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpu,cpuacct:/x\n0::/\n";
        assert_eq!(
            limit_files(v1),
            [
                "/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory.max"
            ]
        );
        assert_eq!(
            limit_files("0::/system.slice/dmp.service\n"),
            ["/sys/fs/cgroup/system.slice/dmp.service/memory.max"]
        );
        assert!(limit_files("").is_empty());
    }

    #[test]
    fn given_linux_then_the_memory_is_known_and_at_most_the_machines() {
        let mb = memory_mb().expect("Linux has /proc/meminfo");
        let text = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert!(mb > 0 && mb <= kib / 1024, "{mb} MiB of {kib} KiB");
    }
}
