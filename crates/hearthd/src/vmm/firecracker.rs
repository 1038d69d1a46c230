//! Firecracker over its HTTP API on a Unix socket (swagger spec:
//! `src/firecracker/swagger/firecracker.yaml`, v1.16). Works the same
//! against `hearth-testvmm`, which serves the same API.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_api::client::{HttpMethod, UnixConnection};
use serde_json::json;

use super::{Api, ApiCall, Backend, InstanceInfo, VmmError};

/// Firecracker (or anything serving its API) at `binary`.
#[derive(Debug, Clone)]
pub struct Firecracker {
    binary: PathBuf,
}

impl Firecracker {
    /// A backend that runs `binary`.
    pub fn new(binary: PathBuf) -> Self {
        Firecracker { binary }
    }
}

/// Method, path and body of a call.
pub fn request_of(call: &ApiCall) -> (&'static str, String, serde_json::Value) {
    match call {
        ApiCall::Logger { log_path } => (
            "PUT",
            "/logger".into(),
            json!({"log_path": log_path, "level": "Info", "show_level": true, "show_log_origin": false}),
        ),
        ApiCall::Metrics { metrics_path } => (
            "PUT",
            "/metrics".into(),
            json!({"metrics_path": metrics_path}),
        ),
        ApiCall::MachineConfig { vcpus, memory_mib } => (
            "PUT",
            "/machine-config".into(),
            json!({"vcpu_count": vcpus, "mem_size_mib": memory_mib, "smt": false}),
        ),
        ApiCall::BootSource {
            kernel,
            boot_args,
            initrd,
        } => {
            let mut body = json!({"kernel_image_path": kernel, "boot_args": boot_args});
            if let Some(i) = initrd {
                body["initrd_path"] = json!(i);
            }
            ("PUT", "/boot-source".into(), body)
        }
        ApiCall::Drive {
            id,
            path,
            is_root,
            read_only,
        } => (
            "PUT",
            format!("/drives/{id}"),
            json!({"drive_id": id, "path_on_host": path, "is_root_device": is_root, "is_read_only": read_only}),
        ),
        ApiCall::NetworkInterface { id, tap, mac } => (
            "PUT",
            format!("/network-interfaces/{id}"),
            json!({"iface_id": id, "host_dev_name": tap, "guest_mac": mac}),
        ),
        ApiCall::InstanceStart => (
            "PUT",
            "/actions".into(),
            json!({"action_type": "InstanceStart"}),
        ),
        ApiCall::SendCtrlAltDel => (
            "PUT",
            "/actions".into(),
            json!({"action_type": "SendCtrlAltDel"}),
        ),
    }
}

#[derive(Debug)]
struct Session {
    conn: UnixConnection,
}

fn fault(call: &'static str, status: u16, body: &[u8]) -> VmmError {
    let fault_message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    VmmError::Fault {
        call,
        status,
        fault_message,
    }
}

#[async_trait]
impl Api for Session {
    async fn call(&mut self, call: &ApiCall) -> Result<(), VmmError> {
        let (method, path, body) = request_of(call);
        let method = HttpMethod::from_bytes(method.as_bytes()).unwrap_or(HttpMethod::PUT);
        let resp = self
            .conn
            .send(method, &path, Some(body.to_string().into_bytes()))
            .await
            .map_err(|source| VmmError::Transport {
                call: call.name(),
                source,
            })?;
        if resp.status.is_success() {
            Ok(())
        } else {
            Err(fault(call.name(), resp.status.as_u16(), &resp.body))
        }
    }

    async fn info(&mut self) -> Result<InstanceInfo, VmmError> {
        const CALL: &str = "GET /";
        let resp = self
            .conn
            .send(HttpMethod::GET, "/", None)
            .await
            .map_err(|source| VmmError::Transport { call: CALL, source })?;
        if !resp.status.is_success() {
            return Err(fault(CALL, resp.status.as_u16(), &resp.body));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&resp.body).map_err(|e| VmmError::BadAnswer {
                call: CALL,
                detail: e.to_string(),
            })?;
        let field = |k: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or("").to_owned();
        Ok(InstanceInfo {
            state: field("state"),
            vmm_version: field("vmm_version"),
        })
    }
}

#[async_trait]
impl Backend for Firecracker {
    fn command(&self, api_socket: &Path, id: &str) -> (PathBuf, Vec<OsString>) {
        (
            self.binary.clone(),
            vec![
                "--api-sock".into(),
                api_socket.into(),
                "--id".into(),
                id.into(),
            ],
        )
    }

    async fn connect(
        &self,
        api_socket: &Path,
        timeout: Duration,
        alive: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Box<dyn Api>, VmmError> {
        let start = Instant::now();
        // Firecracker binds its socket within a couple of milliseconds of
        // exec; poll at the timer's resolution rather than watch the dir.
        loop {
            match UnixConnection::connect(api_socket).await {
                Ok(conn) => return Ok(Box::new(Session { conn })),
                Err(e) => {
                    if !alive() {
                        return Err(VmmError::DiedEarly {
                            socket: api_socket.to_owned(),
                        });
                    }
                    if start.elapsed() >= timeout {
                        return Err(VmmError::NotReady {
                            socket: api_socket.to_owned(),
                            waited_ms: start.elapsed().as_millis() as u64,
                            source: Some(e),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_the_swagger_spec() {
        let (m, p, b) = request_of(&ApiCall::MachineConfig {
            vcpus: 2,
            memory_mib: 256,
        });
        assert_eq!((m, p.as_str()), ("PUT", "/machine-config"));
        assert_eq!(b["vcpu_count"], 2);
        assert_eq!(b["mem_size_mib"], 256);
        let (_, p, b) = request_of(&ApiCall::Drive {
            id: "rootfs".into(),
            path: "/x".into(),
            is_root: true,
            read_only: false,
        });
        assert_eq!(p, "/drives/rootfs");
        assert_eq!(b["drive_id"], "rootfs");
        assert_eq!(b["is_root_device"], true);
        let (_, _, b) = request_of(&ApiCall::BootSource {
            kernel: "/k".into(),
            boot_args: "console=ttyS0".into(),
            initrd: None,
        });
        assert!(b.get("initrd_path").is_none());
        let (_, p, b) = request_of(&ApiCall::InstanceStart);
        assert_eq!(p, "/actions");
        assert_eq!(b["action_type"], "InstanceStart");
    }

    #[test]
    fn fault_message_is_extracted() {
        let e = fault("InstanceStart", 400, br#"{"fault_message":"no kernel"}"#);
        assert_eq!(
            e.to_string(),
            "VMM refused InstanceStart (HTTP 400): no kernel"
        );
        let e = fault("x", 500, b"plain");
        assert!(e.to_string().ends_with("plain"));
    }
}
