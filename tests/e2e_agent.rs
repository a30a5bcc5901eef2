//! End to end: the QEMU guest agent of the real test guest, through a real
//! libvirtd. One guest is booted and shared by the checks (boot is most of
//! the time under TCG); the checks run in an order where none depends on an
//! earlier one's side effects except the final shutdown.
//!
//! Needs tests/setup/host.sh and tests/setup/guest.sh (an image with the
//! agent); fails with the fix otherwise.

#[path = "common/agent_vm.rs"]
mod agent_vm;
mod common;

use std::time::{Duration, Instant};

use agent_vm::AgentVm;
use nomad_driver_virt::guest_agent::{
    ExecRequest, ExecSession, GuestAgent, GuestAgentError, SessionEvent, SessionInput,
    SessionRequest, TerminalSize,
};
use nomad_driver_virt::libvirt::agent::AgentCallError;

const BOOT_LIMIT: Duration = Duration::from_secs(180);

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

async fn sh(agent: &GuestAgent, script: &str) -> String {
    let output = agent
        .exec(ExecRequest::new(
            argv(&["sh", "-c", script]),
            Duration::from_secs(30),
        ))
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    assert_eq!(output.exit_code, 0, "{script:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Collects session output until it exits or `limit` passes.
async fn collect(session: &mut ExecSession, limit: Duration) -> (Vec<u8>, Vec<u8>, i64) {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, session.next_event())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "session did not end within {limit:?}; stdout so far {:?}",
                    String::from_utf8_lossy(&stdout)
                )
            });
        match event {
            Some(SessionEvent::Stdout(bytes)) => stdout.extend(bytes),
            Some(SessionEvent::Stderr(bytes)) => stderr.extend(bytes),
            Some(SessionEvent::Exited { exit_code }) => return (stdout, stderr, exit_code),
            Some(SessionEvent::Failed(error)) => panic!("session failed: {error}"),
            None => panic!("session ended without an exit code"),
        }
    }
}

/// Reads stdout until it contains `needle`; stderr goes to `stderr`.
async fn read_until(
    session: &mut ExecSession,
    needle: &str,
    limit: Duration,
    stderr: &mut Vec<u8>,
) -> String {
    let mut seen = Vec::new();
    let deadline = Instant::now() + limit;
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, session.next_event()).await {
            Ok(Some(SessionEvent::Stdout(bytes))) => seen.extend(bytes),
            Ok(Some(SessionEvent::Stderr(bytes))) => stderr.extend(bytes),
            Ok(other) => panic!(
                "session ended early: {other:?}; stdout {:?}",
                String::from_utf8_lossy(&seen)
            ),
            Err(_) => panic!(
                "no {needle:?} within {limit:?}; stdout {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_exec_sessions_and_shutdown() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let vm = AgentVm::boot("agent", true);
    let agent = vm.agent();

    // -- ping after boot
    let boot = Instant::now();
    if let Err(error) = agent.wait_ready(BOOT_LIMIT).await {
        panic!(
            "agent not ready within {BOOT_LIMIT:?}: {error}; console:\n{}",
            vm.console()
        );
    }
    eprintln!("agent answered {:?} after start", boot.elapsed());
    assert!(
        vm.console().contains("GUEST-AGENT: started"),
        "{}",
        vm.console()
    );
    assert!(agent.connected().await.expect("channel state"));

    // -- exec: exit code, stdout and stderr apart
    let output = agent
        .exec(ExecRequest::new(
            argv(&["sh", "-c", "echo out; echo 'it'\\''s err' >&2; exit 3"]),
            Duration::from_secs(20),
        ))
        .await
        .expect("exec");
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"it's err\n");
    assert_eq!(output.exit_code, 3);
    assert!(!output.timed_out);

    // -- exec of a missing command reports the shell's 127
    let output = agent
        .exec(ExecRequest::new(
            argv(&["/no/such/cmd"]),
            Duration::from_secs(20),
        ))
        .await
        .expect("exec");
    assert_eq!(output.exit_code, 127, "{output:?}");

    // -- exec timeout kills the command and its children inside the guest
    let started = Instant::now();
    let output = agent
        .exec(ExecRequest::new(
            argv(&[
                "sh",
                "-c",
                "echo $$ >/tmp/victim; sleep 300 & echo $! >/tmp/victim-child; sleep 300",
            ]),
            Duration::from_secs(2),
        ))
        .await
        .expect("exec with timeout");
    assert!(output.timed_out, "{output:?}");
    assert_eq!(output.exit_code, 137);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let alive = sh(
        &agent,
        "for p in $(cat /tmp/victim /tmp/victim-child); do kill -0 $p 2>/dev/null && echo alive $p; done; echo checked",
    )
    .await;
    assert_eq!(alive, "checked\n", "timed-out processes survived");

    // -- output cap
    let mut capped = ExecRequest::new(
        argv(&["sh", "-c", "head -c 100000 /dev/zero"]),
        Duration::from_secs(20),
    );
    capped.output_limit = 1000;
    let output = agent.exec(capped).await.expect("exec");
    assert_eq!(output.stdout.len(), 1000);
    assert!(output.stdout_truncated);

    // -- streaming: stdin -> stdout round trips, stderr apart, exit code
    let mut session = agent
        .start_session(SessionRequest {
            argv: argv(&[
                "sh",
                "-c",
                "while read -r l; do echo \"got $l\"; echo \"e $l\" >&2; done; exit 4",
            ]),
            tty: None,
        })
        .await
        .expect("session");
    let input = session.input();
    let mut early_stderr = Vec::new();
    for i in 0..3 {
        input
            .send(SessionInput::Stdin(format!("line{i}\n").into_bytes()))
            .await
            .expect("send");
        let seen = read_until(
            &mut session,
            &format!("got line{i}\n"),
            Duration::from_secs(20),
            &mut early_stderr,
        )
        .await;
        assert_eq!(
            seen,
            format!("got line{i}\n"),
            "output arrives per line, not at exit"
        );
    }
    input.send(SessionInput::CloseStdin).await.expect("close");
    let (stdout, stderr, exit_code) = collect(&mut session, Duration::from_secs(30)).await;
    assert!(stdout.is_empty(), "{stdout:?}");
    early_stderr.extend(stderr);
    assert_eq!(early_stderr, b"e line0\ne line1\ne line2\n");
    assert_eq!(exit_code, 4);

    // -- stdin larger than the guest pipe, to a command not reading yet:
    // -- full-pipe writes are retried, nothing lost or doubled
    let mut session = agent
        .start_session(SessionRequest {
            argv: argv(&["sh", "-c", "sleep 2; md5sum"]),
            tty: None,
        })
        .await
        .expect("session");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let input = session.input();
    for chunk in payload.chunks(30_000) {
        input
            .send(SessionInput::Stdin(chunk.to_vec()))
            .await
            .expect("send");
    }
    input.send(SessionInput::CloseStdin).await.expect("close");
    let (stdout, _, exit_code) = collect(&mut session, Duration::from_secs(60)).await;
    assert_eq!(exit_code, 0);
    let expected = {
        let mut child = std::process::Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("md5sum on the host");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&payload)
            .expect("write");
        child.wait_with_output().expect("md5sum").stdout
    };
    assert_eq!(
        String::from_utf8_lossy(&stdout).split_whitespace().next(),
        String::from_utf8_lossy(&expected).split_whitespace().next(),
        "stdin arrived changed"
    );

    // -- streaming a lot of output crosses segment files intact
    let mut session = agent
        .start_session(SessionRequest {
            argv: argv(&["sh", "-c", "seq 1 200000"]),
            tty: None,
        })
        .await
        .expect("session");
    let (stdout, _, exit_code) = collect(&mut session, Duration::from_secs(120)).await;
    assert_eq!(exit_code, 0);
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(stdout.len(), expected.len());
    assert!(stdout == expected.as_bytes(), "seq output corrupted");

    // -- TTY: initial size, then a resize
    let mut session = agent
        .start_session(SessionRequest {
            argv: argv(&["sh", "-c", "stty size; tty; read x; stty size"]),
            tty: Some(TerminalSize {
                rows: 33,
                cols: 101,
            }),
        })
        .await
        .expect("tty session");
    let seen = read_until(
        &mut session,
        "/dev/pts/",
        Duration::from_secs(20),
        &mut Vec::new(),
    )
    .await;
    assert!(seen.contains("33 101"), "{seen:?}");
    let input = session.input();
    input
        .send(SessionInput::Resize(TerminalSize {
            rows: 50,
            cols: 120,
        }))
        .await
        .expect("resize");
    tokio::time::sleep(Duration::from_millis(500)).await;
    input
        .send(SessionInput::Stdin(b"\n".to_vec()))
        .await
        .expect("send");
    let (stdout, _, exit_code) = collect(&mut session, Duration::from_secs(30)).await;
    assert!(
        String::from_utf8_lossy(&stdout).contains("50 120"),
        "{stdout:?}"
    );
    assert_eq!(exit_code, 0);

    // -- a client that goes away: the command is killed, the dir removed
    let session = agent
        .start_session(SessionRequest {
            argv: argv(&["sh", "-c", "echo $$ >/tmp/abandoned; exec sleep 1000"]),
            tty: None,
        })
        .await
        .expect("session");
    let dir = session.guest_dir().to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(session);
    let start = Instant::now();
    loop {
        let state = sh(
            &agent,
            &format!("p=$(cat /tmp/abandoned); kill -0 $p 2>/dev/null && echo alive; [ -e {dir} ] && echo dir; echo end"),
        )
        .await;
        if state == "end\n" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "abandoned session left {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // -- interface addresses from the agent (the guest's DHCP may still be
    // -- in progress: it starts after the seed wait)
    let start = Instant::now();
    let interfaces = loop {
        let interfaces = agent.interface_addresses().await.expect("interfaces");
        let has_lease = interfaces.iter().any(|i| {
            i.name == "eth0"
                && i.addresses
                    .iter()
                    .any(|a| a.address.to_string().starts_with("192.168.122."))
        });
        if has_lease {
            break interfaces;
        }
        assert!(
            start.elapsed() < BOOT_LIMIT,
            "no 192.168.122.x address on eth0: {interfaces:?}; console:\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let lo = interfaces.iter().find(|i| i.name == "lo").expect("lo");
    assert!(
        lo.addresses
            .iter()
            .any(|a| a.address.is_loopback() && a.prefix == 8),
        "{lo:?}"
    );

    // -- a domain without the channel says so, with the fix
    let bare = AgentVm::boot("noagent", false);
    match bare.agent().ping().await {
        Err(GuestAgentError::Agent(AgentCallError::NotConfigured { .. })) => {}
        other => panic!("expected NotConfigured, got {other:?}"),
    }
    assert!(!bare.agent().connected().await.expect("channel state"));
    drop(bare);

    // -- graceful shutdown through the agent
    agent.shutdown().await.expect("agent shutdown");
    assert!(
        vm.wait_stopped(Duration::from_secs(60)),
        "guest still running after agent shutdown; console:\n{}",
        vm.console()
    );
    assert!(vm.console().contains("GUEST-SHUTDOWN"), "{}", vm.console());
}
