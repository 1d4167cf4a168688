//! Shared by the tests of thread priorities (included with `#[path]`): a thread's name and nice
//! value as Linux reports them in `/proc/…/stat`.
#![allow(dead_code)] // each including test uses its part

/// (thread name, nice value) of a thread's `/proc/…/stat` line.
pub fn name_and_nice(stat: &str) -> (String, i64) {
    let (open, close) = (
        stat.find('(').expect("a name in parentheses"),
        stat.rfind(')').expect("a name in parentheses"),
    );
    // After the name: state is field 3 of the line, nice field 19.
    let nice = stat[close + 2..]
        .split(' ')
        .nth(16)
        .expect("19 fields")
        .parse()
        .expect("a nice value");
    (stat[open + 1..close].to_string(), nice)
}

/// The nice value of a thread's `/proc/…/stat` line.
pub fn nice_of(stat: &str) -> i64 {
    name_and_nice(stat).1
}

/// The calling thread's nice value.
pub fn own_nice() -> i64 {
    nice_of(&std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat"))
}
