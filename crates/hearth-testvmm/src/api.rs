//! HTTP request → [`VmmAction`] → HTTP response, as Firecracker's
//! `src/firecracker/src/api_server/parsed_request.rs` and `request/*.rs` do
//! it: same routing table, same parse errors, same status codes, same
//! `{"fault_message": …}` bodies. The VMM never sees HTTP.

use serde_json::json;

use crate::config::{
    ActionBody, ActionType, BlockDeviceConfig, BootSourceConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig,
};
use crate::fclog::{Level, Thread};
use crate::vmm::{Vmm, VmmAction, VmmActionError, VmmData};

/// The methods Firecracker's HTTP server (micro_http) accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl Method {
    /// Parses an HTTP method name; `None` for methods micro_http refuses.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// micro_http's `StatusCode`, only for `RequestError`'s `Debug` output.
#[derive(Debug, Clone, Copy)]
pub enum StatusCode {
    /// 400.
    BadRequest,
}

/// Firecracker's `RequestError`: the request could not be parsed. Its
/// `Debug` form is what Firecracker logs; `Display` is the fault message.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Missing resource id.
    #[error("The ID cannot be empty.")]
    EmptyID,
    /// Any other parse problem.
    #[error("{1}")]
    Generic(StatusCode, String),
    /// Resource id with other characters than alphanumerics and '_'.
    #[error("API Resource IDs can only contain alphanumeric characters and underscores.")]
    InvalidID,
    /// Unknown path for the method.
    #[error("Invalid request method and/or path: {} {}.", .1.as_str(), .0)]
    InvalidPathMethod(String, Method),
    /// Body is not the expected JSON.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    SerdeJson(#[from] serde_json::Error),
}

fn generic(msg: &str) -> RequestError {
    RequestError::Generic(StatusCode::BadRequest, msg.to_owned())
}

fn method_to_error(method: Method) -> RequestError {
    generic(match method {
        Method::Get => "GET request cannot have a body.",
        Method::Put => "Empty PUT request.",
        Method::Patch => "Empty PATCH request.",
        Method::Delete => "Empty Delete request.",
    })
}

fn checked_id(id: Option<&str>) -> Result<&str, RequestError> {
    let id = id.ok_or(RequestError::EmptyID)?;
    if id.is_empty() {
        return Err(RequestError::EmptyID);
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(RequestError::InvalidID);
    }
    Ok(id)
}

/// An action and the deprecation warning its request carried.
#[derive(Debug)]
pub struct ParsedRequest {
    /// What to do.
    pub action: VmmAction,
    /// Set when the request used a deprecated field.
    pub deprecation: Option<&'static str>,
}

impl From<VmmAction> for ParsedRequest {
    fn from(action: VmmAction) -> Self {
        ParsedRequest {
            action,
            deprecation: None,
        }
    }
}

/// Deserializes a body, counting the request and its failure in the
/// metrics as Firecracker does.
fn parse<T: serde::de::DeserializeOwned>(
    vmm: &mut Vmm,
    counter: (&'static str, &'static str),
    body: &[u8],
) -> Result<T, RequestError> {
    vmm.metrics.inc_put(counter.0);
    serde_json::from_slice(body).map_err(|e| {
        vmm.metrics.inc_put(counter.1);
        RequestError::SerdeJson(e)
    })
}

fn not_implemented(method: Method, path: &str) -> Result<ParsedRequest, RequestError> {
    Ok(VmmAction::NotImplemented(format!("{} {path}", method.as_str())).into())
}

/// Turns a request into an action (`ParsedRequest::try_from`). `path` is
/// the request target as sent (query included, as micro_http keeps it).
pub fn parse_request(
    vmm: &mut Vmm,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> Result<ParsedRequest, RequestError> {
    let mut tokens = path.trim_start_matches('/').split_terminator('/');
    let first = tokens.next().unwrap_or("");
    match (method, first, body) {
        (Method::Get, "", None) => {
            vmm.metrics.inc_get("instance_info_count");
            Ok(VmmAction::GetVmInstanceInfo.into())
        }
        (Method::Get, "version", None) => {
            vmm.metrics.inc_get("vmm_version_count");
            Ok(VmmAction::GetVmmVersion.into())
        }
        (Method::Get, "machine-config", None) => {
            vmm.metrics.inc_get("machine_cfg_count");
            Ok(VmmAction::GetVmMachineConfig.into())
        }
        (Method::Get, "balloon" | "mmds", None) => not_implemented(method, path),
        (Method::Get, "vm" | "hotplug", None) => {
            let want = if first == "vm" { "config" } else { "memory" };
            if tokens.next() == Some(want) {
                not_implemented(method, path)
            } else {
                Err(RequestError::InvalidPathMethod(first.to_owned(), method))
            }
        }
        (Method::Get, _, Some(_)) => Err(method_to_error(method)),
        (Method::Put, "actions", Some(body)) => {
            let action: ActionBody = parse(vmm, ("actions_count", "actions_fails"), body)?;
            Ok(match action.action_type {
                ActionType::FlushMetrics => VmmAction::FlushMetrics,
                ActionType::InstanceStart => VmmAction::StartMicroVm,
                ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            }
            .into())
        }
        (Method::Put, "boot-source", Some(body)) => {
            let cfg: BootSourceConfig =
                parse(vmm, ("boot_source_count", "boot_source_fails"), body)?;
            Ok(VmmAction::ConfigureBootSource(cfg).into())
        }
        (Method::Put, "drives", Some(body)) => {
            vmm.metrics.inc_put("drive_count");
            let id =
                checked_id(tokens.next()).inspect_err(|_| vmm.metrics.inc_put("drive_fails"))?;
            let cfg: BlockDeviceConfig = serde_json::from_slice(body).map_err(|e| {
                vmm.metrics.inc_put("drive_fails");
                RequestError::SerdeJson(e)
            })?;
            if id != cfg.drive_id {
                vmm.metrics.inc_put("drive_fails");
                return Err(generic(
                    "The id from the path does not match the id from the body!",
                ));
            }
            Ok(VmmAction::InsertBlockDevice(cfg).into())
        }
        (Method::Put, "logger", Some(body)) => {
            let cfg: LoggerConfig = parse(vmm, ("logger_count", "logger_fails"), body)?;
            Ok(VmmAction::ConfigureLogger(cfg).into())
        }
        (Method::Put, "machine-config", Some(body)) => {
            let cfg: MachineConfig = parse(vmm, ("machine_cfg_count", "machine_cfg_fails"), body)?;
            let deprecation = cfg
                .cpu_template
                .is_some()
                .then_some("PUT /machine-config: cpu_template field is deprecated.");
            Ok(ParsedRequest {
                action: VmmAction::UpdateMachineConfiguration(MachineConfigUpdate::from(cfg)),
                deprecation,
            })
        }
        (Method::Put, "metrics", Some(body)) => {
            let cfg: MetricsConfig = parse(vmm, ("metrics_count", "metrics_fails"), body)?;
            Ok(VmmAction::ConfigureMetrics(cfg).into())
        }
        (Method::Put, "network-interfaces", Some(body)) => {
            vmm.metrics.inc_put("network_count");
            let id =
                checked_id(tokens.next()).inspect_err(|_| vmm.metrics.inc_put("network_fails"))?;
            let cfg: NetworkInterfaceConfig = serde_json::from_slice(body).map_err(|e| {
                vmm.metrics.inc_put("network_fails");
                RequestError::SerdeJson(e)
            })?;
            if id != cfg.iface_id {
                vmm.metrics.inc_put("network_fails");
                return Err(generic(&format!(
                    "The id from the path [{id}] does not match the id from the body [{}]!",
                    cfg.iface_id
                )));
            }
            Ok(VmmAction::InsertNetworkDevice(cfg).into())
        }
        (
            Method::Put,
            "balloon" | "cpu-config" | "pmem" | "serial" | "mmds" | "snapshot" | "vsock"
            | "entropy",
            Some(_),
        ) => not_implemented(method, path),
        (Method::Put, "hotplug", Some(_)) if tokens.next() == Some("memory") => {
            not_implemented(method, path)
        }
        (Method::Put, _, None) => Err(method_to_error(method)),
        (Method::Patch, "machine-config", Some(body)) => {
            let update: MachineConfigUpdate = serde_json::from_slice(body)?;
            if update.is_empty() {
                return Err(method_to_error(method));
            }
            let deprecation = update
                .cpu_template
                .is_some()
                .then_some("PATCH /machine-config: cpu_template field is deprecated.");
            Ok(ParsedRequest {
                action: VmmAction::UpdateMachineConfiguration(update),
                deprecation,
            })
        }
        (Method::Patch, "balloon", _) => not_implemented(method, path),
        (Method::Patch, "drives" | "mmds" | "network-interfaces" | "pmem" | "vm", Some(_)) => {
            not_implemented(method, path)
        }
        (Method::Patch, "hotplug", Some(_)) if tokens.next() == Some("memory") => {
            not_implemented(method, path)
        }
        (Method::Patch, _, None) => Err(method_to_error(method)),
        (Method::Delete, "drives" | "pmem" | "network-interfaces", None) => {
            checked_id(tokens.next())?;
            Ok(VmmAction::HotUnplugDevice.into())
        }
        (Method::Delete, _, Some(_)) => Err(method_to_error(method)),
        (method, unknown, _) => Err(RequestError::InvalidPathMethod(unknown.to_owned(), method)),
    }
}

/// Whether this request is `PUT /actions` with InstanceStart (for fault
/// injection, which must act before the VMM sees the request).
pub fn is_instance_start(method: Method, path: &str, body: Option<&[u8]>) -> bool {
    let first = path.trim_start_matches('/').split_terminator('/').next();
    method == Method::Put
        && first == Some("actions")
        && body
            .and_then(|b| serde_json::from_slice::<ActionBody>(b).ok())
            .is_some_and(|a| a.action_type == ActionType::InstanceStart)
}

/// An HTTP answer, before it becomes a hyper response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
    /// Send `Deprecation: true`.
    pub deprecation: bool,
}

fn fault(message: String) -> Response {
    Response {
        status: 400,
        body: Some(json!({ "fault_message": message }).to_string()),
        deprecation: false,
    }
}

/// `ParsedRequest::convert_to_response`, with its log lines.
fn convert_to_response(vmm: &mut Vmm, outcome: Result<VmmData, VmmActionError>) -> Response {
    const MODULE: &str = "firecracker::api_server::parsed_request";
    let ok = |vmm: &mut Vmm, body: String| {
        vmm.log.log(
            Level::Info,
            Thread::Api,
            MODULE,
            "The request was executed successfully. Status code: 200 OK.",
        );
        Response {
            status: 200,
            body: Some(body),
            deprecation: false,
        }
    };
    match outcome {
        Ok(VmmData::Empty) => {
            vmm.log.log(
                Level::Info,
                Thread::Api,
                MODULE,
                "The request was executed successfully. Status code: 204 No Content.",
            );
            Response {
                status: 204,
                body: None,
                deprecation: false,
            }
        }
        Ok(VmmData::MachineConfiguration(m)) => ok(vmm, to_json(&m)),
        Ok(VmmData::InstanceInformation(i)) => ok(vmm, to_json(&i)),
        Ok(VmmData::VmmVersion(v)) => ok(vmm, json!({ "firecracker_version": v }).to_string()),
        Err(e) => {
            vmm.log.log(
                Level::Error,
                Thread::Api,
                MODULE,
                &format!("Received Error. Status code: 400 Bad Request. Message: {e}"),
            );
            fault(e.to_string())
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // These types serialize infallibly (plain structs with string keys).
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}

/// Firecracker's description of a request for its log
/// (`parsed_request.rs`, `describe`).
fn describe(method: Method, path: &str, body: Option<&[u8]>) -> String {
    let name = format!("{method:?}");
    match (path, body) {
        ("/mmds", Some(_)) | (_, None) => format!("{name} request on {path:?}"),
        ("/cpu-config", Some(_)) => format!(
            "{name} request on {path:?}. To view the CPU template received by the API, \
             configure log-level to DEBUG"
        ),
        (_, Some(b)) => format!(
            "{name} request on {path:?} with body {:?}",
            std::str::from_utf8(b).unwrap_or("inconvertible to UTF-8")
        ),
    }
}

/// What a served request set in motion, beyond its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    None,
    /// InstanceStart succeeded.
    Started,
    /// SendCtrlAltDel succeeded.
    CtrlAltDel,
}

/// Serves one API request against `vmm`: parse, act, answer, and log like
/// Firecracker's API server.
pub fn handle(
    vmm: &mut Vmm,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> (Response, Effect) {
    const MODULE: &str = "firecracker::api_server::parsed_request";
    let description = describe(method, path, body);
    vmm.log.log(
        Level::Info,
        Thread::Api,
        MODULE,
        &format!("The API server received a {description}."),
    );
    match parse_request(vmm, method, path, body) {
        Ok(parsed) => {
            let effect = match parsed.action {
                VmmAction::StartMicroVm => Effect::Started,
                VmmAction::SendCtrlAltDel => Effect::CtrlAltDel,
                _ => Effect::None,
            };
            let outcome = vmm.handle(parsed.action);
            let effect = if outcome.is_ok() {
                effect
            } else {
                Effect::None
            };
            let mut response = convert_to_response(vmm, outcome);
            if let Some(message) = parsed.deprecation {
                vmm.log
                    .log(Level::Warn, Thread::Api, "firecracker::api_server", message);
                response.deprecation = true;
            }
            (response, effect)
        }
        Err(err) => {
            vmm.log.log(
                Level::Error,
                Thread::Api,
                "firecracker::api_server",
                &format!("{err:?}"),
            );
            (fault(err.to_string()), Effect::None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fclog::{Logger, Metrics};

    fn vmm() -> Vmm {
        Vmm::new("t", Logger::silent(), Metrics::default())
    }

    fn call(v: &mut Vmm, m: Method, path: &str, body: Option<&str>) -> (u16, String) {
        let (r, _) = handle(v, m, path, body.map(str::as_bytes));
        (r.status, r.body.unwrap_or_default())
    }

    fn fault_of(body: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["fault_message"].as_str().unwrap().to_owned()
    }

    #[test]
    fn instance_info_and_version() {
        let mut v = vmm();
        let (s, b) = call(&mut v, Method::Get, "/", None);
        assert_eq!(s, 200);
        assert_eq!(
            b,
            format!(
                r#"{{"id":"t","state":"Not started","vmm_version":"{}","app_name":"Firecracker"}}"#,
                crate::VMM_VERSION
            )
        );
        let (s, b) = call(&mut v, Method::Get, "/version", None);
        assert_eq!(
            (s, b),
            (
                200,
                format!(r#"{{"firecracker_version":"{}"}}"#, crate::VMM_VERSION)
            )
        );
    }

    #[test]
    fn routing_errors_match_firecracker() {
        let mut v = vmm();
        let cases: &[(Method, &str, Option<&str>, &str)] = &[
            (
                Method::Get,
                "/nope",
                None,
                "Invalid request method and/or path: GET nope.",
            ),
            (
                Method::Put,
                "/nope",
                Some("{}"),
                "Invalid request method and/or path: PUT nope.",
            ),
            (
                Method::Get,
                "/",
                Some("{}"),
                "GET request cannot have a body.",
            ),
            (Method::Put, "/actions", None, "Empty PUT request."),
            (
                Method::Patch,
                "/machine-config",
                None,
                "Empty PATCH request.",
            ),
            (
                Method::Patch,
                "/machine-config",
                Some("{}"),
                "Empty PATCH request.",
            ),
            (
                Method::Put,
                "/drives",
                Some("{}"),
                "The ID cannot be empty.",
            ),
            (
                Method::Put,
                "/drives/a-b",
                Some("{}"),
                "API Resource IDs can only contain alphanumeric characters and underscores.",
            ),
            (
                Method::Put,
                "/drives/a",
                Some(r#"{"drive_id":"b","is_root_device":false}"#),
                "The id from the path does not match the id from the body!",
            ),
            (
                Method::Put,
                "/network-interfaces/a",
                Some(r#"{"iface_id":"b","host_dev_name":"hth0"}"#),
                "The id from the path [a] does not match the id from the body [b]!",
            ),
            (
                Method::Put,
                "/actions",
                Some(r#"{"action_type":"Reboot"}"#),
                "An error occurred when deserializing the json body of a request: unknown \
                 variant `Reboot`, expected one of `FlushMetrics`, `InstanceStart`, \
                 `SendCtrlAltDel` at line 1 column 23.",
            ),
            (
                Method::Put,
                "/machine-config",
                Some(r#"{"mem_size_mib":128}"#),
                "An error occurred when deserializing the json body of a request: missing \
                 field `vcpu_count` at line 1 column 20.",
            ),
            (
                Method::Put,
                "/boot-source",
                Some(r#"{"kernel_image_path":"/k","foo":1}"#),
                "An error occurred when deserializing the json body of a request: unknown \
                 field `foo`, expected one of `kernel_image_path`, `initrd_path`, `boot_args` \
                 at line 1 column 31.",
            ),
            (
                Method::Put,
                "/actions",
                Some(r#"{"action_type":"SendCtrlAltDel"}"#),
                "The requested operation is not supported before starting the microVM.",
            ),
        ];
        for (m, path, body, want) in cases {
            let (s, b) = call(&mut v, *m, path, *body);
            assert_eq!(s, 400, "{m:?} {path}");
            assert_eq!(fault_of(&b), *want, "{m:?} {path}");
        }
    }

    #[test]
    fn machine_config_validation_and_deprecation() {
        let mut v = vmm();
        let (s, b) = call(
            &mut v,
            Method::Put,
            "/machine-config",
            Some(r#"{"vcpu_count":33,"mem_size_mib":128}"#),
        );
        assert_eq!(s, 400);
        assert_eq!(
            fault_of(&b),
            "Machine config error: The number of vCPUs must be greater than 0, less than 32 \
             and must be 1 or an even number if SMT is enabled."
        );
        let (r, _) = handle(
            &mut v,
            Method::Put,
            "/machine-config",
            Some(br#"{"vcpu_count":2,"mem_size_mib":256,"cpu_template":"T2"}"#),
        );
        assert_eq!((r.status, r.deprecation), (204, true));
        let (s, b) = call(&mut v, Method::Get, "/machine-config", None);
        assert_eq!(s, 200);
        assert_eq!(
            b,
            r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false,"cpu_template":"T2","track_dirty_pages":false,"huge_pages":"None"}"#
        );
        let (s, _) = call(
            &mut v,
            Method::Patch,
            "/machine-config",
            Some(r#"{"smt":true}"#),
        );
        assert_eq!(s, 204);
        let (s, _) = call(
            &mut v,
            Method::Patch,
            "/machine-config",
            Some(r#"{"vcpu_count":3}"#),
        );
        assert_eq!(s, 400);
    }

    #[test]
    fn unimplemented_endpoints_say_so() {
        let mut v = vmm();
        let (s, b) = call(&mut v, Method::Put, "/vsock", Some("{}"));
        assert_eq!(s, 400);
        assert!(
            fault_of(&b).contains("does not implement PUT /vsock"),
            "{b}"
        );
    }

    #[test]
    fn instance_start_detection() {
        let body = br#"{"action_type":"InstanceStart"}"#;
        assert!(is_instance_start(Method::Put, "/actions", Some(body)));
        assert!(!is_instance_start(Method::Put, "/actions", Some(b"{}")));
        assert!(!is_instance_start(Method::Get, "/actions", Some(body)));
    }

    #[test]
    fn description_matches_firecrackers_log() {
        assert_eq!(
            describe(Method::Put, "/actions", Some(br#"{"a":1}"#)),
            r#"Put request on "/actions" with body "{\"a\":1}""#
        );
        assert_eq!(describe(Method::Get, "/", None), r#"Get request on "/""#);
    }
}
