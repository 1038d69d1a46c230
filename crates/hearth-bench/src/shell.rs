//! The "shell" variant: `vm.sh` (beside this file, written into the temp
//! dir at run time) starts and stops one VM the way Firecracker's guides
//! do, one `ip`/`iptables`/`cp`/`curl` process per step. The bench times
//! the script from spawn to exit.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::env::{Env, UPLINK};

/// The script.
const SCRIPT: &str = include_str!("vm.sh");
/// The shell variant's taps are `hths<N>`.
const TAP_PREFIX: &str = "hths";
/// Its /30s: 10.233.0.0/16.
const POOL: u32 = u32::from_be_bytes([10, 233, 0, 0]);
/// Its forwarded host ports: 50000..60000.
const FIRST_PORT: u32 = 50_000;

/// Runs `vm.sh`.
#[derive(Debug)]
pub struct Shell {
    script: PathBuf,
    dir: PathBuf,
    testvmm: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    seq: AtomicU32,
}

/// A VM `vm.sh start` started.
#[derive(Debug)]
pub struct ShellVm {
    /// DIR TAP HOST_IP GUEST_IP PORT UPLINK.
    common: Vec<String>,
    /// The VM dir.
    pub dir: PathBuf,
    /// The VMM's pid (from `DIR/vmm.pid`).
    pub pid: Option<u32>,
}

impl Shell {
    /// Writes the script under `<tmp>/shell`.
    pub fn new(env: &Env) -> anyhow::Result<Shell> {
        let dir = env.tmp.join("shell");
        std::fs::create_dir_all(&dir).context("create the shell dir")?;
        let script = dir.join("vm.sh");
        std::fs::write(&script, SCRIPT).context("write vm.sh")?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .context("chmod vm.sh")?;
        Ok(Shell {
            script,
            dir,
            testvmm: env.bins.testvmm.clone(),
            kernel: env.kernel.clone(),
            rootfs: env.rootfs.clone(),
            seq: AtomicU32::new(0),
        })
    }

    async fn run(&self, args: &[String]) -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = tokio::process::Command::new("bash")
            .arg(&self.script)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .context("run vm.sh")?;
        let took = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            bail!(
                "vm.sh {} failed ({}): {}{}",
                args.first().map(String::as_str).unwrap_or(""),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }

    /// `vm.sh start …`; returns the VM and the script's wall time (ms).
    pub async fn start(&self) -> anyhow::Result<(ShellVm, f64)> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let slot = POOL + (n % 16_384) * 4;
        let dir = self.dir.join(format!("vm{n}"));
        let common = vec![
            dir.display().to_string(),
            format!("{TAP_PREFIX}{n}"),
            Ipv4Addr::from(slot + 1).to_string(),
            Ipv4Addr::from(slot + 2).to_string(),
            (FIRST_PORT + n % 10_000).to_string(),
            UPLINK.to_owned(),
        ];
        let mut args = vec!["start".to_owned()];
        args.extend(common.iter().cloned());
        args.extend([
            self.testvmm.display().to_string(),
            self.kernel.display().to_string(),
            self.rootfs.display().to_string(),
            format!("06:00:00:00:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff),
            format!("shell-{n}"),
        ]);
        let took = self.run(&args).await?;
        let pid = std::fs::read_to_string(dir.join("vmm.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok((ShellVm { common, dir, pid }, took))
    }

    /// `vm.sh stop …`; returns the script's wall time (ms).
    pub async fn stop(&self, vm: &ShellVm) -> anyhow::Result<f64> {
        let mut args = vec!["stop".to_owned()];
        args.extend(vm.common.iter().cloned());
        self.run(&args).await
    }
}
