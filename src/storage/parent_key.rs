//! Keys of shared parent volumes: the SHA-256 of the bytes actually read
//! from the image's descriptor while uploading it, so a parent's name
//! always says what it holds and no job can publish its bytes under
//! another image's key.
//!
//! Hashing rides on the upload that happens anyway. To skip re-uploading
//! an unchanged image, a digest is remembered (in this process only) under
//! the file's identity as `fstat` saw it before and after the read: device,
//! inode, size, mtime and ctime. Any write moves the ctime, which no
//! unprivileged user can set, so a changed file is hashed again; a file
//! that changed during the read is not remembered at all.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

/// What `fstat` says identifies a file's current content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    pub fn of(file: &File) -> io::Result<Identity> {
        let meta = file.metadata()?;
        Ok(Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

fn memo() -> &'static Mutex<HashMap<Identity, String>> {
    static MEMO: OnceLock<Mutex<HashMap<Identity, String>>> = OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// The key remembered for a file with this identity, if any.
pub fn remembered(identity: &Identity) -> Option<String> {
    memo()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(identity)
        .cloned()
}

/// Remembers `key` for the file, only if `before` (its identity when the
/// read began) still holds now.
pub fn remember(file: &File, before: Identity, key: &str) {
    if Identity::of(file).is_ok_and(|after| after == before) {
        memo()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(before, key.to_string());
    }
}

/// One lock per file identity, so concurrent starts from one image share
/// one upload. Entries stay for the process's life, one per image seen.
pub fn upload_lock(identity: &Identity) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<Identity, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(*identity).or_default().clone()
}

/// The key of the whole file, read through its descriptor with positional
/// reads (the file offset is untouched), and its identity before the read.
/// Remembered like upload keys, so an unchanged image is hashed once. A
/// caller publishing something made from a later read must check that
/// the identity still holds afterwards.
pub fn key_of_file(file: &File) -> io::Result<(String, Identity)> {
    use std::os::unix::fs::FileExt as _;
    let before = Identity::of(file)?;
    if let Some(key) = remembered(&before) {
        return Ok((key, before));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let read = file.read_at(&mut buf, offset)?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        offset += read as u64;
    }
    let key = hex(&hasher.finalize());
    remember(file, before, &key);
    Ok((key, before))
}

/// A reader that hashes every byte it hands out.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The key of everything read so far: lowercase hex SHA-256.
    pub fn key(self) -> String {
        hex(&self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        Ok(read)
    }
}

/// The key of these bytes (what [`HashingReader::key`] gives after
/// reading exactly them).
pub fn key_of(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hashing_reader_keys_what_was_read() {
        let mut reader = HashingReader::new(&b"abc"[..]);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert_eq!(
            reader.key(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key_of(b"abc"), key_of(&out));
        assert_ne!(key_of(b"abc"), key_of(b"abd"));
    }

    #[test]
    fn memo_follows_file_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        std::fs::write(&path, b"one").unwrap();
        let file = File::open(&path).unwrap();
        let before = Identity::of(&file).unwrap();
        remember(&file, before, "k1");
        assert_eq!(remembered(&before).as_deref(), Some("k1"));
        // Rewritten in place (same size, mtime put back): a new identity.
        let mtime = file.metadata().unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"two").unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let after = Identity::of(&file).unwrap();
        assert_ne!(after, before);
        assert_eq!(remembered(&after), None);
        // Changed during the read: not remembered.
        remember(&file, before, "stale");
        assert_eq!(remembered(&after), None);
        assert_eq!(remembered(&before).as_deref(), Some("k1"));
    }
}
