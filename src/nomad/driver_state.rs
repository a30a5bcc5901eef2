//! What the driver keeps in Nomad's task handle: everything a restarted
//! plugin needs to find, stop and tear down a task, without re-deriving it.
//! Versioned JSON; Nomad treats the bytes as opaque.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `TaskHandle.version` for handles we create. 0 means a pre-0.9 handle.
pub const TASK_HANDLE_VERSION: i32 = 1;
/// Version of the `DriverState` layout below.
pub const DRIVER_STATE_VERSION: u32 = 1;

/// A storage volume the driver created for a task (deleted on destroy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedVolume {
    pub pool: String,
    pub name: String,
}

/// The driver's part of the task handle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverState {
    pub version: u32,
    pub task_id: String,
    pub task_name: String,
    pub alloc_id: String,
    pub domain_name: String,
    /// Unix time in nanoseconds when the domain started.
    pub started_at_unix_nanos: i64,
    /// Volumes to delete on destroy, in creation order.
    pub volumes: Vec<CreatedVolume>,
    /// Where libvirt writes the serial console.
    pub console_log: Option<PathBuf>,
    /// Nomad's stdout FIFO the console is copied to.
    pub stdout_path: String,
    /// What networking put on the host, undone at destroy.
    #[serde(default)]
    pub net: Option<crate::net::TeardownSpec>,
    /// The guest address found at start, if any.
    #[serde(default)]
    pub guest_ip: Option<std::net::Ipv4Addr>,
    /// Which driver wrote the handle this state came from.
    #[serde(default)]
    pub origin: StateOrigin,
    /// The domain has the QEMU guest agent's channel (task config
    /// `guest_agent`); false for handles written before it existed.
    #[serde(default)]
    pub guest_agent: bool,
    /// The task config's `signal_commands`, for SignalTask after recovery.
    #[serde(default)]
    pub signal_commands: std::collections::BTreeMap<String, String>,
}

/// Which driver started a task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateOrigin {
    /// This driver; the state lists everything the task created.
    #[default]
    Native,
    /// The Go driver (hashicorp/nomad-driver-virt), adopted on recovery:
    /// its volumes are found from the domain's disks at recovery.
    GoDriver,
}

/// Why a handle's driver state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DriverStateError {
    #[error("task handle has no driver state; it was not created by this driver")]
    Missing,
    #[error("task handle driver state is not readable: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("task handle driver state is neither this driver's JSON ({json}) nor the Go driver's msgpack: {go}")]
    Unrecognised {
        json: serde_json::Error,
        #[source]
        go: crate::nomad::go_handle::GoHandleError,
    },
    #[error("task handle driver state version {found} is newer than this plugin understands ({supported}); upgrade the plugin")]
    TooNew { found: u32, supported: u32 },
}

impl DriverState {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DriverStateError> {
        if bytes.is_empty() {
            return Err(DriverStateError::Missing);
        }
        let state: DriverState = serde_json::from_slice(bytes)?;
        if state.version > DRIVER_STATE_VERSION {
            return Err(DriverStateError::TooNew {
                found: state.version,
                supported: DRIVER_STATE_VERSION,
            });
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DriverState {
        DriverState {
            version: DRIVER_STATE_VERSION,
            task_id: "a1/web/12345678".into(),
            task_name: "web".into(),
            alloc_id: "a1".into(),
            domain_name: "web-12345678".into(),
            started_at_unix_nanos: 1_700_000_000_000_000_000,
            volumes: vec![CreatedVolume {
                pool: "p".into(),
                name: "web-12345678_vda.qcow2".into(),
            }],
            console_log: Some("/alloc/web/console.log".into()),
            stdout_path: "/alloc/logs/.web.stdout.fifo".into(),
            net: Some(crate::net::TeardownSpec {
                task_tag: "nomad-driver-virt:a1/web/12345678".into(),
                ..Default::default()
            }),
            guest_ip: Some(std::net::Ipv4Addr::new(192, 168, 122, 10)),
            origin: StateOrigin::Native,
            guest_agent: false,
            signal_commands: Default::default(),
        }
    }

    #[test]
    fn round_trips() {
        let state = sample();
        assert_eq!(
            DriverState::decode(&state.encode()).expect("decodes"),
            state
        );
    }

    #[test]
    fn rejects_missing_corrupt_and_future_states() {
        assert!(matches!(
            DriverState::decode(b""),
            Err(DriverStateError::Missing)
        ));
        assert!(matches!(
            DriverState::decode(b"\x81\xa1a"),
            Err(DriverStateError::Corrupt(_))
        ));
        let mut future = sample();
        future.version = DRIVER_STATE_VERSION + 1;
        assert!(matches!(
            DriverState::decode(&future.encode()),
            Err(DriverStateError::TooNew { .. })
        ));
    }
}
