//! The router against the route table and `docs/openapi.json`, and the
//! error mapping, over the fake host.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::config::Config;
use crate::host::fake::FakeProcesses;
use crate::store::Store;
use crate::vmm::fake::FakeVmm;

fn app() -> (tempfile::TempDir, Router) {
    let dir = tempfile::Builder::new()
        .prefix("hearth-test-")
        .tempdir()
        .unwrap();
    let config = Config {
        state_dir: dir.path().join("state"),
        ..Config::default()
    };
    let store = Arc::new(Store::open(&config.db_path()).unwrap());
    let procs = FakeProcesses::new();
    let host = crate::lifecycle::Host {
        procs: Arc::new(procs.clone()),
        net: Arc::new(crate::host::net::fake::FakeNet::new()),
        firewall: Arc::new(crate::host::firewall::fake::FakeFirewall::new()),
        disk: Arc::new(crate::host::disk::fake::FakeDisk::new()),
    };
    let l = Lifecycle::new(
        store,
        config,
        host,
        Arc::new(FakeVmm::new(procs)),
        crate::capability::HostNet { uplink: None },
    );
    (dir, router(l))
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn openapi_routes() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/openapi.json"
    ))
    .expect("docs/openapi.json");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "delete", "patch"] {
            if item.get(method).is_some() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn openapi_document_matches_the_route_table() {
    let table: BTreeSet<_> = hearth_api::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(openapi_routes(), table);
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let (_d, app) = app();
    for (method, path) in openapi_routes() {
        let uri = path.replace("{vm}", "no-such-vm");
        let (status, body) = call(&app, &method, &uri, "{}").await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_ne!(body["code"], "no_route", "{method} {path}");
    }
    let (status, body) = call(&app, "GET", "/v1/nothing", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "no_route");
}

#[tokio::test]
async fn errors_map_to_documented_statuses() {
    let (dir, app) = app();
    let (s, b) = call(&app, "GET", "/v1/vms/ghost", "").await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    assert!(b["message"].as_str().unwrap().contains("ghost"));
    let (s, b) = call(&app, "POST", "/v1/vms", "{not json").await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );
    let k = dir.path().join("k");
    std::fs::write(&k, "k").unwrap();
    let body = |name: &str, vcpus: u8| {
        serde_json::json!({"name": name, "spec": {"vcpus": vcpus, "memory_mib": 128, "kernel": k, "rootfs": k}}).to_string()
    };
    let (s, b) = call(&app, "POST", "/v1/vms", &body("a", 3)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        b["message"].as_str().unwrap().starts_with("invalid vcpus"),
        "{b}"
    );
    let (s, b) = call(&app, "POST", "/v1/vms", &body("a", 1)).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["state"], "created");
    let (s, b) = call(&app, "POST", "/v1/vms", &body("a", 1)).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    let (s, _) = call(&app, "POST", "/v1/vms/a/stop", "").await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, b) = call(&app, "POST", "/v1/vms/a/stop", "{\"bogus\":1}").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, _) = call(&app, "DELETE", "/v1/vms/a", "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, b) = call(&app, "GET", "/v1/health", "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["vms"]["created"], 0);
}
