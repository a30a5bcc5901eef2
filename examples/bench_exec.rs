//! Exec through the QEMU guest agent against the real test guest: the round
//! trip of an interactive echo (one line into a streaming session's stdin
//! until it comes back on stdout) and how long an exec takes to start.
//!
//!   cargo run --release --example bench_exec            # 200 lines, 20 execs
//!   cargo run --release --example bench_exec -- short   # 20 lines, 5 execs
//!
//! Needs root, tests/setup/host.sh and tests/setup/guest.sh
//! (NDV_TEST_GUEST_DIR picks another image dir). The guest runs under TCG.

#[path = "../tests/common/agent_vm.rs"]
mod agent_vm;

use std::time::{Duration, Instant};

use nomad_driver_virt::guest_agent::{
    ExecRequest, SessionEvent, SessionInput, SessionRequest, TerminalSize,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{label:<44} n={:<4} p50={:>8.2?} p99={:>8.2?} min={:>8.2?} max={:>8.2?}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.first().copied().unwrap_or_default(),
        samples.last().copied().unwrap_or_default(),
    );
}

async fn echo_round_trips(
    agent: &nomad_driver_virt::guest_agent::GuestAgent,
    lines: usize,
    tty: Option<TerminalSize>,
) -> Result<Vec<Duration>, Box<dyn std::error::Error>> {
    let argv = if tty.is_some() {
        // No echo from the terminal itself: measure cat's reply only.
        vec![
            "sh".into(),
            "-c".into(),
            "stty -echo; echo ready; exec cat".into(),
        ]
    } else {
        vec!["sh".into(), "-c".into(), "echo ready; exec cat".into()]
    };
    let mut session = agent.start_session(SessionRequest { argv, tty }).await?;
    let input = session.input();
    let mut seen = String::new();
    while !seen.contains("ready") {
        match session.next_event().await {
            Some(SessionEvent::Stdout(bytes)) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Some(SessionEvent::Stderr(_)) => {}
            other => return Err(format!("session ended: {other:?}").into()),
        }
    }
    let mut samples = Vec::with_capacity(lines);
    for i in 0..lines {
        let line = format!("line {i:05}\n");
        let start = Instant::now();
        input
            .send(SessionInput::Stdin(line.clone().into_bytes()))
            .await?;
        let mut got = String::new();
        let want = line.trim_end();
        while !got.contains(want) {
            match session.next_event().await {
                Some(SessionEvent::Stdout(bytes)) => got.push_str(&String::from_utf8_lossy(&bytes)),
                Some(SessionEvent::Stderr(_)) => {}
                other => return Err(format!("session ended: {other:?}").into()),
            }
        }
        samples.push(start.elapsed());
    }
    input.send(SessionInput::CloseStdin).await?;
    while let Some(event) = session.next_event().await {
        if matches!(event, SessionEvent::Exited { .. } | SessionEvent::Failed(_)) {
            break;
        }
    }
    Ok(samples)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let short = std::env::args().any(|a| a == "short" || a == "--short");
    let (lines, execs) = if short { (20, 5) } else { (200, 20) };

    let vm = agent_vm::AgentVm::boot("bench", true);
    let agent = vm.agent();
    let boot = Instant::now();
    agent.wait_ready(Duration::from_secs(240)).await?;
    println!(
        "guest agent answered {:.1?} after domain start",
        boot.elapsed()
    );
    // Let the guest finish booting (seed wait, DHCP) so it does not compete.
    while !vm.console().contains("GUEST-READY") && boot.elapsed() < Duration::from_secs(240) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut ping = Vec::new();
    for _ in 0..execs {
        let start = Instant::now();
        agent.ping().await?;
        ping.push(start.elapsed());
    }
    report("guest-ping round trip", ping);

    let mut exec = Vec::new();
    for _ in 0..execs {
        let start = Instant::now();
        let output = agent
            .exec(ExecRequest::new(
                vec!["true".into()],
                Duration::from_secs(30),
            ))
            .await?;
        if output.exit_code != 0 {
            return Err(format!("true exited {}", output.exit_code).into());
        }
        exec.push(start.elapsed());
    }
    report("exec `true` (start to exit code)", exec);

    let mut session_start = Vec::new();
    for _ in 0..execs {
        let start = Instant::now();
        let mut session = agent
            .start_session(SessionRequest {
                argv: vec!["echo".into(), "hi".into()],
                tty: None,
            })
            .await?;
        let mut first_output = None;
        while let Some(event) = session.next_event().await {
            match event {
                SessionEvent::Stdout(_) if first_output.is_none() => {
                    first_output = Some(start.elapsed());
                }
                SessionEvent::Exited { .. } | SessionEvent::Failed(_) => break,
                _ => {}
            }
        }
        session_start.push(first_output.ok_or("no output from echo hi")?);
    }
    report("session start to first stdout (echo hi)", session_start);

    report(
        &format!("interactive echo round trip ({lines} lines)"),
        echo_round_trips(&agent, lines, None).await?,
    );
    report(
        &format!("interactive echo round trip, TTY ({lines} lines)"),
        echo_round_trips(&agent, lines, Some(TerminalSize { rows: 24, cols: 80 })).await?,
    );
    Ok(())
}
