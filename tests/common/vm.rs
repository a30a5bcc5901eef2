//! End-to-end helpers: a real libvirtd, the tiny test guest, and a Nomad-like
//! alloc dir. Tests check their prerequisites first with
//! `common::host_ready(common::host::VM)`. An [`Alloc`] dropped by a failing
//! test saves its domains' XML, the console logs and `iptables-save` under
//! `target/e2e/` (see [`Alloc::save_diagnostics`]).
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nomad_driver_virt::nomad_client::PluginClient;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    AllocatedCpuResources, AllocatedMemoryResources, AllocatedTaskResources, LinuxResources,
    Resources, StartTaskRequest, StartTaskResponse, TaskConfig,
};

/// Where tests/setup/guest.sh builds the test guest by default.
pub const DEFAULT_GUEST_DIR: &str = "/var/lib/nomad-driver-virt-test";

/// The variable naming another guest dir (`bash tests/setup/guest.sh DIR`),
/// e.g. to try a changed guest.sh while another run uses the shared one.
/// tests/common/agent_vm.rs and the exec benchmarks read it too.
pub const GUEST_DIR_VAR: &str = "NDV_TEST_GUEST_DIR";

/// The test guest's directory: [`GUEST_DIR_VAR`] or [`DEFAULT_GUEST_DIR`].
pub fn guest_dir() -> PathBuf {
    std::env::var_os(GUEST_DIR_VAR)
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR), PathBuf::from)
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
    /// Ids of the tasks [`Alloc::task_config`] made, so a failing test can
    /// find their domains.
    task_ids: Mutex<Vec<String>>,
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
            task_ids: Mutex::new(Vec::new()),
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
        nomad_driver_virt::nomad_client::logmon::LogMon::start(
            &alloc.stdout_path(),
            &alloc.stdout_log(),
        )
        .expect("stdout FIFO and its logmon");
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

    /// The stdout FIFO the plugin writes the console to (Nomad's name).
    pub fn stdout_path(&self) -> PathBuf {
        self.alloc_dir()
            .join("alloc/logs")
            .join(format!(".{}.stdout.fifo", self.task_name))
    }

    /// The log file the FIFO is copied into, as Nomad's logmon does.
    pub fn stdout_log(&self) -> PathBuf {
        self.alloc_dir()
            .join("alloc/logs")
            .join(format!("{}.stdout.0", self.task_name))
    }

    /// The plugin config for this alloc's pool, TCG, and the guest image dir.
    pub fn plugin_config(&self) -> String {
        format!(
            "provider {{\n  libvirt {{\n    uri = \"qemu:///system\"\n  }}\n}}\nimage_paths = [\"{}\"]\naccelerator = \"tcg\"\nlog_level = \"debug\"\nstorage_pools {{\n  directory \"{}\" {{\n    path = \"{}\"\n  }}\n}}\n",
            guest_dir().display(),
            self.pool_name,
            self.pool_dir().display()
        )
    }

    /// What Nomad's client would send for this task.
    /// The task the task-config HCL `job` describes, encoded by the plugin
    /// as Nomad's client would, in this allocation.
    #[allow(dead_code)] // not every test binary starts tasks from HCL
    pub async fn task(&self, plugin: &PluginClient, job: &str, memory_mb: i64) -> TaskConfig {
        let msgpack = plugin
            .encode_task_config(job, &HashMap::new())
            .await
            .expect("the plugin encodes the task config");
        self.task_config(msgpack, memory_mb)
    }

    pub fn task_config(&self, msgpack: Vec<u8>, memory_mb: i64) -> TaskConfig {
        let task_id = format!("{}/{}/{}", self.alloc_id, self.task_name, short_id());
        self.task_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(task_id.clone());
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
        std::fs::read_to_string(self.stdout_log())
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

/// Where failing e2e tests leave their diagnostics: `target/e2e/`.
pub fn diagnostics_root() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`, wherever the target dir is.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new("target"))
        .join("e2e")
}

impl Alloc {
    /// The names of the domains of the tasks this alloc configured.
    pub fn domain_names(&self) -> Vec<String> {
        let ids = self
            .task_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut names: Vec<String> = ids
            .iter()
            .map(|id| nomad_driver_virt::task::plan::domain_name(&self.task_name, id))
            .collect();
        names.dedup();
        names
    }

    /// `target/e2e/<test>-<task>/`: the test's name is its thread's name
    /// (libtest names each test's thread after the test).
    pub fn diagnostics_dir(&self) -> PathBuf {
        let test = std::thread::current()
            .name()
            .filter(|name| *name != "main")
            .map_or_else(|| self.alloc_id.clone(), str::to_string);
        let name: String = format!("{test}-{}", self.task_name)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        diagnostics_root().join(name)
    }

    /// Saves what explains a failure into [`Alloc::diagnostics_dir`]: each
    /// domain's XML (`virsh dumpxml`), the task dir's `virt-console.log`,
    /// the task's stdout file and `iptables-save`. Runs from `Drop` while a
    /// test panics, so it never panics itself: what cannot be saved is noted
    /// in the file instead. Returns the directory.
    pub fn save_diagnostics(&self) -> PathBuf {
        let dir = self.diagnostics_dir();
        // A previous run's files would mislead.
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("e2e diagnostics: cannot create {}: {e}", dir.display());
            return dir;
        }
        let mut saved = Vec::new();
        let mut save = |name: &str, contents: Vec<u8>| {
            let path = dir.join(name);
            match std::fs::write(&path, contents) {
                Ok(()) => saved.push(name.to_string()),
                Err(e) => eprintln!("e2e diagnostics: cannot write {}: {e}", path.display()),
            }
        };
        for domain in self.domain_names() {
            save(
                &format!("{domain}.xml"),
                command_output(&["virsh", "-c", "qemu:///system", "dumpxml", &domain]),
            );
        }
        let stdout_name = format!("{}.stdout.0", self.task_name);
        for (name, path) in [
            ("virt-console.log", self.task_dir().join("virt-console.log")),
            (stdout_name.as_str(), self.stdout_log()),
        ] {
            save(
                name,
                std::fs::read(&path).unwrap_or_else(|e| {
                    format!("(could not read {}: {e})\n", path.display()).into_bytes()
                }),
            );
        }
        save("iptables-save.txt", command_output(&["iptables-save"]));
        eprintln!(
            "e2e diagnostics of the failed test in {}: {}",
            dir.display(),
            saved.join(", ")
        );
        dir
    }
}

/// A command's stdout, or a note saying why there is none.
fn command_output(argv: &[&str]) -> Vec<u8> {
    let Some((program, args)) = argv.split_first() else {
        return Vec::new();
    };
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => out.stdout,
        Ok(out) => format!(
            "(`{}` failed ({}): {})\n",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into_bytes(),
        Err(e) => format!("(could not run `{}`: {e})\n", argv.join(" ")).into_bytes(),
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.save_diagnostics();
        }
        // Remove the private pool from libvirt (its directory goes with the tempdir).
        let _ = Command::new("virsh")
            .args([
                "-q",
                "-c",
                "qemu:///system",
                "pool-destroy",
                &self.pool_name,
            ])
            .output();
        let _ = Command::new("virsh")
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
    Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "dominfo", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Volume names in a pool (empty if the pool is gone).
pub fn pool_volumes(pool: &str) -> Vec<String> {
    let _ = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "pool-refresh", pool])
        .output();
    let output = Command::new("virsh")
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
