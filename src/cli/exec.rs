//! `nomad-driver-virt exec` and `signal`: reach a task of a running `run`
//! from another terminal, through that run's control socket (see
//! [`super::control`]). The run calls the plugin's own ExecTaskStreaming and
//! SignalTask, so these behave exactly as `nomad alloc exec` / `signal`.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::mpsc;

use super::control::{self, Frame, Reply, Request, Size};

/// Runs a command in a task's VM (through the QEMU guest agent).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ExecArgs {
    /// Forward this terminal's stdin to the command (without it the command
    /// reads an empty stdin).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the command in a terminal; with -i this terminal goes raw and its
    /// size follows resizes.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The task's name in the job file `run` runs.
    #[arg(value_name = "TASK")]
    pub task: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Sends a signal to a task: runs its `signal_commands` entry in the guest
/// (SIGTERM/SIGINT without one shut the guest down, SIGKILL powers it off).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SignalArgs {
    /// The task's name in the job file `run` runs.
    #[arg(value_name = "TASK")]
    pub task: String,
    /// The signal, e.g. SIGHUP (or HUP).
    #[arg(value_name = "SIGNAL")]
    pub signal: String,
}

/// How long a signal may take: its command runs up to 60 s in the guest.
const SIGNAL_WAIT: Duration = Duration::from_secs(90);

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            None
        }
    }
}

/// The `exec` command: the guest command's exit code; 1 on our own errors.
pub fn exec_command(args: ExecArgs) -> i32 {
    let Some(runtime) = runtime() else { return 1 };
    let code = match runtime.block_on(exec(args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("exec: {error:#}");
            1
        }
    };
    // The stdin reader may be blocked in read(2): do not wait for it.
    runtime.shutdown_background();
    code
}

/// The `signal` command: 0 once the driver handled it, 1 on errors.
pub fn signal_command(args: SignalArgs) -> i32 {
    let Some(runtime) = runtime() else { return 1 };
    let code = match runtime.block_on(signal(args)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("signal: {error:#}");
            1
        }
    };
    runtime.shutdown_background();
    code
}

async fn signal(args: SignalArgs) -> anyhow::Result<()> {
    let mut stream = control::connect_to_task(&args.task).await?;
    let request = Request::Signal {
        task: args.task.clone(),
        signal: args.signal,
    };
    match control::ask(&mut stream, request, SIGNAL_WAIT)
        .await
        .context("the run process did not answer")?
    {
        Reply::Done => Ok(()),
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// The local terminal's size (24x80 if it has none).
fn window_size() -> Size {
    let size = rustix::termios::tcgetwinsize(std::io::stdin())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdout()));
    match size {
        Ok(size) if size.ws_row > 0 && size.ws_col > 0 => Size {
            rows: size.ws_row,
            cols: size.ws_col,
        },
        _ => Size { rows: 24, cols: 80 },
    }
}

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("cannot read the terminal mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

async fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let tty = if args.tty {
        if args.interactive && !rustix::termios::isatty(std::io::stdin()) {
            bail!(
                "-t with -i needs a terminal on stdin; leave out -t when stdin is a pipe or file"
            );
        }
        Some(window_size())
    } else {
        None
    };
    let stream = control::connect_to_task(&args.task).await?;
    let (mut reader, mut writer) = stream.into_split();
    control::write_frame(
        &mut writer,
        &Frame::Request(Request::Exec {
            task: args.task.clone(),
            argv: args.command.clone(),
            tty,
        }),
    )
    .await
    .context("the run process hung up")?;

    // One writer; `frames` lives until we return, so the socket is not
    // half-closed early (the run would take that for us going away).
    let (frames, mut outgoing) = mpsc::channel::<Frame>(16);
    tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if control::write_frame(&mut writer, &frame).await.is_err() {
                return;
            }
        }
    });
    let _raw = if tty.is_some() && args.interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    if args.interactive {
        let frames = frames.clone();
        // A plain thread: a blocking read(2) must not hold up the exit.
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => {
                        let _ = frames.blocking_send(Frame::CloseStdin);
                        return;
                    }
                    Ok(read) => {
                        if frames
                            .blocking_send(Frame::Stdin(buffer[..read].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    } else if tty.is_none() {
        let _ = frames.send(Frame::CloseStdin).await;
    }
    if tty.is_some() {
        use tokio::signal::unix::{signal, SignalKind};
        let mut resized = signal(SignalKind::window_change()).context("cannot watch SIGWINCH")?;
        let frames = frames.clone();
        tokio::spawn(async move {
            while resized.recv().await.is_some() {
                if frames.send(Frame::Resize(window_size())).await.is_err() {
                    return;
                }
            }
        });
    }
    loop {
        match control::read_frame(&mut reader).await {
            Ok(Some(Frame::Stdout(data))) => {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&data);
                let _ = stdout.flush();
            }
            Ok(Some(Frame::Stderr(data))) => {
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(&data);
                let _ = stderr.flush();
            }
            Ok(Some(Frame::Reply(Reply::Exited { code }))) => return Ok(code),
            Ok(Some(Frame::Reply(Reply::Error { message }))) => bail!("{message}"),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the run process hung up before the command exited"),
            Err(error) => bail!("reading from the run process: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Probe {
        #[command(flatten)]
        exec: ExecArgs,
    }

    #[test]
    fn exec_takes_its_command_after_the_double_dash() {
        let parsed =
            Probe::try_parse_from(["x", "-i", "-t", "web", "--", "/bin/sh", "-c", "ls -l"])
                .expect("parses");
        assert_eq!(
            parsed.exec,
            ExecArgs {
                interactive: true,
                tty: true,
                task: "web".into(),
                command: vec!["/bin/sh".into(), "-c".into(), "ls -l".into()],
            }
        );
        assert!(
            Probe::try_parse_from(["x", "web"]).is_err(),
            "a command is required"
        );
        assert!(
            Probe::try_parse_from(["x", "web", "ls"]).is_err(),
            "the command comes after --"
        );
    }
}
