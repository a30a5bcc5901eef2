//! The contract between the gRPC layer and the core: what a start needs,
//! what a task reports, in the project's own types. `driver/` converts
//! Nomad's protos to and from these; nothing here knows a proto.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::task::TaskSpec;
use crate::net::{AllocatedPort, DriverNetwork};
use crate::nomad::driver_state::DriverState;

/// A `volume_mount` Nomad resolved to a host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host_path: PathBuf,
    /// Where the guest sees it.
    pub task_path: String,
    pub read_only: bool,
}

/// What Nomad allocated to the task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_mb: i64,
    /// `memory_max`; 0 when not set.
    pub memory_max_mb: i64,
    /// The `cpu` MHz, as CPU shares.
    pub cpu_shares: i64,
    /// Reserved host cores (`resources { cores }`), Linux cpuset syntax.
    pub cpuset_cpus: String,
    /// The group's ports.
    pub ports: Vec<AllocatedPort>,
}

/// Everything StartTask needs, decoded and typed.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub task_id: String,
    pub task_name: String,
    pub alloc_id: String,
    /// The allocation directory (absolute; its `alloc/` is shared by tasks).
    pub alloc_dir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub resources: Resources,
    /// Nomad's stdout FIFO; the console is copied there. Empty: no copy.
    pub stdout_path: PathBuf,
    /// The job's `config` block, checked into types.
    pub config: TaskSpec,
}

/// What a successful start produced.
#[derive(Debug, Clone)]
pub struct StartedTask {
    /// Goes into the task handle; RecoverTask gets it back.
    pub state: DriverState,
    /// The guest's address, for services with `address_mode = "driver"`.
    pub network: Option<DriverNetwork>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExit {
    pub exit_code: i32,
    pub signal: i32,
    /// Set when the task ended because something went wrong.
    pub error: Option<String>,
    pub at: SystemTime,
}

/// What InspectTask reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStatus {
    pub task_id: String,
    pub task_name: String,
    pub domain_name: String,
    pub started_at: SystemTime,
    /// `None` while the task runs.
    pub exit: Option<TaskExit>,
    pub guest_ip: Option<Ipv4Addr>,
}

/// One resource-usage reading of a running task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsageSample {
    /// Percent of one host core.
    pub cpu_percent: f64,
    /// MHz consumed (Nomad's total ticks).
    pub cpu_total_ticks: f64,
    pub memory_rss_bytes: u64,
    pub memory_usage_bytes: u64,
    pub memory_max_usage_bytes: u64,
    pub at: SystemTime,
}

/// A message about a task, shown in `nomad alloc status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    pub task_id: String,
    pub alloc_id: String,
    pub task_name: String,
    pub message: String,
    pub at: SystemTime,
}
