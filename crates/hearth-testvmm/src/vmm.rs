//! The VMM side: Firecracker's pre-boot and runtime controllers
//! (`src/vmm/src/rpc_interface.rs`) with everything that would touch KVM
//! left out.
//!
//! ```text
//!            PUT logger/metrics/machine-config/boot-source/drives/network-interfaces
//!            ┌─────┐
//!            ▼     │
//!      ┌─────────────┐  InstanceStart (kernel configured, ELF loads)  ┌─────────┐
//!      │ Not started │ ─────────────────────────────────────────────▶ │ Running │
//!      └─────────────┘                                                └─────────┘
//!        FlushMetrics, SendCtrlAltDel:                 pre-boot-only PUTs, InstanceStart:
//!        "not supported before starting"               "not supported after starting";
//!                                                      drives, network-interfaces: "PCI is
//!                                                      not enabled" (hotplug needs --enable-pci)
//! ```
//!
//! What is real: files named in the configuration are opened with the same
//! flags as Firecracker opens them and kept open for the life of the
//! process, and taps are attached with `TUNSETIFF`. What is not: no guest
//! memory, no KVM, no vCPU. The kernel image is checked the way
//! Firecracker's ELF loader checks it, so a file real Firecracker would
//! refuse to boot is refused here too.
//!
//! Error messages are Firecracker's, word for word, including its habit of
//! repeating the cause inside each layer's message; this is the one place
//! in hearth where that is deliberate.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::config::{
    BlockDeviceConfig, BootSourceConfig, DEFAULT_KERNEL_CMDLINE, LoggerConfig, MachineConfig,
    MachineConfigError, MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig,
};
use crate::fclog::{self, AlreadyInitialized, Logger, Metrics};
use crate::guest;
use crate::tap::{self, NetError};

/// `InstanceInfo.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Before InstanceStart.
    #[serde(rename = "Not started")]
    NotStarted,
    /// After InstanceStart.
    Running,
}

/// The `GET /` answer.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    /// The `--id`.
    pub id: String,
    /// Lifecycle state.
    pub state: VmState,
    /// [`crate::VMM_VERSION`].
    pub vmm_version: String,
    /// Always "Firecracker".
    pub app_name: String,
}

/// What the API asks the VMM to do (`VmmAction`, reduced).
#[derive(Debug)]
pub enum VmmAction {
    /// `PUT /boot-source`.
    ConfigureBootSource(BootSourceConfig),
    /// `PUT /logger`.
    ConfigureLogger(LoggerConfig),
    /// `PUT /metrics`.
    ConfigureMetrics(MetricsConfig),
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `GET /machine-config`.
    GetVmMachineConfig,
    /// `GET /`.
    GetVmInstanceInfo,
    /// `GET /version`.
    GetVmmVersion,
    /// `DELETE /drives|network-interfaces|pmem/{id}`.
    HotUnplugDevice,
    /// `PUT /drives/{id}`.
    InsertBlockDevice(BlockDeviceConfig),
    /// `PUT /network-interfaces/{id}`.
    InsertNetworkDevice(NetworkInterfaceConfig),
    /// A Firecracker endpoint this stand-in does not serve (its description).
    NotImplemented(String),
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /actions` InstanceStart.
    StartMicroVm,
    /// `PUT` and `PATCH /machine-config`.
    UpdateMachineConfiguration(MachineConfigUpdate),
}

/// A successful answer (`VmmData`, reduced).
#[derive(Debug)]
pub enum VmmData {
    /// 204.
    Empty,
    /// 200 with the machine configuration.
    MachineConfiguration(MachineConfig),
    /// 200 with the instance information.
    InstanceInformation(InstanceInfo),
    /// 200 with `{"firecracker_version": …}`.
    VmmVersion(String),
}

/// `BootSourceConfigError`.
#[derive(Debug, thiserror::Error)]
pub enum BootSourceConfigError {
    /// Kernel cannot be opened.
    #[error("The kernel file cannot be opened: {0}")]
    InvalidKernelPath(io::Error),
    /// Initrd cannot be opened.
    #[error("The initrd file cannot be opened due to invalid path or invalid permissions. {0}")]
    InvalidInitrdPath(io::Error),
    /// Command line too long.
    #[error("The kernel command line is invalid: {0}")]
    InvalidKernelCommandLine(String),
}

/// `VirtioBlockError`/`BlockError`, the parts a configuration can cause.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Neither a virtio-block nor a vhost-user-block configuration.
    #[error("Invalid block config.")]
    InvalidBlockConfig,
    /// The backing file cannot be opened or sized.
    #[error("Virtio backend error: Error manipulating the backing file: {0} {1}")]
    BackingFile(io::Error, String),
    /// vhost-user-block (not emulated).
    #[error("Vhost user backend error: {0}")]
    VhostUser(String),
}

/// `DriveError`.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// Opening the device failed.
    #[error("Unable to create the virtio block device: {0}")]
    CreateBlockDevice(BlockError),
    /// Second root device.
    #[error("A root block device already exists!")]
    RootBlockDeviceAlreadyAdded,
}

/// `NetworkInterfaceError`.
#[derive(Debug, thiserror::Error)]
pub enum NetworkInterfaceError {
    /// Tap or device setup failed.
    #[error("Could not create the network device: {0}")]
    CreateNetworkDevice(NetError),
    /// MAC already used by another interface.
    #[error("The MAC address is already in use: {0}")]
    GuestMacAddressInUse(String),
}

/// `StartMicrovmError`, the parts that can happen without KVM.
#[derive(Debug, thiserror::Error)]
pub enum StartMicrovmError {
    /// No `PUT /boot-source` yet.
    #[error("Cannot start microvm without kernel configuration.")]
    MissingKernelConfig,
    /// The ELF loader refused the kernel (linux-loader 0.13's wording).
    #[error(
        "System configuration error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image: Kernel Loader: {0}"
    )]
    KernelLoader(&'static str),
}

/// `VmmActionError`, reduced; `Display` is the `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// `PUT /boot-source` failed.
    #[error("Boot source error: {0}")]
    BootSource(#[from] BootSourceConfigError),
    /// `PUT /drives` failed.
    #[error("Drive config error: {0}")]
    DriveConfig(#[from] DriveError),
    /// Writing metrics failed.
    #[error("Internal VMM error: Metrics error: Failed to write metrics: {0}")]
    InternalVmmMetrics(io::Error),
    /// `PUT /logger` failed.
    #[error("Logger error: Failed to open target file: {0}")]
    Logger(io::Error),
    /// `PUT /machine-config` failed.
    #[error("Machine config error: {0}")]
    MachineConfig(#[from] MachineConfigError),
    /// `PUT /metrics` failed.
    #[error("Metrics error: Cannot initialize the metrics system due to bad user input: {0}")]
    Metrics(String),
    /// `PUT /network-interfaces` failed.
    #[error("Network config error: {0}")]
    NetworkConfig(#[from] NetworkInterfaceError),
    /// Not served (here: by the stand-in).
    #[error("The requested operation is not supported: {0}")]
    NotSupported(String),
    /// Pre-boot-only action after InstanceStart.
    #[error("The requested operation is not supported after starting the microVM.")]
    OperationNotSupportedPostBoot,
    /// Runtime-only action before InstanceStart.
    #[error("The requested operation is not supported before starting the microVM.")]
    OperationNotSupportedPreBoot,
    /// Device hotplug without `--enable-pci`.
    #[error("PCI is not enabled")]
    PciNotEnabled,
    /// InstanceStart failed.
    #[error("Start microvm error: {0}")]
    StartMicrovm(#[from] StartMicrovmError),
}

/// Longest kernel command line on x86-64 (`CMDLINE_MAX_SIZE`).
const CMDLINE_MAX_SIZE: usize = 2048;
/// linux-loader's separator of init arguments.
const INIT_ARGS_SEPARATOR: &str = " -- ";

/// Splits a command line the way linux-loader's `Cmdline::try_from` does:
/// at the first " -- " outside double quotes; both halves trimmed.
fn split_cmdline(raw: &str) -> (&str, &str) {
    let found = raw
        .match_indices(INIT_ARGS_SEPARATOR)
        .find(|(i, _)| raw[..*i].matches('"').count().is_multiple_of(2));
    match found {
        None => (raw.trim(), ""),
        Some((i, _)) => (raw[..i].trim(), raw[i + INIT_ARGS_SEPARATOR.len()..].trim()),
    }
}

/// linux-loader's capacity check (the only check `try_from` makes).
fn check_cmdline(raw: &str) -> Result<(), BootSourceConfigError> {
    let (boot, init) = split_cmdline(raw);
    let mut size = boot.len() + 1;
    if !init.is_empty() {
        size += INIT_ARGS_SEPARATOR.len() + init.len();
    }
    if size > CMDLINE_MAX_SIZE {
        return Err(BootSourceConfigError::InvalidKernelCommandLine(
            "Invalid cmdline capacity provided.".into(),
        ));
    }
    Ok(())
}

/// Checks a kernel image as linux-loader 0.13's `Elf::load` does, with
/// guest memory of `mem_bytes` starting at 0. Returns the loader's error
/// description.
fn check_kernel(kernel: &File, mem_bytes: u64) -> Result<(), &'static str> {
    const HIMEM_START: u64 = 0x10_0000;
    let mut ehdr = [0u8; 64];
    kernel
        .read_exact_at(&mut ehdr, 0)
        .map_err(|_| "Unable to read elf header")?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    if ehdr[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err("Invalid Elf magic number");
    }
    if ehdr[5] != 1 {
        return Err("Trying to load big-endian binary on little-endian machine");
    }
    if u16_at(&ehdr, 54) != 56 {
        return Err("Invalid program header size");
    }
    let phoff = u64_at(&ehdr, 32);
    if phoff < 64 {
        return Err("Invalid program header offset");
    }
    if u64_at(&ehdr, 24) < HIMEM_START {
        return Err("Invalid entry address");
    }
    let file_len = kernel.metadata().map(|m| m.len()).unwrap_or(0);
    for i in 0..u64::from(u16_at(&ehdr, 56)) {
        let mut phdr = [0u8; 56];
        kernel
            .read_exact_at(&mut phdr, phoff + i * 56)
            .map_err(|_| "Unable to read program header")?;
        let p_type = u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]);
        let (offset, paddr, filesz) = (u64_at(&phdr, 8), u64_at(&phdr, 24), u64_at(&phdr, 32));
        if p_type != 1 || filesz == 0 {
            continue;
        }
        let fits_memory = paddr
            .checked_add(filesz)
            .is_some_and(|end| end <= mem_bytes);
        let in_file = offset
            .checked_add(filesz)
            .is_some_and(|end| end <= file_len);
        if !fits_memory || !in_file {
            return Err("Unable to read kernel image");
        }
    }
    Ok(())
}

/// A configured boot source with its open files (`BootConfig`).
#[derive(Debug)]
struct BootSource {
    config: BootSourceConfig,
    kernel: File,
    _initrd: Option<File>,
}

/// A configured drive with its open backing file.
#[derive(Debug)]
struct Drive {
    config: BlockDeviceConfig,
    _file: File,
}

/// A configured network interface with its attached tap.
#[derive(Debug)]
struct NetDevice {
    config: NetworkInterfaceConfig,
    tap: File,
}

/// The stand-in VMM.
#[derive(Debug)]
pub struct Vmm {
    info: InstanceInfo,
    machine: MachineConfig,
    boot: Option<BootSource>,
    /// Root device first, like Firecracker's `BlockBuilder`.
    drives: VecDeque<Drive>,
    nets: Vec<NetDevice>,
    /// The logger (see [`fclog`]).
    pub log: Logger,
    /// The metrics (see [`fclog`]).
    pub metrics: Metrics,
}

impl Vmm {
    /// A VMM that has not started, with its logger and metrics.
    pub fn new(id: &str, log: Logger, metrics: Metrics) -> Self {
        Vmm {
            info: InstanceInfo {
                id: id.to_owned(),
                state: VmState::NotStarted,
                vmm_version: crate::VMM_VERSION.to_owned(),
                app_name: "Firecracker".to_owned(),
            },
            machine: MachineConfig::default(),
            boot: None,
            drives: VecDeque::new(),
            nets: Vec::new(),
            log,
            metrics,
        }
    }

    /// Whether InstanceStart has succeeded.
    pub fn is_running(&self) -> bool {
        self.info.state == VmState::Running
    }

    /// Performs one action, as Firecracker's pre-boot controller does
    /// before InstanceStart and its runtime controller after.
    pub fn handle(&mut self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        use VmmAction::*;
        match action {
            GetVmInstanceInfo => return Ok(VmmData::InstanceInformation(self.info.clone())),
            GetVmmVersion => return Ok(VmmData::VmmVersion(self.info.vmm_version.clone())),
            GetVmMachineConfig => return Ok(VmmData::MachineConfiguration(self.machine.clone())),
            NotImplemented(what) => {
                return Err(VmmActionError::NotSupported(format!(
                    "hearth-testvmm, a test stand-in for Firecracker, does not implement {what}"
                )));
            }
            _ => {}
        }
        if self.is_running() {
            return match action {
                FlushMetrics => self
                    .metrics
                    .write()
                    .map(|_| VmmData::Empty)
                    .map_err(VmmActionError::InternalVmmMetrics),
                // Firecracker's runtime controller treats these as PCI
                // hotplug, which fails without --enable-pci.
                InsertBlockDevice(_) | InsertNetworkDevice(_) | HotUnplugDevice => {
                    let what = if matches!(action, HotUnplugDevice) {
                        "PCI device hot-unplug"
                    } else {
                        "PCI device hotplug"
                    };
                    self.log.log(
                        fclog::Level::Warn,
                        fclog::Thread::Main,
                        "vmm",
                        &format!("[DevPreview] {what} is in development preview."),
                    );
                    Err(VmmActionError::PciNotEnabled)
                }
                // The i8042 takes the key presses; what follows is up to
                // the guest (see `crate::server`).
                SendCtrlAltDel => Ok(VmmData::Empty),
                _ => Err(VmmActionError::OperationNotSupportedPostBoot),
            };
        }
        match action {
            ConfigureBootSource(cfg) => self.set_boot_source(cfg),
            ConfigureLogger(cfg) => self
                .log
                .update(cfg)
                .map(|()| VmmData::Empty)
                .map_err(VmmActionError::Logger),
            ConfigureMetrics(cfg) => {
                let file = fclog::open_file_nonblock(&cfg.metrics_path)
                    .map_err(|e| VmmActionError::Metrics(e.to_string()))?;
                self.metrics
                    .init(file)
                    .map_err(|e: AlreadyInitialized| VmmActionError::Metrics(e.to_string()))?;
                Ok(VmmData::Empty)
            }
            InsertBlockDevice(cfg) => self.insert_block_device(cfg),
            InsertNetworkDevice(cfg) => self.insert_net_device(cfg),
            UpdateMachineConfiguration(update) => {
                self.machine = self.machine.update(&update)?;
                Ok(VmmData::Empty)
            }
            StartMicroVm => self.start(),
            FlushMetrics | SendCtrlAltDel | HotUnplugDevice => {
                Err(VmmActionError::OperationNotSupportedPreBoot)
            }
            GetVmInstanceInfo | GetVmmVersion | GetVmMachineConfig | NotImplemented(_) => {
                Ok(VmmData::Empty)
            }
        }
    }

    fn set_boot_source(&mut self, cfg: BootSourceConfig) -> Result<VmmData, VmmActionError> {
        let kernel =
            File::open(&cfg.kernel_image_path).map_err(BootSourceConfigError::InvalidKernelPath)?;
        let initrd = match &cfg.initrd_path {
            Some(p) => Some(File::open(p).map_err(BootSourceConfigError::InvalidInitrdPath)?),
            None => None,
        };
        check_cmdline(cfg.boot_args.as_deref().unwrap_or(DEFAULT_KERNEL_CMDLINE))?;
        self.boot = Some(BootSource {
            config: cfg,
            kernel,
            _initrd: initrd,
        });
        Ok(VmmData::Empty)
    }

    fn insert_block_device(&mut self, cfg: BlockDeviceConfig) -> Result<VmmData, VmmActionError> {
        let position = self
            .drives
            .iter()
            .position(|d| d.config.drive_id == cfg.drive_id);
        let has_root = self.drives.front().is_some_and(|d| d.config.is_root_device);
        if cfg.is_root_device && has_root && position != Some(0) {
            return Err(DriveError::RootBlockDeviceAlreadyAdded.into());
        }
        let file = open_block_device(&cfg).map_err(DriveError::CreateBlockDevice)?;
        let root = cfg.is_root_device;
        let drive = Drive {
            config: cfg,
            _file: file,
        };
        match position {
            None if root => self.drives.push_front(drive),
            None => self.drives.push_back(drive),
            Some(i) => {
                self.drives[i] = drive;
                if i != 0 && root {
                    self.drives.swap(0, i);
                }
            }
        }
        Ok(VmmData::Empty)
    }

    fn insert_net_device(
        &mut self,
        cfg: NetworkInterfaceConfig,
    ) -> Result<VmmData, VmmActionError> {
        if let Some(mac) = cfg.guest_mac
            && self
                .nets
                .iter()
                .any(|n| n.config.guest_mac == Some(mac) && n.config.iface_id != cfg.iface_id)
        {
            return Err(NetworkInterfaceError::GuestMacAddressInUse(mac.to_string()).into());
        }
        // Like Firecracker, an update drops the old device (and its tap)
        // before opening the new one.
        if let Some(i) = self
            .nets
            .iter()
            .position(|n| n.config.iface_id == cfg.iface_id)
        {
            self.nets.swap_remove(i);
        }
        let tap = tap::open_tap(&cfg.host_dev_name)
            .map_err(NetworkInterfaceError::CreateNetworkDevice)?;
        if let Some(mtu) = cfg.mtu
            && mtu < 68
        {
            return Err(
                NetworkInterfaceError::CreateNetworkDevice(NetError::InvalidMtu(mtu)).into(),
            );
        }
        self.nets.push(NetDevice { config: cfg, tap });
        Ok(VmmData::Empty)
    }

    fn start(&mut self) -> Result<VmmData, VmmActionError> {
        let boot = self
            .boot
            .as_ref()
            .ok_or(StartMicrovmError::MissingKernelConfig)?;
        let mem_bytes = (self.machine.mem_size_mib as u64).saturating_mul(1 << 20);
        check_kernel(&boot.kernel, mem_bytes).map_err(StartMicrovmError::KernelLoader)?;
        self.info.state = VmState::Running;
        // Firecracker writes metrics as soon as the VM runs.
        if let Err(e) = self.metrics.write() {
            self.log.log(
                fclog::Level::Error,
                fclog::Thread::Main,
                "firecracker::metrics",
                &format!("Failed to write metrics: Failed to write metrics: {e}"),
            );
        }
        Ok(VmmData::Empty)
    }

    /// The kernel's own parameters: the configured command line (or
    /// Firecracker's default) up to any " -- ", which a Linux guest parses
    /// (`ip=` among them).
    pub fn kernel_params(&self) -> &str {
        let raw = self
            .boot
            .as_ref()
            .and_then(|b| b.config.boot_args.as_deref())
            .unwrap_or(DEFAULT_KERNEL_CMDLINE);
        split_cmdline(raw).0
    }

    /// The network interfaces with their taps, in the order a guest
    /// numbers them (the first is its eth0).
    pub fn net_devices(&self) -> impl Iterator<Item = (&NetworkInterfaceConfig, &File)> {
        self.nets.iter().map(|n| (&n.config, &n.tap))
    }

    /// The kernel command line the guest would get: the configured one
    /// (or Firecracker's default) with `pci=off` and the root device
    /// arguments added the way Firecracker adds them. (The
    /// `virtio_mmio.device=` arguments are left out: there are no devices.)
    pub fn kernel_cmdline(&self) -> String {
        let raw = self
            .boot
            .as_ref()
            .and_then(|b| b.config.boot_args.as_deref())
            .unwrap_or(DEFAULT_KERNEL_CMDLINE);
        let (boot, init) = split_cmdline(raw);
        let mut args: Vec<String> = Vec::new();
        if !boot.is_empty() {
            args.push(boot.to_owned());
        }
        args.push("pci=off".into());
        for d in self.drives.iter().filter(|d| d.config.is_root_device) {
            args.push(match &d.config.partuuid {
                Some(p) => format!("root=PARTUUID={p}"),
                None => "root=/dev/vda".into(),
            });
            args.push(if d.config.is_read_only.unwrap_or(false) {
                "ro".into()
            } else {
                "rw".into()
            });
        }
        let mut line = args.join(" ");
        if !init.is_empty() {
            line.push_str(INIT_ARGS_SEPARATOR);
            line.push_str(init);
        }
        line
    }

    /// Whether the configured kernel is [`guest::test_guest_elf`], whose
    /// console output the stand-in then reproduces.
    pub fn kernel_is_test_guest(&self) -> bool {
        let Some(boot) = &self.boot else {
            return false;
        };
        let want = guest::test_guest_elf();
        if boot.kernel.metadata().map(|m| m.len()).ok() != Some(want.len() as u64) {
            return false;
        }
        let mut got = vec![0u8; want.len()];
        boot.kernel.read_exact_at(&mut got, 0).is_ok() && got == want
    }

    /// What the console shows after InstanceStart.
    pub fn boot_console(&self) -> String {
        let kernel = self
            .boot
            .as_ref()
            .map(|b| b.config.kernel_image_path.as_str())
            .unwrap_or("?");
        let mut text = format!(
            "hearth-testvmm: guest console (no guest is running; this is a stand-in for Firecracker)\n\
             hearth-testvmm: would boot {kernel} with {} vCPU(s) and {} MiB\n\
             hearth-testvmm: Kernel command line: {}\n",
            self.machine.vcpu_count,
            self.machine.mem_size_mib,
            self.kernel_cmdline(),
        );
        if self.kernel_is_test_guest() {
            text.push_str(guest::GUEST_HELLO);
        }
        text
    }

    /// What the console shows when Ctrl+Alt+Del makes the guest reset.
    pub fn reset_console(&self) -> String {
        if self.kernel_is_test_guest() {
            guest::GUEST_RESET.to_owned()
        } else {
            "hearth-testvmm: Ctrl+Alt+Del: the guest would now reboot, and Firecracker exit with status 0\n"
                .to_owned()
        }
    }
}

/// Opens a drive's backing file as Firecracker's `DiskProperties::new`
/// does: read, plus write unless read-only, then seek to the end to size it.
fn open_block_device(cfg: &BlockDeviceConfig) -> Result<File, BlockError> {
    let virtio = match (&cfg.path_on_host, &cfg.socket) {
        (Some(path), None) => Some(path),
        _ => None,
    };
    let Some(path) = virtio else {
        let vhost_user = cfg.socket.is_some()
            && cfg.is_read_only.is_none()
            && cfg.path_on_host.is_none()
            && cfg.rate_limiter.is_none()
            && cfg.file_engine_type.is_none();
        return Err(if vhost_user {
            BlockError::VhostUser(
                "hearth-testvmm, a test stand-in, does not implement vhost-user block devices"
                    .into(),
            )
        } else {
            BlockError::InvalidBlockConfig
        });
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(!cfg.is_read_only.unwrap_or(false))
        .open(path)
        .map_err(|e| BlockError::BackingFile(e, path.clone()))?;
    file.seek(SeekFrom::End(0))
        .map_err(|e| BlockError::BackingFile(e, path.clone()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmm() -> Vmm {
        Vmm::new("t", Logger::silent(), Metrics::default())
    }

    fn dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap()
    }

    fn boot(path: &std::path::Path, args: Option<&str>) -> VmmAction {
        VmmAction::ConfigureBootSource(BootSourceConfig {
            kernel_image_path: path.to_str().unwrap().into(),
            initrd_path: None,
            boot_args: args.map(Into::into),
        })
    }

    fn drive(id: &str, path: &std::path::Path, root: bool) -> VmmAction {
        VmmAction::InsertBlockDevice(BlockDeviceConfig {
            drive_id: id.into(),
            is_root_device: root,
            path_on_host: Some(path.to_str().unwrap().into()),
            ..Default::default()
        })
    }

    #[test]
    fn start_needs_a_kernel() {
        let err = vmm().handle(VmmAction::StartMicroVm).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Start microvm error: Cannot start microvm without kernel configuration."
        );
    }

    #[test]
    fn start_refuses_a_non_elf_kernel() {
        let d = dir();
        let k = d.path().join("kernel");
        std::fs::write(&k, vec![0u8; 100]).unwrap();
        let mut v = vmm();
        v.handle(boot(&k, None)).unwrap();
        let err = v.handle(VmmAction::StartMicroVm).unwrap_err().to_string();
        assert!(
            err.ends_with("Kernel Loader: Invalid Elf magic number"),
            "{err}"
        );
        std::fs::write(&k, b"short").unwrap();
        let err = v.handle(VmmAction::StartMicroVm).unwrap_err().to_string();
        assert!(err.ends_with("Unable to read elf header"), "{err}");
        assert!(!v.is_running());
    }

    #[test]
    fn test_guest_boots_and_lifecycle_rules_hold() {
        let d = dir();
        let k = d.path().join("vmlinux");
        std::fs::write(&k, guest::test_guest_elf()).unwrap();
        let mut v = vmm();
        assert_eq!(
            v.handle(VmmAction::SendCtrlAltDel).unwrap_err().to_string(),
            "The requested operation is not supported before starting the microVM."
        );
        assert!(matches!(
            v.handle(VmmAction::FlushMetrics),
            Err(VmmActionError::OperationNotSupportedPreBoot)
        ));
        v.handle(boot(&k, Some("console=ttyS0 -- init-arg")))
            .unwrap();
        v.handle(drive("rootfs", &k, true)).unwrap();
        v.handle(VmmAction::StartMicroVm).unwrap();
        assert!(v.is_running());
        assert!(v.kernel_is_test_guest());
        assert!(v.boot_console().ends_with(guest::GUEST_HELLO));
        assert_eq!(
            v.kernel_cmdline(),
            "console=ttyS0 pci=off root=/dev/vda rw -- init-arg"
        );
        assert_eq!(
            v.handle(VmmAction::StartMicroVm).unwrap_err().to_string(),
            "The requested operation is not supported after starting the microVM."
        );
        assert!(matches!(
            v.handle(boot(&k, None)),
            Err(VmmActionError::OperationNotSupportedPostBoot)
        ));
        assert_eq!(
            v.handle(drive("d2", &k, false)).unwrap_err().to_string(),
            "PCI is not enabled"
        );
        assert!(v.handle(VmmAction::SendCtrlAltDel).is_ok());
        assert!(v.handle(VmmAction::FlushMetrics).is_ok());
        match v.handle(VmmAction::GetVmInstanceInfo).unwrap() {
            VmmData::InstanceInformation(i) => assert_eq!(i.state, VmState::Running),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_files_give_firecrackers_messages() {
        let mut v = vmm();
        let err = v
            .handle(boot(std::path::Path::new("/nonexistent/hearth/k"), None))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"
        );
        let err = v
            .handle(drive(
                "rootfs",
                std::path::Path::new("/nonexistent/r"),
                true,
            ))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Drive config error: Unable to create the virtio block device: Virtio backend error: \
             Error manipulating the backing file: No such file or directory (os error 2) /nonexistent/r"
        );
        let err = v
            .handle(VmmAction::InsertBlockDevice(BlockDeviceConfig {
                drive_id: "x".into(),
                ..Default::default()
            }))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Drive config error: Unable to create the virtio block device: Invalid block config."
        );
    }

    #[test]
    fn read_only_drives_open_read_only() {
        let d = dir();
        let img = d.path().join("ro.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let mut perms = std::fs::metadata(&img).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&img, perms).unwrap();
        let mut v = vmm();
        v.handle(VmmAction::InsertBlockDevice(BlockDeviceConfig {
            drive_id: "ro".into(),
            path_on_host: Some(img.to_str().unwrap().into()),
            is_read_only: Some(true),
            ..Default::default()
        }))
        .unwrap();
    }

    #[test]
    fn only_one_root_drive() {
        let d = dir();
        let img = d.path().join("a.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let mut v = vmm();
        v.handle(drive("a", &img, true)).unwrap();
        v.handle(drive("a", &img, true)).unwrap(); // an update of the root is fine
        v.handle(drive("b", &img, false)).unwrap();
        assert_eq!(
            v.handle(drive("b", &img, true)).unwrap_err().to_string(),
            "Drive config error: A root block device already exists!"
        );
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let d = dir();
        let k = d.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        let long = "a".repeat(2048);
        assert_eq!(
            vmm().handle(boot(&k, Some(&long))).unwrap_err().to_string(),
            "Boot source error: The kernel command line is invalid: Invalid cmdline capacity provided."
        );
        assert!(vmm().handle(boot(&k, Some(&long[..2047]))).is_ok());
    }

    #[test]
    fn cmdline_split_respects_quotes() {
        assert_eq!(
            split_cmdline(r#"a="x -- y" -- init"#),
            (r#"a="x -- y""#, "init")
        );
        assert_eq!(split_cmdline("  a b  "), ("a b", ""));
    }

    #[test]
    fn kernel_must_fit_guest_memory() {
        let d = dir();
        let k = d.path().join("vmlinux");
        std::fs::write(&k, guest::test_guest_elf()).unwrap();
        let f = File::open(&k).unwrap();
        assert_eq!(
            check_kernel(&f, 1 << 20),
            Err("Unable to read kernel image")
        );
        assert_eq!(check_kernel(&f, 2 << 20), Ok(()));
    }
}
