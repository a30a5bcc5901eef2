//! Unpacking artifact archives (tar, tar.gz, zip, single-file gzip) into a
//! task directory, and the path checks shared with templates: nothing is
//! written outside the destination, nothing is written through a link, a
//! link may only point inside the destination, and the number of entries and
//! the bytes written are bounded (Nomad's client defaults:
//! `decompression_file_count_limit` 4096, `decompression_size_limit` 100GB).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Most entries one archive may hold.
pub const MAX_ENTRIES: u64 = 4096;
/// Most bytes one archive may unpack to.
pub const MAX_UNPACKED_BYTES: u64 = 100_000_000_000;

/// The archive formats the local runner unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Tar,
    TarGz,
    Zip,
    /// A single gzip-compressed file: unpacked to the name without `.gz`.
    Gz,
}

impl ArchiveKind {
    /// go-getter's `archive` option values and file suffixes we unpack.
    pub fn from_name(name: &str) -> Option<ArchiveKind> {
        match name {
            "tar" => Some(ArchiveKind::Tar),
            "tar.gz" | "tgz" => Some(ArchiveKind::TarGz),
            "zip" => Some(ArchiveKind::Zip),
            "gz" => Some(ArchiveKind::Gz),
            _ => None,
        }
    }

    /// The archive kind a file name's suffix announces (longest first, as
    /// go-getter matches), or the unsupported suffix it has.
    pub fn detect(file_name: &str) -> Result<Option<ArchiveKind>, &'static str> {
        const UNSUPPORTED: [&str; 9] = [
            "tar.bz2", "tbz2", "tar.xz", "txz", "tar.zst", "tzst", "bz2", "xz", "zst",
        ];
        let lower = file_name.to_ascii_lowercase();
        for suffix in ["tar.gz", "tgz", "tar", "zip", "gz"] {
            if lower.ends_with(&format!(".{suffix}")) {
                return Ok(ArchiveKind::from_name(suffix));
            }
        }
        match UNSUPPORTED
            .iter()
            .find(|suffix| lower.ends_with(&format!(".{suffix}")))
        {
            Some(suffix) => Err(suffix),
            None => Ok(None),
        }
    }
}

/// Why an archive (or a file destination) was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {entry:?} would be written outside the destination")]
    Escapes { entry: String },
    #[error("entry {entry:?} passes through a link ({link}); links are not followed")]
    ThroughLink { entry: String, link: PathBuf },
    #[error("entry {entry:?} is a link to {target:?}, which points outside the destination")]
    LinkEscapes { entry: String, target: String },
    #[error("entry {entry:?} is a {kind}, which is not unpacked")]
    Unsupported { entry: String, kind: &'static str },
    #[error("holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("unpacks to more than {MAX_UNPACKED_BYTES} bytes")]
    TooLarge,
    #[error("cannot read the archive")]
    Read {
        #[source]
        source: io::Error,
    },
    #[error("cannot read the zip archive")]
    Zip {
        #[source]
        source: zip::result::ZipError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A relative path with only normal components (no root, `..` or `.`), or
/// None if it has anything else.
pub fn clean_relative(path: &Path) -> Option<PathBuf> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// Creates `root/relative`'s parent directories, refusing to pass through
/// (or end on) a symbolic link; returns the full path.
pub fn prepare(root: &Path, relative: &Path, entry: &str) -> Result<PathBuf, UnpackError> {
    let mut current = root.to_path_buf();
    let parts: Vec<_> = relative.components().collect();
    for (index, part) in parts.iter().enumerate() {
        current.push(part);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnpackError::ThroughLink {
                    entry: entry.to_string(),
                    link: current,
                })
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                if index + 1 < parts.len() {
                    fs::create_dir(&current).map_err(|source| UnpackError::Write {
                        path: current.clone(),
                        source,
                    })?;
                }
            }
            Err(source) => {
                return Err(UnpackError::Write {
                    path: current,
                    source,
                })
            }
        }
    }
    Ok(current)
}

/// Whether a link at `link` (relative to the root) to `target` stays inside
/// the root: the target is relative, its `..` parts all come first and do
/// not climb above the root, and no `..` follows a name (which could climb
/// out of a directory reached through another link).
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    let depth = link.components().count().saturating_sub(1);
    let mut ups = 0;
    let mut named = false;
    for component in target.components() {
        match component {
            Component::ParentDir if !named => ups += 1,
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
            Component::CurDir => {}
            Component::Normal(_) => named = true,
        }
    }
    ups <= depth
}

/// Counts entries and bytes against the limits.
struct Budget {
    entries: u64,
    bytes: u64,
}

impl Budget {
    fn entry(&mut self) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(UnpackError::TooManyEntries);
        }
        Ok(())
    }

    /// Copies at most the remaining byte budget; fails if there was more.
    fn copy(&mut self, reader: &mut dyn Read, path: &Path, mode: u32) -> Result<(), UnpackError> {
        let write_error = |source| UnpackError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(path)
            .map_err(write_error)?;
        let remaining = MAX_UNPACKED_BYTES - self.bytes;
        let mut limited = reader.take(remaining + 1);
        let copied =
            io::copy(&mut limited, &mut file).map_err(|source| UnpackError::Read { source })?;
        if copied > remaining {
            return Err(UnpackError::TooLarge);
        }
        self.bytes += copied;
        file.flush().map_err(write_error)?;
        // The umask may have narrowed the mode; set it as the archive says.
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(write_error)
    }
}

/// Unpacks `archive` into the directory `destination` (created if needed).
pub fn unpack(
    kind: ArchiveKind,
    archive: &Path,
    destination: &Path,
    name: &str,
) -> Result<(), UnpackError> {
    fs::create_dir_all(destination).map_err(|source| UnpackError::Write {
        path: destination.to_path_buf(),
        source,
    })?;
    let file = File::open(archive).map_err(|source| UnpackError::Read { source })?;
    let mut budget = Budget {
        entries: 0,
        bytes: 0,
    };
    match kind {
        ArchiveKind::Tar => unpack_tar(file, destination, &mut budget),
        ArchiveKind::TarGz => {
            unpack_tar(flate2::read::GzDecoder::new(file), destination, &mut budget)
        }
        ArchiveKind::Zip => unpack_zip(file, destination, &mut budget),
        ArchiveKind::Gz => {
            let stem = name
                .strip_suffix(".gz")
                .or_else(|| name.strip_suffix(".GZ"))
                .unwrap_or(name);
            let relative = clean_relative(Path::new(stem)).ok_or_else(|| UnpackError::Escapes {
                entry: stem.to_string(),
            })?;
            let target = prepare(destination, &relative, stem)?;
            budget.entry()?;
            budget.copy(&mut flate2::read::GzDecoder::new(file), &target, 0o644)
        }
    }
}

fn unpack_tar(
    reader: impl Read,
    destination: &Path,
    budget: &mut Budget,
) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let read_error = |source| UnpackError::Read { source };
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        budget.entry()?;
        let raw = entry.path().map_err(read_error)?.into_owned();
        let shown = raw.display().to_string();
        let Some(relative) = clean_relative(&raw) else {
            if raw.components().all(|c| matches!(c, Component::CurDir)) {
                continue; // "./" itself
            }
            return Err(UnpackError::Escapes { entry: shown });
        };
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().map_err(read_error)? & 0o777;
        let target = prepare(destination, &relative, &shown)?;
        let write_error = |source| UnpackError::Write {
            path: target.clone(),
            source,
        };
        match kind {
            tar::EntryType::Directory => {
                if fs::symlink_metadata(&target).is_err() {
                    fs::create_dir(&target).map_err(write_error)?;
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(write_error)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                budget.copy(&mut entry, &target, mode)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(read_error)?
                    .unwrap_or_default()
                    .into_owned();
                if !link_stays_inside(&relative, &link) {
                    return Err(UnpackError::LinkEscapes {
                        entry: shown,
                        target: link.display().to_string(),
                    });
                }
                std::os::unix::fs::symlink(&link, &target).map_err(write_error)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(read_error)?
                    .unwrap_or_default()
                    .into_owned();
                let inside = clean_relative(&link).ok_or_else(|| UnpackError::LinkEscapes {
                    entry: shown.clone(),
                    target: link.display().to_string(),
                })?;
                let source = prepare(destination, &inside, &shown)?;
                fs::hard_link(&source, &target).map_err(write_error)?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(UnpackError::Unsupported {
                    entry: shown,
                    kind: match other {
                        tar::EntryType::Char => "character device",
                        tar::EntryType::Block => "block device",
                        tar::EntryType::Fifo => "FIFO",
                        _ => "special entry",
                    },
                })
            }
        }
    }
    Ok(())
}

fn unpack_zip(file: File, destination: &Path, budget: &mut Budget) -> Result<(), UnpackError> {
    let zip_error = |source| UnpackError::Zip { source };
    let mut archive = zip::ZipArchive::new(file).map_err(zip_error)?;
    for index in 0..archive.len() {
        budget.entry()?;
        let mut entry = archive.by_index(index).map_err(zip_error)?;
        let shown = entry
            .name()
            .map(|name| name.into_owned())
            .unwrap_or_else(|_| format!("entry {index}"));
        let relative = entry
            .enclosed_name()
            .and_then(|name| clean_relative(&name))
            .ok_or_else(|| UnpackError::Escapes {
                entry: shown.clone(),
            })?;
        if entry.is_symlink() {
            return Err(UnpackError::Unsupported {
                entry: shown,
                kind: "link in a zip archive",
            });
        }
        let target = prepare(destination, &relative, &shown)?;
        let mode = entry.unix_mode().map_or(0o644, |mode| mode & 0o777);
        if entry.is_dir() {
            if fs::symlink_metadata(&target).is_err() {
                fs::create_dir(&target).map_err(|source| UnpackError::Write {
                    path: target.clone(),
                    source,
                })?;
            }
        } else {
            budget.copy(&mut entry, &target, mode)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(
            ArchiveKind::detect("a.tar.gz"),
            Ok(Some(ArchiveKind::TarGz))
        );
        assert_eq!(ArchiveKind::detect("a.TGZ"), Ok(Some(ArchiveKind::TarGz)));
        assert_eq!(ArchiveKind::detect("a.zip"), Ok(Some(ArchiveKind::Zip)));
        assert_eq!(ArchiveKind::detect("a.img.gz"), Ok(Some(ArchiveKind::Gz)));
        assert_eq!(ArchiveKind::detect("a.img"), Ok(None));
        assert_eq!(ArchiveKind::detect("a.tar.xz"), Err("tar.xz"));
    }

    #[test]
    fn links_must_stay_inside() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(link_stays_inside(Path::new("l"), Path::new("b/c")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("../b")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("/etc")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("s/../..")));
        assert!(!link_stays_inside(Path::new("a/b/l"), Path::new("s/../x")));
    }

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().expect("tar")
    }

    fn file_header(size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o640);
        header.set_entry_type(tar::EntryType::Regular);
        header
    }

    fn raw_name(header: &mut tar::Header, name: &str) {
        // Bypasses the builder's own path checks, as a hostile archive would.
        let bytes = &mut header.as_old_mut().name;
        bytes.fill(0);
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
    }

    #[test]
    fn tar_entries_cannot_escape() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, link) in [
            ("../evil", None),
            ("/abs", None),
            ("l", Some((tar::EntryType::Symlink, "/etc"))),
            ("l", Some((tar::EntryType::Symlink, "../.."))),
            ("h", Some((tar::EntryType::Link, "../outside"))),
        ] {
            let bytes = tar_with(|b| {
                let mut header = file_header(0);
                if let Some((kind, target)) = link {
                    header.set_entry_type(kind);
                    header.set_link_name(target).expect("link name");
                }
                raw_name(&mut header, name);
                b.append(&header, io::empty()).expect("append");
            });
            let archive = dir.path().join("a.tar");
            fs::write(&archive, bytes).expect("write");
            let out = dir.path().join("out");
            let error = unpack(ArchiveKind::Tar, &archive, &out, "a.tar").expect_err(name);
            assert!(
                matches!(
                    error,
                    UnpackError::Escapes { .. } | UnpackError::LinkEscapes { .. }
                ),
                "{name}: {error}"
            );
        }
        assert!(!dir.path().join("evil").exists());
    }

    #[test]
    fn tar_cannot_write_through_its_own_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = tar_with(|b| {
            let mut link = file_header(0);
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_link_name("sub").expect("link");
            raw_name(&mut link, "l");
            b.append(&link, io::empty()).expect("append");
            let mut file = file_header(2);
            raw_name(&mut file, "l/x");
            b.append(&file, &b"hi"[..]).expect("append");
        });
        let archive = dir.path().join("a.tar");
        fs::write(&archive, bytes).expect("write");
        let error = unpack(ArchiveKind::Tar, &archive, &dir.path().join("out"), "a.tar")
            .expect_err("through link");
        assert!(matches!(error, UnpackError::ThroughLink { .. }), "{error}");
    }

    #[test]
    fn tar_gz_and_zip_unpack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = tar_with(|b| {
            let mut header = file_header(5);
            raw_name(&mut header, "sub/hello.txt");
            b.append(&header, &b"hello"[..]).expect("append");
            let mut link = file_header(0);
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_link_name("../sub/hello.txt").expect("link");
            raw_name(&mut link, "sub/again");
            b.append(&link, io::empty()).expect("append");
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).expect("gzip");
        let archive = dir.path().join("a.tgz");
        fs::write(&archive, gz.finish().expect("gzip")).expect("write");
        let out = dir.path().join("out");
        unpack(ArchiveKind::TarGz, &archive, &out, "a.tgz").expect("unpack");
        assert_eq!(
            fs::read_to_string(out.join("sub/hello.txt")).expect("read"),
            "hello"
        );
        assert_eq!(
            fs::read_to_string(out.join("sub/again")).expect("read"),
            "hello"
        );
        let mode = fs::metadata(out.join("sub/hello.txt"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);

        let mut zipped = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        zipped
            .start_file("dir/z.txt", zip::write::SimpleFileOptions::default())
            .expect("zip");
        zipped.write_all(b"zipped").expect("zip");
        let archive = dir.path().join("a.zip");
        fs::write(&archive, zipped.finish().expect("zip").into_inner()).expect("write");
        unpack(ArchiveKind::Zip, &archive, &out, "a.zip").expect("unpack zip");
        assert_eq!(
            fs::read_to_string(out.join("dir/z.txt")).expect("read"),
            "zipped"
        );
    }
}
