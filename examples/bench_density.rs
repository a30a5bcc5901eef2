//! Idle cost per running task: the plugin's CPU seconds per minute, wake-ups
//! (context switches) per second and RSS with 1, 3 and 8 running TCG VMs
//! (real libvirtd, the test guest) and with 500 tasks on libvirt's
//! `test:///default` driver, against a reference loop doing what the Go
//! original does: one libvirt lookup (domain state) per task per second,
//! timed on its own thread in this process, on its own connection.
//!
//!   cargo build --release && cargo run --release --example bench_density
//!   cargo run --example bench_density -- --short    # 1 VM, 50 test tasks, 5 s windows (CI)
//!   ... -- --no-vms                                 # only the test:/// part (no root)
//!
//! The plugin gets what Nomad gives it: a fingerprint stream, and a WaitTask
//! stream per running task.
//! Each figure comes from one window with the other side quiet; libvirtd's
//! CPU in both windows is shown too (it is shared with anything else on
//! the host, so it is noisy). VM part: needs root, tests/setup/host.sh and
//! tests/setup/guest.sh; everything it creates is named ndvtest-* and removed.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{proc_stats, BoxError, ProcStats};
use nomad_driver_virt::libvirt::{domain, Libvirt, LibvirtError};
use nomad_driver_virt::nomad_client::PluginClient;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, FingerprintRequest, StartTaskRequest, StopTaskRequest, WaitTaskRequest,
};

/// The test guest's dir: NDV_TEST_GUEST_DIR, as in the tests, or the
/// default tests/setup/guest.sh builds.
fn guest_dir() -> String {
    std::env::var("NDV_TEST_GUEST_DIR")
        .ok()
        .filter(|dir| !dir.is_empty())
        .unwrap_or_else(|| "/var/lib/nomad-driver-virt-test".to_string())
}

struct Options {
    vm_counts: Vec<usize>,
    test_tasks: usize,
    window: Duration,
    settle: Duration,
}

/// One measured row.
struct Row {
    setup: String,
    tasks: usize,
    plugin_cpu_per_min: f64,
    plugin_wakeups_per_s: f64,
    plugin_rss_mb: f64,
    plugin_rss_anon_mb: f64,
    plugin_libvirtd_per_min: f64,
    reference_cpu_per_min: f64,
    reference_libvirtd_per_min: f64,
}

fn per_minute(ns: u64, window: Duration) -> f64 {
    ns as f64 / 1e9 * 60.0 / window.as_secs_f64()
}

fn libvirtd_ns() -> u64 {
    common::libvirtd_pid()
        .and_then(|pid| proc_stats(pid).ok())
        .map(|stats| stats.run_ns)
        .unwrap_or(0)
}

/// The plugin alone for `window`: its CPU, wake-ups and libvirtd's CPU.
async fn plugin_window(
    pid: u32,
    window: Duration,
) -> Result<(ProcStats, ProcStats, u64), BoxError> {
    let before = proc_stats(pid)?;
    let libvirtd_before = libvirtd_ns();
    tokio::time::sleep(window).await;
    let after = proc_stats(pid)?;
    let libvirtd = libvirtd_ns().saturating_sub(libvirtd_before);
    Ok((before, after, libvirtd))
}

/// The Go original's monitor, for `window`: every second, the state of
/// every domain by name. Returns (its thread's CPU ns, libvirtd's CPU ns).
fn reference_window(
    libvirt: Libvirt,
    names: Vec<String>,
    window: Duration,
) -> Result<(u64, u64), BoxError> {
    let worker = std::thread::spawn(move || -> Result<(u64, u64), String> {
        // Connect first: the window measures the loop, not the connect.
        libvirt
            .call_blocking(|_| Ok(()))
            .map_err(|error| error.to_string())?;
        let libvirtd_before = libvirtd_ns();
        let started_ns = common::own_thread_run_ns();
        let end = Instant::now() + window;
        let mut next = Instant::now();
        while Instant::now() < end {
            for name in &names {
                let status = libvirt.call_blocking(|conn| domain::domain_status(conn, name));
                if let Err(error) = status {
                    return Err(format!("reference lookup of {name}: {error}"));
                }
            }
            next += Duration::from_secs(1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        Ok((
            common::own_thread_run_ns().saturating_sub(started_ns),
            libvirtd_ns().saturating_sub(libvirtd_before),
        ))
    });
    let result = worker.join().map_err(|_| "reference thread panicked")??;
    Ok(result)
}

struct Plugin {
    client: PluginClient,
    pid: u32,
    msgpack: Vec<u8>,
    alloc_dir: std::path::PathBuf,
    tasks: Vec<String>,
    waits: Vec<tokio::task::JoinHandle<()>>,
    fingerprints: tokio::task::JoinHandle<()>,
}

impl Plugin {
    async fn new(root: &Path, config: &str, task_body: &str) -> Result<Plugin, BoxError> {
        let alloc_dir = root.join("allocs");
        std::fs::create_dir_all(&alloc_dir)?;
        std::fs::set_permissions(&alloc_dir, std::fs::Permissions::from_mode(0o755))?;
        let client = common::launch(&root.join("state")).await?;
        let pid = client.pid().ok_or("plugin has no pid")?;
        client
            .set_config_hcl(config, None)
            .await
            .map_err(|error| format!("set config: {error:#}"))?;
        let msgpack = client
            .encode_task_config(task_body, &HashMap::new())
            .await
            .map_err(|error| format!("encode: {error:#}"))?;
        // Nomad keeps the fingerprint stream open for the plugin's life.
        let mut stream = client
            .driver()
            .fingerprint(FingerprintRequest {})
            .await?
            .into_inner();
        let fingerprints =
            tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        Ok(Plugin {
            client,
            pid,
            msgpack,
            alloc_dir,
            tasks: Vec::new(),
            waits: Vec::new(),
            fingerprints,
        })
    }

    /// Starts tasks until `count` run, each with a WaitTask stream open.
    async fn grow_to(&mut self, count: usize, memory_mb: i64) -> Result<(), BoxError> {
        while self.tasks.len() < count {
            let index = self.tasks.len();
            // Each task its own alloc dir, as Nomad gives it (the console
            // file lives in the task dir).
            let alloc_dir = self.alloc_dir.join(format!("a{index}"));
            for dir in [alloc_dir.join("alloc/logs"), alloc_dir.join("web")] {
                std::fs::create_dir_all(&dir)?;
            }
            for dir in [
                alloc_dir.clone(),
                alloc_dir.join("alloc"),
                alloc_dir.join("web"),
            ] {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            }
            let task = common::task_config(
                &format!(
                    "ndvbench/web/{:08x}",
                    (index as u32) ^ (std::process::id() << 12)
                ),
                "web",
                "ndvbench",
                &alloc_dir,
                self.msgpack.clone(),
                memory_mb,
            );
            let task_id = task.id.clone();
            self.client
                .driver()
                .start_task(StartTaskRequest { task: Some(task) })
                .await
                .map_err(|status| format!("StartTask {index}: {}", status.message()))?;
            self.tasks.push(task_id.clone());
            let mut driver = self.client.driver();
            self.waits.push(tokio::spawn(async move {
                let _ = driver.wait_task(WaitTaskRequest { task_id }).await;
            }));
        }
        Ok(())
    }

    /// Waits until every task's console shows the test guest's
    /// "GUEST-READY" line (its boot is over).
    async fn wait_booted(&self, limit: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + limit;
        for index in 0..self.tasks.len() {
            let console = self
                .alloc_dir
                .join(format!("a{index}/web/virt-console.log"));
            loop {
                let text = std::fs::read(&console).unwrap_or_default();
                if String::from_utf8_lossy(&text).contains("GUEST-READY") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("guest {index} did not boot within {limit:?}").into());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Ok(())
    }

    fn domain_names(&self) -> Vec<String> {
        self.tasks
            .iter()
            .map(|id| nomad_driver_virt::task::plan::domain_name("web", id))
            .collect()
    }

    async fn remove_all(self) {
        let mut driver = self.client.driver();
        for task_id in &self.tasks {
            let _ = driver
                .stop_task(StopTaskRequest {
                    task_id: task_id.clone(),
                    timeout: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 0,
                    }),
                    signal: "SIGKILL".into(),
                })
                .await;
            let _ = driver
                .destroy_task(DestroyTaskRequest {
                    task_id: task_id.clone(),
                    force: true,
                })
                .await;
        }
        for wait in self.waits {
            wait.abort();
        }
        self.fingerprints.abort();
        let _ = self.client.kill().await;
    }
}

async fn measure(
    plugin: &Plugin,
    reference: Libvirt,
    names: Vec<String>,
    setup: String,
    options: &Options,
) -> Result<Row, BoxError> {
    tokio::time::sleep(options.settle).await;
    let (before, after, plugin_libvirtd) = plugin_window(plugin.pid, options.window).await?;
    let window = options.window;
    let tasks = names.len();
    let (reference_ns, reference_libvirtd) =
        tokio::task::spawn_blocking(move || reference_window(reference, names, window)).await??;
    let row = Row {
        setup,
        tasks,
        plugin_cpu_per_min: per_minute(after.run_ns.saturating_sub(before.run_ns), window),
        plugin_wakeups_per_s: after.switches.saturating_sub(before.switches) as f64
            / window.as_secs_f64(),
        plugin_rss_mb: after.rss_kib as f64 / 1024.0,
        plugin_rss_anon_mb: after.rss_anon_kib as f64 / 1024.0,
        plugin_libvirtd_per_min: per_minute(plugin_libvirtd, window),
        reference_cpu_per_min: per_minute(reference_ns, window),
        reference_libvirtd_per_min: per_minute(reference_libvirtd, window),
    };
    eprintln!(
        "{} x{}: plugin {:.4} s/min, reference {:.4} s/min",
        row.setup, row.tasks, row.plugin_cpu_per_min, row.reference_cpu_per_min
    );
    Ok(row)
}

async fn vm_rows(options: &Options, rows: &mut Vec<Row>) -> Result<(), BoxError> {
    let root = tempfile::Builder::new()
        .prefix("ndvtest-density-")
        .tempdir()?;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
    let pool_name = format!("ndvtest-bench-density-{}", std::process::id());
    let guest_dir = guest_dir();
    let config = format!(
        "provider {{\n  libvirt {{\n    uri = \"qemu:///system\"\n  }}\n}}\nimage_paths = [\"{guest_dir}\"]\naccelerator = \"tcg\"\nstorage_pools {{\n  directory \"{pool_name}\" {{\n    path = \"{}\"\n  }}\n}}\n",
        root.path().join("pool").display()
    );
    let mut plugin = Plugin::new(
        root.path(),
        &config,
        "disk {\n  chained = true\n  source {\n    image = \"guest.qcow2\"\n  }\n}\n",
    )
    .await?;
    // The plugin's own floor: no task, only Nomad's fingerprint stream.
    let mut result = measure(
        &plugin,
        Libvirt::new("qemu:///system", None),
        Vec::new(),
        "no task (plugin-wide work only)".into(),
        options,
    )
    .await
    .map(|row| rows.push(row));
    for &count in &options.vm_counts {
        if result.is_err() {
            break;
        }
        if let Err(error) = plugin.grow_to(count, 192).await {
            result = Err(error);
            break;
        }
        // Idle means booted: wait for each guest's "GUEST-READY" line.
        if let Err(error) = plugin.wait_booted(Duration::from_secs(600)).await {
            result = Err(error);
            break;
        }
        let names = plugin.domain_names();
        match measure(
            &plugin,
            Libvirt::new("qemu:///system", None),
            names,
            "TCG VMs (qemu:///system)".into(),
            options,
        )
        .await
        {
            Ok(row) => rows.push(row),
            Err(error) => {
                result = Err(error);
                break;
            }
        }
    }
    plugin.remove_all().await;
    for args in [["pool-destroy", &pool_name], ["pool-undefine", &pool_name]] {
        let _ = Command::new("virsh")
            .args(["-q", "-c", "qemu:///system"])
            .args(args)
            .output();
    }
    result
}

async fn test_driver_rows(options: &Options, rows: &mut Vec<Row>) -> Result<(), BoxError> {
    let root = tempfile::Builder::new()
        .prefix("ndvtest-density-")
        .tempdir()?;
    let mut plugin = Plugin::new(
        root.path(),
        &common::test_driver_config(&root.path().join("pool")),
        "disk {\n  size = \"1MiB\"\n}\n",
    )
    .await?;
    let result = async {
        plugin.grow_to(options.test_tasks, 64).await?;
        // The reference's test:///default is this process's own: give it
        // as many running domains as the plugin has.
        let reference = Libvirt::new("test:///default", None);
        let names: Vec<String> = (0..options.test_tasks)
            .map(|index| format!("ndvtest-ref-{index}"))
            .collect();
        let defined = names.clone();
        reference.call_blocking(move |conn| {
            for name in &defined {
                let xml = format!(
                    "<domain type='test'><name>{name}</name><memory>65536</memory>\
                     <os><type>hvm</type></os></domain>"
                );
                domain::define_domain(conn, name, &xml)?;
                domain::start_domain(conn, name)?;
            }
            Ok::<_, LibvirtError>(())
        })?;
        measure(
            &plugin,
            reference,
            names,
            "test:///default tasks".into(),
            options,
        )
        .await
    }
    .await;
    plugin.remove_all().await;
    rows.push(result?);
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let short = args.iter().any(|a| a == "--short" || a == "short");
    let no_vms = args.iter().any(|a| a == "--no-vms");
    let mut options = if short {
        Options {
            vm_counts: vec![1],
            test_tasks: 50,
            window: Duration::from_secs(5),
            settle: Duration::from_secs(2),
        }
    } else {
        Options {
            vm_counts: vec![1, 3, 8],
            test_tasks: 500,
            window: Duration::from_secs(30),
            // After the guests' boot: tokio's idle blocking threads (10 s)
            // exit, so they do not take CPU time out of the window.
            settle: Duration::from_secs(15),
        }
    };
    if no_vms {
        options.vm_counts.clear();
    } else if !Path::new(&guest_dir()).join("guest.qcow2").is_file() {
        let guest_dir = guest_dir();
        return Err(format!(
            "{guest_dir}/guest.qcow2 is missing: run tests/setup/guest.sh, or pass --no-vms"
        )
        .into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    runtime.block_on(async {
        if !options.vm_counts.is_empty() {
            vm_rows(&options, &mut rows).await?;
        }
        test_driver_rows(&options, &mut rows).await
    })?;

    println!(
        "idle cost per running task: plugin (fingerprint stream and a WaitTask stream per task open) vs a reference \
         loop of one libvirt domain-state lookup per task per second; {} s windows after {} s \
         to settle; {} build; load average {}",
        options.window.as_secs(),
        options.settle.as_secs(),
        common::profile(),
        common::load_average()
    );
    println!();
    println!(
        "| setup | tasks | plugin CPU s/min | plugin wake-ups/s | plugin RSS MB (anonymous) | reference CPU s/min | reference / plugin | libvirtd CPU s/min: plugin window / reference window |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let ratio = if row.plugin_cpu_per_min > 0.0 {
            format!("{:.0}x", row.reference_cpu_per_min / row.plugin_cpu_per_min)
        } else {
            "inf".into()
        };
        println!(
            "| {} | {} | {:.4} | {:.1} | {:.1} ({:.1}) | {:.4} | {} | {:.3} / {:.3} |",
            row.setup,
            row.tasks,
            row.plugin_cpu_per_min,
            row.plugin_wakeups_per_s,
            row.plugin_rss_mb,
            row.plugin_rss_anon_mb,
            row.reference_cpu_per_min,
            ratio,
            row.plugin_libvirtd_per_min,
            row.reference_libvirtd_per_min,
        );
    }
    Ok(())
}
