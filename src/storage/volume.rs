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
use std::path::{Path, PathBuf};
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
/// [`super::parent_key`]).
pub fn parent_volume_name(format: ImageFormat, cache_key: &str) -> String {
    format!(
        "{PARENT_PREFIX}{}-{cache_key}.{}",
        format.as_str(),
        format.extension()
    )
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
        .or_else(|| name.strip_suffix(".iso"))
    else {
        return false;
    };
    // `<vm>_<dev>`: the device part is what device naming produces (a bus
    // prefix and letters) or, on one of our domains, a job's devname,
    // which the Go driver let be anything (`data-disk`, `data_1`, `Data`).
    let generated = stem.rsplit_once('_').is_some_and(|(vm, dev)| {
        !vm.is_empty()
            && ["vd", "sd", "hd", "xvd"].iter().any(|prefix| {
                dev.strip_prefix(prefix).is_some_and(|rest| {
                    !rest.is_empty()
                        && rest.len() <= 4
                        && rest.bytes().all(|b| b.is_ascii_lowercase())
                })
            })
    });
    // One of our domains is `<task>-<8 characters of the task id>`; the
    // first `_` after such a prefix starts the device part, whatever
    // follows (a devname may itself hold `_`).
    let our_domain = stem.match_indices('_').any(|(at, _)| {
        let (vm, dev) = (&stem[..at], &stem[at + 1..]);
        !dev.is_empty()
            && vm.rsplit_once('-').is_some_and(|(task, suffix)| {
                !task.is_empty()
                    && suffix.len() == 8
                    && suffix.bytes().all(|b| b.is_ascii_alphanumeric())
            })
    });
    generated || our_domain
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

/// Prefixes of the temporary files named with [`unique_suffix`] (so their
/// names carry the pid of the process that made them).
const TEMP_FILE_PREFIXES: &[&str] = &["nomad-virt-convert-", "nomad-virt-cephx-"];

/// Where those temporary files go: /run (cephx key files, when root) and
/// the temp dir.
pub fn temp_file_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from("/run"), std::env::temp_dir()]
}

/// Removes the temporary files (converted images, cephx key files) that a
/// plugin killed mid-work left in `dirs`: those whose name carries the pid
/// of a process that is gone. Only our own regular files; links and
/// anything else are left alone, and unlinking never follows a name.
/// Returns what was removed.
pub fn remove_stale_temp_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    // Liveness is read from /proc; without it every file would look stale.
    if !Path::new("/proc/self").exists() {
        return Vec::new();
    }
    let owner = rustix::process::geteuid().as_raw();
    let mut removed = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(temp_file_pid) else {
                continue;
            };
            if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let path = entry.path();
            let ours = std::fs::symlink_metadata(&path)
                .is_ok_and(|meta| meta.file_type().is_file() && meta.uid() == owner);
            if ours && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

/// The pid in a temporary file's name, if it is one of ours.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = TEMP_FILE_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?;
    rest.split('-').next()?.parse().ok()
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
    fn stale_temp_files_of_dead_processes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A pid that is gone: a child that exited and was reaped.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let dead = child.id();
        child.wait().expect("wait");
        let live = std::process::id();
        let parent = rustix::process::getppid().map_or(1, |pid| pid.as_raw_nonzero().get() as u32);
        let path = |name: String| dir.path().join(name);
        let stale_key = path(format!("nomad-virt-cephx-{dead}-0-1f.key"));
        let stale_image = path(format!("nomad-virt-convert-{dead}-3-2e.raw"));
        let mine = path(format!("nomad-virt-convert-{live}-0-1.raw"));
        let another_live = path(format!("nomad-virt-cephx-{parent}-0-1.key"));
        let unrelated = path(format!("something-{dead}-0-1.key"));
        let link = path(format!("nomad-virt-cephx-{dead}-9-9.key"));
        let target = path("target".into());
        for file in [
            &stale_key,
            &stale_image,
            &mine,
            &another_live,
            &unrelated,
            &target,
        ] {
            std::fs::write(file, b"x").expect("write");
        }
        std::os::unix::fs::symlink(&target, &link).expect("symlink");

        let mut removed = remove_stale_temp_files(&[dir.path().to_path_buf()]);
        removed.sort();
        let mut expected = vec![stale_key.clone(), stale_image.clone()];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(!stale_key.exists() && !stale_image.exists());
        for kept in [&mine, &another_live, &unrelated, &target] {
            assert!(kept.exists(), "{} must stay", kept.display());
        }
        assert!(
            std::fs::symlink_metadata(&link).is_ok(),
            "links are left alone"
        );
        assert_eq!(temp_file_pid("nomad-virt-cephx-12-0-ab.key"), Some(12));
        assert_eq!(temp_file_pid("nomad-virt-cephx-x-0-ab.key"), None);
    }

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
            // Go-driver devnames were free-form.
            "web-1a2b3c4d_data-disk.img",
            "web-1a2b3c4d_data_1.img",
            "web-1a2b3c4d_Data.img",
            "my_task-1a2b3c4d_scratch.qcow2",
            "web-1a2b3c4d_blob.iso",
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
            "web-1a2b3c4d_.img",
            "web-1a2b3c4_data.img",
            "ubuntu-22.04.iso",
        ] {
            assert!(!is_driver_volume_name(operators), "{operators}");
        }
    }
}
