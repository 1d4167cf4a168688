//! `dmp-core`: the model every dmp role shares.
//!
//! - [`event`]: the public JSON ingest format and its validation (errors name the bad field);
//! - [`cell`]: cells and rows of the HBase-style wide-column model (row = user);
//! - [`segment`]: the segment record published on `dmp.segments`;
//! - [`partition`]: Kafka-compatible murmur2 partitioning of uids;
//! - [`config`]: layered configuration (built-in defaults, `--config FILE`, `DMP__A__B` env vars);
//! - [`error`]: the small error kinds used as metric labels;
//! - [`telemetry`]: tracing and Prometheus metrics initialisation;
//! - [`clock`]: wall-clock helpers in epoch milliseconds;
//! - [`priority`]: raising a thread's nice value (background work, segmenter workers).

pub mod cell;
pub mod clock;
pub mod config;
pub mod error;
pub mod event;
pub mod health;
pub mod machine;
pub mod partition;
pub mod priority;
pub mod segment;
pub mod telemetry;

pub use cell::{Cell, Projection, Row};
pub use config::Config;
pub use error::ErrorKind;
pub use event::{Event, EventError};
pub use partition::{murmur2, partition_for_key};
pub use segment::{DeadLetter, SegmentUpdate, UserChange};
