//! Image files on the host: resolving a job's `source.image` against the
//! directories the operator allows, and reading the few header fields we
//! need (format, virtual size, backing file). No libvirt here.
//!
//! The field name (`disk[N].source.image`) is left to the caller, which
//! knows the index: wrap errors with [`StorageError::in_field`].

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::StorageError;
use crate::fsopen::{normalize, open_beneath, Links, OpenError, Root};

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

/// An image file a job named, opened once (see [`open_image`]). Every
/// later step reads this descriptor, never the path again, so swapping the
/// path afterwards changes nothing.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    shown: String,
}

impl ImageFile {
    /// An already opened file; `shown` is what errors call it (what the job
    /// wrote, never a resolved host path).
    pub fn from_file(file: File, shown: impl Into<String>) -> ImageFile {
        ImageFile {
            file,
            shown: shown.into(),
        }
    }

    /// The descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// What the job wrote.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The name errors use for it.
    pub fn shown_path(&self) -> PathBuf {
        PathBuf::from(&self.shown)
    }

    /// A copy of the image that only this process can reach: an unnamed
    /// 0600 file (`O_TMPFILE`) in the temporary directory, filled from this
    /// descriptor (a reflink where the file system has them). qemu-img
    /// reads a qcow2 header again when it opens the file, so a header that
    /// was checked must be the one it reads: a tenant who can write the
    /// original could otherwise add a backing or data file in between.
    pub fn private_copy(&self) -> Result<ImageFile, StorageError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir();
        let copy = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(&dir)
            .map_err(|error| StorageError::Io {
                action: "create a private copy of image",
                path: self.shown_path(),
                error,
            })?;
        let length = self.len()?;
        crate::storage::copy::copy_into(&self.file, &copy, length, None)
            .map_err(|error| self.io("make a private copy of image", error))?;
        Ok(ImageFile::from_file(copy, self.shown.clone()))
    }

    /// Its length now (fstat).
    pub fn len(&self) -> Result<u64, StorageError> {
        self.file
            .metadata()
            .map(|meta| meta.len())
            .map_err(|error| self.io("read metadata of image", error))
    }

    /// Whether it is empty now.
    pub fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.len()? == 0)
    }

    /// A reader from byte 0 with its own position (positional reads), so
    /// readers of the same file never disturb each other.
    pub fn reader(&self) -> FileReader<'_> {
        FileReader {
            file: &self.file,
            at: 0,
        }
    }

    pub(crate) fn io(&self, action: &'static str, error: io::Error) -> StorageError {
        StorageError::Io {
            action,
            path: self.shown_path(),
            error,
        }
    }
}

/// Reads a file from byte 0 with `pread`; see [`ImageFile::reader`].
pub struct FileReader<'a> {
    file: &'a File,
    at: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.file.read_at(buf, self.at)?;
        self.at += read as u64;
        Ok(read)
    }
}

/// A directory images may come from, open.
struct Base {
    /// As given, lexically normalised.
    given: PathBuf,
    /// Symlinks resolved, for paths written against the real location.
    canonical: Option<PathBuf>,
    root: Root,
}

impl Base {
    /// The part of `path` below this base, by whichever spelling matches.
    fn below<'p>(&self, path: &'p Path) -> Option<&'p Path> {
        path.strip_prefix(&self.given).ok().or_else(|| {
            self.canonical
                .as_ref()
                .and_then(|canonical| path.strip_prefix(canonical).ok())
        })
    }

    fn depth(&self) -> usize {
        self.given.components().count()
    }
}

/// Opens the image a job asks for, once, beneath one of `allowed_dirs` (the
/// operator's `image_paths`), the alloc dir or the task dir.
///
/// - The path is first normalised lexically (`.` and `..`) and matched to
///   the directory that contains it (the deepest one; a tie goes to the
///   alloc or task dir). That is exact because the open then refuses any
///   symlink component ([`crate::fsopen`]).
/// - A relative path is tried against each allowed dir, then the alloc dir,
///   then the task dir (the Go driver's order). The first that has the file
///   decides; a symlink, special file or hard-linked job file there is an
///   error, not a reason to look further.
/// - Files in the alloc or task dir must have a single link; files under
///   `image_paths` may have several.
///
/// Errors name only what the job wrote, never the directories tried or
/// where a symlink points. Errors do not name the job field; the caller
/// adds it with [`StorageError::in_field`].
pub fn open_image(
    requested: &str,
    allowed_dirs: &[PathBuf],
    alloc_dir: &Path,
    task_dir: &Path,
) -> Result<ImageFile, StorageError> {
    let not_found = || StorageError::ImageNotFound {
        requested: requested.to_string(),
    };
    if requested.is_empty() {
        return Err(not_found());
    }
    let links = allowed_dirs
        .iter()
        .map(|dir| (dir.as_path(), Links::Any))
        .chain([(alloc_dir, Links::Single), (task_dir, Links::Single)]);
    // Directories that cannot be opened (missing) allow nothing.
    let bases: Vec<Base> = links
        .filter_map(|(dir, links)| {
            let root = Root::open(dir, links).ok()?;
            Some(Base {
                given: normalize(dir),
                canonical: std::fs::canonicalize(dir).ok(),
                root,
            })
        })
        .collect();
    let requested_path = Path::new(requested);
    let candidates: Vec<PathBuf> = if requested_path.is_absolute() {
        vec![normalize(requested_path)]
    } else {
        bases
            .iter()
            .map(|base| normalize(&base.given.join(requested_path)))
            .collect()
    };
    let mut inside_any = false;
    for candidate in candidates {
        // The deepest base holding the candidate; on a tie the job's dirs
        // (later in the list) win, so their one-link rule applies.
        let Some((base, rest)) = bases
            .iter()
            .filter_map(|base| base.below(&candidate).map(|rest| (base, rest)))
            .max_by_key(|(base, _)| base.depth())
        else {
            continue;
        };
        inside_any = true;
        let opened = if rest.as_os_str().is_empty() {
            Err(OpenError::NotRegular("directory"))
        } else {
            open_beneath(&base.root, rest)
        };
        match opened {
            Ok(file) => return Ok(ImageFile::from_file(file, requested)),
            Err(OpenError::NotFound) => {}
            Err(reason) => {
                return Err(StorageError::ImageOpen {
                    requested: requested.to_string(),
                    reason,
                })
            }
        }
    }
    if inside_any {
        Err(not_found())
    } else {
        Err(StorageError::ImageNotAllowed {
            requested: requested.to_string(),
        })
    }
}

/// Reads up to `buf.len()` bytes from the start of the image; returns how many.
fn read_header(image: &ImageFile, buf: &mut [u8]) -> Result<usize, StorageError> {
    let mut reader = image.reader();
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(image.io("read the header of image", error)),
        }
    }
    Ok(filled)
}

/// qcow2 when the file starts with the qcow2 magic, else raw. (Other
/// formats are not supported, and treating them as raw is safe: a raw disk
/// is never interpreted by QEMU.)
pub fn detect_format(image: &ImageFile) -> Result<ImageFormat, StorageError> {
    let mut magic = [0u8; 4];
    let read = read_header(image, &mut magic)?;
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
pub fn qcow2_virtual_size(image: &ImageFile) -> Result<Option<u64>, StorageError> {
    let mut header = [0u8; QCOW2_HEADER_READ];
    let read = read_header(image, &mut header)?;
    if read < 4 || header[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    match parse_qcow2_header(&header[..read]) {
        Some(parsed) => Ok(Some(parsed.virtual_size)),
        None => Err(truncated(&image.shown_path())),
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
pub fn image_virtual_size(image: &ImageFile, format: ImageFormat) -> Result<u64, StorageError> {
    match format {
        ImageFormat::Qcow2 => qcow2_virtual_size(image)?.ok_or_else(|| StorageError::UnsafeImage {
            path: image.shown_path(),
            reason: "it is declared qcow2 but has no qcow2 header; set source.format = \"raw\" or \
                     leave the format unset"
                .into(),
        }),
        ImageFormat::Raw => image.len(),
    }
}

/// Refuses qcow2 images that would make QEMU or qemu-img open other host
/// files: a backing file (e.g. `/etc/shadow` or `/dev/sda` planted in an
/// image a job downloaded) or an external data file. Raw images are always
/// safe because nothing in them is interpreted.
pub fn check_image_safe(image: &ImageFile, format: ImageFormat) -> Result<(), StorageError> {
    if format == ImageFormat::Raw {
        return Ok(());
    }
    let mut header = [0u8; QCOW2_HEADER_READ];
    let read = read_header(image, &mut header)?;
    let path = image.shown_path();
    let parsed = parse_qcow2_header(&header[..read]).ok_or_else(|| truncated(&path))?;
    check_qcow2_header(&path, &parsed)
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
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    struct Dirs {
        _root: tempfile::TempDir,
        base: PathBuf,
        images: PathBuf,
        alloc: PathBuf,
        task: PathBuf,
        outside: PathBuf,
    }

    const SECRET: &[u8] = b"host secret: must never reach a guest";

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().expect("tempdir");
        let base = std::fs::canonicalize(root.path()).expect("canonicalize tempdir");
        let images = base.join("images");
        // Nomad's layout: <alloc>/alloc is shared, <alloc>/<task> is the task's.
        let alloc = base.join("a1/alloc");
        let task = base.join("a1/web");
        let outside = base.join("outside");
        for dir in [&images, &alloc, &task, &outside] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        std::fs::write(outside.join("secret"), SECRET).expect("write secret");
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

    fn resolve(d: &Dirs, requested: &str) -> Result<ImageFile, StorageError> {
        open_image(
            requested,
            std::slice::from_ref(&d.images),
            &d.alloc,
            &d.task,
        )
    }

    fn content(image: &ImageFile) -> Vec<u8> {
        let mut bytes = Vec::new();
        image.reader().read_to_end(&mut bytes).expect("read image");
        bytes
    }

    /// The error, checked to name no host path outside what was asked.
    fn refused(d: &Dirs, requested: &str) -> StorageError {
        let Err(err) = resolve(d, requested) else {
            panic!("{requested}: opened")
        };
        let message = format!("disk[0].source.image: {err}");
        for host in [&d.outside, &d.images] {
            let host = host.display().to_string();
            if !requested.contains(&host) {
                assert!(!message.contains(&host), "{requested}: {message}");
            }
        }
        err
    }

    fn path_str(path: &Path) -> String {
        path.display().to_string()
    }

    #[test]
    fn absolute_path_inside_allowed_dirs() {
        let d = dirs();
        write(&d.images.join("a.img"), b"a");
        write(&d.task.join("t.img"), b"t");
        let found = resolve(&d, &path_str(&d.images.join("a.img"))).unwrap();
        assert_eq!(content(&found), b"a");
        assert_eq!(found.shown(), path_str(&d.images.join("a.img")));
        let found = resolve(&d, &path_str(&d.task.join("t.img"))).unwrap();
        assert_eq!(content(&found), b"t");
    }

    #[test]
    fn absolute_path_outside_is_refused() {
        let d = dirs();
        let err = refused(&d, &path_str(&d.outside.join("secret")));
        assert!(matches!(err, StorageError::ImageNotAllowed { .. }), "{err}");
        assert!(err.to_string().contains("image_paths"), "{err}");
        let err = refused(&d, "/etc/passwd");
        assert!(matches!(err, StorageError::ImageNotAllowed { .. }), "{err}");
    }

    #[test]
    fn dotdot_cannot_escape() {
        let d = dirs();
        for requested in [
            "../outside/secret".to_string(),
            "../../outside/secret".to_string(),
            format!("{}/../outside/secret", d.images.display()),
            format!("{}/../../outside/secret", d.task.display()),
        ] {
            let err = refused(&d, &requested);
            assert!(
                matches!(err, StorageError::ImageNotAllowed { .. }),
                "{requested}: {err}"
            );
        }
        // `..` that stays inside is fine: task dir → alloc dir.
        write(&d.alloc.join("shared.img"), b"shared");
        let found = resolve(&d, "../alloc/shared.img").unwrap();
        assert_eq!(content(&found), b"shared");
        let found = resolve(&d, "../a1/web/../alloc/shared.img").unwrap();
        assert_eq!(content(&found), b"shared");
    }

    #[test]
    fn symlinks_are_refused_and_not_revealed() {
        let d = dirs();
        symlink(d.outside.join("secret"), d.images.join("link.img")).unwrap();
        symlink(&d.outside, d.task.join("dirlink")).unwrap();
        // Even one from an allowed place to another: no symlinks at all.
        write(&d.images.join("real.img"), b"x");
        symlink(d.images.join("real.img"), d.task.join("alias.img")).unwrap();
        for requested in [
            "link.img".to_string(),
            path_str(&d.images.join("link.img")),
            "dirlink/secret".to_string(),
            path_str(&d.task.join("dirlink/secret")),
            "alias.img".to_string(),
        ] {
            let err = refused(&d, &requested);
            assert!(
                matches!(
                    &err,
                    StorageError::ImageOpen {
                        reason: OpenError::Symlink,
                        ..
                    }
                ),
                "{requested}: {err}"
            );
            assert!(err.to_string().contains("symbolic link"), "{err}");
            assert!(!err.is_recoverable());
        }
    }

    #[test]
    fn hard_links_refused_in_job_dirs_only() {
        let d = dirs();
        std::fs::hard_link(d.outside.join("secret"), d.task.join("hard.img")).unwrap();
        std::fs::hard_link(d.outside.join("secret"), d.alloc.join("hard2.img")).unwrap();
        for requested in ["hard.img", "hard2.img"] {
            let err = refused(&d, requested);
            assert!(
                matches!(
                    &err,
                    StorageError::ImageOpen {
                        reason: OpenError::HardLinked(_),
                        ..
                    }
                ),
                "{requested}: {err}"
            );
        }
        // The operator's directories may hold hard links.
        std::fs::hard_link(d.outside.join("secret"), d.images.join("op.img")).unwrap();
        assert_eq!(content(&resolve(&d, "op.img").unwrap()), SECRET);
    }

    #[test]
    fn fifos_and_directories_are_refused() {
        let d = dirs();
        let fifo = d.task.join("fifo.img");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(status.success());
        std::fs::create_dir(d.images.join("dir.img")).unwrap();
        for (requested, kind) in [
            ("fifo.img".to_string(), "FIFO"),
            ("dir.img".to_string(), "directory"),
            (path_str(&d.images), "directory"),
            (".".to_string(), "directory"),
        ] {
            let err = refused(&d, &requested);
            assert!(
                matches!(
                    &err,
                    StorageError::ImageOpen { reason: OpenError::NotRegular(k), .. } if *k == kind
                ),
                "{requested}: {err}"
            );
        }
    }

    #[test]
    fn allowed_dir_given_through_a_symlink() {
        let d = dirs();
        symlink(&d.images, d.base.join("images-link")).unwrap();
        write(&d.images.join("a.img"), b"a");
        let allowed = [d.base.join("images-link")];
        for requested in [
            "a.img".to_string(),
            path_str(&d.base.join("images-link/a.img")),
            // The real location of the configured directory works too.
            path_str(&d.images.join("a.img")),
        ] {
            let found = open_image(&requested, &allowed, &d.alloc, &d.task).unwrap();
            assert_eq!(content(&found), b"a", "{requested}");
        }
    }

    #[test]
    fn prefix_trick_is_not_containment() {
        let d = dirs();
        // `<base>/imagesX` shares a string prefix with `<base>/images`.
        let sibling = d.base.join("imagesX");
        std::fs::create_dir(&sibling).unwrap();
        write(&sibling.join("a.img"), b"x");
        let err = refused(&d, &path_str(&sibling.join("a.img")));
        assert!(matches!(err, StorageError::ImageNotAllowed { .. }), "{err}");
        let err = refused(&d, "../imagesX/a.img");
        assert!(matches!(err, StorageError::ImageNotAllowed { .. }), "{err}");
    }

    #[test]
    fn relative_resolution_order() {
        let d = dirs();
        let second = d.base.join("images2");
        std::fs::create_dir(&second).unwrap();
        let allowed = [d.images.clone(), second.clone()];
        let r = |name: &str| content(&open_image(name, &allowed, &d.alloc, &d.task).unwrap());
        write(&d.task.join("a.img"), b"task");
        assert_eq!(r("a.img"), b"task");
        write(&d.alloc.join("a.img"), b"alloc");
        assert_eq!(r("a.img"), b"alloc");
        write(&second.join("a.img"), b"second");
        assert_eq!(r("a.img"), b"second");
        write(&d.images.join("a.img"), b"first");
        assert_eq!(r("a.img"), b"first");
        std::fs::create_dir(d.task.join("local")).unwrap();
        write(&d.task.join("local/b.img"), b"b");
        assert_eq!(r("local/b.img"), b"b");
        // A symlink where the file is first found stops the search.
        symlink(d.outside.join("secret"), d.images.join("c.img")).unwrap();
        write(&d.task.join("c.img"), b"c");
        let err = open_image("c.img", &allowed, &d.alloc, &d.task).unwrap_err();
        assert!(matches!(err, StorageError::ImageOpen { .. }), "{err}");
    }

    #[test]
    fn missing_file_names_no_host_directory() {
        let d = dirs();
        let missing_allowed = d.base.join("does-not-exist");
        let allowed = [d.images.clone(), missing_allowed];
        let err = open_image("nope.img", &allowed, &d.alloc, &d.task).unwrap_err();
        assert!(matches!(err, StorageError::ImageNotFound { .. }), "{err}");
        let message = err.in_field("disk[1].source.image").to_string();
        assert!(
            message.starts_with("disk[1].source.image: image \"nope.img\" was not found"),
            "{message}"
        );
        assert!(!message.contains(&path_str(&d.base)), "{message}");
        // A path through a regular file is "missing", not an I/O error.
        write(&d.images.join("file"), b"x");
        let err = refused(&d, "file/x.img");
        assert!(matches!(err, StorageError::ImageNotFound { .. }), "{err}");
        let err = refused(&d, "");
        assert!(matches!(err, StorageError::ImageNotFound { .. }), "{err}");
        let err = refused(&d, "/definitely/not/here.img");
        assert!(matches!(err, StorageError::ImageNotAllowed { .. }), "{err}");
    }

    /// A sibling task swaps the path between a good file, a symlink to a
    /// host secret and a hard link to it, as fast as it can, while the
    /// driver opens and reads the image many times: the secret is never
    /// read, and no error names it.
    #[test]
    fn swapping_the_path_never_reads_the_secret() {
        let d = dirs();
        const GOOD: &[u8] = b"good image bytes";
        let target = d.task.join("disk.img");
        write(&target, GOOD);
        let stop = AtomicBool::new(false);
        // Swap cycles done; each open waits for a new one, so on a loaded
        // machine the swapper cannot be starved into one state.
        let swaps = AtomicU64::new(0);
        let secret = d.outside.join("secret");
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // Each state is held for a few microseconds (busy, no
                // sleep), so each is seen whatever the scheduler does.
                let hold = || {
                    swaps.fetch_add(1, Ordering::Relaxed);
                    let start = std::time::Instant::now();
                    while start.elapsed() < std::time::Duration::from_micros(30) {
                        std::hint::spin_loop();
                    }
                };
                let good_staged = d.task.join("staged-good");
                let bad_staged = d.task.join("staged-bad");
                let _ = std::fs::write(&good_staged, GOOD);
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::rename(&good_staged, &target);
                    hold();
                    let _ = std::fs::write(&good_staged, GOOD);
                    let _ = std::fs::remove_file(&bad_staged);
                    let _ = symlink(&secret, &bad_staged);
                    let _ = std::fs::rename(&bad_staged, &target);
                    hold();
                    let _ = std::fs::remove_file(&bad_staged);
                    let _ = std::fs::hard_link(&secret, &bad_staged);
                    let _ = std::fs::rename(&bad_staged, &target);
                    hold();
                }
            });
            let (mut opened, mut refused_count) = (0, 0);
            let mut last_swap = 0;
            // Stops the swapper even when an assertion below panics, so
            // the scope can join it and the test fails instead of hanging.
            let _stop = StopOnDrop(&stop);
            for _ in 0..600 {
                wait_for_swap(&swaps, &mut last_swap);
                match resolve(&d, "disk.img") {
                    Ok(image) => {
                        opened += 1;
                        let format = detect_format(&image).expect("format");
                        assert_eq!(format, ImageFormat::Raw);
                        let bytes = content(&image);
                        assert_eq!(bytes, GOOD, "read something other than the good file");
                        assert_eq!(image_virtual_size(&image, format).unwrap(), 16);
                    }
                    Err(err) => {
                        refused_count += 1;
                        let message = err.to_string();
                        assert!(!message.contains("outside"), "{message}");
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(
                opened > 0 && refused_count > 0,
                "{opened} opened, {refused_count} refused"
            );
        });
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
        let open = |path: &Path| ImageFile::from_file(File::open(path).unwrap(), "hand.qcow2");
        write(&path, &qcow2_header_bytes(3, 0, 5 << 30, 0));
        assert_eq!(detect_format(&open(&path)).unwrap(), ImageFormat::Qcow2);
        assert_eq!(qcow2_virtual_size(&open(&path)).unwrap(), Some(5 << 30));
        assert_eq!(
            image_virtual_size(&open(&path), ImageFormat::Qcow2).unwrap(),
            5 << 30
        );
        check_image_safe(&open(&path), ImageFormat::Qcow2).unwrap();

        write(&path, &qcow2_header_bytes(3, 0x200, 1 << 20, 0));
        let err = check_image_safe(&open(&path), ImageFormat::Qcow2).unwrap_err();
        assert!(err.to_string().contains("backing file"), "{err}");
        write(
            &path,
            &qcow2_header_bytes(3, 0, 1 << 20, QCOW2_INCOMPAT_DATA_FILE),
        );
        let err = check_image_safe(&open(&path), ImageFormat::Qcow2).unwrap_err();
        assert!(err.to_string().contains("external data file"), "{err}");
        // Version 2 has no feature fields; the bytes there are ignored.
        write(
            &path,
            &qcow2_header_bytes(2, 0, 1 << 20, QCOW2_INCOMPAT_DATA_FILE),
        );
        check_image_safe(&open(&path), ImageFormat::Qcow2).unwrap();
        write(&path, &qcow2_header_bytes(4, 0, 1 << 20, 0));
        assert!(check_image_safe(&open(&path), ImageFormat::Qcow2).is_err());

        // Magic but cut short.
        write(&path, &QCOW2_MAGIC);
        assert_eq!(detect_format(&open(&path)).unwrap(), ImageFormat::Qcow2);
        assert!(qcow2_virtual_size(&open(&path)).is_err());
        assert!(check_image_safe(&open(&path), ImageFormat::Qcow2).is_err());
    }

    #[test]
    fn raw_detection_and_sizes() {
        let d = dirs();
        let path = d.images.join("disk.img");
        let open = |path: &Path| ImageFile::from_file(File::open(path).unwrap(), "disk.img");
        write(&path, &[0u8; 3000]);
        assert_eq!(detect_format(&open(&path)).unwrap(), ImageFormat::Raw);
        assert_eq!(qcow2_virtual_size(&open(&path)).unwrap(), None);
        assert_eq!(
            image_virtual_size(&open(&path), ImageFormat::Raw).unwrap(),
            3000
        );
        check_image_safe(&open(&path), ImageFormat::Raw).unwrap();
        let err = image_virtual_size(&open(&path), ImageFormat::Qcow2).unwrap_err();
        assert!(matches!(err, StorageError::UnsafeImage { .. }), "{err}");
        let empty = d.images.join("empty.img");
        write(&empty, b"");
        assert_eq!(detect_format(&open(&empty)).unwrap(), ImageFormat::Raw);
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

    /// Waits (bounded) until the swapper has swapped since `last`.
    fn wait_for_swap(swaps: &AtomicU64, last: &mut u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while swaps.load(Ordering::Relaxed) == *last && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        *last = swaps.load(Ordering::Relaxed);
    }

    /// Sets the flag when dropped (also while unwinding).
    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}
