//! Plugin start-up as Nomad sees it: the time from exec to the go-plugin
//! handshake line on stdout, then (one launch through the real client) the
//! plugin's RSS after SetConfig and the first fingerprint.
//!
//!   cargo build --release && cargo run --release --example bench_handshake
//!   cargo run --example bench_handshake -- --short     # 3 launches (CI)
//!
//! The fingerprint runs against libvirt's `test:///default` driver so the
//! figure does not depend on the host's libvirtd. No root needed.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ms, percentile, proc_stats, BoxError};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::FingerprintRequest;
use nomad_driver_virt::plugin::handshake::{MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE};

/// Exec to the first stdout line, as go-plugin waits for it.
fn exec_to_handshake(
    binary: &std::path::Path,
    state: &std::path::Path,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    let mut child = Command::new(binary)
        .env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
        .env("PLUGIN_PROTOCOL_VERSIONS", "2")
        .env("PLUGIN_MIN_PORT", "10000")
        .env("PLUGIN_MAX_PORT", "25000")
        .env(nomad_driver_virt::task::journal::JOURNAL_DIR_ENV, state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let took = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    if !line.starts_with("1|2|unix|") {
        return Err(format!("unexpected handshake line {line:?}").into());
    }
    Ok(took)
}

fn main() -> Result<(), BoxError> {
    let short = std::env::args()
        .skip(1)
        .any(|a| a == "--short" || a == "short");
    let launches = if short { 3 } else { 20 };
    let binary = common::plugin_binary()?;
    let dir = tempfile::Builder::new().prefix("ndvtest-hs-").tempdir()?;
    let state = dir.path().join("state");
    // One launch first so the binary is in the page cache.
    exec_to_handshake(&binary, &state)?;
    let mut samples = Vec::new();
    for _ in 0..launches {
        samples.push(exec_to_handshake(&binary, &state)?);
    }
    samples.sort();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (at_handshake, after_fingerprint, fingerprint_took) = runtime.block_on(async {
        let plugin = common::launch(&state).await?;
        let pid = plugin.pid().ok_or("plugin has no pid")?;
        let at_handshake = proc_stats(pid)?;
        plugin
            .set_config_hcl(&common::test_driver_config(&dir.path().join("pool")), None)
            .await
            .map_err(|error| format!("set config: {error:#}"))?;
        let started = Instant::now();
        let mut stream = plugin
            .driver()
            .fingerprint(FingerprintRequest {})
            .await
            .map_err(|status| format!("fingerprint: {}", status.message()))?
            .into_inner();
        stream
            .message()
            .await
            .map_err(|status| format!("fingerprint: {}", status.message()))?
            .ok_or("no fingerprint")?;
        let fingerprint_took = started.elapsed();
        let after = proc_stats(pid)?;
        drop(stream);
        plugin.kill().await.map_err(|error| format!("{error:#}"))?;
        Ok::<_, BoxError>((at_handshake, after, fingerprint_took))
    })?;

    println!(
        "plugin start-up: {launches} launches, {} build, binary {:.1} MB; load average {}",
        common::profile(),
        std::fs::metadata(&binary)?.len() as f64 / 1e6,
        common::load_average()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| exec to handshake line, p50 | {:.1} ms |",
        ms(percentile(&samples, 50.0))
    );
    println!(
        "| exec to handshake line, max | {:.1} ms |",
        ms(samples.last().copied().unwrap_or_default())
    );
    println!(
        "| RSS at handshake (anonymous part) | {:.1} MB ({:.1} MB) |",
        at_handshake.rss_kib as f64 / 1024.0,
        at_handshake.rss_anon_kib as f64 / 1024.0
    );
    println!(
        "| first fingerprint (test:///default) | {:.1} ms |",
        ms(fingerprint_took)
    );
    println!(
        "| RSS after the first fingerprint (anonymous part) | {:.1} MB ({:.1} MB) |",
        after_fingerprint.rss_kib as f64 / 1024.0,
        after_fingerprint.rss_anon_kib as f64 / 1024.0
    );
    println!(
        "| threads / open fds after it | {} / {} |",
        after_fingerprint.threads, after_fingerprint.fds
    );
    Ok(())
}
