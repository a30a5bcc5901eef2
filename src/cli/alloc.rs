//! What a Nomad client builds for a task before calling the driver, for one
//! local allocation: ids, the NOMAD_* environment, resources with Nomad's
//! defaults, the group's ports, the allocation directory, and the
//! `TaskConfig` message StartTask receives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::job::{self, Group, Job, Network, Task};
use crate::pb::hashicorp::nomad::plugins::drivers::proto::{
    AllocatedCpuResources, AllocatedMemoryResources, AllocatedTaskResources, LinuxResources,
    PortMapping, Resources, TaskConfig,
};

/// Nomad's default `resources { cpu }` in MHz.
pub const DEFAULT_CPU_MHZ: i64 = 100;
/// Nomad's default `resources { memory }` in MB.
pub const DEFAULT_MEMORY_MB: i64 = 300;
/// The datacenter the local "node" is in when the job allows any.
pub const DEFAULT_DATACENTER: &str = "dc1";

/// Who an allocation is: what the NOMAD_* identity variables say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocIdentity {
    pub alloc_id: String,
    /// `<job>.<group>[<index>]`.
    pub alloc_name: String,
    pub job_id: String,
    pub job_name: String,
    pub group: String,
    pub namespace: String,
    pub region: String,
    pub datacenter: String,
    pub node_name: String,
    pub node_id: String,
}

impl AllocIdentity {
    pub fn new(job: &Job, group: &Group, alloc_id: String, node_name: String) -> Self {
        let datacenter = job
            .datacenters
            .iter()
            .find(|dc| !dc.contains('*') && !dc.is_empty())
            .cloned()
            .unwrap_or_else(|| DEFAULT_DATACENTER.to_string());
        Self {
            alloc_name: format!("{}.{}[0]", job.id, group.name),
            job_id: job.id.clone(),
            job_name: job.name.clone(),
            group: group.name.clone(),
            namespace: job.namespace.clone(),
            region: job.region.clone(),
            datacenter,
            node_name,
            node_id: String::new(),
            alloc_id,
        }
    }
}

/// A random UUID (v4), the shape of Nomad's alloc and node ids.
pub fn new_uuid() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: fall back to the clock and pid, still unique enough here.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Nomad's task id: `<alloc id>/<task>/<first 8 chars of a UUID>`.
pub fn task_id(alloc_id: &str, task_name: &str) -> String {
    format!("{alloc_id}/{task_name}/{}", &new_uuid()[..8])
}

/// A task's resources with Nomad's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskResources {
    pub cpu_mhz: i64,
    pub memory_mb: i64,
    pub memory_max_mb: i64,
    /// Reserved cores (`resources { cores }`), as a cpuset list.
    pub cpuset: Option<String>,
}

/// The host CPU facts resources depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    pub cpus: u32,
    pub mhz_per_core: i64,
}

impl HostCpu {
    /// Reads this machine's CPU count and speed (`cpu MHz` in /proc/cpuinfo).
    pub fn detect() -> HostCpu {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let mhz = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("cpu MHz"))
                    .and_then(|line| line.split(':').nth(1))
                    .and_then(|value| value.trim().parse::<f64>().ok())
            })
            .map(|mhz| mhz as i64)
            .filter(|mhz| *mhz > 0)
            .unwrap_or(1000);
        HostCpu {
            cpus,
            mhz_per_core: mhz,
        }
    }
}

/// Applies Nomad's defaults; `cores` reserves the first cores of the host
/// and, as in Nomad, sets the CPU share to those cores' total speed.
pub fn resolve_resources(spec: &job::Resources, host: HostCpu) -> Result<TaskResources, String> {
    let memory_mb = spec.memory.unwrap_or(DEFAULT_MEMORY_MB);
    let memory_max_mb = spec.memory_max.unwrap_or(0);
    let (cpu_mhz, cpuset) = match spec.cores {
        Some(cores) => {
            if cores > i64::from(host.cpus) {
                return Err(format!(
                    "resources.cores = {cores}, but this machine has {} CPUs",
                    host.cpus
                ));
            }
            let cpuset = (0..cores)
                .map(|core| core.to_string())
                .collect::<Vec<_>>()
                .join(",");
            (cores * host.mhz_per_core, Some(cpuset))
        }
        None => (spec.cpu.unwrap_or(DEFAULT_CPU_MHZ), None),
    };
    Ok(TaskResources {
        cpu_mhz,
        memory_mb,
        memory_max_mb,
        cpuset,
    })
}

/// Gives the group's ports their host ports and addresses as Nomad's
/// scheduler would: static ports as written, dynamic ones from `pick`;
/// `host_network` ports on loopback, the others on `primary_ip`.
pub fn allocate_ports(
    network: Option<&Network>,
    primary_ip: Ipv4Addr,
    mut pick: impl FnMut(&BTreeSet<u16>) -> Option<u16>,
) -> Result<Vec<PortMapping>, String> {
    let Some(network) = network else {
        return Ok(Vec::new());
    };
    let mut taken: BTreeSet<u16> = BTreeSet::new();
    for port in &network.ports {
        if let Some(value) = port.static_port {
            if !taken.insert(value) {
                return Err(format!(
                    "network.port \"{}\": static port {value} is used twice in the group",
                    port.label
                ));
            }
        }
    }
    let mut mappings = Vec::new();
    for port in &network.ports {
        let value = match port.static_port {
            Some(value) => value,
            None => {
                let value = pick(&taken).ok_or_else(|| {
                    format!(
                        "network.port \"{}\": no free dynamic port in {}-{}",
                        port.label,
                        super::hostnet::DYNAMIC_PORTS.start(),
                        super::hostnet::DYNAMIC_PORTS.end()
                    )
                })?;
                taken.insert(value);
                value
            }
        };
        let host_ip = if port.host_network.is_some() {
            super::hostnet::HOST_NETWORK_ADDRESS
        } else {
            primary_ip
        };
        mappings.push(PortMapping {
            label: port.label.clone(),
            value: i32::from(value),
            // Nomad: `to = -1` means "the same as the host port"; 0 stays 0.
            to: if port.to == -1 {
                i32::from(value)
            } else {
                port.to
            },
            host_ip: host_ip.to_string(),
        });
    }
    Ok(mappings)
}

/// Nomad's `helper.CleanEnvVar`: anything but letters, digits and '_' becomes '_'.
fn env_name(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The environment Nomad's client gives a task whose driver isolates the
/// file system as an image: the NOMAD_* variables (paths as the guest sees
/// them) and then the task's `env` block, interpolated against them. As in
/// Nomad, the host's environment is not inherited and the task's own
/// variables win over Nomad's.
pub fn task_env(
    identity: &AllocIdentity,
    task: &Task,
    resources: &TaskResources,
    ports: &[PortMapping],
) -> Result<BTreeMap<String, String>, (usize, String)> {
    let mut env = BTreeMap::new();
    let mut set = |name: &str, value: String| {
        env.insert(name.to_string(), value);
    };
    set("NOMAD_ALLOC_DIR", "/alloc".into());
    set("NOMAD_TASK_DIR", "/local".into());
    set("NOMAD_SECRETS_DIR", "/secrets".into());
    set("NOMAD_ALLOC_ID", identity.alloc_id.clone());
    set(
        "NOMAD_SHORT_ALLOC_ID",
        identity.alloc_id.chars().take(8).collect(),
    );
    set("NOMAD_ALLOC_NAME", identity.alloc_name.clone());
    set("NOMAD_ALLOC_INDEX", "0".into());
    set("NOMAD_JOB_ID", identity.job_id.clone());
    set("NOMAD_JOB_NAME", identity.job_name.clone());
    set("NOMAD_GROUP_NAME", identity.group.clone());
    set("NOMAD_TASK_NAME", task.name.clone());
    set("NOMAD_DC", identity.datacenter.clone());
    set("NOMAD_REGION", identity.region.clone());
    set("NOMAD_NAMESPACE", identity.namespace.clone());
    set("NOMAD_MEMORY_LIMIT", resources.memory_mb.to_string());
    if resources.memory_max_mb > 0 {
        set(
            "NOMAD_MEMORY_MAX_LIMIT",
            resources.memory_max_mb.to_string(),
        );
    }
    set("NOMAD_CPU_LIMIT", resources.cpu_mhz.to_string());
    if let Some(cpuset) = &resources.cpuset {
        set("NOMAD_CPU_CORES", cpuset.clone());
    }
    if !identity.node_name.is_empty() {
        set("NOMAD_NODE_NAME", identity.node_name.clone());
    }
    for port in ports {
        let label = env_name(&port.label);
        let host_port = port.value.to_string();
        let address = format!("{}:{}", port.host_ip, port.value);
        // Nomad's buildPortEnv for group ports: NOMAD_PORT_ is the port
        // inside the task when `to` is set, the host port otherwise.
        let task_port = if port.to > 0 {
            port.to.to_string()
        } else {
            host_port.clone()
        };
        set(&format!("NOMAD_PORT_{label}"), task_port);
        set(&format!("NOMAD_HOST_PORT_{label}"), host_port);
        set(&format!("NOMAD_IP_{label}"), port.host_ip.clone());
        set(&format!("NOMAD_ADDR_{label}"), address.clone());
        set(&format!("NOMAD_HOST_IP_{label}"), port.host_ip.clone());
        set(&format!("NOMAD_HOST_ADDR_{label}"), address);
    }
    let nomad_env = env.clone();
    for entry in &task.env {
        let value = job::eval_with_env(&entry.value, &nomad_env)
            .and_then(|value| job::env_value_text(&value))
            .map_err(|message| (entry.line, format!("env.{}: {message}", entry.name)))?;
        env.insert(entry.name.clone(), value);
    }
    Ok(env)
}

/// Where a task's files are inside its allocation directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocPaths {
    pub root: PathBuf,
}

impl AllocPaths {
    pub fn new(state_dir: &Path, alloc_id: &str) -> Self {
        Self {
            root: state_dir.join(alloc_id),
        }
    }

    pub fn task_dir(&self, task: &str) -> PathBuf {
        self.root.join(task)
    }

    /// The FIFO the driver copies the guest console to (Nomad's name).
    pub fn stdout_path(&self, task: &str) -> PathBuf {
        self.root
            .join("alloc/logs")
            .join(format!(".{task}.stdout.fifo"))
    }

    /// The log file logmon copies that FIFO into (what `run` follows).
    pub fn stdout_log(&self, task: &str) -> PathBuf {
        self.root
            .join("alloc/logs")
            .join(format!("{task}.stdout.0"))
    }

    pub fn stderr_path(&self, task: &str) -> PathBuf {
        self.root
            .join("alloc/logs")
            .join(format!("{task}.stderr.0"))
    }

    /// Creates the layout Nomad's client makes: `alloc/{logs,data,tmp}` and
    /// `<task>/{local,secrets,tmp}`.
    ///
    /// Permissions: QEMU runs as an unprivileged user (libvirt-qemu on
    /// Debian) and serves `alloc`, `local` and `secrets` to the guest over
    /// 9p, so it must be able to list them: directories are 0755. Nomad
    /// keeps `secrets` private to the task (0711 on a tmpfs); here it is
    /// 0750 with QEMU's group, so QEMU can read it and other users cannot,
    /// or 0755 when QEMU's group cannot be found (with a warning).
    pub fn create(&self, tasks: &[String], qemu_group: Option<u32>) -> std::io::Result<()> {
        let mut dirs = vec![
            self.root.clone(),
            self.root.join("alloc"),
            self.root.join("alloc/logs"),
            self.root.join("alloc/data"),
            self.root.join("alloc/tmp"),
        ];
        for task in tasks {
            let task_dir = self.task_dir(task);
            dirs.push(task_dir.join("local"));
            dirs.push(task_dir.join("tmp"));
            dirs.push(task_dir.clone());
        }
        if let Some(parent) = self.root.parent() {
            std::fs::create_dir_all(parent)?;
            make_traversable(parent)?;
        }
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        for task in tasks {
            let secrets = self.task_dir(task).join("secrets");
            std::fs::create_dir_all(&secrets)?;
            match qemu_group {
                Some(gid) => {
                    std::os::unix::fs::chown(&secrets, None, Some(gid))?;
                    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o750))?;
                }
                None => std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o755))?,
            }
        }
        Ok(())
    }

    /// Removes the allocation directory; a missing one is fine.
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }
}

/// Adds o+x to the state directory and its parents we may have created, so
/// QEMU can reach the shares below them.
fn make_traversable(dir: &Path) -> std::io::Result<()> {
    let metadata = std::fs::metadata(dir)?;
    let mode = metadata.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;
    }
    Ok(())
}

/// The group QEMU runs as: `group` in /etc/libvirt/qemu.conf, else
/// Debian's default `libvirt-qemu`, resolved through /etc/group.
pub fn qemu_group_id() -> Option<u32> {
    let conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    let name = qemu_conf_value(&conf, "group").unwrap_or_else(|| "libvirt-qemu".to_string());
    if let Some(numeric) = name.strip_prefix('+') {
        return numeric.parse().ok();
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    group_id(&groups, &name)
}

/// An uncommented `key = "value"` setting of a libvirt config file.
pub fn qemu_conf_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (name, value) = line.trim().split_once('=')?;
        (name.trim() == key).then(|| value.trim().trim_matches('"').to_string())
    })
}

/// A group's id from /etc/group text.
pub fn group_id(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

/// Everything StartTask gets for one task, as Nomad's client fills it.
pub struct TaskRequest<'a> {
    pub identity: &'a AllocIdentity,
    pub task: &'a Task,
    pub task_id: String,
    pub env: &'a BTreeMap<String, String>,
    pub resources: &'a TaskResources,
    pub ports: &'a [PortMapping],
    pub paths: &'a AllocPaths,
    pub host: HostCpu,
    pub msgpack_config: Vec<u8>,
}

impl TaskRequest<'_> {
    pub fn task_config(self) -> TaskConfig {
        let resources = self.resources;
        let total_mhz = i64::from(self.host.cpus) * self.host.mhz_per_core;
        TaskConfig {
            id: self.task_id,
            name: self.task.name.clone(),
            msgpack_driver_config: self.msgpack_config,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
            resources: Some(Resources {
                allocated_resources: Some(AllocatedTaskResources {
                    cpu: Some(AllocatedCpuResources {
                        cpu_shares: resources.cpu_mhz,
                    }),
                    memory: Some(AllocatedMemoryResources {
                        memory_mb: resources.memory_mb,
                        memory_max_mb: resources.memory_max_mb,
                    }),
                    networks: vec![],
                }),
                linux_resources: Some(LinuxResources {
                    cpu_shares: resources.cpu_mhz,
                    memory_limit_bytes: resources.memory_mb.max(resources.memory_max_mb)
                        * 1024
                        * 1024,
                    cpuset_cpus: resources.cpuset.clone().unwrap_or_default(),
                    percent_ticks: if total_mhz > 0 {
                        resources.cpu_mhz as f64 / total_mhz as f64
                    } else {
                        0.0
                    },
                    ..Default::default()
                }),
                ports: self.ports.to_vec(),
            }),
            user: self.task.user.clone().unwrap_or_default(),
            alloc_dir: self.paths.root.display().to_string(),
            stdout_path: self
                .paths
                .stdout_path(&self.task.name)
                .display()
                .to_string(),
            stderr_path: self
                .paths
                .stderr_path(&self.task.name)
                .display()
                .to_string(),
            task_group_name: self.identity.group.clone(),
            job_name: self.identity.job_name.clone(),
            job_id: self.identity.job_id.clone(),
            alloc_id: self.identity.alloc_id.clone(),
            namespace: self.identity.namespace.clone(),
            node_name: self.identity.node_name.clone(),
            node_id: self.identity.node_id.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::job::JobFile;

    fn job() -> JobFile {
        JobFile::parse(
            Path::new("j.hcl"),
            r#"job "web" {
  datacenters = ["*"]
  group "g" {
    network {
      port "http" {
        static = 8080
        to     = 80
      }
      port "ssh-port" {
        to = -1
      }
      port "lo" {
        host_network = "loopback"
      }
    }
    task "vm" {
      driver = "virt"
      config {}
      env {
        WHO      = "${NOMAD_TASK_NAME}@${NOMAD_IP_http}"
        NOMAD_DC = "mine"
      }
    }
  }
}
"#
            .to_string(),
        )
        .expect("parses")
    }

    #[test]
    fn uuids_look_like_nomads() {
        let id = new_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_ne!(id, new_uuid());
        let task = task_id(&id, "web");
        assert!(task.starts_with(&format!("{id}/web/")));
        assert_eq!(task.rsplit('/').next().map(str::len), Some(8));
    }

    #[test]
    fn ports_env_and_resources() {
        let file = job();
        let group = &file.job.groups[0];
        let mut next = 20000;
        let ports = allocate_ports(group.network.as_ref(), Ipv4Addr::new(10, 0, 0, 5), |_| {
            next += 1;
            Some(next)
        })
        .expect("ports");
        assert_eq!(
            ports[0],
            PortMapping {
                label: "http".into(),
                value: 8080,
                to: 80,
                host_ip: "10.0.0.5".into()
            }
        );
        assert_eq!((ports[1].value, ports[1].to), (20001, 20001));
        assert_eq!((ports[2].value, ports[2].to), (20002, 0));
        assert_eq!(ports[2].host_ip, "127.0.0.1");

        let identity = AllocIdentity::new(&file.job, group, new_uuid(), "node".into());
        assert_eq!(identity.alloc_name, "web.g[0]");
        assert_eq!(identity.datacenter, "dc1");
        let host = HostCpu {
            cpus: 4,
            mhz_per_core: 2000,
        };
        let resources = resolve_resources(&group.tasks[0].resources, host).expect("resources");
        assert_eq!(
            resources,
            TaskResources {
                cpu_mhz: 100,
                memory_mb: 300,
                memory_max_mb: 0,
                cpuset: None
            }
        );
        let env = task_env(&identity, &group.tasks[0], &resources, &ports).expect("env");
        assert_eq!(env["NOMAD_PORT_http"], "80");
        assert_eq!(env["NOMAD_HOST_PORT_http"], "8080");
        assert_eq!(env["NOMAD_ADDR_http"], "10.0.0.5:8080");
        assert_eq!(env["NOMAD_PORT_ssh_port"], "20001");
        assert_eq!(env["NOMAD_PORT_lo"], "20002");
        assert_eq!(env["NOMAD_IP_lo"], "127.0.0.1");
        assert_eq!(env["NOMAD_MEMORY_LIMIT"], "300");
        assert_eq!(env["NOMAD_CPU_LIMIT"], "100");
        assert_eq!(env["NOMAD_ALLOC_INDEX"], "0");
        assert_eq!(env["WHO"], "vm@10.0.0.5");
        assert_eq!(env["NOMAD_DC"], "mine");
        assert!(!env.contains_key("PATH"));
    }

    #[test]
    fn cores_reserve_cpus() {
        let host = HostCpu {
            cpus: 4,
            mhz_per_core: 2000,
        };
        let spec = job::Resources {
            cores: Some(2),
            memory: Some(512),
            memory_max: Some(1024),
            ..Default::default()
        };
        let resources = resolve_resources(&spec, host).expect("resources");
        assert_eq!(resources.cpuset.as_deref(), Some("0,1"));
        assert_eq!(resources.cpu_mhz, 4000);
        let too_many = job::Resources {
            cores: Some(5),
            ..Default::default()
        };
        assert!(resolve_resources(&too_many, host).is_err());
    }

    #[test]
    fn duplicate_static_ports_are_rejected() {
        let file = JobFile::parse(
            Path::new("j.hcl"),
            "job \"j\" {\n group \"g\" {\n network {\n port \"a\" { static = 80 }\n port \"b\" { static = 80 }\n }\n task \"t\" { driver = \"virt\" }\n }\n}\n".into(),
        )
        .expect("parses");
        let error = allocate_ports(
            file.job.groups[0].network.as_ref(),
            Ipv4Addr::LOCALHOST,
            |_| None,
        )
        .expect_err("collision");
        assert!(error.contains("used twice"), "{error}");
    }

    #[test]
    fn qemu_group_lookup() {
        let conf = "#group = \"nobody\"\n  group = \"kvm\"\n";
        assert_eq!(qemu_conf_value(conf, "group").as_deref(), Some("kvm"));
        assert_eq!(qemu_conf_value("#group = \"x\"\n", "group"), None);
        let groups = "root:x:0:\nkvm:x:107:libvirt-qemu\nlibvirt-qemu:x:64055:\n";
        assert_eq!(group_id(groups, "kvm"), Some(107));
        assert_eq!(group_id(groups, "libvirt-qemu"), Some(64055));
        assert_eq!(group_id(groups, "nope"), None);
    }

    #[test]
    fn alloc_dir_layout() {
        let state = tempfile::tempdir().expect("tempdir");
        let paths = AllocPaths::new(state.path(), "a1");
        paths.create(&["web".to_string()], None).expect("create");
        for dir in [
            "alloc/logs",
            "alloc/data",
            "alloc/tmp",
            "web/local",
            "web/secrets",
            "web/tmp",
        ] {
            let path = paths.root.join(dir);
            assert!(path.is_dir(), "{dir}");
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o755, "{dir}");
        }
        assert_eq!(
            paths.stdout_log("web"),
            paths.root.join("alloc/logs/web.stdout.0")
        );
        paths.remove().expect("remove");
        assert!(!paths.root.exists());
        paths.remove().expect("idempotent");
    }
}
