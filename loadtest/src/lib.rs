//! `dmp-loadtest`: how we and our users know what dmp can take.
//!
//! - [`generator`]: realistic traffic (heavy-tailed users, sessions, Russian and English searches,
//!   real user agents and city IPs, bots, partner dumps, a daily curve); also behind
//!   `dmp run --demo`.
//! - [`oracle`]: the ground truth of the demo rules over the events actually sent, written
//!   independently of dmp's rule engine.
//!
//! With the `runner` feature (the `dmp-loadtest` binary):
//! - [`scenario`]: scenario files under `loadtest/scenarios/`;
//! - [`process`]: the dmp under test as a child process, and its CPU per role and memory from
//!   `/proc`;
//! - [`driver`]: open-loop traffic into the HTTP ingest, straight onto a Kafka bus, or as files
//!   for `dmp import`;
//! - [`measure`]: Prometheus scrapes, event → segment latency from the partner stream, lookups;
//! - [`report`]: `report.json` and PNG charts under `loadtest/runs/<date>-<machine>/`;
//! - [`run`]: one scenario from start to report.

pub mod generator;
pub mod oracle;

#[cfg(feature = "runner")]
pub mod driver;
#[cfg(feature = "runner")]
pub mod measure;
#[cfg(feature = "runner")]
pub mod process;
#[cfg(feature = "runner")]
pub mod report;
#[cfg(feature = "runner")]
pub mod run;
#[cfg(feature = "runner")]
pub mod scenario;
