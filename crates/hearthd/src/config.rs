//! Daemon configuration: one TOML file, every key optional.
//!
//! The file is `/etc/hearth/hearth.toml` unless `--config` or
//! `HEARTH_CONFIG` names another; a missing default file means "all
//! defaults", a missing file that was named explicitly is an error. The CLI
//! reads the same file to find the socket, so both sides agree without
//! repeating flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the config is looked for when nothing names another file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hearth/hearth.toml";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "HEARTH_CONFIG";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml saw.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config value for {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// hearth's configuration. See `contrib/hearth.toml` for the commented file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the store and every VM's directory live.
    pub state_dir: PathBuf,
    /// The daemon's API socket.
    pub socket: PathBuf,
    /// The VMM binary: a path, or a name looked up on `PATH`.
    pub vmm_binary: PathBuf,
    /// Seconds a graceful stop waits after Ctrl-Alt-Del before SIGKILL.
    pub stop_timeout_secs: u64,
    /// Milliseconds to wait for a freshly spawned VMM's API socket.
    pub vmm_ready_timeout_ms: u64,
    /// Milliseconds a re-adopted VMM has to answer `GET /` at daemon start
    /// before it is treated as hung (killed and torn down).
    pub adopt_probe_timeout_ms: u64,
    /// IPv4 pool the per-tap /30 subnets come from (`a.b.c.d/len`, len ≤ 28).
    pub address_pool: String,
    /// Interface NAT masquerades out of; empty: the default route's.
    pub uplink: String,
    /// DNS server handed to guests on the kernel command line.
    pub guest_dns: std::net::Ipv4Addr,
    /// Idle taps kept for reuse; beyond this a released tap is deleted.
    pub tap_pool_idle_max: u32,
    /// Idle taps created at daemon start.
    pub tap_pool_prewarm: u32,
    /// Root disk strategy: `auto`, `copy` or `dm-snapshot`.
    pub disk_strategy: DiskStrategy,
    /// Milliseconds between two rounds of the stats poller (usage, auto-stop
    /// of VMs whose VMM is gone, TTL expiry).
    pub poll_interval_ms: u64,
}

/// How each VM gets its writable root disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskStrategy {
    /// dm-snapshot where device-mapper works, else copy.
    Auto,
    /// A reflink or sparse copy of the image in the VM dir.
    Copy,
    /// A device-mapper snapshot over loop devices.
    DmSnapshot,
}

/// A parsed IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    /// The network address (host bits zero).
    pub addr: std::net::Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl Ipv4Net {
    /// Parses `a.b.c.d/len`; host bits must be zero.
    pub fn parse(s: &str) -> Result<Ipv4Net, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a.b.c.d/len"))?;
        let addr: std::net::Ipv4Addr = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
        let prefix_len: u8 = l.parse().map_err(|e| format!("{l:?}: {e}"))?;
        if prefix_len > 32 {
            return Err(format!("prefix length {prefix_len} is over 32"));
        }
        let net = Ipv4Net { addr, prefix_len };
        if net.addr != net.network() {
            return Err(format!("{s} has host bits set"));
        }
        Ok(net)
    }

    fn mask(self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len)
        }
    }

    /// The network address.
    pub fn network(self) -> std::net::Ipv4Addr {
        (u32::from(self.addr) & self.mask()).into()
    }

    /// Whether the two networks share any address.
    pub fn overlaps(self, other: Ipv4Net) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }

    /// The `idx`-th /30 of this network: (host address, guest address).
    pub fn slot(self, idx: u32) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
        let base = u32::from(self.network()) + idx * 4;
        ((base + 1).into(), (base + 2).into())
    }

    /// How many /30 subnets fit.
    pub fn slots(self) -> u32 {
        1u32 << (30 - u32::from(self.prefix_len.min(30)))
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/hearth"),
            socket: PathBuf::from("/run/hearth/hearth.sock"),
            vmm_binary: PathBuf::from("firecracker"),
            stop_timeout_secs: 10,
            vmm_ready_timeout_ms: 2000,
            adopt_probe_timeout_ms: 1000,
            address_pool: "10.231.0.0/16".into(),
            uplink: String::new(),
            guest_dns: std::net::Ipv4Addr::new(1, 1, 1, 1),
            tap_pool_idle_max: 16,
            tap_pool_prewarm: 0,
            disk_strategy: DiskStrategy::Auto,
            poll_interval_ms: 2000,
        }
    }
}

impl Config {
    /// Loads `explicit` if given, else `$HEARTH_CONFIG`, else the default
    /// path (which may be absent).
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        match explicit.map(Path::to_owned).or(env) {
            Some(path) => Config::from_file(&path),
            None => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                if path.exists() {
                    Config::from_file(path)
                } else {
                    Ok(Config::default())
                }
            }
        }
    }

    /// Parses one file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses TOML text and checks the values.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("(inline)"),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "state_dir",
                reason: "must be an absolute path".into(),
            });
        }
        if !self.socket.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "socket",
                reason: "must be an absolute path".into(),
            });
        }
        let pool = Ipv4Net::parse(&self.address_pool).map_err(|reason| ConfigError::Invalid {
            key: "address_pool",
            reason,
        })?;
        if pool.prefix_len > 28 {
            return Err(ConfigError::Invalid {
                key: "address_pool",
                reason: format!("{pool} is too small: use /28 or larger"),
            });
        }
        if self.poll_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "poll_interval_ms",
                reason: "must be positive".into(),
            });
        }
        if self.vmm_ready_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "vmm_ready_timeout_ms",
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }

    /// Checks that every VM's API socket path will fit `sun_path` (108
    /// bytes with its NUL): a long state dir would otherwise fail only at
    /// the first start.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        let longest = self
            .vms_dir()
            .join("00000000-0000-0000-0000-000000000000")
            .join("api.sock");
        let len = longest.as_os_str().len();
        if len > 107 {
            return Err(ConfigError::Invalid {
                key: "state_dir",
                reason: format!(
                    "too long: VM API sockets under it would be {len} bytes, over the 107 a Unix socket path allows"
                ),
            });
        }
        Ok(())
    }

    /// The address pool (validated at load).
    pub fn pool(&self) -> Ipv4Net {
        Ipv4Net::parse(&self.address_pool).unwrap_or(Ipv4Net {
            addr: std::net::Ipv4Addr::new(10, 231, 0, 0),
            prefix_len: 16,
        })
    }

    /// The store's database file.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("hearth.db")
    }

    /// The directory holding one directory per VM.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// Graceful stop timeout.
    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_secs)
    }

    /// How long a freshly spawned VMM has to open its API socket.
    pub fn vmm_ready_timeout(&self) -> Duration {
        Duration::from_millis(self.vmm_ready_timeout_ms)
    }

    /// How often the stats poller runs.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// The VMM binary resolved against `PATH`, if it can be found.
    pub fn resolve_vmm_binary(&self) -> Option<PathBuf> {
        resolve_on_path(&self.vmm_binary)
    }
}

/// Resolves a bare program name against `PATH`; a path with a slash is
/// returned as is when it exists.
pub fn resolve_on_path(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 || bin.is_absolute() {
        return bin.exists().then(|| bin.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn the_sample_config_is_the_defaults() {
        let text = include_str!("../../../contrib/hearth.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn pools_parse_slot_and_overlap() {
        let p = Ipv4Net::parse("10.231.0.0/16").unwrap();
        assert_eq!(p.slots(), 16384);
        assert_eq!(
            p.slot(0),
            ("10.231.0.1".parse().unwrap(), "10.231.0.2".parse().unwrap())
        );
        assert_eq!(
            p.slot(1),
            ("10.231.0.5".parse().unwrap(), "10.231.0.6".parse().unwrap())
        );
        assert!(p.overlaps(Ipv4Net::parse("10.231.7.0/24").unwrap()));
        assert!(p.overlaps(Ipv4Net::parse("10.0.0.0/8").unwrap()));
        assert!(!p.overlaps(Ipv4Net::parse("10.232.0.0/16").unwrap()));
        assert!(Ipv4Net::parse("10.231.0.1/16").is_err());
        assert!(Ipv4Net::parse("10.231.0.0").is_err());
        assert!(matches!(
            Config::from_toml("address_pool = \"10.0.0.0/30\""),
            Err(ConfigError::Invalid {
                key: "address_pool",
                ..
            })
        ));
    }

    #[test]
    fn long_state_dirs_are_refused() {
        let mut c = Config::default();
        assert!(c.check_paths().is_ok());
        c.state_dir = PathBuf::from(format!("/{}", "x".repeat(60)));
        assert!(matches!(
            c.check_paths(),
            Err(ConfigError::Invalid {
                key: "state_dir",
                ..
            })
        ));
    }

    #[test]
    fn keys_parse_and_unknown_keys_are_refused() {
        let c =
            Config::from_toml("state_dir = \"/tmp/hearth-x\"\nstop_timeout_secs = 3\n").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/hearth-x"));
        assert_eq!(c.stop_timeout(), Duration::from_secs(3));
        assert!(matches!(
            Config::from_toml("stat_dir = \"/x\""),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::from_toml("state_dir = \"rel\""),
            Err(ConfigError::Invalid {
                key: "state_dir",
                ..
            })
        ));
    }
}
