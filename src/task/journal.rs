//! The start journal: one small file per task in a root-only directory,
//! written (atomically, synced) before each thing a start creates on the
//! host, removed when the task is destroyed. A plugin killed at any step
//! leaves a record of exactly what may exist, and the next plugin removes
//! it once Nomad had its chance to recover the task. Nothing is removed
//! that a record does not name, and a record whose plugin process is still
//! alive belongs to that process, not to us.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::net::NetIntent;
use crate::nomad::driver_state::CreatedVolume;

/// Where the Nomad-run plugin keeps its journal.
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/nomad-driver-virt/journal";
/// Overrides the journal directory (tests, and `run` beside a client).
pub const JOURNAL_DIR_ENV: &str = "NOMAD_DRIVER_VIRT_STATE_DIR";

/// Layout version of a record.
const RECORD_VERSION: u32 = 1;
/// A record larger than this is not ours.
const MAX_RECORD_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal directory {path} must be a root-owned directory that only root can write, not a link; remove it or fix its owner and mode")]
    UnsafeDir { path: PathBuf },
    #[error("writing journal record {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The plugin process a record belongs to: pid plus its start time, so a
/// reused pid is not mistaken for the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// Process start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub started: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            started: process_start(pid).unwrap_or(0),
        }
    }

    /// Whether the owning process still runs.
    pub fn is_alive(&self) -> bool {
        process_start(self.pid).is_some_and(|started| started == self.started)
    }
}

/// Field 22 of `/proc/PID/stat` (after the parenthesised command name,
/// which may itself hold spaces and parentheses).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); start time is 22.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// What one task may have put on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub version: u32,
    pub owner: Owner,
    pub task_id: String,
    pub domain_name: String,
    /// Volumes in creation order; each is written here before it is created.
    pub volumes: Vec<CreatedVolume>,
    /// Written before the domain is defined.
    pub domain_defined: bool,
    /// Written before the network is set up.
    pub net: Option<NetIntent>,
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// Creates `dir` 0700, and the missing directories above it 0755: only the
/// journal itself is private. A 0700 parent (e.g. /var/lib/nomad-driver-virt)
/// would keep QEMU, which runs unprivileged, out of the directories `run`
/// keeps its allocations in beside the journal.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|ancestor| !ancestor.as_os_str().is_empty() && !ancestor.exists())
        .collect();
    for parent in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o755).create(parent) {
            // The umask may have taken bits away: set them, on what we made.
            Ok(()) => std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => Err(error),
        _ => Ok(()),
    }
}

impl Journal {
    /// Opens (creating it 0700 if needed) the journal directory. A
    /// directory that others could write, or a link, is refused.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Journal, JournalError> {
        let dir = dir.into();
        if let Err(source) = create_private_dir(&dir) {
            return Err(JournalError::Dir { path: dir, source });
        }
        let metadata = std::fs::symlink_metadata(&dir).map_err(|source| JournalError::Dir {
            path: dir.clone(),
            source,
        })?;
        let euid = current_euid();
        if !metadata.is_dir()
            || metadata.uid() != euid
            || metadata.permissions().mode() & 0o022 != 0
        {
            return Err(JournalError::UnsafeDir { path: dir });
        }
        Ok(Journal { dir })
    }

    /// A journal whose writes will fail (every start is then refused with
    /// the reason): used only when no directory could be opened.
    pub fn unwritable(dir: PathBuf) -> Journal {
        Journal { dir }
    }

    /// The journal directory the plugin uses: the environment's override or
    /// the default.
    pub fn default_dir() -> PathBuf {
        std::env::var_os(JOURNAL_DIR_ENV)
            .filter(|dir| !dir.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_JOURNAL_DIR), PathBuf::from)
    }

    fn path_for(&self, task_id: &str) -> PathBuf {
        // Hex keeps any task id a single, safe file name.
        let hex: String = task_id.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.json"))
    }

    /// Starts the record of a task (before anything is created).
    pub fn begin(&self, task_id: &str, domain_name: &str) -> Result<RecordWriter, JournalError> {
        let writer = RecordWriter {
            path: self.path_for(task_id),
            record: Arc::new(Mutex::new(TaskRecord {
                version: RECORD_VERSION,
                owner: Owner::current(),
                task_id: task_id.to_string(),
                domain_name: domain_name.to_string(),
                volumes: Vec::new(),
                domain_defined: false,
                net: None,
            })),
        };
        writer.update(|_| {})?;
        Ok(writer)
    }

    /// Removes a task's record: everything it named is gone.
    pub fn forget(&self, task_id: &str) {
        let path = self.path_for(task_id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(error = %error, path = %path.display(), "cannot remove a journal record");
            }
        }
    }

    /// Makes this process the owner of a recovered task's record.
    pub fn adopt(&self, task_id: &str) {
        let path = self.path_for(task_id);
        if let Some(mut record) = read_record(&path) {
            record.owner = Owner::current();
            if let Err(error) = write_atomically(&path, &record) {
                tracing::warn!(error = %error, "cannot adopt a journal record");
            }
        }
    }

    /// The record of one task, if any.
    pub fn record(&self, task_id: &str) -> Option<TaskRecord> {
        read_record(&self.path_for(task_id))
    }

    /// The task whose record lists volume `name` in `pool` (made, or about
    /// to be made, by that task's start), whoever owns the record.
    pub fn task_using_volume(&self, pool: &str, name: &str) -> Option<String> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
            .filter_map(|entry| read_record(&entry.path()))
            .find(|record| {
                record
                    .volumes
                    .iter()
                    .any(|volume| volume.pool == pool && volume.name == name)
            })
            .map(|record| record.task_id)
    }

    /// Records of tasks no live plugin process owns, other than the ones
    /// `is_known` (tasks this process tracks).
    pub fn orphans(&self, is_known: impl Fn(&str) -> bool) -> Vec<TaskRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let me = Owner::current();
        entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
            .filter_map(|entry| read_record(&entry.path()))
            .filter(|record| !is_known(&record.task_id))
            .filter(|record| record.owner == me || !record.owner.is_alive())
            .collect()
    }
}

/// Reads a record: a regular file we own, of bounded size, opened without
/// following links. Anything else is ignored (and never acted upon).
fn read_record(path: &Path) -> Option<TaskRecord> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let metadata = file.metadata().ok()?;
    if !metadata.is_file() || metadata.uid() != current_euid() || metadata.len() > MAX_RECORD_BYTES
    {
        return None;
    }
    let record: TaskRecord =
        serde_json::from_reader(std::io::Read::take(file, MAX_RECORD_BYTES)).ok()?;
    // The file name is derived from the task id; a mismatch is not ours.
    (record.version <= RECORD_VERSION
        && path.file_name()
            == Journal {
                dir: PathBuf::new(),
            }
            .path_for(&record.task_id)
            .file_name())
    .then_some(record)
}

fn write_atomically(path: &Path, record: &TaskRecord) -> Result<(), JournalError> {
    let write_error = |source| JournalError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec(record).map_err(|e| write_error(std::io::Error::other(e)))?;
    let temporary = path.with_extension("tmp");
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(&bytes).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    std::fs::rename(&temporary, path).map_err(write_error)?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = path.parent() {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// The effective uid, as the owner of `/proc/self` (std has no geteuid).
fn current_euid() -> u32 {
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

/// Writes one task's record as a start goes; cheap to clone.
#[derive(Debug, Clone)]
pub struct RecordWriter {
    path: PathBuf,
    record: Arc<Mutex<TaskRecord>>,
}

impl RecordWriter {
    /// Applies `change` and writes the record before returning.
    pub fn update(&self, change: impl FnOnce(&mut TaskRecord)) -> Result<(), JournalError> {
        let snapshot = {
            let mut record = self.record.lock().map_err(|_| JournalError::Write {
                path: self.path.clone(),
                source: std::io::Error::other("journal record lock poisoned"),
            })?;
            change(&mut record);
            record.clone()
        };
        write_atomically(&self.path, &snapshot)
    }

    /// The record as last written.
    pub fn snapshot(&self) -> Option<TaskRecord> {
        self.record.lock().ok().map(|record| record.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_past_a_hostile_command_name() {
        let stat = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
        assert!(Owner::current().is_alive());
        let gone = Owner {
            pid: std::process::id(),
            started: Owner::current().started + 1,
        };
        assert!(!gone.is_alive(), "a reused pid is not the owner");
    }

    /// On a fresh host the journal's parents are made too: they must stay
    /// traversable (QEMU reaches `run`'s allocations beside the journal),
    /// only the journal is private.
    #[test]
    fn only_the_journal_itself_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("var-lib").join("nomad-driver-virt");
        let journal_dir = state.join("journal");
        Journal::open(&journal_dir).expect("open");
        let mode = |path: &Path| {
            std::fs::symlink_metadata(path)
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&journal_dir), 0o700);
        assert_eq!(mode(&state), 0o755);
        assert_eq!(mode(state.parent().expect("parent")), 0o755);
        // Opening again changes nothing.
        Journal::open(&journal_dir).expect("reopen");
        assert_eq!(mode(&state), 0o755);
    }

    #[test]
    fn records_survive_as_written_and_orphans_are_the_unknown_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path().join("journal")).expect("open");
        let writer = journal
            .begin("alloc/web/1234abcd", "web-1234abcd")
            .expect("begin");
        writer
            .update(|record| {
                record.volumes.push(CreatedVolume {
                    pool: "p".into(),
                    name: "web-1234abcd_vda.qcow2".into(),
                });
                record.domain_defined = true;
            })
            .expect("update");
        let orphans = journal.orphans(|_| false);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0], writer.snapshot().expect("snapshot"));
        assert!(journal.orphans(|id| id == "alloc/web/1234abcd").is_empty());
        journal.forget("alloc/web/1234abcd");
        journal.forget("alloc/web/1234abcd");
        assert!(journal.orphans(|_| false).is_empty());
    }

    #[test]
    fn records_of_a_live_other_process_are_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        let writer = journal.begin("a/b/c", "b-c").expect("begin");
        // pid 1 runs for as long as the machine does.
        let init = Owner {
            pid: 1,
            started: process_start(1).expect("pid 1"),
        };
        writer.update(|record| record.owner = init).expect("update");
        assert!(journal.orphans(|_| false).is_empty());
        journal.adopt("a/b/c");
        assert_eq!(journal.orphans(|_| false).len(), 1, "adopted: ours now");
    }

    #[test]
    fn links_foreign_names_and_unsafe_dirs_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path().join("j")).expect("open");
        // A record under a name that is not its task id's is ignored.
        let writer = journal.begin("a/b/c", "b-c").expect("begin");
        let real = journal.path_for("a/b/c");
        std::fs::rename(&real, journal.path_for("x/y/z")).expect("rename");
        assert!(journal.orphans(|_| false).is_empty());
        // A link in place of a record is never followed.
        std::os::unix::fs::symlink("/etc/hostname", &real).expect("symlink");
        assert!(journal.orphans(|_| false).is_empty());
        drop(writer);

        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            Journal::open(&open),
            Err(JournalError::UnsafeDir { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("j"), &link).expect("symlink");
        assert!(matches!(
            Journal::open(&link),
            Err(JournalError::UnsafeDir { .. })
        ));
    }
}
