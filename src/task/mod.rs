//! The domain orchestrator: start, stop, destroy and recover tasks, each
//! undoing what it did when it fails part-way. Domain lifecycle comes from
//! libvirt events, reconciled with the real state after a reconnect.

pub mod console;
pub mod error;
pub mod plan;
pub mod start;
pub mod store;
pub mod teardown;

use std::collections::HashMap;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;

use self::console::ConsoleCopier;
use self::error::TaskError;
use self::store::{TaskEntry, TaskExit, TaskStore};
use crate::config::plugin::Settings;
use crate::libvirt::conn::Connect;
use crate::libvirt::domain;
use crate::libvirt::events::LifecycleEvent;
use crate::libvirt::lifecycle::{self, DomainEvent, ExitOutcome};
use crate::libvirt::stats::{self, CpuSample};
use crate::libvirt::Libvirt;
use crate::net::iptables::{task_tag, Iptables};
use crate::net::libvirt::LibvirtNet;
use crate::net::{Net, VmStartedBuildRequest, VmTerminatedTeardownRequest};
use crate::nomad::driver_state::{DriverState, DRIVER_STATE_VERSION, TASK_HANDLE_VERSION};
use crate::pb::hashicorp::nomad::plugins::drivers::proto::{
    DriverTaskEvent, ExitResult, InspectTaskResponse, NetworkOverride, StartTaskResponse,
    TaskConfig as NomadTaskConfig, TaskDriverStatus, TaskHandle, TaskState, TaskStats,
    TaskStatsResponse, TaskStatus, WaitTaskResponse,
};

/// Unused chained-disk parents older than this are deleted (hourly).
const PARENT_IDLE: Duration = Duration::from_secs(3600);

/// How long to wait for the stopped event after a forced destroy.
const DESTROY_WAIT: Duration = Duration::from_secs(10);

/// The driver's tasks and the machinery that tracks them.
pub struct Tasks {
    store: TaskStore,
    libvirt: Libvirt,
    net: Arc<LibvirtNet>,
    events: broadcast::Sender<DriverTaskEvent>,
    host_initialised: std::sync::atomic::AtomicBool,
}

fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

fn unix_nanos(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn exit_from(outcome: ExitOutcome) -> TaskExit {
    TaskExit {
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        error: outcome.error,
        at: SystemTime::now(),
    }
}

impl Tasks {
    /// Creates the task tracker and subscribes to libvirt's domain events.
    pub fn new(libvirt: Libvirt) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        let net = Arc::new(LibvirtNet::new(
            libvirt.clone(),
            Iptables::host(),
            crate::config::plugin::DEFAULT_DHCP_TIMEOUT,
        ));
        let tasks = Arc::new(Self {
            store: TaskStore::default(),
            libvirt: libvirt.clone(),
            net,
            events,
            host_initialised: std::sync::atomic::AtomicBool::new(false),
        });
        let (sender, receiver) = std::sync::mpsc::channel::<LifecycleEvent>();
        libvirt.subscribe_events(sender);
        let weak = Arc::downgrade(&tasks);
        let spawned = std::thread::Builder::new()
            .name("domain-events".into())
            .spawn(move || dispatch_events(weak, receiver));
        if let Err(error) = spawned {
            tracing::error!(error = %error, "cannot start the domain event dispatcher");
        }
        tasks
    }

    /// Prepares host networking (chains, jumps) and, after `delay`, removes
    /// port-mapping rules of tasks this plugin no longer knows. The delay
    /// gives Nomad time to recover running tasks first.
    pub fn init_host(self: &Arc<Self>, delay: Duration, pools: Vec<String>) {
        if self
            .host_initialised
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let net = self.net.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = net.init() {
                tracing::warn!(error = %error, "cannot prepare iptables chains for port mapping");
            }
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(tasks) = weak.upgrade() else { return };
            let live: std::collections::BTreeSet<String> = tasks
                .store
                .all()
                .iter()
                .map(|entry| task_tag(&entry.state.task_id))
                .collect();
            let net = tasks.net.clone();
            drop(tasks);
            match tokio::task::spawn_blocking(move || net.reconcile(&live)).await {
                Ok(Ok(removed)) if !removed.is_empty() => {
                    tracing::info!(removed = ?removed, "removed port-mapping rules of tasks that no longer exist")
                }
                Ok(Err(error)) => {
                    tracing::warn!(error = %error, "port-mapping reconciliation failed")
                }
                _ => {}
            }
            // Chained disks share parent images; delete the ones no disk has
            // used for a while, so the pool does not fill up over time.
            loop {
                let Some(tasks) = weak.upgrade() else { return };
                let libvirt = tasks.libvirt.clone();
                drop(tasks);
                let pools = pools.clone();
                let pruned = libvirt
                    .call(move |conn| {
                        Ok(crate::libvirt::storage::prune_pools(
                            conn,
                            &pools,
                            PARENT_IDLE,
                        ))
                    })
                    .await;
                if let Ok(pruned) = pruned {
                    if !pruned.is_empty() {
                        tracing::info!(volumes = ?pruned, "deleted parent images no disk uses any more");
                    }
                }
                tokio::time::sleep(PARENT_IDLE).await;
            }
        });
    }

    /// Adds `driver.virt.network.*` attributes.
    pub async fn network_fingerprint(
        &self,
        attributes: &mut HashMap<
            String,
            crate::pb::hashicorp::nomad::plugins::shared::structs::Attribute,
        >,
    ) {
        let net = self.net.clone();
        if let Ok(found) = tokio::task::spawn_blocking(move || {
            let mut found = HashMap::new();
            net.fingerprint(&mut found);
            found
        })
        .await
        {
            attributes.extend(found);
        }
    }

    /// Subscribes to driver task events (the TaskEvents stream).
    pub fn subscribe_events(&self) -> broadcast::Receiver<DriverTaskEvent> {
        self.events.subscribe()
    }

    fn emit(&self, task: &NomadTaskConfig, message: &str) {
        tracing::info!(task_id = %task.id, alloc_id = %task.alloc_id, task = %task.name, "{message}");
        let _ = self.events.send(DriverTaskEvent {
            task_id: task.id.clone(),
            alloc_id: task.alloc_id.clone(),
            task_name: task.name.clone(),
            timestamp: Some(now_timestamp()),
            message: message.to_string(),
            annotations: HashMap::new(),
        });
    }

    fn entry(&self, task_id: &str) -> Result<Arc<TaskEntry>, TaskError> {
        self.store
            .get(task_id)
            .ok_or_else(|| TaskError::NotFound(task_id.to_string()))
    }

    /// StartTask.
    pub async fn start(
        &self,
        task: NomadTaskConfig,
        settings: Arc<Settings>,
    ) -> Result<StartTaskResponse, TaskError> {
        let config = crate::config::task::decode_and_validate(&task.msgpack_driver_config)?;
        if self.store.get(&task.id).is_some() {
            return Err(TaskError::Conflict(format!(
                "task {} is already running",
                task.id
            )));
        }
        let start_plan = {
            let (task, config, settings) = (task.clone(), config.clone(), settings.clone());
            tokio::task::spawn_blocking(move || start::prepare(&task, &config, &settings))
                .await
                .map_err(|e| TaskError::Invalid(format!("start preparation failed: {e}")))??
        };
        let created = Arc::new(Mutex::new(start::Created::default()));
        let progress = self.emitter(&task);
        let net = Arc::new(self.net.for_start(settings.dhcp_timeout, progress.clone()));
        let boot = {
            let (task, config, settings, created, net, progress) = (
                task.clone(),
                config.clone(),
                settings.clone(),
                created.clone(),
                net.clone(),
                progress.clone(),
            );
            let start_plan = Arc::new(start_plan);
            self.libvirt
                .call(move |conn| {
                    Ok(start::create_and_boot(
                        conn,
                        &task,
                        &config,
                        &settings,
                        &start_plan,
                        &created,
                        net.as_ref(),
                        &|message: &str| progress(message),
                    ))
                })
                .await
        };
        let started = match boot {
            Ok(Ok(started)) => started,
            Ok(Err(error)) => {
                self.roll_back(&task, created).await;
                return Err(error);
            }
            Err(error) => {
                self.roll_back(&task, created).await;
                return Err(TaskError::Libvirt(error));
            }
        };

        // The guest is booting: find its address, reserve it, map ports.
        let net_config = config.network_interface.clone().unwrap_or_default();
        let mut teardown = None;
        let mut driver_network = None;
        if !net_config.is_empty() {
            let request = VmStartedBuildRequest {
                vm_name: started.domain_name.clone(),
                hostname: started.hostname.clone(),
                task_tag: task_tag(&task.id),
                net_config: net_config.clone(),
                resources: start::allocated_ports(&task),
                hwaddrs: started.hwaddrs.clone(),
            };
            let build_net = net.clone();
            let built =
                tokio::task::spawn_blocking(move || build_net.vm_started_build(&request)).await;
            match built {
                Ok(Ok(response)) => {
                    teardown = Some(response.teardown_spec);
                    driver_network = response.driver_network;
                }
                Ok(Err(error)) => {
                    self.roll_back(&task, created).await;
                    return Err(error.into());
                }
                Err(error) => {
                    self.roll_back(&task, created).await;
                    return Err(TaskError::Invalid(format!("network setup failed: {error}")));
                }
            }
        }
        let state = DriverState {
            version: DRIVER_STATE_VERSION,
            task_id: task.id.clone(),
            task_name: task.name.clone(),
            alloc_id: task.alloc_id.clone(),
            domain_name: started.domain_name.clone(),
            started_at_unix_nanos: unix_nanos(SystemTime::now()),
            volumes: started.volumes.clone(),
            console_log: Some(started.console_log.clone()),
            stdout_path: task.stdout_path.clone(),
            task_config: config,
            net: teardown,
            guest_ip: driver_network.as_ref().map(|network| network.ip),
        };
        let entry = TaskEntry::new(state.clone(), task.clone());
        if !task.stdout_path.is_empty() {
            entry.attach_console(ConsoleCopier::spawn(
                started.console_log.clone(),
                task.stdout_path.clone().into(),
                false,
            ));
        }
        self.store.insert(entry);
        self.emit(&task, &format!("Started VM {}", started.domain_name));
        Ok(StartTaskResponse {
            result: 0,
            driver_error_msg: String::new(),
            handle: Some(TaskHandle {
                version: TASK_HANDLE_VERSION,
                config: Some(task),
                state: TaskState::Running as i32,
                driver_state: state.encode(),
            }),
            // The guest's address for services with address_mode = "driver";
            // not advertised by default: ports are reached through the host.
            network_override: driver_network.map(|network| NetworkOverride {
                port_map: network
                    .port_map
                    .into_iter()
                    .map(|(label, port)| (label, i32::from(port)))
                    .collect(),
                addr: network.ip.to_string(),
                auto_advertise: false,
            }),
        })
    }

    /// Sends a task event from any thread.
    fn emitter(&self, task: &NomadTaskConfig) -> crate::net::libvirt::Progress {
        let events = self.events.clone();
        let (task_id, alloc_id, task_name) =
            (task.id.clone(), task.alloc_id.clone(), task.name.clone());
        Arc::new(move |message: &str| {
            tracing::info!(task_id = %task_id, alloc_id = %alloc_id, task = %task_name, "{message}");
            let _ = events.send(DriverTaskEvent {
                task_id: task_id.clone(),
                alloc_id: alloc_id.clone(),
                task_name: task_name.clone(),
                timestamp: Some(now_timestamp()),
                message: message.to_string(),
                annotations: HashMap::new(),
            });
        })
    }

    async fn roll_back(&self, task: &NomadTaskConfig, created: Arc<Mutex<start::Created>>) {
        self.emit(task, "Start failed; removing what was created");
        let result = self
            .libvirt
            .call(move |conn| {
                if let Ok(created) = created.lock() {
                    start::roll_back(conn, &created);
                }
                Ok(())
            })
            .await;
        if let Err(error) = result {
            tracing::error!(error = %error, task_id = %task.id, "rollback could not reach libvirt");
        }
    }

    /// WaitTask: answers when the task has exited (at once if it has).
    pub async fn wait(&self, task_id: &str) -> Result<WaitTaskResponse, TaskError> {
        let entry = self.entry(task_id)?;
        let exit = entry.wait().await;
        Ok(WaitTaskResponse {
            result: Some(ExitResult {
                exit_code: exit.exit_code,
                signal: exit.signal,
                oom_killed: false,
            }),
            err: exit
                .error
                .filter(|_| exit.exit_code != 0)
                .unwrap_or_default(),
        })
    }

    /// StopTask: ACPI power button, wait up to `timeout`, then destroy.
    pub async fn stop(
        &self,
        task_id: &str,
        timeout: Duration,
        signal: &str,
    ) -> Result<(), TaskError> {
        let Some(entry) = self.store.get(task_id) else {
            // Nomad retries StopTask on errors; an unknown task is already stopped.
            return Ok(());
        };
        if !entry.is_running() {
            return Ok(());
        }
        entry.mark_stop_requested();
        let name = entry.state.domain_name.clone();
        let immediate = matches!(signal, "SIGKILL" | "KILL" | "9");
        if !immediate {
            let domain_name = name.clone();
            let result = self
                .libvirt
                .call(move |conn| {
                    if let Err(error) = domain::shutdown_domain(conn, &domain_name) {
                        tracing::debug!(error = %error, "ACPI shutdown request failed");
                    }
                    Ok(())
                })
                .await;
            if let Err(error) = result {
                tracing::warn!(error = %error, domain = %name, "could not send the ACPI power button");
            }
            if tokio::time::timeout(timeout, entry.wait()).await.is_ok() {
                return Ok(());
            }
            tracing::info!(domain = %name, timeout = ?timeout, "guest did not power off in time; destroying it");
        }
        entry.mark_forced();
        let domain_name = name.clone();
        self.libvirt
            .call(move |conn| domain::destroy_domain(conn, &domain_name))
            .await?;
        if tokio::time::timeout(DESTROY_WAIT, entry.wait())
            .await
            .is_err()
        {
            // No event arrived (connection trouble): settle from the real state.
            self.reconcile_entry(entry.clone()).await;
            entry.set_exit(exit_from(lifecycle::exit_for_stop(
                lifecycle::StopReason::Destroyed,
                true,
                true,
            )));
        }
        Ok(())
    }

    /// DestroyTask: removes the domain, its volumes and seed, and forgets the task.
    pub async fn destroy(&self, task_id: &str, force: bool) -> Result<(), TaskError> {
        let Some(entry) = self.store.get(task_id) else {
            return Ok(());
        };
        if entry.is_running() && !force {
            return Err(TaskError::Conflict(format!(
                "task {task_id} is still running; stop it first or destroy with force"
            )));
        }
        if entry.is_running() {
            entry.mark_stop_requested();
            entry.mark_forced();
        }
        let state = entry.state.clone();
        self.libvirt
            .call(move |conn| {
                teardown::try_remove_domain(conn, &state.domain_name)?;
                let mut failures = Vec::new();
                for volume in state.volumes.iter().rev() {
                    if let Err(error) = teardown::delete_volume(conn, volume) {
                        failures.push(error.to_string());
                    }
                }
                if failures.is_empty() {
                    Ok(())
                } else {
                    Err(crate::libvirt::LibvirtError::Worker(format!(
                        "deleting volumes: {}",
                        failures.join("; ")
                    )))
                }
            })
            .await?;
        if let Some(spec) = entry.state.net.clone() {
            let net = self.net.clone();
            let request = VmTerminatedTeardownRequest {
                teardown_spec: spec,
            };
            tokio::task::spawn_blocking(move || net.vm_terminated_teardown(&request))
                .await
                .map_err(|e| TaskError::Invalid(format!("network teardown failed: {e}")))??;
        }
        entry.set_exit(exit_from(lifecycle::exit_for_stop(
            lifecycle::StopReason::Destroyed,
            true,
            true,
        )));
        self.store.remove(task_id);
        Ok(())
    }

    /// InspectTask.
    pub fn inspect(&self, task_id: &str) -> Result<InspectTaskResponse, TaskError> {
        let entry = self.entry(task_id)?;
        let exit = entry.exit();
        let started =
            UNIX_EPOCH + Duration::from_nanos(entry.state.started_at_unix_nanos.max(0) as u64);
        // Go's zero time stands for "not completed".
        let zero_time = prost_types::Timestamp {
            seconds: -62_135_596_800,
            nanos: 0,
        };
        Ok(InspectTaskResponse {
            task: Some(TaskStatus {
                id: entry.state.task_id.clone(),
                name: entry.state.task_name.clone(),
                state: if exit.is_some() {
                    TaskState::Exited as i32
                } else {
                    TaskState::Running as i32
                },
                started_at: Some(prost_types::Timestamp::from(started)),
                completed_at: Some(
                    exit.as_ref()
                        .map(|e| prost_types::Timestamp::from(e.at))
                        .unwrap_or(zero_time),
                ),
                result: Some(ExitResult {
                    exit_code: exit.as_ref().map_or(0, |e| e.exit_code),
                    signal: exit.as_ref().map_or(0, |e| e.signal),
                    oom_killed: false,
                }),
            }),
            driver: Some(TaskDriverStatus {
                attributes: HashMap::from([(
                    "domain_name".to_string(),
                    entry.state.domain_name.clone(),
                )]),
            }),
            network_override: entry.state.guest_ip.map(|ip| NetworkOverride {
                port_map: HashMap::new(),
                addr: ip.to_string(),
                auto_advertise: false,
            }),
        })
    }

    /// RecoverTask: re-attach to a task from its handle after a plugin or
    /// agent restart. Nomad sends no task id; the handle's config has it.
    pub async fn recover(&self, handle: TaskHandle) -> Result<(), TaskError> {
        let state = DriverState::decode(&handle.driver_state)
            .map_err(|e| TaskError::Invalid(e.to_string()))?;
        if self.store.get(&state.task_id).is_some() {
            return Ok(());
        }
        let nomad_config = handle.config.unwrap_or_default();
        let entry = TaskEntry::new(state.clone(), nomad_config);
        self.store.insert(entry.clone());
        self.reconcile_entry(entry.clone()).await;
        if entry.is_running() {
            if let Some(console) = &state.console_log {
                if !state.stdout_path.is_empty() {
                    entry.attach_console(ConsoleCopier::spawn(
                        console.clone(),
                        state.stdout_path.clone().into(),
                        true,
                    ));
                }
            }
            tracing::info!(task_id = %state.task_id, domain = %state.domain_name, "recovered running task");
        } else {
            tracing::warn!(task_id = %state.task_id, domain = %state.domain_name, "recovered task had already ended");
        }
        Ok(())
    }

    /// Settles a task's exit from the domain's real state (after missed events).
    async fn reconcile_entry(&self, entry: Arc<TaskEntry>) {
        let name = entry.state.domain_name.clone();
        let result = self
            .libvirt
            .call(move |conn| {
                domain_outcome(conn, &name, &entry);
                Ok(())
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(error = %error, "cannot reconcile task state with libvirt");
        }
    }

    /// TaskStats: one sample per interval until the client goes away.
    pub fn stats(
        self: &Arc<Self>,
        task_id: &str,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<BoxStream<TaskStatsResponse>, TaskError> {
        let entry = self.entry(task_id)?;
        let interval = if interval.is_zero() {
            Duration::from_secs(1)
        } else {
            interval
        };
        let (sender, receiver) = mpsc::channel(4);
        let libvirt = self.libvirt.clone();
        let origin = Instant::now();
        tokio::spawn(async move {
            let mut host_mhz: u32 = 0;
            loop {
                if !entry.is_running() {
                    return;
                }
                let name = entry.state.domain_name.clone();
                let known_mhz = host_mhz;
                let sample = libvirt
                    .call(move |conn| {
                        // The host's clock speed does not change: read it once.
                        let mhz = if known_mhz > 0 {
                            known_mhz
                        } else {
                            domain::host_cpu(conn).map(|cpu| cpu.mhz).unwrap_or(0)
                        };
                        Ok(domain::sample_domain(conn, &name)?.map(|sample| (sample, mhz)))
                    })
                    .await;
                if let Ok(Some((sample, mhz))) = sample {
                    host_mhz = mhz;
                    let now = CpuSample {
                        cpu_time_ns: sample.cpu_time_ns,
                        at_ns: origin.elapsed().as_nanos() as u64,
                        vcpus: sample.vcpus,
                    };
                    let previous = entry
                        .cpu_sample
                        .lock()
                        .ok()
                        .and_then(|mut slot| slot.replace((now.cpu_time_ns, now.at_ns)));
                    let percent = previous
                        .map(|(cpu_time_ns, at_ns)| {
                            stats::cpu_percent(
                                &CpuSample {
                                    cpu_time_ns,
                                    at_ns,
                                    vcpus: now.vcpus,
                                },
                                &now,
                            )
                        })
                        .unwrap_or(0.0);
                    let memory = stats::memory_usage_bytes(&sample.memory);
                    let usage = stats::resource_usage(
                        percent,
                        stats::total_ticks(percent, f64::from(mhz)),
                        memory,
                    );
                    let response = TaskStatsResponse {
                        stats: Some(TaskStats {
                            id: entry.state.task_id.clone(),
                            timestamp: Some(now_timestamp()),
                            agg_resource_usage: Some(usage),
                            resource_usage_by_pid: HashMap::new(),
                        }),
                    };
                    if sender.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|stopping| *stopping) => return,
                    _ = sender.closed() => return,
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    fn handle_event(&self, event: LifecycleEvent) {
        let Some(entry) = self.store.by_domain(&event.domain_name) else {
            return;
        };
        tracing::debug!(domain = %event.domain_name, event = %event.describe(), "domain event");
        let kind = event.kind();
        if let Some(outcome) =
            lifecycle::exit_for_event(kind, entry.stop_requested(), entry.forced())
        {
            if entry.set_exit(exit_from(outcome)) {
                tracing::info!(domain = %event.domain_name, task_id = %entry.state.task_id, event = %event.describe(), "task exited");
            }
        } else if kind.needs_reconcile() || matches!(kind, DomainEvent::Undefined) {
            let libvirt = self.libvirt.clone();
            let name = event.domain_name.clone();
            let result = libvirt.call_blocking(|conn| {
                domain_outcome(conn, &name, &entry);
                Ok(())
            });
            if let Err(error) = result {
                tracing::warn!(error = %error, "cannot check domain state after an event");
            }
        }
    }

    fn reconcile_all(&self) {
        for entry in self
            .store
            .all()
            .into_iter()
            .filter(|entry| entry.is_running())
        {
            let name = entry.state.domain_name.clone();
            if let Err(error) = self.libvirt.call_blocking(|conn| {
                domain_outcome(conn, &name, &entry);
                Ok(())
            }) {
                tracing::warn!(error = %error, "cannot reconcile task state with libvirt");
                return;
            }
        }
    }
}

/// Reads the domain's state and records an exit if it has ended.
fn domain_outcome(conn: &Connect, name: &str, entry: &TaskEntry) {
    match domain::domain_status(conn, name) {
        Ok(None) => {
            entry.set_exit(exit_from(lifecycle::exit_for_vanished()));
        }
        Ok(Some(status)) => {
            if let Some(outcome) = status.exit(entry.stop_requested(), entry.forced()) {
                entry.set_exit(exit_from(outcome));
            }
        }
        Err(error) => tracing::debug!(error = %error, "domain lookup failed during reconcile"),
    }
}

/// Runs on its own thread: applies libvirt events and reconciles after reconnects.
fn dispatch_events(tasks: Weak<Tasks>, receiver: std::sync::mpsc::Receiver<LifecycleEvent>) {
    let mut seen_generation = 0;
    loop {
        let received = receiver.recv_timeout(Duration::from_secs(1));
        let Some(tasks) = tasks.upgrade() else { return };
        match received {
            Ok(event) => tasks.handle_event(event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // The connection object owning the sender is gone; keep
                // reconciling on reconnects but do not spin.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        let generation = tasks.libvirt.generation();
        if generation != seen_generation {
            seen_generation = generation;
            if generation > 1 {
                tasks.reconcile_all();
            }
        }
        drop(tasks);
    }
}
