//! Storage: directory pools, volumes for task disks, and the image allow-list.
//!
//! - [`images`] opens a job's `disk[N].source.image` once beneath the
//!   allowed directories and reads image headers from that descriptor
//!   (no libvirt).
//! - [`volume`] names volumes.
//! - [`copy`] copies an image into a volume file on this host (reflink or
//!   sparse copy) and counts the bytes done.
//! - [`qemu_img`] converts images with qemu-img under CPU and memory limits.
//! - [`parent_key`] keys shared parents by the digest of the bytes read.
//!
//! Pools and volumes themselves are made through libvirt, in
//! [`crate::libvirt::storage`].

use std::path::PathBuf;

pub mod copy;
pub mod images;
pub mod parent_key;
pub mod qemu_img;
pub mod volume;

pub use images::{
    check_image_safe, detect_format, image_virtual_size, open_image, qcow2_virtual_size, ImageFile,
    ImageFormat,
};
pub use volume::{
    disk_volume_name, is_driver_volume_name, parent_volume_name, seed_volume_name, PARENT_PREFIX,
};

/// Errors of the storage module. Each names the pool, volume or path
/// involved and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Another storage error, attributed to a job field such as
    /// `disk[0].source.image` (see [`StorageError::in_field`]).
    #[error("{field}: {inner}")]
    InField {
        field: String,
        inner: Box<StorageError>,
    },
    #[error(
        "image {requested:?} was not found in the task dir, the alloc dir or the plugin's \
         image_paths; put it in the task dir (e.g. with an artifact block) or ask the operator \
         to place it under image_paths"
    )]
    ImageNotFound { requested: String },
    #[error(
        "image {requested:?} is outside the directories images may come from (the task dir, the \
         alloc dir and the plugin's image_paths); name a file inside one of them"
    )]
    ImageNotAllowed { requested: String },
    /// Found but refused by the safe open (symlink, special file, hard
    /// link, `..` escape) or unreadable.
    #[error("image {requested:?} cannot be used: {reason}")]
    ImageOpen {
        requested: String,
        #[source]
        reason: crate::fsopen::OpenError,
    },
    #[error("image {} cannot be used: {reason}", path.display())]
    UnsafeImage { path: PathBuf, reason: String },
    /// The image was rewritten after the size check (by a sibling task or
    /// anyone else who can write it): more than the checked size.
    #[error(
        "image {} grew after its size was checked: {found} than the {cap} bytes checked; \
         do not change the image while the task starts",
        path.display()
    )]
    GrewAfterCheck {
        path: PathBuf,
        found: String,
        cap: u64,
    },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error(
        "cannot run qemu-img to {action} {}; is qemu-img (package qemu-utils) installed?",
        path.display()
    )]
    QemuImgSpawn {
        action: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("qemu-img {action} failed for {} ({status}): {stderr}; is the image intact?", path.display())]
    QemuImg {
        action: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error(
        "storage pool {pool:?} already exists with target path {} but the plugin config wants {}; \
         fix storage_pools.directory.{pool}.path, or use another pool name",
        existing.display(),
        wanted.display()
    )]
    PoolPathMismatch {
        pool: String,
        existing: PathBuf,
        wanted: PathBuf,
    },
    #[error(
        "storage pool {pool:?} already exists with type {pool_type:?}; a directory pool must have \
         type \"dir\" (or \"fs\"/\"netfs\"): use another pool name"
    )]
    PoolType { pool: String, pool_type: String },
    #[error("storage pool {pool:?}: cannot read libvirt's pool XML")]
    PoolXml {
        pool: String,
        #[source]
        source: HypervisorSource,
    },
    #[error("volume {volume:?} in storage pool {pool:?}: cannot read libvirt's volume XML")]
    VolumeXml {
        pool: String,
        volume: String,
        #[source]
        source: HypervisorSource,
    },
    #[error("storage pool {pool:?}: libvirt failed while {action}")]
    Pool {
        pool: String,
        action: String,
        #[source]
        source: HypervisorSource,
    },
    #[error(
        "volume {volume:?} already exists in storage pool {pool:?}; delete it first \
         (a leftover of an earlier attempt?)"
    )]
    VolumeExists { pool: String, volume: String },
    #[error(
        "volume {volume:?} does not exist in storage pool {pool:?}; create it first \
         (e.g. `virsh vol-create-as {pool} {volume} 10G --format qcow2`) or fix the name"
    )]
    VolumeNotFound { pool: String, volume: String },
    #[error(
        "storage pool {pool:?} does not exist in libvirt; it should have been prepared before use"
    )]
    PoolMissing { pool: String },
    #[error(
        "volume {volume:?} in storage pool {pool:?} is one the driver made for a task (its name \
         has the form of a task disk, seed or shared parent); a job may only clone volumes the \
         operator made: name another volume, or copy this one under another name"
    )]
    DriverOwnedVolume { pool: String, volume: String },
    #[error("volume {volume:?} in storage pool {pool:?} cannot be a source: {reason}")]
    UnsafeSourceVolume {
        pool: String,
        volume: String,
        reason: String,
    },
    /// A Ceph pool whose monitors cannot be reached, or that refuses the
    /// configured credentials (or lacks the Ceph pool). Never carries the key.
    #[error(
        "Ceph storage pool {pool:?} (Ceph pool {ceph_pool:?} on {hosts}, as client.{username}) \
         is not usable: {problem}"
    )]
    CephUnavailable {
        pool: String,
        ceph_pool: String,
        hosts: String,
        username: String,
        problem: String,
    },
    #[error(
        "storage pool {pool:?} already exists in libvirt with type {pool_type:?}; the Ceph pool \
         of the plugin config needs an \"rbd\" pool: use another pool name"
    )]
    CephPoolType { pool: String, pool_type: String },
    #[error("volume name {volume:?} is invalid: {reason}")]
    VolumeName { volume: String, reason: String },
    #[error("volume {volume:?} in storage pool {pool:?}: libvirt failed while {action}")]
    Volume {
        pool: String,
        volume: String,
        action: String,
        #[source]
        source: HypervisorSource,
    },
}

/// The hypervisor's own error behind a storage failure (libvirt's, or its
/// XML), kept whole as the source; the libvirt layer builds these.
pub type HypervisorSource = Box<dyn std::error::Error + Send + Sync + 'static>;

impl StorageError {
    /// Attributes the error to a job field, e.g.
    /// `open_image(..).map_err(|e| e.in_field(format!("disk[{i}].source.image")))`.
    pub fn in_field(self, field: impl Into<String>) -> Self {
        StorageError::InField {
            field: field.into(),
            inner: Box::new(self),
        }
    }

    /// The error under any [`StorageError::InField`] wrappers.
    pub fn root(&self) -> &StorageError {
        match self {
            StorageError::InField { inner, .. } => inner.root(),
            other => other,
        }
    }

    /// Whether retrying the same start could succeed: false for a problem
    /// with the job's input or the operator's pool config, true for host
    /// and libvirt failures. Exhaustive on purpose: a new variant must be
    /// classified here.
    pub fn is_recoverable(&self) -> bool {
        match self {
            StorageError::InField { inner, .. } => inner.is_recoverable(),
            // A failed read of a file that is there may pass.
            StorageError::ImageOpen { reason, .. } => {
                matches!(
                    reason,
                    crate::fsopen::OpenError::Io(_) | crate::fsopen::OpenError::Changed
                )
            }
            StorageError::ImageNotFound { .. }
            | StorageError::ImageNotAllowed { .. }
            | StorageError::UnsafeImage { .. }
            | StorageError::GrewAfterCheck { .. }
            | StorageError::PoolPathMismatch { .. }
            | StorageError::PoolType { .. }
            | StorageError::CephPoolType { .. }
            | StorageError::VolumeName { .. }
            | StorageError::DriverOwnedVolume { .. }
            | StorageError::UnsafeSourceVolume { .. } => false,
            // The cluster may come back, or the operator fix the key.
            StorageError::CephUnavailable { .. }
            | StorageError::Io { .. }
            | StorageError::QemuImgSpawn { .. }
            | StorageError::QemuImg { .. }
            | StorageError::PoolXml { .. }
            | StorageError::VolumeXml { .. }
            | StorageError::Pool { .. }
            | StorageError::VolumeExists { .. }
            | StorageError::VolumeNotFound { .. }
            | StorageError::PoolMissing { .. }
            | StorageError::Volume { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_field_prefixes_the_message() {
        let error = StorageError::ImageNotFound {
            requested: "x.img".into(),
        }
        .in_field("disk[0].source.image");
        assert!(
            error
                .to_string()
                .starts_with("disk[0].source.image: image \"x.img\" was not found in the task dir"),
            "{error}"
        );
        assert!(matches!(error.root(), StorageError::ImageNotFound { .. }));
        assert!(!error.is_recoverable());
    }
}
