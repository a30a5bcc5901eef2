//! Copies the guest's serial console (a file libvirt's virtlogd writes) to
//! the task's stdout, which Nomad's logmon reads: that is how the console
//! reaches `nomad alloc logs`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// How often the console file is checked for new output.
const POLL: Duration = Duration::from_millis(200);
/// Largest chunk copied at once.
const CHUNK: usize = 64 * 1024;

/// A running copier; stops when dropped or stopped.
pub struct ConsoleCopier {
    stop: watch::Sender<bool>,
}

impl ConsoleCopier {
    /// Starts copying `console_log` to `sink`. With `from_end`, output
    /// already in the file is skipped (a recovered task: it was copied before).
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

type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// Opens the task's stdout: Nomad gives a FIFO (opened without blocking,
/// retried until logmon reads it); anything else is appended to.
async fn open_sink(path: &Path) -> std::io::Result<Sink> {
    let is_fifo = tokio::fs::metadata(path)
        .await
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if is_fifo {
        let sender = tokio::net::unix::pipe::OpenOptions::new().open_sender(path)?;
        Ok(Box::new(sender))
    } else {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(Box::new(file))
    }
}

async fn copy_loop(
    console_log: PathBuf,
    sink_path: PathBuf,
    from_end: bool,
    mut stopped: watch::Receiver<bool>,
) {
    let mut sink: Option<Sink> = None;
    let mut source: Option<(tokio::fs::File, u64)> = None; // file and inode
    let mut skip_existing = from_end;
    let mut buffer = vec![0u8; CHUNK];
    loop {
        // After a stop, keep copying until the file has nothing more: the
        // guest's last lines (its power-off messages) are worth keeping.
        let finishing = *stopped.borrow();
        if source.is_none() {
            if let Ok(mut file) = tokio::fs::File::open(&console_log).await {
                let inode = file.metadata().await.map(|m| m.ino()).unwrap_or(0);
                if skip_existing {
                    let _ = file.seek(std::io::SeekFrom::End(0)).await;
                    skip_existing = false;
                }
                source = Some((file, inode));
            }
        }
        let mut copied = false;
        if let Some((file, inode)) = source.as_mut() {
            match file.read(&mut buffer).await {
                Ok(0) => {
                    if finishing {
                        return;
                    }
                    // virtlogd rotates the log by renaming it: follow the new file.
                    let rotated = tokio::fs::metadata(&console_log)
                        .await
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
                        sink = open_sink(&sink_path).await.ok();
                    }
                    if let Some(writer) = sink.as_mut() {
                        if writer.write_all(&buffer[..read]).await.is_err()
                            || writer.flush().await.is_err()
                        {
                            // The reader went away (logmon restarting): reopen later.
                            sink = None;
                        }
                    }
                }
                Err(_) => source = None,
            }
        }
        if finishing && !copied {
            return;
        }
        if !copied {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stopped.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait_for_contents(path: &Path, expected: &str) -> String {
        for _ in 0..50 {
            let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
            if text == expected {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::fs::read_to_string(path).await.unwrap_or_default()
    }

    #[tokio::test]
    async fn copies_appends_and_follows_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        let stdout = dir.path().join("stdout");
        let copier = ConsoleCopier::spawn(console.clone(), stdout.clone(), false);
        tokio::fs::write(&console, "boot line 1\n")
            .await
            .expect("write");
        assert_eq!(
            wait_for_contents(&stdout, "boot line 1\n").await,
            "boot line 1\n"
        );
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .await
            .expect("open");
        file.write_all(b"line 2\n").await.expect("append");
        assert_eq!(
            wait_for_contents(&stdout, "boot line 1\nline 2\n").await,
            "boot line 1\nline 2\n"
        );
        tokio::fs::rename(&console, dir.path().join("console.log.0"))
            .await
            .expect("rotate");
        tokio::fs::write(&console, "after rotation\n")
            .await
            .expect("write");
        let expected = "boot line 1\nline 2\nafter rotation\n";
        assert_eq!(wait_for_contents(&stdout, expected).await, expected);
        drop(copier);
    }

    #[tokio::test]
    async fn recovered_copier_skips_old_output_and_feeds_a_fifo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        let fifo = dir.path().join("stdout.fifo");
        tokio::fs::write(&console, "old output\n")
            .await
            .expect("write");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(status.success());
        let mut reader = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .expect("reader");
        let _copier = ConsoleCopier::spawn(console.clone(), fifo.clone(), true);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .await
            .expect("open");
        file.write_all(b"new output\n").await.expect("append");
        let mut received = vec![0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut received))
            .await
            .expect("data arrives")
            .expect("read");
        assert_eq!(&received[..read], b"new output\n");
    }
}
