//! `memory.pretouch_mb`: memory faulted in at start and handed to the allocator.
//!
//! A process that grows to its working size takes a page fault for every page it touches first.
//! On a VM whose free memory goes back to the host (virtio-balloon free page reporting, as on
//! the 2-core machines of docs/benchmarks.md), each such fault also waits for the host to back
//! the page: about 2 ms per MiB, against 0.15 ms where the host has it at hand. dmp's caches fill
//! over minutes, so at 100K events/s those faults were about 8% of the process's CPU samples.
//!
//! [`pretouch`] maps the configured size, faults every page in at once (`MADV_POPULATE_WRITE`,
//! transparent huge pages where the system allows them) and gives the range to mimalloc as an
//! arena, which it allocates from before asking the OS for more. mimalloc never returns it
//! (the range is marked pinned). The process starts that much larger and later; the faults it
//! would have taken while serving are taken before it serves.

use std::time::{Duration, Instant};

use dmp_core::config::PRETOUCH_BLOCK_MB;

const MIB: usize = 1 << 20;
/// The range starts on a 2-MiB boundary, so that transparent huge pages can back all of it.
const ALIGN: usize = 2 * MIB;

/// Why memory could not be pretouched.
#[derive(Debug)]
pub enum PretouchError {
    /// More than the machine has (or the process's cgroup allows): faulting it in would end in
    /// the OOM killer.
    TooLarge {
        /// Asked for, MiB.
        asked_mb: u64,
        /// The machine's memory (`MemTotal`), or the cgroup's limit when lower, MiB.
        machine_mb: u64,
    },
    /// The kernel refused the mapping or could not fault it in.
    Os(String),
    /// mimalloc did not take the range.
    Allocator,
}

impl std::fmt::Display for PretouchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PretouchError::TooLarge {
                asked_mb,
                machine_mb,
            } => write!(
                f,
                "memory.pretouch_mb: {asked_mb} MiB is more than this machine's memory \
                 ({machine_mb} MiB, or its cgroup's memory limit when lower)"
            ),
            PretouchError::Os(e) => write!(f, "memory.pretouch_mb: {e}"),
            PretouchError::Allocator => {
                write!(
                    f,
                    "memory.pretouch_mb: the allocator did not take the range"
                )
            }
        }
    }
}

impl std::error::Error for PretouchError {}

/// What [`pretouch`] did.
#[derive(Debug, Clone, Copy)]
pub struct Pretouched {
    /// Faulted in and handed to the allocator, MiB (whole blocks).
    pub mb: u64,
    /// How long faulting it in took.
    pub took: Duration,
}

/// Faults in `mb` MiB (rounded down to whole [`PRETOUCH_BLOCK_MB`] blocks; the config checks it
/// is at least one) and hands them to the allocator. Fails, touching nothing, when `mb` is more
/// than the machine's memory or the limit of the process's cgroup.
pub fn pretouch(mb: u64) -> Result<Pretouched, PretouchError> {
    let mb = mb / PRETOUCH_BLOCK_MB * PRETOUCH_BLOCK_MB;
    if mb == 0 {
        // Less than a block: nothing the allocator could take (the config refuses it).
        return Ok(Pretouched {
            mb,
            took: Duration::ZERO,
        });
    }
    if let Some(machine_mb) = dmp_core::machine::memory_mb() {
        if mb > machine_mb {
            return Err(PretouchError::TooLarge {
                asked_mb: mb,
                machine_mb,
            });
        }
    }
    let size = usize::try_from(mb)
        .ok()
        .and_then(|m| m.checked_mul(MIB))
        .ok_or_else(|| PretouchError::Os(format!("{mb} MiB does not fit the address space")))?;
    let started = Instant::now();
    map_and_hand_over(size)?;
    Ok(Pretouched {
        mb,
        took: started.elapsed(),
    })
}

#[allow(unsafe_code)]
fn map_and_hand_over(size: usize) -> Result<(), PretouchError> {
    use rustix::mm::{madvise, mmap_anonymous, Advice, MapFlags, ProtFlags};
    let os = |what: &str, e: rustix::io::Errno| {
        PretouchError::Os(format!("{what} {} MiB: {e}", size / MIB))
    };
    // SAFETY: a new private anonymous mapping at an address the kernel picks; no existing
    // memory is affected. It is never unmapped: the allocator owns it from here on.
    let base = unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            size + ALIGN,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .map_err(|e| os("cannot map", e))?;
    let start = (base as usize).next_multiple_of(ALIGN) as *mut std::ffi::c_void;
    // SAFETY: `start..start + size` lies inside the mapping just made (`ALIGN` bytes extra).
    unsafe {
        // Only advice: where transparent huge pages are off, the range is faulted in as 4 KiB
        // pages and nothing else changes.
        let _ = madvise(start, size, Advice::LinuxHugepage);
        match madvise(start, size, Advice::LinuxPopulateWrite) {
            Ok(()) => {}
            // Kernels before 5.14 do not know the advice: one write per page does the same.
            Err(rustix::io::Errno::INVAL) => {
                let bytes = start.cast::<u8>();
                for offset in (0..size).step_by(4096) {
                    bytes.add(offset).write_volatile(0);
                }
            }
            Err(e) => return Err(os("cannot fault in", e)),
        }
    }
    let mut arena: libmimalloc_sys::mi_arena_id_t = std::ptr::null_mut();
    // SAFETY: the range is mapped, readable and writable, committed (faulted in), zeroed (fresh
    // anonymous memory, or zeros written), used by nothing else and never unmapped. Pinned:
    // mimalloc neither decommits nor purges it. Not exclusive: every heap may allocate from it.
    let taken = unsafe {
        libmimalloc_sys::mi_manage_os_memory_ex(
            start, size, true, true, true, -1, false, &mut arena,
        )
    };
    if taken {
        Ok(())
    } else {
        Err(PretouchError::Allocator)
    }
}

#[cfg(test)]
#[path = "../../testsupport/rss.rs"]
mod rss;

#[cfg(test)]
mod tests {
    use super::rss;
    use super::*;

    #[test]
    fn given_a_size_when_pretouched_then_it_is_resident_in_whole_blocks() {
        let before = rss::rss_mb(None);
        let done = pretouch(2 * PRETOUCH_BLOCK_MB + 5).unwrap();
        assert_eq!(
            done.mb,
            2 * PRETOUCH_BLOCK_MB,
            "rounded down to whole blocks"
        );
        let grown = rss::rss_mb(None).saturating_sub(before);
        assert!(
            grown >= done.mb - 4,
            "{} MiB pretouched but the resident size grew by {grown} MiB",
            done.mb
        );
        // The allocator goes on working with the range in its arenas.
        let v: Vec<u64> = (0..4_000_000).collect();
        assert_eq!(v.iter().sum::<u64>(), 3_999_999 * 4_000_000 / 2);
    }

    #[test]
    fn given_less_than_a_block_when_pretouched_then_nothing_is_mapped() {
        let done = pretouch(PRETOUCH_BLOCK_MB - 1).unwrap();
        assert_eq!(done.mb, 0);
    }

    #[test]
    fn given_more_than_the_machine_has_when_pretouched_then_it_is_refused_naming_the_key() {
        let machine = dmp_core::machine::memory_mb().expect("Linux has /proc/meminfo");
        let asked = (machine / PRETOUCH_BLOCK_MB + 1) * PRETOUCH_BLOCK_MB;
        let e = pretouch(asked).unwrap_err();
        assert!(matches!(e, PretouchError::TooLarge { .. }), "{e}");
        assert!(e.to_string().starts_with("memory.pretouch_mb: "), "{e}");
    }
}
