//! Thread priorities: raising the calling thread's nice value, so that the scheduler runs other
//! threads first when they contend for the CPU.

/// Raises the calling thread's nice value to `nice` (0..=19; above is read as 19), never lowering
/// it (a process started at a higher nice value keeps it); 0 leaves it alone (a process started at
/// a negative value keeps that too). On Linux a nice value belongs to a thread:
/// `setpriority(PRIO_PROCESS, 0)` changes the caller only, and threads it starts afterwards
/// inherit it. Raising it needs no privilege; if the system refuses, the thread keeps its
/// priority and the refusal is logged with `what` (the threads concerned).
pub fn lower_to(nice: u64, what: &str) {
    if nice == 0 {
        return;
    }
    let nice = i32::try_from(nice.min(19)).unwrap_or(19);
    let current = rustix::process::getpriority_process(None).unwrap_or(0);
    if current >= nice {
        return;
    }
    if let Err(e) = rustix::process::setpriority_process(None, nice) {
        tracing::warn!(nice, error = %e, "cannot lower the priority of {what}");
    }
}

#[cfg(all(test, target_os = "linux"))]
#[path = "../../testsupport/nice.rs"]
mod nice;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::lower_to;
    use super::nice::own_nice;

    #[test]
    fn given_a_nice_value_then_only_the_calling_thread_gets_it_and_it_never_goes_back_down() {
        let outside = own_nice();
        let seen = std::thread::spawn(move || {
            let start = own_nice();
            lower_to(0, "a test thread");
            let after_zero = own_nice();
            lower_to(5, "a test thread");
            let after_five = own_nice();
            lower_to(2, "a test thread");
            let after_two = own_nice();
            lower_to(40, "a test thread");
            (start, after_zero, after_five, after_two, own_nice())
        })
        .join()
        .unwrap();
        let (start, after_zero, after_five, after_two, after_forty) = seen;
        assert_eq!(after_zero, start, "0 leaves the priority alone");
        assert_eq!(after_five, start.max(5));
        assert_eq!(after_two, start.max(5), "never lowered back");
        assert_eq!(after_forty, 19, "above 19 is read as 19");
        assert_eq!(own_nice(), outside, "the test's own thread is untouched");
    }
}
