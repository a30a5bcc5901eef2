//! End-to-end helpers: a real libvirtd, the tiny test guest, and a Nomad-like
//! alloc dir. Missing prerequisites fail loudly with the command that fixes them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nomad_driver_virt::nomad_client::PluginClient;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    AllocatedCpuResources, AllocatedMemoryResources, AllocatedTaskResources, LinuxResources,
    Resources, StartTaskRequest, StartTaskResponse, TaskConfig,
};

pub const GUEST_DIR: &str = "/var/lib/nomad-driver-virt-test";

/// Panics with the fix when the host is not prepared.
pub fn require_host() {
    let virsh = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output();
    match virsh {
        Ok(output) if output.status.success() => {}
        _ => panic!("libvirtd is not reachable at qemu:///system: run `bash tests/setup/host.sh` as root first"),
    }
    let image = Path::new(GUEST_DIR).join("guest.qcow2");
    assert!(
        image.is_file(),
        "{} is missing: run `bash tests/setup/guest.sh` as root first",
        image.display()
    );
}

/// A unique, short id for names in this test run.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{:x}{:05x}",
        std::process::id() & 0xfff,
        nanos & 0xfffff
    )
}

/// Eight hex characters, like Nomad's short task-id suffix.
pub fn short_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:08x}",
        (nanos as u64 ^ (u64::from(std::process::id()) << 24)) & 0xffff_ffff
    )
}

/// A Nomad-like allocation directory and a private storage pool.
pub struct Alloc {
    pub root: tempfile::TempDir,
    pub alloc_id: String,
    pub task_name: String,
    pub pool_name: String,
}

impl Alloc {
    pub fn new(task_name: &str) -> Alloc {
        let root = tempfile::Builder::new()
            .prefix("ndvtest-")
            .tempdir()
            .expect("tempdir");
        // QEMU runs as libvirt-qemu: it must be able to reach the shared dirs.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let alloc_id = unique("alloc");
        let alloc = Alloc {
            root,
            alloc_id,
            task_name: task_name.to_string(),
            pool_name: unique("ndvtest-pool-"),
        };
        for dir in [
            alloc.alloc_dir().join("alloc/logs"),
            alloc.task_dir().join("local"),
            alloc.task_dir().join("secrets"),
            alloc.pool_dir(),
        ] {
            std::fs::create_dir_all(&dir).expect("mkdir");
        }
        for dir in [
            alloc.alloc_dir(),
            alloc.alloc_dir().join("alloc"),
            alloc.task_dir(),
            alloc.task_dir().join("local"),
            alloc.task_dir().join("secrets"),
        ] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        alloc
    }

    pub fn alloc_dir(&self) -> PathBuf {
        self.root.path().join("alloc-dir")
    }

    pub fn task_dir(&self) -> PathBuf {
        self.alloc_dir().join(&self.task_name)
    }

    pub fn pool_dir(&self) -> PathBuf {
        self.root.path().join("pool")
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.alloc_dir()
            .join("alloc/logs")
            .join(format!("{}.stdout.0", self.task_name))
    }

    /// The plugin config for this alloc's pool, TCG, and the guest image dir.
    pub fn plugin_config(&self) -> String {
        format!(
            "provider {{\n  libvirt {{\n    uri = \"qemu:///system\"\n  }}\n}}\nimage_paths = [\"{GUEST_DIR}\"]\naccelerator = \"tcg\"\nlog_level = \"debug\"\nstorage_pools {{\n  directory \"{}\" {{\n    path = \"{}\"\n  }}\n}}\n",
            self.pool_name,
            self.pool_dir().display()
        )
    }

    /// What Nomad's client would send for this task.
    pub fn task_config(&self, msgpack: Vec<u8>, memory_mb: i64) -> TaskConfig {
        let task_id = format!("{}/{}/{}", self.alloc_id, self.task_name, short_id());
        let env = HashMap::from([
            ("NOMAD_ALLOC_ID".to_string(), self.alloc_id.clone()),
            ("NOMAD_TASK_NAME".to_string(), self.task_name.clone()),
            ("NOMAD_ALLOC_DIR".to_string(), "/alloc".to_string()),
            ("GREETING".to_string(), "it's a VM".to_string()),
        ]);
        TaskConfig {
            id: task_id,
            name: self.task_name.clone(),
            msgpack_driver_config: msgpack,
            env,
            resources: Some(Resources {
                allocated_resources: Some(AllocatedTaskResources {
                    cpu: Some(AllocatedCpuResources { cpu_shares: 500 }),
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
            alloc_dir: self.alloc_dir().display().to_string(),
            stdout_path: self.stdout_path().display().to_string(),
            stderr_path: "/dev/null".into(),
            alloc_id: self.alloc_id.clone(),
            task_group_name: "group".into(),
            job_name: "e2e".into(),
            ..Default::default()
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.stdout_path())
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// Waits until the task's stdout (the guest console) contains `marker`.
    pub fn wait_for_console(&self, marker: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.console();
            if text.contains(marker) {
                return text;
            }
            if start.elapsed() > limit {
                panic!("console did not show {marker:?} within {limit:?}; console so far:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        // Remove the private pool from libvirt (its directory goes with the tempdir).
        let _ = std::process::Command::new("virsh")
            .args([
                "-q",
                "-c",
                "qemu:///system",
                "pool-destroy",
                &self.pool_name,
            ])
            .output();
        let _ = std::process::Command::new("virsh")
            .args([
                "-q",
                "-c",
                "qemu:///system",
                "pool-undefine",
                &self.pool_name,
            ])
            .output();
    }
}

/// Starts a task through the plugin.
pub async fn start(
    plugin: &PluginClient,
    task: TaskConfig,
) -> Result<StartTaskResponse, tonic::Status> {
    plugin
        .driver()
        .start_task(StartTaskRequest { task: Some(task) })
        .await
        .map(|r| r.into_inner())
}

/// Whether libvirt knows a domain by this name.
pub fn domain_exists(name: &str) -> bool {
    std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "dominfo", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Volume names in a pool (empty if the pool is gone).
pub fn pool_volumes(pool: &str) -> Vec<String> {
    let _ = std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "pool-refresh", pool])
        .output();
    let output = std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "vol-list", pool])
        .output();
    match output {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// The domain name the driver derives (`<task>-<8 chars>`).
pub fn domain_name_of(task: &TaskConfig) -> String {
    nomad_driver_virt::task::plan::domain_name(&task.name, &task.id)
}
