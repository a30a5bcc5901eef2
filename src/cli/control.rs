//! `run`'s private control socket, through which `nomad-driver-virt exec`
//! and `signal` reach the tasks a running `run` owns.
//!
//! Layout: a base directory (root: `/run/nomad-driver-virt`; others:
//! `$XDG_RUNTIME_DIR/nomad-driver-virt`; `NOMAD_DRIVER_VIRT_CONTROL_DIR`
//! overrides both) holds one directory per `run` process, named by its pid,
//! holding `control.sock`. Every directory must be ours, a real directory
//! (not a link) and mode 0700, or it is refused. Peers are checked with
//! SO_PEERCRED: only root and our own uid are served.
//!
//! The protocol: frames of `u32` big-endian length, one kind byte, payload.
//! Requests and replies are JSON; stdin/stdout/stderr carry raw bytes.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::pb::hashicorp::nomad::plugins::drivers::proto::driver_client::DriverClient;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::exec_task_streaming_request::{
    Setup, TerminalSize,
};
use crate::pb::hashicorp::nomad::plugins::drivers::proto::{
    ExecTaskStreamingIoOperation, ExecTaskStreamingRequest, SignalTaskRequest,
};

/// Overrides where control sockets live (both for `run` and its clients).
pub const CONTROL_DIR_ENV: &str = "NOMAD_DRIVER_VIRT_CONTROL_DIR";
/// Root's base directory.
pub const ROOT_BASE_DIR: &str = "/run/nomad-driver-virt";
/// The socket's file name inside a run's directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Largest frame either side accepts.
const MAX_FRAME: usize = 1 << 20;
/// How long a client may take to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// Where control directories live for this user.
pub fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CONTROL_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from(ROOT_BASE_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("nomad-driver-virt"),
        None => std::env::temp_dir().join(format!("nomad-driver-virt-{}", uid.as_raw())),
    }
}

/// Why a control directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlDirError {
    #[error("{path} is a symbolic link, not a directory; refusing to use it for the control socket: remove it, or set {CONTROL_DIR_ENV} to another place")]
    Symlink { path: PathBuf },
    #[error("{path} is not a directory; refusing to use it for the control socket: remove it, or set {CONTROL_DIR_ENV} to another place")]
    NotADirectory { path: PathBuf },
    #[error("{path} belongs to uid {owner}, not to us (uid {ours}); refusing to use it for the control socket: remove it, or set {CONTROL_DIR_ENV} to another place")]
    Owner {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("{path} has mode {mode:04o}, not 0700; refusing to use it for the control socket: remove it (or `chmod 700` it), or set {CONTROL_DIR_ENV} to another place")]
    Mode { path: PathBuf, mode: u32 },
    #[error("cannot create the control directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot use the control directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Checks that `path` is a real directory, ours, mode 0700.
pub fn check_private_dir(path: &Path) -> Result<(), ControlDirError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|source| ControlDirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let kind = metadata.file_type();
    if kind.is_symlink() {
        return Err(ControlDirError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !kind.is_dir() {
        return Err(ControlDirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let ours = rustix::process::geteuid().as_raw();
    if metadata.uid() != ours {
        return Err(ControlDirError::Owner {
            path: path.to_path_buf(),
            owner: metadata.uid(),
            ours,
        });
    }
    let mode = metadata.mode() & 0o7777;
    if mode != 0o700 {
        return Err(ControlDirError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Creates `path` 0700 unless it exists; either way it must pass
/// [`check_private_dir`].
fn ensure_private_dir(path: &Path) -> Result<(), ControlDirError> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(ControlDirError::Create {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    check_private_dir(path)
}

/// A run's control directory and its bound socket; removed on drop.
#[derive(Debug)]
pub struct ControlDir {
    dir: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
}

impl ControlDir {
    /// Creates `<base>/<pid>/control.sock`. A directory left by an earlier
    /// process with our pid is reused only if it passes the same checks.
    pub fn create(base: &Path) -> Result<ControlDir, ControlDirError> {
        ensure_private_dir(base)?;
        let dir = base.join(std::process::id().to_string());
        ensure_private_dir(&dir)?;
        let socket = dir.join(SOCKET_NAME);
        let io_error = |source| ControlDirError::Io {
            path: socket.clone(),
            source,
        };
        match std::fs::symlink_metadata(&socket) {
            // A stale socket (or anything else that is not a directory):
            // the directory is ours and private, so it is ours to remove.
            Ok(metadata) if !metadata.is_dir() => {
                std::fs::remove_file(&socket).map_err(io_error)?;
            }
            Ok(_) => {
                return Err(ControlDirError::Io {
                    path: socket.clone(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a directory is in the way",
                    ),
                })
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error(error)),
        }
        let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(io_error)?;
        listener.set_nonblocking(true).map_err(io_error)?;
        Ok(ControlDir {
            dir,
            listener: Some(listener),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }

    fn take_listener(&mut self) -> Option<std::os::unix::net::UnixListener> {
        self.listener.take()
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(SOCKET_NAME));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Whether a peer with this uid may use our socket: root or ourselves.
pub fn peer_allowed(peer_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == rustix::process::geteuid().as_raw()
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub rows: u16,
    pub cols: u16,
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// The tasks this run owns.
    Tasks,
    /// SignalTask.
    Signal { task: String, signal: String },
    /// ExecTaskStreaming; followed by stdin, resize and close-stdin frames.
    Exec {
        task: String,
        argv: Vec<String>,
        tty: Option<Size>,
    },
}

/// What the run answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Tasks { pid: u32, tasks: Vec<String> },
    Done,
    Exited { code: i32 },
    Error { message: String },
}

/// One frame on the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Request(Request),
    Reply(Reply),
    Stdin(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    CloseStdin,
    Resize(Size),
}

const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const KIND_STDIN: u8 = 3;
const KIND_STDOUT: u8 = 4;
const KIND_STDERR: u8 = 5;
const KIND_CLOSE_STDIN: u8 = 6;
const KIND_RESIZE: u8 = 7;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl Frame {
    fn encode(&self) -> io::Result<Vec<u8>> {
        let (kind, payload) = match self {
            Frame::Request(request) => (
                KIND_REQUEST,
                serde_json::to_vec(request).map_err(io::Error::other)?,
            ),
            Frame::Reply(reply) => (
                KIND_REPLY,
                serde_json::to_vec(reply).map_err(io::Error::other)?,
            ),
            Frame::Stdin(data) => (KIND_STDIN, data.clone()),
            Frame::Stdout(data) => (KIND_STDOUT, data.clone()),
            Frame::Stderr(data) => (KIND_STDERR, data.clone()),
            Frame::CloseStdin => (KIND_CLOSE_STDIN, Vec::new()),
            Frame::Resize(size) => {
                let mut bytes = size.rows.to_be_bytes().to_vec();
                bytes.extend(size.cols.to_be_bytes());
                (KIND_RESIZE, bytes)
            }
        };
        if payload.len() + 1 > MAX_FRAME {
            return Err(invalid("frame too large"));
        }
        let mut bytes = Vec::with_capacity(payload.len() + 5);
        bytes.extend(((payload.len() + 1) as u32).to_be_bytes());
        bytes.push(kind);
        bytes.extend(payload);
        Ok(bytes)
    }

    fn decode(kind: u8, payload: Vec<u8>) -> io::Result<Frame> {
        let json_error = |error: serde_json::Error| invalid(format!("bad control frame: {error}"));
        Ok(match kind {
            KIND_REQUEST => Frame::Request(serde_json::from_slice(&payload).map_err(json_error)?),
            KIND_REPLY => Frame::Reply(serde_json::from_slice(&payload).map_err(json_error)?),
            KIND_STDIN => Frame::Stdin(payload),
            KIND_STDOUT => Frame::Stdout(payload),
            KIND_STDERR => Frame::Stderr(payload),
            KIND_CLOSE_STDIN => Frame::CloseStdin,
            KIND_RESIZE => match payload.as_slice() {
                [r0, r1, c0, c1] => Frame::Resize(Size {
                    rows: u16::from_be_bytes([*r0, *r1]),
                    cols: u16::from_be_bytes([*c0, *c1]),
                }),
                _ => return Err(invalid("bad resize frame")),
            },
            other => return Err(invalid(format!("unknown control frame kind {other}"))),
        })
    }
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> io::Result<()> {
    writer.write_all(&frame.encode()?).await?;
    writer.flush().await
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Frame>> {
    let mut length = [0u8; 4];
    match reader.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length == 0 || length > MAX_FRAME {
        return Err(invalid(format!("control frame of {length} bytes")));
    }
    let mut bytes = vec![0u8; length];
    reader.read_exact(&mut bytes).await?;
    let payload = bytes.split_off(1);
    Frame::decode(bytes[0], payload).map(Some)
}

/// The run's tasks by name: their task ids once they run.
pub type TaskDirectory = Arc<Mutex<BTreeMap<String, String>>>;

/// Serves a run's control socket until dropped (which removes it).
pub struct ControlServer {
    dir: ControlDir,
    accept: tokio::task::JoinHandle<()>,
}

impl ControlServer {
    /// Creates the control directory under `base` and serves requests by
    /// calling the plugin's own ExecTaskStreaming and SignalTask.
    pub fn start(
        base: &Path,
        driver: DriverClient<Channel>,
        tasks: TaskDirectory,
    ) -> Result<ControlServer, ControlDirError> {
        let mut dir = ControlDir::create(base)?;
        let socket = dir.socket_path();
        let listener = dir
            .take_listener()
            .ok_or_else(|| ControlDirError::Io {
                path: socket.clone(),
                source: io::Error::other("no listener"),
            })
            .and_then(|listener| {
                UnixListener::from_std(listener).map_err(|source| ControlDirError::Io {
                    path: socket.clone(),
                    source,
                })
            })?;
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let allowed = stream
                    .peer_cred()
                    .map(|cred| peer_allowed(cred.uid()))
                    .unwrap_or(false);
                if !allowed {
                    tracing::warn!("control socket: refused a client of another user");
                    continue;
                }
                let (driver, tasks) = (driver.clone(), tasks.clone());
                tokio::spawn(async move {
                    if let Err(error) = serve_client(stream, driver, tasks).await {
                        tracing::debug!("control socket client: {error}");
                    }
                });
            }
        });
        Ok(ControlServer { dir, accept })
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.socket_path()
    }

    pub fn dir(&self) -> &Path {
        self.dir.dir()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn error_reply(message: impl Into<String>) -> Frame {
    Frame::Reply(Reply::Error {
        message: message.into(),
    })
}

/// The task id of a running task, or why there is none.
fn lookup(tasks: &TaskDirectory, name: &str) -> Result<String, String> {
    let tasks = tasks
        .lock()
        .map_err(|_| "the run is shutting down".to_string())?;
    match tasks.get(name) {
        Some(task_id) => Ok(task_id.clone()),
        None => Err(format!(
            "this run (pid {}) has no running task named {name:?}; its running tasks: {}",
            std::process::id(),
            if tasks.is_empty() {
                "none".to_string()
            } else {
                tasks.keys().cloned().collect::<Vec<_>>().join(", ")
            }
        )),
    }
}

/// Answers one client's requests, one after another, until it hangs up.
async fn serve_client(
    stream: UnixStream,
    mut driver: DriverClient<Channel>,
    tasks: TaskDirectory,
) -> io::Result<()> {
    let (mut reader, mut writer) = stream.into_split();
    loop {
        let frame = match tokio::time::timeout(REQUEST_WAIT, read_frame(&mut reader)).await {
            Ok(frame) => frame?,
            Err(_) => return Ok(()),
        };
        let request = match frame {
            None => return Ok(()),
            Some(Frame::Request(request)) => request,
            Some(other) => {
                write_frame(
                    &mut writer,
                    &error_reply(format!("expected a request, got {other:?}")),
                )
                .await?;
                return Ok(());
            }
        };
        match request {
            Request::Tasks => {
                let names = tasks
                    .lock()
                    .map(|tasks| tasks.keys().cloned().collect())
                    .unwrap_or_default();
                let reply = Reply::Tasks {
                    pid: std::process::id(),
                    tasks: names,
                };
                write_frame(&mut writer, &Frame::Reply(reply)).await?;
            }
            Request::Signal { task, signal } => {
                let reply = match lookup(&tasks, &task) {
                    Err(message) => error_reply(message),
                    Ok(task_id) => match driver
                        .signal_task(SignalTaskRequest { task_id, signal })
                        .await
                    {
                        Ok(_) => Frame::Reply(Reply::Done),
                        Err(status) => error_reply(status.message()),
                    },
                };
                write_frame(&mut writer, &reply).await?;
            }
            Request::Exec { task, argv, tty } => {
                let task_id = match lookup(&tasks, &task) {
                    Ok(task_id) => task_id,
                    Err(message) => {
                        write_frame(&mut writer, &error_reply(message)).await?;
                        continue;
                    }
                };
                // The session owns the connection until the command exits.
                return exec(reader, writer, driver, task_id, argv, tty).await;
            }
        }
    }
}

/// One exec session: the client's frames become ExecTaskStreaming requests
/// to the plugin, its answers become frames. The client hanging up ends the
/// call, which makes the plugin kill the command in the guest.
async fn exec(
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    mut driver: DriverClient<Channel>,
    task_id: String,
    argv: Vec<String>,
    tty: Option<Size>,
) -> io::Result<()> {
    let (requests, receiver) = mpsc::channel(16);
    let size = |size: Size| TerminalSize {
        height: i32::from(size.rows),
        width: i32::from(size.cols),
    };
    let _ = requests
        .send(ExecTaskStreamingRequest {
            setup: Some(Setup {
                task_id,
                command: argv,
                tty: tty.is_some(),
            }),
            ..Default::default()
        })
        .await;
    if let Some(initial) = tty {
        // Sent before the call, as Nomad's client does: the session starts
        // with the right size.
        let _ = requests
            .send(ExecTaskStreamingRequest {
                tty_size: Some(size(initial)),
                ..Default::default()
            })
            .await;
    }
    let mut answers = match driver
        .exec_task_streaming(ReceiverStream::new(receiver))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return write_frame(&mut writer, &error_reply(status.message())).await,
    };
    // Client frames to the plugin; ends when the client hangs up.
    let forward = async move {
        loop {
            let message = match read_frame(&mut reader).await {
                Ok(Some(Frame::Stdin(data))) => ExecTaskStreamingRequest {
                    stdin: Some(ExecTaskStreamingIoOperation { data, close: false }),
                    ..Default::default()
                },
                Ok(Some(Frame::CloseStdin)) => ExecTaskStreamingRequest {
                    stdin: Some(ExecTaskStreamingIoOperation {
                        data: Vec::new(),
                        close: true,
                    }),
                    ..Default::default()
                },
                Ok(Some(Frame::Resize(new))) => ExecTaskStreamingRequest {
                    tty_size: Some(size(new)),
                    ..Default::default()
                },
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            };
            if requests.send(message).await.is_err() {
                return;
            }
        }
    };
    tokio::pin!(forward);
    loop {
        let answer = tokio::select! {
            answer = answers.message() => answer,
            // The client is gone: dropping the call ends the session.
            () = &mut forward => return Ok(()),
        };
        let frame = match answer {
            Ok(Some(answer)) => {
                if let Some(io) = answer.stdout.filter(|io| !io.data.is_empty()) {
                    write_frame(&mut writer, &Frame::Stdout(io.data)).await?;
                }
                if let Some(io) = answer.stderr.filter(|io| !io.data.is_empty()) {
                    write_frame(&mut writer, &Frame::Stderr(io.data)).await?;
                }
                if !answer.exited {
                    continue;
                }
                let code = answer.result.map(|r| r.exit_code).unwrap_or_default();
                Frame::Reply(Reply::Exited { code })
            }
            Ok(None) => error_reply("the plugin ended the session without an exit code"),
            Err(status) => error_reply(status.message()),
        };
        return write_frame(&mut writer, &frame).await;
    }
}

/// A run process's control socket, found under the base directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSocket {
    pub pid: u32,
    pub path: PathBuf,
}

/// Every run's socket under `base` (directories that fail the checks are
/// skipped with a warning; the base itself must pass them).
pub fn find_sockets(base: &Path) -> Result<Vec<RunSocket>, ControlDirError> {
    match std::fs::symlink_metadata(base) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        _ => check_private_dir(base)?,
    }
    let entries = std::fs::read_dir(base).map_err(|source| ControlDirError::Io {
        path: base.to_path_buf(),
        source,
    })?;
    let mut sockets = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        if let Err(error) = check_private_dir(&dir) {
            tracing::warn!("skipping {}: {error}", dir.display());
            continue;
        }
        let path = dir.join(SOCKET_NAME);
        let is_socket = std::fs::symlink_metadata(&path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if is_socket {
            sockets.push(RunSocket { pid, path });
        }
    }
    sockets.sort_by_key(|socket| socket.pid);
    Ok(sockets)
}

/// Connects to a run's socket and checks that root or we are serving it.
pub async fn connect(socket: &RunSocket) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(&socket.path).await?;
    let peer = stream.peer_cred()?;
    if !peer_allowed(peer.uid()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by uid {}, neither root nor us",
                socket.path.display(),
                peer.uid()
            ),
        ));
    }
    Ok(stream)
}

/// Sends one request and reads its reply, waiting up to `limit`.
pub async fn ask(stream: &mut UnixStream, request: Request, limit: Duration) -> io::Result<Reply> {
    write_frame(stream, &Frame::Request(request)).await?;
    match tokio::time::timeout(limit, read_frame(stream)).await {
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no reply")),
        Ok(Ok(Some(Frame::Reply(reply)))) => Ok(reply),
        Ok(Ok(Some(other))) => Err(invalid(format!("unexpected frame {other:?}"))),
        Ok(Ok(None)) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the run hung up",
        )),
        Ok(Err(error)) => Err(error),
    }
}

/// Finds the run process owning `task` and returns a connection to it.
pub async fn connect_to_task(task: &str) -> anyhow::Result<UnixStream> {
    let base = base_dir();
    let sockets = find_sockets(&base)?;
    let mut owners = Vec::new();
    let mut others = Vec::new();
    for socket in &sockets {
        // A run killed with SIGKILL leaves its socket behind: skip it.
        let Ok(mut stream) = connect(socket).await else {
            continue;
        };
        match ask(&mut stream, Request::Tasks, REQUEST_WAIT).await {
            Ok(Reply::Tasks { pid, tasks }) => {
                if tasks.iter().any(|name| name == task) {
                    owners.push((pid, stream));
                } else {
                    others.extend(tasks.into_iter().map(|name| format!("{name} (pid {pid})")));
                }
            }
            _ => continue,
        }
    }
    match owners.len() {
        1 => Ok(owners.remove(0).1),
        0 => {
            let hint = if others.is_empty() {
                format!(
                    "no `nomad-driver-virt run` with a running task is reachable (control sockets are looked for under {}, as this user; {CONTROL_DIR_ENV} overrides it)",
                    base.display()
                )
            } else {
                format!("running tasks: {}", others.join(", "))
            };
            anyhow::bail!("no running `nomad-driver-virt run` owns a task named {task:?}; {hint}")
        }
        _ => {
            let pids: Vec<String> = owners.iter().map(|(pid, _)| pid.to_string()).collect();
            anyhow::bail!(
                "several `nomad-driver-virt run` processes (pids {}) own a task named {task:?}; stop all but one",
                pids.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn frames_round_trip() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let frames = vec![
                Frame::Request(Request::Exec {
                    task: "web".into(),
                    argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                    tty: Some(Size { rows: 24, cols: 80 }),
                }),
                Frame::Request(Request::Tasks),
                Frame::Reply(Reply::Exited { code: 3 }),
                Frame::Stdin(vec![0, 255, 10]),
                Frame::Stdout(Vec::new()),
                Frame::Stderr(b"err".to_vec()),
                Frame::CloseStdin,
                Frame::Resize(Size {
                    rows: 50,
                    cols: 300,
                }),
            ];
            let mut bytes = Vec::new();
            for frame in &frames {
                write_frame(&mut bytes, frame).await.expect("write");
            }
            let mut reader = bytes.as_slice();
            for frame in &frames {
                assert_eq!(
                    read_frame(&mut reader).await.expect("read").as_ref(),
                    Some(frame)
                );
            }
            assert_eq!(read_frame(&mut reader).await.expect("end"), None);
            // Hostile input: an oversized length and an unknown kind.
            let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1];
            assert!(read_frame(&mut huge).await.is_err());
            let mut unknown: &[u8] = &[0, 0, 0, 1, 99];
            assert!(read_frame(&mut unknown).await.is_err());
            let mut garbage: &[u8] = &[0, 0, 0, 3, KIND_REQUEST, b'{', b'x'];
            assert!(read_frame(&mut garbage).await.is_err());
        });
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn control_dir_is_private_and_removed_on_drop() {
        let temp = tempfile::tempdir().expect("tempdir");
        let base = temp.path().join("control");
        let control = ControlDir::create(&base).expect("create");
        assert_eq!(mode_of(&base), 0o700);
        assert_eq!(mode_of(control.dir()), 0o700);
        assert_eq!(
            control.dir(),
            base.join(std::process::id().to_string()).as_path()
        );
        let socket = control.socket_path();
        assert!(std::fs::symlink_metadata(&socket)
            .expect("socket")
            .file_type()
            .is_socket());
        assert_eq!(
            find_sockets(&base).expect("find"),
            vec![RunSocket {
                pid: std::process::id(),
                path: socket
            }]
        );
        let dir = control.dir().to_path_buf();
        drop(control);
        assert!(!dir.exists(), "the run's directory is removed");
        // A stale socket from an earlier process with our pid is replaced.
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::write(dir.join(SOCKET_NAME), b"stale").expect("stale file");
        let again = ControlDir::create(&base).expect("reuse our own private dir");
        assert!(std::fs::symlink_metadata(again.socket_path())
            .expect("socket")
            .file_type()
            .is_socket());
    }

    #[test]
    fn hostile_dirs_and_links_are_refused() {
        let temp = tempfile::tempdir().expect("tempdir");
        // The base is a symlink to a directory someone else chose.
        let elsewhere = temp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let link = temp.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
        let error = ControlDir::create(&link).expect_err("symlink base");
        assert!(matches!(error, ControlDirError::Symlink { .. }), "{error}");
        assert!(error.to_string().contains("is a symbolic link"), "{error}");
        assert_eq!(std::fs::read_dir(&elsewhere).expect("read").count(), 0);
        assert!(find_sockets(&link).is_err(), "clients refuse it too");

        // A base others may enter.
        let open = temp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let error = ControlDir::create(&open).expect_err("world-writable base");
        assert!(
            error.to_string().contains("has mode 0777, not 0700"),
            "{error}"
        );
        assert_eq!(std::fs::read_dir(&open).expect("read").count(), 0);

        // A good base whose run directory was planted: wrong mode, a
        // symlink, or a plain file.
        let base = temp.path().join("base");
        std::fs::create_dir(&base).expect("mkdir");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let planted = base.join(std::process::id().to_string());
        std::fs::create_dir(&planted).expect("mkdir");
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let error = ControlDir::create(&base).expect_err("planted dir");
        assert!(error.to_string().contains("has mode 0755"), "{error}");
        std::fs::remove_dir(&planted).expect("rmdir");
        std::os::unix::fs::symlink(&elsewhere, &planted).expect("symlink");
        let error = ControlDir::create(&base).expect_err("planted link");
        assert!(matches!(error, ControlDirError::Symlink { .. }), "{error}");
        assert_eq!(std::fs::read_dir(&elsewhere).expect("read").count(), 0);
        std::fs::remove_file(&planted).expect("rm");
        std::fs::write(&planted, b"").expect("file");
        let error = ControlDir::create(&base).expect_err("planted file");
        assert!(
            matches!(error, ControlDirError::NotADirectory { .. }),
            "{error}"
        );

        // Owned by someone else (only root can set that up).
        if rustix::process::geteuid().is_root() {
            let foreign = temp.path().join("foreign");
            std::fs::create_dir(&foreign).expect("mkdir");
            std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            rustix::fs::chown(&foreign, Some(rustix::fs::Uid::from_raw(65534)), None)
                .expect("chown");
            let error = ControlDir::create(&foreign).expect_err("foreign owner");
            assert!(
                error.to_string().contains("belongs to uid 65534"),
                "{error}"
            );
        }
    }

    /// SO_PEERCRED for real: the same client, as root and as `nobody`, on a
    /// socket opened up for the test. Needs root and /usr/bin/perl.
    #[test]
    fn other_users_get_no_answer() {
        let perl = Path::new("/usr/bin/perl");
        if !rustix::process::geteuid().is_root() || !perl.is_file() {
            eprintln!("needs root and /usr/bin/perl; skipped");
            return;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let temp = tempfile::tempdir().expect("tempdir");
        let base = temp.path().join("control");
        let driver = runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_static("http://[::]:1").connect_lazy();
            DriverClient::new(channel)
        });
        let tasks = TaskDirectory::default();
        if let Ok(mut tasks) = tasks.lock() {
            tasks.insert("web".into(), "alloc/web/1".into());
        }
        let server = {
            let _entered = runtime.enter();
            ControlServer::start(&base, driver, tasks).expect("server")
        };
        // Open the way so `nobody` can reach the socket at all.
        for dir in [temp.path(), base.as_path(), server.dir()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        }
        std::fs::set_permissions(server.socket_path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let script = r#"
use IO::Socket::UNIX;
$SIG{PIPE} = 'IGNORE';
my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!";
my $req = '"tasks"';
print $s pack("N", length($req) + 1) . chr(1) . $req;
my $n = sysread($s, my $buf, 65536);
print defined $n ? "read $n: " . substr($buf, 5) : "error $!";
"#;
        let ask_as = |uid: Option<u32>| {
            use std::os::unix::process::CommandExt;
            let mut command = std::process::Command::new(perl);
            command.arg("-e").arg(script).arg(server.socket_path());
            if let Some(uid) = uid {
                command.uid(uid).gid(65534);
            }
            let output = command.output().expect("perl");
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr)
        };
        let root = ask_as(None);
        assert!(
            root.contains(r#""tasks":["web"]"#),
            "root is served: {root}"
        );
        let nobody = ask_as(Some(65534));
        // Connected, then closed unanswered: an end of stream, or an error
        // as its request was never read.
        assert!(
            nobody.starts_with("read 0") || nobody.starts_with("error "),
            "nobody connects and gets nothing: {nobody}"
        );
        drop(server);
        runtime.shutdown_background();
    }

    #[test]
    fn only_root_and_we_are_served() {
        let ours = rustix::process::geteuid().as_raw();
        assert!(peer_allowed(0));
        assert!(peer_allowed(ours));
        if ours != 65534 {
            assert!(!peer_allowed(65534));
        }
    }
}
