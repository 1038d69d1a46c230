//! The store: SQLite, the only source of truth for what hearth owns.
//!
//! Every kernel object and process a VM holds is named in its row's runtime
//! JSON before it is created (DESIGN.md, invariant 1), so the store has to
//! be the one durable thing: the daemon's memory is rebuilt from it at
//! start, never the other way round.
//!
//! Writes that change a VM's state are guarded by its generation number:
//! `UPDATE … WHERE generation = ?` fails if anyone moved the VM on since the
//! caller read it, so a late writer (a poller holding an old snapshot, say)
//! can never overwrite a newer state. Every state change appends an event in
//! the same transaction.
//!
//! The connection lives behind a `std::sync::Mutex`: every statement is a
//! few microseconds to a millisecond, far shorter than an async hop would
//! save, and SQLite allows one writer anyway.
//! Statements go through the connection's statement cache, sized to hold
//! them all: each is parsed once, not at every VM operation.
//!
//! The event log is also a stream: after every committed event the store
//! pokes a `tokio::sync::watch` channel ([`Store::subscribe_events`]) with
//! the newest seq. Followers read the events themselves from the table by
//! cursor, so the channel carries no data and cannot overflow: a slow
//! follower never loses an event, and one resuming from a seq continues
//! exactly after it.

mod migrations;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use hearth_api::{Event, EventKind, Runtime, Vm, VmSpec, VmState};
use rusqlite::{Connection, OptionalExtension, Params, params};
use uuid::Uuid;

pub use migrations::SCHEMA_VERSION;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused or failed.
    #[error("database error in {op}")]
    Sqlite {
        /// What the store was doing.
        op: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer hearthd.
    #[error(
        "store {} has schema version {found}, newer than this hearthd knows ({known}); refusing to touch it (upgrade hearthd)",
        path.display()
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Newest version this binary knows.
        known: i64,
    },
    /// Creating the store's directory failed.
    #[error("cannot create store directory {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another VM has this name.
    #[error("a VM named {name:?} already exists")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// No VM with this id.
    #[error("no VM with id {id}")]
    NotFound {
        /// The id.
        id: Uuid,
    },
    /// The VM changed since the caller read it.
    #[error("VM {id} changed concurrently (expected generation {expected})")]
    StaleGeneration {
        /// The VM.
        id: Uuid,
        /// The generation the caller read.
        expected: u64,
    },
    /// Every tap index of the address pool is in use.
    #[error("the address pool is exhausted ({capacity} taps in use)")]
    PoolExhausted {
        /// How many subnets the pool has.
        capacity: u32,
    },
    /// A JSON column could not be written.
    #[error("cannot encode {what}")]
    Encode {
        /// Which column.
        what: &'static str,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

/// `conn.execute`, through the connection's statement cache: SQLite parses
/// each statement once, not at every call.
fn exec(conn: &Connection, stmt: &str, params: impl Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(stmt)?.execute(params)
}

/// `conn.query_row`, through the statement cache.
fn query_row<T>(
    conn: &Connection,
    stmt: &str,
    params: impl Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(stmt)?.query_row(params, f)
}

/// Appends a note (an event that is not a state change: a teardown's or
/// the sweep's action) to VM `vm_id`'s log, stamped with the VM's current
/// state and generation, or `stopped` at generation 0 when it has no row.
/// Returns its seq.
fn insert_note(
    conn: &Connection,
    vm_id: Uuid,
    kind: EventKind,
    reason: &str,
) -> Result<i64, StoreError> {
    exec(
        conn,
        "INSERT INTO events (vm_id, at, from_state, to_state, generation, reason, kind)
         SELECT ?1, ?2, NULL, COALESCE(v.state, 'stopped'), COALESCE(v.generation, 0), ?3, ?4
         FROM (SELECT 1) LEFT JOIN vms v ON v.id = ?1",
        params![vm_id.to_string(), now_ms(), reason, kind.as_str()],
    )
    .map_err(sql("append event"))?;
    Ok(conn.last_insert_rowid())
}

/// One row of `vms`, as read. The JSON columns are kept as parse results so
/// that one corrupt row never stops the daemon: such a VM is reported in
/// state `error` with the parse error, and the others work.
#[derive(Debug, Clone)]
pub struct VmRow {
    /// Primary key.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Parsed spec, or why it could not be parsed.
    pub spec: Result<VmSpec, String>,
    /// State as stored.
    pub state: VmState,
    /// Generation as stored.
    pub generation: u64,
    /// Parsed runtime, or why it could not be parsed.
    pub runtime: Result<Runtime, String>,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms.
    pub updated_at_ms: i64,
    /// Why the last operation failed.
    pub last_error: Option<String>,
    /// Unix ms the VM's TTL ends (see `crate::poller`).
    pub ttl_deadline_ms: Option<i64>,
}

impl VmRow {
    /// The runtime, or an empty one when the stored JSON is corrupt.
    pub fn runtime_or_default(&self) -> Runtime {
        self.runtime.clone().unwrap_or_default()
    }

    /// Why this row cannot be used as stored, if it cannot.
    pub fn corruption(&self) -> Option<String> {
        let mut why = Vec::new();
        if let Err(e) = &self.spec {
            why.push(format!("corrupt spec record: {e}"));
        }
        if let Err(e) = &self.runtime {
            why.push(format!("corrupt runtime record: {e}"));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The API view. A corrupt row is reported in state `error` with the
    /// parse error as its last error.
    pub fn to_api(&self) -> Vm {
        let corruption = self.corruption();
        Vm {
            id: self.id,
            name: self.name.clone(),
            spec: self.spec.clone().unwrap_or_else(|_| VmSpec {
                vcpus: 0,
                memory_mib: 0,
                kernel: PathBuf::new(),
                rootfs: PathBuf::new(),
                initrd: None,
                kernel_args: String::new(),
                capabilities: Vec::new(),
            }),
            state: if corruption.is_some() {
                VmState::Error
            } else {
                self.state
            },
            generation: self.generation,
            runtime: self.runtime_or_default(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            last_error: corruption.or_else(|| self.last_error.clone()),
            ttl_deadline_ms: self.ttl_deadline_ms,
        }
    }
}

/// A state change, applied atomically with its event.
#[derive(Debug)]
pub struct Transition<'a> {
    /// The new state.
    pub to: VmState,
    /// The runtime to store with it (`None`: leave as is).
    pub runtime: Option<&'a Runtime>,
    /// The last error to store (`None`: leave as is; `Some(None)`: clear).
    pub last_error: Option<Option<&'a str>>,
    /// Why, for the event log.
    pub reason: &'a str,
}

/// A tap a teardown gives back to the pool.
#[derive(Debug, Clone, Copy)]
pub struct TapRelease<'a> {
    /// The tap (`hth<idx>`).
    pub name: &'a str,
    /// Whether its row goes too: only once the kernel tap is gone.
    pub delete_row: bool,
}

/// A tap of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapRow {
    /// `hth<idx>`.
    pub name: String,
    /// Its subnet's index in the address pool.
    pub idx: u32,
    /// The VM holding it; `None` when idle.
    pub vm_id: Option<Uuid>,
}

/// The name of the tap with pool index `idx`.
pub fn tap_name(idx: u32) -> String {
    format!("hth{idx}")
}

/// The head of the event log, as followers see it through
/// [`Store::subscribe_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsHead {
    /// The newest event's seq (0 when the log is empty).
    pub last_seq: i64,
    /// The daemon is shutting down: followers should end once caught up.
    pub closed: bool,
}

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    events_head: tokio::sync::watch::Sender<EventsHead>,
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Parsed statements the connection keeps: room for every one the store
/// runs (about 25). rusqlite's default, 16, is fewer, and an LRU cache
/// smaller than the set in use evicts, then re-parses, on every miss.
const STATEMENT_CACHE: usize = 32;

const ROW_COLUMNS: &str = "id, name, spec, state, generation, runtime, created_at, updated_at, last_error, ttl_deadline_ms";

/// A row of `vms` as SQLite returns it, before its JSON is parsed: what
/// [`Store::list`] copies out while it holds the connection.
struct RawRow {
    id: String,
    name: String,
    spec: String,
    state: String,
    generation: i64,
    runtime: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    last_error: Option<String>,
    ttl_deadline_ms: Option<i64>,
}

fn read_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        name: r.get(1)?,
        spec: r.get(2)?,
        state: r.get(3)?,
        generation: r.get(4)?,
        runtime: r.get(5)?,
        created_at_ms: r.get(6)?,
        updated_at_ms: r.get(7)?,
        last_error: r.get(8)?,
        ttl_deadline_ms: r.get(9)?,
    })
}

impl RawRow {
    fn parse(self) -> rusqlite::Result<VmRow> {
        let mut last_error = self.last_error;
        let state = VmState::parse(&self.state).unwrap_or_else(|| {
            last_error = Some(format!("unknown state {:?} in the store", self.state));
            VmState::Error
        });
        Ok(VmRow {
            id: Uuid::parse_str(&self.id).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
            name: self.name,
            spec: serde_json::from_str(&self.spec).map_err(|e| e.to_string()),
            state,
            generation: self.generation as u64,
            runtime: serde_json::from_str(&self.runtime).map_err(|e| e.to_string()),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            last_error,
            ttl_deadline_ms: self.ttl_deadline_ms,
        })
    }
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRow> {
    read_raw(r)?.parse()
}

impl Store {
    /// Opens (creating if needed) the store at `path` and brings its schema
    /// up to date. A schema newer than this binary knows is refused.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(sql("open"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("busy_timeout"))?;
        // WAL: readers never block the writer, and a commit is one append.
        // synchronous=NORMAL: in WAL mode a commit survives any crash of
        // *this process* (the promise hearth makes about the daemon); only
        // a power loss or kernel crash can lose the last commits, and then
        // every tap, rule, loop device and VMM process those commits could
        // have named is gone with the kernel too, while files under a VM
        // dir without a row are found by the orphan sweep. FULL would add an
        // fsync to every journal step of every start for no such case.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("journal_mode"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql("synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql("foreign_keys"))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrations::apply(&mut conn, path)?;
        let last_seq = conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
            .map_err(sql("read last event"))?;
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            events_head: tokio::sync::watch::Sender::new(EventsHead {
                last_seq,
                closed: false,
            }),
        })
    }

    /// Tells followers that events up to `seq` are committed. Called with
    /// the connection still locked, so the seqs announced only grow.
    fn announce(&self, seq: i64) {
        self.events_head.send_if_modified(|h| {
            let newer = seq > h.last_seq;
            h.last_seq = h.last_seq.max(seq);
            newer
        });
    }

    /// A receiver that is marked changed whenever an event is committed
    /// (and when [`Store::close_event_streams`] is called). It carries no
    /// events: read them with [`Store::events`] after a cursor.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<EventsHead> {
        self.events_head.subscribe()
    }

    /// Asks every event follower to end once it has caught up (the daemon
    /// is shutting down and waits for open responses).
    pub fn close_event_streams(&self) {
        self.events_head.send_modify(|h| h.closed = true);
    }

    /// Appends an event that is not a state change (a teardown's or the
    /// sweep's action) to VM `vm_id`'s log, stamped with the VM's current
    /// state and generation; a VM without a row (deleted, or only known to
    /// the sweep) gets `stopped` at generation 0. Returns the event's seq.
    pub fn append_event(
        &self,
        vm_id: Uuid,
        kind: EventKind,
        reason: &str,
    ) -> Result<i64, StoreError> {
        let seq = insert_note(&self.conn(), vm_id, kind, reason)?;
        self.announce(seq);
        Ok(seq)
    }

    /// The newest event's seq (0 when there is none).
    pub fn last_event_seq(&self) -> i64 {
        self.events_head.borrow().last_seq
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (an open transaction is rolled back when dropped), so poisoning
        // carries no information here.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a new VM in state `created`, with its first event.
    pub fn insert_vm(&self, id: Uuid, name: &str, spec: &VmSpec) -> Result<VmRow, StoreError> {
        self.insert_vm_with_ttl(id, name, spec, None)
    }

    /// [`Store::insert_vm`], with a TTL that ends `ttl` after the create
    /// (in the same row write, so a VM never exists without its TTL).
    pub fn insert_vm_with_ttl(
        &self,
        id: Uuid,
        name: &str,
        spec: &VmSpec,
        ttl: Option<std::time::Duration>,
    ) -> Result<VmRow, StoreError> {
        let spec_json = serde_json::to_string(spec).map_err(|source| StoreError::Encode {
            what: "spec",
            source,
        })?;
        let now = now_ms();
        let ttl_deadline_ms =
            ttl.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let inserted = exec(
            &tx,
            "INSERT INTO vms (id, name, spec, state, generation, runtime, created_at, updated_at,
                              ttl_deadline_ms)
             VALUES (?1, ?2, ?3, 'created', 1, '{}', ?4, ?4, ?5)",
            params![id.to_string(), name, spec_json, now, ttl_deadline_ms],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::NameTaken { name: name.into() });
            }
            Err(e) => return Err(sql("insert vm")(e)),
        }
        exec(
            &tx,
            "INSERT INTO events (vm_id, at, from_state, to_state, generation, reason)
             VALUES (?1, ?2, NULL, 'created', 1, 'create')",
            params![id.to_string(), now],
        )
        .map_err(sql("insert event"))?;
        let seq = tx.last_insert_rowid();
        tx.commit().map_err(sql("commit"))?;
        self.announce(seq);
        Ok(VmRow {
            id,
            name: name.to_owned(),
            spec: Ok(spec.clone()),
            state: VmState::Created,
            generation: 1,
            runtime: Ok(Runtime::default()),
            created_at_ms: now,
            updated_at_ms: now,
            last_error: None,
            ttl_deadline_ms,
        })
    }

    /// Sets (or with `None` clears) VM `id`'s TTL deadline. Not a state
    /// change: no generation bump, no event.
    pub fn set_ttl(&self, id: Uuid, deadline_ms: Option<i64>) -> Result<(), StoreError> {
        let changed = exec(
            &self.conn(),
            "UPDATE vms SET ttl_deadline_ms = ?1 WHERE id = ?2",
            params![deadline_ms, id.to_string()],
        )
        .map_err(sql("set ttl"))?;
        if changed == 0 {
            return Err(StoreError::NotFound { id });
        }
        Ok(())
    }

    /// Clears VM `id`'s TTL if it still ends at `deadline_ms`; returns
    /// whether it did. A deadline set anew meanwhile is left alone.
    pub fn clear_ttl_if(&self, id: Uuid, deadline_ms: i64) -> Result<bool, StoreError> {
        let changed = exec(
            &self.conn(),
            "UPDATE vms SET ttl_deadline_ms = NULL WHERE id = ?1 AND ttl_deadline_ms = ?2",
            params![id.to_string(), deadline_ms],
        )
        .map_err(sql("clear ttl"))?;
        Ok(changed == 1)
    }

    /// One VM by id.
    pub fn get(&self, id: Uuid) -> Result<VmRow, StoreError> {
        query_row(
            &self.conn(),
            &format!("SELECT {ROW_COLUMNS} FROM vms WHERE id = ?1"),
            [id.to_string()],
            read_row,
        )
        .optional()
        .map_err(sql("get vm"))?
        .ok_or(StoreError::NotFound { id })
    }

    /// One VM by id or name.
    pub fn find(&self, id_or_name: &str) -> Result<Option<VmRow>, StoreError> {
        query_row(
            &self.conn(),
            &format!("SELECT {ROW_COLUMNS} FROM vms WHERE id = ?1 OR name = ?1"),
            [id_or_name],
            read_row,
        )
        .optional()
        .map_err(sql("find vm"))
    }

    /// Every VM, oldest first. The rows are copied out under the
    /// connection and parsed after it is released: with 1,000 VMs the JSON
    /// is most of the time, and starts wait for the connection.
    pub fn list(&self) -> Result<Vec<VmRow>, StoreError> {
        let raw = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM vms ORDER BY id"))
                .map_err(sql("list vms"))?;
            stmt.query_map([], read_raw)
                .map_err(sql("list vms"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("list vms"))?
        };
        raw.into_iter()
            .map(RawRow::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("list vms"))
    }

    /// Applies a state change if the VM is still at `expected` generation;
    /// returns the new generation. The event is appended in the same
    /// transaction.
    pub fn transition(
        &self,
        id: Uuid,
        expected: u64,
        from: VmState,
        t: Transition<'_>,
    ) -> Result<u64, StoreError> {
        let runtime = t
            .runtime
            .map(serde_json::to_string)
            .transpose()
            .map_err(|source| StoreError::Encode {
                what: "runtime",
                source,
            })?;
        let now = now_ms();
        let next = expected + 1;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let changed = exec(
            &tx,
            "UPDATE vms SET state = ?1, generation = ?2, updated_at = ?3,
                        runtime = COALESCE(?4, runtime),
                        last_error = CASE WHEN ?5 THEN ?6 ELSE last_error END
                 WHERE id = ?7 AND generation = ?8",
            params![
                t.to.as_str(),
                next as i64,
                now,
                runtime,
                t.last_error.is_some(),
                t.last_error.flatten(),
                id.to_string(),
                expected as i64
            ],
        )
        .map_err(sql("update state"))?;
        if changed == 0 {
            return Err(self.missing_or_stale(&tx, id, expected));
        }
        exec(
            &tx,
            "INSERT INTO events (vm_id, at, from_state, to_state, generation, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                id.to_string(),
                now,
                from.as_str(),
                t.to.as_str(),
                next as i64,
                t.reason
            ],
        )
        .map_err(sql("insert event"))?;
        let seq = tx.last_insert_rowid();
        tx.commit().map_err(sql("commit"))?;
        self.announce(seq);
        Ok(next)
    }

    /// Writes a journal step's output without a state change. Guarded by
    /// the generation like a transition, but does not bump it.
    pub fn set_runtime(&self, id: Uuid, expected: u64, rt: &Runtime) -> Result<(), StoreError> {
        let json = serde_json::to_string(rt).map_err(|source| StoreError::Encode {
            what: "runtime",
            source,
        })?;
        let conn = self.conn();
        let changed = exec(
            &conn,
            "UPDATE vms SET runtime = ?1, updated_at = ?2 WHERE id = ?3 AND generation = ?4",
            params![json, now_ms(), id.to_string(), expected as i64],
        )
        .map_err(sql("update runtime"))?;
        if changed == 0 {
            return Err(self.missing_or_stale(&conn, id, expected));
        }
        Ok(())
    }

    /// Removes a VM row if it is still at `expected` generation. Its events
    /// stay: the log is append-only.
    pub fn delete_vm(&self, id: Uuid, expected: u64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let changed = exec(
            &tx,
            "DELETE FROM vms WHERE id = ?1 AND generation = ?2",
            params![id.to_string(), expected as i64],
        )
        .map_err(sql("delete vm"))?;
        if changed == 0 {
            return Err(self.missing_or_stale(&tx, id, expected));
        }
        exec(
            &tx,
            "INSERT INTO events (vm_id, at, from_state, to_state, generation, reason)
             VALUES (?1, ?2, NULL, 'stopped', ?3, 'deleted')",
            params![id.to_string(), now_ms(), expected as i64],
        )
        .map_err(sql("insert event"))?;
        let seq = tx.last_insert_rowid();
        tx.commit().map_err(sql("commit"))?;
        self.announce(seq);
        Ok(())
    }

    fn missing_or_stale(&self, conn: &Connection, id: Uuid, expected: u64) -> StoreError {
        let exists = query_row(
            conn,
            "SELECT 1 FROM vms WHERE id = ?1",
            [id.to_string()],
            |_| Ok(()),
        )
        .optional();
        match exists {
            Ok(Some(())) => StoreError::StaleGeneration { id, expected },
            Ok(None) => StoreError::NotFound { id },
            Err(e) => sql("check vm")(e),
        }
    }

    /// Events of one VM (or all), after `since`, oldest first, at most
    /// `limit`: a cursor read (pass the last seq seen as `since`).
    pub fn events(
        &self,
        vm: Option<Uuid>,
        since: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, vm_id, at, from_state, to_state, generation, reason, kind FROM events
                 WHERE seq > ?1 AND (?2 IS NULL OR vm_id = ?2) ORDER BY seq LIMIT ?3",
            )
            .map_err(sql("list events"))?;
        let rows = stmt
            .query_map(params![since, vm.map(|v| v.to_string()), limit], |r| {
                let vm_id: String = r.get(1)?;
                let from: Option<String> = r.get(3)?;
                let to: String = r.get(4)?;
                Ok(Event {
                    seq: r.get(0)?,
                    vm_id: Uuid::parse_str(&vm_id).unwrap_or_default(),
                    at_ms: r.get(2)?,
                    from: from.as_deref().and_then(VmState::parse),
                    to: VmState::parse(&to).unwrap_or(VmState::Error),
                    generation: r.get::<_, i64>(5)? as u64,
                    reason: r.get(6)?,
                    kind: EventKind::parse(&r.get::<_, String>(7)?),
                })
            })
            .map_err(sql("list events"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("list events"))?;
        Ok(rows)
    }

    /// Reserves a tap for VM `id` — the one it already holds, else an idle
    /// one, else a new row with the lowest free index below `capacity` —
    /// and stores the runtime `fill(name, idx)` returns, all in one
    /// transaction guarded by the VM's generation. The tap's name is thus
    /// in the VM's record before the kernel tap is touched.
    pub fn reserve_tap(
        &self,
        id: Uuid,
        expected: u64,
        capacity: u32,
        fill: impl FnOnce(&str, u32) -> Runtime,
    ) -> Result<(String, u32), StoreError> {
        let vm = id.to_string();
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let held: Option<(String, i64)> = query_row(
            &tx,
            "SELECT name, idx FROM taps WHERE vm_id = ?1",
            [&vm],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql("find tap"))?;
        let idle = || {
            query_row(
                &tx,
                "SELECT name, idx FROM taps WHERE vm_id IS NULL ORDER BY idx LIMIT 1",
                [],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
            .map_err(sql("find idle tap"))
        };
        let (name, idx) = match held {
            Some(t) => t,
            None => match idle()? {
                Some(t) => t,
                None => {
                    let idx = next_free_idx(&tx)?;
                    if idx >= i64::from(capacity) {
                        return Err(StoreError::PoolExhausted { capacity });
                    }
                    let name = tap_name(idx as u32);
                    exec(
                        &tx,
                        "INSERT INTO taps (name, idx, vm_id) VALUES (?1, ?2, NULL)",
                        params![name, idx],
                    )
                    .map_err(sql("insert tap"))?;
                    (name, idx)
                }
            },
        };
        exec(
            &tx,
            "UPDATE taps SET vm_id = ?1 WHERE name = ?2",
            params![vm, name],
        )
        .map_err(sql("reserve tap"))?;
        let rt = fill(&name, idx as u32);
        let json = serde_json::to_string(&rt).map_err(|source| StoreError::Encode {
            what: "runtime",
            source,
        })?;
        let changed = exec(
            &tx,
            "UPDATE vms SET runtime = ?1, updated_at = ?2 WHERE id = ?3 AND generation = ?4",
            params![json, now_ms(), vm, expected as i64],
        )
        .map_err(sql("update runtime"))?;
        if changed == 0 {
            return Err(self.missing_or_stale(&tx, id, expected));
        }
        tx.commit().map_err(sql("commit"))?;
        Ok((name, idx as u32))
    }

    /// The end of a teardown of VM `id`, in one transaction guarded by its
    /// generation: the runtime `rt` (which no longer names what is gone),
    /// the tap given back to the pool (`release`), and the teardown's event
    /// (`note`, when there is one).
    pub fn end_teardown(
        &self,
        id: Uuid,
        expected: u64,
        rt: &Runtime,
        release: Option<TapRelease<'_>>,
        note: Option<&str>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(rt).map_err(|source| StoreError::Encode {
            what: "runtime",
            source,
        })?;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let changed = exec(
            &tx,
            "UPDATE vms SET runtime = ?1, updated_at = ?2 WHERE id = ?3 AND generation = ?4",
            params![json, now_ms(), id.to_string(), expected as i64],
        )
        .map_err(sql("update runtime"))?;
        if changed == 0 {
            return Err(self.missing_or_stale(&tx, id, expected));
        }
        if let Some(TapRelease { name, delete_row }) = release {
            let stmt = if delete_row {
                "DELETE FROM taps WHERE name = ?1 AND (vm_id = ?2 OR vm_id IS NULL)"
            } else {
                "UPDATE taps SET vm_id = NULL WHERE name = ?1 AND vm_id = ?2"
            };
            exec(&tx, stmt, params![name, id.to_string()]).map_err(sql("release tap"))?;
        }
        let seq = note
            .map(|reason| insert_note(&tx, id, EventKind::Teardown, reason))
            .transpose()?;
        tx.commit().map_err(sql("commit"))?;
        if let Some(seq) = seq {
            self.announce(seq);
        }
        Ok(())
    }

    /// Adds an idle tap row (pre-warming the pool), before its kernel tap
    /// is created. Returns `None` when the pool is at `capacity`.
    pub fn add_idle_tap(&self, capacity: u32) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let idx = next_free_idx(&tx)?;
        if idx >= i64::from(capacity) {
            return Ok(None);
        }
        let name = tap_name(idx as u32);
        exec(
            &tx,
            "INSERT INTO taps (name, idx, vm_id) VALUES (?1, ?2, NULL)",
            params![name, idx],
        )
        .map_err(sql("insert tap"))?;
        tx.commit().map_err(sql("commit"))?;
        Ok(Some(name))
    }

    /// Deletes an idle tap's row (after its kernel tap is gone).
    pub fn delete_idle_tap(&self, name: &str) -> Result<(), StoreError> {
        exec(
            &self.conn(),
            "DELETE FROM taps WHERE name = ?1 AND vm_id IS NULL",
            [name],
        )
        .map_err(sql("delete tap"))?;
        Ok(())
    }

    /// Every tap of the pool.
    pub fn taps(&self) -> Result<Vec<TapRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT name, idx, vm_id FROM taps ORDER BY idx")
            .map_err(sql("list taps"))?;
        let rows = stmt
            .query_map([], |r| {
                let vm: Option<String> = r.get(2)?;
                Ok(TapRow {
                    name: r.get(0)?,
                    idx: r.get::<_, i64>(1)? as u32,
                    vm_id: vm.and_then(|v| Uuid::parse_str(&v).ok()),
                })
            })
            .map_err(sql("list taps"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("list taps"))?;
        Ok(rows)
    }

    /// How many taps are idle.
    pub fn idle_taps(&self) -> Result<u32, StoreError> {
        query_row(
            &self.conn(),
            "SELECT COUNT(*) FROM taps WHERE vm_id IS NULL",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n as u32)
        .map_err(sql("count idle taps"))
    }

    /// `PRAGMA integrity_check`: `Ok(())` or the problems SQLite lists.
    pub fn integrity_check(&self) -> Result<Result<(), String>, StoreError> {
        let conn = self.conn();
        let out: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(sql("integrity_check"))?;
        Ok(if out == "ok" { Ok(()) } else { Err(out) })
    }

    /// Overwrites one row's runtime column with raw text. Only for tests of
    /// corrupt records.
    #[doc(hidden)]
    pub fn corrupt_runtime_for_test(&self, id: Uuid, raw: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE vms SET runtime = ?1 WHERE id = ?2",
                params![raw, id.to_string()],
            )
            .map_err(sql("corrupt runtime"))?;
        Ok(())
    }
}

/// The lowest tap index no row uses.
fn next_free_idx(conn: &Connection) -> Result<i64, StoreError> {
    // Indexes are dense (0..n) but for the gaps deletes leave: then the
    // next is n, from the count and the index's last entry, without the
    // probe per row the gap search costs (1,000 of them at 1,000 VMs).
    query_row(
        conn,
        "SELECT CASE
            WHEN (SELECT COUNT(*) FROM taps) = (SELECT COALESCE(MAX(idx), -1) + 1 FROM taps)
                THEN (SELECT COUNT(*) FROM taps)
            WHEN NOT EXISTS (SELECT 1 FROM taps WHERE idx = 0) THEN 0
            ELSE (SELECT MIN(t.idx) + 1 FROM taps t
                  WHERE NOT EXISTS (SELECT 1 FROM taps u WHERE u.idx = t.idx + 1)) END",
        [],
        |r| r.get(0),
    )
    .map_err(sql("next tap index"))
}

#[cfg(test)]
mod tests;
