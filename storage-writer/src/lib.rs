//! `dmp-storage-writer`: events to rows to changed uids. **Empty until the ingest issue.**
//!
//! What will live here: the consumer group `storage-writer` on `dmp.events` that decodes and
//! validates each event (bad ones to `dmp.dead-letter` with the reason), enriches it (IP to
//! integer and geo, user agent to a dictionary id and crawler flag), writes a batch of events'
//! cells in one store batch, emits one `dmp.user-changes` record per distinct uid, and only then
//! stores its offsets. Nothing here behaves yet.
