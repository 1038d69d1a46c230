//! The daemon's versioned routes, in one table.
//!
//! The router in `hearthd::api` is built from this table and a test checks
//! it against `docs/openapi.json`, so the three cannot drift apart.

/// Every route the daemon serves, as `(method, axum path pattern)`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/version"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{vm}"),
    ("DELETE", "/v1/vms/{vm}"),
    ("POST", "/v1/vms/{vm}/start"),
    ("POST", "/v1/vms/{vm}/stop"),
    ("POST", "/v1/vms/{vm}/kill"),
    ("GET", "/v1/vms/{vm}/console"),
    ("GET", "/v1/vms/{vm}/events"),
    ("GET", "/v1/leaks"),
    ("POST", "/v1/gc"),
    ("GET", "/v1/vms/{vm}/stats"),
    ("POST", "/v1/vms/{vm}/ttl"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/events"),
    // Prometheus scrapes `/metrics` by convention: not versioned.
    ("GET", "/metrics"),
];

/// `/v1/vms/{vm}` for a VM id or name.
pub fn vm(vm: &str) -> String {
    format!("/v1/vms/{vm}")
}

/// `/v1/vms/{vm}/{action}`.
pub fn vm_action(vm: &str, action: &str) -> String {
    format!("/v1/vms/{vm}/{action}")
}

/// `/v1/events?since=<seq>&follow=<bool>[&vm=<vm>]`; `vm` must already be
/// percent-encoded.
pub fn events(since: i64, follow: bool, vm: Option<&str>) -> String {
    let mut uri = format!("/v1/events?since={since}&follow={follow}");
    if let Some(vm) = vm {
        uri.push_str("&vm=");
        uri.push_str(vm);
    }
    uri
}
