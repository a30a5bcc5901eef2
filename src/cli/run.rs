//! `run`: runs a job file's virt tasks on this machine the way a Nomad
//! client would: one allocation per group with Nomad's directory layout,
//! environment, resources and ports; the plugin (this same binary) launched
//! and driven over go-plugin gRPC; progress from TaskEvents; the guest
//! console followed; Ctrl-C stops the tasks within their kill_timeout.
//!
//! Whatever happens, the VMs and allocation directories this run created
//! are removed before it exits: every started task is destroyed through the
//! plugin, or, if the plugin died, through a fresh plugin that recovers the
//! task from its handle first (as Nomad does after a plugin crash).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::sync::{mpsc, watch};

use super::alloc::{self, AllocIdentity, AllocPaths, HostCpu, TaskRequest, TaskResources};
use super::artifact::{self, LocalArtifact};
use super::control::{self, ControlServer, TaskDirectory};
use super::hostnet;
use super::job::{JobFile, Task};
use super::template::{self, LocalTemplate};
use super::validate;
use super::{Diagnostic, Diagnostics};
use crate::config::task::TaskSpec;
use crate::nomad_client::{LaunchOptions, PluginClient};
use crate::pb::hashicorp::nomad::plugins::base::proto::{NomadConfig, NomadDriverConfig};
use crate::pb::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, FingerprintRequest, PortMapping, RecoverTaskRequest, StartTaskRequest,
    StartTaskResponse, StopTaskRequest, TaskEventsRequest, TaskHandle, WaitTaskRequest,
    WaitTaskResponse,
};

/// Where allocation directories go by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nomad-driver-virt/run";
/// Nomad's default `kill_timeout`.
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Nomad's client `max_kill_timeout` default: StopTask never gets more.
pub const MAX_KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// The plugin block label Nomad matches against the binary's file name.
pub use crate::config::client::PLUGIN_BLOCK_LABEL;
/// How long to wait for a task's exit after StopTask returned.
const EXIT_AFTER_STOP: Duration = Duration::from_secs(30);
/// How often the console file is read.
const CONSOLE_POLL: Duration = Duration::from_millis(200);
/// Quiet time after which a burst of task events is over.
const EVENTS_QUIET: Duration = Duration::from_millis(300);
/// Longest wait for task events to settle.
const EVENTS_SETTLE_MAX: Duration = Duration::from_secs(2);
/// Exit code when a run is interrupted before any task started.
const INTERRUPTED: i32 = 130;

/// Runs the job's driver = "virt" tasks on this machine's libvirt, through
/// the plugin interface Nomad uses. Ctrl-C stops the VMs (within each task's
/// kill_timeout) and removes them; the exit code is the task's.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RunArgs {
    /// The Nomad job file.
    #[arg(value_name = "JOBFILE")]
    pub job_file: PathBuf,
    /// A Nomad client config whose plugin "nomad-driver-virt" block
    /// configures the plugin (default: plugin defaults).
    #[arg(long, value_name = "FILE")]
    pub plugin_config: Option<PathBuf>,
    /// Run only this task.
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,
    /// Where allocation directories go.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Also show the plugin's own log lines.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// The `run` command: the task's exit code, 1 on errors.
pub fn command(args: RunArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("run: cannot start the async runtime: {error}");
            return 1;
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(error) => {
            match error.downcast_ref::<Diagnostics>() {
                Some(diagnostics) => eprintln!("{diagnostics}"),
                None => eprintln!("run: {error:#}"),
            }
            1
        }
    };
    // Blocking reads (stdin-less, but console files) must not delay exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// One task to run, with everything decided before anything is created.
#[derive(Debug, Clone)]
struct PlannedTask {
    task: Task,
    task_id: String,
    env: BTreeMap<String, String>,
    resources: TaskResources,
    typed: TaskSpec,
    artifacts: Vec<LocalArtifact>,
    templates: Vec<LocalTemplate>,
    kill_timeout: Duration,
    kill_signal: String,
}

/// One group's allocation.
#[derive(Debug, Clone)]
struct PlannedAlloc {
    identity: AllocIdentity,
    paths: AllocPaths,
    ports: Vec<PortMapping>,
    tasks: Vec<PlannedTask>,
}

fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Decides ids, ports, environments and resources for the selected tasks,
/// and validates them, so nothing is created for a job that cannot run.
fn plan(file: &JobFile, args: &RunArgs) -> anyhow::Result<Vec<PlannedAlloc>> {
    let mut problems: Vec<Diagnostic> = Vec::new();
    let mut allocs = Vec::new();
    let host = HostCpu::detect();
    let mut primary_ip = None;
    let job_dir = file
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let virt_names: Vec<&str> = file
        .job
        .groups
        .iter()
        .flat_map(|g| g.tasks.iter().filter(|t| t.is_virt()))
        .map(|t| t.name.as_str())
        .collect();
    for group in &file.job.groups {
        let selected: Vec<&Task> = group
            .tasks
            .iter()
            .filter(|task| task.is_virt())
            .filter(|task| args.task.as_ref().is_none_or(|name| *name == task.name))
            .collect();
        if selected.is_empty() {
            continue;
        }
        let scope = format!("group \"{}\"", group.name);
        if group.count == 0 {
            tracing::warn!("{scope} has count = 0; nothing to run for it");
            continue;
        }
        if group.count > 1 {
            problems.push(
                Diagnostic::new(&file.path, group.count_line, format!(
                    "is {}; the local runner runs one allocation per group: set count = 1 to run it here",
                    group.count
                ))
                .scoped(scope.clone())
                .field("count"),
            );
            continue;
        }
        for other in group.tasks.iter().filter(|task| !task.is_virt()) {
            if args.task.is_none() {
                tracing::warn!(
                    "task {:?} uses driver {:?}; the local runner runs only virt tasks, skipping it",
                    other.name,
                    other.driver.as_deref().unwrap_or_default()
                );
            }
        }
        problems.extend(validate::check_group(file, group));
        let needs_primary = group
            .network
            .iter()
            .flat_map(|n| n.ports.iter())
            .any(|port| port.host_network.is_none());
        if needs_primary && primary_ip.is_none() {
            primary_ip = Some(hostnet::primary_ipv4().unwrap_or_else(|message| {
                tracing::warn!("cannot find this host's primary IPv4 address ({message}); offering ports on 127.0.0.1");
                hostnet::HOST_NETWORK_ADDRESS
            }));
        }
        let ports = match alloc::allocate_ports(
            group.network.as_ref(),
            primary_ip.unwrap_or(hostnet::HOST_NETWORK_ADDRESS),
            hostnet::pick_dynamic_port,
        ) {
            Ok(ports) => ports,
            Err(message) => {
                problems.push(
                    Diagnostic::new(&file.path, group.network.as_ref().map(|n| n.line), message)
                        .scoped(scope),
                );
                continue;
            }
        };
        let identity = AllocIdentity::new(&file.job, group, alloc::new_uuid(), node_name());
        let paths = AllocPaths::new(&args.state_dir, &identity.alloc_id);
        let mut tasks = Vec::new();
        for task in selected {
            let task_scope = validate::task_scope(task);
            let resources = match alloc::resolve_resources(&task.resources, host) {
                Ok(resources) => resources,
                Err(message) => {
                    problems.push(
                        Diagnostic::new(&file.path, task.resources.line, message)
                            .scoped(task_scope),
                    );
                    continue;
                }
            };
            let env = match alloc::task_env(&identity, task, &resources, &ports) {
                Ok(env) => env,
                Err((line, message)) => {
                    problems
                        .push(Diagnostic::new(&file.path, Some(line), message).scoped(task_scope));
                    continue;
                }
            };
            let typed = match validate::check_task(file, group, task, &env) {
                Ok(typed) => typed,
                Err(found) => {
                    problems.extend(found);
                    continue;
                }
            };
            let mut artifacts = Vec::new();
            for spec in &task.artifacts {
                match artifact::resolve(spec, &env, &job_dir) {
                    Ok(artifact) => artifacts.push(artifact),
                    Err(error) => problems.push(
                        Diagnostic::new(&file.path, Some(spec.line), error.to_string())
                            .scoped(task_scope.clone()),
                    ),
                }
            }
            let mut templates = Vec::new();
            for spec in &task.templates {
                if !spec.ignored.is_empty() {
                    tracing::warn!(
                        "task {:?}: template settings {:?} are ignored by the local runner",
                        task.name,
                        spec.ignored
                    );
                }
                match template::resolve(spec, &env) {
                    Ok(resolved) => templates.push(resolved),
                    Err(error) => problems.push(
                        Diagnostic::new(&file.path, Some(spec.line), error.to_string())
                            .scoped(task_scope.clone()),
                    ),
                }
            }
            tasks.push(PlannedTask {
                task_id: alloc::task_id(&identity.alloc_id, &task.name),
                task: task.clone(),
                env,
                resources,
                typed,
                artifacts,
                templates,
                kill_timeout: task
                    .kill_timeout
                    .unwrap_or(DEFAULT_KILL_TIMEOUT)
                    .min(MAX_KILL_TIMEOUT),
                kill_signal: task.kill_signal.clone().unwrap_or_default(),
            });
        }
        allocs.push(PlannedAlloc {
            identity,
            paths,
            ports,
            tasks,
        });
    }
    if !problems.is_empty() {
        return Err(Diagnostics(problems).into());
    }
    if allocs.iter().all(|a| a.tasks.is_empty()) {
        match &args.task {
            Some(name) => bail!(
                "{}: no virt task named {name:?}; the job's virt tasks are: {}",
                file.path.display(),
                if virt_names.is_empty() {
                    "none".to_string()
                } else {
                    virt_names.join(", ")
                }
            ),
            None => bail!(
                "{}: job {:?} has no task with driver = \"{}\"",
                file.path.display(),
                file.job.id,
                crate::meta::PLUGIN_NAME
            ),
        }
    }
    Ok(allocs)
}

/// The body of the `plugin "nomad-driver-virt" { config { ... } }` block of
/// a Nomad client config file; empty (the plugin's defaults) without a file.
pub fn read_plugin_config(path: Option<&Path>) -> anyhow::Result<String> {
    let Some(path) = path else {
        return Ok(String::new());
    };
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the plugin config {}", path.display()))?;
    crate::config::client::plugin_config_body(&source).with_context(|| path.display().to_string())
}

/// Counts SIGINT/SIGTERM: the first asks for a graceful stop, the next
/// for an immediate one.
fn install_signals() -> anyhow::Result<watch::Receiver<u32>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let (sender, receiver) = watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = interrupt.recv() => {}
                Some(()) = terminate.recv() => {}
                // Keep the sender alive: receivers then never see a closed
                // channel, which would make their select loops spin.
                else => std::future::pending::<()>().await,
            }
            sender.send_modify(|count| *count += 1);
        }
    });
    Ok(receiver)
}

/// Runs the job's virt tasks until they exit or a signal stops them.
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let file = JobFile::load(&args.job_file)?;
    for warning in &file.warnings {
        tracing::warn!("{warning}");
    }
    let allocs = plan(&file, &args)?;
    let plugin_config = read_plugin_config(args.plugin_config.as_deref())?;
    let signals = install_signals()?;
    let mut session = Session {
        plugin: None,
        plugin_config,
        verbose: args.verbose,
        started: Vec::new(),
        alloc_dirs: Vec::new(),
        cleaned: false,
        control: None,
        control_tasks: TaskDirectory::default(),
        multi: allocs.iter().map(|a| a.tasks.len()).sum::<usize>() > 1,
    };
    let result = session.run(&allocs, signals).await;
    let cleanup = session.cleanup().await;
    let code = result?;
    cleanup?;
    Ok(code)
}

/// A task the plugin started, until it is destroyed.
struct StartedTask {
    name: String,
    task_id: String,
    handle: Option<TaskHandle>,
    destroyed: bool,
}

/// What this run created, so it can always be removed.
struct Session {
    plugin: Option<PluginClient>,
    plugin_config: String,
    verbose: bool,
    started: Vec<StartedTask>,
    alloc_dirs: Vec<AllocPaths>,
    cleaned: bool,
    /// The private control socket `exec` and `signal` reach us through.
    control: Option<ControlServer>,
    /// Running tasks by name, for the control socket.
    control_tasks: TaskDirectory,
    /// More than one task: prefix output with the task name.
    multi: bool,
}

/// How one task ended.
#[derive(Debug, Clone)]
struct Outcome {
    name: String,
    result: Result<WaitTaskResponse, String>,
}

fn nomad_config() -> NomadConfig {
    // What a Nomad client with default settings sends.
    NomadConfig {
        driver: Some(NomadDriverConfig {
            client_max_port: 14512,
            client_min_port: 14000,
            topology: None,
        }),
    }
}

async fn launch_plugin(verbose: bool, config: &str) -> anyhow::Result<PluginClient> {
    let binary = std::env::current_exe().context("cannot find this program's path")?;
    let plugin = PluginClient::launch(
        &binary,
        LaunchOptions {
            echo_stderr: verbose,
            ..LaunchOptions::default()
        },
    )
    .await
    .context("cannot start the plugin")?;
    plugin
        .set_config_hcl(config, Some(nomad_config()))
        .await
        .map_err(|error| anyhow!("the plugin rejected its config: {}", status_text(&error)))?;
    Ok(plugin)
}

/// A gRPC error's message without tonic's wrapping.
fn status_text(error: &anyhow::Error) -> String {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => status.message().to_string(),
        None => format!("{error:#}"),
    }
}

/// Shows the plugin's warnings and errors (its hclog JSON lines) in the
/// CLI's log format; the rest only with --verbose, verbatim.
fn relay_plugin_log(buffer: std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let lines: Vec<String> = match buffer.lock() {
                Ok(lines) => lines.iter().skip(seen).cloned().collect(),
                Err(_) => return,
            };
            seen += lines.len();
            for line in lines {
                let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(&line) else {
                    continue;
                };
                let text = |key: &str| {
                    fields
                        .get(key)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                let level = text("@level");
                if level != "warn" && level != "error" {
                    continue;
                }
                let extra: Vec<String> = fields
                    .iter()
                    .filter(|(key, _)| !key.starts_with('@'))
                    .map(|(key, value)| match value.as_str() {
                        Some(text) => format!("{key}={text:?}"),
                        None => format!("{key}={value}"),
                    })
                    .collect();
                let message = format!("plugin: {} {}", text("@message"), extra.join(" "));
                if level == "error" {
                    tracing::error!("{}", message.trim_end());
                } else {
                    tracing::warn!("{}", message.trim_end());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// Prints task events for our allocations as they arrive.
/// Returns a counter of printed events, so callers can let a burst of
/// events finish before printing their own lines.
fn print_events(
    plugin: &PluginClient,
    alloc_ids: Vec<String>,
    multi: bool,
) -> watch::Receiver<u64> {
    let mut driver = plugin.driver();
    let (printed, counter) = watch::channel(0u64);
    tokio::spawn(async move {
        let Ok(response) = driver.task_events(TaskEventsRequest {}).await else {
            tracing::warn!("cannot open the plugin's task event stream");
            return;
        };
        let mut stream = response.into_inner();
        while let Ok(Some(event)) = stream.message().await {
            if !alloc_ids.contains(&event.alloc_id) {
                continue;
            }
            if multi {
                say(&format!("==> {}: {}", event.task_name, event.message));
            } else {
                say(&format!("==> {}", event.message));
            }
            printed.send_modify(|count| *count += 1);
        }
    });
    counter
}

/// Waits until no task event has been printed for a moment (at most
/// `EVENTS_SETTLE_MAX`): StartTask's answer can overtake its last events.
async fn events_settled(counter: &mut watch::Receiver<u64>) {
    let settle = async {
        loop {
            tokio::select! {
                changed = counter.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(EVENTS_QUIET) => return,
            }
        }
    };
    let _ = tokio::time::timeout(EVENTS_SETTLE_MAX, settle).await;
}

/// One line of our own output on stdout.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Copies the task's stdout file (the guest console) to our stdout until
/// told to stop, then copies what is left.
fn follow_console(
    path: PathBuf,
    prefix: Option<String>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut offset = 0u64;
        let mut partial = Vec::new();
        loop {
            let stopping = *stop.borrow();
            if let Ok(bytes) = read_from(&path, offset).await {
                offset += bytes.len() as u64;
                partial.extend(bytes.into_iter().filter(|b| *b != b'\r'));
                let mut stdout = std::io::stdout().lock();
                while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=end).collect();
                    if let Some(prefix) = &prefix {
                        let _ = write!(stdout, "{prefix} | ");
                    }
                    let _ = stdout.write_all(&line);
                }
                let _ = stdout.flush();
            }
            if stopping {
                if !partial.is_empty() {
                    partial.push(b'\n');
                    let _ = std::io::stdout().lock().write_all(&partial);
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(CONSOLE_POLL) => {}
                _ = stop.changed() => {}
            }
        }
    })
}

async fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes).await?;
    Ok(bytes)
}

/// `http://host:port/` for ports that look like web ports, else `host:port`.
fn reachable_at(label: &str, host_ip: &str, host_port: i32, guest_port: i32) -> String {
    let label = label.to_ascii_lowercase();
    if matches!(guest_port, 443 | 8443) || label.contains("https") {
        format!("https://{host_ip}:{host_port}/")
    } else if label.contains("http")
        || label.contains("web")
        || matches!(guest_port, 80 | 8000 | 8080)
    {
        format!("http://{host_ip}:{host_port}/")
    } else {
        format!("{host_ip}:{host_port}")
    }
}

/// The lines telling where the task's mapped ports answer.
fn port_lines(
    typed: &TaskSpec,
    ports: &[PortMapping],
    response: &StartTaskResponse,
) -> Vec<String> {
    let network = response.network_override.as_ref();
    let guest_ip = network
        .map(|n| n.addr.clone())
        .filter(|addr| !addr.is_empty());
    let mut lines = vec![format!(
        "    guest IP: {}",
        guest_ip.as_deref().unwrap_or("not reported by the driver")
    )];
    let mapped = typed.bridges().flat_map(|bridge| bridge.ports.iter());
    for label in mapped {
        let label = label.as_str();
        let Some(port) = ports.iter().find(|p| p.label == label) else {
            continue;
        };
        let guest_port = network
            .and_then(|n| n.port_map.get(label).copied())
            .filter(|p| *p > 0)
            .unwrap_or(if port.to > 0 { port.to } else { port.value });
        lines.push(format!(
            "    {label}: {} -> guest {}:{guest_port}",
            reachable_at(label, &port.host_ip, port.value, guest_port),
            guest_ip.as_deref().unwrap_or("?")
        ));
    }
    lines
}

/// A word as the shell reads it back: plain, or single-quoted.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.,/:=@%+".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// How to exec into and signal a running task from another terminal.
fn control_lines(task: &str, guest_agent: bool) -> Vec<String> {
    if !guest_agent {
        return vec!["    exec and signal: off for this task (guest_agent = false)".to_string()];
    }
    let program = std::env::args()
        .next()
        .unwrap_or_else(|| "nomad-driver-virt".to_string());
    let (program, task) = (shell_word(&program), shell_word(task));
    vec![
        format!("    exec into it: {program} exec -i -t {task} -- /bin/sh"),
        format!("    signal it:    {program} signal {task} SIGHUP"),
    ]
}

/// A task's exit as a process exit code: the task's code; a signal that
/// was not our stop request as 128 + signal; an error without a code as 1.
fn exit_code(outcome: &Outcome, stop_requested: bool) -> i32 {
    match &outcome.result {
        Ok(response) => {
            let result = response.result.unwrap_or_default();
            if result.exit_code != 0 {
                result.exit_code
            } else if result.signal != 0 && !stop_requested {
                128 + result.signal
            } else if !response.err.is_empty() && !stop_requested {
                1
            } else {
                0
            }
        }
        Err(_) => 1,
    }
}

fn describe(outcome: &Outcome) -> String {
    match &outcome.result {
        Ok(response) => {
            let result = response.result.unwrap_or_default();
            let mut text = format!("exit code {}", result.exit_code);
            if result.signal != 0 {
                text.push_str(&format!(", signal {}", result.signal));
            }
            if !response.err.is_empty() {
                text.push_str(&format!(": {}", response.err));
            }
            text
        }
        Err(error) => format!("unknown: the plugin stopped answering ({error})"),
    }
}

impl Session {
    fn plugin(&self) -> anyhow::Result<&PluginClient> {
        self.plugin
            .as_ref()
            .ok_or_else(|| anyhow!("the plugin is not running"))
    }

    async fn run(
        &mut self,
        allocs: &[PlannedAlloc],
        mut signals: watch::Receiver<u32>,
    ) -> anyhow::Result<i32> {
        // Directories first: recorded before creation so a partial one is removed.
        let qemu_group = alloc::qemu_group_id();
        if qemu_group.is_none() {
            tracing::warn!("cannot find the group QEMU runs as (libvirt-qemu); making the secrets directories world-readable so QEMU can share them");
        }
        for planned in allocs {
            self.alloc_dirs.push(planned.paths.clone());
            let names: Vec<String> = planned.tasks.iter().map(|t| t.task.name.clone()).collect();
            planned.paths.create(&names, qemu_group).with_context(|| {
                format!(
                    "cannot create the allocation directory {}",
                    planned.paths.root.display()
                )
            })?;
            for name in &names {
                crate::nomad_client::logmon::LogMon::start(
                    &planned.paths.stdout_path(name),
                    &planned.paths.stdout_log(name),
                )
                .with_context(|| format!("cannot set up the stdout FIFO of task {name}"))?;
            }
            say(&format!(
                "==> Allocation {} (job {:?}, group {:?})",
                planned.identity.alloc_id, planned.identity.job_id, planned.identity.group
            ));
            say(&format!("    alloc dir: {}", planned.paths.root.display()));
            for task in &planned.tasks {
                let task_dir = planned.paths.task_dir(&task.task.name);
                for artifact in &task.artifacts {
                    say(&format!("==> Fetching artifact {}", artifact.source_name()));
                    let placed = artifact::place(artifact, &task_dir)?;
                    say(&format!("==> Artifact {}", placed.display()));
                }
                // As in Nomad, templates render after the artifacts arrive.
                for template in &task.templates {
                    let placed = template::place(template, &task_dir, &task.env)?;
                    say(&format!("==> Template {}", placed.display()));
                }
            }
        }
        if *signals.borrow() > 0 {
            return Ok(INTERRUPTED);
        }

        say("==> Starting the plugin");
        let plugin = launch_plugin(self.verbose, &self.plugin_config).await?;
        if !self.verbose {
            relay_plugin_log(plugin.stderr_buffer());
        }
        self.plugin = Some(plugin);
        self.check_health().await?;
        match ControlServer::start(
            &control::base_dir(),
            self.plugin()?.driver(),
            self.control_tasks.clone(),
        ) {
            Ok(server) => {
                say(&format!(
                    "==> Control socket {} (exec and signal from another terminal)",
                    server.socket_path().display()
                ));
                self.control = Some(server);
            }
            Err(error) => tracing::warn!("exec and signal from another terminal are off: {error}"),
        }
        let alloc_ids = allocs.iter().map(|a| a.identity.alloc_id.clone()).collect();
        let mut events = print_events(self.plugin()?, alloc_ids, self.multi);

        // Start every task; a signal during a start takes effect after it.
        let mut running: Vec<(usize, &PlannedAlloc, &PlannedTask)> = Vec::new();
        for planned in allocs {
            for task in &planned.tasks {
                if *signals.borrow() > 0 {
                    break;
                }
                let response = self.start(planned, task, &mut signals).await?;
                events_settled(&mut events).await;
                say(&format!("==> Task {:?} is running", task.task.name));
                for line in port_lines(&task.typed, &planned.ports, &response) {
                    say(&line);
                }
                if self.control.is_some() {
                    if let Ok(mut tasks) = self.control_tasks.lock() {
                        tasks.insert(task.task.name.clone(), task.task_id.clone());
                    }
                    for line in control_lines(&task.task.name, task.typed.guest_agent) {
                        say(&line);
                    }
                }
                running.push((self.started.len() - 1, planned, task));
            }
        }
        if running.is_empty() {
            return Ok(INTERRUPTED);
        }
        say("==> Following the console; Ctrl-C stops the VM");

        let (stop_console, console_stop) = watch::channel(false);
        let mut consoles = Vec::new();
        let (exits, mut exit_events) = mpsc::unbounded_channel::<(usize, Outcome)>();
        for (index, planned, task) in &running {
            let name = task.task.name.clone();
            consoles.push(follow_console(
                planned.paths.stdout_log(&name),
                self.multi.then(|| name.clone()),
                console_stop.clone(),
            ));
            let mut driver = self.plugin()?.driver();
            let task_id = task.task_id.clone();
            let exits = exits.clone();
            let index = *index;
            tokio::spawn(async move {
                let result = driver
                    .wait_task(WaitTaskRequest { task_id })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|status| status.message().to_string());
                let _ = exits.send((index, Outcome { name, result }));
            });
        }
        drop(exits);

        let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
        // Signals that arrived while starting take effect now.
        let early = *signals.borrow();
        let mut stop_requested = early > 0;
        let mut forced = early > 1;
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        if stop_requested {
            stop_deadline = Some(self.stop_all(&running, forced, &outcomes));
        }
        while outcomes.len() < running.len() {
            let deadline = stop_deadline;
            tokio::select! {
                changed = signals.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let count = *signals.borrow();
                    if !stop_requested {
                        stop_requested = true;
                        stop_deadline = Some(self.stop_all(&running, false, &outcomes));
                    } else if count > 1 && !forced {
                        forced = true;
                        stop_deadline = Some(self.stop_all(&running, true, &outcomes));
                    }
                }
                exit = exit_events.recv() => {
                    let Some((index, outcome)) = exit else { break };
                    if let Ok(mut tasks) = self.control_tasks.lock() {
                        tasks.remove(&outcome.name);
                    }
                    outcomes.insert(index, outcome);
                }
                _ = async {
                    match deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::warn!("tasks did not report their exit in time after StopTask; destroying them");
                    break;
                }
            }
        }
        let _ = stop_console.send(true);
        for console in consoles {
            let _ = console.await;
        }
        let mut code = 0;
        for (index, _, _) in &running {
            match outcomes.get(index) {
                Some(outcome) => {
                    say(&format!(
                        "==> Task {:?} exited: {}",
                        outcome.name,
                        describe(outcome)
                    ));
                    let task_code = exit_code(outcome, stop_requested);
                    if code == 0 {
                        code = task_code;
                    }
                }
                None => {
                    if code == 0 {
                        code = 1;
                    }
                }
            }
        }
        Ok(code)
    }

    /// Fails with the driver's own advice when it is not healthy, as Nomad
    /// would not place a task on such a node.
    async fn check_health(&self) -> anyhow::Result<()> {
        let mut driver = self.plugin()?.driver();
        let mut stream = driver
            .fingerprint(FingerprintRequest {})
            .await
            .map_err(|status| anyhow!("fingerprint failed: {}", status.message()))?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .map_err(|_| anyhow!("the plugin sent no fingerprint within 60 s"))?
            .map_err(|status| anyhow!("fingerprint failed: {}", status.message()))?
            .ok_or_else(|| anyhow!("the plugin closed its fingerprint stream"))?;
        if first.health != HealthState::Healthy as i32 {
            bail!(
                "the virt driver is not healthy: {}",
                if first.health_description.is_empty() {
                    first.err
                } else {
                    first.health_description
                }
            );
        }
        Ok(())
    }

    async fn start(
        &mut self,
        planned: &PlannedAlloc,
        task: &PlannedTask,
        signals: &mut watch::Receiver<u32>,
    ) -> anyhow::Result<StartTaskResponse> {
        let plugin = self.plugin()?;
        let env: HashMap<String, String> = task
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let text = task
            .task
            .config
            .as_ref()
            .map(|config| config.text.as_str())
            .unwrap_or_default();
        let msgpack = plugin
            .encode_task_config(text, &env)
            .await
            .with_context(|| format!("task {:?}: encoding its config", task.task.name))?;
        let config = TaskRequest {
            identity: &planned.identity,
            task: &task.task,
            task_id: task.task_id.clone(),
            env: &task.env,
            resources: &task.resources,
            ports: &planned.ports,
            paths: &planned.paths,
            host: HostCpu::detect(),
            msgpack_config: msgpack,
        }
        .task_config();
        say(&format!("==> Starting task {:?}", task.task.name));
        let mut driver = plugin.driver();
        // Recorded before the call: if the plugin dies mid-start, cleanup
        // still knows which task to look for.
        self.started.push(StartedTask {
            name: task.task.name.clone(),
            task_id: task.task_id.clone(),
            handle: None,
            destroyed: false,
        });
        let call = driver.start_task(StartTaskRequest { task: Some(config) });
        tokio::pin!(call);
        let result = loop {
            tokio::select! {
                result = &mut call => break result,
                changed = signals.changed() => {
                    if changed.is_ok() {
                        if *signals.borrow() > 1 {
                            say("==> Will destroy the VM as soon as it has started");
                        } else {
                            say("==> Will stop the VM once it has started (Ctrl-C again: destroy it at once)");
                        }
                    }
                }
            }
        };
        let response = match result {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if let Some(last) = self.started.last_mut() {
                    // The driver undoes a failed start itself.
                    last.destroyed = status.code() != tonic::Code::Unavailable;
                }
                bail!(
                    "task {:?} failed to start: {}",
                    task.task.name,
                    status.message()
                );
            }
        };
        if let Some(last) = self.started.last_mut() {
            last.handle = response.handle.clone();
        }
        Ok(response)
    }

    /// Sends StopTask to every task still running; returns when to give up
    /// waiting for their exits.
    fn stop_all(
        &self,
        running: &[(usize, &PlannedAlloc, &PlannedTask)],
        now: bool,
        outcomes: &BTreeMap<usize, Outcome>,
    ) -> tokio::time::Instant {
        let mut longest = Duration::ZERO;
        for (index, _, task) in running {
            if outcomes.contains_key(index) {
                continue;
            }
            let Ok(plugin) = self.plugin() else { continue };
            let mut driver = plugin.driver();
            let (timeout, signal) = if now {
                (Duration::ZERO, "SIGKILL".to_string())
            } else {
                (task.kill_timeout, task.kill_signal.clone())
            };
            longest = longest.max(timeout);
            if now {
                say(&format!("==> Destroying task {:?} now", task.task.name));
            } else {
                say(&format!(
                    "==> Stopping task {:?} (kill_timeout {}s; Ctrl-C again: destroy it at once)",
                    task.task.name,
                    timeout.as_secs_f64()
                ));
            }
            let request = StopTaskRequest {
                task_id: task.task_id.clone(),
                timeout: Some(prost_types::Duration {
                    seconds: timeout.as_secs() as i64,
                    nanos: timeout.subsec_nanos() as i32,
                }),
                signal,
            };
            let name = task.task.name.clone();
            tokio::spawn(async move {
                if let Err(status) = driver.stop_task(request).await {
                    tracing::warn!("stopping task {name:?} failed: {}", status.message());
                }
            });
        }
        tokio::time::Instant::now() + longest + EXIT_AFTER_STOP
    }

    /// Destroys every started task, removes the allocation directories and
    /// stops the plugin. Runs on every exit path.
    async fn cleanup(&mut self) -> anyhow::Result<()> {
        // No more exec or signal: the socket and its directory go first.
        self.control = None;
        let mut failures = Vec::new();
        let mut orphans = Vec::new();
        for index in 0..self.started.len() {
            if self.started[index].destroyed {
                continue;
            }
            let (name, task_id) = (
                self.started[index].name.clone(),
                self.started[index].task_id.clone(),
            );
            let result = match &self.plugin {
                Some(plugin) => {
                    say(&format!("==> Removing task {name:?}"));
                    plugin
                        .driver()
                        .destroy_task(DestroyTaskRequest {
                            task_id: task_id.clone(),
                            force: true,
                        })
                        .await
                        .map(|_| ())
                }
                None => Err(tonic::Status::unavailable("no plugin")),
            };
            match result {
                Ok(()) => self.started[index].destroyed = true,
                Err(status) => {
                    tracing::warn!(
                        "removing task {name:?} through the plugin failed ({}); trying a fresh plugin",
                        status.message()
                    );
                    orphans.push(index);
                }
            }
        }
        if !orphans.is_empty() {
            let handles: Vec<(String, Option<TaskHandle>)> = orphans
                .iter()
                .map(|&i| (self.started[i].name.clone(), self.started[i].handle.clone()))
                .collect();
            match recover_and_destroy(self.verbose, &self.plugin_config, &handles).await {
                Ok(()) => {
                    for &i in &orphans {
                        self.started[i].destroyed = true;
                    }
                }
                Err(error) => failures.push(format!("{error:#}")),
            }
        }
        for paths in &self.alloc_dirs {
            if let Err(error) = paths.remove() {
                failures.push(format!("cannot remove {}: {error}", paths.root.display()));
            }
        }
        if let Some(plugin) = self.plugin.take() {
            if let Err(error) = plugin.kill().await {
                tracing::warn!("stopping the plugin: {error:#}");
            }
        }
        self.cleaned = true;
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("cleanup incomplete: {}", failures.join("; "))
        }
    }
}

impl Drop for Session {
    /// Only reached without `cleanup` if the run itself panicked: remove
    /// what we can with a fresh plugin on a thread of its own.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let handles: Vec<(String, Option<TaskHandle>)> = self
            .started
            .iter()
            .filter(|task| !task.destroyed)
            .map(|task| (task.name.clone(), task.handle.clone()))
            .collect();
        let dirs = std::mem::take(&mut self.alloc_dirs);
        let (verbose, config) = (self.verbose, self.plugin_config.clone());
        let worker = std::thread::spawn(move || {
            if !handles.is_empty() {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        if let Err(error) =
                            runtime.block_on(recover_and_destroy(verbose, &config, &handles))
                        {
                            eprintln!("run: {error:#}");
                        }
                    }
                    Err(error) => eprintln!("run: cannot clean up: {error}"),
                }
            }
            for paths in dirs {
                let _ = paths.remove();
            }
        });
        let _ = worker.join();
    }
}

/// Destroys tasks through a freshly launched plugin: RecoverTask from the
/// handle (as Nomad does after a plugin crash), then DestroyTask.
async fn recover_and_destroy(
    verbose: bool,
    config: &str,
    tasks: &[(String, Option<TaskHandle>)],
) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let with_handles: Vec<(&String, &TaskHandle)> = tasks
        .iter()
        .filter_map(|(name, handle)| match handle {
            Some(handle) => Some((name, handle)),
            None => {
                missing.push(name.clone());
                None
            }
        })
        .collect();
    if !with_handles.is_empty() {
        let plugin = launch_plugin(verbose, config).await?;
        let mut driver = plugin.driver();
        for (name, handle) in with_handles {
            let task_id = handle
                .config
                .as_ref()
                .map(|c| c.id.clone())
                .unwrap_or_default();
            say(&format!(
                "==> Removing task {name:?} through a fresh plugin"
            ));
            let recovered = driver
                .recover_task(RecoverTaskRequest {
                    task_id: task_id.clone(),
                    handle: Some(handle.clone()),
                })
                .await;
            if let Err(status) = recovered {
                tracing::warn!("recovering task {name:?}: {}", status.message());
            }
            if let Err(status) = driver
                .destroy_task(DestroyTaskRequest {
                    task_id,
                    force: true,
                })
                .await
            {
                missing.push(format!("{name} ({})", status.message()));
            }
        }
        let _ = plugin.kill().await;
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!(
            "could not remove task(s) {}; look for their domains with `virsh list --all` and remove them with `virsh destroy NAME; virsh undefine NAME`",
            missing.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::hashicorp::nomad::plugins::drivers::proto::{ExitResult, NetworkOverride};

    #[test]
    fn exit_codes() {
        let outcome = |exit_code, signal, err: &str| Outcome {
            name: "t".into(),
            result: Ok(WaitTaskResponse {
                result: Some(ExitResult {
                    exit_code,
                    signal,
                    oom_killed: false,
                }),
                err: err.into(),
            }),
        };
        assert_eq!(exit_code(&outcome(0, 0, ""), true), 0);
        assert_eq!(exit_code(&outcome(3, 0, "boom"), false), 3);
        // Killed after kill_timeout at our request: still a clean stop.
        assert_eq!(
            exit_code(&outcome(0, 9, "killed after the stop timeout"), true),
            0
        );
        assert_eq!(exit_code(&outcome(0, 9, ""), false), 137);
        assert_eq!(exit_code(&outcome(0, 0, "crashed"), false), 1);
        let lost = Outcome {
            name: "t".into(),
            result: Err("plugin is shut down".into()),
        };
        assert_eq!(exit_code(&lost, true), 1);
    }

    #[test]
    fn control_lines_quote_what_the_shell_would_split() {
        assert_eq!(shell_word("web-1.a"), "web-1.a");
        assert_eq!(shell_word("my task"), "'my task'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
        let lines = control_lines("my task", true);
        assert!(
            lines[0].ends_with(" exec -i -t 'my task' -- /bin/sh"),
            "{lines:?}"
        );
        assert!(lines[1].ends_with(" signal 'my task' SIGHUP"), "{lines:?}");
        assert!(control_lines("web", false)[0].contains("guest_agent = false"));
    }

    #[test]
    fn port_lines_show_the_mapping() {
        use crate::config::names::{InterfaceName, PortLabel};
        use crate::config::network::{BridgeInterface, NetworkInterface};
        let label = |text: &str| PortLabel::parse(text).expect("valid label");
        let typed = TaskSpec {
            network_interfaces: vec![NetworkInterface::Bridge(BridgeInterface {
                name: InterfaceName::parse("virbr0").expect("valid name"),
                ports: vec![label("http"), label("ssh")],
            })],
            ..Default::default()
        };
        let ports = vec![
            PortMapping {
                label: "http".into(),
                value: 8080,
                to: 8080,
                host_ip: "10.0.0.5".into(),
            },
            PortMapping {
                label: "ssh".into(),
                value: 22022,
                to: 0,
                host_ip: "10.0.0.5".into(),
            },
        ];
        let response = StartTaskResponse {
            network_override: Some(NetworkOverride {
                port_map: HashMap::from([("ssh".to_string(), 22)]),
                addr: "192.168.122.7".into(),
                auto_advertise: false,
            }),
            ..Default::default()
        };
        assert_eq!(
            port_lines(&typed, &ports, &response),
            [
                "    guest IP: 192.168.122.7",
                "    http: http://10.0.0.5:8080/ -> guest 192.168.122.7:8080",
                "    ssh: 10.0.0.5:22022 -> guest 192.168.122.7:22",
            ]
        );
        let unknown = port_lines(&typed, &ports, &StartTaskResponse::default());
        assert_eq!(unknown[0], "    guest IP: not reported by the driver");
        assert_eq!(
            unknown[1],
            "    http: http://10.0.0.5:8080/ -> guest ?:8080"
        );
    }
}
