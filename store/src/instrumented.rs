//! A container around any [`UserStore`] that adds the same metrics and tracing to every backend.

use std::time::Instant;

use crate::metrics as m;
use crate::{Get, Put, Result, Row, Schema, UserStore};

/// Wraps a backend with metrics: operation durations, cells written and read, errors by kind.
///
/// The metric handles are registered once, in [`Instrumented::new`] (looking one up costs a hash
/// of its name and labels, per operation a percent of the segmenter's CPU): install the metrics
/// recorder before wrapping a store.
pub struct Instrumented<S> {
    inner: S,
    metrics: Handles,
}

struct Handles {
    put: metrics::Histogram,
    get: metrics::Histogram,
    get_since: metrics::Histogram,
    delete_row: metrics::Histogram,
    delete_rows: metrics::Histogram,
    scan: metrics::Histogram,
    flush: metrics::Histogram,
    write_cells: metrics::Counter,
    write_rows: metrics::Counter,
    read_cells: metrics::Histogram,
}

impl<S: UserStore> Instrumented<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        let backend = inner.backend_name();
        let op = |op: &'static str| metrics::histogram!(m::OP_DURATION, "backend" => backend, "op" => op);
        let metrics = Handles {
            put: op("put"),
            get: op("get"),
            get_since: op("get_since"),
            delete_row: op("delete_row"),
            delete_rows: op("delete_rows"),
            scan: op("scan"),
            flush: op("flush"),
            write_cells: metrics::counter!(m::WRITE_CELLS, "backend" => backend),
            write_rows: metrics::counter!(m::WRITE_ROWS, "backend" => backend),
            read_cells: metrics::histogram!(m::READ_CELLS, "backend" => backend),
        };
        Instrumented { inner, metrics }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn observe<T>(
        &self,
        op: &'static str,
        duration: &metrics::Histogram,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let r = f();
        duration.record(start.elapsed().as_secs_f64());
        if let Err(e) = &r {
            let backend = self.inner.backend_name();
            metrics::counter!(m::ERRORS, "backend" => backend, "op" => op, "kind" => e.kind().as_str())
                .increment(1);
            tracing::debug!(op, error = %e, "store operation failed");
        }
        r
    }
}

impl<S: UserStore> UserStore for Instrumented<S> {
    fn put(&self, puts: &[Put]) -> Result<()> {
        self.observe("put", &self.metrics.put, || self.inner.put(puts))?;
        let cells: usize = puts.iter().map(|p| p.cells.len()).sum();
        self.metrics.write_cells.increment(cells as u64);
        self.metrics.write_rows.increment(puts.len() as u64);
        Ok(())
    }

    fn get(&self, get: &Get) -> Result<Option<Row>> {
        let r = self.observe("get", &self.metrics.get, || self.inner.get(get))?;
        let n = r.as_ref().map_or(0, |r| r.cells.len());
        self.metrics.read_cells.record(n as f64);
        Ok(r)
    }

    fn get_with_cursor(&self, get: &Get) -> Result<(Option<Row>, Option<crate::ReadCursor>)> {
        let r = self.observe("get", &self.metrics.get, || self.inner.get_with_cursor(get))?;
        let n = r.0.as_ref().map_or(0, |r| r.cells.len());
        self.metrics.read_cells.record(n as f64);
        Ok(r)
    }

    fn get_since(
        &self,
        get: &Get,
        cursor: crate::ReadCursor,
    ) -> Result<Option<(Vec<dmp_core::Cell>, crate::ReadCursor)>> {
        self.observe("get_since", &self.metrics.get_since, || {
            self.inner.get_since(get, cursor)
        })
    }

    fn delete_row(&self, row: &str) -> Result<()> {
        self.observe("delete_row", &self.metrics.delete_row, || {
            self.inner.delete_row(row)
        })
    }

    fn delete_rows(&self, rows: &[&str]) -> Result<()> {
        self.observe("delete_rows", &self.metrics.delete_rows, || {
            self.inner.delete_rows(rows)
        })
    }

    fn scan(&self, start_after: Option<&str>, limit: usize, template: &Get) -> Result<Vec<Row>> {
        self.observe("scan", &self.metrics.scan, || {
            self.inner.scan(start_after, limit, template)
        })
    }

    fn flush(&self) -> Result<()> {
        self.observe("flush", &self.metrics.flush, || self.inner.flush())
    }

    fn schema(&self) -> &Schema {
        self.inner.schema()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}
