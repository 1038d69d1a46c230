//! A fake VMM backend for unit tests: records every API call per socket,
//! can be told to fail (or to make the VMM die) at a named call, and, like
//! Firecracker, makes the fake process exit on SendCtrlAltDel.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{Api, ApiCall, Backend, InstanceInfo, VmmError};
use crate::host::fake::FakeProcesses;

#[derive(Debug, Default)]
struct Model {
    calls: Vec<(PathBuf, &'static str)>,
    fail_at: Option<&'static str>,
    fail_connect: bool,
    ignore_ctrl_alt_del: bool,
}

/// The fake backend.
#[derive(Debug, Clone)]
pub struct FakeVmm {
    procs: FakeProcesses,
    inner: Arc<Mutex<Model>>,
}

impl FakeVmm {
    /// A backend whose VMMs live in `procs`.
    pub fn new(procs: FakeProcesses) -> Self {
        FakeVmm {
            procs,
            inner: Arc::default(),
        }
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of every call made so far, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.m().calls.iter().map(|(_, c)| *c).collect()
    }

    /// Makes the call named `name` (see [`ApiCall::name`]) answer 400.
    pub fn fail_at(&self, name: Option<&'static str>) {
        self.m().fail_at = name;
    }

    /// Makes the API socket never become ready.
    pub fn fail_connect(&self, on: bool) {
        self.m().fail_connect = on;
    }

    /// Makes the guest ignore Ctrl-Alt-Del (so stop has to SIGKILL).
    pub fn ignore_ctrl_alt_del(&self, on: bool) {
        self.m().ignore_ctrl_alt_del = on;
    }
}

#[derive(Debug)]
struct FakeSession {
    socket: PathBuf,
    vmm: FakeVmm,
    started: bool,
}

#[async_trait]
impl Api for FakeSession {
    async fn call(&mut self, call: &ApiCall) -> Result<(), VmmError> {
        let pid = self.vmm.procs.pid_with_arg(&self.socket);
        let (fail, ignore_cad) = {
            let mut m = self.vmm.m();
            m.calls.push((self.socket.clone(), call.name()));
            (m.fail_at == Some(call.name()), m.ignore_ctrl_alt_del)
        };
        if fail {
            return Err(VmmError::Fault {
                call: call.name(),
                status: 400,
                fault_message: format!("injected failure at {}", call.name()),
            });
        }
        let Some(pid) = pid else {
            return Err(VmmError::Transport {
                call: call.name(),
                source: hearth_api::client::ClientError::Connect {
                    path: self.socket.clone(),
                    source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
                },
            });
        };
        match call {
            ApiCall::InstanceStart => self.started = true,
            ApiCall::SendCtrlAltDel if !ignore_cad => {
                self.vmm.procs.exit(pid, "exited with status 0")
            }
            _ => {}
        }
        Ok(())
    }

    async fn info(&mut self) -> Result<InstanceInfo, VmmError> {
        Ok(InstanceInfo {
            state: if self.started {
                "Running"
            } else {
                "Not started"
            }
            .into(),
            vmm_version: "fake".into(),
        })
    }
}

#[async_trait]
impl Backend for FakeVmm {
    fn command(&self, api_socket: &Path, id: &str) -> (PathBuf, Vec<OsString>) {
        (
            "fake-vmm".into(),
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
        if !alive() {
            return Err(VmmError::DiedEarly {
                socket: api_socket.to_owned(),
            });
        }
        if self.m().fail_connect {
            return Err(VmmError::NotReady {
                socket: api_socket.to_owned(),
                waited_ms: timeout.as_millis() as u64,
                source: None,
            });
        }
        Ok(Box::new(FakeSession {
            socket: api_socket.to_owned(),
            vmm: self.clone(),
            started: false,
        }))
    }
}
