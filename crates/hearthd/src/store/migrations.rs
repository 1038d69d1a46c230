//! Versioned schema migrations, applied in order at open.
//!
//! `schema_version` holds one row: the version the file is at. Each entry of
//! [`MIGRATIONS`] takes the schema from its index to index + 1 and runs in
//! the same transaction as the version bump, so a crash mid-migration
//! leaves the previous version intact. A file at a version this binary
//! does not know is refused, never altered.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::{StoreError, sql};

const MIGRATIONS: &[&str] = &[
    // 0 → 1: VMs and their event log.
    "CREATE TABLE vms (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        spec        TEXT NOT NULL,
        state       TEXT NOT NULL,
        generation  INTEGER NOT NULL,
        runtime     TEXT NOT NULL DEFAULT '{}',
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        last_error  TEXT
     ) STRICT;
     CREATE TABLE events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id       TEXT NOT NULL,
        at          INTEGER NOT NULL,
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        generation  INTEGER NOT NULL,
        reason      TEXT NOT NULL
     ) STRICT;
     CREATE INDEX events_by_vm ON events (vm_id, seq);",
    // 1 → 2: the tap pool. A row exists before its kernel tap is created
    // and is deleted only after the tap is gone; `vm_id` is NULL for an
    // idle tap. Tap hth<idx> owns the idx-th subnet of the address pool.
    "CREATE TABLE taps (
        name        TEXT PRIMARY KEY NOT NULL,
        idx         INTEGER NOT NULL UNIQUE,
        vm_id       TEXT UNIQUE
     ) STRICT;",
    // 2 → 3: events that are not state changes (teardown and sweep
    // actions). Older rows are all transitions.
    "ALTER TABLE events ADD COLUMN kind TEXT NOT NULL DEFAULT 'transition';",
    // 3 → 4: a VM's TTL, as the Unix ms it ends (NULL: none). A column,
    // not part of the runtime JSON: it outlives every start and stop.
    "ALTER TABLE vms ADD COLUMN ttl_deadline_ms INTEGER;",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub(super) fn apply(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(sql("begin migration"))?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL) STRICT")
        .map_err(sql("create schema_version"))?;
    let current: i64 = tx
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()
        .map_err(sql("read schema_version"))?
        .unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(step).map_err(sql("apply migration"))?;
        tracing::info!(from = i, to = i + 1, "store schema migrated");
    }
    tx.execute("DELETE FROM schema_version", [])
        .map_err(sql("write schema_version"))?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES (?1)",
        [SCHEMA_VERSION],
    )
    .map_err(sql("write schema_version"))?;
    tx.commit().map_err(sql("commit migration"))?;
    Ok(())
}
