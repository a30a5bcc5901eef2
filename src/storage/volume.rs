//! Volume naming and the host-side image work that needs no libvirt:
//!
//! - task disks: `<vm>_<dev>.qcow2` or `<vm>_<dev>.img` (raw), like the Go
//!   driver's `<vm>_<dev>.img`;
//! - the cloud-init seed: `<vm>_cidata.iso`;
//! - shared parents of chained disks: `nomad-virt-base-<fmt>-<key>.<ext>`,
//!   where the key comes from the image's canonical path, size, mtime,
//!   ctime and inode — never from hashing the whole image on every start,
//!   as the Go driver does;
//! - parents being uploaded: `<parent name>.partial-<unique>`, published
//!   under the parent name only once complete;
//! - format conversion with `qemu-img convert` into a private temporary file.
//!
//! The libvirt side (creating, uploading, deleting volumes) is
//! [`crate::libvirt::storage`].

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::{ImageFormat, StorageError};

/// Name prefix of the shared parent volumes of chained disks.
pub const PARENT_PREFIX: &str = "nomad-virt-base-";
/// Name prefix of the Go driver's shared parents (`nmdsrc-<fmt>-<sha>.img`).
pub const GO_PARENT_PREFIX: &str = "nmdsrc-";
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
/// [`image_cache_key`]).
pub fn parent_volume_name(format: ImageFormat, cache_key: &str) -> String {
    format!(
        "{PARENT_PREFIX}{}-{cache_key}.{}",
        format.as_str(),
        format.extension()
    )
}

/// A cache key for an image file: a 128-bit FNV-1a hash, in hex, of its
/// canonical path, device, inode, size, mtime and ctime. Reading metadata
/// instead of the contents keeps starts fast for big images; any rewrite
/// changes the ctime (which users cannot set), so a changed image gets a
/// new parent. It is a cache key, not a security boundary.
pub fn image_cache_key(path: &Path) -> Result<String, StorageError> {
    let io_error = |error| StorageError::Io {
        action: "read metadata of image",
        path: path.to_path_buf(),
        error,
    };
    let canonical = std::fs::canonicalize(path).map_err(io_error)?;
    let meta = std::fs::metadata(&canonical).map_err(io_error)?;
    let mut hash = Fnv128::new();
    hash.write(canonical.as_os_str().as_encoded_bytes());
    hash.write(&[0]);
    for value in [
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
    ] {
        hash.write(&value.to_le_bytes());
    }
    Ok(format!("{:032x}", hash.0))
}

struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;

    fn new() -> Self {
        Fnv128(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u128::from(*byte);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }
}

/// Whether `name` is one the driver (this one or the Go driver) gives its
/// own volumes: task disks (`<vm>_<dev>.qcow2`/`.img`), seeds
/// (`<vm>_cidata.iso`), shared parents and their staging copies. Such a
/// volume holds another task's data, so a job may not name it as
/// `source.volume`.
pub fn is_driver_volume_name(name: &str) -> bool {
    if name.starts_with(PARENT_PREFIX)
        || name.starts_with(GO_PARENT_PREFIX)
        || name.contains(STAGING_MARK)
        || name.ends_with("_cidata.iso")
    {
        return true;
    }
    let Some(stem) = name
        .strip_suffix(".qcow2")
        .or_else(|| name.strip_suffix(".img"))
    else {
        return false;
    };
    // `<vm>_<dev>`: the device part is what device naming produces (a bus
    // prefix and letters) or a job's devname (lower-case letters/digits).
    let Some((vm, dev)) = stem.rsplit_once('_') else {
        return false;
    };
    if vm.is_empty() {
        return false;
    }
    let generated_dev = ["vd", "sd", "hd", "xvd"].iter().any(|prefix| {
        dev.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty() && rest.len() <= 4 && rest.bytes().all(|b| b.is_ascii_lowercase())
        })
    });
    // A job's own devname can be any short name, so a volume of one of our
    // domains (`<task>-<8 characters of the task id>`) counts whatever its
    // device part.
    let any_devname = !dev.is_empty()
        && dev.len() <= 8
        && dev
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let our_domain = vm.rsplit_once('-').is_some_and(|(task, suffix)| {
        !task.is_empty() && suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    generated_dev || (our_domain && any_devname)
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

/// Converts `image` to `to` with qemu-img into a new temporary file.
pub fn convert(image: &Path, from: ImageFormat, to: ImageFormat) -> Result<TempFile, StorageError> {
    let path = std::env::temp_dir().join(format!(
        "nomad-virt-convert-{}.{}",
        unique_suffix(),
        to.extension()
    ));
    // Created 0600 first: qemu-img keeps the mode of an existing file, so
    // the guest data is never readable by others.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|error| StorageError::Io {
            action: "create temporary file",
            path: path.clone(),
            error,
        })?;
    let temp = TempFile { path };
    let output = Command::new("qemu-img")
        .args(["convert", "-q", "-f", from.as_str(), "-O", to.as_str()])
        .arg(image)
        .arg(&temp.path)
        .output()
        .map_err(|error| StorageError::QemuImgSpawn {
            action: "convert",
            path: image.to_path_buf(),
            error,
        })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            action: "convert",
            path: image.to_path_buf(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(temp)
}

/// Writes the image at `image` (in `format`) onto the block device
/// `device` (a Nomad volume), as raw bytes from offset 0. Refused before
/// any write: unsafe images ([`super::check_image_safe`]) and images whose
/// virtual size exceeds the device.
pub fn write_image_to_device(
    image: &Path,
    format: ImageFormat,
    device: &Path,
) -> Result<(), StorageError> {
    use std::io::{Seek, SeekFrom};
    super::check_image_safe(image, format)?;
    let virtual_size = super::image_virtual_size(image, format)?;
    let device_size = std::fs::File::open(device)
        .and_then(|mut file| file.seek(SeekFrom::End(0)))
        .map_err(|error| StorageError::Io {
            action: "read the size of block device",
            path: device.to_path_buf(),
            error,
        })?;
    if virtual_size > device_size {
        return Err(StorageError::UnsafeImage {
            path: image.to_path_buf(),
            reason: format!(
                "its virtual size ({virtual_size} bytes) exceeds the volume's block device \
                 ({device_size} bytes); request a larger volume (capacity_min)"
            ),
        });
    }
    // -n: write into the existing device instead of creating a file.
    let output = Command::new("qemu-img")
        .args(["convert", "-q", "-n", "-f", format.as_str(), "-O", "raw"])
        .arg(image)
        .arg(device)
        .output()
        .map_err(|error| StorageError::QemuImgSpawn {
            action: "write",
            path: image.to_path_buf(),
            error,
        })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            action: "write",
            path: image.to_path_buf(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::time::Duration;

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

    #[test]
    fn driver_volume_names_are_recognised() {
        for ours in [
            disk_volume_name("web-1a2b3c4d", "vda", ImageFormat::Qcow2).as_str(),
            "web-1a2b3c4d_sdb.img",
            "task_hdc.img",
            "web-1a2b_cidata.iso",
            "nomad-virt-base-qcow2-00ff.qcow2",
            "nomad-virt-base-raw-00ff.img.partial-1-2-3",
            "nmdsrc-qcow2-abcdef.img",
            "python-server_vda.img",
            // A job's own devname on one of our domains.
            "web-1a2b3c4d_data.qcow2",
            "web-1a2b3c4d_d1.img",
        ] {
            assert!(is_driver_volume_name(ours), "{ours}");
        }
        for operators in [
            "focal.img",
            "debian-12.qcow2",
            "ubuntu_focal.img",
            "_vda.img",
            "data_vd.img",
            "base_vda.raw",
            "ubuntu-focal_data.img",
            "web-1a2b3c4d_Data.img",
        ] {
            assert!(!is_driver_volume_name(operators), "{operators}");
        }
    }

    #[test]
    fn cache_key_follows_file_identity() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        std::fs::write(&image, b"one").unwrap();
        let key = image_cache_key(&image).unwrap();
        assert_eq!(key.len(), 32);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(image_cache_key(&image).unwrap(), key, "stable");
        // The same file through a symlink: same key.
        std::os::unix::fs::symlink(&image, dir.path().join("link.img")).unwrap();
        assert_eq!(image_cache_key(&dir.path().join("link.img")).unwrap(), key);
        // Another file with the same content: another key.
        std::fs::write(dir.path().join("b.img"), b"one").unwrap();
        assert_ne!(image_cache_key(&dir.path().join("b.img")).unwrap(), key);
        // Rewritten in place with the same size and mtime: still another key
        // (the ctime moves).
        let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&image, b"two").unwrap();
        File::options()
            .write(true)
            .open(&image)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_ne!(image_cache_key(&image).unwrap(), key);
        assert!(image_cache_key(&dir.path().join("missing")).is_err());
    }
}
