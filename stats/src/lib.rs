//! `dmp-stats`: segment counters and audience estimates. **Empty until the stats issue.**
//!
//! What will live here: a HyperLogLog byte-compatible with Redis (MurmurHash64A, 16384
//! registers, sparse and dense encodings), the counter trait with `embedded` and `redis` (Lua)
//! backends chosen by URL and one conformance suite, one sketch per (segment, day) under
//! `dmp:hll:<segment>:<yyyymmdd>`, and the audience estimators (union, inclusion-exclusion and a
//! better intersection estimator) behind `GET /v1/audience`. Nothing here behaves yet.
