//! `dmp-loadtest`: realistic traffic and measurement. **Empty until the loadtest issue.**
//!
//! What will live here: the scenario-driven generator (heavy-tailed users, sessions, Russian and
//! English vocabularies, real user agents, bots, partner bursts, a daily curve) that knows the
//! ground truth, the open-loop drivers, and the report with charts under `loadtest/runs/`.
//! Today's measurements are the criterion benches of `dmp-bus` and `dmp-store`
//! (docs/benchmarks.md). Nothing here behaves yet.
