//! Byte copies of an image into a volume's file on this host, the cheapest
//! correct way the filesystem offers: a reflink (`FICLONE`, shared extents,
//! nothing written) where source and destination share a filesystem that
//! supports it (XFS with reflink, btrfs), otherwise a sparse copy (only the
//! source's data extents, found with `SEEK_DATA`/`SEEK_HOLE`, copied with
//! `copy_file_range`; holes stay holes).
//!
//! Both read the one descriptor the image was opened as and copy exactly
//! the `length` bytes the caller checked against its size cap: a source
//! that grew since is cut back to `length`, one that shrank is an error.
//! [`CopyProgress`] counts the bytes done while the copy runs.
//!
//! No libvirt here: the caller makes the volume through libvirt and hands
//! its opened file in (see `crate::libvirt::storage::volume`).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::SeekFrom;

/// Bytes done of bytes total in a disk's preparation, shared between the
/// thread that copies and the one that reports. Both start at 0; the total
/// is set once the copier knows it.
#[derive(Debug, Default)]
pub struct CopyProgress {
    done: AtomicU64,
    total: AtomicU64,
}

impl CopyProgress {
    pub fn new() -> CopyProgress {
        CopyProgress::default()
    }

    /// Starts a copy of `total` bytes (from 0 done).
    pub fn start(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// `done` bytes of the total are copied (holes skipped count as done).
    pub fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    /// Adds `bytes` to the bytes done.
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `(done, total)`; total 0 means not known yet.
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// How [`copy_into`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: the destination shares the source's extents.
    Reflink,
    /// Data extents copied with `copy_file_range` (or read/write where
    /// the kernel refuses that), holes left as holes.
    Sparse,
    /// A sparse copy, then every byte allocated (`fallocate`, shared
    /// extents unshared): a raw disk with `sparse = false`.
    Allocated,
}

impl CopyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::Sparse => "sparse copy",
            CopyMethod::Allocated => "allocated copy",
        }
    }
}

/// Bytes per `copy_file_range` call: small enough for progress every few
/// hundred milliseconds on slow disks.
const STEP: u64 = 16 << 20;

/// Makes `dest` (a regular file opened for writing, whose contents are
/// replaced) hold exactly the first `length` bytes of `source`: a reflink
/// when the filesystem offers one, a sparse copy otherwise. `progress`,
/// when given, is started at `length` and counts the bytes done.
pub fn copy_into(
    source: &File,
    dest: &File,
    length: u64,
    progress: Option<&CopyProgress>,
) -> io::Result<CopyMethod> {
    if let Some(progress) = progress {
        progress.start(length);
    }
    dest.set_len(0)?;
    let method = if length > 0 && try_reflink(source, dest)? {
        // The whole source was cloned: cut what it gained since the size
        // check (shared extents, nothing was written for it).
        let cloned = dest.metadata()?.len();
        if cloned < length {
            return Err(shrank(length - cloned));
        }
        dest.set_len(length)?;
        CopyMethod::Reflink
    } else {
        sparse_copy(source, dest, length, progress)?;
        CopyMethod::Sparse
    };
    if let Some(progress) = progress {
        progress.set_done(length);
    }
    Ok(method)
}

/// [`copy_into`] for a disk allocated in full (`sparse = false`): no
/// reflink (the disk must own its blocks), a sparse copy, then `dest`
/// grown to `end` bytes with all of them allocated. The holes become
/// allocated unwritten extents, so nothing is written for them.
pub fn copy_allocated(
    source: &File,
    dest: &File,
    length: u64,
    end: u64,
    progress: Option<&CopyProgress>,
) -> io::Result<CopyMethod> {
    if let Some(progress) = progress {
        progress.start(length);
    }
    dest.set_len(0)?;
    sparse_copy(source, dest, length, progress)?;
    let end = end.max(length);
    if end > 0 {
        rustix::fs::fallocate(dest, rustix::fs::FallocateFlags::empty(), 0, end)?;
        // copy_file_range may have shared extents (XFS, btrfs); give the
        // disk its own. Filesystems without shared extents refuse the flag.
        match rustix::fs::fallocate(dest, rustix::fs::FallocateFlags::UNSHARE_RANGE, 0, end) {
            Ok(())
            | Err(rustix::io::Errno::OPNOTSUPP)
            | Err(rustix::io::Errno::INVAL)
            | Err(rustix::io::Errno::NOSYS) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    if let Some(progress) = progress {
        progress.set_done(length);
    }
    Ok(CopyMethod::Allocated)
}

fn shrank(missing: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the image ended {missing} bytes early; was it changed during the copy?"),
    )
}

/// `FICLONE` of all of `source` onto `dest`. `Ok(false)` when the
/// filesystem cannot: no reflink support (`EOPNOTSUPP`, `ENOTTY`, `EINVAL`
/// on filesystems without the ioctl or with unaligned sizes), different
/// filesystems (`EXDEV`), or a refusal of the ioctl in this context
/// (`EPERM`, e.g. a seccomp filter). Other errors are real failures.
pub fn try_reflink(source: &File, dest: &File) -> io::Result<bool> {
    match rustix::fs::ioctl_ficlone(dest, source) {
        Ok(()) => Ok(true),
        Err(errno)
            if [
                rustix::io::Errno::OPNOTSUPP,
                rustix::io::Errno::NOTTY,
                rustix::io::Errno::INVAL,
                rustix::io::Errno::XDEV,
                rustix::io::Errno::PERM,
                rustix::io::Errno::NOSYS,
            ]
            .contains(&errno) =>
        {
            Ok(false)
        }
        Err(errno) => Err(errno.into()),
    }
}

/// Copies the data extents among the first `length` bytes of `source` to
/// the same offsets of the empty `dest`, then sets `dest`'s length: holes
/// in the source stay holes. A filesystem without `SEEK_DATA` reports the
/// whole file as data (the kernel's generic answer), which is a full copy.
fn sparse_copy(
    source: &File,
    dest: &File,
    length: u64,
    progress: Option<&CopyProgress>,
) -> io::Result<()> {
    let mut at = 0;
    while at < length {
        let data = match rustix::fs::seek(source, SeekFrom::Data(at)) {
            Ok(data) => data,
            // No data past `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(errno) => return Err(errno.into()),
        };
        if data >= length {
            break;
        }
        let hole = match rustix::fs::seek(source, SeekFrom::Hole(data)) {
            Ok(hole) => hole,
            // Cut short concurrently: what is missing shows below.
            Err(rustix::io::Errno::NXIO) => length,
            Err(errno) => return Err(errno.into()),
        };
        let end = hole.min(length);
        let mut offset = data;
        while offset < end {
            let step = (end - offset).min(STEP);
            let copied = copy_range(source, dest, offset, step)?;
            if copied == 0 {
                return Err(shrank(length - offset));
            }
            offset += copied;
            if let Some(progress) = progress {
                progress.set_done(offset);
            }
        }
        at = end;
        if let Some(progress) = progress {
            progress.set_done(at);
        }
    }
    let size = source.metadata()?.len();
    if size < length {
        return Err(shrank(length - size));
    }
    dest.set_len(length)
}

/// Copies up to `len` bytes at `offset` of `source` to the same offset of
/// `dest`; returns how many (0 at the source's end). `copy_file_range`
/// first; `pread`/`pwrite` where the kernel or filesystem refuses it.
fn copy_range(source: &File, dest: &File, offset: u64, len: u64) -> io::Result<u64> {
    let want = usize::try_from(len).unwrap_or(usize::MAX);
    let (mut off_in, mut off_out) = (offset, offset);
    match rustix::fs::copy_file_range(source, Some(&mut off_in), dest, Some(&mut off_out), want) {
        Ok(copied) => return Ok(copied as u64),
        Err(errno)
            if [
                rustix::io::Errno::XDEV,
                rustix::io::Errno::INVAL,
                rustix::io::Errno::NOSYS,
                rustix::io::Errno::OPNOTSUPP,
                rustix::io::Errno::PERM,
            ]
            .contains(&errno) => {}
        Err(errno) => return Err(errno.into()),
    }
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; want.min(1 << 20)];
    let got = loop {
        match source.read_at(&mut buf, offset) {
            Ok(got) => break got,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    };
    dest.write_all_at(&buf[..got], offset)?;
    Ok(got as u64)
}

/// Bytes the file's blocks take on disk (`st_blocks` × 512).
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    /// A 64 MiB sparse file with 1 MiB of data at 0, 20 MiB and its last MiB.
    fn sparse_source(dir: &std::path::Path) -> File {
        let path = dir.join("source.img");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(64 * MIB).unwrap();
        for (at, byte) in [(0, 1u8), (20 * MIB, 2), (63 * MIB, 3)] {
            file.write_all_at(&vec![byte; MIB as usize], at).unwrap();
        }
        file.sync_all().unwrap();
        File::open(&path).unwrap()
    }

    fn dest(dir: &std::path::Path, name: &str) -> File {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap()
    }

    fn contents(file: &File) -> Vec<u8> {
        let mut bytes = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut bytes, 0).unwrap();
        bytes
    }

    #[test]
    fn a_sparse_copy_is_byte_identical_and_keeps_holes() {
        let dir = tempfile::Builder::new()
            .prefix("ndvtest")
            .tempdir()
            .unwrap();
        let source = sparse_source(dir.path());
        let copy = dest(dir.path(), "copy.img");
        // Old contents of the destination go.
        copy.write_all_at(&[9u8; 4096], 80 * MIB).unwrap();
        let progress = CopyProgress::new();
        sparse_copy(&source, &copy, 64 * MIB, Some(&progress)).unwrap();
        assert_eq!(progress.get(), (64 * MIB, 0), "the copier counts");
        copy.set_len(0).unwrap();
        let method = copy_into(&source, &copy, 64 * MIB, Some(&progress)).unwrap();
        assert_eq!(progress.get(), (64 * MIB, 64 * MIB));
        assert_eq!(copy.metadata().unwrap().len(), 64 * MIB);
        assert!(contents(&source) == contents(&copy), "bytes differ");
        let allocated = allocated_bytes(&copy).unwrap();
        // 3 MiB of data; a filesystem may round each extent up a little.
        assert!(
            allocated <= 8 * MIB,
            "{allocated} bytes allocated for 3 MiB of data ({method:?})"
        );
    }

    #[test]
    fn an_allocated_copy_owns_every_block() {
        let dir = tempfile::Builder::new()
            .prefix("ndvtest")
            .tempdir()
            .unwrap();
        let source = sparse_source(dir.path());
        let copy = dest(dir.path(), "full.img");
        let progress = CopyProgress::new();
        let method = copy_allocated(&source, &copy, 64 * MIB, 80 * MIB, Some(&progress)).unwrap();
        assert_eq!(method, CopyMethod::Allocated);
        assert_eq!(progress.get(), (64 * MIB, 64 * MIB));
        assert_eq!(copy.metadata().unwrap().len(), 80 * MIB);
        let bytes = contents(&copy);
        assert!(bytes[..(64 * MIB) as usize] == contents(&source)[..]);
        assert!(bytes[(64 * MIB) as usize..].iter().all(|&b| b == 0));
        assert!(allocated_bytes(&copy).unwrap() >= 80 * MIB);
    }

    #[test]
    fn only_the_checked_length_is_copied() {
        let dir = tempfile::Builder::new()
            .prefix("ndvtest")
            .tempdir()
            .unwrap();
        let source = sparse_source(dir.path());
        // A source that grew after the check is cut back to the length.
        let copy = dest(dir.path(), "short.img");
        copy_into(&source, &copy, 21 * MIB, None).unwrap();
        assert_eq!(copy.metadata().unwrap().len(), 21 * MIB);
        assert_eq!(contents(&copy), contents(&source)[..(21 * MIB) as usize]);
        // One that shrank is an error, not a short disk.
        let copy = dest(dir.path(), "long.img");
        let err = copy_into(&source, &copy, 65 * MIB, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert!(err.to_string().contains("1048576 bytes early"), "{err}");
        // Nothing to copy.
        let copy = dest(dir.path(), "empty.img");
        assert_eq!(
            copy_into(&source, &copy, 0, None).unwrap(),
            CopyMethod::Sparse
        );
        assert_eq!(copy.metadata().unwrap().len(), 0);
    }

    #[test]
    fn reflink_is_refused_across_filesystems_and_the_copy_falls_back() {
        // /proc is another filesystem than the temp dir and has no
        // FICLONE: the decision must be "no reflink", not an error.
        let dir = tempfile::Builder::new()
            .prefix("ndvtest")
            .tempdir()
            .unwrap();
        let copy = dest(dir.path(), "copy.img");
        let proc_file = File::open("/proc/self/status").unwrap();
        assert!(!try_reflink(&proc_file, &copy).unwrap());
        let source = sparse_source(dir.path());
        let other = dest(dir.path(), "other.img");
        // Same filesystem: a reflink exactly when the filesystem has them.
        let method = copy_into(&source, &other, 64 * MIB, None).unwrap();
        assert!(contents(&source) == contents(&other));
        let fs_reflinks = try_reflink(&source, &dest(dir.path(), "probe.img")).unwrap();
        assert_eq!(method == CopyMethod::Reflink, fs_reflinks);
    }
}
