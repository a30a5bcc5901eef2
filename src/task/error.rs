//! Task errors and how they reach Nomad: a gRPC code plus, for StartTask,
//! Nomad's RecoverableError detail that decides whether it restarts the task.

use prost::Message;
use tonic::{Code, Status};

use crate::cloudinit::CloudInitError;
use crate::config::ConfigError;
use crate::libvirt::domain_xml::DomainXmlError;
use crate::libvirt::LibvirtError;
use crate::storage::StorageError;

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
    Net(#[from] crate::net::NetError),
    #[error("task {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

impl TaskError {
    /// Whether retrying the same start could succeed (Nomad then applies
    /// the job's restart policy instead of failing the task for good).
    pub fn recoverable(&self) -> bool {
        match self {
            TaskError::Config(_) | TaskError::Invalid(_) | TaskError::DomainXml(_) => false,
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
            TaskError::Storage(error) => !matches!(
                error.root(),
                StorageError::ImageNotFound { .. }
                    | StorageError::ImageNotAllowed { .. }
                    | StorageError::ImageNotFile { .. }
                    | StorageError::UnsafeImage { .. }
                    | StorageError::PoolPathMismatch { .. }
                    | StorageError::PoolType { .. }
                    | StorageError::VolumeName { .. }
            ),
            TaskError::Libvirt(_) => true,
            TaskError::Net(crate::net::NetError::Invalid(_)) => false,
            TaskError::Net(_) => true,
            TaskError::NotFound(_) | TaskError::Conflict(_) => false,
        }
    }

    fn code(&self) -> Code {
        match self {
            TaskError::Config(_) | TaskError::Invalid(_) | TaskError::DomainXml(_) => {
                Code::InvalidArgument
            }
            TaskError::CloudInit(_) if !self.recoverable() => Code::InvalidArgument,
            TaskError::CloudInit(_) => Code::Internal,
            TaskError::Storage(_) if !self.recoverable() => Code::InvalidArgument,
            TaskError::Storage(_) => Code::Internal,
            TaskError::Libvirt(LibvirtError::Connect { .. }) => Code::Unavailable,
            TaskError::Libvirt(_) => Code::Internal,
            TaskError::Net(crate::net::NetError::Invalid(_)) => Code::InvalidArgument,
            TaskError::Net(_) => Code::Internal,
            TaskError::NotFound(_) => Code::NotFound,
            TaskError::Conflict(_) => Code::FailedPrecondition,
        }
    }
}

/// google.rpc.Status, the payload of `grpc-status-details-bin`.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

const RECOVERABLE_ERROR_TYPE_URL: &str =
    "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";

/// A status carrying Nomad's RecoverableError as its first detail.
pub fn status_with_recoverable(code: Code, message: String, recoverable: bool) -> Status {
    let detail =
        crate::pb::hashicorp::nomad::plugins::shared::structs::RecoverableError { recoverable };
    let details = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: RECOVERABLE_ERROR_TYPE_URL.into(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// Reads the RecoverableError detail back (used by the simulator and tests).
pub fn recoverable_from_status(status: &Status) -> Option<bool> {
    let details = RpcStatus::decode(status.details()).ok()?;
    let first = details.details.first()?;
    if first.type_url != RECOVERABLE_ERROR_TYPE_URL {
        return None;
    }
    crate::pb::hashicorp::nomad::plugins::shared::structs::RecoverableError::decode(
        first.value.as_slice(),
    )
    .ok()
    .map(|detail| detail.recoverable)
}

impl From<TaskError> for Status {
    fn from(error: TaskError) -> Status {
        status_with_recoverable(error.code(), error.to_string(), error.recoverable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoverable_detail_round_trips() {
        let status: Status = TaskError::Libvirt(LibvirtError::Connect {
            uri: "qemu:///system".into(),
            source: crate::libvirt::VirtError::sample_missing_network(),
        })
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(recoverable_from_status(&status), Some(true));
        let status: Status = TaskError::Invalid("hostname: bad".into()).into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(recoverable_from_status(&status), Some(false));
        assert_eq!(status.message(), "hostname: bad");
    }
}
