//! How an event becomes cells of the user's row. Every cell's version is the event time.
//!
//! | family:qualifier | value |
//! |---|---|
//! | `e:type`, `e:url`, `e:ref`, `e:q`, `e:src` | the field as UTF-8 |
//! | `e:ip` | the address as an integer: 4 bytes (IPv4), 16 (IPv6) or 8 (hashed), big-endian |
//! | `e:geo` | `country/region/city` |
//! | `e:ua` | the user agent's dictionary id, 8 bytes big-endian, then its browser, OS and device class, each ended by a 0 byte ([`crate::enrich::ua_cell`]; rows written before 2026-11-24 hold the parts in cells `e:ua.br`, `e:ua.os`, `e:ua.dev`, which rules still read) |
//! | `e:a.<name>` | each custom attribute |
//! | `m:first_seen` | the event time, 8 bytes; version `i64::MAX - ts`, so the single kept version is the earliest |
//! | `m:crawler` | `1` when the user agent is a known crawler |
//! | `m:written` | the write time (writer's clock), 8 bytes, version = write time; the segmenter's dedupe compares change records against it |
//!
//! The user agent string itself is stored once per distinct agent in the dictionary row
//! [`ua_dictionary_row`] (family `m`, qualifier `ua`).

use std::borrow::Cow;

use bytes::Bytes;
use dmp_core::cell::{FAMILY_EVENTS, FAMILY_META};
use dmp_core::event::EventRef;
use dmp_core::{Cell, Event};
use dmp_store::Put;

use crate::enrich::Enrichment;

/// The row holding a user agent's string under its dictionary id. Its key starts with `\u{1}`,
/// which no uid can (event validation rejects control characters).
pub fn ua_dictionary_row(id: u64) -> String {
    format!("\u{1}dict/ua/{id:016x}")
}

/// The cells of one event (the event's strings move into the cells: no copies).
pub fn event_cells(ev: Event, en: &Enrichment) -> Vec<Cell> {
    event_ref_cells(EventRef::from(ev), &Bytes::new(), en)
}

/// The cells of one event parsed from `buf`: a string the event borrows from `buf` becomes a
/// slice of it, an owned one moves into its cell (and a borrowed one from elsewhere is copied).
/// So the cells of an event read from the bus share one buffer, the record's, instead of a
/// string copied out for each.
pub fn event_ref_cells(ev: EventRef<'_>, buf: &Bytes, en: &Enrichment) -> Vec<Cell> {
    let within = buf.as_ptr_range();
    let value = |s: Cow<'_, str>| match s {
        Cow::Borrowed(b)
            if within.start <= b.as_ptr() && b.as_bytes().as_ptr_range().end <= within.end =>
        {
            buf.slice_ref(b.as_bytes())
        }
        Cow::Borrowed(b) => Bytes::copy_from_slice(b.as_bytes()),
        Cow::Owned(o) => Bytes::from(o.into_bytes()),
    };
    let ts = ev.ts;
    // Five event fields, ip, geo, the user agent, crawler, first_seen, and the writer's
    // `m:written` (pushed later): no growth.
    let mut cells = Vec::with_capacity(11 + ev.attrs.len());
    for (q, v) in [
        ("type", ev.kind),
        ("url", ev.url),
        ("ref", ev.referrer),
        ("q", ev.q),
        ("src", ev.src),
    ] {
        if let Some(v) = v {
            cells.push(Cell::new(FAMILY_EVENTS, q, ts, value(v)));
        }
    }
    if let Some(ip) = &en.ip {
        cells.push(Cell::new(FAMILY_EVENTS, "ip", ts, ip.clone()));
    }
    if let Some(geo) = &en.geo {
        cells.push(Cell::new(
            FAMILY_EVENTS,
            "geo",
            ts,
            geo.clone().into_bytes(),
        ));
    }
    if let Some(ua) = &en.ua {
        cells.push(Cell::new(FAMILY_EVENTS, "ua", ts, ua.cell.clone()));
        if ua.crawler {
            cells.push(Cell::new(FAMILY_META, "crawler", ts, &b"1"[..]));
        }
    }
    for (k, v) in ev.attrs {
        cells.push(Cell::new(
            FAMILY_EVENTS,
            format!("{}{k}", dmp_core::cell::ATTR_PREFIX),
            ts,
            value(v),
        ));
    }
    cells.push(Cell::new(
        FAMILY_META,
        "first_seen",
        i64::MAX - ts,
        ts.to_be_bytes().to_vec(),
    ));
    cells
}

/// The put of one event parsed from `buf` (see [`event_ref_cells`]).
pub fn event_put(ev: EventRef<'_>, buf: &Bytes, en: &Enrichment) -> Put {
    Put {
        row: ev.uid.to_string(),
        cells: event_ref_cells(ev, buf, en),
    }
}

/// The dictionary put of a user agent string.
pub fn ua_dictionary_put(id: u64, ua: &str) -> Put {
    Put {
        row: ua_dictionary_row(id),
        cells: vec![Cell::new(FAMILY_META, "ua", 0, ua.as_bytes().to_vec())],
    }
}

/// The `m:written` cell: when a batch touching the user was written (the same clock and value as
/// the `ts` of the user's change record).
pub fn written_cell(write_time: i64) -> Cell {
    Cell::new(
        FAMILY_META,
        "written",
        write_time,
        write_time.to_be_bytes().to_vec(),
    )
}

/// Reads `m:written` from a row (in HBase order, as read from the store).
pub fn written_of(row: &dmp_core::Row) -> Option<i64> {
    row.latest_in_order(FAMILY_META, "written")
        .filter(|c| c.value.len() == 8)
        .map(|c| i64::from_be_bytes(c.value[..8].try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmp_core::event::EventLimits;

    #[test]
    fn given_an_event_read_from_a_buffer_when_made_cells_then_slices_of_it_as_the_owned_cells() {
        let line = r#"{"uid":"u1","ts":5,"type":"search","q":"a\"b","url":"https://a.example/","src":"web","attrs":{"k":"v"}}"#;
        let buf = Bytes::from(line.as_bytes().to_vec());
        let limits = EventLimits::default();
        let en = Enrichment::default();
        let cells = event_ref_cells(EventRef::parse(&buf, 0, &limits).unwrap(), &buf, &en);
        let owned = event_cells(Event::parse(&buf, 0, &limits).unwrap(), &en);
        assert_eq!(cells, owned);
        let within = |q: &str| {
            let c = cells.iter().find(|c| c.qualifier == q).unwrap();
            buf.as_ptr_range().contains(&c.value.as_ptr())
        };
        assert!(within("url") && within("type") && within("src") && within("a.k"));
        assert!(
            !within("q"),
            "an escaped string is undone into a buffer of its own"
        );
        // An event borrowed from other bytes than `buf` is copied, not sliced.
        let other = EventRef::parse(line.as_bytes(), 0, &limits).unwrap();
        assert_eq!(event_ref_cells(other, &buf, &en), owned);
        let put = event_put(EventRef::parse(&buf, 0, &limits).unwrap(), &buf, &en);
        assert_eq!((put.row.as_str(), put.cells), ("u1", owned));
    }
}
