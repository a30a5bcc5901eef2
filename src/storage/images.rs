//! Image files on the host: resolving a job's `source.image` against the
//! directories the operator allows, and reading the few header fields we
//! need (format, virtual size, backing file). No libvirt here.
//!
//! The field name (`disk[N].source.image`) is left to the caller, which
//! knows the index: wrap errors with [`StorageError::in_field`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::StorageError;

/// The image formats we read and write (the task config's `DISK_FORMATS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name libvirt and qemu-img use.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The file extension of volumes in this format (`.img` for raw, like
    /// the Go driver).
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Raw => "img",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses a task config format name ("raw" or "qcow2").
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ImageFormat::from_name(name)
            .ok_or_else(|| format!("{name:?} is not one of \"raw\", \"qcow2\""))
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first four bytes of every qcow2 file.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Resolves the image a job asks for to a canonical path of a regular file
/// inside one of `allowed_dirs`, the alloc dir or the task dir.
///
/// - An absolute path is canonicalised (symlinks followed, `..` removed)
///   and must land inside one of those directories (themselves
///   canonicalised; ones that do not exist are skipped).
/// - A relative path is tried against each allowed dir, then the alloc dir,
///   then the task dir (the Go driver's order). The first candidate that
///   exists decides: if it resolves outside every allowed directory, or is
///   not a regular file, that is an error rather than a reason to keep
///   looking, so a planted symlink cannot shadow a later directory silently.
///
/// Containment compares path components, so `/a/bc` is not inside `/a/b`.
/// Errors do not name the job field; the caller adds it with
/// [`StorageError::in_field`].
pub fn resolve_image(
    requested: &str,
    allowed_dirs: &[PathBuf],
    alloc_dir: &Path,
    task_dir: &Path,
) -> Result<PathBuf, StorageError> {
    let bases: Vec<&Path> = allowed_dirs
        .iter()
        .map(PathBuf::as_path)
        .chain([alloc_dir, task_dir])
        .collect();
    // Directories that cannot be canonicalised (missing) allow nothing.
    let roots: Vec<PathBuf> = bases
        .iter()
        .filter_map(|base| std::fs::canonicalize(base).ok())
        .collect();

    if requested.is_empty() {
        return Err(StorageError::ImageNotFound {
            requested: requested.to_string(),
            tried: Vec::new(),
        });
    }
    let requested_path = Path::new(requested);
    let candidates: Vec<PathBuf> = if requested_path.is_absolute() {
        vec![requested_path.to_path_buf()]
    } else {
        bases.iter().map(|base| base.join(requested_path)).collect()
    };

    let mut tried = Vec::new();
    for candidate in candidates {
        let canonical = match std::fs::canonicalize(&candidate) {
            Ok(canonical) => canonical,
            Err(error) if is_missing(&error) => {
                tried.push(candidate);
                continue;
            }
            Err(error) => {
                return Err(StorageError::Io {
                    action: "resolve image",
                    path: candidate,
                    error,
                })
            }
        };
        if !roots.iter().any(|root| canonical.starts_with(root)) {
            return Err(StorageError::ImageNotAllowed {
                requested: requested.to_string(),
                resolved: canonical,
                allowed: roots,
            });
        }
        let metadata = std::fs::metadata(&canonical).map_err(|error| StorageError::Io {
            action: "read metadata of image",
            path: canonical.clone(),
            error,
        })?;
        if !metadata.is_file() {
            return Err(StorageError::ImageNotFile {
                requested: requested.to_string(),
                path: canonical,
            });
        }
        return Ok(canonical);
    }
    Err(StorageError::ImageNotFound {
        requested: requested.to_string(),
        tried,
    })
}

fn is_missing(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Reads up to `buf.len()` bytes from the start of `path`; returns how many.
fn read_header(path: &Path, buf: &mut [u8]) -> Result<usize, StorageError> {
    let io_error = |error| StorageError::Io {
        action: "read the header of image",
        path: path.to_path_buf(),
        error,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_error(error)),
        }
    }
    Ok(filled)
}

/// qcow2 when the file starts with the qcow2 magic, else raw. (Other
/// formats are not supported, and treating them as raw is safe: a raw disk
/// is never interpreted by QEMU.)
pub fn detect_format(path: &Path) -> Result<ImageFormat, StorageError> {
    let mut magic = [0u8; 4];
    let read = read_header(path, &mut magic)?;
    Ok(if read == 4 && magic == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// The fields of a qcow2 header we look at (all big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Qcow2Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub virtual_size: u64,
    /// Version 3 incompatible-feature bits (0 for version 2).
    pub incompatible_features: u64,
}

/// qcow2 v3 incompatible feature bit 2: guest data lives in another file.
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;

/// Parses a qcow2 header; None when `bytes` does not start with the magic.
pub(crate) fn parse_qcow2_header(bytes: &[u8]) -> Option<Qcow2Header> {
    if bytes.len() < 32 || bytes[..4] != QCOW2_MAGIC {
        return None;
    }
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let version = u32_at(4)?;
    Some(Qcow2Header {
        version,
        backing_file_offset: u64_at(8)?,
        virtual_size: u64_at(24)?,
        incompatible_features: if version >= 3 { u64_at(72)? } else { 0 },
    })
}

const QCOW2_HEADER_READ: usize = 104;

/// The virtual (guest-visible) size recorded in a qcow2 header: the
/// big-endian u64 at offset 24. None when the file is not qcow2; an error
/// when it starts with the magic but the header is cut short.
pub fn qcow2_virtual_size(path: &Path) -> Result<Option<u64>, StorageError> {
    let mut header = [0u8; QCOW2_HEADER_READ];
    let read = read_header(path, &mut header)?;
    if read < 4 || header[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    match parse_qcow2_header(&header[..read]) {
        Some(parsed) => Ok(Some(parsed.virtual_size)),
        None => Err(truncated(path)),
    }
}

fn truncated(path: &Path) -> StorageError {
    StorageError::UnsafeImage {
        path: path.to_path_buf(),
        reason: "it starts like qcow2 but its header is cut short".into(),
    }
}

/// The guest-visible size of an image in `format`: the qcow2 header's
/// virtual size, or the file length for raw.
pub fn image_virtual_size(path: &Path, format: ImageFormat) -> Result<u64, StorageError> {
    match format {
        ImageFormat::Qcow2 => qcow2_virtual_size(path)?.ok_or_else(|| StorageError::UnsafeImage {
            path: path.to_path_buf(),
            reason: "it is declared qcow2 but has no qcow2 header; set source.format = \"raw\" or \
                     leave the format unset"
                .into(),
        }),
        ImageFormat::Raw => {
            std::fs::metadata(path)
                .map(|m| m.len())
                .map_err(|error| StorageError::Io {
                    action: "read metadata of image",
                    path: path.to_path_buf(),
                    error,
                })
        }
    }
}

/// Refuses qcow2 images that would make QEMU or qemu-img open other host
/// files: a backing file (e.g. `/etc/shadow` or `/dev/sda` planted in an
/// image a job downloaded) or an external data file. Raw images are always
/// safe because nothing in them is interpreted.
pub fn check_image_safe(path: &Path, format: ImageFormat) -> Result<(), StorageError> {
    if format == ImageFormat::Raw {
        return Ok(());
    }
    let mut header = [0u8; QCOW2_HEADER_READ];
    let read = read_header(path, &mut header)?;
    let parsed = parse_qcow2_header(&header[..read]).ok_or_else(|| truncated(path))?;
    check_qcow2_header(path, &parsed)
}

pub(crate) fn check_qcow2_header(path: &Path, header: &Qcow2Header) -> Result<(), StorageError> {
    let unsafe_image = |reason: &str| StorageError::UnsafeImage {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if !(2..=3).contains(&header.version) {
        return Err(unsafe_image(&format!(
            "qcow2 version {} is not supported (2 or 3 are)",
            header.version
        )));
    }
    if header.backing_file_offset != 0 {
        return Err(unsafe_image(
            "it is a qcow2 overlay with a backing file; flatten it first with \
             `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`",
        ));
    }
    if header.incompatible_features & QCOW2_INCOMPAT_DATA_FILE != 0 {
        return Err(unsafe_image(
            "its qcow2 data lives in an external data file; convert it first with \
             `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dirs {
        _root: tempfile::TempDir,
        base: PathBuf,
        images: PathBuf,
        alloc: PathBuf,
        task: PathBuf,
        outside: PathBuf,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().expect("tempdir");
        // Canonical base, so expected paths compare equal (e.g. /tmp symlinked).
        let base = std::fs::canonicalize(root.path()).expect("canonicalize tempdir");
        let images = base.join("images");
        // Nomad's layout: <alloc>/alloc is shared, <alloc>/<task> is the task's.
        let alloc = base.join("a1/alloc");
        let task = base.join("a1/web");
        let outside = base.join("outside");
        for dir in [&images, &alloc, &task, &outside] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        Dirs {
            _root: root,
            base,
            images,
            alloc,
            task,
            outside,
        }
    }

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).expect("write file");
    }

    fn resolve(d: &Dirs, requested: &str) -> Result<PathBuf, StorageError> {
        resolve_image(
            requested,
            std::slice::from_ref(&d.images),
            &d.alloc,
            &d.task,
        )
    }

    #[test]
    fn absolute_path_inside_allowed_dirs() {
        let d = dirs();
        write(&d.images.join("a.img"), b"x");
        write(&d.task.join("t.img"), b"x");
        let found = resolve(&d, d.images.join("a.img").to_str().unwrap()).unwrap();
        assert_eq!(found, d.images.join("a.img"));
        let found = resolve(&d, d.task.join("t.img").to_str().unwrap()).unwrap();
        assert_eq!(found, d.task.join("t.img"));
    }

    #[test]
    fn absolute_path_outside_is_refused() {
        let d = dirs();
        write(&d.outside.join("secret"), b"x");
        let err = resolve(&d, d.outside.join("secret").to_str().unwrap()).unwrap_err();
        assert!(
            matches!(&err, StorageError::ImageNotAllowed { resolved, .. } if *resolved == d.outside.join("secret")),
            "{err}"
        );
        assert!(err.to_string().contains("image_paths"), "{err}");
    }

    #[test]
    fn dotdot_cannot_escape() {
        let d = dirs();
        write(&d.outside.join("secret"), b"x");
        for requested in [
            "../outside/secret".to_string(),
            format!("{}/../outside/secret", d.images.display()),
        ] {
            let err = resolve(&d, &requested).unwrap_err();
            assert!(
                matches!(err, StorageError::ImageNotAllowed { .. }),
                "{requested}: {err}"
            );
        }
        // `..` that stays inside is fine: task dir → alloc dir.
        write(&d.alloc.join("shared.img"), b"x");
        let found = resolve(&d, "../alloc/shared.img").unwrap();
        assert_eq!(found, d.alloc.join("shared.img"));
        let found = resolve(&d, "../a1/web/../alloc/shared.img").unwrap();
        assert_eq!(found, d.alloc.join("shared.img"));
    }

    #[test]
    fn symlink_cannot_escape() {
        let d = dirs();
        write(&d.outside.join("secret"), b"x");
        symlink(d.outside.join("secret"), d.images.join("link.img")).unwrap();
        symlink(&d.outside, d.task.join("dirlink")).unwrap();
        for requested in [
            "link.img".to_string(),
            d.images.join("link.img").display().to_string(),
            "dirlink/secret".to_string(),
        ] {
            let err = resolve(&d, &requested).unwrap_err();
            assert!(
                matches!(err, StorageError::ImageNotAllowed { .. }),
                "{requested}: {err}"
            );
        }
        // A symlink from one allowed place to another is fine.
        write(&d.images.join("real.img"), b"x");
        symlink(d.images.join("real.img"), d.task.join("alias.img")).unwrap();
        assert_eq!(resolve(&d, "alias.img").unwrap(), d.images.join("real.img"));
    }

    #[test]
    fn allowed_dir_given_through_a_symlink() {
        let d = dirs();
        symlink(&d.images, d.base.join("images-link")).unwrap();
        write(&d.images.join("a.img"), b"x");
        let allowed = [d.base.join("images-link")];
        let found = resolve_image("a.img", &allowed, &d.alloc, &d.task).unwrap();
        assert_eq!(found, d.images.join("a.img"));
        let requested = d.base.join("images-link/a.img");
        let found =
            resolve_image(requested.to_str().unwrap(), &allowed, &d.alloc, &d.task).unwrap();
        assert_eq!(found, d.images.join("a.img"));
    }

    #[test]
    fn prefix_trick_is_not_containment() {
        let d = dirs();
        // `<base>/imagesX` shares a string prefix with `<base>/images`.
        let sibling = d.base.join("imagesX");
        std::fs::create_dir(&sibling).unwrap();
        write(&sibling.join("a.img"), b"x");
        let err = resolve(&d, sibling.join("a.img").to_str().unwrap()).unwrap_err();
        assert!(matches!(err, StorageError::ImageNotAllowed { .. }), "{err}");
        let err = resolve(&d, "../imagesX/a.img").unwrap_err();
        assert!(matches!(err, StorageError::ImageNotAllowed { .. }), "{err}");
    }

    #[test]
    fn relative_resolution_order() {
        let d = dirs();
        let second = d.base.join("images2");
        std::fs::create_dir(&second).unwrap();
        let allowed = [d.images.clone(), second.clone()];
        write(&d.task.join("a.img"), b"task");
        let r = |name: &str| resolve_image(name, &allowed, &d.alloc, &d.task).unwrap();
        assert_eq!(r("a.img"), d.task.join("a.img"));
        write(&d.alloc.join("a.img"), b"alloc");
        assert_eq!(r("a.img"), d.alloc.join("a.img"));
        write(&second.join("a.img"), b"second");
        assert_eq!(r("a.img"), second.join("a.img"));
        write(&d.images.join("a.img"), b"first");
        assert_eq!(r("a.img"), d.images.join("a.img"));
        // Subdirectories work too.
        std::fs::create_dir(d.task.join("local")).unwrap();
        write(&d.task.join("local/b.img"), b"x");
        assert_eq!(r("local/b.img"), d.task.join("local/b.img"));
    }

    #[test]
    fn missing_file_names_the_paths_tried() {
        let d = dirs();
        let missing_allowed = d.base.join("does-not-exist");
        let allowed = [d.images.clone(), missing_allowed.clone()];
        let err = resolve_image("nope.img", &allowed, &d.alloc, &d.task).unwrap_err();
        let StorageError::ImageNotFound { tried, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(
            tried,
            &vec![
                d.images.join("nope.img"),
                missing_allowed.join("nope.img"),
                d.alloc.join("nope.img"),
                d.task.join("nope.img"),
            ]
        );
        let message = err.in_field("disk[1].source.image").to_string();
        assert!(
            message.starts_with("disk[1].source.image: image \"nope.img\" was not found; tried "),
            "{message}"
        );
        assert!(message.contains(&d.task.join("nope.img").display().to_string()));
        // A path through a regular file is "missing", not an I/O error.
        write(&d.images.join("file"), b"x");
        let err = resolve(&d, "file/x.img").unwrap_err();
        assert!(matches!(err, StorageError::ImageNotFound { .. }), "{err}");
        let err = resolve(&d, "").unwrap_err();
        assert!(matches!(err, StorageError::ImageNotFound { .. }), "{err}");
        let err = resolve(&d, "/definitely/not/here.img").unwrap_err();
        assert!(matches!(err, StorageError::ImageNotFound { .. }), "{err}");
    }

    #[test]
    fn directory_is_not_an_image() {
        let d = dirs();
        std::fs::create_dir(d.images.join("dir.img")).unwrap();
        let err = resolve(&d, "dir.img").unwrap_err();
        assert!(matches!(err, StorageError::ImageNotFile { .. }), "{err}");
        let err = resolve(&d, d.images.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, StorageError::ImageNotFile { .. }), "{err}");
        let err = resolve(&d, ".").unwrap_err();
        assert!(matches!(err, StorageError::ImageNotFile { .. }), "{err}");
    }

    fn qcow2_header_bytes(version: u32, backing: u64, size: u64, incompat: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; 112];
        bytes[..4].copy_from_slice(&QCOW2_MAGIC);
        bytes[4..8].copy_from_slice(&version.to_be_bytes());
        bytes[8..16].copy_from_slice(&backing.to_be_bytes());
        bytes[24..32].copy_from_slice(&size.to_be_bytes());
        bytes[72..80].copy_from_slice(&incompat.to_be_bytes());
        bytes
    }

    #[test]
    fn handwritten_qcow2_header() {
        let d = dirs();
        let path = d.images.join("hand.qcow2");
        write(&path, &qcow2_header_bytes(3, 0, 5 << 30, 0));
        assert_eq!(detect_format(&path).unwrap(), ImageFormat::Qcow2);
        assert_eq!(qcow2_virtual_size(&path).unwrap(), Some(5 << 30));
        assert_eq!(
            image_virtual_size(&path, ImageFormat::Qcow2).unwrap(),
            5 << 30
        );
        check_image_safe(&path, ImageFormat::Qcow2).unwrap();

        write(&path, &qcow2_header_bytes(3, 0x200, 1 << 20, 0));
        let err = check_image_safe(&path, ImageFormat::Qcow2).unwrap_err();
        assert!(err.to_string().contains("backing file"), "{err}");
        write(
            &path,
            &qcow2_header_bytes(3, 0, 1 << 20, QCOW2_INCOMPAT_DATA_FILE),
        );
        let err = check_image_safe(&path, ImageFormat::Qcow2).unwrap_err();
        assert!(err.to_string().contains("external data file"), "{err}");
        // Version 2 has no feature fields; the bytes there are ignored.
        write(
            &path,
            &qcow2_header_bytes(2, 0, 1 << 20, QCOW2_INCOMPAT_DATA_FILE),
        );
        check_image_safe(&path, ImageFormat::Qcow2).unwrap();
        write(&path, &qcow2_header_bytes(4, 0, 1 << 20, 0));
        assert!(check_image_safe(&path, ImageFormat::Qcow2).is_err());

        // Magic but cut short.
        write(&path, &QCOW2_MAGIC);
        assert_eq!(detect_format(&path).unwrap(), ImageFormat::Qcow2);
        assert!(qcow2_virtual_size(&path).is_err());
        assert!(check_image_safe(&path, ImageFormat::Qcow2).is_err());
    }

    #[test]
    fn raw_detection_and_sizes() {
        let d = dirs();
        let path = d.images.join("disk.img");
        write(&path, &[0u8; 3000]);
        assert_eq!(detect_format(&path).unwrap(), ImageFormat::Raw);
        assert_eq!(qcow2_virtual_size(&path).unwrap(), None);
        assert_eq!(image_virtual_size(&path, ImageFormat::Raw).unwrap(), 3000);
        check_image_safe(&path, ImageFormat::Raw).unwrap();
        let err = image_virtual_size(&path, ImageFormat::Qcow2).unwrap_err();
        assert!(matches!(err, StorageError::UnsafeImage { .. }), "{err}");
        let empty = d.images.join("empty.img");
        write(&empty, b"");
        assert_eq!(detect_format(&empty).unwrap(), ImageFormat::Raw);
        assert!(detect_format(&d.images.join("missing")).is_err());
    }

    #[test]
    fn format_names() {
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            assert_eq!(ImageFormat::from_name(format.as_str()), Some(format));
            assert_eq!(format.to_string(), format.as_str());
        }
        assert_eq!(ImageFormat::Raw.extension(), "img");
        assert_eq!(ImageFormat::Qcow2.extension(), "qcow2");
        assert_eq!(ImageFormat::from_name("vmdk"), None);
        assert_eq!("qcow2".parse::<ImageFormat>(), Ok(ImageFormat::Qcow2));
        assert!("vmdk"
            .parse::<ImageFormat>()
            .unwrap_err()
            .contains("\"raw\""));
    }
}
