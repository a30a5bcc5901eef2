//! Volumes through libvirt: creation (empty, from an image, as an overlay
//! on a shared parent), uploads through libvirt streams, deletion and the
//! garbage collection of unused parents. Names come from
//! [`crate::storage::volume`].
//!
//! Everything here blocks; call it from `spawn_blocking`. The plugin runs
//! on the libvirt host, so volume paths of directory pools are local files;
//! the functions that rely on that say so.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::pool::{refresh_pool, retry_busy};
use super::{has_code, Pool, Volume};
use crate::libvirt::xml::{self, XmlWriter};
use crate::storage::copy::{copy_allocated, copy_into, CopyMethod, CopyProgress};
use crate::storage::images::{
    check_image_safe, check_qcow2_header, image_virtual_size, parse_qcow2_header, ImageFile,
};
use crate::storage::parent_key::{self, HashingReader, Identity};
use crate::storage::qemu_img::convert;
use crate::storage::volume::{
    check_volume_name, parent_volume_name, unique_suffix, PARENT_PREFIX, STAGING_MARK,
};
use crate::storage::{ImageFormat, StorageError};

/// The XML of a new volume. Allocation 0 keeps files sparse; mode 0600
/// because disks hold guest data (libvirt hands them to the QEMU user when
/// a domain starts).
pub(crate) fn volume_xml(
    name: &str,
    format: ImageFormat,
    capacity: u64,
    backing: Option<(&str, ImageFormat)>,
) -> String {
    volume_xml_allocated(name, format, capacity, 0, backing)
}

/// [`volume_xml`] with an allocation: equal to the capacity, libvirt
/// allocates a raw volume's whole file (a disk with `sparse = false`).
fn volume_xml_allocated(
    name: &str,
    format: ImageFormat,
    capacity: u64,
    allocation: u64,
    backing: Option<(&str, ImageFormat)>,
) -> String {
    let mut w = XmlWriter::new();
    w.open("volume", &[]);
    w.text("name", &[], name);
    w.text("capacity", &[("unit", "bytes")], &capacity.to_string());
    w.text("allocation", &[("unit", "bytes")], &allocation.to_string());
    w.open("target", &[]);
    w.empty("format", &[("type", format.as_str())]);
    w.open("permissions", &[]);
    w.text("mode", &[], "0600");
    w.close("permissions");
    w.close("target");
    if let Some((path, backing_format)) = backing {
        w.open("backingStore", &[]);
        w.text("path", &[], path);
        w.empty("format", &[("type", backing_format.as_str())]);
        w.close("backingStore");
    }
    w.close("volume");
    w.finish(true)
}

fn pool_name(pool: &StoragePool) -> String {
    pool.name().unwrap_or_else(|_| "?".to_string())
}

fn create_volume(pool: &Pool, name: &str, xml: &str) -> Result<Volume, StorageError> {
    create_volume_from(pool, name, xml, None, 0)
}

/// Creates a volume from `xml`, as a clone of `from` when given.
fn create_volume_from(
    pool: &Pool,
    name: &str,
    xml: &str,
    from: Option<&StorageVol>,
    flags: u32,
) -> Result<Volume, StorageError> {
    check_volume_name(name)?;
    let pool_name = pool.name.clone();
    let created = match from {
        Some(source) => StorageVol::create_xml_from(&pool.inner, xml, source, flags),
        None => StorageVol::create_xml(&pool.inner, xml, flags),
    };
    match created {
        Ok(vol) => Ok(Volume::new(vol, &pool_name, name)),
        Err(error) => {
            // libvirt says "exists" in several ways (its list, or the file
            // already on disk); if a volume by that name is there, say so.
            if has_code(&error, ErrorNumber::StorageVolExist)
                || pool.inner.lookup_storage_vol_by_name(name).is_ok()
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
    pool: &Pool,
    name: &str,
    format: ImageFormat,
    capacity_bytes: u64,
) -> Result<Volume, StorageError> {
    create_volume(pool, name, &volume_xml(name, format, capacity_bytes, None))
}

/// [`create_empty`] with the disk's `sparse`: when false, a raw volume's
/// file is allocated in full and a qcow2 volume gets its metadata
/// preallocated (libvirt's only preallocation for qcow2).
pub fn create_empty_with(
    pool: &Pool,
    name: &str,
    format: ImageFormat,
    capacity_bytes: u64,
    sparse: bool,
) -> Result<Volume, StorageError> {
    if sparse {
        return create_empty(pool, name, format, capacity_bytes);
    }
    let (allocation, flags) = match format {
        ImageFormat::Raw => (capacity_bytes, 0),
        ImageFormat::Qcow2 => (0, virt::sys::VIR_STORAGE_VOL_CREATE_PREALLOC_METADATA),
    };
    let xml = volume_xml_allocated(name, format, capacity_bytes, allocation, None);
    create_volume_from(pool, name, &xml, None, flags)
}

/// An operator's volume a job names as `source.volume`, checked by
/// [`source_volume`].
#[derive(Debug, Clone)]
pub struct SourceVolume {
    pub volume: Volume,
    pub format: ImageFormat,
    pub capacity: u64,
    /// The volume's file, checked to be a regular file (not a link).
    pub path: PathBuf,
}

/// Looks up and checks the volume a job names as `source.volume`, before
/// anything is created from it. Refused: names of the driver's own volumes
/// (another task's disk, seed or shared parent); volumes that are not a
/// plain file; formats other than raw and qcow2; qcow2 images with a
/// backing file or an external data file (cloning or overlaying one would
/// read other host files into the guest).
pub fn source_volume(pool: &Pool, name: &str) -> Result<SourceVolume, StorageError> {
    check_volume_name(name)?;
    let pool_name = pool.name.clone();
    if crate::storage::volume::is_driver_volume_name(name) {
        return Err(StorageError::DriverOwnedVolume {
            pool: pool_name,
            volume: name.to_string(),
        });
    }
    // No pool refresh: that re-probes every volume in the pool, including
    // guest-written task disks and the backing paths their headers name.
    // Reading this volume's XML refreshes just this volume in libvirt.
    let vol = match pool.inner.lookup_storage_vol_by_name(name) {
        Ok(vol) => Volume::new(vol, &pool_name, name),
        Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => {
            return Err(StorageError::VolumeNotFound {
                pool: pool_name,
                volume: name.to_string(),
            })
        }
        Err(error) => {
            return Err(StorageError::volume(
                &pool_name,
                name,
                "looking up the volume",
                error,
            ))
        }
    };
    let unsafe_source = |reason: String| StorageError::UnsafeSourceVolume {
        pool: pool_name.clone(),
        volume: name.to_string(),
        reason,
    };
    let described = describe_volume(&vol.xml()?).map_err(|error| StorageError::VolumeXml {
        pool: pool_name.clone(),
        volume: name.to_string(),
        source: Box::new(error),
    })?;
    if described.kind.as_deref().is_some_and(|kind| kind != "file") {
        return Err(unsafe_source(format!(
            "it is a {:?} volume, not a file; name a raw or qcow2 file volume",
            described.kind.unwrap_or_default()
        )));
    }
    if let Some(backing) = described.backing {
        return Err(unsafe_source(format!(
            "it has a backing file ({backing}); a source must be self-contained: flatten it \
             with `qemu-img convert -O qcow2 <volume> <new>` and name the new volume"
        )));
    }
    // libvirt reports ISO images (and sometimes raw uploads) as "iso"; to
    // QEMU they are raw, as the Go driver treats them.
    let format = match described.format.as_deref() {
        Some("raw") | Some("iso") | None => ImageFormat::Raw,
        Some("qcow2") => ImageFormat::Qcow2,
        Some(other) => {
            return Err(unsafe_source(format!(
                "its format {other:?} is not supported; convert it to raw or qcow2"
            )))
        }
    };
    // The operator's volume, checked without following a link: a link in
    // the pool directory to a host file (or a device, fifo, directory) is
    // no source. Its header is read through that one descriptor.
    let path = vol.path()?;
    let linked = std::fs::symlink_metadata(&path).map_err(|error| StorageError::Io {
        action: "inspect source volume",
        path: PathBuf::from(name),
        error,
    })?;
    if !linked.file_type().is_file() {
        return Err(unsafe_source(
            "its path is not a regular file (a symbolic link, device or directory); \
             name a plain file volume"
                .to_string(),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|error| StorageError::Io {
            action: "open source volume",
            path: PathBuf::from(name),
            error,
        })?;
    let opened = file.metadata().map_err(|error| StorageError::Io {
        action: "inspect source volume",
        path: PathBuf::from(name),
        error,
    })?;
    if !opened.file_type().is_file() {
        return Err(unsafe_source(
            "its path is not a regular file; name a plain file volume".to_string(),
        ));
    }
    match format {
        // libvirt shows backing files but not external data files: read
        // the header too.
        ImageFormat::Qcow2 => check_image_safe(&ImageFile::from_file(file, name), format)
            .map_err(|error| unsafe_source(error.root().to_string()))?,
        // A raw volume may hold anything, a qcow2 header naming host files
        // included: it stays raw (libvirt's answer), and every use of it
        // pins format raw (the clone's format, the overlay's backing
        // format, the domain's driver type), so nothing opens that header.
        ImageFormat::Raw => {
            if starts_with_qcow2_magic(&file) {
                tracing::info!(
                    pool = %pool_name,
                    volume = name,
                    "raw source volume holds a qcow2 header; it is used as raw bytes"
                );
            }
        }
    }
    Ok(SourceVolume {
        capacity: vol.capacity()?,
        volume: vol,
        format,
        path,
    })
}

/// Whether the file starts with the qcow2 magic (`QFI\xfb`).
fn starts_with_qcow2_magic(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0).is_ok() && magic == *b"QFI\xfb"
}

/// What a volume XML says about a volume's kind, format and backing file.
struct DescribedVolume {
    kind: Option<String>,
    format: Option<String>,
    backing: Option<String>,
}

fn describe_volume(volume_xml: &str) -> Result<DescribedVolume, xml::XmlError> {
    let root = xml::parse(volume_xml)?;
    Ok(DescribedVolume {
        kind: root.attr("type").map(str::to_string),
        format: root
            .child("target")
            .and_then(|target| target.child("format"))
            .and_then(|format| format.attr("type"))
            .map(str::to_string),
        backing: root.text_at(&["backingStore", "path"]),
    })
}

/// Creates volume `name` in `pool` as a copy of `source` (libvirt's
/// clone, `virStorageVolCreateXMLFrom`) in `format`, converted by libvirt
/// when the formats differ, then grown to `capacity` when that is larger
/// than the source. The source is only read. With `sparse = false` a raw
/// copy is allocated in full. On failure the half-made volume is deleted.
pub fn clone_volume(
    pool: &Pool,
    name: &str,
    source: &SourceVolume,
    format: ImageFormat,
    capacity: Option<u64>,
    sparse: bool,
) -> Result<Volume, StorageError> {
    let allocation = if sparse || format == ImageFormat::Qcow2 {
        0
    } else {
        source.capacity
    };
    let xml = volume_xml_allocated(name, format, source.capacity, allocation, None);
    let volume = create_volume_from(pool, name, &xml, Some(&source.volume.inner), 0)?;
    let wanted = source.capacity.max(capacity.unwrap_or(0));
    let (vol, pool_name) = (&volume.inner, pool.name.as_str());
    match grow_to_with(
        vol,
        pool_name,
        name,
        wanted,
        !sparse && format == ImageFormat::Raw,
    ) {
        Ok(()) => Ok(volume),
        Err(error) => {
            discard(vol, pool_name, name);
            Err(error)
        }
    }
}

/// Creates volume `name` in `target_format` holding `image` (in
/// `source_format`, read through its descriptor only), at least `capacity`
/// bytes big.
///
/// - qcow2 images with a backing or external data file are refused
///   ([`check_image_safe`]): they would read other host files.
/// - When the formats differ the image is converted with
///   `qemu-img convert`, confined ([`crate::storage::qemu_img`]), into a
///   0600 temporary file in `std::env::temp_dir()` (`$TMPDIR`; it needs
///   room for the converted image) that is removed afterwards.
/// - The bytes are copied on this host when the volume is a local file
///   (a `dir` pool: reflink or sparse copy, [`fill_local`]), else they go
///   through a libvirt stream. Raw targets are uploaded sparse (zero
///   blocks become holes) where libvirt handles that.
/// - The result is resized to `capacity` when that exceeds the image's
///   virtual size; a smaller `capacity` is ignored (never shrinks a disk).
/// - On failure the half-made volume is deleted.
pub fn create_from_image(
    conn: &Connect,
    pool: &Pool,
    name: &str,
    image: &ImageFile,
    source_format: ImageFormat,
    target_format: ImageFormat,
    capacity: Option<u64>,
) -> Result<Volume, StorageError> {
    create_from_image_with(
        conn,
        pool,
        name,
        image,
        source_format,
        target_format,
        (capacity, None),
        true,
        None,
    )
}

/// [`create_from_image`] with the disk's `sparse` (when false, a raw
/// volume is uploaded without holes and grown allocated), a `cap`: the
/// size checked before the start, see [`create_hashed`], and a counter of
/// the bytes copied.
///
/// A volume that is a file on this host (a `dir` pool) is filled by
/// [`fill_local`] (a reflink where the filesystem offers it, else a
/// sparse copy; for `sparse = false` a sparse copy allocated in full)
/// instead of a libvirt stream.
#[allow(clippy::too_many_arguments)]
pub fn create_from_image_with(
    conn: &Connect,
    pool: &Pool,
    name: &str,
    image: &ImageFile,
    source_format: ImageFormat,
    target_format: ImageFormat,
    (capacity, cap): (Option<u64>, Option<u64>),
    sparse: bool,
    progress: Option<&CopyProgress>,
) -> Result<Volume, StorageError> {
    create_hashed(
        conn,
        pool,
        name,
        image,
        (source_format, target_format),
        (capacity, cap),
        sparse,
        Fill {
            progress,
            hash: false,
        },
    )
    .map(|(volume, _)| volume)
}

/// How [`create_hashed`] fills the volume it made: copied on this host
/// when the volume is a file here ([`fill_local`]), else through a libvirt
/// stream; the bytes counted in `progress`. With `hash` (shared parents)
/// the key of the bytes written is computed: from the stream as it is
/// sent, or by reading the finished volume back (the driver's own file in
/// the pool, which no job can write).
#[derive(Clone, Copy)]
struct Fill<'a> {
    progress: Option<&'a CopyProgress>,
    hash: bool,
}

/// The most bytes an upload of an image whose virtual size is at most
/// `cap` may hold: `cap` for raw; for qcow2 also its metadata (L2 and
/// refcount tables are at most 1/64 + 1/256 of the data with the smallest
/// clusters), rounded up generously.
pub fn upload_cap(cap: u64, format: ImageFormat) -> u64 {
    match format {
        ImageFormat::Raw => cap,
        ImageFormat::Qcow2 => cap.saturating_add(cap / 32).saturating_add(16 << 20),
    }
}

/// [`create_from_image_with`], also returning the [`parent_key`] of the
/// bytes uploaded when they were the image's own (no conversion).
///
/// `cap` is the size checked before the start (against `max_disk_size`
/// and the pool's free space). Whoever can write the image (a sibling
/// task) may rewrite it after that check, so the virtual size is read
/// again here, from the same descriptor, and the bytes to upload are
/// counted: more than the cap is refused before any volume exists.
#[allow(clippy::too_many_arguments)]
fn create_hashed(
    conn: &Connect,
    pool: &Pool,
    name: &str,
    image: &ImageFile,
    (source_format, target_format): (ImageFormat, ImageFormat),
    (capacity, cap): (Option<u64>, Option<u64>),
    sparse: bool,
    fill: Fill<'_>,
) -> Result<(Volume, Option<String>), StorageError> {
    check_volume_name(name)?;
    check_image_safe(image, source_format)?;
    let virtual_size = image_virtual_size(image, source_format)?;
    let grew = |found: String, cap: u64| StorageError::GrewAfterCheck {
        path: image.shown_path(),
        found,
        cap,
    };
    if let Some(cap) = cap {
        if virtual_size > cap {
            return Err(grew(
                format!("its virtual size is {virtual_size} bytes, more"),
                cap,
            ));
        }
    }
    let wanted = virtual_size.max(capacity.unwrap_or(0));
    if capacity.is_some_and(|c| c < virtual_size) {
        tracing::warn!(
            image = image.shown(),
            virtual_size,
            requested = capacity,
            "requested disk size is smaller than the image; using the image size"
        );
    }

    let converted = if source_format != target_format {
        let temp = convert(image, source_format, target_format)?;
        // Our own private file, so opening it by path is fine.
        let file = File::open(&temp.path).map_err(|error| StorageError::Io {
            action: "open the converted image of",
            path: image.shown_path(),
            error,
        })?;
        Some((temp, ImageFile::from_file(file, image.shown())))
    } else {
        None
    };
    let upload_from = converted.as_ref().map_or(image, |(_, file)| file);
    let length = upload_from.len()?;
    // The upload sends exactly `length` bytes (fewer is an error), so this
    // bounds what reaches the pool.
    if let Some(cap) = cap {
        let most = upload_cap(cap, target_format);
        if length > most {
            return Err(grew(
                format!("{length} bytes to copy, more than the {most} allowed for"),
                cap,
            ));
        }
    }

    // A raw volume's file is its disk, so it must hold the whole upload; a
    // qcow2 volume's header is replaced by the image's, so start it small.
    let initial = match target_format {
        ImageFormat::Raw => wanted.max(length),
        ImageFormat::Qcow2 => virtual_size,
    };
    let allocate = !sparse && target_format == ImageFormat::Raw;
    let volume = create_empty_with(pool, name, target_format, initial, !allocate)?;
    let (vol, pool_name) = (&volume.inner, pool.name.as_str());
    let progress = fill.progress;
    let end = match target_format {
        ImageFormat::Raw => initial,
        ImageFormat::Qcow2 => length,
    };
    let copied = fill_local(
        vol,
        pool_name,
        name,
        upload_from,
        (length, end),
        allocate,
        progress,
    );
    let sparse = sparse && target_format == ImageFormat::Raw && sparse_upload_works(conn);
    let mut reader = HashingReader::new(upload_from.reader());
    let mut local_key = None;
    let result = copied
        .and_then(|copied| match copied {
            Some((method, file)) => {
                tracing::debug!(
                    pool = pool_name,
                    volume = name,
                    method = method.as_str(),
                    "image copied into the volume"
                );
                if fill.hash {
                    local_key =
                        Some(
                            key_of_prefix(&file, length).map_err(|error| StorageError::Io {
                                action: "hash the copy of",
                                path: upload_from.shown_path(),
                                error,
                            })?,
                        );
                }
                Ok(())
            }
            None => upload(
                conn,
                vol,
                pool_name,
                name,
                &upload_from.shown_path(),
                &mut reader,
                length,
                sparse,
                progress,
            ),
        })
        .and_then(|()| {
            if target_format == ImageFormat::Qcow2 {
                trim_to(vol, length);
            }
            grow_to_with(vol, pool_name, name, wanted, allocate)
        });
    match result {
        Ok(()) => {
            let hashed = converted.is_none() && fill.hash;
            let key = hashed.then(|| local_key.unwrap_or_else(|| reader.key()));
            Ok((volume, key))
        }
        Err(error) => {
            discard(vol, pool_name, name);
            Err(error)
        }
    }
}

/// Fills volume `name`, just made by libvirt, with the first `length`
/// bytes of `source` (through its descriptor) by [`copy_into`]: a reflink
/// when the pool's filesystem offers one, else a sparse copy; with
/// `allocate` (a raw disk with `sparse = false`) by [`copy_allocated`].
/// The file libvirt made is only written (its owner and mode stay), then
/// set to `end` bytes (a raw disk keeps the size libvirt gave it).
///
/// `Ok(None)` when the volume is not a regular file on this host (a pool
/// of another kind, libvirt's test driver, a remote libvirt): the caller
/// uploads through libvirt instead.
fn fill_local(
    vol: &StorageVol,
    pool_name: &str,
    name: &str,
    source: &ImageFile,
    (length, end): (u64, u64),
    allocate: bool,
    progress: Option<&CopyProgress>,
) -> Result<Option<(CopyMethod, File)>, StorageError> {
    let xml = vol
        .xml_desc(0)
        .map_err(|e| StorageError::volume(pool_name, name, "reading the volume XML", e))?;
    let described = describe_volume(&xml).map_err(|error| StorageError::VolumeXml {
        pool: pool_name.to_string(),
        volume: name.to_string(),
        source: Box::new(error),
    })?;
    if described.kind.as_deref().is_some_and(|kind| kind != "file") {
        return Ok(None);
    }
    let path = PathBuf::from(
        vol.path()
            .map_err(|e| StorageError::volume(pool_name, name, "reading the volume path", e))?,
    );
    if !path.is_absolute() {
        return Ok(None);
    }
    let io_error = |action: &'static str, error: io::Error| StorageError::Io {
        action,
        path: path.clone(),
        error,
    };
    // The file libvirt just created; never through a link.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error("open the new volume", error)),
    };
    let meta = file
        .metadata()
        .map_err(|error| io_error("inspect the new volume", error))?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    let copied = if allocate {
        copy_allocated(source.file(), &file, length, end, progress)
    } else {
        copy_into(source.file(), &file, length, progress)
    };
    let method = copied.map_err(|error| source.io("copy into the new volume", error))?;
    file.set_len(end)
        .map_err(|error| io_error("set the size of the new volume", error))?;
    Ok(Some((method, file)))
}

/// The [`parent_key`] of the first `length` bytes of `file` (the key a
/// stream upload of exactly those bytes gets).
fn key_of_prefix(file: &File, length: u64) -> io::Result<String> {
    let image = ImageFile::from_file(file.try_clone()?, "");
    let mut reader = HashingReader::new(image.reader().take(length));
    let read = io::copy(&mut reader, &mut io::sink())?;
    if read != length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the copy holds {read} bytes, not {length}"),
        ));
    }
    Ok(reader.key())
}

/// Creates volume `name` (raw, or qcow2 when `bytes` is a qcow2 image)
/// holding exactly `bytes`; used for the cloud-init seed ISO. A volume of
/// that name already there is [`StorageError::VolumeExists`].
pub fn upload_bytes(
    conn: &Connect,
    pool: &Pool,
    name: &str,
    bytes: &[u8],
    format: ImageFormat,
) -> Result<Volume, StorageError> {
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
    let volume = create_empty(pool, name, format, capacity)?;
    let (vol, pool_name) = (&volume.inner, pool.name.as_str());
    let length = bytes.len() as u64;
    let result = upload(
        conn,
        vol,
        pool_name,
        name,
        &memory,
        &mut Cursor::new(bytes),
        length,
        false,
        None,
    );
    match result {
        Ok(()) => {
            if format == ImageFormat::Qcow2 {
                trim_to(vol, length);
            }
            Ok(volume)
        }
        Err(error) => {
            discard(vol, pool_name, name);
            Err(error)
        }
    }
}

/// Creates qcow2 volume `name` backed by `parent` (in `parent_format`),
/// as big as the parent or `capacity`, whichever is larger. libvirt runs
/// `qemu-img create -b` for it.
pub fn create_overlay(
    pool: &Pool,
    name: &str,
    parent: &Volume,
    parent_format: ImageFormat,
    capacity: Option<u64>,
) -> Result<Volume, StorageError> {
    let (pool_name, parent_name) = (&parent.pool, &parent.name);
    let parent_path = parent.inner.path().map_err(|e| {
        StorageError::volume(pool_name, parent_name, "reading the parent's path", e)
    })?;
    let parent_size = parent
        .inner
        .info()
        .map_err(|e| StorageError::volume(pool_name, parent_name, "reading the parent's size", e))?
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

/// The shared parent volume for `image` (in `format`), uploaded on first
/// use and reused while the image is unchanged.
///
/// Its name carries the SHA-256 of the bytes it holds ([`parent_key`]:
/// hashed as they are streamed from the image's descriptor, or read back
/// from the volume after a copy on this host, see [`create_hashed`]), so a
/// parent holds exactly what its name says whichever job made it. In a
/// `dir` pool the parent is a reflink of the image where the file system
/// allows it. The upload goes to a `.partial-` volume
/// that is hard-linked to the parent name once complete (an existing
/// parent of that name holds the same bytes and is used instead), so a
/// parent name never points at half an image, even after a crash. This
/// needs the pool's directory on this host, which holds for `dir` pools.
/// Concurrent starts from one image file share one upload. Reusing a
/// parent refreshes its mtime, which [`prune_unused_parents`] reads as
/// "last used".
pub fn ensure_parent(
    conn: &Connect,
    pool: &Pool,
    image: &ImageFile,
    format: ImageFormat,
) -> Result<Volume, StorageError> {
    ensure_parent_capped(conn, pool, image, format, None, None)
}

/// [`ensure_parent`] with the size checked before the start as a cap (see
/// [`create_hashed`]; a parent found for the image is held to it too) and
/// a counter of the bytes uploaded.
pub fn ensure_parent_capped(
    conn: &Connect,
    pool: &Pool,
    image: &ImageFile,
    format: ImageFormat,
    cap: Option<u64>,
    progress: Option<&CopyProgress>,
) -> Result<Volume, StorageError> {
    let parent = ensure_parent_uncapped(conn, pool, image, format, cap, progress)?;
    if let Some(cap) = cap {
        let capacity = parent
            .inner
            .info()
            .map_err(|e| StorageError::volume(&pool.name, "parent", "reading its size", e))?
            .capacity;
        if capacity > cap {
            return Err(StorageError::GrewAfterCheck {
                path: image.shown_path(),
                found: format!("its virtual size is {capacity} bytes, more"),
                cap,
            });
        }
    }
    Ok(parent)
}

fn ensure_parent_uncapped(
    conn: &Connect,
    pool: &Pool,
    image: &ImageFile,
    format: ImageFormat,
    cap: Option<u64>,
    progress: Option<&CopyProgress>,
) -> Result<Volume, StorageError> {
    check_image_safe(image, format)?;
    let identity =
        Identity::of(image.file()).map_err(|error| image.io("read metadata of image", error))?;
    let pool_name = pool.name.as_str();
    let upload_lock = parent_key::upload_lock(&identity);
    let _uploading = upload_lock
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(key) = parent_key::remembered(&identity) {
        let name = parent_volume_name(format, &key);
        let lock = parent_lock(pool_name, &name);
        let _held = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Ok(vol) = pool.inner.lookup_storage_vol_by_name(&name) {
            touch(&vol);
            return Ok(Volume::new(vol, pool_name, &name));
        }
    }
    let staging_name = format!(
        "{PARENT_PREFIX}{}-upload{STAGING_MARK}{}",
        format.as_str(),
        unique_suffix()
    );
    let (staging, key) = create_hashed(
        conn,
        pool,
        &staging_name,
        image,
        (format, format),
        (None, cap),
        true,
        Fill {
            progress,
            hash: true,
        },
    )?;
    let Some(key) = key else {
        // Cannot happen (same format, no conversion); refuse rather than
        // publish unhashed bytes.
        discard(&staging.inner, pool_name, &staging_name);
        return Err(image.io(
            "hash image",
            io::Error::other("the upload was converted, so its bytes were not hashed"),
        ));
    };
    let name = parent_volume_name(format, &key);
    let lock = parent_lock(pool_name, &name);
    let _held = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let published = publish(&staging.inner, pool_name, &staging_name, &name);
    discard(&staging.inner, pool_name, &staging_name);
    published?;
    refresh_pool(pool)?;
    let vol = pool
        .inner
        .lookup_storage_vol_by_name(&name)
        .map_err(|e| StorageError::volume(pool_name, &name, "looking up the new parent", e))?;
    touch(&vol);
    parent_key::remember(image.file(), identity, &key);
    tracing::info!(pool = %pool_name, volume = %name, image = image.shown(), "uploaded parent volume");
    Ok(Volume::new(vol, pool_name, &name))
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

/// The file of an existing volume the job names (`source.volume`); the
/// volume belongs to the operator and is used as is.
pub fn existing_path(pool: &Pool, name: &str) -> Result<PathBuf, StorageError> {
    check_volume_name(name)?;
    let pool_name = pool.name.clone();
    match pool.inner.lookup_storage_vol_by_name(name) {
        Ok(vol) => Volume::new(vol, &pool_name, name).path(),
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
pub fn delete_volume(pool: &Pool, name: &str) -> Result<(), StorageError> {
    let pool_name = pool.name.clone();
    let vol = match pool.inner.lookup_storage_vol_by_name(name) {
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

/// Deletes volume `name` the driver created in pool `pool`; a missing pool
/// or volume is fine, so teardown can be retried.
pub fn delete_created_volume(conn: &Connect, pool: &str, name: &str) -> Result<(), StorageError> {
    let Ok(Some(pool)) = super::lookup_pool(conn, pool) else {
        return Ok(());
    };
    // A refresh failure only means libvirt's list may be stale; the lookup
    // in delete_volume tells.
    let _ = refresh_pool(&pool);
    delete_volume(&pool, name)
}

/// [`prune_unused_parents`] over the named pools (those that exist);
/// returns the deleted names. A pool that fails is logged and skipped.
pub fn prune_pools(conn: &Connect, pools: &[String], min_idle: Duration) -> Vec<String> {
    let mut pruned = Vec::new();
    for name in pools {
        let result = super::lookup_pool(conn, name).and_then(|pool| match pool {
            Some(pool) => prune_unused_parents(conn, &pool, min_idle),
            None => Ok(Vec::new()),
        });
        match result {
            Ok(names) => pruned.extend(names),
            Err(error) => {
                tracing::warn!(error = %error, pool = %name, "pruning unused parent images failed");
            }
        }
    }
    pruned
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
    pool: &Pool,
    min_idle: Duration,
) -> Result<Vec<String>, StorageError> {
    let pool_name = pool.name.clone();
    refresh_pool(pool)?;
    let backing = backing_paths(conn)?;
    let volumes = pool
        .inner
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
                Ok(xml) => paths.extend(backing_path(&xml).map_err(|error| {
                    let vol_name = vol.name().unwrap_or_default();
                    StorageError::VolumeXml {
                        pool: name.clone(),
                        volume: vol_name,
                        source: Box::new(error),
                    }
                })?),
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

/// The backing file a volume XML names, if any.
fn backing_path(volume_xml: &str) -> Result<Option<String>, xml::XmlError> {
    let root = xml::parse(volume_xml)?;
    Ok(root.text_at(&["backingStore", "path"]))
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

/// Grows the volume to `wanted` bytes if it is smaller; with `allocate` (a
/// raw disk with `sparse = false`) the added bytes are allocated too.
fn grow_to_with(
    vol: &StorageVol,
    pool_name: &str,
    name: &str,
    wanted: u64,
    allocate: bool,
) -> Result<(), StorageError> {
    let capacity = vol
        .info()
        .map_err(|e| StorageError::volume(pool_name, name, "reading the volume size", e))?
        .capacity;
    let flags = if allocate {
        virt::sys::VIR_STORAGE_VOL_RESIZE_ALLOCATE
    } else {
        0
    };
    if capacity < wanted {
        retry_busy(|| vol.resize(wanted, flags)).map_err(|e| {
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
    progress: Option<&CopyProgress>,
) -> Result<(), StorageError> {
    if let Some(progress) = progress {
        progress.start(length);
    }
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
    match send_all(&stream, reader, length, sparse, progress) {
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
    progress: Option<&CopyProgress>,
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
        if let Some(progress) = progress {
            // Counted when read: the sends below finish before the next read.
            progress.set_done(length - remaining);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::storage::pool::ensure_directory_pool;
    use crate::libvirt::storage::pool::tests::{test_node, TestNode};
    use crate::storage::volume::disk_volume_name;

    fn open(path: &Path) -> ImageFile {
        ImageFile::from_file(File::open(path).expect("open image"), "image")
    }

    const MIB: u64 = 1 << 20;

    fn test_pool(node: &TestNode) -> Pool {
        let path = node.dir.path().join("pool");
        ensure_directory_pool(&node.conn, "disks", &path).expect("test pool")
    }

    #[test]
    fn volume_xml_shape() {
        let xml = volume_xml("a&b", ImageFormat::Qcow2, 5 * MIB, None);
        assert!(xml.contains("<name>a&amp;b</name>"), "{xml}");
        assert!(
            xml.contains("<capacity unit=\"bytes\">5242880</capacity>"),
            "{xml}"
        );
        assert!(xml.contains("<format type=\"qcow2\"/>"), "{xml}");
        assert!(xml.contains("<mode>0600</mode>"), "{xml}");
        assert!(!xml.contains("backingStore"), "{xml}");
        let xml = volume_xml(
            "o",
            ImageFormat::Qcow2,
            MIB,
            Some(("/p/<x>", ImageFormat::Raw)),
        );
        assert_eq!(backing_path(&xml).unwrap().as_deref(), Some("/p/<x>"));
        assert!(
            xml.contains(
                "<backingStore>\n    <path>/p/&lt;x&gt;</path>\n    <format type=\"raw\"/>"
            ),
            "{xml}"
        );
    }

    #[test]
    fn create_empty_and_delete_on_the_test_driver() {
        let node = test_node();
        let pool = test_pool(&node);
        let name = disk_volume_name("vm", "vdb", ImageFormat::Qcow2);
        let vol = create_empty(&pool, &name, ImageFormat::Qcow2, 1 << 30).unwrap();
        assert_eq!(vol.capacity().unwrap(), 1 << 30);
        assert_eq!(
            vol.path().unwrap(),
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
        assert_eq!(vol.path().unwrap(), existing_path(&pool, &name).unwrap());
        let err = existing_path(&pool, "missing.qcow2").unwrap_err();
        assert!(matches!(err, StorageError::VolumeNotFound { .. }), "{err}");

        delete_volume(&pool, &name).unwrap();
        assert!(pool.inner.lookup_storage_vol_by_name(&name).is_err());
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
        assert_eq!(overlay.capacity().unwrap(), 8 * MIB);
        let xml = overlay.xml().unwrap();
        assert_eq!(
            backing_path(&xml).unwrap(),
            Some(parent_path.to_string_lossy().into_owned()),
            "{xml}"
        );
        // Never smaller than the parent.
        let small =
            create_overlay(&pool, "vm_vdb.qcow2", &parent, ImageFormat::Raw, Some(MIB)).unwrap();
        assert_eq!(small.capacity().unwrap(), 4 * MIB);
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
        let path = node.dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let image = open(&path);
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
        assert!(pool.inner.lookup_storage_vol_by_name("vm_vda.img").is_err());

        let err =
            upload_bytes(&node.conn, &pool, "seed.iso", b"data", ImageFormat::Raw).unwrap_err();
        assert!(matches!(err, StorageError::Volume { .. }), "{err}");
        assert!(pool.inner.lookup_storage_vol_by_name("seed.iso").is_err());
        // Nothing to send: no upload call at all.
        let empty = upload_bytes(&node.conn, &pool, "empty.iso", b"", ImageFormat::Raw).unwrap();
        assert_eq!(empty.capacity().unwrap(), 0);
    }

    /// Issue 9.8: a sibling that can write the image rewrites it between
    /// the start's size check and the copy. The copy reads the size again
    /// from the same descriptor and refuses, before any volume exists.
    #[test]
    fn an_image_grown_after_the_size_check_is_refused_at_copy() {
        let node = test_node();
        let pool = test_pool(&node);
        let copy = |image: &ImageFile, format: ImageFormat, cap: u64| {
            create_from_image_with(
                &node.conn,
                &pool,
                "vm_vda.img",
                image,
                format,
                ImageFormat::Raw,
                (None, Some(cap)),
                true,
                None,
            )
        };

        // Raw: checked at 1 MiB, then truncated bigger through another handle.
        let raw = node.dir.path().join("grow.img");
        std::fs::write(&raw, vec![1u8; MIB as usize]).unwrap();
        let image = open(&raw);
        let checked = image_virtual_size(&image, ImageFormat::Raw).unwrap();
        assert_eq!(checked, MIB);
        File::options()
            .write(true)
            .open(&raw)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let err = copy(&image, ImageFormat::Raw, checked).unwrap_err();
        assert!(matches!(err, StorageError::GrewAfterCheck { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("virtual size is 67108864 bytes, more than the 1048576 bytes checked"),
            "{err}"
        );

        // qcow2: checked at 1 MiB, then its header rewritten to claim 1 TiB.
        let qcow2 = node.dir.path().join("grow.qcow2");
        let header = |size: u64| {
            let mut header = vec![0u8; 112];
            header[..4].copy_from_slice(b"QFI\xfb");
            header[4..8].copy_from_slice(&3u32.to_be_bytes());
            header[24..32].copy_from_slice(&size.to_be_bytes());
            header
        };
        std::fs::write(&qcow2, header(MIB)).unwrap();
        let image = open(&qcow2);
        let checked = image_virtual_size(&image, ImageFormat::Qcow2).unwrap();
        std::fs::write(&qcow2, header(1 << 40)).unwrap();
        let err = copy(&image, ImageFormat::Qcow2, checked).unwrap_err();
        assert!(matches!(err, StorageError::GrewAfterCheck { .. }), "{err}");
        let err = ensure_parent_capped(
            &node.conn,
            &pool,
            &image,
            ImageFormat::Qcow2,
            Some(checked),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::GrewAfterCheck { .. }), "{err}");
        assert!(!err.is_recoverable());

        // qcow2 kept at 1 MiB but padded with 64 MiB: never uploaded.
        std::fs::write(&qcow2, header(MIB)).unwrap();
        File::options()
            .write(true)
            .open(&qcow2)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let err = create_from_image_with(
            &node.conn,
            &pool,
            "vm_vdb.qcow2",
            &image,
            ImageFormat::Qcow2,
            ImageFormat::Qcow2,
            (None, Some(MIB)),
            true,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("67108864 bytes to copy"), "{err}");
        assert!(pool.volume_names().unwrap().is_empty());
    }

    #[test]
    fn the_upload_cap_allows_qcow2_metadata_only() {
        assert_eq!(upload_cap(MIB, ImageFormat::Raw), MIB);
        let qcow2 = upload_cap(1 << 30, ImageFormat::Qcow2);
        assert!(qcow2 > 1 << 30 && qcow2 < (1 << 30) + (64 << 20), "{qcow2}");
        assert_eq!(upload_cap(u64::MAX, ImageFormat::Qcow2), u64::MAX);
    }

    #[test]
    fn unsafe_images_are_refused_before_any_volume_exists() {
        let node = test_node();
        let pool = test_pool(&node);
        let path = node.dir.path().join("evil.qcow2");
        let mut header = vec![0u8; 112];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[8..16].copy_from_slice(&0x200u64.to_be_bytes()); // backing file
        header[24..32].copy_from_slice(&MIB.to_be_bytes());
        std::fs::write(&path, &header).unwrap();
        let image = open(&path);
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
        assert!(pool.volume_names().unwrap().is_empty());
    }

    #[test]
    fn failed_parent_upload_leaves_nothing() {
        // The test driver cannot upload: the staging volume must go again
        // and no parent name may appear.
        let node = test_node();
        let pool = test_pool(&node);
        let path = node.dir.path().join("base.img");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let err = ensure_parent(&node.conn, &pool, &open(&path), ImageFormat::Raw).unwrap_err();
        assert!(matches!(err, StorageError::Volume { .. }), "{err}");
        assert!(pool.volume_names().unwrap().is_empty());
    }
}
