//! Storage: directory pools, volumes for task disks, and the image allow-list.
//!
//! - [`images`] resolves a job's `disk[N].source.image` against the allowed
//!   directories and reads image headers (no libvirt).
//! - [`volume`] names volumes and converts images with qemu-img.
//!
//! Pools and volumes themselves are made through libvirt, in
//! [`crate::libvirt::storage`].

use std::fmt::Write as _;
use std::path::PathBuf;

pub mod images;
pub mod volume;

pub use images::{
    check_image_safe, detect_format, image_virtual_size, qcow2_virtual_size, resolve_image,
    ImageFormat,
};
pub use volume::{
    disk_volume_name, image_cache_key, is_driver_volume_name, parent_volume_name, seed_volume_name,
    PARENT_PREFIX,
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
    #[error("image {requested:?} was not found; tried {}", list_paths(tried))]
    ImageNotFound {
        requested: String,
        tried: Vec<PathBuf>,
    },
    #[error(
        "image {requested:?} resolves to {}, which is outside the allowed directories ({}); \
         put the image in one of them or add its directory to the plugin config's image_paths",
        resolved.display(),
        list_paths(allowed)
    )]
    ImageNotAllowed {
        requested: String,
        resolved: PathBuf,
        allowed: Vec<PathBuf>,
    },
    #[error("image {requested:?} resolves to {}, which is not a regular file", path.display())]
    ImageNotFile { requested: String, path: PathBuf },
    #[error("image {} cannot be used: {reason}", path.display())]
    UnsafeImage { path: PathBuf, reason: String },
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
    /// `resolve_image(..).map_err(|e| e.in_field(format!("disk[{i}].source.image")))`.
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
            StorageError::ImageNotFound { .. }
            | StorageError::ImageNotAllowed { .. }
            | StorageError::ImageNotFile { .. }
            | StorageError::UnsafeImage { .. }
            | StorageError::PoolPathMismatch { .. }
            | StorageError::PoolType { .. }
            | StorageError::VolumeName { .. }
            | StorageError::DriverOwnedVolume { .. }
            | StorageError::UnsafeSourceVolume { .. } => false,
            StorageError::Io { .. }
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

fn list_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "none".to_string();
    }
    let mut out = String::new();
    for (i, path) in paths.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{}", path.display());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_field_prefixes_the_message() {
        let error = StorageError::ImageNotFound {
            requested: "x.img".into(),
            tried: vec!["/a/x.img".into(), "/b/x.img".into()],
        }
        .in_field("disk[0].source.image");
        assert_eq!(
            error.to_string(),
            "disk[0].source.image: image \"x.img\" was not found; tried /a/x.img, /b/x.img"
        );
        assert!(matches!(error.root(), StorageError::ImageNotFound { .. }));
        assert!(!error.is_recoverable());
    }
}
