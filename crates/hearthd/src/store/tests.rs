use super::*;

fn spec() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mib: 128,
        kernel: "/k".into(),
        rootfs: "/r".into(),
        initrd: None,
        kernel_args: hearth_api::DEFAULT_KERNEL_ARGS.into(),
        capabilities: vec![],
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::Builder::new()
        .prefix("hearth-test-")
        .tempdir()
        .unwrap();
    let store = Store::open(&dir.path().join("hearth.db")).unwrap();
    (dir, store)
}

#[test]
fn insert_transition_and_events() {
    let (_d, s) = open();
    let id = Uuid::now_v7();
    let row = s.insert_vm(id, "a", &spec()).unwrap();
    assert_eq!(row.generation, 1);
    assert!(matches!(
        s.insert_vm(Uuid::now_v7(), "a", &spec()),
        Err(StoreError::NameTaken { .. })
    ));
    let rt = Runtime {
        pid: Some(42),
        ..Default::default()
    };
    let g = s
        .transition(
            id,
            1,
            VmState::Created,
            Transition {
                to: VmState::Starting,
                runtime: Some(&rt),
                last_error: Some(None),
                reason: "start",
            },
        )
        .unwrap();
    assert_eq!(g, 2);
    let row = s.find("a").unwrap().unwrap();
    assert_eq!(row.state, VmState::Starting);
    assert_eq!(row.runtime.unwrap().pid, Some(42));
    let ev = s.events(Some(id), 0, 100).unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].from, Some(VmState::Created));
    assert_eq!(ev[1].to, VmState::Starting);
    assert_eq!(ev[1].generation, 2);
}

#[test]
fn stale_generation_never_overwrites() {
    let (_d, s) = open();
    let id = Uuid::now_v7();
    s.insert_vm(id, "a", &spec()).unwrap();
    let t = |to| Transition {
        to,
        runtime: None,
        last_error: None,
        reason: "t",
    };
    s.transition(id, 1, VmState::Created, t(VmState::Starting))
        .unwrap();
    // A writer that read generation 1 loses.
    assert!(matches!(
        s.transition(id, 1, VmState::Created, t(VmState::Stopped)),
        Err(StoreError::StaleGeneration { expected: 1, .. })
    ));
    assert!(matches!(
        s.set_runtime(id, 1, &Runtime::default()),
        Err(StoreError::StaleGeneration { .. })
    ));
    assert!(matches!(
        s.delete_vm(id, 1),
        Err(StoreError::StaleGeneration { .. })
    ));
    assert_eq!(s.get(id).unwrap().state, VmState::Starting);
    s.delete_vm(id, 2).unwrap();
    assert!(matches!(s.get(id), Err(StoreError::NotFound { .. })));
    assert!(matches!(
        s.transition(id, 2, VmState::Starting, t(VmState::Stopped)),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn corrupt_runtime_is_reported_not_fatal() {
    let (_d, s) = open();
    let bad = Uuid::now_v7();
    let good = Uuid::now_v7();
    s.insert_vm(bad, "bad", &spec()).unwrap();
    s.insert_vm(good, "good", &spec()).unwrap();
    s.corrupt_runtime_for_test(bad, "{\"pid\": 12, trunc")
        .unwrap();
    let rows = s.list().unwrap();
    assert_eq!(rows.len(), 2);
    let bad_row = rows.iter().find(|r| r.id == bad).unwrap();
    let api = bad_row.to_api();
    assert_eq!(api.state, VmState::Error);
    assert!(api.last_error.unwrap().contains("corrupt runtime record"));
    let good_row = rows.iter().find(|r| r.id == good).unwrap();
    assert_eq!(good_row.to_api().state, VmState::Created);
}

#[test]
fn reopen_keeps_data_and_newer_schema_is_refused() {
    let dir = tempfile::Builder::new()
        .prefix("hearth-test-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("hearth.db");
    let id = Uuid::now_v7();
    Store::open(&path)
        .unwrap()
        .insert_vm(id, "a", &spec())
        .unwrap();
    let s = Store::open(&path).unwrap();
    assert_eq!(s.get(id).unwrap().name, "a");
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
    drop(s);
    let conn = Connection::open(&path).unwrap();
    conn.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(conn);
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("refusing"));
}

#[test]
fn older_schema_is_upgraded() {
    let dir = tempfile::Builder::new()
        .prefix("hearth-test-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("hearth.db");
    // A file from before any migration: only the version table, at 0.
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
         INSERT INTO schema_version VALUES (0);",
    )
    .unwrap();
    drop(conn);
    let s = Store::open(&path).unwrap();
    s.insert_vm(Uuid::now_v7(), "a", &spec()).unwrap();
}

#[test]
fn tap_pool_reserve_release_reuse() {
    let (_d, s) = open();
    let a = Uuid::now_v7();
    let b = Uuid::now_v7();
    s.insert_vm(a, "a", &spec()).unwrap();
    s.insert_vm(b, "b", &spec()).unwrap();
    let fill = |name: &str, _idx: u32| Runtime {
        tap: Some(name.to_owned()),
        ..Default::default()
    };
    let (ta, ia) = s.reserve_tap(a, 1, 4, fill).unwrap();
    assert_eq!((ta.as_str(), ia), ("hth0", 0));
    assert_eq!(
        s.get(a).unwrap().runtime.unwrap().tap.as_deref(),
        Some("hth0")
    );
    // Reserving again returns the tap it holds.
    assert_eq!(s.reserve_tap(a, 1, 4, fill).unwrap().0, "hth0");
    let (tb, _) = s.reserve_tap(b, 1, 4, fill).unwrap();
    assert_eq!(tb, "hth1");
    // Release a's: it becomes idle and is handed to the next VM; the
    // teardown's event is written with it.
    let release = |name, delete_row| Some(TapRelease { name, delete_row });
    let seq = s.last_event_seq();
    s.end_teardown(
        a,
        1,
        &Runtime::default(),
        release("hth0", false),
        Some("removed tap hth0"),
    )
    .unwrap();
    assert_eq!(s.idle_taps().unwrap(), 1);
    assert!(s.get(a).unwrap().runtime.unwrap().tap.is_none());
    let events = s.events(Some(a), seq, 10).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Teardown);
    assert_eq!(events[0].reason, "removed tap hth0");
    let c = Uuid::now_v7();
    s.insert_vm(c, "c", &spec()).unwrap();
    assert_eq!(s.reserve_tap(c, 1, 4, fill).unwrap().0, "hth0");
    // Deleting a row frees its index for a new tap.
    s.end_teardown(b, 1, &Runtime::default(), release("hth1", true), None)
        .unwrap();
    assert_eq!(s.taps().unwrap().len(), 1);
    assert_eq!(s.reserve_tap(b, 1, 4, fill).unwrap().0, "hth1");
    // A stale generation reserves nothing.
    let d = Uuid::now_v7();
    s.insert_vm(d, "d", &spec()).unwrap();
    assert!(matches!(
        s.reserve_tap(d, 7, 4, fill),
        Err(StoreError::StaleGeneration { .. })
    ));
    assert_eq!(s.taps().unwrap().len(), 2);
    // Capacity is enforced.
    assert_eq!(s.add_idle_tap(4).unwrap().as_deref(), Some("hth2"));
    assert_eq!(s.add_idle_tap(4).unwrap().as_deref(), Some("hth3"));
    assert_eq!(s.add_idle_tap(4).unwrap(), None);
    s.reserve_tap(d, 1, 4, fill).unwrap();
    let e = Uuid::now_v7();
    s.insert_vm(e, "e", &spec()).unwrap();
    s.reserve_tap(e, 1, 4, fill).unwrap();
    let f = Uuid::now_v7();
    s.insert_vm(f, "f", &spec()).unwrap();
    assert!(matches!(
        s.reserve_tap(f, 1, 4, fill),
        Err(StoreError::PoolExhausted { capacity: 4 })
    ));
}

#[test]
fn non_transition_events_carry_the_current_state_and_are_read_by_cursor() {
    let (_d, s) = open();
    let id = Uuid::now_v7();
    s.insert_vm(id, "a", &spec()).unwrap();
    s.transition(
        id,
        1,
        VmState::Created,
        Transition {
            to: VmState::Starting,
            runtime: None,
            last_error: None,
            reason: "start",
        },
    )
    .unwrap();
    let seq = s
        .append_event(id, EventKind::Teardown, "removed tap hth0")
        .unwrap();
    assert_eq!(s.last_event_seq(), seq);
    let gone = Uuid::now_v7();
    s.append_event(gone, EventKind::Sweep, "removed orphan tap hth9")
        .unwrap();
    let all = s.events(None, 0, 100).unwrap();
    let kinds: Vec<_> = all
        .iter()
        .map(|e| (e.kind, e.from, e.to, e.generation))
        .collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Transition, None, VmState::Created, 1),
            (
                EventKind::Transition,
                Some(VmState::Created),
                VmState::Starting,
                2
            ),
            (EventKind::Teardown, None, VmState::Starting, 2),
            // No row: stamped stopped at generation 0.
            (EventKind::Sweep, None, VmState::Stopped, 0),
        ]
    );
    // Cursor reads: after a seq, at most `limit`, oldest first.
    let page = s.events(None, all[0].seq, 2).unwrap();
    assert_eq!(page, all[1..3]);
    assert_eq!(s.events(None, all[3].seq, 100).unwrap(), []);
    assert_eq!(s.events(Some(gone), 0, 100).unwrap(), all[3..]);
}

#[tokio::test]
async fn every_committed_event_pokes_the_notifier() {
    let (dir, s) = open();
    let mut rx = s.subscribe_events();
    let before = rx.borrow_and_update().last_seq;
    let id = Uuid::now_v7();
    s.insert_vm(id, "a", &spec()).unwrap();
    assert!(rx.has_changed().unwrap(), "insert_vm");
    let after_insert = rx.borrow_and_update().last_seq;
    assert!(after_insert > before);
    // A waiter is woken by an append made while it waits.
    let waiter = tokio::spawn(async move {
        rx.changed().await.unwrap();
        let seq = rx.borrow_and_update().last_seq;
        (rx, seq)
    });
    tokio::task::yield_now().await;
    let seq = s.append_event(id, EventKind::Teardown, "t").unwrap();
    let (mut rx, seen) = waiter.await.unwrap();
    assert_eq!(seen, seq);
    s.transition(
        id,
        1,
        VmState::Created,
        Transition {
            to: VmState::Starting,
            runtime: None,
            last_error: None,
            reason: "start",
        },
    )
    .unwrap();
    assert!(rx.has_changed().unwrap(), "transition");
    rx.borrow_and_update();
    s.delete_vm(id, 2).unwrap();
    assert!(rx.has_changed().unwrap(), "delete_vm");
    let last = rx.borrow_and_update().last_seq;
    // A failed write announces nothing.
    assert!(s.delete_vm(id, 2).is_err());
    assert!(!rx.has_changed().unwrap());
    s.close_event_streams();
    assert!(rx.borrow_and_update().closed);
    // A reopened store starts from the newest seq on disk.
    drop(s);
    let s = Store::open(&dir.path().join("hearth.db")).unwrap();
    assert_eq!(s.last_event_seq(), last);
}

#[test]
fn new_taps_take_the_lowest_free_index_whether_or_not_there_are_gaps() {
    let (_d, s) = open();
    let add = || s.add_idle_tap(100).unwrap().unwrap();
    // Dense: each new tap comes after the last.
    assert_eq!(
        [add(), add(), add(), add()],
        ["hth0", "hth1", "hth2", "hth3"]
    );
    // Gaps, at the start and in the middle: the lowest is filled first.
    s.delete_idle_tap("hth0").unwrap();
    s.delete_idle_tap("hth2").unwrap();
    assert_eq!([add(), add(), add()], ["hth0", "hth2", "hth4"]);
    // The capacity still bounds it.
    assert_eq!(s.add_idle_tap(5).unwrap(), None);
}
