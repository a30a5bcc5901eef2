//! Opening a file a job names, once, beneath the directory it must be in.
//!
//! A job (or a sibling task sharing its alloc dir) controls the paths it
//! names and can swap any component for a symlink or a hard link between
//! two steps. So each such file is opened exactly once: with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! from a descriptor of its root directory (or, on kernels without openat2,
//! an `O_NOFOLLOW` walk one component at a time), then checked with `fstat`
//! on the descriptor. Every later step uses the returned [`File`], never
//! the path again.
//!
//! Errors carry no paths: the caller names what the job wrote, so nothing
//! about the host (a symlink's target, the operator's directories) leaks.
//! This module depends on nothing else in the crate.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Whether a file reached through a root may have more than one hard link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Only one (the alloc and task dirs: a job could link a host file in).
    Single,
    /// Any number (the operator's own directories).
    Any,
}

/// A directory files are opened beneath, held open.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    links: Links,
}

impl Root {
    /// Opens the directory `path` (trusted: operator config or Nomad's own
    /// dirs, so symlinks in it are followed).
    pub fn open(path: &Path, links: Links) -> io::Result<Root> {
        let dir = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { dir, links })
    }

    pub fn links(&self) -> Links {
        self.links
    }
}

/// Why a file could not be opened beneath its root. No paths in here.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("it does not exist")]
    NotFound,
    #[error("it leads outside the directory it must be in (`..` or an absolute path)")]
    Escapes,
    #[error("a component of it is a symbolic link, which is not followed; name the file itself")]
    Symlink,
    #[error("it is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error(
        "it has {0} hard links; a file in the alloc or task dir must have exactly one \
         (copy it instead of linking it)"
    )]
    HardLinked(u64),
    #[error(
        "it was replaced or linked elsewhere while being opened; leave it alone while the \
         task starts, and try again"
    )]
    Changed,
    #[error("it cannot be opened: {0}")]
    Io(io::Error),
}

impl From<OpenError> for io::Error {
    fn from(error: OpenError) -> io::Error {
        match error {
            OpenError::Io(error) => error,
            OpenError::NotFound => io::Error::new(io::ErrorKind::NotFound, error),
            other => io::Error::new(io::ErrorKind::InvalidInput, other),
        }
    }
}

/// Opens a file the person running the CLI named by an absolute path: its
/// directory is theirs to choose (followed as written), but the file
/// itself is opened once, never through a symlink, and must be a regular
/// file. Hard links are allowed (these are the runner's own files).
pub fn open_local(path: &Path) -> Result<File, OpenError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(OpenError::NotRegular("directory"));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let root = Root::open(parent, Links::Any).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => OpenError::NotFound,
        _ => OpenError::Io(error),
    })?;
    open_beneath(&root, Path::new(name))
}

/// Opens `relative` beneath `root` for reading; see the module docs.
/// `relative` must be relative: an absolute path is [`OpenError::Escapes`].
pub fn open_beneath(root: &Root, relative: &Path) -> Result<File, OpenError> {
    let file = check(
        File::from(open_either(root, relative, file_flags())?),
        root.links,
    )?;
    if root.links == Links::Single {
        single_link_still(root, relative, &file, open_either)?;
    }
    Ok(file)
}

type OpenFn = fn(&Root, &Path, OFlags) -> Result<OwnedFd, OpenError>;

fn open_either(root: &Root, relative: &Path, flags: OFlags) -> Result<OwnedFd, OpenError> {
    match open_openat2(root, relative, flags) {
        Err(OpenError::Io(error)) if error.raw_os_error() == Some(libc::ENOSYS) => {
            open_walk(root, relative, flags)
        }
        other => other,
    }
}

/// The one-link rule, made race-free. `fstat`'s link count alone can be
/// fooled: a hard link to a host file is opened, then removed, and the
/// count reads 1 though the one link left is outside. So the path is
/// resolved again (beneath, no symlinks) and must still name the very
/// inode opened, with one link: with our name on it that one link is
/// ours, so the file lives nowhere else.
fn single_link_still(
    root: &Root,
    relative: &Path,
    file: &File,
    open: OpenFn,
) -> Result<(), OpenError> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let again = match open(root, relative, flags) {
        Ok(fd) => File::from(fd),
        Err(OpenError::NotFound | OpenError::Symlink) => return Err(OpenError::Changed),
        Err(other) => return Err(other),
    };
    let (opened, now) = (
        file.metadata().map_err(OpenError::Io)?,
        again.metadata().map_err(OpenError::Io)?,
    );
    if (now.dev(), now.ino()) != (opened.dev(), opened.ino()) {
        return Err(OpenError::Changed);
    }
    if now.nlink() > 1 {
        return Err(OpenError::HardLinked(now.nlink()));
    }
    Ok(())
}

/// How the final component is opened. `NONBLOCK` so a FIFO planted in
/// place of a file does not hang the open (it is refused by the fstat
/// check); `NOCTTY` so a terminal never becomes ours.
fn file_flags() -> OFlags {
    OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY
}

fn open_openat2(root: &Root, relative: &Path, flags: OFlags) -> Result<OwnedFd, OpenError> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(&root.dir, relative, flags, Mode::empty(), resolve) {
            Ok(fd) => return Ok(fd),
            // A concurrent rename made the kernel unsure the `..` walk stayed
            // beneath: it asks to retry.
            Err(rustix::io::Errno::AGAIN) if attempts < 16 => attempts += 1,
            Err(errno) => return Err(classify(errno)),
        }
    }
}

fn classify(errno: rustix::io::Errno) -> OpenError {
    use rustix::io::Errno;
    match errno {
        Errno::NOENT | Errno::NOTDIR => OpenError::NotFound,
        Errno::XDEV => OpenError::Escapes,
        Errno::LOOP => OpenError::Symlink,
        other => OpenError::Io(io::Error::from_raw_os_error(other.raw_os_error())),
    }
}

/// The fallback for kernels without openat2 (before 5.6): one `openat` per
/// component, none following symlinks, `..` only back to a directory this
/// walk opened (never above the root).
pub(crate) fn open_walk(root: &Root, relative: &Path, flags: OFlags) -> Result<OwnedFd, OpenError> {
    let mut names = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => names.push(Some(name)),
            Component::CurDir => {}
            Component::ParentDir => names.push(None),
            Component::RootDir | Component::Prefix(_) => return Err(OpenError::Escapes),
        }
    }
    let Some(last) = names.pop() else {
        // Empty or "." : the root itself, a directory.
        return Err(OpenError::NotRegular("directory"));
    };
    // Directories opened so far below the root; `..` pops back to the one
    // before, and popping past the root is an escape.
    let mut stack: Vec<OwnedFd> = Vec::new();
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for name in &names {
        let Some(name) = name else {
            if stack.pop().is_none() {
                return Err(OpenError::Escapes);
            }
            continue;
        };
        let current = stack.last().map_or(root.dir.as_fd(), AsFd::as_fd);
        match rustix::fs::openat(current, *name, dir_flags, Mode::empty()) {
            Ok(fd) => stack.push(fd),
            // O_PATH|O_NOFOLLOW opens a symlink itself, and then
            // O_DIRECTORY fails with ENOTDIR: tell the two apart.
            Err(rustix::io::Errno::NOTDIR) => {
                return Err(if is_symlink_at(current, name) {
                    OpenError::Symlink
                } else {
                    OpenError::NotFound
                })
            }
            Err(errno) => return Err(classify(errno)),
        }
    }
    let current = stack.last().map_or(root.dir.as_fd(), AsFd::as_fd);
    match last {
        None => {
            // Ends in `..`: a directory (or an escape).
            if stack.pop().is_none() {
                Err(OpenError::Escapes)
            } else {
                Err(OpenError::NotRegular("directory"))
            }
        }
        Some(name) => rustix::fs::openat(current, name, flags, Mode::empty()).map_err(classify),
    }
}

fn is_symlink_at(dir: std::os::fd::BorrowedFd<'_>, name: &std::ffi::OsStr) -> bool {
    rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_symlink())
}

/// The fstat checks on what was opened: a regular file, and a single link
/// where the root asks for it.
fn check(file: File, links: Links) -> Result<File, OpenError> {
    let meta = file.metadata().map_err(OpenError::Io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let name = if kind.is_dir() {
            "directory"
        } else if kind.is_fifo() {
            "FIFO"
        } else if kind.is_socket() {
            "socket"
        } else if kind.is_block_device() {
            "block device"
        } else if kind.is_char_device() {
            "character device"
        } else {
            "special file"
        };
        return Err(OpenError::NotRegular(name));
    }
    if links == Links::Single && meta.nlink() > 1 {
        return Err(OpenError::HardLinked(meta.nlink()));
    }
    Ok(file)
}

/// `path` with `.` dropped and `..` applied to the components before it
/// (never above `/`), without touching the file system. Safe for matching
/// a path to a root only because the open that follows refuses symlinks,
/// so the lexical and the real walk agree.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                if !out.pop() && !path.is_absolute() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    struct Setup {
        _dir: tempfile::TempDir,
        root_path: PathBuf,
        outside: PathBuf,
    }

    const SECRET: &[u8] = b"host secret, never to be read";

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let root_path = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root_path.join("sub")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), SECRET).expect("write");
        std::fs::write(root_path.join("sub/good.img"), b"good").expect("write");
        Setup {
            _dir: dir,
            root_path,
            outside,
        }
    }

    type Opener = fn(&Root, &Path) -> Result<File, OpenError>;

    fn walk(root: &Root, relative: &Path) -> Result<File, OpenError> {
        let file = check(
            File::from(open_walk(root, relative, file_flags())?),
            root.links,
        )?;
        if root.links == Links::Single {
            single_link_still(root, relative, &file, open_walk)?;
        }
        Ok(file)
    }

    /// Both ways of opening: openat2, and the walk used without it.
    const OPENERS: [(&str, Opener); 2] = [("openat2", open_beneath), ("walk", walk)];

    fn read(mut file: File) -> Vec<u8> {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).expect("read");
        bytes
    }

    #[test]
    fn opens_a_regular_file() {
        let s = setup();
        let root = Root::open(&s.root_path, Links::Single).unwrap();
        for (how, open) in OPENERS {
            for path in ["sub/good.img", "./sub/./good.img", "sub/../sub/good.img"] {
                let file =
                    open(&root, Path::new(path)).unwrap_or_else(|e| panic!("{how} {path}: {e}"));
                assert_eq!(read(file), b"good", "{how} {path}");
            }
        }
    }

    #[test]
    fn escapes_symlinks_and_specials_are_refused() {
        let s = setup();
        let root = Root::open(&s.root_path, Links::Single).unwrap();
        symlink(s.outside.join("secret"), s.root_path.join("link.img")).unwrap();
        symlink(&s.outside, s.root_path.join("dirlink")).unwrap();
        symlink("sub/good.img", s.root_path.join("inner-link.img")).unwrap();
        std::fs::create_dir(s.root_path.join("dir.img")).unwrap();
        let fifo = s.root_path.join("fifo.img");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let outside_abs = s.outside.join("secret");
        type Expect = fn(&OpenError) -> bool;
        let cases: Vec<(String, Expect)> = vec![
            ("link.img".into(), |e| matches!(e, OpenError::Symlink)),
            ("dirlink/secret".into(), |e| matches!(e, OpenError::Symlink)),
            // Even a symlink that stays inside is refused: no symlinks at all.
            ("inner-link.img".into(), |e| matches!(e, OpenError::Symlink)),
            ("../outside/secret".into(), |e| {
                matches!(e, OpenError::Escapes)
            }),
            ("sub/../../outside/secret".into(), |e| {
                matches!(e, OpenError::Escapes)
            }),
            (outside_abs.display().to_string(), |e| {
                matches!(e, OpenError::Escapes)
            }),
            ("dir.img".into(), |e| {
                matches!(e, OpenError::NotRegular("directory"))
            }),
            (".".into(), |e| {
                matches!(e, OpenError::NotRegular("directory"))
            }),
            ("fifo.img".into(), |e| {
                matches!(e, OpenError::NotRegular("FIFO"))
            }),
            ("missing.img".into(), |e| matches!(e, OpenError::NotFound)),
            ("sub/good.img/x".into(), |e| {
                matches!(e, OpenError::NotFound)
            }),
        ];
        for (how, open) in OPENERS {
            for (path, expected) in &cases {
                let err = open(&root, Path::new(path)).expect_err(path);
                assert!(expected(&err), "{how} {path}: {err:?}");
                let message = err.to_string();
                assert!(
                    !message.contains(&s.outside.display().to_string())
                        && !message.contains(&s.root_path.display().to_string()),
                    "{how}: the error names a host path: {message}"
                );
            }
        }
    }

    #[test]
    fn hard_links_refused_only_where_asked() {
        let s = setup();
        std::fs::hard_link(s.outside.join("secret"), s.root_path.join("hard.img")).unwrap();
        let job = Root::open(&s.root_path, Links::Single).unwrap();
        let operator = Root::open(&s.root_path, Links::Any).unwrap();
        assert_eq!(job.links(), Links::Single);
        for (how, open) in OPENERS {
            let err = open(&job, Path::new("hard.img")).unwrap_err();
            assert!(matches!(err, OpenError::HardLinked(2)), "{how}: {err:?}");
            assert!(err.to_string().contains("hard links"), "{how}");
            let file = open(&operator, Path::new("hard.img")).unwrap();
            assert_eq!(read(file), SECRET, "{how}");
        }
    }

    #[test]
    fn local_files_are_opened_without_following_the_last_link() {
        let s = setup();
        let good = s.root_path.join("sub/good.img");
        assert_eq!(read(open_local(&good).unwrap()), b"good");
        symlink(s.outside.join("secret"), s.root_path.join("link")).unwrap();
        let err = open_local(&s.root_path.join("link")).unwrap_err();
        assert!(matches!(err, OpenError::Symlink), "{err:?}");
        let err = open_local(&s.root_path.join("sub")).unwrap_err();
        assert!(matches!(err, OpenError::NotRegular("directory")), "{err:?}");
        let err = open_local(&s.root_path.join("missing/x")).unwrap_err();
        assert!(matches!(err, OpenError::NotFound), "{err:?}");
        let io: io::Error = OpenError::Symlink.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
        assert!(io.to_string().contains("symbolic link"));
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../a")), PathBuf::from("/a"));
        assert_eq!(normalize(Path::new("a/../../b")), PathBuf::from("../b"));
        assert_eq!(normalize(Path::new("/a/b/")), PathBuf::from("/a/b"));
    }
}
