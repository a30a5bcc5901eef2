//! What Nomad's logmon does for a task's stdout: it makes a FIFO the driver
//! writes to and copies everything from it into a log file. `run` and the
//! tests use this so the plugin sees exactly what Nomad gives it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A FIFO and the thread copying it into a log file. The thread stays
/// until the process ends (a FIFO opened read-write never reports EOF, so
/// the driver may reopen it any number of times).
#[derive(Debug)]
pub struct LogMon {
    pub fifo: PathBuf,
    pub log: PathBuf,
}

impl LogMon {
    /// Makes the FIFO at `fifo` (0600) and starts copying it to `log`.
    pub fn start(fifo: &Path, log: &Path) -> std::io::Result<LogMon> {
        if std::fs::symlink_metadata(fifo).is_err() {
            // coreutils' mkfifo: std has no safe mkfifo.
            let status = std::process::Command::new("mkfifo")
                .arg("-m")
                .arg("0600")
                .arg("--")
                .arg(fifo)
                .status()?;
            if !status.success() {
                return Err(std::io::Error::other(format!(
                    "mkfifo {} failed ({status})",
                    fifo.display()
                )));
            }
        }
        let mut reader: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(fifo)?;
        let mut sink = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(log)?;
        std::thread::Builder::new()
            .name("logmon".into())
            .spawn(move || {
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(read) = reader.read(&mut buffer) {
                    if read == 0 || sink.write_all(&buffer[..read]).is_err() {
                        return;
                    }
                }
            })?;
        Ok(LogMon {
            fifo: fifo.to_path_buf(),
            log: log.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_the_fifo_reach_the_log_across_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (fifo, log) = (
            dir.path().join(".t.stdout.fifo"),
            dir.path().join("t.stdout.0"),
        );
        LogMon::start(&fifo, &log).expect("start");
        for line in ["one\n", "two\n"] {
            let mut writer = OpenOptions::new().write(true).open(&fifo).expect("writer");
            writer.write_all(line.as_bytes()).expect("write");
        }
        for _ in 0..100 {
            if std::fs::read_to_string(&log).unwrap_or_default() == "one\ntwo\n" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("log holds {:?}", std::fs::read_to_string(&log));
    }
}
