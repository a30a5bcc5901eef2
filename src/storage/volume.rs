//! Volume naming and the host-side image work that needs no libvirt:
//!
//! - task disks: `<vm>_<dev>.qcow2` or `<vm>_<dev>.img` (raw), like the Go
//!   driver's `<vm>_<dev>.img`;
//! - the cloud-init seed: `<vm>_cidata.iso`;
//! - shared parents of chained disks: `nomad-virt-base-<fmt>-<key>.<ext>`,
//!   where the key is the SHA-256 of the bytes uploaded (see
//!   [`super::parent_key`]);
//! - parents being uploaded: `<parent name>.partial-<unique>`, published
//!   under the parent name only once complete;
//!
//! The libvirt side (creating, uploading, deleting volumes) is
//! [`crate::libvirt::storage`].

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::{ImageFormat, StorageError};

/// Name prefix of the shared parent volumes of chained disks.
pub const PARENT_PREFIX: &str = "nomad-virt-base-";
/// Marks a parent volume whose upload has not finished.
pub const STAGING_MARK: &str = ".partial-";

/// The volume of a task disk: `<vm>_<dev>.qcow2` or `<vm>_<dev>.img`.
pub fn disk_volume_name(vm_name: &str, target_dev: &str, format: ImageFormat) -> String {
    format!("{vm_name}_{target_dev}.{}", format.extension())
}

/// The volume holding a VM's cloud-init NoCloud seed ISO.
pub fn seed_volume_name(vm_name: &str) -> String {
    format!("{vm_name}_cidata.iso")
}

/// The shared parent volume for an image with cache key `cache_key` (see
/// [`super::parent_key`]).
pub fn parent_volume_name(format: ImageFormat, cache_key: &str) -> String {
    format!(
        "{PARENT_PREFIX}{}-{cache_key}.{}",
        format.as_str(),
        format.extension()
    )
}

/// Volume names in directory pools are file names: refuses what a file
/// name cannot be.
pub fn check_volume_name(name: &str) -> Result<(), StorageError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("it is a directory name")
    } else if name.contains('/') || name.contains('\0') {
        Some("it contains '/' or a NUL byte")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StorageError::VolumeName {
            volume: name.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// A suffix unique within this host: pid, a counter and the time.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temporary file removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), %error, "could not remove a temporary image");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            disk_volume_name("web-1a2b", "vda", ImageFormat::Qcow2),
            "web-1a2b_vda.qcow2"
        );
        assert_eq!(
            disk_volume_name("web-1a2b", "sdb", ImageFormat::Raw),
            "web-1a2b_sdb.img"
        );
        assert_eq!(seed_volume_name("web-1a2b"), "web-1a2b_cidata.iso");
        assert_eq!(
            parent_volume_name(ImageFormat::Qcow2, "00ff"),
            "nomad-virt-base-qcow2-00ff.qcow2"
        );
        assert_eq!(
            parent_volume_name(ImageFormat::Raw, "00ff"),
            "nomad-virt-base-raw-00ff.img"
        );
        assert!(parent_volume_name(ImageFormat::Raw, "k").starts_with(PARENT_PREFIX));
        for bad in ["", ".", "..", "a/b", "a\0b", &"x".repeat(256)] {
            assert!(
                matches!(check_volume_name(bad), Err(StorageError::VolumeName { .. })),
                "{bad:?}"
            );
        }
        check_volume_name("ok_name-1.qcow2").unwrap();
    }
}
