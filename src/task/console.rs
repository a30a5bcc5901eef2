//! Copies the guest's serial console (a file libvirt's virtlogd writes) to
//! the task's stdout FIFO, which Nomad's logmon reads: that is how the
//! console reaches `nomad alloc logs`.
//!
//! The FIFO lives in the alloc dir, which sibling tasks can write. So the
//! sink is only ever an existing FIFO: opened without following links,
//! checked with `fstat` before a byte is written, on every (re)open; a link,
//! a regular file or anything else in its place is left alone. The copier
//! sleeps until inotify reports a change to the console file: an idle task
//! costs no wake-ups. All copiers share one inotify instance (one watch
//! per task directory), so hundreds of tasks do not hit the per-user
//! instance limit.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use inotify::{Inotify, WatchDescriptor, WatchMask};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Notify};

/// Largest chunk copied at once.
const CHUNK: usize = 64 * 1024;

/// A running copier; stops when dropped or stopped.
pub struct ConsoleCopier {
    stop: watch::Sender<bool>,
}

impl ConsoleCopier {
    /// Starts copying `console_log` to the FIFO at `sink`. With `from_end`,
    /// output already in the file is skipped (a recovered task: it was
    /// copied before).
    pub fn spawn(console_log: PathBuf, sink: PathBuf, from_end: bool) -> Self {
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(copy_loop(console_log, sink, from_end, stopped));
        Self { stop }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for ConsoleCopier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why the sink was not opened.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a FIFO; the console is only ever written to the FIFO Nomad made")]
    NotFifo { path: PathBuf },
}

/// Opens the task's stdout FIFO for writing, never anything else: the path
/// is opened `O_PATH | O_NOFOLLOW` (no side effects, no link followed),
/// checked to be a FIFO by `fstat`, and only then reopened for writing
/// through that same descriptor. Non-blocking: with no reader yet it fails
/// (ENXIO) and the copier tries again with the next output.
pub fn open_fifo_sink(path: &Path) -> Result<pipe::Sender, SinkError> {
    let open_error = |source| SinkError::Open {
        path: path.to_path_buf(),
        source,
    };
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_error)?;
    let metadata = handle.metadata().map_err(open_error)?;
    if !metadata.file_type().is_fifo() {
        return Err(SinkError::NotFifo {
            path: path.to_path_buf(),
        });
    }
    let mut proc_path = OsString::from("/proc/self/fd/");
    proc_path.push(std::os::fd::AsRawFd::as_raw_fd(&handle).to_string());
    let file: File = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(PathBuf::from(proc_path))
        .map_err(open_error)?;
    // The same inode as checked: reopening a descriptor cannot be redirected.
    let reopened = file.metadata().map_err(open_error)?;
    if reopened.ino() != metadata.ino() || reopened.dev() != metadata.dev() {
        return Err(SinkError::NotFifo {
            path: path.to_path_buf(),
        });
    }
    pipe::Sender::from_file(file).map_err(open_error)
}

/// Opens the console log (written by virtlogd) without following a link;
/// only a regular file is read.
fn open_console(path: &Path) -> io::Result<(tokio::fs::File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(io::Error::other("the console log is not a regular file"));
    }
    Ok((tokio::fs::File::from_std(file), metadata.ino()))
}

/// One inotify instance for every console copier of the process: the
/// kernel allows few instances per user (128 by default, shared with every
/// other program of that user) but many watches, so a copier per task
/// must not cost an instance. A thread of its own reads the events
/// (blocking, so it wakes only when a watched file changes) and wakes the
/// copiers whose file changed.
struct ConsoleWatches {
    watches: inotify::Watches,
    /// Per watched directory: the copiers interested in it.
    subscribers: Mutex<HashMap<WatchDescriptor, Vec<Subscriber>>>,
    next_id: AtomicU64,
}

/// (subscription id, file name, its waker).
type Subscriber = (u64, OsString, Arc<Notify>);

fn console_watches() -> io::Result<Arc<ConsoleWatches>> {
    static SHARED: OnceLock<Result<Arc<ConsoleWatches>, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let mut inotify = Inotify::init().map_err(|error| error.to_string())?;
            let shared = Arc::new(ConsoleWatches {
                watches: inotify.watches(),
                subscribers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            });
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("console-watch".into())
                .spawn(move || {
                    let mut buffer = vec![0u8; 4096];
                    loop {
                        let Ok(events) = inotify.read_events_blocking(&mut buffer) else {
                            return;
                        };
                        let Some(shared) = weak.upgrade() else { return };
                        shared.wake(events);
                    }
                })
                .map_err(|error| error.to_string())?;
            Ok(shared)
        })
        .clone()
        .map_err(io::Error::other)
}

impl ConsoleWatches {
    fn wake(&self, events: inotify::Events<'_>) {
        let Ok(subscribers) = self.subscribers.lock() else {
            return;
        };
        for event in events {
            let Some(list) = subscribers.get(&event.wd) else {
                continue;
            };
            for (_, file, waker) in list {
                // No name: the directory itself changed (deleted).
                if event.name.is_none_or(|name| name == file.as_os_str()) {
                    waker.notify_one();
                }
            }
        }
    }

    /// Wakes the returned subscription when `console_log` changes.
    fn subscribe(self: &Arc<Self>, console_log: &Path) -> io::Result<ConsoleWatch> {
        let dir = console_log.parent().unwrap_or_else(|| Path::new("/"));
        let file = console_log
            .file_name()
            .map(OsString::from)
            .unwrap_or_default();
        let mut subscribers = self
            .subscribers
            .lock()
            .map_err(|_| io::Error::other("console watch lock poisoned"))?;
        // Under the lock: a concurrent unsubscribe cannot remove the
        // directory's watch between this add and the insert below.
        let wd = self.watches.clone().add(
            dir,
            WatchMask::MODIFY
                | WatchMask::CREATE
                | WatchMask::MOVED_TO
                | WatchMask::CLOSE_WRITE
                | WatchMask::DELETE_SELF,
        )?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(Notify::new());
        subscribers
            .entry(wd.clone())
            .or_default()
            .push((id, file, waker.clone()));
        Ok(ConsoleWatch {
            shared: self.clone(),
            wd,
            id,
            waker,
        })
    }
}

/// A copier's interest in its console file; dropping it removes the
/// directory's watch when no other copier uses it.
struct ConsoleWatch {
    shared: Arc<ConsoleWatches>,
    wd: WatchDescriptor,
    id: u64,
    waker: Arc<Notify>,
}

impl ConsoleWatch {
    /// Returns once the file changed since the last call (a change that
    /// came in between is not lost: it left a permit).
    async fn changed(&self) {
        self.waker.notified().await;
    }
}

impl Drop for ConsoleWatch {
    fn drop(&mut self) {
        let Ok(mut subscribers) = self.shared.subscribers.lock() else {
            return;
        };
        if let Some(list) = subscribers.get_mut(&self.wd) {
            list.retain(|(id, ..)| *id != self.id);
            if list.is_empty() {
                subscribers.remove(&self.wd);
                // Fails harmlessly when the directory is already gone.
                let _ = self.shared.watches.clone().remove(self.wd.clone());
            }
        }
    }
}

/// Watches the console file's directory for changes to that file.
fn watch_console(console_log: &Path) -> io::Result<ConsoleWatch> {
    console_watches()?.subscribe(console_log)
}

async fn copy_loop(
    console_log: PathBuf,
    sink_path: PathBuf,
    from_end: bool,
    mut stopped: watch::Receiver<bool>,
) {
    let changes = match watch_console(&console_log) {
        Ok(changes) => Some(changes),
        Err(error) => {
            tracing::warn!(error = %error, path = %console_log.display(), "cannot watch the console log; console output will not reach the task's logs");
            None
        }
    };
    let mut sink: Option<pipe::Sender> = None;
    let mut source: Option<(tokio::fs::File, u64)> = None; // file and inode
    let mut skip_existing = from_end;
    let mut buffer = vec![0u8; CHUNK];
    let mut refused_logged = false;
    loop {
        // After a stop, keep copying until the file has nothing more: the
        // guest's last lines (its power-off messages) are worth keeping.
        let finishing = *stopped.borrow();
        if source.is_none() {
            if let Ok((mut file, inode)) = open_console(&console_log) {
                if skip_existing {
                    let _ = file.seek(io::SeekFrom::End(0)).await;
                    skip_existing = false;
                }
                source = Some((file, inode));
            }
        }
        let mut copied = false;
        if let Some((file, inode)) = source.as_mut() {
            match file.read(&mut buffer).await {
                Ok(0) => {
                    // virtlogd rotates the log by renaming it: follow the new file.
                    let rotated = std::fs::symlink_metadata(&console_log)
                        .map(|m| m.ino() != *inode)
                        .unwrap_or(false);
                    if rotated {
                        source = None;
                        continue;
                    }
                }
                Ok(read) => {
                    copied = true;
                    if sink.is_none() {
                        match open_fifo_sink(&sink_path) {
                            Ok(opened) => {
                                sink = Some(opened);
                                refused_logged = false;
                            }
                            Err(SinkError::NotFifo { path }) if !refused_logged => {
                                refused_logged = true;
                                tracing::warn!(path = %path.display(), "task stdout is not a FIFO; console output is not written there");
                            }
                            Err(_) => {}
                        }
                    }
                    if let Some(writer) = sink.as_mut() {
                        if writer.write_all(&buffer[..read]).await.is_err() {
                            // The reader went away (logmon restarting): reopen later.
                            sink = None;
                        }
                    }
                }
                Err(_) => source = None,
            }
        }
        if copied {
            continue;
        }
        if finishing {
            return;
        }
        // Nothing to copy: sleep until the file changes or we are stopped.
        let Some(watch) = changes.as_ref() else {
            let _ = stopped.changed().await;
            continue;
        };
        tokio::select! {
            () = watch.changed() => {}
            _ = stopped.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn make_fifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo");
        assert!(status.success());
    }

    async fn read_some(reader: &mut pipe::Receiver, expected: &[u8]) -> Vec<u8> {
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 256];
        while received.len() < expected.len() {
            let read = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut chunk))
                .await
                .expect("data arrives")
                .expect("read");
            if read == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..read]);
        }
        received
    }

    #[tokio::test]
    async fn copies_appends_and_follows_rotation_into_the_fifo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        let fifo = dir.path().join("stdout.fifo");
        make_fifo(&fifo);
        let mut reader = pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .expect("reader");
        let copier = ConsoleCopier::spawn(console.clone(), fifo.clone(), false);
        tokio::fs::write(&console, "boot line 1\n")
            .await
            .expect("write");
        assert_eq!(
            read_some(&mut reader, b"boot line 1\n").await,
            b"boot line 1\n"
        );
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .await
            .expect("open");
        file.write_all(b"line 2\n").await.expect("append");
        assert_eq!(read_some(&mut reader, b"line 2\n").await, b"line 2\n");
        tokio::fs::rename(&console, dir.path().join("console.log.0"))
            .await
            .expect("rotate");
        tokio::fs::write(&console, "after rotation\n")
            .await
            .expect("write");
        assert_eq!(
            read_some(&mut reader, b"after rotation\n").await,
            b"after rotation\n"
        );
        drop(copier);
    }

    /// More copiers than the kernel's default per-user inotify instance
    /// limit (128, shared with every other process of the user) all copy:
    /// they share one instance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_copiers_share_one_inotify_instance() {
        const COPIERS: usize = 160;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut readers = Vec::new();
        let mut copiers = Vec::new();
        for index in 0..COPIERS {
            let task_dir = dir.path().join(format!("task{index}"));
            std::fs::create_dir(&task_dir).expect("mkdir");
            let fifo = task_dir.join("stdout.fifo");
            make_fifo(&fifo);
            readers.push(
                pipe::OpenOptions::new()
                    .open_receiver(&fifo)
                    .expect("reader"),
            );
            copiers.push(ConsoleCopier::spawn(
                task_dir.join("console.log"),
                fifo,
                false,
            ));
        }
        // Let every copier register its watch before the files appear.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for index in 0..COPIERS {
            let console = dir.path().join(format!("task{index}/console.log"));
            std::fs::write(&console, format!("task {index:03}\n")).expect("write");
        }
        for (index, reader) in readers.iter_mut().enumerate() {
            let expected = format!("task {index:03}\n");
            assert_eq!(
                read_some(reader, expected.as_bytes()).await,
                expected.as_bytes()
            );
        }
        // Copiers of removed tasks let go of their directory's watch.
        drop(copiers);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let shared = console_watches().expect("shared watches");
        let watched = shared.subscribers.lock().expect("lock").len();
        assert!(watched < COPIERS, "{watched} directories still watched");
    }

    #[tokio::test]
    async fn recovered_copier_skips_old_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        let fifo = dir.path().join("stdout.fifo");
        tokio::fs::write(&console, "old output\n")
            .await
            .expect("write");
        make_fifo(&fifo);
        let mut reader = pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .expect("reader");
        let _copier = ConsoleCopier::spawn(console.clone(), fifo.clone(), true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .await
            .expect("open");
        file.write_all(b"new output\n").await.expect("append");
        assert_eq!(
            read_some(&mut reader, b"new output\n").await,
            b"new output\n"
        );
    }

    #[tokio::test]
    async fn only_an_existing_fifo_is_ever_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A symlink to a file: not followed, the target is untouched.
        let target = dir.path().join("victim");
        std::fs::write(&target, "precious").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(open_fifo_sink(&link).is_err());
        // A regular file in the FIFO's place: refused before any write.
        assert!(matches!(
            open_fifo_sink(&target),
            Err(SinkError::NotFifo { .. })
        ));
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "precious");
        // A missing path is never created.
        let missing = dir.path().join("missing");
        assert!(open_fifo_sink(&missing).is_err());
        assert!(!missing.exists());
        // A symlink to a FIFO is refused too.
        let fifo = dir.path().join("fifo");
        make_fifo(&fifo);
        let fifo_link = dir.path().join("fifo-link");
        std::os::unix::fs::symlink(&fifo, &fifo_link).expect("symlink");
        assert!(open_fifo_sink(&fifo_link).is_err());
        // The real FIFO with a reader opens.
        let _reader = pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .expect("reader");
        assert!(open_fifo_sink(&fifo).is_ok());
    }

    #[tokio::test]
    async fn swapping_the_fifo_for_a_link_many_times_never_writes_elsewhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        let fifo = dir.path().join("stdout.fifo");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "").expect("victim");
        make_fifo(&fifo);
        let copier = ConsoleCopier::spawn(console.clone(), fifo.clone(), false);
        let swapper = {
            let (fifo, victim) = (fifo.clone(), victim.clone());
            std::thread::spawn(move || {
                let spare = fifo.with_extension("spare");
                // A reader keeps the newest FIFO writable, so the copier
                // opens it; dropping the previous one breaks the copier's
                // pipe, so it reopens the path again and again.
                let mut reader = None;
                for round in 0..400 {
                    // Alternate: the FIFO, then a link to the victim, then a
                    // regular file, at the path the copier opens.
                    let _ = std::fs::remove_file(&fifo);
                    match round % 3 {
                        0 => {
                            let _ = std::process::Command::new("mkfifo").arg(&spare).status();
                            if let Ok(opened) = std::fs::OpenOptions::new()
                                .read(true)
                                .custom_flags(libc::O_NONBLOCK)
                                .open(&spare)
                            {
                                reader = Some(opened);
                            }
                            let _ = std::fs::rename(&spare, &fifo);
                        }
                        1 => {
                            let _ = std::os::unix::fs::symlink(&victim, &fifo);
                        }
                        _ => {
                            let _ = std::fs::write(&fifo, "");
                        }
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                drop(reader);
            })
        };
        let writer = {
            let console = console.clone();
            tokio::spawn(async move {
                for line in 0..400 {
                    let mut file = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&console)
                        .await
                        .expect("console");
                    let _ = file.write_all(format!("line {line}\n").as_bytes()).await;
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            })
        };
        writer.await.expect("writer");
        swapper.join().expect("swapper");
        drop(copier);
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "",
            "the link target was written"
        );
        if std::fs::symlink_metadata(&fifo).is_ok_and(|m| m.is_file()) {
            assert_eq!(
                std::fs::read_to_string(&fifo).expect("file"),
                "",
                "a regular file was written"
            );
        }
    }
}
