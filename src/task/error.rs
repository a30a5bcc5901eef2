//! Task errors, each classified: whether retrying could succeed (Nomad's
//! RecoverableError) and what kind of failure it is. `driver/` turns the
//! classification into a gRPC status.

use crate::cloudinit::CloudInitError;
use crate::config::ConfigError;
use crate::guest_agent::GuestAgentError;
use crate::libvirt::domain_xml::DomainXmlError;
use crate::libvirt::LibvirtError;
use crate::net::NetError;
use crate::nomad::driver_state::DriverStateError;
use crate::storage::StorageError;

use crate::hypervisor::HypervisorError;

/// What kind of failure an error is; the driver maps each to a gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The job's input is wrong; the message says how to fix it.
    Invalid,
    /// The hypervisor cannot be reached right now.
    Unavailable,
    /// No such task.
    NotFound,
    /// The task is in a state that does not allow this.
    Conflict,
    /// Something on the host failed.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A bad value in the task's config or resources, named and explained.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cloud-init seed: {0}")]
    CloudInit(#[from] CloudInitError),
    #[error(transparent)]
    DomainXml(#[from] DomainXmlError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Handle(#[from] DriverStateError),
    #[error(transparent)]
    Journal(#[from] super::journal::JournalError),
    #[error("task {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("task {task_id} runs without the QEMU guest agent, which exec and signal_commands need; set guest_agent = true in the task config (the default) and install and start qemu-guest-agent in the image")]
    AgentDisabled { task_id: String },
    #[error("the guest agent of task {task_id} does not answer; install and start qemu-guest-agent in the image (the guest may also still be booting)")]
    AgentUnreachable {
        task_id: String,
        #[source]
        source: GuestAgentError,
    },
    #[error("the guest agent of task {task_id} failed")]
    Agent {
        task_id: String,
        #[source]
        source: GuestAgentError,
    },
    #[error("signal {signal} has no entry in the task config's signal_commands; add one, e.g. signal_commands = {{ {signal} = \"systemctl reload myservice\" }} (SIGTERM, SIGINT and SIGKILL work without one)")]
    UnmappedSignal { signal: String },
    #[error("signal_commands.{signal} exited with {exit_code} in the guest: {stderr}")]
    SignalCommandFailed {
        signal: String,
        exit_code: i64,
        stderr: String,
    },
    /// A blocking worker died (a panic in a libvirt or network call).
    #[error("{action} failed: the worker thread stopped unexpectedly")]
    Worker {
        action: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl From<HypervisorError> for TaskError {
    fn from(error: HypervisorError) -> Self {
        match error {
            HypervisorError::Libvirt(error) => TaskError::Libvirt(error),
            HypervisorError::Storage(error) => TaskError::Storage(error),
            HypervisorError::DomainXml(error) => TaskError::DomainXml(error),
        }
    }
}

impl TaskError {
    /// Names the job field a storage error is about.
    #[must_use]
    pub fn in_field(self, field: &str) -> Self {
        match self {
            TaskError::Storage(error) => TaskError::Storage(error.in_field(field)),
            other => other,
        }
    }

    /// Whether retrying the same call could succeed (Nomad then applies
    /// the job's restart policy instead of failing the task for good).
    pub fn recoverable(&self) -> bool {
        match self {
            TaskError::Config(_)
            | TaskError::Invalid(_)
            | TaskError::DomainXml(_)
            | TaskError::Handle(_)
            | TaskError::NotFound(_)
            | TaskError::Conflict(_)
            | TaskError::AgentDisabled { .. }
            | TaskError::UnmappedSignal { .. }
            | TaskError::SignalCommandFailed { .. } => false,
            TaskError::AgentUnreachable { .. } => true,
            TaskError::Agent { source, .. } => !matches!(
                source,
                GuestAgentError::EmptyArgv | GuestAgentError::NulInArgv { .. }
            ),
            // Bad input in the seed is the job's fault; hashing, randomness
            // and ISO writing failing is the host's.
            TaskError::CloudInit(error) => !matches!(
                error,
                CloudInitError::EmptyInstanceId
                    | CloudInitError::InvalidInstanceId { .. }
                    | CloudInitError::InvalidHostname { .. }
                    | CloudInitError::InvalidTimezone { .. }
                    | CloudInitError::EmptyPassword
            ),
            TaskError::Storage(error) => error.is_recoverable(),
            TaskError::Net(NetError::Invalid(_)) => false,
            TaskError::Libvirt(_)
            | TaskError::Net(_)
            | TaskError::Worker { .. }
            | TaskError::Journal(_) => true,
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TaskError::NotFound(_) => ErrorKind::NotFound,
            TaskError::Conflict(_) | TaskError::AgentDisabled { .. } => ErrorKind::Conflict,
            TaskError::AgentUnreachable { .. } => ErrorKind::Unavailable,
            TaskError::SignalCommandFailed { .. } => ErrorKind::Internal,
            TaskError::Libvirt(LibvirtError::Connect { .. }) => ErrorKind::Unavailable,
            _ if !self.recoverable() => ErrorKind::Invalid,
            _ => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_of_each_kind() {
        let unreachable = TaskError::Libvirt(LibvirtError::Connect {
            uri: "qemu:///system".into(),
            source: crate::libvirt::VirtError::sample_unsupported(),
        });
        assert!(unreachable.recoverable());
        assert_eq!(unreachable.kind(), ErrorKind::Unavailable);
        let invalid = TaskError::Invalid("hostname: bad".into());
        assert!(!invalid.recoverable());
        assert_eq!(invalid.kind(), ErrorKind::Invalid);
        assert_eq!(TaskError::NotFound("x".into()).kind(), ErrorKind::NotFound);
        assert_eq!(TaskError::Conflict("x".into()).kind(), ErrorKind::Conflict);
        let host = TaskError::Net(NetError::Teardown("rules".into()));
        assert!(host.recoverable());
        assert_eq!(host.kind(), ErrorKind::Internal);
        assert!(!TaskError::Handle(DriverStateError::Missing).recoverable());
    }
}
