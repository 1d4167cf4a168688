//! Error kinds shared by every backend: small, stable, usable as a metric label.

use std::fmt;

/// What kind of failure a backend error is. Used as the `kind` label of error metrics
/// and to decide whether a retry makes sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The thing asked for does not exist (topic, row, group).
    NotFound,
    /// The operation did not finish in time; it may or may not have taken effect.
    Timeout,
    /// The backend cannot be reached now; retrying later may work.
    Unavailable,
    /// The request was refused as invalid; retrying the same request will fail again.
    Rejected,
    /// Anything else: a bug, corruption, an I/O error.
    Internal,
}

impl ErrorKind {
    /// The label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether retrying the same operation later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Timeout | ErrorKind::Unavailable)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
