//! The router against the route table and `docs/openapi.json`, and the
//! error mapping, over the fake host.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;

/// The router over the shared fake fixture; the fixture keeps its temp dir
/// alive.
fn app() -> (Fixture, Router) {
    let fx = crate::lifecycle::testkit::env();
    let app = router(fx.l.clone());
    (Fixture(fx), app)
}

/// The fixture, seen as the temp dir the tests make files in.
struct Fixture(crate::lifecycle::testkit::Env);

impl Fixture {
    fn path(&self) -> &std::path::Path {
        self.0._dir.path()
    }
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

#[tokio::test]
async fn stats_and_ttl_routes() {
    let (dir, app) = app();
    let k = dir.path().join("k");
    std::fs::write(&k, "k").unwrap();
    let body = serde_json::json!({"name": "a", "ttl_secs": 60,
        "spec": {"vcpus": 1, "memory_mib": 128, "kernel": k, "rootfs": k}});
    let (s, vm) = call(&app, "POST", "/v1/vms", &body.to_string()).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let deadline = vm["ttl_deadline_ms"].as_i64().unwrap();
    assert_eq!(deadline, vm["created_at_ms"].as_i64().unwrap() + 60_000);

    let (s, st) = call(&app, "GET", "/v1/vms/a/stats", "").await;
    assert_eq!(s, StatusCode::OK, "{st}");
    assert_eq!(
        (st["name"].as_str(), st["state"].as_str()),
        (Some("a"), Some("created"))
    );
    assert!(st["cpu_ms"].is_null() && st["pid"].is_null(), "{st}");
    assert_eq!(st["ttl_deadline_ms"], deadline);
    let (s, all) = call(&app, "GET", "/v1/stats", "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(all.as_array().map(Vec::len), Some(1));

    let (s, b) = call(&app, "POST", "/v1/vms/a/ttl", r#"{"ttl_secs": 0}"#).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );
    let (s, b) = call(&app, "POST", "/v1/vms/a/ttl", r#"{"ttl": 5}"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, vm) = call(&app, "POST", "/v1/vms/a/ttl", r#"{"ttl_secs": null}"#).await;
    assert_eq!(s, StatusCode::OK, "{vm}");
    assert!(vm["ttl_deadline_ms"].is_null());
    let (s, _) = call(&app, "GET", "/v1/vms/ghost/stats", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A GET whose body is left unread (it may be a stream).
async fn get_raw(app: &Router, uri: &str) -> Response {
    let req = Request::builder()
        .method("GET")
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

fn content_type(resp: &Response) -> String {
    resp.headers()["content-type"].to_str().unwrap().to_owned()
}

fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    std::str::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn read_all(resp: Response) -> Vec<u8> {
    resp.into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

fn create_body(dir: &Fixture, name: &str) -> String {
    let k = dir.path().join("k");
    std::fs::write(&k, "k").unwrap();
    serde_json::json!({"name": name, "spec": {"vcpus": 1, "memory_mib": 128, "kernel": k, "rootfs": k}})
        .to_string()
}

#[tokio::test]
async fn events_stream_as_json_lines_from_a_cursor_and_follow() {
    let (dir, app) = app();
    for name in ["a", "b"] {
        let (s, _) = call(&app, "POST", "/v1/vms", &create_body(&dir, name)).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let resp = get_raw(&app, "/v1/events").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(content_type(&resp), "application/x-ndjson");
    let all = json_lines(&read_all(resp).await);
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(
        all.iter()
            .all(|e| e["to"] == "created" && e["kind"] == "transition")
    );
    let first = all[0]["seq"].as_i64().unwrap();
    let last = all[1]["seq"].as_i64().unwrap();
    assert!(first < last);

    // From a cursor, and for one VM (by name).
    let rest =
        json_lines(&read_all(get_raw(&app, &format!("/v1/events?since={first}")).await).await);
    assert_eq!(rest, all[1..]);
    let b = json_lines(&read_all(get_raw(&app, "/v1/events?vm=b").await).await);
    assert_eq!(b, all[1..]);
    let (s, body) = call(&app, "GET", "/v1/events?vm=ghost", "").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    // Following: the response stays open and delivers what happens next.
    let resp = get_raw(&app, &format!("/v1/events?follow=true&since={last}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let waiting = tokio::spawn(async move {
        let frame = body.frame().await;
        (body, frame)
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "nothing new yet: the stream waits");
    let (s, vm) = call(&app, "POST", "/v1/vms/a/start", "").await;
    assert_eq!(s, StatusCode::OK, "{vm}");
    let (mut body, frame) = waiting.await.unwrap();
    let mut seen = json_lines(&frame.unwrap().unwrap().into_data().unwrap());
    while seen.last().unwrap()["to"] != "running" {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .expect("the start's events arrive")
            .unwrap()
            .unwrap();
        seen.extend(json_lines(&frame.into_data().unwrap()));
    }
    let tos: Vec<_> = seen.iter().map(|e| e["to"].as_str().unwrap()).collect();
    assert_eq!(tos, ["starting", "running"]);
    assert!(seen.iter().all(|e| e["vm_id"] == vm["id"]));
}

/// Every sample line of an exposition, `name{labels}` → value.
fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_operations_and_vms_by_state() {
    let (dir, app) = app();
    for name in ["a", "b"] {
        call(&app, "POST", "/v1/vms", &create_body(&dir, name)).await;
    }
    assert_eq!(
        call(&app, "POST", "/v1/vms/a/start", "").await.0,
        StatusCode::OK
    );
    // A refused operation counts as an error.
    assert_eq!(
        call(&app, "POST", "/v1/vms/a/start", "").await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        call(&app, "DELETE", "/v1/vms/b", "").await.0,
        StatusCode::NO_CONTENT
    );

    let resp = get_raw(&app, "/metrics").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(content_type(&resp).starts_with("application/openmetrics-text"));
    let text = String::from_utf8(read_all(resp).await).unwrap();
    let m = samples(&text);
    for (series, want) in [
        (r#"hearth_operations_total{op="create",result="ok"}"#, 2.0),
        (r#"hearth_operations_total{op="start",result="ok"}"#, 1.0),
        (r#"hearth_operations_total{op="start",result="error"}"#, 1.0),
        (r#"hearth_operations_total{op="delete",result="ok"}"#, 1.0),
        (r#"hearth_operations_total{op="stop",result="ok"}"#, 0.0),
        (
            r#"hearth_operation_duration_seconds_count{op="start"}"#,
            2.0,
        ),
        (r#"hearth_vms{state="running"}"#, 1.0),
        (r#"hearth_vms{state="created"}"#, 0.0),
        ("hearth_teardown_failures_total", 0.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series}\n{text}");
    }
    // The VM gauges add up to what the API lists.
    let (_, vms) = call(&app, "GET", "/v1/vms", "").await;
    let total: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("hearth_vms{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, vms.as_array().unwrap().len() as f64);
    // The running VM holds a tap of the pool.
    assert_eq!(
        m.get(r#"hearth_tap_pool_size{state="in_use"}"#),
        Some(&1.0),
        "{text}"
    );

    // Counters move; the gauge follows the store.
    assert_eq!(
        call(&app, "POST", "/v1/vms/a/kill", "").await.0,
        StatusCode::OK
    );
    let m = samples(&String::from_utf8(read_all(get_raw(&app, "/metrics").await).await).unwrap());
    assert_eq!(m[r#"hearth_operations_total{op="kill",result="ok"}"#], 1.0);
    assert_eq!(m[r#"hearth_vms{state="running"}"#], 0.0);
    assert_eq!(m[r#"hearth_vms{state="stopped"}"#], 1.0);
}
