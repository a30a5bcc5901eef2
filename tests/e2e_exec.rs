//! End to end through the plugin's real wire interface: ExecTask,
//! ExecTaskStreaming and SignalTask into a task's VM through the QEMU guest
//! agent, a task without the agent failing fast, and a graceful stop through
//! the agent in a guest that ignores ACPI. One guest is booted and shared by
//! the checks (TCG boots are slow).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::nomad_client::PluginClient;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::exec_task_streaming_request::{
    Setup, TerminalSize,
};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, ExecTaskRequest, ExecTaskResponse, ExecTaskStreamingIoOperation,
    ExecTaskStreamingRequest, ExecTaskStreamingResponse, SignalTaskRequest, StopTaskRequest,
    WaitTaskRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// Removes the test's domains if a check panics before DestroyTask.
struct DomainGuard(Vec<String>);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        for domain in &self.0 {
            for action in ["destroy", "undefine"] {
                let _ = std::process::Command::new("virsh")
                    .args(["-q", "-c", "qemu:///system", action, domain])
                    .output();
            }
        }
    }
}

fn config(guest_agent: bool) -> String {
    format!(
        r#"
guest_agent = {guest_agent}
signal_commands = {{
  SIGHUP  = "touch /run/hup"
  SIGUSR2 = "echo no-reload >&2; exit 4"
}}
disk {{
  chained = true
  source {{
    image = "guest.qcow2"
  }}
}}
"#
    )
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

async fn exec(
    plugin: &PluginClient,
    task_id: &str,
    command: &[&str],
    timeout: Duration,
) -> Result<ExecTaskResponse, tonic::Status> {
    plugin
        .driver()
        .exec_task(ExecTaskRequest {
            task_id: task_id.to_string(),
            command: words(command),
            timeout: prost_types::Duration::try_from(timeout).ok(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A streaming exec: the request sender and the answers.
/// `first` follows the setup at once, as Nomad's client sends the terminal
/// size (a tonic client's call waits for the answer's headers, which come
/// once the session runs).
async fn stream(
    plugin: &PluginClient,
    setup: Setup,
    first: Option<ExecTaskStreamingRequest>,
) -> (
    mpsc::Sender<ExecTaskStreamingRequest>,
    tonic::Streaming<ExecTaskStreamingResponse>,
) {
    let (sender, receiver) = mpsc::channel(16);
    sender
        .send(ExecTaskStreamingRequest {
            setup: Some(setup),
            ..Default::default()
        })
        .await
        .expect("send setup");
    if let Some(first) = first {
        sender.send(first).await.expect("send first");
    }
    let answers = plugin
        .driver()
        .exec_task_streaming(ReceiverStream::new(receiver))
        .await
        .expect("ExecTaskStreaming")
        .into_inner();
    (sender, answers)
}

fn stdin(data: &[u8], close: bool) -> ExecTaskStreamingRequest {
    ExecTaskStreamingRequest {
        stdin: Some(ExecTaskStreamingIoOperation {
            data: data.to_vec(),
            close,
        }),
        ..Default::default()
    }
}

fn tty_size(height: i32, width: i32) -> ExecTaskStreamingRequest {
    ExecTaskStreamingRequest {
        tty_size: Some(TerminalSize { height, width }),
        ..Default::default()
    }
}

/// Reads answers until stdout contains `needle` (or, with `None`, until
/// the exit); returns stdout, stderr and the exit code if it came.
async fn read_answers(
    answers: &mut tonic::Streaming<ExecTaskStreamingResponse>,
    needle: Option<&str>,
    limit: Duration,
) -> (String, String, Option<i32>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + limit;
    loop {
        if let Some(needle) = needle {
            if String::from_utf8_lossy(&out).contains(needle) {
                return (
                    String::from_utf8_lossy(&out).into(),
                    String::from_utf8_lossy(&err).into(),
                    None,
                );
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::time::timeout(left, answers.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {needle:?} / exit within {limit:?}; stdout {:?} stderr {:?}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                )
            })
            .expect("stream ok")
            .expect("the stream ends only after the exit");
        if let Some(io) = answer.stdout {
            out.extend(io.data);
        }
        if let Some(io) = answer.stderr {
            err.extend(io.data);
        }
        if answer.exited {
            let code = answer.result.map(|r| r.exit_code);
            return (
                String::from_utf8_lossy(&out).into(),
                String::from_utf8_lossy(&err).into(),
                code,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_and_signals_through_the_guest_agent() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let alloc = Alloc::new("agent");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    let with_agent = alloc.task_config(
        plugin
            .encode_task_config(&config(true), &HashMap::new())
            .await
            .expect("encode"),
        192,
    );
    let without_agent = alloc.task_config(
        plugin
            .encode_task_config(&config(false), &HashMap::new())
            .await
            .expect("encode"),
        128,
    );
    // Its own task dir: the console log is per task.
    let mut without_agent = without_agent;
    without_agent.name = "noagent".into();
    without_agent.stdout_path = String::new();
    let noagent_dir = alloc.alloc_dir().join("noagent");
    for dir in [
        noagent_dir.clone(),
        noagent_dir.join("local"),
        noagent_dir.join("secrets"),
    ] {
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let task_id = with_agent.id.clone();
    let no_agent_id = without_agent.id.clone();
    let _guard = DomainGuard(vec![
        vm::domain_name_of(&with_agent),
        vm::domain_name_of(&without_agent),
    ]);
    vm::start(&plugin, with_agent).await.expect("StartTask");

    // -- guest_agent = false: exec and mapped signals fail fast, saying why
    vm::start(&plugin, without_agent)
        .await
        .expect("StartTask without agent");
    let asked = Instant::now();
    let status = exec(&plugin, &no_agent_id, &["true"], Duration::from_secs(5))
        .await
        .expect_err("no agent");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("set guest_agent = true"),
        "{}",
        status.message()
    );
    let status = plugin
        .driver()
        .signal_task(SignalTaskRequest {
            task_id: no_agent_id.clone(),
            signal: "SIGHUP".into(),
        })
        .await
        .expect_err("no agent");
    assert!(
        status.message().contains("set guest_agent = true"),
        "{}",
        status.message()
    );
    assert!(asked.elapsed() < Duration::from_secs(5), "fails fast");
    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: no_agent_id.clone(),
            force: true,
        })
        .await
        .expect("destroy the agentless task");

    // -- the agent answers once the guest has booted
    let booted = Instant::now();
    loop {
        match exec(&plugin, &task_id, &["true"], Duration::from_secs(10)).await {
            Ok(answer) => {
                assert_eq!(answer.result.expect("result").exit_code, 0);
                break;
            }
            Err(status) if booted.elapsed() < BOOT_LIMIT => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("install and start qemu-guest-agent"),
                    "{}",
                    status.message()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(status) => panic!(
                "agent not ready within {BOOT_LIMIT:?}: {status:?}\n{}",
                alloc.console()
            ),
        }
    }
    eprintln!("agent answered {:?} after start", booted.elapsed());

    // -- ExecTask: stdout, stderr and exit code apart
    let answer = exec(
        &plugin,
        &task_id,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        Duration::from_secs(30),
    )
    .await
    .expect("exec");
    assert_eq!(answer.stdout, b"out\n");
    assert_eq!(answer.stderr, b"err\n");
    assert_eq!(answer.result.expect("result").exit_code, 7);
    let answer = exec(
        &plugin,
        &task_id,
        &["/no/such/cmd"],
        Duration::from_secs(30),
    )
    .await
    .expect("exec");
    assert_eq!(answer.result.expect("result").exit_code, 127);

    // -- ExecTask timeout: the command is killed in the guest
    let started = Instant::now();
    let answer = exec(
        &plugin,
        &task_id,
        &["sh", "-c", "echo $$ >/tmp/slow.pid; sleep 100"],
        Duration::from_secs(2),
    )
    .await
    .expect("exec with timeout");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_ne!(answer.result.expect("result").exit_code, 0);
    let answer = exec(
        &plugin,
        &task_id,
        &[
            "sh",
            "-c",
            "kill -0 $(cat /tmp/slow.pid) 2>/dev/null && echo ALIVE || echo GONE",
        ],
        Duration::from_secs(30),
    )
    .await
    .expect("exec");
    assert_eq!(answer.stdout, b"GONE\n", "the timed-out command is gone");

    // -- ExecTaskStreaming: stdin/stdout round trips, stderr, exit code
    let (sender, mut answers) = stream(
        &plugin,
        Setup {
            task_id: task_id.clone(),
            command: words(&[
                "sh",
                "-c",
                "while read line; do echo \"got:$line\"; done; echo bye >&2; exit 5",
            ]),
            tty: false,
        },
        None,
    )
    .await;
    for round in 0..3 {
        let line = format!("line{round}\n");
        let round_trip = Instant::now();
        sender
            .send(stdin(line.as_bytes(), false))
            .await
            .expect("stdin");
        let (out, _, _) = read_answers(
            &mut answers,
            Some(&format!("got:line{round}")),
            Duration::from_secs(30),
        )
        .await;
        eprintln!("round trip {round}: {:?} ({out:?})", round_trip.elapsed());
    }
    sender.send(stdin(b"", true)).await.expect("close stdin");
    let (_, err, code) = read_answers(&mut answers, None, Duration::from_secs(30)).await;
    assert_eq!(code, Some(5));
    assert!(err.contains("bye"), "{err:?}");
    drop(sender);

    // -- stdin closed with the setup (`nomad alloc exec ... </dev/null`):
    // the command sees EOF at once and exits, every time. The close used to
    // race the command's own open of its stdin FIFO and could leave it
    // blocked for ever.
    for round in 0..8 {
        let (sender, mut answers) = stream(
            &plugin,
            Setup {
                task_id: task_id.clone(),
                command: words(&["sh", "-c", "cat; echo eof"]),
                tty: false,
            },
            Some(stdin(b"", true)),
        )
        .await;
        let (out, _, code) = read_answers(&mut answers, None, Duration::from_secs(30)).await;
        assert_eq!((out.trim(), code), ("eof", Some(0)), "round {round}");
        drop(sender);
    }

    // -- TTY: the initial size, then a resize
    let (sender, mut answers) = stream(
        &plugin,
        Setup {
            task_id: task_id.clone(),
            command: words(&["sh", "-c", "stty size; tty; read x; stty size"]),
            tty: true,
        },
        Some(tty_size(33, 101)),
    )
    .await;
    let (out, _, _) = read_answers(&mut answers, Some("/dev/pts/"), Duration::from_secs(30)).await;
    assert!(out.contains("33 101"), "{out:?}");
    sender.send(tty_size(50, 120)).await.expect("resize");
    tokio::time::sleep(Duration::from_millis(500)).await;
    sender.send(stdin(b"\n", false)).await.expect("stdin");
    let (out, _, code) = read_answers(&mut answers, None, Duration::from_secs(30)).await;
    assert!(out.contains("50 120"), "{out:?}");
    assert_eq!(code, Some(0));
    drop(sender);

    // -- a streaming client that goes away: the command is killed
    let (sender, mut answers) = stream(
        &plugin,
        Setup {
            task_id: task_id.clone(),
            command: words(&[
                "sh",
                "-c",
                "echo $$ >/tmp/abandoned; echo started; exec sleep 1000",
            ]),
            tty: false,
        },
        None,
    )
    .await;
    read_answers(&mut answers, Some("started"), Duration::from_secs(30)).await;
    drop(answers);
    drop(sender);
    let gone = Instant::now();
    loop {
        let answer = exec(
            &plugin,
            &task_id,
            &[
                "sh",
                "-c",
                "kill -0 $(cat /tmp/abandoned) 2>/dev/null && echo ALIVE || echo GONE",
            ],
            Duration::from_secs(30),
        )
        .await
        .expect("exec");
        if answer.stdout == b"GONE\n" {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(30),
            "the abandoned command still runs"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // -- SignalTask: a mapped signal runs its command
    plugin
        .driver()
        .signal_task(SignalTaskRequest {
            task_id: task_id.clone(),
            signal: "SIGHUP".into(),
        })
        .await
        .expect("SIGHUP");
    let answer = exec(
        &plugin,
        &task_id,
        &["test", "-f", "/run/hup"],
        Duration::from_secs(30),
    )
    .await
    .expect("exec");
    assert_eq!(
        answer.result.expect("result").exit_code,
        0,
        "SIGHUP ran its command"
    );
    // A failing command is reported with its stderr.
    let status = plugin
        .driver()
        .signal_task(SignalTaskRequest {
            task_id: task_id.clone(),
            signal: "SIGUSR2".into(),
        })
        .await
        .expect_err("the command fails");
    assert!(
        status.message().contains("no-reload"),
        "{}",
        status.message()
    );
    // An unmapped signal names signal_commands.
    let status = plugin
        .driver()
        .signal_task(SignalTaskRequest {
            task_id: task_id.clone(),
            signal: "SIGUSR1".into(),
        })
        .await
        .expect_err("unmapped");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("signal_commands"),
        "{}",
        status.message()
    );

    // -- StopTask through the agent: the guest ignores ACPI from now on
    exec(
        &plugin,
        &task_id,
        &["touch", "/run/no-acpi"],
        Duration::from_secs(30),
    )
    .await
    .expect("exec");
    let stopping = Instant::now();
    plugin
        .driver()
        .stop_task(StopTaskRequest {
            task_id: task_id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            signal: String::new(),
        })
        .await
        .expect("StopTask");
    let exit = plugin
        .driver()
        .wait_task(WaitTaskRequest {
            task_id: task_id.clone(),
        })
        .await
        .expect("WaitTask")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(
        (exit.exit_code, exit.signal),
        (0, 0),
        "a clean shutdown, not a destroy, after {:?}",
        stopping.elapsed()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "{:?}",
        stopping.elapsed()
    );
    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.clone(),
            force: true,
        })
        .await
        .expect("destroy");
    plugin.kill().await.expect("plugin exits");
}
