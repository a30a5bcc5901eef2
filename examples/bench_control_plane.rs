//! The control plane through the real gRPC path: the plugin binary launched
//! as Nomad launches it (go-plugin handshake, Unix socket), pointed at
//! libvirt's `test:///default` driver (in-memory, private to the plugin
//! process), runs Start/Inspect/Stop/Destroy cycles. Prints p50/p99 per RPC
//! and the plugin's RSS, file descriptors and threads before and after.
//!
//!   cargo build --release && cargo run --release --example bench_control_plane
//!   cargo run --example bench_control_plane -- --short     # 50 cycles (CI)
//!   ... -- --cycles 5000
//!
//! No root needed; nothing outside a temporary directory is touched.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{ms, percentile, proc_stats, BoxError};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, InspectTaskRequest, StartTaskRequest, StopTaskRequest,
};

const RPCS: [&str; 4] = ["StartTask", "InspectTask", "StopTask", "DestroyTask"];

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cycles = 1000usize;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--short" | "short" => cycles = 50,
            "--cycles" => {
                cycles = iter
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--cycles needs a number")?;
            }
            other => {
                return Err(format!("unknown argument {other:?}; use --short or --cycles N").into())
            }
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(cycles))
}

async fn run(cycles: usize) -> Result<(), BoxError> {
    let dir = tempfile::Builder::new().prefix("ndvtest-cp-").tempdir()?;
    let alloc_dir = dir.path().join("alloc");
    std::fs::create_dir_all(alloc_dir.join("alloc/logs"))?;
    let plugin = common::launch(&dir.path().join("state")).await?;
    let pid = plugin.pid().ok_or("plugin has no pid")?;
    plugin
        .set_config_hcl(&common::test_driver_config(&dir.path().join("pool")), None)
        .await
        .map_err(|error| format!("set config: {error:#}"))?;
    let msgpack = plugin
        .encode_task_config("disk {\n  size = \"1MiB\"\n}\n", &HashMap::new())
        .await
        .map_err(|error| format!("encode task config: {error:#}"))?;
    let driver = plugin.driver();

    let mut samples: HashMap<&str, Vec<Duration>> = HashMap::new();
    let one_cycle = |index: usize| {
        let task = common::task_config(
            &format!("bench/web/{index:08x}"),
            "web",
            "bench",
            &alloc_dir,
            msgpack.clone(),
            64,
        );
        let task_id = task.id.clone();
        let mut driver = driver.clone();
        async move {
            let mut took = Vec::new();
            let started = Instant::now();
            driver
                .start_task(StartTaskRequest { task: Some(task) })
                .await
                .map_err(|status| format!("StartTask: {}", status.message()))?;
            took.push(("StartTask", started.elapsed()));
            let started = Instant::now();
            driver
                .inspect_task(InspectTaskRequest {
                    task_id: task_id.clone(),
                })
                .await
                .map_err(|status| format!("InspectTask: {}", status.message()))?;
            took.push(("InspectTask", started.elapsed()));
            let started = Instant::now();
            driver
                .stop_task(StopTaskRequest {
                    task_id: task_id.clone(),
                    timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                    signal: "SIGTERM".into(),
                })
                .await
                .map_err(|status| format!("StopTask: {}", status.message()))?;
            took.push(("StopTask", started.elapsed()));
            let started = Instant::now();
            driver
                .destroy_task(DestroyTaskRequest {
                    task_id,
                    force: true,
                })
                .await
                .map_err(|status| format!("DestroyTask: {}", status.message()))?;
            took.push(("DestroyTask", started.elapsed()));
            Ok::<_, BoxError>(took)
        }
    };

    // Warm-up: the first cycle creates the pool and the connection.
    for index in 0..5 {
        one_cycle(1_000_000 + index).await?;
    }
    let before = proc_stats(pid)?;
    let wall = Instant::now();
    for index in 0..cycles {
        for (rpc, took) in one_cycle(index).await? {
            samples.entry(rpc).or_default().push(took);
        }
    }
    let wall = wall.elapsed();
    // Let finished work settle (blocking threads idle out after 10 s in
    // tokio; this measures what stays).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = proc_stats(pid)?;
    drop(driver);

    println!(
        "control plane: {cycles} Start/Inspect/Stop/Destroy cycles over the go-plugin gRPC socket, \
         libvirt test:///default, {} build; load average {}",
        common::profile(),
        common::load_average()
    );
    println!();
    println!("| RPC | n | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for rpc in RPCS {
        let mut list = samples.remove(rpc).unwrap_or_default();
        list.sort();
        println!(
            "| {rpc} | {} | {:.2} | {:.2} | {:.2} |",
            list.len(),
            ms(percentile(&list, 50.0)),
            ms(percentile(&list, 99.0)),
            ms(list.last().copied().unwrap_or_default()),
        );
    }
    println!();
    println!("| plugin | after 5 warm-up cycles | after {cycles} more | change |");
    println!("|---|---:|---:|---:|");
    println!(
        "| RSS KiB | {} | {} | {:+} |",
        before.rss_kib,
        after.rss_kib,
        after.rss_kib as i64 - before.rss_kib as i64
    );
    println!(
        "| anonymous RSS KiB | {} | {} | {:+} |",
        before.rss_anon_kib,
        after.rss_anon_kib,
        after.rss_anon_kib as i64 - before.rss_anon_kib as i64
    );
    println!(
        "| open fds | {} | {} | {:+} |",
        before.fds,
        after.fds,
        after.fds as i64 - before.fds as i64
    );
    println!(
        "| threads | {} | {} | {:+} |",
        before.threads,
        after.threads,
        after.threads as i64 - before.threads as i64
    );
    println!(
        "| CPU s | {:.2} | {:.2} | {:+.2} |",
        before.cpu.as_secs_f64(),
        after.cpu.as_secs_f64(),
        (after.cpu.saturating_sub(before.cpu)).as_secs_f64()
    );
    println!();
    println!(
        "{cycles} cycles in {:.1} s ({:.1} cycles/s)",
        wall.as_secs_f64(),
        cycles as f64 / wall.as_secs_f64()
    );
    plugin.kill().await.map_err(|error| format!("{error:#}"))?;
    if after.fds > before.fds + 2 {
        return Err(format!(
            "file descriptors grew from {} to {} over {cycles} cycles",
            before.fds, after.fds
        )
        .into());
    }
    Ok(())
}
