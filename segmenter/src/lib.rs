//! `dmp-segmenter`: user changes to segments. **Empty until the segmenter and rules issue.**
//!
//! What will live here: the consumer group `segmenter` on `dmp.user-changes`, users sharded by uid
//! hash to one pinned worker per core with its own LRU of last-read times (skip changes already
//! seen) and bot blacklist, whole-row reads, every rule run, segment records published when the
//! set changes, memberships written back to family `s`, and counter updates. Nothing here
//! behaves yet.
