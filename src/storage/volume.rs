//! Volumes: names, creation (empty, from an image, as an overlay on a
//! shared parent), uploads through libvirt streams, deletion and the
//! garbage collection of unused parents.
//!
//! Naming:
//! - task disks: `<vm>_<dev>.qcow2` or `<vm>_<dev>.img` (raw), like the Go
//!   driver's `<vm>_<dev>.img`;
//! - the cloud-init seed: `<vm>_cidata.iso`;
//! - shared parents of chained disks: `nomad-virt-base-<fmt>-<key>.<ext>`,
//!   where the key comes from the image's canonical path, size, mtime,
//!   ctime and inode — never from hashing the whole image on every start,
//!   as the Go driver does;
//! - parents being uploaded: `<parent name>.partial-<unique>`, published
//!   under the parent name only once complete.
//!
//! Everything here blocks; call it from `spawn_blocking`. The plugin runs
//! on the libvirt host, so volume paths of directory pools are local files;
//! the functions that rely on that say so.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::images::{check_image_safe, check_qcow2_header, image_virtual_size, parse_qcow2_header};
use super::pool::{refresh_pool, retry_busy};
use super::{has_code, xml_child_text, xml_escape, ImageFormat, StorageError};

/// Name prefix of the shared parent volumes of chained disks.
pub const PARENT_PREFIX: &str = "nomad-virt-base-";
/// Marks a parent volume whose upload has not finished.
const STAGING_MARK: &str = ".partial-";

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

/// Volume names in directory pools are file names.
fn check_volume_name(name: &str) -> Result<(), StorageError> {
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

/// The XML of a new volume. Allocation 0 keeps files sparse; mode 0600
/// because disks hold guest data (libvirt hands them to the QEMU user when
/// a domain starts).
pub(crate) fn volume_xml(
    name: &str,
    format: ImageFormat,
    capacity: u64,
    backing: Option<(&str, ImageFormat)>,
) -> String {
    let mut xml = format!(
        "<volume>\n  <name>{}</name>\n  <capacity unit='bytes'>{capacity}</capacity>\n  \
         <allocation unit='bytes'>0</allocation>\n  <target>\n    <format type='{}'/>\n    \
         <permissions>\n      <mode>0600</mode>\n    </permissions>\n  </target>\n",
        xml_escape(name),
        format.as_str()
    );
    if let Some((path, backing_format)) = backing {
        xml.push_str(&format!(
            "  <backingStore>\n    <path>{}</path>\n    <format type='{}'/>\n  </backingStore>\n",
            xml_escape(path),
            backing_format.as_str()
        ));
    }
    xml.push_str("</volume>\n");
    xml
}

fn pool_name(pool: &StoragePool) -> String {
    pool.name().unwrap_or_else(|_| "?".to_string())
}

fn create_volume(pool: &StoragePool, name: &str, xml: &str) -> Result<StorageVol, StorageError> {
    check_volume_name(name)?;
    match StorageVol::create_xml(pool, xml, 0) {
        Ok(vol) => Ok(vol),
        Err(error) => {
            let pool_name = pool_name(pool);
            // libvirt says "exists" in several ways (its list, or the file
            // already on disk); if a volume by that name is there, say so.
            if has_code(&error, ErrorNumber::StorageVolExist)
                || pool.lookup_storage_vol_by_name(name).is_ok()
            {
                Err(StorageError::VolumeExists {
                    pool: pool_name,
                    volume: name.to_string(),
                })
            } else {
                Err(StorageError::volume(
                    &pool_name,
                    name,
                    "creating the volume",
                    error,
                ))
            }
        }
    }
}

/// Creates an empty, sparse volume of `capacity_bytes` in `format`. A volume
/// of that name already there is [`StorageError::VolumeExists`]; delete it
/// first if it is a leftover.
pub fn create_empty(
    pool: &StoragePool,
    name: &str,
    format: ImageFormat,
    capacity_bytes: u64,
) -> Result<StorageVol, StorageError> {
    create_volume(pool, name, &volume_xml(name, format, capacity_bytes, None))
}

/// Creates volume `name` in `target_format` holding the image at
/// `image_path` (in `source_format`), at least `capacity` bytes big.
///
/// - qcow2 images with a backing or external data file are refused
///   ([`check_image_safe`]): they would read other host files.
/// - When the formats differ the image is converted with
///   `qemu-img convert` into a 0600 temporary file in `std::env::temp_dir()`
///   (`$TMPDIR`; it needs room for the converted image) that is removed
///   afterwards.
/// - The bytes go through a libvirt stream. Raw targets are uploaded
///   sparse (zero blocks become holes) where libvirt handles that.
/// - The result is resized to `capacity` when that exceeds the image's
///   virtual size; a smaller `capacity` is ignored (never shrinks a disk).
/// - On failure the half-made volume is deleted.
pub fn create_from_image(
    conn: &Connect,
    pool: &StoragePool,
    name: &str,
    image_path: &Path,
    source_format: ImageFormat,
    target_format: ImageFormat,
    capacity: Option<u64>,
) -> Result<StorageVol, StorageError> {
    check_volume_name(name)?;
    check_image_safe(image_path, source_format)?;
    let virtual_size = image_virtual_size(image_path, source_format)?;
    let wanted = virtual_size.max(capacity.unwrap_or(0));
    if capacity.is_some_and(|c| c < virtual_size) {
        tracing::warn!(
            image = %image_path.display(),
            virtual_size,
            requested = capacity,
            "requested disk size is smaller than the image; using the image size"
        );
    }

    let converted = if source_format != target_format {
        Some(convert(image_path, source_format, target_format)?)
    } else {
        None
    };
    let upload_path = converted
        .as_ref()
        .map_or(image_path, |temp| temp.path.as_path());
    let mut file = File::open(upload_path).map_err(|error| StorageError::Io {
        action: "open image for upload",
        path: upload_path.to_path_buf(),
        error,
    })?;
    let length = file
        .metadata()
        .map_err(|error| StorageError::Io {
            action: "read metadata of image",
            path: upload_path.to_path_buf(),
            error,
        })?
        .len();

    // A raw volume's file is its disk, so it must hold the whole upload; a
    // qcow2 volume's header is replaced by the image's, so start it small.
    let initial = match target_format {
        ImageFormat::Raw => wanted.max(length),
        ImageFormat::Qcow2 => virtual_size,
    };
    let vol = create_empty(pool, name, target_format, initial)?;
    let pool_name = pool_name(pool);
    let sparse = target_format == ImageFormat::Raw && sparse_upload_works(conn);
    let result = upload(
        conn,
        &vol,
        &pool_name,
        name,
        upload_path,
        &mut file,
        length,
        sparse,
    )
    .and_then(|()| {
        if target_format == ImageFormat::Qcow2 {
            trim_to(&vol, length);
        }
        grow_to(&vol, &pool_name, name, wanted)
    });
    match result {
        Ok(()) => Ok(vol),
        Err(error) => {
            discard(&vol, &pool_name, name);
            Err(error)
        }
    }
}

/// Creates volume `name` (raw, or qcow2 when `bytes` is a qcow2 image)
/// holding exactly `bytes`; used for the cloud-init seed ISO. A volume of
/// that name already there is [`StorageError::VolumeExists`].
pub fn upload_bytes(
    conn: &Connect,
    pool: &StoragePool,
    name: &str,
    bytes: &[u8],
    format: ImageFormat,
) -> Result<StorageVol, StorageError> {
    let memory = PathBuf::from(format!("<{} bytes in memory>", bytes.len()));
    let capacity = match format {
        ImageFormat::Raw => bytes.len() as u64,
        ImageFormat::Qcow2 => {
            let header = parse_qcow2_header(bytes).ok_or_else(|| StorageError::UnsafeImage {
                path: memory.clone(),
                reason: "it is declared qcow2 but has no qcow2 header".into(),
            })?;
            check_qcow2_header(&memory, &header)?;
            header.virtual_size
        }
    };
    let vol = create_empty(pool, name, format, capacity)?;
    let pool_name = pool_name(pool);
    let length = bytes.len() as u64;
    let result = upload(
        conn,
        &vol,
        &pool_name,
        name,
        &memory,
        &mut Cursor::new(bytes),
        length,
        false,
    );
    match result {
        Ok(()) => {
            if format == ImageFormat::Qcow2 {
                trim_to(&vol, length);
            }
            Ok(vol)
        }
        Err(error) => {
            discard(&vol, &pool_name, name);
            Err(error)
        }
    }
}

/// Creates qcow2 volume `name` backed by `parent` (in `parent_format`),
/// as big as the parent or `capacity`, whichever is larger. libvirt runs
/// `qemu-img create -b` for it.
pub fn create_overlay(
    pool: &StoragePool,
    name: &str,
    parent: &StorageVol,
    parent_format: ImageFormat,
    capacity: Option<u64>,
) -> Result<StorageVol, StorageError> {
    let pool_name = pool_name(pool);
    let parent_name = parent.name().unwrap_or_else(|_| "?".to_string());
    let parent_path = parent.path().map_err(|e| {
        StorageError::volume(&pool_name, &parent_name, "reading the parent's path", e)
    })?;
    let parent_size = parent
        .info()
        .map_err(|e| {
            StorageError::volume(&pool_name, &parent_name, "reading the parent's size", e)
        })?
        .capacity;
    let size = parent_size.max(capacity.unwrap_or(0));
    let xml = volume_xml(
        name,
        ImageFormat::Qcow2,
        size,
        Some((&parent_path, parent_format)),
    );
    create_volume(pool, name, &xml)
}

/// The shared parent volume for the image at `image_path` (in `format`),
/// uploaded on first use and reused while the image is unchanged.
///
/// Safe when starts race: within the plugin a per-parent lock serialises
/// them; across processes the upload goes to a `.partial-` volume that is
/// hard-linked to the parent name only once complete (the link fails if
/// another upload won, and then that one is used). So a parent name never
/// points at half an image, even after a crash. This needs the pool's
/// directory on this host, which holds for `dir` pools. Reusing a parent
/// refreshes its mtime, which [`prune_unused_parents`] reads as "last used".
pub fn ensure_parent(
    conn: &Connect,
    pool: &StoragePool,
    image_path: &Path,
    format: ImageFormat,
) -> Result<StorageVol, StorageError> {
    check_image_safe(image_path, format)?;
    let name = parent_volume_name(format, &image_cache_key(image_path)?);
    let pool_name = pool_name(pool);
    let lock = parent_lock(&pool_name, &name);
    let _held = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());

    if let Ok(vol) = pool.lookup_storage_vol_by_name(&name) {
        touch(&vol);
        return Ok(vol);
    }
    let staging_name = format!("{name}{STAGING_MARK}{}", unique_suffix());
    let staging = create_from_image(conn, pool, &staging_name, image_path, format, format, None)?;
    let published = publish(&staging, &pool_name, &staging_name, &name);
    discard(&staging, &pool_name, &staging_name);
    published?;
    refresh_pool(pool, &pool_name)?;
    let vol = pool
        .lookup_storage_vol_by_name(&name)
        .map_err(|e| StorageError::volume(&pool_name, &name, "looking up the new parent", e))?;
    tracing::info!(pool = %pool_name, volume = %name, image = %image_path.display(), "uploaded parent volume");
    Ok(vol)
}

/// Links the complete staging volume's file under the parent name. An
/// existing parent file (another process won the race) is fine.
fn publish(
    staging: &StorageVol,
    pool_name: &str,
    staging_name: &str,
    name: &str,
) -> Result<(), StorageError> {
    let staging_path = PathBuf::from(staging.path().map_err(|e| {
        StorageError::volume(pool_name, staging_name, "reading the volume path", e)
    })?);
    let final_path = staging_path.with_file_name(name);
    match std::fs::hard_link(&staging_path, &final_path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(StorageError::Io {
            action: "publish the uploaded parent volume as",
            path: final_path,
            error,
        }),
    }
}

/// The file of a volume, for a domain's `<disk type='file'>`.
pub fn path_of(vol: &StorageVol) -> Result<PathBuf, StorageError> {
    vol.path().map(PathBuf::from).map_err(|e| {
        let pool = vol
            .lookup_storage_pool()
            .map(|p| pool_name(&p))
            .unwrap_or_else(|_| "?".to_string());
        let name = vol.name().unwrap_or_else(|_| "?".to_string());
        StorageError::volume(&pool, &name, "reading the volume path", e)
    })
}

/// The file of an existing volume the job names (`source.volume`); the
/// volume belongs to the operator and is used as is.
pub fn existing_path(pool: &StoragePool, name: &str) -> Result<PathBuf, StorageError> {
    check_volume_name(name)?;
    let pool_name = pool_name(pool);
    match pool.lookup_storage_vol_by_name(name) {
        Ok(vol) => path_of(&vol),
        Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => {
            Err(StorageError::VolumeNotFound {
                pool: pool_name,
                volume: name.to_string(),
            })
        }
        Err(error) => Err(StorageError::volume(
            &pool_name,
            name,
            "looking up the volume",
            error,
        )),
    }
}

/// Deletes volume `name` from `pool`. A volume that is not there is fine,
/// so this can run on every cleanup path.
pub fn delete_volume(pool: &StoragePool, name: &str) -> Result<(), StorageError> {
    let pool_name = pool_name(pool);
    let vol = match pool.lookup_storage_vol_by_name(name) {
        Ok(vol) => vol,
        Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => return Ok(()),
        Err(error) => {
            return Err(StorageError::volume(
                &pool_name,
                name,
                "looking up the volume",
                error,
            ))
        }
    };
    match retry_busy(|| vol.delete(0)) {
        Ok(()) => Ok(()),
        Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => Ok(()),
        Err(error) => Err(StorageError::volume(
            &pool_name,
            name,
            "deleting the volume",
            error,
        )),
    }
}

/// Deletes parent volumes in `pool` that no volume in any active pool uses
/// as its backing file and that were last used (created or reused by
/// [`ensure_parent`]) at least `min_idle` ago, plus `.partial-` leftovers
/// of interrupted uploads idle as long. Returns the deleted names.
///
/// `min_idle` must exceed the time between [`ensure_parent`] and
/// [`create_overlay`] in a start (seconds); an hour is a sensible value.
/// Reads file mtimes, so the pool must be local (a `dir` pool).
pub fn prune_unused_parents(
    conn: &Connect,
    pool: &StoragePool,
    min_idle: Duration,
) -> Result<Vec<String>, StorageError> {
    let pool_name = pool_name(pool);
    refresh_pool(pool, &pool_name)?;
    let backing = backing_paths(conn)?;
    let volumes = pool
        .list_all_volumes(0)
        .map_err(|e| StorageError::pool(&pool_name, "listing volumes", e))?;
    let mut deleted = Vec::new();
    for vol in volumes {
        let (Ok(name), Ok(path)) = (vol.name(), vol.path()) else {
            continue;
        };
        if !name.starts_with(PARENT_PREFIX) {
            continue;
        }
        let parent_name = name.split(STAGING_MARK).next().unwrap_or(&name).to_string();
        let lock = parent_lock(&pool_name, &parent_name);
        let _held = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Checked under the lock, so a concurrent reuse (which touches the
        // file) is seen.
        let idle = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok());
        if backing.contains(&path) || idle.is_none_or(|idle| idle < min_idle) {
            continue;
        }
        match retry_busy(|| vol.delete(0)) {
            Ok(()) => {
                tracing::info!(pool = %pool_name, volume = %name, "deleted unused parent volume");
                deleted.push(name);
            }
            Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => {}
            Err(error) => {
                return Err(StorageError::volume(
                    &pool_name,
                    &name,
                    "deleting an unused parent",
                    error,
                ))
            }
        }
    }
    Ok(deleted)
}

/// The backing-file paths of every volume in every active pool. Any
/// failure except a pool vanishing or stopping mid-listing is an error, so
/// pruning never deletes on partial knowledge. Overlays in stopped pools
/// are not seen; the driver keeps overlays in their parent's pool, which is
/// active while we prune it.
fn backing_paths(conn: &Connect) -> Result<HashSet<String>, StorageError> {
    let pools = conn
        .list_all_storage_pools(virt::sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
        .map_err(|e| StorageError::pool("*", "listing storage pools", e))?;
    let mut paths = HashSet::new();
    for pool in pools {
        let name = pool_name(&pool);
        let volumes = match pool.list_all_volumes(0) {
            Ok(volumes) => volumes,
            // Gone or stopped since the listing (e.g. a transient pool).
            Err(error)
                if has_code(&error, ErrorNumber::NoStoragePool)
                    || !pool.is_active().unwrap_or(false) =>
            {
                continue
            }
            Err(error) => return Err(StorageError::pool(&name, "listing volumes", error)),
        };
        for vol in volumes {
            match vol.xml_desc(0) {
                Ok(xml) => paths.extend(xml_child_text(&xml, Some("backingStore"), "path")),
                Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => {}
                Err(error) => {
                    let vol_name = vol.name().unwrap_or_default();
                    return Err(StorageError::volume(
                        &name,
                        &vol_name,
                        "reading the volume XML",
                        error,
                    ));
                }
            }
        }
    }
    Ok(paths)
}

/// One lock per parent volume, shared by [`ensure_parent`] and
/// [`prune_unused_parents`]. Entries stay for the process's life; there is
/// one per distinct image.
fn parent_lock(pool: &str, name: &str) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(format!("{pool}/{name}")).or_default().clone()
}

/// A suffix unique within this host: pid, a counter and the time.
fn unique_suffix() -> String {
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

/// Marks a parent as just used. Best effort: failing only makes pruning
/// think it idle earlier, and pruning still skips parents in use.
fn touch(vol: &StorageVol) {
    let Ok(path) = vol.path() else { return };
    let result = File::open(&path).and_then(|file| file.set_modified(SystemTime::now()));
    if let Err(error) = result {
        tracing::debug!(path, %error, "could not update the parent volume's mtime");
    }
}

/// Deletes a volume we made and cannot finish; errors only get logged
/// because the caller is already reporting the failure that led here.
fn discard(vol: &StorageVol, pool_name: &str, name: &str) {
    if let Err(error) = retry_busy(|| vol.delete(0)) {
        if !has_code(&error, ErrorNumber::NoStorageVolume) {
            tracing::warn!(pool = pool_name, volume = name, error = %error.message(), "could not delete an incomplete volume");
        }
    }
}

/// Grows the volume to `wanted` bytes if it is smaller.
fn grow_to(vol: &StorageVol, pool_name: &str, name: &str, wanted: u64) -> Result<(), StorageError> {
    let capacity = vol
        .info()
        .map_err(|e| StorageError::volume(pool_name, name, "reading the volume size", e))?
        .capacity;
    if capacity < wanted {
        retry_busy(|| vol.resize(wanted, 0)).map_err(|e| {
            StorageError::volume(pool_name, name, format!("resizing to {wanted} bytes"), e)
        })?;
    }
    Ok(())
}

/// libvirt pre-creates a qcow2 volume's file before we overwrite it; cut
/// anything past the uploaded image so the file is exactly the image.
/// Best effort (qcow2 ignores trailing bytes); needs the file on this host.
fn trim_to(vol: &StorageVol, length: u64) {
    let Ok(path) = vol.path() else { return };
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|file| {
            if file.metadata()?.len() > length {
                file.set_len(length)?;
            }
            Ok(())
        });
    if let Err(error) = result {
        tracing::debug!(path, %error, "could not trim the uploaded qcow2 volume");
    }
}

/// Sparse uploads work since libvirt 3.4 but were broken from 9.6.0 until
/// 10.1.0 (the Go driver's finding); virConnectGetLibVersion reports the
/// daemon's version on remote connections.
fn sparse_upload_works(conn: &Connect) -> bool {
    conn.lib_version()
        .is_ok_and(|version| !(9_006_000..10_001_000).contains(&version))
}

/// Bytes read and sent per step; below libvirt's stream packet limit.
const CHUNK: usize = 256 * 1024;
/// Granularity of zero detection in sparse uploads.
const HOLE_BLOCK: usize = 64 * 1024;

/// Streams `length` bytes from `reader` into `vol`, then finishes the
/// stream; aborts it on any error.
#[allow(clippy::too_many_arguments)]
fn upload(
    conn: &Connect,
    vol: &StorageVol,
    pool_name: &str,
    name: &str,
    source: &Path,
    reader: &mut dyn Read,
    length: u64,
    sparse: bool,
) -> Result<(), StorageError> {
    // Length 0 means "to the end of the volume" to libvirt; nothing to send.
    if length == 0 {
        return Ok(());
    }
    let action = format!("uploading {}", source.display());
    let libvirt = |e: virt::error::Error| StorageError::volume(pool_name, name, action.clone(), e);
    let stream = Stream::new(conn, 0).map_err(libvirt)?;
    let flags = if sparse {
        virt::sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
    } else {
        0
    };
    vol.upload(&stream, 0, length, flags).map_err(libvirt)?;
    match send_all(&stream, reader, length, sparse) {
        Ok(()) => stream.finish().map_err(libvirt),
        Err(failure) => {
            if let Err(error) = stream.abort() {
                tracing::debug!(error = %error.message(), "aborting the upload stream failed");
            }
            Err(match failure {
                SendFailure::Libvirt(e) => libvirt(e),
                SendFailure::Read(error) => StorageError::Io {
                    action: "read image for upload",
                    path: source.to_path_buf(),
                    error,
                },
            })
        }
    }
}

enum SendFailure {
    Libvirt(virt::error::Error),
    Read(io::Error),
}

fn send_all(
    stream: &Stream,
    reader: &mut dyn Read,
    length: u64,
    sparse: bool,
) -> Result<(), SendFailure> {
    let mut buf = vec![0u8; CHUNK];
    let mut remaining = length;
    let mut hole: u64 = 0;
    while remaining > 0 {
        let want = usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK));
        let got = read_full(reader, &mut buf[..want]).map_err(SendFailure::Read)?;
        if got < want {
            return Err(SendFailure::Read(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the image ended {} bytes early; was it changed during the upload?",
                    remaining - got as u64
                ),
            )));
        }
        remaining -= got as u64;
        let chunk = &buf[..got];
        if !sparse {
            send_data(stream, chunk)?;
            continue;
        }
        // Coalesce runs of data blocks into one send; zero blocks into holes.
        let mut data_start = None;
        for (index, block) in chunk.chunks(HOLE_BLOCK).enumerate() {
            let at = index * HOLE_BLOCK;
            if block.iter().all(|&b| b == 0) {
                if let Some(start) = data_start.take() {
                    send_data(stream, &chunk[start..at])?;
                }
                hole += block.len() as u64;
            } else {
                if hole > 0 {
                    send_hole(stream, hole)?;
                    hole = 0;
                }
                data_start.get_or_insert(at);
            }
        }
        if let Some(start) = data_start {
            send_data(stream, &chunk[start..])?;
        }
    }
    if hole > 0 {
        send_hole(stream, hole)?;
    }
    Ok(())
}

fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// `virStreamSend` may take fewer bytes than offered; loop until all went.
fn send_data(stream: &Stream, mut data: &[u8]) -> Result<(), SendFailure> {
    while !data.is_empty() {
        let sent = stream.send(data).map_err(SendFailure::Libvirt)?;
        let sent = usize::try_from(sent).unwrap_or(0);
        if sent == 0 {
            return Err(SendFailure::Read(io::Error::other(
                "the libvirt stream accepted no data",
            )));
        }
        data = &data[sent.min(data.len())..];
    }
    Ok(())
}

/// `virStreamSendHole` has no wrapper in virt 0.5.
fn send_hole(stream: &Stream, length: u64) -> Result<(), SendFailure> {
    let length = i64::try_from(length)
        .map_err(|_| SendFailure::Read(io::Error::other("hole longer than i64::MAX bytes")))?;
    crate::libvirt::ffi::stream_send_hole(stream, length).map_err(SendFailure::Libvirt)
}

/// A temporary file removed on drop.
struct TempFile {
    path: PathBuf,
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
fn convert(image: &Path, from: ImageFormat, to: ImageFormat) -> Result<TempFile, StorageError> {
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
        .map_err(|error| StorageError::QemuImg {
            action: "convert",
            path: image.to_path_buf(),
            message: format!("cannot run qemu-img: {error}"),
        })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            action: "convert",
            path: image.to_path_buf(),
            message: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(temp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::pool::ensure_directory_pool;
    use crate::storage::pool::tests::{test_node, TestNode};

    const MIB: u64 = 1 << 20;

    fn test_pool(node: &TestNode) -> StoragePool {
        let path = node.dir.path().join("pool");
        ensure_directory_pool(&node.conn, "disks", &path).expect("test pool")
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

    #[test]
    fn volume_xml_shape() {
        let xml = volume_xml("a&b", ImageFormat::Qcow2, 5 * MIB, None);
        assert!(xml.contains("<name>a&amp;b</name>"), "{xml}");
        assert!(
            xml.contains("<capacity unit='bytes'>5242880</capacity>"),
            "{xml}"
        );
        assert!(xml.contains("<format type='qcow2'/>"), "{xml}");
        assert!(xml.contains("<mode>0600</mode>"), "{xml}");
        assert!(!xml.contains("backingStore"), "{xml}");
        let xml = volume_xml(
            "o",
            ImageFormat::Qcow2,
            MIB,
            Some(("/p/<x>", ImageFormat::Raw)),
        );
        assert_eq!(
            xml_child_text(&xml, Some("backingStore"), "path").as_deref(),
            Some("/p/<x>")
        );
        assert!(
            xml.contains("<backingStore>\n    <path>/p/&lt;x&gt;</path>\n    <format type='raw'/>"),
            "{xml}"
        );
    }

    #[test]
    fn create_empty_and_delete_on_the_test_driver() {
        let node = test_node();
        let pool = test_pool(&node);
        let name = disk_volume_name("vm", "vdb", ImageFormat::Qcow2);
        let vol = create_empty(&pool, &name, ImageFormat::Qcow2, 1 << 30).unwrap();
        assert_eq!(vol.info().unwrap().capacity, 1 << 30);
        assert_eq!(
            PathBuf::from(vol.path().unwrap()),
            node.dir.path().join("pool").join(&name)
        );
        let err = create_empty(&pool, &name, ImageFormat::Qcow2, MIB).unwrap_err();
        assert!(matches!(err, StorageError::VolumeExists { .. }), "{err}");
        assert!(err.to_string().contains("delete it first"), "{err}");
        let err = create_empty(&pool, "a/b", ImageFormat::Raw, MIB).unwrap_err();
        assert!(matches!(err, StorageError::VolumeName { .. }), "{err}");

        assert_eq!(
            existing_path(&pool, &name).unwrap(),
            node.dir.path().join("pool").join(&name)
        );
        assert_eq!(path_of(&vol).unwrap(), existing_path(&pool, &name).unwrap());
        let err = existing_path(&pool, "missing.qcow2").unwrap_err();
        assert!(matches!(err, StorageError::VolumeNotFound { .. }), "{err}");

        delete_volume(&pool, &name).unwrap();
        assert!(pool.lookup_storage_vol_by_name(&name).is_err());
        delete_volume(&pool, &name).unwrap();
        delete_volume(&pool, "never-existed").unwrap();
    }

    #[test]
    fn overlay_xml_on_the_test_driver() {
        let node = test_node();
        let pool = test_pool(&node);
        let parent = create_empty(&pool, "parent.img", ImageFormat::Raw, 4 * MIB).unwrap();
        let parent_path = parent.path().unwrap();
        let overlay = create_overlay(
            &pool,
            "vm_vda.qcow2",
            &parent,
            ImageFormat::Raw,
            Some(8 * MIB),
        )
        .unwrap();
        assert_eq!(overlay.info().unwrap().capacity, 8 * MIB);
        let xml = overlay.xml_desc(0).unwrap();
        assert_eq!(
            xml_child_text(&xml, Some("backingStore"), "path"),
            Some(parent_path),
            "{xml}"
        );
        // Never smaller than the parent.
        let small =
            create_overlay(&pool, "vm_vdb.qcow2", &parent, ImageFormat::Raw, Some(MIB)).unwrap();
        assert_eq!(small.info().unwrap().capacity, 4 * MIB);
        let err =
            create_overlay(&pool, "vm_vda.qcow2", &parent, ImageFormat::Raw, None).unwrap_err();
        assert!(matches!(err, StorageError::VolumeExists { .. }), "{err}");
    }

    #[test]
    fn failed_upload_leaves_no_volume() {
        // The test driver has no virStorageVolUpload: the upload fails after
        // the volume was created, and the volume must be gone again.
        let node = test_node();
        let pool = test_pool(&node);
        let image = node.dir.path().join("disk.img");
        std::fs::write(&image, vec![7u8; 4096]).unwrap();
        let err = create_from_image(
            &node.conn,
            &pool,
            "vm_vda.img",
            &image,
            ImageFormat::Raw,
            ImageFormat::Raw,
            Some(MIB),
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::Volume { .. }), "{err}");
        assert!(err.to_string().contains("uploading"), "{err}");
        assert!(pool.lookup_storage_vol_by_name("vm_vda.img").is_err());

        let err =
            upload_bytes(&node.conn, &pool, "seed.iso", b"data", ImageFormat::Raw).unwrap_err();
        assert!(matches!(err, StorageError::Volume { .. }), "{err}");
        assert!(pool.lookup_storage_vol_by_name("seed.iso").is_err());
        // Nothing to send: no upload call at all.
        let empty = upload_bytes(&node.conn, &pool, "empty.iso", b"", ImageFormat::Raw).unwrap();
        assert_eq!(empty.info().unwrap().capacity, 0);
    }

    #[test]
    fn unsafe_images_are_refused_before_any_volume_exists() {
        let node = test_node();
        let pool = test_pool(&node);
        let image = node.dir.path().join("evil.qcow2");
        let mut header = vec![0u8; 112];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[8..16].copy_from_slice(&0x200u64.to_be_bytes()); // backing file
        header[24..32].copy_from_slice(&MIB.to_be_bytes());
        std::fs::write(&image, &header).unwrap();
        for result in [
            create_from_image(
                &node.conn,
                &pool,
                "x.qcow2",
                &image,
                ImageFormat::Qcow2,
                ImageFormat::Raw,
                None,
            ),
            ensure_parent(&node.conn, &pool, &image, ImageFormat::Qcow2),
            upload_bytes(&node.conn, &pool, "x.qcow2", &header, ImageFormat::Qcow2),
        ] {
            let err = result.unwrap_err();
            assert!(matches!(err, StorageError::UnsafeImage { .. }), "{err}");
        }
        assert!(pool.list_volumes().unwrap().is_empty());
    }

    #[test]
    fn ensure_parent_reuses_an_existing_parent() {
        let node = test_node();
        let pool = test_pool(&node);
        let image = node.dir.path().join("base.img");
        std::fs::write(&image, vec![1u8; 8192]).unwrap();
        let name = parent_volume_name(ImageFormat::Raw, &image_cache_key(&image).unwrap());
        create_empty(&pool, &name, ImageFormat::Raw, 8192).unwrap();
        // The test driver cannot upload, so this only passes by reuse.
        let parent = ensure_parent(&node.conn, &pool, &image, ImageFormat::Raw).unwrap();
        assert_eq!(parent.name().unwrap(), name);
        assert_eq!(pool.list_volumes().unwrap(), vec![name]);
    }

    /// Tests against the real libvirtd (qemu:///system). They fail, not
    /// skip, when it is unreachable: CI must provide it.
    mod real_daemon {
        use super::*;
        use crate::storage::pool::directory_pool_xml;
        use crate::storage::{detect_format, image_virtual_size};

        const URI: &str = "qemu:///system";

        fn system() -> Connect {
            Connect::open(Some(URI)).unwrap_or_else(|error| {
                panic!(
                    "cannot reach libvirtd at {URI} ({}); run tests/setup/host.sh as root \
                     to install and start it",
                    error.message()
                )
            })
        }

        fn unique_name() -> String {
            format!("ndvtest-{}", unique_suffix())
        }

        /// A transient dir pool in a tempdir; destroyed (and undefined if
        /// persistent) on drop, whatever the test did.
        struct PoolGuard {
            conn: Connect,
            name: String,
            dir: tempfile::TempDir,
        }

        impl PoolGuard {
            fn transient() -> (PoolGuard, StoragePool) {
                let conn = system();
                let dir = tempfile::tempdir().unwrap();
                let name = unique_name();
                let path = dir.path().join("pool");
                std::fs::create_dir(&path).unwrap();
                let pool = conn
                    .create_storage_pool_xml(&directory_pool_xml(&name, &path), 0)
                    .expect("create a transient pool");
                (PoolGuard { conn, name, dir }, pool)
            }

            fn persistent() -> PoolGuard {
                PoolGuard {
                    conn: system(),
                    name: unique_name(),
                    dir: tempfile::tempdir().unwrap(),
                }
            }
        }

        impl Drop for PoolGuard {
            fn drop(&mut self) {
                if let Ok(pool) = self.conn.lookup_storage_pool_by_name(&self.name) {
                    if pool.is_active().unwrap_or(false) {
                        let _ = pool.destroy();
                    }
                    if pool.is_persistent().unwrap_or(false) {
                        let _ = pool.undefine();
                    }
                }
            }
        }

        fn run(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
            let output = Command::new(program)
                .args(args.iter().map(|a| a.as_ref()))
                .output()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}; run tests/setup/host.sh"));
            assert!(output.status.success(), "{program} {output:?}");
            String::from_utf8_lossy(&output.stdout).into_owned()
        }

        fn qemu_img_info(path: &str) -> serde_json::Value {
            let out = run("qemu-img", &[&"info", &"-U", &"--output=json", &path]);
            serde_json::from_str(&out).expect("qemu-img info JSON")
        }

        fn assert_same_content(a: &Path, a_fmt: ImageFormat, b: &str, b_fmt: ImageFormat) {
            run(
                "qemu-img",
                &[
                    &"compare",
                    &"-U",
                    &"-f",
                    &a_fmt.as_str(),
                    &"-F",
                    &b_fmt.as_str(),
                    &a,
                    &b,
                ],
            );
        }

        /// A 16 MiB image with data at 0, 5 MiB and the last block; raw and
        /// qcow2 versions.
        fn source_images(dir: &Path) -> (PathBuf, PathBuf) {
            let raw = dir.join("src.img");
            let mut bytes = vec![0u8; 16 * MIB as usize];
            bytes[..70_000].fill(0xab);
            bytes[5 * MIB as usize..5 * MIB as usize + 4096].fill(0x5a);
            let end = bytes.len();
            bytes[end - 512..].fill(0xff);
            std::fs::write(&raw, &bytes).unwrap();
            let qcow2 = dir.join("src.qcow2");
            run(
                "qemu-img",
                &[&"convert", &"-f", &"raw", &"-O", &"qcow2", &raw, &qcow2],
            );
            (raw, qcow2)
        }

        #[test]
        fn upload_convert_and_resize() {
            let (guard, pool) = PoolGuard::transient();
            let conn = &guard.conn;
            let (raw, qcow2) = source_images(guard.dir.path());

            // A blank qcow2 made by qemu-img create, as is.
            let blank = guard.dir.path().join("blank.qcow2");
            run(
                "qemu-img",
                &[&"create", &"-q", &"-f", &"qcow2", &blank, &"16M"],
            );
            let vol = create_from_image(
                conn,
                &pool,
                "blank.qcow2",
                &blank,
                ImageFormat::Qcow2,
                ImageFormat::Qcow2,
                None,
            )
            .unwrap();
            let path = vol.path().unwrap();
            let info = qemu_img_info(&path);
            assert_eq!(info["format"], "qcow2", "{info}");
            assert_eq!(info["virtual-size"], 16 * MIB, "{info}");
            assert_eq!(vol.info().unwrap().capacity, 16 * MIB);
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(&blank).unwrap(),
                "an upload without conversion is a byte copy"
            );
            run("qemu-img", &[&"check", &"-U", &path]);

            // A qcow2 file smaller than the one libvirt pre-creates (196 KiB
            // for 16 MiB): libvirt's upload does not truncate, we do.
            let small = guard.dir.path().join("small.qcow2");
            run(
                "qemu-img",
                &[
                    &"create",
                    &"-q",
                    &"-f",
                    &"qcow2",
                    &"-o",
                    &"cluster_size=512",
                    &small,
                    &"16M",
                ],
            );
            let vol = create_from_image(
                conn,
                &pool,
                "small.qcow2",
                &small,
                ImageFormat::Qcow2,
                ImageFormat::Qcow2,
                None,
            )
            .unwrap();
            assert_eq!(
                std::fs::read(vol.path().unwrap()).unwrap(),
                std::fs::read(&small).unwrap()
            );
            delete_volume(&pool, "small.qcow2").unwrap();

            // qcow2 → qcow2, grown to 32 MiB after the upload.
            let vol = create_from_image(
                conn,
                &pool,
                "grown.qcow2",
                &qcow2,
                ImageFormat::Qcow2,
                ImageFormat::Qcow2,
                Some(32 * MIB),
            )
            .unwrap();
            let path = vol.path().unwrap();
            assert_eq!(qemu_img_info(&path)["virtual-size"], 32 * MIB);
            assert_eq!(vol.info().unwrap().capacity, 32 * MIB);
            assert_same_content(&qcow2, ImageFormat::Qcow2, &path, ImageFormat::Qcow2);
            run("qemu-img", &[&"check", &"-U", &path]);

            // qcow2 → raw through qemu-img convert, sparse, 24 MiB.
            let vol = create_from_image(
                conn,
                &pool,
                "vm_vdb.img",
                &qcow2,
                ImageFormat::Qcow2,
                ImageFormat::Raw,
                Some(24 * MIB),
            )
            .unwrap();
            let path = vol.path().unwrap();
            let info = qemu_img_info(&path);
            assert_eq!(info["format"], "raw", "{info}");
            assert_eq!(info["virtual-size"], 24 * MIB, "{info}");
            assert_same_content(&raw, ImageFormat::Raw, &path, ImageFormat::Raw);
            let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
            assert!(
                allocated < 4 * MIB,
                "sparse upload allocated {allocated} bytes"
            );
            assert_eq!(detect_format(Path::new(&path)).unwrap(), ImageFormat::Raw);

            // raw → qcow2, and raw → raw at the image's own size.
            let vol = create_from_image(
                conn,
                &pool,
                "fromraw.qcow2",
                &raw,
                ImageFormat::Raw,
                ImageFormat::Qcow2,
                None,
            )
            .unwrap();
            let path = vol.path().unwrap();
            assert_eq!(qemu_img_info(&path)["format"], "qcow2");
            assert_same_content(&raw, ImageFormat::Raw, &path, ImageFormat::Qcow2);
            let vol = create_from_image(
                conn,
                &pool,
                "copy.img",
                &raw,
                ImageFormat::Raw,
                ImageFormat::Raw,
                Some(MIB),
            )
            .unwrap();
            let path = vol.path().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&raw).unwrap());
            assert_eq!(
                image_virtual_size(Path::new(&path), ImageFormat::Raw).unwrap(),
                16 * MIB
            );

            // An existing name is refused and the existing volume kept.
            let err = create_from_image(
                conn,
                &pool,
                "copy.img",
                &raw,
                ImageFormat::Raw,
                ImageFormat::Raw,
                None,
            )
            .unwrap_err();
            assert!(matches!(err, StorageError::VolumeExists { .. }), "{err}");
            assert!(Path::new(&path).exists());

            for name in [
                "blank.qcow2",
                "grown.qcow2",
                "vm_vdb.img",
                "fromraw.qcow2",
                "copy.img",
            ] {
                delete_volume(&pool, name).unwrap();
                delete_volume(&pool, name).unwrap();
            }
            assert!(pool.list_volumes().unwrap().is_empty());
            // No converted temporaries left behind by this process.
            let prefix = format!("nomad-virt-convert-{}-", std::process::id());
            let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }

        #[test]
        fn parent_overlay_and_prune() {
            let (guard, pool) = PoolGuard::transient();
            let conn = &guard.conn;
            let (_raw, qcow2) = source_images(guard.dir.path());

            // Three starts at once share one upload.
            let parents: Vec<String> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..3)
                    .map(|_| {
                        scope.spawn(|| {
                            let conn = system();
                            let pool = conn.lookup_storage_pool_by_name(&guard.name).unwrap();
                            ensure_parent(&conn, &pool, &qcow2, ImageFormat::Qcow2)
                                .unwrap()
                                .name()
                                .unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(parents.iter().all(|p| *p == parents[0]), "{parents:?}");
            let parent_name = parents[0].clone();
            assert!(parent_name.starts_with("nomad-virt-base-qcow2-"));
            refresh_pool(&pool, &guard.name).unwrap();
            assert_eq!(pool.list_volumes().unwrap(), vec![parent_name.clone()]);
            let parent = ensure_parent(conn, &pool, &qcow2, ImageFormat::Qcow2).unwrap();
            let parent_path = parent.path().unwrap();
            assert_same_content(&qcow2, ImageFormat::Qcow2, &parent_path, ImageFormat::Qcow2);

            let overlay = create_overlay(
                &pool,
                "vm_vda.qcow2",
                &parent,
                ImageFormat::Qcow2,
                Some(64 * MIB),
            )
            .unwrap();
            let info = qemu_img_info(&overlay.path().unwrap());
            assert_eq!(info["format"], "qcow2", "{info}");
            assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
            assert_eq!(info["backing-filename"], parent_path.as_str(), "{info}");
            assert_eq!(info["backing-filename-format"], "qcow2", "{info}");

            // In use: never pruned, however idle.
            assert!(prune_unused_parents(conn, &pool, Duration::ZERO)
                .unwrap()
                .is_empty());
            delete_volume(&pool, "vm_vda.qcow2").unwrap();
            // Unused but recently used: kept.
            assert!(prune_unused_parents(conn, &pool, Duration::from_secs(3600))
                .unwrap()
                .is_empty());
            // A stale `.partial-` leftover of a crashed upload goes too.
            let stale = format!("{parent_name}{STAGING_MARK}0-0-0");
            create_empty(&pool, &stale, ImageFormat::Qcow2, MIB).unwrap();
            let mut pruned = prune_unused_parents(conn, &pool, Duration::ZERO).unwrap();
            pruned.sort();
            assert_eq!(pruned, vec![parent_name.clone(), stale]);
            assert!(pool.list_volumes().unwrap().is_empty());
        }

        #[test]
        fn parent_published_by_another_process_is_used() {
            let (guard, pool) = PoolGuard::transient();
            let conn = &guard.conn;
            let (_raw, qcow2) = source_images(guard.dir.path());
            let name = parent_volume_name(ImageFormat::Qcow2, &image_cache_key(&qcow2).unwrap());
            // Another process finished first; this pool has not seen it yet.
            let final_path = guard.dir.path().join("pool").join(&name);
            std::fs::copy(&qcow2, &final_path).unwrap();
            let parent = ensure_parent(conn, &pool, &qcow2, ImageFormat::Qcow2).unwrap();
            assert_eq!(parent.name().unwrap(), name);
            assert_eq!(PathBuf::from(parent.path().unwrap()), final_path);
            assert_eq!(pool.list_volumes().unwrap(), vec![name]);
        }

        #[test]
        fn seed_bytes_round_trip() {
            let (guard, pool) = PoolGuard::transient();
            let bytes: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
            let name = seed_volume_name("vm");
            let vol = upload_bytes(&guard.conn, &pool, &name, &bytes, ImageFormat::Raw).unwrap();
            assert_eq!(std::fs::read(vol.path().unwrap()).unwrap(), bytes);
            assert_eq!(vol.info().unwrap().capacity, bytes.len() as u64);
            let mode = std::fs::metadata(vol.path().unwrap()).unwrap().mode();
            assert_eq!(mode & 0o777, 0o600);
            delete_volume(&pool, &name).unwrap();
            delete_volume(&pool, &name).unwrap();
        }

        #[test]
        fn persistent_pool_lifecycle() {
            let guard = PoolGuard::persistent();
            let conn = &guard.conn;
            let path = guard.dir.path().join("a/b/pool");
            let pool = ensure_directory_pool(conn, &guard.name, &path).unwrap();
            assert!(path.is_dir(), "build created the directory");
            assert!(pool.is_active().unwrap() && pool.is_persistent().unwrap());
            assert!(pool.autostart().unwrap());
            ensure_directory_pool(conn, &guard.name, &path).unwrap();
            let err = ensure_directory_pool(conn, &guard.name, guard.dir.path()).unwrap_err();
            assert!(
                matches!(err, StorageError::PoolPathMismatch { .. }),
                "{err}"
            );
            let fingerprint = crate::storage::pool_fingerprint(conn).unwrap();
            assert!(fingerprint.contains(&(guard.name.clone(), true, "dir".into())));

            // Stopped, and its directory removed: built and started again.
            pool.destroy().unwrap();
            std::fs::remove_dir(&path).unwrap();
            let pool = ensure_directory_pool(conn, &guard.name, &path).unwrap();
            assert!(pool.is_active().unwrap() && path.is_dir());

            // Directory removed under an active pool: recovered too.
            std::fs::remove_dir(&path).unwrap();
            let pool = ensure_directory_pool(conn, &guard.name, &path).unwrap();
            assert!(pool.is_active().unwrap() && path.is_dir());
        }

        #[test]
        fn pool_that_cannot_be_built_is_not_left_defined() {
            let guard = PoolGuard::persistent();
            let file = guard.dir.path().join("file");
            std::fs::write(&file, b"not a directory").unwrap();
            let err =
                ensure_directory_pool(&guard.conn, &guard.name, &file.join("pool")).unwrap_err();
            assert!(matches!(err, StorageError::Pool { .. }), "{err}");
            assert!(err.to_string().contains("building the pool"), "{err}");
            let lookup = guard.conn.lookup_storage_pool_by_name(&guard.name);
            assert!(lookup.is_err(), "the failed pool was left defined");
        }
    }
}
