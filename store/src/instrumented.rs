//! A container around any [`UserStore`] that adds the same metrics and tracing to every backend.

use std::time::Instant;

use crate::metrics as m;
use crate::{Get, Put, Result, Row, Schema, UserStore};

/// Wraps a backend with metrics: operation durations, cells written and read, errors by kind.
pub struct Instrumented<S> {
    inner: S,
}

impl<S: UserStore> Instrumented<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Instrumented { inner }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn observe<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let r = f();
        let backend = self.inner.backend_name();
        metrics::histogram!(m::OP_DURATION, "backend" => backend, "op" => op)
            .record(start.elapsed().as_secs_f64());
        if let Err(e) = &r {
            metrics::counter!(m::ERRORS, "backend" => backend, "op" => op, "kind" => e.kind().as_str())
                .increment(1);
            tracing::debug!(op, error = %e, "store operation failed");
        }
        r
    }
}

impl<S: UserStore> UserStore for Instrumented<S> {
    fn put(&self, puts: &[Put]) -> Result<()> {
        self.observe("put", || self.inner.put(puts))?;
        let cells: usize = puts.iter().map(|p| p.cells.len()).sum();
        let backend = self.inner.backend_name();
        metrics::counter!(m::WRITE_CELLS, "backend" => backend).increment(cells as u64);
        metrics::counter!(m::WRITE_ROWS, "backend" => backend).increment(puts.len() as u64);
        Ok(())
    }

    fn get(&self, get: &Get) -> Result<Option<Row>> {
        let r = self.observe("get", || self.inner.get(get))?;
        let n = r.as_ref().map_or(0, |r| r.cells.len());
        metrics::histogram!(m::READ_CELLS, "backend" => self.inner.backend_name()).record(n as f64);
        Ok(r)
    }

    fn delete_row(&self, row: &str) -> Result<()> {
        self.observe("delete_row", || self.inner.delete_row(row))
    }

    fn scan(&self, start_after: Option<&str>, limit: usize, template: &Get) -> Result<Vec<Row>> {
        self.observe("scan", || self.inner.scan(start_after, limit, template))
    }

    fn flush(&self) -> Result<()> {
        self.observe("flush", || self.inner.flush())
    }

    fn schema(&self) -> &Schema {
        self.inner.schema()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}
