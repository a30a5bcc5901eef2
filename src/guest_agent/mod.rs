//! Exec into a VM, and its guest-side facts, through the QEMU guest agent.
//! Independent of Nomad's types: the driver maps ExecTask, ExecTaskStreaming
//! and SignalTask onto [`GuestAgent::exec`] and [`GuestAgent::start_session`].
//!
//! - [`protocol`]: the agent's JSON commands (pure serde types).
//! - [`shell`]: quoting and the scripts run inside the guest.
//! - [`session`]: the streaming exec session.
//!
//! Every agent call goes through `crate::libvirt::agent` on the shared
//! libvirt connection, with a per-call timeout (libvirt serialises agent
//! commands per domain, so one stuck call holds up the next).

pub mod protocol;
pub mod session;
pub mod shell;

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::libvirt::agent::{self, AgentCallError, GuestInterface};
use crate::libvirt::{Libvirt, LibvirtError};

pub use session::{ExecSession, SessionEvent, SessionInput, SessionRequest, TerminalSize};

/// Default bound on one agent round trip.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on each of stdout and stderr of [`GuestAgent::exec`].
pub const DEFAULT_OUTPUT_LIMIT: usize = 1 << 20;
/// How long past the in-guest deadline the host keeps waiting for the exec
/// wrapper to report (killing and cleaning up in a slow guest).
const EXEC_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    #[error("libvirt connection failed")]
    Libvirt(#[source] LibvirtError),
    #[error("the guest agent answered {command} with something unexpected: {detail}")]
    Protocol { command: String, detail: String },
    #[error("exec needs a command: argv is empty")]
    EmptyArgv,
    #[error("argv[{index}] contains a NUL byte, which no guest process can receive")]
    NulInArgv { index: usize },
    #[error("the exec wrapper failed in the guest (exit {exit_code}): {stderr}; the image needs /bin/sh with mkfifo, mktemp, setsid, head, dd and kill (busybox or coreutils/util-linux){tty_hint}")]
    WrapperFailed {
        exit_code: i64,
        stderr: String,
        tty_hint: &'static str,
    },
    #[error("the exec session's runner in the guest ended ({how}) without reporting the command's exit; something in the guest killed it (the out-of-memory killer?)")]
    RunnerDied { how: String },
    #[error("{what} did not finish within {limit:?}")]
    Deadline { what: String, limit: Duration },
    #[error("the exec session has ended")]
    SessionClosed,
}

/// What [`GuestAgent::exec`] runs.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Enforced inside the guest: the command's process group is killed then.
    pub timeout: Duration,
    /// Cap on each of stdout and stderr; the rest is discarded.
    pub output_limit: usize,
}

impl ExecRequest {
    pub fn new(argv: Vec<String>, timeout: Duration) -> Self {
        ExecRequest {
            argv,
            timeout,
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }
}

/// The result of a finished [`GuestAgent::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// As a shell reports it: 128+N when killed by signal N, 126/127 when the
    /// command cannot be run.
    pub exit_code: i64,
    /// The timeout expired and the command was killed.
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// The guest agent of one domain.
#[derive(Clone)]
pub struct GuestAgent {
    libvirt: Libvirt,
    domain: String,
    call_timeout: Duration,
}

impl GuestAgent {
    pub fn new(libvirt: Libvirt, domain: impl Into<String>) -> Self {
        GuestAgent {
            libvirt,
            domain: domain.into(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// Bound on each agent round trip (default [`DEFAULT_CALL_TIMEOUT`]).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Runs one agent command and decodes its `return` value.
    pub(crate) async fn call<A, R>(
        &self,
        execute: &'static str,
        arguments: Option<A>,
    ) -> Result<R, GuestAgentError>
    where
        A: Serialize,
        R: DeserializeOwned,
    {
        let json =
            serde_json::to_string(&protocol::Request { execute, arguments }).map_err(|error| {
                GuestAgentError::Protocol {
                    command: execute.to_string(),
                    detail: error.to_string(),
                }
            })?;
        let domain = self.domain.clone();
        let timeout = self.call_timeout;
        let reply = self
            .libvirt
            .call(move |conn| Ok(agent::agent_command(conn, &domain, &json, timeout)))
            .await
            .map_err(GuestAgentError::Libvirt)??;
        serde_json::from_str::<protocol::Response<R>>(&reply)
            .map(|response| response.value)
            .map_err(|error| GuestAgentError::Protocol {
                command: execute.to_string(),
                detail: format!("{error} in {}", truncate_for_message(&reply)),
            })
    }

    /// The cheapest liveness check.
    pub async fn ping(&self) -> Result<(), GuestAgentError> {
        self.call::<protocol::Empty, protocol::Empty>("guest-ping", None)
            .await
            .map(|_| ())
    }

    /// Whether the agent has opened its port (live XML; no agent round trip).
    pub async fn connected(&self) -> Result<bool, GuestAgentError> {
        let domain = self.domain.clone();
        self.libvirt
            .call(move |conn| Ok(agent::agent_connected(conn, &domain)))
            .await
            .map_err(GuestAgentError::Libvirt)?
            .map_err(GuestAgentError::from)
    }

    /// Pings until the agent answers, for at most `limit`. Errors other than
    /// "not connected yet" / "slow" end the wait at once.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), GuestAgentError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.ping().await {
                Ok(()) => return Ok(()),
                Err(GuestAgentError::Agent(error)) if error.is_transient() => {
                    if start.elapsed() + delay > limit {
                        return Err(GuestAgentError::Agent(error));
                    }
                }
                Err(error) => return Err(error),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Powers the guest off through the agent (`guest-shutdown`); judge
    /// success by the domain's state, as the agent does not reply.
    pub async fn shutdown(&self) -> Result<(), GuestAgentError> {
        let domain = self.domain.clone();
        self.libvirt
            .call(move |conn| Ok(agent::shutdown_with_agent(conn, &domain)))
            .await
            .map_err(GuestAgentError::Libvirt)?
            .map_err(GuestAgentError::from)
    }

    /// The guest's interfaces and addresses as its agent sees them.
    pub async fn interface_addresses(&self) -> Result<Vec<GuestInterface>, GuestAgentError> {
        let domain = self.domain.clone();
        self.libvirt
            .call(move |conn| Ok(agent::agent_interface_addresses(conn, &domain)))
            .await
            .map_err(GuestAgentError::Libvirt)?
            .map_err(GuestAgentError::from)
    }

    /// Starts `/bin/sh -c script name args...` (or `path args...`) in the
    /// guest and returns its agent pid.
    pub(crate) async fn spawn(
        &self,
        path: &str,
        args: &[String],
        capture_output: bool,
    ) -> Result<i64, GuestAgentError> {
        let reply: protocol::GuestExecPid = self
            .call(
                "guest-exec",
                Some(protocol::GuestExec {
                    path,
                    arg: args,
                    capture_output,
                }),
            )
            .await?;
        Ok(reply.pid)
    }

    /// Polls `guest-exec-status` until the process exits or `limit` passes,
    /// starting fast (short commands answer in milliseconds) and backing off.
    pub(crate) async fn wait_exited(
        &self,
        pid: i64,
        limit: Duration,
    ) -> Result<protocol::GuestExecStatus, GuestAgentError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            let status: protocol::GuestExecStatus = self
                .call("guest-exec-status", Some(protocol::Pid { pid }))
                .await?;
            if status.exited {
                return Ok(status);
            }
            if start.elapsed() > limit {
                return Err(GuestAgentError::Deadline {
                    what: format!("guest process {pid}"),
                    limit,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// Runs `argv` in the guest and returns its output and exit code. The
    /// timeout is enforced inside the guest (the command's whole process
    /// group is killed at the deadline), and each output is capped.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, GuestAgentError> {
        check_argv(&request.argv)?;
        let seconds = request
            .timeout
            .as_secs()
            .saturating_add(u64::from(request.timeout.subsec_nanos() > 0));
        let seconds = seconds.max(1);
        let mut args = vec![
            "-c".to_string(),
            shell::EXEC_WRAPPER.to_string(),
            "ndv-exec".to_string(),
            seconds.to_string(),
            request.output_limit.to_string(),
        ];
        args.extend(request.argv.iter().cloned());
        let pid = self.spawn("/bin/sh", &args, true).await?;
        let status = self
            .wait_exited(pid, Duration::from_secs(seconds) + EXEC_GRACE)
            .await?;
        let stdout = protocol::decode(status.out_data.as_deref()).map_err(|error| {
            GuestAgentError::Protocol {
                command: "guest-exec-status".into(),
                detail: format!("out-data: {error}"),
            }
        })?;
        let stderr = protocol::decode(status.err_data.as_deref()).map_err(|error| {
            GuestAgentError::Protocol {
                command: "guest-exec-status".into(),
                detail: format!("err-data: {error}"),
            }
        })?;
        parse_exec_output(
            stdout,
            stderr,
            status.exitcode.unwrap_or(-1),
            request.output_limit,
        )
    }

    /// Starts a streaming exec session (see [`session`]).
    pub async fn start_session(
        &self,
        request: SessionRequest,
    ) -> Result<ExecSession, GuestAgentError> {
        session::start(self.clone(), request).await
    }
}

pub(crate) fn check_argv(argv: &[String]) -> Result<(), GuestAgentError> {
    if argv.is_empty() {
        return Err(GuestAgentError::EmptyArgv);
    }
    if let Some(index) = argv.iter().position(|word| word.contains('\0')) {
        return Err(GuestAgentError::NulInArgv { index });
    }
    Ok(())
}

/// Splits the wrapper's end marker off stdout and applies the caps.
fn parse_exec_output(
    mut stdout: Vec<u8>,
    mut stderr: Vec<u8>,
    wrapper_exit: i64,
    limit: usize,
) -> Result<ExecOutput, GuestAgentError> {
    let mark = shell::EXEC_END_MARK;
    let found = stdout
        .windows(mark.len())
        .rposition(|window| window == mark);
    let Some(at) = found else {
        return Err(GuestAgentError::WrapperFailed {
            exit_code: wrapper_exit,
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
            tty_hint: "",
        });
    };
    let trailer = String::from_utf8_lossy(&stdout[at + mark.len()..]).to_string();
    let mut fields = trailer.split_whitespace();
    let exit_code = fields.next().and_then(|f| f.parse::<i64>().ok());
    let timed_out = fields.next() == Some("1");
    let Some(exit_code) = exit_code else {
        return Err(GuestAgentError::Protocol {
            command: "guest-exec".into(),
            detail: format!("bad exec end marker {trailer:?}"),
        });
    };
    stdout.truncate(at);
    let stdout_truncated = stdout.len() > limit;
    stdout.truncate(limit);
    let stderr_truncated = stderr.len() > limit;
    stderr.truncate(limit);
    Ok(ExecOutput {
        stdout,
        stderr,
        exit_code,
        timed_out,
        stdout_truncated,
        stderr_truncated,
    })
}

fn truncate_for_message(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_is_split_from_the_end_marker() {
        let out = b"hello\nNDV-EXEC-END 3 0\n".to_vec();
        let parsed = parse_exec_output(out, b"oops".to_vec(), 0, 100).unwrap();
        assert_eq!(parsed.stdout, b"hello");
        assert_eq!(parsed.stderr, b"oops");
        assert_eq!(parsed.exit_code, 3);
        assert!(!parsed.timed_out);

        // Output that itself contains the marker: the last one is ours.
        let out = b"\nNDV-EXEC-END 0 0\nx\nNDV-EXEC-END 137 1\n".to_vec();
        let parsed = parse_exec_output(out, vec![], 0, 100).unwrap();
        assert_eq!(parsed.stdout, b"\nNDV-EXEC-END 0 0\nx");
        assert_eq!(parsed.exit_code, 137);
        assert!(parsed.timed_out);
    }

    #[test]
    fn exec_output_reports_truncation_from_the_extra_byte() {
        let out = b"12345\nNDV-EXEC-END 0 0\n".to_vec();
        let parsed = parse_exec_output(out, b"abcd".to_vec(), 0, 4).unwrap();
        assert_eq!(parsed.stdout, b"1234");
        assert!(parsed.stdout_truncated);
        assert_eq!(parsed.stderr, b"abcd");
        assert!(!parsed.stderr_truncated);
    }

    #[test]
    fn a_missing_marker_is_a_wrapper_failure() {
        let error = parse_exec_output(vec![], b"mkfifo: not found".to_vec(), 97, 10).unwrap_err();
        assert!(error.to_string().contains("mkfifo: not found"), "{error}");
    }

    #[test]
    fn argv_is_checked() {
        assert!(matches!(check_argv(&[]), Err(GuestAgentError::EmptyArgv)));
        assert!(matches!(
            check_argv(&["a".into(), "b\0".into()]),
            Err(GuestAgentError::NulInArgv { index: 1 })
        ));
    }

    /// The exec wrapper itself, run on the host's /bin/sh: exit code, stderr,
    /// truncation, and the in-guest timeout killing the process group.
    #[test]
    fn exec_wrapper_runs_on_a_posix_shell() {
        let run = |timeout: &str, limit: &str, argv: &[&str]| {
            let output = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(shell::EXEC_WRAPPER)
                .arg("ndv-exec")
                .arg(timeout)
                .arg(limit)
                .args(argv)
                .output()
                .expect("run /bin/sh");
            parse_exec_output(
                output.stdout,
                output.stderr,
                i64::from(output.status.code().unwrap_or(-1)),
                limit.parse().unwrap(),
            )
            .unwrap()
        };
        let out = run("5", "100", &["sh", "-c", "echo out; echo err >&2; exit 3"]);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.exit_code, 3);
        assert!(!out.timed_out);

        let out = run("5", "3", &["sh", "-c", "echo 123456"]);
        assert_eq!(out.stdout, b"123");
        assert!(out.stdout_truncated);

        let start = Instant::now();
        let out = run("1", "100", &["sh", "-c", "sleep 30 & sleep 30; echo never"]);
        assert!(out.timed_out, "{out:?}");
        assert_eq!(out.exit_code, 137);
        assert!(start.elapsed() < Duration::from_secs(10));

        let out = run("5", "100", &["/nonexistent/cmd"]);
        assert!(
            out.exit_code == 126 || out.exit_code == 127 || out.exit_code == 1,
            "{out:?}"
        );
    }
}
