//! Streaming exec: stdin in, stdout/stderr out as the command produces them,
//! optional TTY with resizes, the exit code at the end. QEMU 7.2's
//! guest-exec only returns output once a process exits, so the command runs
//! under [`shell::SESSION_RUNNER`] with its stdio on files in a private guest
//! dir, moved with guest-file-open/read/write (see that script for why
//! output goes through segment files and stdin through a FIFO).
//!
//! Shape for a gRPC bidirectional stream: send [`SessionInput`]s on
//! [`ExecSession::input`], receive [`SessionEvent`]s from
//! [`ExecSession::next_event`] (or take both ends with
//! [`ExecSession::into_parts`]). Dropping the input sender means stdin EOF;
//! dropping the event receiver means the client is gone: the command's
//! process group is killed and the guest dir removed.

use std::time::Duration;

use tokio::sync::mpsc;

use super::protocol::{self, Empty, FileOpen, FileRead, FileReadResult, FileWrite, Handle};
use super::shell;
use super::{check_argv, GuestAgent, GuestAgentError};
use crate::libvirt::agent::AgentCallError;

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub argv: Vec<String>,
    /// Run the command on a pseudo-terminal of this initial size (needs
    /// util-linux `script` in the guest). Stderr is then merged into stdout,
    /// as on any terminal.
    pub tty: Option<TerminalSize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionInput {
    Stdin(Vec<u8>),
    /// End of stdin (after what was sent before it).
    CloseStdin,
    Resize(TerminalSize),
}

#[derive(Debug)]
pub enum SessionEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command exited (the last event).
    Exited {
        exit_code: i64,
    },
    /// The session broke (the last event).
    Failed(GuestAgentError),
}

/// A running session. See the module docs.
pub struct ExecSession {
    input: mpsc::Sender<SessionInput>,
    events: mpsc::Receiver<SessionEvent>,
    dir: String,
}

impl ExecSession {
    /// Where to send stdin, stdin EOF and resizes.
    pub fn input(&self) -> mpsc::Sender<SessionInput> {
        self.input.clone()
    }

    /// The next output, or the end; `None` after the last event.
    pub async fn next_event(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }

    /// Both ends, for wiring into a bidirectional stream.
    pub fn into_parts(self) -> (mpsc::Sender<SessionInput>, mpsc::Receiver<SessionEvent>) {
        (self.input, self.events)
    }

    /// The session's directory in the guest.
    pub fn guest_dir(&self) -> &str {
        &self.dir
    }
}

/// Largest stdin write: below the pipe's atomic-write size (PIPE_BUF, 4096),
/// so a write to the non-blocking FIFO either fits whole or fails whole and
/// can be retried.
const STDIN_CHUNK: usize = 4000;
/// Bytes asked for per guest-file-read.
const READ_CHUNK: u64 = 256 * 1024;
const MIN_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(100);
/// How long the runner may take to create its FIFOs.
const SETUP_LIMIT: Duration = Duration::from_secs(20);
/// Idle ticks between checks that the runner is still alive (at most
/// [`MAX_POLL`] apart, so a dead runner is noticed within a few seconds).
const RUNNER_CHECK_EVERY: u32 = 16;

pub(crate) async fn start(
    agent: GuestAgent,
    request: SessionRequest,
) -> Result<ExecSession, GuestAgentError> {
    check_argv(&request.argv)?;
    let dir = format!("/tmp/ndv-session-{}", random_hex());
    let (tty, rows, cols) = match request.tty {
        Some(size) => ("1", size.rows.max(1), size.cols.max(1)),
        None => ("0", 0, 0),
    };
    let mut args = vec![
        "sh".to_string(),
        "-c".to_string(),
        shell::SESSION_RUNNER.to_string(),
        "ndv-session".to_string(),
        dir.clone(),
        tty.to_string(),
        rows.to_string(),
        cols.to_string(),
        shell::command_line(&request.argv),
    ];
    args.extend(request.argv.iter().cloned());
    // setsid: the runner and its relays get their own process group, which
    // the cleanup kills in one go (the agent's children share its group).
    let runner_pid = agent.spawn("setsid", &args, true).await?;

    let opened = open_control_files(&agent, &dir, runner_pid, request.tty.is_some()).await;
    let (stdin_handle, ctl_handle) = match opened {
        Ok(handles) => handles,
        Err(error) => {
            cleanup(&agent, &dir).await;
            return Err(error);
        }
    };

    let (input_tx, input_rx) = mpsc::channel(64);
    // Small: a slow client stops the reads, and the guest's relays then
    // wait too (backpressure down to the command).
    let (event_tx, event_rx) = mpsc::channel(16);
    let pump = Pump {
        agent,
        dir: dir.clone(),
        runner_pid,
        stdin_handle: Some(stdin_handle),
        ctl_handle,
        pending_stdin: Vec::new(),
        stdin_closing: false,
        stdin_held: false,
        runner_reaped: false,
        resizes: Vec::new(),
        stdout: SegmentReader::new("out"),
        stderr: SegmentReader::new("err"),
        input: input_rx,
        input_open: true,
        events: event_tx,
    };
    tokio::spawn(pump.run());
    Ok(ExecSession {
        input: input_tx,
        events: event_rx,
        dir,
    })
}

fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Uniqueness is what matters here; the dir is created with mkdir,
        // which fails rather than reusing an existing one.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens `in` (and `ctl`) read-write, which never blocks on a FIFO, once the
/// runner has made them; notices a runner that failed before that.
async fn open_control_files(
    agent: &GuestAgent,
    dir: &str,
    runner_pid: i64,
    tty: bool,
) -> Result<(i64, Option<i64>), GuestAgentError> {
    let start = std::time::Instant::now();
    let mut delay = Duration::from_millis(2);
    let stdin_path = format!("{dir}/in");
    loop {
        match open(agent, &stdin_path, "r+").await {
            Ok(stdin) => {
                let ctl = if tty {
                    Some(open(agent, &format!("{dir}/ctl"), "r+").await?)
                } else {
                    None
                };
                return Ok((stdin, ctl));
            }
            Err(GuestAgentError::Agent(AgentCallError::Refused { .. })) => {}
            Err(error) => return Err(error),
        }
        let status: protocol::GuestExecStatus = agent
            .call("guest-exec-status", Some(protocol::Pid { pid: runner_pid }))
            .await?;
        if status.exited {
            let stderr = protocol::decode(status.err_data.as_deref()).unwrap_or_default();
            return Err(GuestAgentError::WrapperFailed {
                exit_code: status.exitcode.unwrap_or(-1),
                stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
                tty_hint: if tty {
                    "; a TTY also needs util-linux `script`"
                } else {
                    ""
                },
            });
        }
        if start.elapsed() > SETUP_LIMIT {
            return Err(GuestAgentError::Deadline {
                what: "starting the exec session".into(),
                limit: SETUP_LIMIT,
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

async fn open(agent: &GuestAgent, path: &str, mode: &str) -> Result<i64, GuestAgentError> {
    agent
        .call("guest-file-open", Some(FileOpen { path, mode }))
        .await
}

async fn close(agent: &GuestAgent, handle: i64) -> Result<(), GuestAgentError> {
    agent
        .call::<_, Empty>("guest-file-close", Some(Handle { handle }))
        .await
        .map(|_| ())
}

async fn read(agent: &GuestAgent, handle: i64) -> Result<Vec<u8>, GuestAgentError> {
    let result: FileReadResult = agent
        .call(
            "guest-file-read",
            Some(FileRead {
                handle,
                count: READ_CHUNK,
            }),
        )
        .await?;
    protocol::decode(result.buf_b64.as_deref()).map_err(|error| GuestAgentError::Protocol {
        command: "guest-file-read".into(),
        detail: error.to_string(),
    })
}

/// Writes one chunk (at most [`STDIN_CHUNK`]) and flushes it through the
/// agent's stdio buffer. `Ok(false)`: the pipe is full (the command is not
/// reading), retry later. Below PIPE_BUF a non-blocking pipe write is all or
/// nothing, and glibc drops a buffer it failed to flush, so a retry neither
/// loses nor doubles bytes.
async fn write_chunk(
    agent: &GuestAgent,
    handle: i64,
    chunk: &[u8],
) -> Result<bool, GuestAgentError> {
    let write = agent
        .call::<_, protocol::FileWriteResult>(
            "guest-file-write",
            Some(FileWrite {
                handle,
                buf_b64: protocol::encode(chunk),
            }),
        )
        .await;
    let flushed = match write {
        Ok(_) => {
            agent
                .call::<_, Empty>("guest-file-flush", Some(Handle { handle }))
                .await
        }
        Err(error) => Err(error),
    };
    match flushed {
        Ok(_) => Ok(true),
        Err(GuestAgentError::Agent(AgentCallError::Refused { .. })) => {
            clear_stream_error(agent, handle).await?;
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// A failed flush leaves the agent's FILE in the error state, and its
/// guest-file-write then fails forever; guest-file-seek is the one command
/// that clears it without reading (on a FIFO the seek itself fails with
/// ESPIPE, which is expected).
async fn clear_stream_error(agent: &GuestAgent, handle: i64) -> Result<(), GuestAgentError> {
    let seek = agent
        .call::<_, serde_json::Value>(
            "guest-file-seek",
            Some(protocol::FileSeek {
                handle,
                offset: 0,
                whence: protocol::SEEK_CUR,
            }),
        )
        .await;
    match seek {
        Ok(_) | Err(GuestAgentError::Agent(AgentCallError::Refused { .. })) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Follows one output stream through its segment files.
struct SegmentReader {
    name: &'static str,
    segment: u64,
    handle: Option<i64>,
    /// Reads in a row that found nothing new. The next segment is only
    /// looked for on some of them: each look is an agent round trip, and an
    /// idle stream (often stderr) would otherwise pay it on every tick.
    idle_reads: u32,
}

impl SegmentReader {
    fn new(name: &'static str) -> Self {
        SegmentReader {
            name,
            segment: 0,
            handle: None,
            idle_reads: 0,
        }
    }

    fn path(&self, dir: &str, segment: u64) -> String {
        format!("{dir}/{}.{segment}", self.name)
    }

    /// Whatever is new. Moves to the next segment once it exists (the relay
    /// has then finished this one), emptying the finished one so the relay
    /// may go on.
    async fn poll(
        &mut self,
        agent: &GuestAgent,
        dir: &str,
        always_probe: bool,
    ) -> Result<Vec<u8>, GuestAgentError> {
        let handle = match self.handle {
            Some(handle) => handle,
            None => match open(agent, &self.path(dir, self.segment), "r").await {
                Ok(handle) => {
                    self.handle = Some(handle);
                    handle
                }
                Err(GuestAgentError::Agent(AgentCallError::Refused { .. })) => {
                    return Ok(Vec::new())
                }
                Err(error) => return Err(error),
            },
        };
        let data = read(agent, handle).await?;
        if !data.is_empty() {
            self.idle_reads = 0;
            return Ok(data);
        }
        self.idle_reads = self.idle_reads.saturating_add(1);
        if !always_probe && self.idle_reads != 2 && !self.idle_reads.is_multiple_of(8) {
            return Ok(Vec::new());
        }
        let next = match open(agent, &self.path(dir, self.segment + 1), "r").await {
            Ok(next) => next,
            Err(GuestAgentError::Agent(AgentCallError::Refused { .. })) => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        // The relay is done with this segment: take its tail, then empty it.
        let mut tail = Vec::new();
        loop {
            let more = read(agent, handle).await?;
            if more.is_empty() {
                break;
            }
            tail.extend_from_slice(&more);
        }
        close(agent, handle).await?;
        let emptied = open(agent, &self.path(dir, self.segment), "w").await?;
        close(agent, emptied).await?;
        self.segment += 1;
        self.idle_reads = 0;
        self.handle = Some(next);
        tail.extend(read(agent, next).await?);
        Ok(tail)
    }

    /// Reads to the true end once the relay has exited.
    async fn drain(&mut self, agent: &GuestAgent, dir: &str) -> Result<Vec<u8>, GuestAgentError> {
        let mut all = Vec::new();
        loop {
            let segment = self.segment;
            let data = self.poll(agent, dir, true).await?;
            if data.is_empty() && segment == self.segment {
                return Ok(all);
            }
            all.extend(data);
        }
    }
}

struct Pump {
    agent: GuestAgent,
    dir: String,
    runner_pid: i64,
    stdin_handle: Option<i64>,
    ctl_handle: Option<i64>,
    pending_stdin: Vec<u8>,
    stdin_closing: bool,
    /// The runner holds stdin's read end (its `pid` file exists).
    stdin_held: bool,
    /// The agent has reported the runner's exit (and forgotten its pid).
    runner_reaped: bool,
    resizes: Vec<TerminalSize>,
    stdout: SegmentReader,
    stderr: SegmentReader,
    input: mpsc::Receiver<SessionInput>,
    input_open: bool,
    events: mpsc::Sender<SessionEvent>,
}

enum Outcome {
    Exited(i64),
    ClientGone,
}

impl Pump {
    async fn run(mut self) {
        let outcome = self.pump().await;
        match outcome {
            Ok(Outcome::Exited(exit_code)) => {
                let _ = self.events.send(SessionEvent::Exited { exit_code }).await;
            }
            Ok(Outcome::ClientGone) => {
                tracing::debug!(domain = %self.agent.domain(), dir = %self.dir, "exec session client went away; killing the command");
            }
            Err(error) => {
                tracing::warn!(domain = %self.agent.domain(), dir = %self.dir, error = %error, "exec session failed");
                let _ = self.events.send(SessionEvent::Failed(error)).await;
            }
        }
        for handle in [self.stdin_handle.take(), self.ctl_handle.take()]
            .into_iter()
            .flatten()
            .chain(self.stdout.handle.take())
            .chain(self.stderr.handle.take())
        {
            let _ = close(&self.agent, handle).await;
        }
        cleanup(&self.agent, &self.dir).await;
        // Collect the runner's status so the agent forgets it.
        if !self.runner_reaped {
            let _ = self
                .agent
                .wait_exited(self.runner_pid, Duration::from_secs(5))
                .await;
        }
    }

    async fn pump(&mut self) -> Result<Outcome, GuestAgentError> {
        let mut delay = MIN_POLL;
        let mut idle_ticks: u32 = 0;
        loop {
            if self.events.is_closed() {
                return Ok(Outcome::ClientGone);
            }
            let mut active = self.take_input()?;
            active |= self.flush_input().await?;

            let out = self.stdout.poll(&self.agent, &self.dir, false).await?;
            let err = self.stderr.poll(&self.agent, &self.dir, false).await?;
            active |= !out.is_empty() || !err.is_empty();
            if !self.emit(out, err).await {
                return Ok(Outcome::ClientGone);
            }

            if !active {
                idle_ticks = idle_ticks.wrapping_add(1);
                let mut exit_code = self.exit_code().await?;
                if exit_code.is_none() && idle_ticks.is_multiple_of(RUNNER_CHECK_EVERY) {
                    // A runner killed in the guest never writes `exit`.
                    if let Some(status) = self.runner_gone().await? {
                        exit_code = self.exit_code().await?;
                        if exit_code.is_none() {
                            return Err(status);
                        }
                    }
                }
                if let Some(exit_code) = exit_code {
                    let out = self.stdout.drain(&self.agent, &self.dir).await?;
                    let err = self.stderr.drain(&self.agent, &self.dir).await?;
                    if !self.emit(out, err).await {
                        return Ok(Outcome::ClientGone);
                    }
                    return Ok(Outcome::Exited(exit_code));
                }
            }

            delay = if active {
                MIN_POLL
            } else {
                (delay * 2).min(MAX_POLL)
            };
            // Wake early for input: an interactive keystroke should not wait
            // out an idle back-off.
            if self.input_open && self.pending_stdin.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    message = self.input.recv() => {
                        self.accept(message);
                        delay = MIN_POLL;
                    }
                }
            } else {
                tokio::time::sleep(delay).await;
            }
        }
    }

    fn accept(&mut self, message: Option<SessionInput>) {
        match message {
            Some(SessionInput::Stdin(bytes)) => self.pending_stdin.extend(bytes),
            Some(SessionInput::CloseStdin) => self.stdin_closing = true,
            Some(SessionInput::Resize(size)) => self.pending_resize(size),
            None => {
                self.input_open = false;
                self.stdin_closing = true;
            }
        }
    }

    fn pending_resize(&mut self, size: TerminalSize) {
        // Resizes travel after the stdin queued before them; "ROWS COLS\n"
        // lines are tiny and go on the ctl FIFO in `flush_input`.
        self.resizes.push(size);
    }

    /// Takes what the client sent since the last tick.
    fn take_input(&mut self) -> Result<bool, GuestAgentError> {
        let mut any = false;
        while self.input_open {
            match self.input.try_recv() {
                Ok(message) => {
                    self.accept(Some(message));
                    any = true;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.accept(None),
            }
        }
        Ok(any)
    }

    /// Writes pending stdin and resizes; closes stdin when asked and drained.
    async fn flush_input(&mut self) -> Result<bool, GuestAgentError> {
        let mut wrote = false;
        for size in std::mem::take(&mut self.resizes) {
            if let Some(ctl) = self.ctl_handle {
                let line = format!("{} {}\n", size.rows.max(1), size.cols.max(1));
                while !write_chunk(&self.agent, ctl, line.as_bytes()).await? {
                    tokio::time::sleep(MIN_POLL).await;
                }
                wrote = true;
            }
        }
        while let Some(handle) = self.stdin_handle {
            if self.pending_stdin.is_empty() {
                if self.stdin_closing && self.runner_holds_stdin().await? {
                    self.stdin_handle = None;
                    close(&self.agent, handle).await?;
                    wrote = true;
                }
                break;
            }
            let len = self.pending_stdin.len().min(STDIN_CHUNK);
            if !write_chunk(&self.agent, handle, &self.pending_stdin[..len]).await? {
                break; // pipe full: the command is not reading; next tick
            }
            self.pending_stdin.drain(..len);
            wrote = true;
        }
        if self.stdin_handle.is_none() {
            self.pending_stdin.clear();
        }
        Ok(wrote)
    }

    /// Whether the runner has opened stdin's read end, after which closing
    /// ours is a clean EOF for the command (see [`shell::SESSION_RUNNER`];
    /// before that, the close would leave the command blocked opening it).
    async fn runner_holds_stdin(&mut self) -> Result<bool, GuestAgentError> {
        if self.stdin_held {
            return Ok(true);
        }
        match open(&self.agent, &format!("{}/pid", self.dir), "r").await {
            Ok(handle) => {
                close(&self.agent, handle).await?;
                self.stdin_held = true;
                Ok(true)
            }
            Err(GuestAgentError::Agent(AgentCallError::Refused { .. })) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn emit(&self, out: Vec<u8>, err: Vec<u8>) -> bool {
        for event in [
            (!out.is_empty()).then_some(SessionEvent::Stdout(out)),
            (!err.is_empty()).then_some(SessionEvent::Stderr(err)),
        ]
        .into_iter()
        .flatten()
        {
            if self.events.send(event).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The runner's failure if it has exited (normally it writes `exit`
    /// first).
    async fn runner_gone(&mut self) -> Result<Option<GuestAgentError>, GuestAgentError> {
        let status: protocol::GuestExecStatus = self
            .agent
            .call(
                "guest-exec-status",
                Some(protocol::Pid {
                    pid: self.runner_pid,
                }),
            )
            .await?;
        if !status.exited {
            return Ok(None);
        }
        // The agent has now forgotten the pid: asking again could reach
        // another process that was given the same pid.
        self.runner_reaped = true;
        let how = match (status.exitcode, status.signal) {
            (_, Some(signal)) => format!("signal {signal}"),
            (Some(code), None) => format!("exit {code}"),
            (None, None) => "no status".to_string(),
        };
        Ok(Some(GuestAgentError::RunnerDied { how }))
    }

    /// The command's exit code once the runner has written it.
    async fn exit_code(&self) -> Result<Option<i64>, GuestAgentError> {
        let handle = match open(&self.agent, &format!("{}/exit", self.dir), "r").await {
            Ok(handle) => handle,
            Err(GuestAgentError::Agent(AgentCallError::Refused { .. })) => return Ok(None),
            Err(error) => return Err(error),
        };
        let text = read(&self.agent, handle).await;
        close(&self.agent, handle).await?;
        let text = text?;
        let text = String::from_utf8_lossy(&text);
        text.trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| GuestAgentError::Protocol {
                command: "guest-file-read".into(),
                detail: format!("exit status file holds {text:?}"),
            })
    }
}

/// Kills what is left of a session and removes its dir; best effort.
async fn cleanup(agent: &GuestAgent, dir: &str) {
    let args = vec![
        "-c".to_string(),
        shell::SESSION_CLEANUP.to_string(),
        "ndv-cleanup".to_string(),
        dir.to_string(),
    ];
    match agent.spawn("/bin/sh", &args, false).await {
        Ok(pid) => {
            if let Err(error) = agent.wait_exited(pid, Duration::from_secs(10)).await {
                tracing::debug!(dir, error = %error, "exec session cleanup did not report back");
            }
        }
        Err(error) => {
            tracing::warn!(domain = %agent.domain(), dir, error = %error, "cannot clean up an exec session in the guest");
        }
    }
}
