//! `dmp-loadtest`: realistic traffic and measurement.
//!
//! Built so far: [`generator`], synthetic traffic with known ground truth (the generator behind
//! `dmp run --demo`).
//!
//! Not built yet (loadtest issue): scenario files, partner-file bursts and the daily curve, the
//! open-loop drivers, the measurements against the ground truth, and the report with charts under
//! `loadtest/runs/`. Today's measurements are the benches of each crate (docs/benchmarks.md).

pub mod generator;
