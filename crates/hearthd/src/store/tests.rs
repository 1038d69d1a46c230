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
