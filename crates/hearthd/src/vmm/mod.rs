//! The VMM backend: how hearthd spawns and drives a Firecracker process.
//!
//! [`Backend`] says which program to run for a VM and opens an [`Api`]
//! session to it; [`ApiCall`] is the typed list of Firecracker API calls
//! hearth makes, so the lifecycle never builds a URL or a JSON body, and
//! the fake backend in unit tests can record calls and fail at any of them.

pub mod fake;
pub mod firecracker;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Why a VMM call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The API socket did not accept connections in time.
    #[error("VMM API socket {} not ready within {waited_ms} ms", socket.display())]
    NotReady {
        /// The socket.
        socket: PathBuf,
        /// How long was waited.
        waited_ms: u64,
        /// The last connection error.
        #[source]
        source: Option<hearth_api::client::ClientError>,
    },
    /// The VMM process exited before its API socket was ready.
    #[error("VMM exited before its API socket {} was ready", socket.display())]
    DiedEarly {
        /// The socket.
        socket: PathBuf,
    },
    /// The HTTP exchange failed.
    #[error("VMM API call {call} failed")]
    Transport {
        /// Which call.
        call: &'static str,
        /// The client's error.
        #[source]
        source: hearth_api::client::ClientError,
    },
    /// The VMM answered with an error.
    #[error("VMM refused {call} (HTTP {status}): {fault_message}")]
    Fault {
        /// Which call.
        call: &'static str,
        /// HTTP status.
        status: u16,
        /// Firecracker's `fault_message`.
        fault_message: String,
    },
    /// The VMM's answer could not be parsed.
    #[error("unexpected answer to {call}: {detail}")]
    BadAnswer {
        /// Which call.
        call: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// One Firecracker API call hearth makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiCall {
    /// `PUT /logger`.
    Logger {
        /// Log file (must exist).
        log_path: PathBuf,
    },
    /// `PUT /metrics`.
    Metrics {
        /// Metrics file (must exist).
        metrics_path: PathBuf,
    },
    /// `PUT /machine-config`.
    MachineConfig {
        /// vCPUs.
        vcpus: u8,
        /// MiB.
        memory_mib: u32,
    },
    /// `PUT /boot-source`.
    BootSource {
        /// Kernel image.
        kernel: PathBuf,
        /// Command line.
        boot_args: String,
        /// Optional initrd.
        initrd: Option<PathBuf>,
    },
    /// `PUT /drives/{id}`.
    Drive {
        /// Drive id (`rootfs`).
        id: String,
        /// Backing file or device.
        path: PathBuf,
        /// Root device?
        is_root: bool,
        /// Read-only?
        read_only: bool,
    },
    /// `PUT /network-interfaces/{id}`.
    NetworkInterface {
        /// Interface id (`eth0`).
        id: String,
        /// The host tap.
        tap: String,
        /// The guest's MAC.
        mac: String,
    },
    /// `PUT /actions {"action_type":"InstanceStart"}`.
    InstanceStart,
    /// `PUT /actions {"action_type":"SendCtrlAltDel"}`.
    SendCtrlAltDel,
}

impl ApiCall {
    /// A short stable name, for errors, logs and failpoints.
    pub fn name(&self) -> &'static str {
        match self {
            ApiCall::Logger { .. } => "PUT /logger",
            ApiCall::Metrics { .. } => "PUT /metrics",
            ApiCall::MachineConfig { .. } => "PUT /machine-config",
            ApiCall::BootSource { .. } => "PUT /boot-source",
            ApiCall::Drive { .. } => "PUT /drives",
            ApiCall::NetworkInterface { .. } => "PUT /network-interfaces",
            ApiCall::InstanceStart => "InstanceStart",
            ApiCall::SendCtrlAltDel => "SendCtrlAltDel",
        }
    }
}

/// `GET /`: what the VMM says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// `Not started`, `Running`, `Paused`.
    pub state: String,
    /// The VMM's version string.
    pub vmm_version: String,
}

/// A session with one VMM's API.
#[async_trait]
pub trait Api: Send {
    /// Makes one call; 2xx is success, anything else a [`VmmError::Fault`].
    async fn call(&mut self, call: &ApiCall) -> Result<(), VmmError>;
    /// `GET /`.
    async fn info(&mut self) -> Result<InstanceInfo, VmmError>;
}

/// A kind of VMM.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Program and arguments that start a VMM for VM `id` listening on
    /// `api_socket`. The socket path must be one of the arguments: it is
    /// how a VMM is found again when its pid was never recorded.
    fn command(&self, api_socket: &Path, id: &str) -> (PathBuf, Vec<OsString>);

    /// Connects to the API socket, retrying until `timeout` while
    /// `alive()` holds.
    async fn connect(
        &self,
        api_socket: &Path,
        timeout: std::time::Duration,
        alive: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Box<dyn Api>, VmmError>;
}
