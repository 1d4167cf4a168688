//! The rows keyspace's format marker: a new database is marked with this build's format, an
//! older mark is raised, and a database marked by a newer build is refused at open with an error
//! naming both formats (instead of its rows being misread).

use dmp_store::embedded::{open_temp, EmbeddedDatabase, ROWS_FORMAT};
use dmp_store::StoreError;

const META: &str = "store.meta";
const FORMAT_KEY: &[u8] = b"rows.format";

fn mark(db: &EmbeddedDatabase) -> Option<u32> {
    let meta = db.keyspace(META).unwrap();
    meta.get(FORMAT_KEY)
        .unwrap()
        .map(|v| u32::from_be_bytes(v[..].try_into().unwrap()))
}

fn set_mark(db: &EmbeddedDatabase, format: u32) {
    let meta = db.keyspace(META).unwrap();
    meta.insert(FORMAT_KEY, format.to_be_bytes()).unwrap();
}

#[test]
fn given_a_new_database_when_opened_then_marked_with_this_builds_format() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _store) = open_temp(dir.path()).unwrap();
    assert_eq!(mark(&db), Some(ROWS_FORMAT));
}

#[test]
fn given_an_older_mark_when_opened_then_it_opens_and_the_mark_is_raised() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, store) = open_temp(dir.path()).unwrap();
        set_mark(&db, 1);
        drop(store);
    }
    let (db, _store) = open_temp(dir.path()).unwrap();
    assert_eq!(mark(&db), Some(ROWS_FORMAT));
}

#[test]
fn given_a_newer_mark_when_opened_then_refused_naming_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, store) = open_temp(dir.path()).unwrap();
        set_mark(&db, ROWS_FORMAT + 1);
        drop(store);
    }
    let err = match open_temp(dir.path()) {
        Ok(_) => panic!("a database of a newer format opened"),
        Err(e) => e,
    };
    assert!(
        matches!(err, StoreError::NewerFormat { found, supported }
            if found == ROWS_FORMAT + 1 && supported == ROWS_FORMAT),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("format {}", ROWS_FORMAT + 1)) && text.contains("newer dmp"),
        "{text}"
    );
}

#[test]
fn given_a_malformed_mark_when_opened_then_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, store) = open_temp(dir.path()).unwrap();
        let meta = db.keyspace(META).unwrap();
        meta.insert(FORMAT_KEY, b"x".to_vec()).unwrap();
        drop(store);
    }
    match open_temp(dir.path()) {
        Ok(_) => panic!("a database with a malformed mark opened"),
        Err(e) => assert!(
            matches!(e, StoreError::Corrupt { ref reason, .. } if reason.contains("1 bytes")),
            "{e}"
        ),
    }
}
