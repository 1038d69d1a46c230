//! Request bodies, declared the way Firecracker v1.16.1 declares them.
//!
//! Field names, field order, `deny_unknown_fields`, defaults and enum
//! variant order are copied from Firecracker's `src/vmm/src/vmm_config/*.rs`
//! (and `logger/logging.rs`, `utils/net/mac.rs`), because serde's error
//! messages ("missing field `vcpu_count`", "unknown variant `Foo`, expected
//! one of …") are part of the API's observable behaviour and depend on them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// `PUT /actions` body (`api_server/request/actions.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// What to do.
    pub action_type: ActionType,
}

/// The actions Firecracker knows, in its declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the microVM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
}

/// `PUT /boot-source` body (`vmm_config/boot_source.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Path of the kernel image.
    pub kernel_image_path: String,
    /// Path of the initrd, if there is one.
    pub initrd_path: Option<String>,
    /// Kernel command line; [`DEFAULT_KERNEL_CMDLINE`] when absent.
    pub boot_args: Option<String>,
}

/// Firecracker's default guest kernel command line.
pub const DEFAULT_KERNEL_CMDLINE: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux \
                                          i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// Token bucket of a rate limiter (`vmm_config/mod.rs`; note: no
/// `deny_unknown_fields` there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct TokenBucketConfig {
    /// Bucket size.
    pub size: u64,
    /// Initial burst.
    pub one_time_burst: Option<u64>,
    /// Refill time in ms.
    pub refill_time: u64,
}

/// A rate limiter (`vmm_config/mod.rs`). Accepted and ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bandwidth bucket.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations bucket.
    pub ops: Option<TokenBucketConfig>,
}

/// Disk cache mode (`devices/virtio/block/mod.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CacheType {
    /// Flushes are not advertised.
    #[default]
    Unsafe,
    /// Flushes are advertised and performed.
    Writeback,
}

/// Block I/O engine (`devices/virtio/block/virtio/device.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum FileEngineType {
    /// io_uring.
    Async,
    /// Blocking system calls.
    #[default]
    Sync,
}

/// `PUT /drives/{drive_id}` body (`vmm_config/drive.rs`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    /// Unique identifier of the drive.
    pub drive_id: String,
    /// Partition UUID of the root partition.
    pub partuuid: Option<String>,
    /// Whether this drive is the root device.
    pub is_root_device: bool,
    /// Cache mode.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Open read-only.
    pub is_read_only: Option<bool>,
    /// Backing file.
    pub path_on_host: Option<String>,
    /// I/O rate limiter.
    pub rate_limiter: Option<RateLimiterConfig>,
    /// I/O engine.
    #[serde(rename = "io_engine")]
    pub file_engine_type: Option<FileEngineType>,
    /// vhost-user socket.
    pub socket: Option<String>,
}

/// A guest MAC address (`utils/net/mac.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The six octets.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;

    // Same algorithm as Firecracker's, quirks included (`u8::from_str_radix`
    // accepts a leading '+').
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(s.to_owned());
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(s.to_owned());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| s.to_owned())?;
        }
        Ok(MacAddr(bytes))
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        MacAddr::from_str(&s)
            .map_err(|_| serde::de::Error::custom("The provided MAC address is invalid."))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_string().serialize(serializer)
    }
}

/// `PUT /network-interfaces/{iface_id}` body (`vmm_config/net.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    /// ID of the guest network interface.
    pub iface_id: String,
    /// Host tap device name.
    pub host_dev_name: String,
    /// Guest MAC address.
    pub guest_mac: Option<MacAddr>,
    /// MTU advertised to the guest.
    pub mtu: Option<u16>,
    /// Receive rate limiter.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Transmit rate limiter.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /metrics` body (`vmm_config/metrics.rs`).
#[derive(Debug, Clone, Deserialize)]
pub struct MetricsConfig {
    /// File or named pipe the metrics go to.
    pub metrics_path: PathBuf,
}

/// Logger level, deserialized case-insensitively with Firecracker's
/// legacy `Warning` spelling (`logger/logging.rs`). Ordered from least to
/// most verbose, like `log::LevelFilter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LevelFilter {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and above.
    Warn,
    /// Info and above (the default).
    Info,
    /// Debug and above.
    Debug,
    /// Everything.
    Trace,
}

impl LevelFilter {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "trace" => Self::Trace,
            "debug" => Self::Debug,
            "info" => Self::Info,
            "warn" | "warning" => Self::Warn,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// `--level` parse error, worded as Firecracker's `LevelFilterFromStrError`.
#[derive(Debug, thiserror::Error)]
#[error("Failed to parse string to level filter: {0}")]
pub struct LevelFilterFromStrError(String);

impl FromStr for LevelFilter {
    type Err = LevelFilterFromStrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| LevelFilterFromStrError(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for LevelFilter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom("Invalid LevelFilter"))
    }
}

/// `PUT /logger` body (`logger/logging.rs`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or named pipe the log goes to.
    pub log_path: Option<PathBuf>,
    /// Level filter; `Info` when absent.
    pub level: Option<LevelFilter>,
    /// Prefix lines with the level.
    pub show_level: Option<bool>,
    /// Prefix lines with file and line.
    pub show_log_origin: Option<bool>,
    /// Keep only records whose module path starts with this.
    pub module: Option<String>,
}

/// Static CPU templates of x86_64, in Firecracker's declaration order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum StaticCpuTemplate {
    /// C3.
    C3,
    /// T2.
    T2,
    /// T2S.
    T2S,
    /// No template.
    #[default]
    None,
    /// T2CL.
    T2CL,
    /// T2A.
    T2A,
}

/// Guest memory page size (`vmm_config/machine_config.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HugePageConfig {
    /// 4 KiB pages.
    #[default]
    None,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// Most vCPUs Firecracker supports.
pub const MAX_SUPPORTED_VCPUS: u8 = 32;

/// The machine configuration (`vmm_config/machine_config.rs`): the
/// `PUT /machine-config` body and the `GET /machine-config` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Memory size in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: bool,
    /// Deprecated static CPU template; `None` is stored as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Page size backing guest memory.
    #[serde(default)]
    pub huge_pages: HugePageConfig,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePageConfig::None,
        }
    }
}

/// `PATCH /machine-config` body; `PUT` is turned into one with every field
/// set, as Firecracker does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// Memory size in MiB.
    #[serde(default)]
    pub mem_size_mib: Option<usize>,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: Option<bool>,
    /// Static CPU template.
    #[serde(default)]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Page size.
    #[serde(default)]
    pub huge_pages: Option<HugePageConfig>,
}

impl MachineConfigUpdate {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

impl From<MachineConfig> for MachineConfigUpdate {
    fn from(cfg: MachineConfig) -> Self {
        MachineConfigUpdate {
            vcpu_count: Some(cfg.vcpu_count),
            mem_size_mib: Some(cfg.mem_size_mib),
            smt: Some(cfg.smt),
            cpu_template: cfg.cpu_template,
            track_dirty_pages: Some(cfg.track_dirty_pages),
            huge_pages: Some(cfg.huge_pages),
        }
    }
}

/// Why a machine configuration is refused (`MachineConfigError`).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MachineConfigError {
    /// Zero, or not a multiple of the page size.
    #[error("The memory size (MiB) is either 0, or not a multiple of the configured page size.")]
    InvalidMemorySize,
    /// Out of 1..=32, or odd with SMT.
    #[error(
        "The number of vCPUs must be greater than 0, less than {MAX_SUPPORTED_VCPUS} and must be 1 or an even number if SMT is enabled."
    )]
    InvalidVcpuCount,
}

impl MachineConfig {
    /// Applies `update`, with Firecracker's validation
    /// (`MachineConfig::update`).
    pub fn update(
        &self,
        update: &MachineConfigUpdate,
    ) -> Result<MachineConfig, MachineConfigError> {
        let vcpu_count = update.vcpu_count.unwrap_or(self.vcpu_count);
        let smt = update.smt.unwrap_or(self.smt);
        if vcpu_count == 0 || vcpu_count > MAX_SUPPORTED_VCPUS {
            return Err(MachineConfigError::InvalidVcpuCount);
        }
        if smt && vcpu_count > 1 && !vcpu_count.is_multiple_of(2) {
            return Err(MachineConfigError::InvalidVcpuCount);
        }
        let mem_size_mib = update.mem_size_mib.unwrap_or(self.mem_size_mib);
        let huge_pages = update.huge_pages.unwrap_or(self.huge_pages);
        let divisor = match huge_pages {
            HugePageConfig::None => 1,
            HugePageConfig::Hugetlbfs2M => 2,
        };
        if mem_size_mib == 0 || !mem_size_mib.is_multiple_of(divisor) {
            return Err(MachineConfigError::InvalidMemorySize);
        }
        let cpu_template = match update.cpu_template {
            None => self.cpu_template,
            Some(StaticCpuTemplate::None) => None,
            Some(other) => Some(other),
        };
        Ok(MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt,
            cpu_template,
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(v: u8, smt: bool) -> MachineConfigUpdate {
        MachineConfigUpdate {
            vcpu_count: Some(v),
            smt: Some(smt),
            ..Default::default()
        }
    }

    #[test]
    fn vcpu_rules_match_firecracker() {
        let base = MachineConfig::default();
        for ok in [1, 2, 31, 32] {
            assert!(base.update(&update(ok, false)).is_ok(), "{ok}");
        }
        for bad in [0, 33, 255] {
            assert_eq!(
                base.update(&update(bad, false)),
                Err(MachineConfigError::InvalidVcpuCount)
            );
        }
        assert!(base.update(&update(1, true)).is_ok());
        assert!(base.update(&update(2, true)).is_ok());
        assert_eq!(
            base.update(&update(3, true)),
            Err(MachineConfigError::InvalidVcpuCount)
        );
    }

    #[test]
    fn memory_rules_match_firecracker() {
        let base = MachineConfig::default();
        let mem = |m, hp| MachineConfigUpdate {
            mem_size_mib: Some(m),
            huge_pages: Some(hp),
            ..Default::default()
        };
        assert_eq!(
            base.update(&mem(0, HugePageConfig::None)),
            Err(MachineConfigError::InvalidMemorySize)
        );
        assert_eq!(
            base.update(&mem(129, HugePageConfig::Hugetlbfs2M)),
            Err(MachineConfigError::InvalidMemorySize)
        );
        assert!(base.update(&mem(129, HugePageConfig::None)).is_ok());
    }

    #[test]
    fn vcpu_message_is_firecrackers() {
        assert_eq!(
            MachineConfigError::InvalidVcpuCount.to_string(),
            "The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even \
             number if SMT is enabled."
        );
    }

    #[test]
    fn mac_parsing_matches_firecracker() {
        assert_eq!(
            "06:00:AC:10:00:02".parse::<MacAddr>().unwrap().to_string(),
            "06:00:ac:10:00:02"
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "6:00:ac:10:00:02",
            "zz:00:ac:10:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let err = serde_json::from_str::<NetworkInterfaceConfig>(
            r#"{"iface_id":"a","host_dev_name":"t","guest_mac":"nope"}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("The provided MAC address is invalid.")
        );
    }

    #[test]
    fn level_accepts_firecrackers_spellings() {
        for (s, l) in [
            ("Warning", LevelFilter::Warn),
            ("WARN", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("Off", LevelFilter::Off),
        ] {
            assert_eq!(s.parse::<LevelFilter>().unwrap(), l);
        }
        assert!(
            serde_json::from_str::<LoggerConfig>(r#"{"level":"loud"}"#)
                .unwrap_err()
                .to_string()
                .starts_with("Invalid LevelFilter")
        );
    }
}
