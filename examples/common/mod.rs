//! Shared by the benchmark programs: the plugin binary cargo built next to
//! them, process figures from /proc, test-driver tasks, percentiles.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nomad_driver_virt::nomad_client::{LaunchOptions, PluginClient};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    AllocatedCpuResources, AllocatedMemoryResources, AllocatedTaskResources, LinuxResources,
    Resources, TaskConfig,
};
use nomad_driver_virt::task::journal::JOURNAL_DIR_ENV;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The plugin binary of the same profile: `target/<profile>/nomad-driver-virt`,
/// next to this program's `examples/` directory.
pub fn plugin_binary() -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let binary = profile_dir.join("nomad-driver-virt");
    if !binary.is_file() {
        return Err(format!(
            "{} is missing: build it first with `cargo build` (add --release for a release bench)",
            binary.display()
        )
        .into());
    }
    Ok(binary)
}

/// Which build this is, for the tables.
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Launches the plugin as Nomad would, its start journal in `state_dir`.
pub async fn launch(state_dir: &Path) -> Result<PluginClient, BoxError> {
    let options = LaunchOptions {
        env: vec![
            (JOURNAL_DIR_ENV.to_string(), state_dir.display().to_string()),
            ("NOMAD_DRIVER_VIRT_RECONCILE_DELAY".into(), "0".into()),
        ],
        ..LaunchOptions::default()
    };
    let plugin = PluginClient::launch(&plugin_binary()?, options)
        .await
        .map_err(|error| format!("{error:#}"))?;
    Ok(plugin)
}

/// Figures of one process (all its threads) from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    pub rss_kib: u64,
    /// The anonymous part of the RSS (heap, stacks): the rest is the
    /// binary and shared libraries (libvirt, GnuTLS...) mapped from files.
    pub rss_anon_kib: u64,
    pub fds: usize,
    /// User + system CPU time.
    pub cpu: Duration,
    /// Voluntary + involuntary context switches of all threads: each
    /// wake-up of a sleeping thread is one.
    pub switches: u64,
    pub threads: usize,
    /// CPU time of the live threads in nanoseconds (schedstat): finer than
    /// `cpu`, but a thread that exits takes its share with it.
    pub run_ns: u64,
}

fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

pub fn proc_stats(pid: u32) -> Result<ProcStats, BoxError> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(dir.join("status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    let rss_kib = field("VmRSS:");
    let rss_anon_kib = field("RssAnon:");
    let threads = field("Threads:") as usize;
    let fds = std::fs::read_dir(dir.join("fd"))?.count();
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    // Fields after the command name (which may contain spaces) in ")".
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after ")".
    let ticks: u64 = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let hz = clock_ticks_per_second();
    let cpu = Duration::from_millis(ticks * 1000 / hz);
    let mut switches = 0;
    let mut run_ns = 0;
    for task in std::fs::read_dir(dir.join("task"))?.flatten() {
        run_ns += thread_run_ns(&task.path());
        let Ok(text) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in text.lines() {
            if let Some(rest) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += rest.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(ProcStats {
        rss_kib,
        rss_anon_kib,
        fds,
        cpu,
        switches,
        threads,
        run_ns,
    })
}

/// CPU nanoseconds of one thread (`/proc/.../task/<tid>`), from schedstat.
pub fn thread_run_ns(task_dir: &Path) -> u64 {
    std::fs::read_to_string(task_dir.join("schedstat"))
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU nanoseconds of the calling thread.
pub fn own_thread_run_ns() -> u64 {
    thread_run_ns(Path::new("/proc/thread-self"))
}

/// The pid of the running libvirtd, if any (for its share of the cost).
pub fn libvirtd_pid() -> Option<u32> {
    let output = std::process::Command::new("pidof")
        .arg("libvirtd")
        .output()
        .ok()?;
    String::from_utf8(output.stdout)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Plugin config HCL for libvirt's `test:///default` driver (private to the
/// plugin process) with a storage pool in `pool_dir`.
pub fn test_driver_config(pool_dir: &Path) -> String {
    format!(
        "provider {{\n  libvirt {{\n    uri = \"test:///default\"\n  }}\n}}\naccelerator = \"tcg\"\nstorage_pools {{\n  directory \"ndvtest-bench\" {{\n    path = \"{}\"\n  }}\n}}\n",
        pool_dir.display()
    )
}

/// A task Nomad's client would send, with an already encoded driver config.
pub fn task_config(
    task_id: &str,
    task_name: &str,
    alloc_id: &str,
    alloc_dir: &Path,
    msgpack: Vec<u8>,
    memory_mb: i64,
) -> TaskConfig {
    let env = HashMap::from([
        ("NOMAD_ALLOC_ID".to_string(), alloc_id.to_string()),
        ("NOMAD_TASK_NAME".to_string(), task_name.to_string()),
    ]);
    TaskConfig {
        id: task_id.to_string(),
        name: task_name.to_string(),
        msgpack_driver_config: msgpack,
        env,
        resources: Some(Resources {
            allocated_resources: Some(AllocatedTaskResources {
                cpu: Some(AllocatedCpuResources { cpu_shares: 100 }),
                memory: Some(AllocatedMemoryResources {
                    memory_mb,
                    memory_max_mb: 0,
                }),
                networks: vec![],
            }),
            linux_resources: Some(LinuxResources {
                memory_limit_bytes: memory_mb * 1024 * 1024,
                ..Default::default()
            }),
            ports: vec![],
        }),
        alloc_dir: alloc_dir.display().to_string(),
        stdout_path: alloc_dir
            .join(format!("alloc/logs/.{task_name}.stdout.fifo"))
            .display()
            .to_string(),
        stderr_path: "/dev/null".into(),
        alloc_id: alloc_id.to_string(),
        task_group_name: "group".into(),
        job_name: "bench".into(),
        ..Default::default()
    }
}

/// The value at percentile `p` (0-100) of sorted samples (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The host's load averages, for the tables.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
