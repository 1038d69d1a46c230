//! hearthd's API as the bench uses it: one request per connection, as the
//! `hearth` CLI does, through the same `hearth_api::client`. Every VM the
//! bench makes is the case: `nat` plus one `port-forward`, each VM
//! with a host port of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use hearth_api::client::{HttpMethod, request};
use hearth_api::{Health, Vm, VmState};

/// Host ports hearth VMs forward from: `FIRST_PORT..FIRST_PORT + PORTS`,
/// reused round-robin (far more than VMs ever exist at once).
const FIRST_PORT: u32 = 20_000;
const PORTS: u32 = 20_000;

/// How long any one request may take. Every operation the bench asks for
/// answers within a second or two even with 32 clients or 1,000 VMs; one
/// that has not answered after this is hung, and the bench says so instead
/// of waiting for ever.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A request that got no answer within [`TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("{what}: no answer within {TIMEOUT:?} (hearthd hung)")]
pub struct Hung {
    what: String,
}

/// `GET /v1/health`.
pub async fn health(socket: &Path) -> anyhow::Result<Health> {
    let resp = request(socket, HttpMethod::GET, "/v1/health", None).await?;
    if !resp.status.is_success() {
        bail!("GET /v1/health: HTTP {}", resp.status);
    }
    serde_json::from_slice(&resp.body).context("parse the health answer")
}

/// A client of one hearthd that names and numbers the VMs it creates.
#[derive(Debug, Clone)]
pub struct Hearth {
    socket: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    seq: Arc<AtomicU32>,
}

impl Hearth {
    /// A client of the daemon at `socket`; VMs boot `kernel` from a copy of
    /// `rootfs`.
    pub fn new(socket: &Path, kernel: &Path, rootfs: &Path) -> Hearth {
        Hearth {
            socket: socket.to_owned(),
            kernel: kernel.to_owned(),
            rootfs: rootfs.to_owned(),
            seq: Arc::new(AtomicU32::new(0)),
        }
    }

    async fn call(
        &self,
        method: HttpMethod,
        path: &str,
        body: Option<Vec<u8>>,
        want: u16,
    ) -> anyhow::Result<Vec<u8>> {
        let resp = tokio::time::timeout(TIMEOUT, request(&self.socket, method.clone(), path, body))
            .await
            .map_err(|_| Hung {
                what: format!("{method} {path}"),
            })?
            .with_context(|| format!("{method} {path}"))?;
        if resp.status.as_u16() != want {
            bail!(
                "{method} {path}: HTTP {} (wanted {want}): {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
        }
        Ok(resp.body.to_vec())
    }

    /// Creates a VM with `nat` and one `port-forward`; returns its name.
    pub async fn create(&self) -> anyhow::Result<String> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("b{n}");
        let port = FIRST_PORT + n % PORTS;
        // Built as JSON rather than as `CreateVmRequest`, so that optional
        // fields added to the request later (with their defaults) do not
        // touch the bench.
        let req = serde_json::json!({
            "name": name,
            "spec": {
                "vcpus": 1,
                "memory_mib": 128,
                "kernel": self.kernel,
                "rootfs": self.rootfs,
                "capabilities": ["nat", format!("port-forward={port}:80")],
            },
        });
        let body = serde_json::to_vec(&req).context("encode create")?;
        self.call(HttpMethod::POST, "/v1/vms", Some(body), 201)
            .await?;
        Ok(name)
    }

    /// Starts VM `name`; checks the answer says `running`.
    pub async fn start(&self, name: &str) -> anyhow::Result<Vm> {
        let path = hearth_api::routes::vm_action(name, "start");
        let vm: Vm = json(&self.call(HttpMethod::POST, &path, None, 200).await?)?;
        if vm.state != VmState::Running {
            bail!("start of {name} answered state {}", vm.state);
        }
        Ok(vm)
    }

    /// Stops VM `name` (Ctrl-Alt-Del, which the stand-in obeys at once);
    /// checks the answer says `stopped` and that its record names no
    /// process, tap or firewall rule any more.
    pub async fn stop(&self, name: &str) -> anyhow::Result<Vm> {
        let path = hearth_api::routes::vm_action(name, "stop");
        let body = Some(b"{}".to_vec());
        let vm: Vm = json(&self.call(HttpMethod::POST, &path, body, 200).await?)?;
        let rt = &vm.runtime;
        if vm.state != VmState::Stopped
            || rt.pid.is_some()
            || rt.tap.is_some()
            || rt.firewall.is_some()
            || rt.api_socket.is_some()
        {
            bail!(
                "stop of {name} left state {} with runtime {:?}",
                vm.state,
                vm.runtime
            );
        }
        Ok(vm)
    }

    /// Deletes VM `name`.
    pub async fn delete(&self, name: &str) -> anyhow::Result<()> {
        let path = hearth_api::routes::vm(name);
        self.call(HttpMethod::DELETE, &path, None, 204).await?;
        Ok(())
    }

    /// Deletes VM `name` whatever its state (`?force=true`: kills it and
    /// retries its teardown first). The bench's way out of a failed cycle.
    /// Retried a few times: it fails in the same way as what it cleans up
    /// after (a teardown step refused under concurrency).
    pub async fn force_delete(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("{}?force=true", hearth_api::routes::vm(name));
        let mut tries = 0;
        loop {
            match self.call(HttpMethod::DELETE, &path, None, 204).await {
                Ok(_) => return Ok(()),
                Err(e) if tries >= 20 || e.is::<Hung>() => return Err(e),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
    }

    /// Every VM.
    pub async fn list(&self) -> anyhow::Result<Vec<Vm>> {
        json(&self.call(HttpMethod::GET, "/v1/vms", None, 200).await?)
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> anyhow::Result<Health> {
        health(&self.socket).await
    }
}

/// Parses an answer body.
fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> anyhow::Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| anyhow::anyhow!("unexpected answer ({e}): {}", String::from_utf8_lossy(body)))
}
