// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

//! dmp patch (see `DMP-PATCH.md`): work that only frees things, done off the version lock.
//!
//! Garbage collection of old super versions runs under a tree's version history lock, which every
//! write takes (to find the active memtable) and which fjall takes while it holds its journal
//! lock. Dropping an old super version can free a whole sealed memtable (hundreds of thousands of
//! skiplist nodes) and delete table files, and deleting its version file is an `unlink`: on a
//! file system mounted with `discard` each of these waits for the device. Done under the lock,
//! every writer of the database waited for them (stalls of 150-300 ms at each memtable rotation).
//! They go to one background thread instead. If that thread cannot be started or has gone, the
//! work is done in place, as before.

use std::cell::Cell;
use std::sync::mpsc::{channel, SendError, Sender};
use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send + 'static>;

static REAPER: OnceLock<Option<Sender<Job>>> = OnceLock::new();

thread_local! {
    static ON_REAPER: Cell<bool> = const { Cell::new(false) };
}

fn sender() -> Option<&'static Sender<Job>> {
    REAPER
        .get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            std::thread::Builder::new()
                .name("lsm-reaper".into())
                .spawn(move || {
                    ON_REAPER.with(|f| f.set(true));
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Runs `job` on the reaper thread (in order with the jobs before it), or here if there is none.
pub fn defer(job: impl FnOnce() + Send + 'static) {
    let mut job: Job = Box::new(job);
    if let Some(tx) = sender() {
        match tx.send(job) {
            Ok(()) => return,
            Err(SendError(back)) => job = back,
        }
    }
    job();
}

/// Waits until the jobs deferred so far have run. A tree calls it when it is dropped: a job left
/// for later could otherwise delete a table file of the same name that a tree reopened in the
/// same process has written since (recovery numbers new tables after the highest table it keeps,
/// and a compaction whose output was empty can have deleted higher ones).
pub fn drain() {
    let Some(Some(tx)) = REAPER.get() else {
        return; // nothing was ever deferred
    };
    if ON_REAPER.with(Cell::get) {
        return; // the jobs before this one have run
    }
    let (done, wait) = channel::<()>();
    let barrier = move || {
        let _ = done.send(());
    };
    if tx.send(Box::new(barrier)).is_ok() {
        let _ = wait.recv();
    }
}
