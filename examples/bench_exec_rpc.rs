//! Exec latency as Nomad sees it: through the plugin process, served over
//! the go-plugin transport, with the real gRPC ExecTask and
//! ExecTaskStreaming calls, into a task booted from the TCG test guest.
//! Measures the round trip of an interactive echo (a line into a streaming
//! session's stdin until it comes back on stdout) and how long an exec takes
//! to start (request to first output, request to exit).
//!
//!   cargo build --release && cargo run --release --example bench_exec_rpc   # 200 lines, 20 execs
//!   cargo run --example bench_exec_rpc -- --short                           # 20 lines, 5 execs (CI)
//!
//! Needs root, tests/setup/host.sh and tests/setup/guest.sh
//! (NDV_TEST_GUEST_DIR picks another image dir) and the plugin binary next
//! to this program's directory (NDV_PLUGIN_BINARY overrides it).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nomad_driver_virt::nomad_client::logmon::LogMon;
use nomad_driver_virt::nomad_client::{LaunchOptions, PluginClient};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::exec_task_streaming_request::{
    Setup, TerminalSize,
};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    AllocatedCpuResources, AllocatedMemoryResources, AllocatedTaskResources, DestroyTaskRequest,
    ExecTaskRequest, ExecTaskStreamingIoOperation, ExecTaskStreamingRequest,
    ExecTaskStreamingResponse, LinuxResources, Resources, StartTaskRequest, TaskConfig,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Error = Box<dyn std::error::Error>;

const BOOT_LIMIT: Duration = Duration::from_secs(300);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn row(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "| {label} | {} | {} | {} | {} | {} |",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples.first().copied().unwrap_or_default()),
        ms(samples.last().copied().unwrap_or_default()),
    );
}

fn guest_dir() -> PathBuf {
    std::env::var_os("NDV_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/nomad-driver-virt-test"))
}

/// The plugin binary cargo built next to `examples/`.
fn plugin_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("NDV_PLUGIN_BINARY") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("nomad-driver-virt"))
        .ok_or("cannot find the target directory")?;
    if !path.is_file() {
        return Err(format!(
            "{} is missing: build it first (`cargo build`, `cargo build --release`) or set NDV_PLUGIN_BINARY",
            path.display()
        )
        .into());
    }
    Ok(path)
}

fn virsh(args: &[&str]) {
    let _ = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output();
}

/// What the benchmark put on the host, removed on drop even after errors.
struct Host {
    dir: tempfile::TempDir,
    pool: String,
    domain: Option<String>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(domain) = &self.domain {
            virsh(&["destroy", domain]);
            virsh(&["undefine", domain]);
        }
        for volume in pool_volumes(&self.pool) {
            virsh(&["vol-delete", "--pool", &self.pool, &volume]);
        }
        virsh(&["pool-destroy", &self.pool]);
        virsh(&["pool-undefine", &self.pool]);
    }
}

fn pool_volumes(pool: &str) -> Vec<String> {
    Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "vol-list", pool])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:05x}", std::process::id() & 0xfff, nanos & 0xfffff)
}

/// A streaming exec: the request sender and the answers. `extra` follows
/// the setup at once (the terminal size, as Nomad's client sends it).
async fn open(
    plugin: &PluginClient,
    setup: Setup,
    extra: Option<ExecTaskStreamingRequest>,
) -> Result<
    (
        mpsc::Sender<ExecTaskStreamingRequest>,
        tonic::Streaming<ExecTaskStreamingResponse>,
    ),
    Error,
> {
    let (sender, receiver) = mpsc::channel(16);
    sender
        .send(ExecTaskStreamingRequest {
            setup: Some(setup),
            ..Default::default()
        })
        .await?;
    if let Some(extra) = extra {
        sender.send(extra).await?;
    }
    let answers = plugin
        .driver()
        .exec_task_streaming(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    Ok((sender, answers))
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

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Reads answers until stdout has `needle`; errors if the session ends.
async fn until_stdout(
    answers: &mut tonic::Streaming<ExecTaskStreamingResponse>,
    needle: &str,
) -> Result<(), Error> {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let answer = tokio::time::timeout(Duration::from_secs(60), answers.message())
            .await
            .map_err(|_| format!("no {needle:?} within 60 s"))??
            .ok_or("the session ended")?;
        if let Some(io) = answer.stdout {
            seen.push_str(&String::from_utf8_lossy(&io.data));
        }
        if answer.exited {
            return Err(format!("the command exited before {needle:?}").into());
        }
    }
    Ok(())
}

/// Reads answers until the exit; the time of the first stdout, if any.
async fn until_exit(
    answers: &mut tonic::Streaming<ExecTaskStreamingResponse>,
    start: Instant,
) -> Result<(Option<Duration>, i32), Error> {
    let mut first = None;
    loop {
        let answer = tokio::time::timeout(Duration::from_secs(60), answers.message())
            .await
            .map_err(|_| "no exit within 60 s")??
            .ok_or("the session ended without an exit")?;
        if answer.stdout.is_some_and(|io| !io.data.is_empty()) && first.is_none() {
            first = Some(start.elapsed());
        }
        if answer.exited {
            return Ok((first, answer.result.map(|r| r.exit_code).unwrap_or(-1)));
        }
    }
}

async fn echo_round_trips(
    plugin: &PluginClient,
    task_id: &str,
    lines: usize,
    tty: bool,
) -> Result<Vec<Duration>, Error> {
    let script = if tty {
        // No echo from the terminal itself: measure cat's reply only.
        "stty -echo; echo ready; exec cat"
    } else {
        "echo ready; exec cat"
    };
    let size = tty.then_some(ExecTaskStreamingRequest {
        tty_size: Some(TerminalSize {
            height: 24,
            width: 80,
        }),
        ..Default::default()
    });
    let (sender, mut answers) = open(
        plugin,
        Setup {
            task_id: task_id.to_string(),
            command: words(&["sh", "-c", script]),
            tty,
        },
        size,
    )
    .await?;
    until_stdout(&mut answers, "ready").await?;
    let mut samples = Vec::with_capacity(lines);
    for i in 0..lines {
        let line = format!("line {i:05}");
        let start = Instant::now();
        sender
            .send(stdin(format!("{line}\n").as_bytes(), false))
            .await?;
        until_stdout(&mut answers, &line).await?;
        samples.push(start.elapsed());
    }
    if tty {
        // EOF on a terminal is ^D.
        sender.send(stdin(b"\x04", false)).await?;
    }
    sender.send(stdin(b"", true)).await?;
    until_exit(&mut answers, Instant::now()).await?;
    Ok(samples)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let short = std::env::args().any(|a| a == "short" || a == "--short");
    let (lines, execs) = if short { (20, 5) } else { (200, 20) };
    let image_dir = guest_dir();
    if !image_dir.join("guest.qcow2").is_file() {
        return Err(format!(
            "no test guest in {}: run `bash tests/setup/guest.sh` as root",
            image_dir.display()
        )
        .into());
    }
    let binary = plugin_binary()?;

    // A Nomad-like alloc dir and a private storage pool.
    let dir = tempfile::Builder::new()
        .prefix("ndvtest-bench-rpc-")
        .tempdir()?;
    let mut host = Host {
        pool: format!("ndvtest-bench-pool-{}", suffix()),
        dir,
        domain: None,
    };
    let root = host.dir.path().to_path_buf();
    let (alloc_id, task_name) = (format!("benchalloc{}", suffix()), "ndvtest-bench");
    let alloc_dir = root.join("alloc-dir");
    let task_dir = alloc_dir.join(task_name);
    let logs = alloc_dir.join("alloc/logs");
    for dir in [&logs, &task_dir.join("local"), &task_dir.join("secrets")] {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::create_dir_all(root.join("pool"))?;
    // QEMU runs as libvirt-qemu: it must reach the task's directories.
    for dir in [
        root.clone(),
        alloc_dir.clone(),
        alloc_dir.join("alloc"),
        task_dir.clone(),
        task_dir.join("local"),
        task_dir.join("secrets"),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let stdout_fifo = logs.join(format!(".{task_name}.stdout.fifo"));
    let console = logs.join(format!("{task_name}.stdout.0"));
    LogMon::start(&stdout_fifo, &console)?;

    let plugin = PluginClient::launch(&binary, LaunchOptions::default()).await?;
    plugin
        .set_config_hcl(
            &format!(
                "image_paths = [\"{}\"]\naccelerator = \"tcg\"\nstorage_pools {{\n  directory \"{}\" {{\n    path = \"{}\"\n  }}\n}}\n",
                image_dir.display(),
                host.pool,
                root.join("pool").display()
            ),
            None,
        )
        .await?;
    let msgpack = plugin
        .encode_task_config(
            "guest_agent = true\ndisk {\n  chained = true\n  source {\n    image = \"guest.qcow2\"\n  }\n}\n",
            &HashMap::new(),
        )
        .await?;
    let task_id = format!("{alloc_id}/{task_name}/{}", suffix());
    let task = TaskConfig {
        id: task_id.clone(),
        name: task_name.into(),
        msgpack_driver_config: msgpack,
        resources: Some(Resources {
            allocated_resources: Some(AllocatedTaskResources {
                cpu: Some(AllocatedCpuResources { cpu_shares: 500 }),
                memory: Some(AllocatedMemoryResources {
                    memory_mb: 256,
                    memory_max_mb: 0,
                }),
                networks: vec![],
            }),
            linux_resources: Some(LinuxResources {
                memory_limit_bytes: 256 * 1024 * 1024,
                ..Default::default()
            }),
            ports: vec![],
        }),
        alloc_dir: alloc_dir.display().to_string(),
        stdout_path: stdout_fifo.display().to_string(),
        stderr_path: "/dev/null".into(),
        alloc_id: alloc_id.clone(),
        task_group_name: "bench".into(),
        job_name: "bench".into(),
        ..Default::default()
    };
    host.domain = Some(nomad_driver_virt::task::plan::domain_name(
        task_name, &task_id,
    ));
    let boot = Instant::now();
    plugin
        .driver()
        .start_task(StartTaskRequest { task: Some(task) })
        .await?;
    let exec_true = |timeout: Duration| ExecTaskRequest {
        task_id: task_id.clone(),
        command: words(&["true"]),
        timeout: prost_types::Duration::try_from(timeout).ok(),
    };
    loop {
        match plugin
            .driver()
            .exec_task(exec_true(Duration::from_secs(10)))
            .await
        {
            Ok(_) => break,
            Err(status) if boot.elapsed() < BOOT_LIMIT => {
                if status.code() != tonic::Code::Unavailable {
                    return Err(status.into());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
    let agent_after = boot.elapsed();
    // Let the guest finish booting so it does not compete.
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("GUEST-READY")
        && boot.elapsed() < BOOT_LIMIT
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "plugin over go-plugin gRPC, TCG test guest; agent answered {:.1} s after StartTask",
        agent_after.as_secs_f64()
    );
    println!();
    println!("| measurement | n | p50 | p99 | min | max |");
    println!("| --- | --- | --- | --- | --- | --- |");

    let mut unary = Vec::new();
    for _ in 0..execs {
        let start = Instant::now();
        let answer = plugin
            .driver()
            .exec_task(exec_true(Duration::from_secs(30)))
            .await?
            .into_inner();
        if answer.result.map(|r| r.exit_code) != Some(0) {
            return Err("`true` did not exit 0".into());
        }
        unary.push(start.elapsed());
    }
    row("ExecTask `true`: request to answer", unary);

    let mut to_exit = Vec::new();
    for _ in 0..execs {
        let start = Instant::now();
        let (_sender, mut answers) = open(
            &plugin,
            Setup {
                task_id: task_id.clone(),
                command: words(&["true"]),
                tty: false,
            },
            Some(stdin(b"", true)),
        )
        .await?;
        let (_, code) = until_exit(&mut answers, start).await?;
        if code != 0 {
            return Err(format!("`true` exited {code}").into());
        }
        to_exit.push(start.elapsed());
    }
    row("ExecTaskStreaming `true`: request to exit", to_exit);

    let mut to_output = Vec::new();
    for _ in 0..execs {
        let start = Instant::now();
        let (_sender, mut answers) = open(
            &plugin,
            Setup {
                task_id: task_id.clone(),
                command: words(&["echo", "hi"]),
                tty: false,
            },
            Some(stdin(b"", true)),
        )
        .await?;
        let (first, _) = until_exit(&mut answers, start).await?;
        to_output.push(first.ok_or("no output from `echo hi`")?);
    }
    row(
        "ExecTaskStreaming `echo hi`: request to first stdout",
        to_output,
    );

    row(
        &format!("interactive echo round trip ({lines} lines)"),
        echo_round_trips(&plugin, &task_id, lines, false).await?,
    );
    row(
        &format!("interactive echo round trip, TTY ({lines} lines)"),
        echo_round_trips(&plugin, &task_id, lines, true).await?,
    );

    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.clone(),
            force: true,
        })
        .await?;
    plugin.kill().await?;
    drop(host);
    Ok(())
}
