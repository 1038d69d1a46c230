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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/hearth"),
            socket: PathBuf::from("/run/hearth/hearth.sock"),
            vmm_binary: PathBuf::from("firecracker"),
            stop_timeout_secs: 10,
            vmm_ready_timeout_ms: 2000,
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
