//! The VM state machine.
//!
//! ```text
//!                 start                 InstanceStart answered
//!  ┌─────────┐ ─────────▶ ┌──────────┐ ──────────────────────▶ ┌─────────┐
//!  │ created │            │ starting │                         │ running │
//!  └─────────┘      ┌───▶ └──────────┘                         └─────────┘
//!                   │          │ a step failed:                     │ stop, kill, or
//!             start │          │ unwind                             │ the VMM exited
//!                   │          ▼                                    ▼
//!              ┌─────────┐  ┌───────┐    teardown failed      ┌──────────┐
//!              │ stopped │  │ error │ ◀────────────────────── │ stopping │
//!              └─────────┘  └───────┘                         └──────────┘
//!                   ▲           │ start / kill / delete             │
//!                   │           │ (each retries the teardown)       │
//!                   └───────────┴──────── teardown done ◀───────────┘
//! ```
//!
//! `created`, `stopped` and `error` hold no kernel object and no process
//! (an `error` VM whose teardown failed still names what is left in its
//! runtime record, and the next start, stop or delete retries that
//! teardown). `starting` and `stopping` are only ever seen while the
//! per-VM lock is held, or after a crash in the middle of one; reconcile
//! finishes or unwinds them. Every transition bumps the VM's generation.

use serde::{Deserialize, Serialize};

/// Where a VM is in its life. See the module doc for the diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, never started (or deleted resources since): holds nothing.
    Created,
    /// A start is in progress: the journal is being executed.
    Starting,
    /// The VMM answered InstanceStart and is alive.
    Running,
    /// A stop or kill is in progress: the teardown is being executed.
    Stopping,
    /// Torn down; may be started again.
    Stopped,
    /// The last operation failed, or the record could not be read.
    Error,
}

impl VmState {
    /// All states, for metrics and tests.
    pub const ALL: [VmState; 6] = [
        VmState::Created,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Error,
    ];

    /// A start may begin from here.
    pub fn can_start(self) -> bool {
        matches!(self, VmState::Created | VmState::Stopped | VmState::Error)
    }

    /// A graceful stop may begin from here.
    pub fn can_stop(self) -> bool {
        matches!(self, VmState::Running)
    }

    /// A kill may begin from here: anything that may hold a process or a
    /// kernel object (an `error` VM may still hold a half-torn-down rest).
    pub fn can_kill(self) -> bool {
        matches!(
            self,
            VmState::Running | VmState::Starting | VmState::Stopping | VmState::Error
        )
    }

    /// The VM may be deleted without `--force`.
    pub fn can_delete(self) -> bool {
        matches!(self, VmState::Created | VmState::Stopped | VmState::Error)
    }

    /// A state that only exists while an operation is in flight.
    pub fn is_transient(self) -> bool {
        matches!(self, VmState::Starting | VmState::Stopping)
    }

    /// The lowercase name used in the store and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_match_the_diagram() {
        use VmState::*;
        let start: Vec<_> = VmState::ALL.into_iter().filter(|s| s.can_start()).collect();
        assert_eq!(start, [Created, Stopped, Error]);
        let stop: Vec<_> = VmState::ALL.into_iter().filter(|s| s.can_stop()).collect();
        assert_eq!(stop, [Running]);
        let kill: Vec<_> = VmState::ALL.into_iter().filter(|s| s.can_kill()).collect();
        assert_eq!(kill, [Starting, Running, Stopping, Error]);
        let delete: Vec<_> = VmState::ALL
            .into_iter()
            .filter(|s| s.can_delete())
            .collect();
        assert_eq!(delete, [Created, Stopped, Error]);
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(VmState::parse("bogus"), None);
    }
}
