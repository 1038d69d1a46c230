//! The one fixture every unit test of the daemon builds on: a
//! [`Lifecycle`] over the hand-written fakes of the host and the VMM, in a
//! temp dir named `hearth-test-…`, with a kernel and rootfs file to create
//! VMs from.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use hearth_api::VmSpec;

use super::{Host, Lifecycle};
use crate::capability::HostNet;
use crate::config::Config;
use crate::host::disk::fake::FakeDisk;
use crate::host::fake::FakeProcesses;
use crate::host::firewall::fake::FakeFirewall;
use crate::host::net::NetHost;
use crate::host::net::fake::FakeNet;
use crate::store::Store;
use crate::vmm::fake::FakeVmm;

pub(crate) struct Env {
    pub _dir: tempfile::TempDir,
    pub l: Arc<Lifecycle>,
    pub procs: FakeProcesses,
    pub net: FakeNet,
    pub fw: FakeFirewall,
    pub disk: FakeDisk,
    pub vmm: FakeVmm,
    pub spec: VmSpec,
}

pub(crate) fn env() -> Env {
    env_with(false)
}

pub(crate) fn host(e: &Env) -> Host {
    Host {
        procs: Arc::new(e.procs.clone()),
        net: Arc::new(e.net.clone()),
        firewall: Arc::new(e.fw.clone()),
        disk: Arc::new(e.disk.clone()),
    }
}

pub(crate) fn uplink() -> HostNet {
    HostNet {
        uplink: Some("eth0".into()),
    }
}

/// A lifecycle over fakes; `dm` makes device-mapper available (so `auto`
/// picks dm-snapshot).
pub(crate) fn env_with(dm: bool) -> Env {
    let dir = tempfile::Builder::new()
        .prefix("hearth-test-")
        .tempdir()
        .unwrap();
    let config = Config {
        state_dir: dir.path().join("state"),
        stop_timeout_secs: 1,
        ..Config::default()
    };
    let kernel = dir.path().join("vmlinux");
    let rootfs = dir.path().join("rootfs.ext4");
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&rootfs, b"r").unwrap();
    let store = Arc::new(Store::open(&config.db_path()).unwrap());
    let procs = FakeProcesses::new();
    let vmm = FakeVmm::new(procs.clone());
    let (net, fw, disk) = (FakeNet::new(), FakeFirewall::new(), FakeDisk::new());
    disk.set_dm_available(dm);
    NetHost::set_sysctl(&net, "net.ipv4.ip_forward", "0").unwrap();
    let host = Host {
        procs: Arc::new(procs.clone()),
        net: Arc::new(net.clone()),
        firewall: Arc::new(fw.clone()),
        disk: Arc::new(disk.clone()),
    };
    let l = Lifecycle::new(store, config, host, Arc::new(vmm.clone()), uplink());
    Env {
        _dir: dir,
        l,
        procs,
        net,
        fw,
        disk,
        vmm,
        spec: VmSpec {
            vcpus: 2,
            memory_mib: 256,
            kernel,
            rootfs,
            initrd: None,
            kernel_args: hearth_api::DEFAULT_KERNEL_ARGS.into(),
            capabilities: vec![],
        },
    }
}
