//! The domain orchestrator: start, stop, destroy and recover tasks, each
//! undoing what it did when it fails part-way. It depends on two seams, the
//! [`Hypervisor`] and the [`Net`] contract; domain lifecycle comes from the
//! hypervisor's events, reconciled with the real state after a reconnect.

pub mod agent;
pub mod console;
pub mod contract;
pub mod error;
pub mod journal;
pub mod plan;
pub mod shares;
pub mod start;
pub mod store;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, watch};

use self::console::ConsoleCopier;
use self::contract::{StartRequest, StartedTask, TaskEvent, TaskExit, TaskStatus, UsageSample};
use self::error::TaskError;
use self::journal::{Journal, TaskRecord};
use self::store::{TaskEntry, TaskStore};
use crate::config::plugin::Settings;
use crate::faults::crash_point;
use crate::hypervisor::Hypervisor;
use crate::libvirt::events::LifecycleEvent;
use crate::libvirt::lifecycle::{self, DomainEvent, ExitOutcome};
use crate::libvirt::stats::{self, CpuSample};
use crate::net::{Net, VmTerminatedTeardownRequest};
use crate::nomad::driver_state::{DriverState, StateOrigin, DRIVER_STATE_VERSION};

/// Unused chained-disk parents older than this are deleted (hourly).
const PARENT_IDLE: Duration = Duration::from_secs(3600);

/// How long to wait for the stopped event after a forced destroy.
const DESTROY_WAIT: Duration = Duration::from_secs(10);
/// Longest the event dispatcher sleeps without an event before checking
/// for a reconnect itself (see [`dispatch_events`]).
const RECONCILE_CHECK: Duration = Duration::from_secs(10);

/// The driver's tasks and the machinery that tracks them.
pub struct Tasks {
    store: TaskStore,
    hypervisor: Arc<dyn Hypervisor>,
    net: Arc<dyn Net>,
    journal: Journal,
    events: broadcast::Sender<TaskEvent>,
    host_initialised: AtomicBool,
    /// The libvirt connection generation last reconciled against.
    reconciled_generation: AtomicU64,
}

fn unix_nanos(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
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

/// Runs blocking work (hypervisor and network calls) off the async threads.
async fn blocking<T: Send + 'static>(
    action: &'static str,
    work: impl FnOnce() -> Result<T, TaskError> + Send + 'static,
) -> Result<T, TaskError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| TaskError::Worker { action, source })?
}

/// The volumes the Go driver made for an adopted domain: pool volumes its
/// disks use that carry the Go driver's name for them (`<domain>_<dev>.img`).
/// Anything else the domain uses was not made for it and stays.
fn adopted_go_volumes(
    hypervisor: &dyn Hypervisor,
    domain: &str,
) -> Result<Vec<crate::nomad::driver_state::CreatedVolume>, crate::hypervisor::HypervisorError> {
    Ok(hypervisor
        .domain_pool_volumes(domain)?
        .unwrap_or_default()
        .into_iter()
        .filter(|volume| crate::nomad::go_handle::is_go_task_volume(domain, &volume.name))
        .collect())
}

impl Tasks {
    /// Creates the task tracker and subscribes to the hypervisor's events.
    pub fn new(hypervisor: Arc<dyn Hypervisor>, net: Arc<dyn Net>, journal: Journal) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        let tasks = Arc::new(Self {
            store: TaskStore::default(),
            hypervisor: hypervisor.clone(),
            net,
            journal,
            events,
            host_initialised: AtomicBool::new(false),
            reconciled_generation: AtomicU64::new(0),
        });
        let (sender, receiver) = std::sync::mpsc::channel::<LifecycleEvent>();
        hypervisor.subscribe_events(sender);
        let weak = Arc::downgrade(&tasks);
        let spawned = std::thread::Builder::new()
            .name("domain-events".into())
            .spawn(move || dispatch_events(&weak, &receiver));
        if let Err(error) = spawned {
            tracing::error!(error = %error, "cannot start the domain event dispatcher");
        }
        tasks
    }

    /// Prepares host networking (chains, jumps) and, after `delay`, removes
    /// what unfinished starts of earlier plugin processes left (their
    /// journal records). The delay gives Nomad time to recover running
    /// tasks first.
    pub fn init_host(self: &Arc<Self>, delay: Duration, pools: Vec<String>) {
        if self.host_initialised.swap(true, Ordering::SeqCst) {
            return;
        }
        let net = self.net.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = net.init() {
                tracing::warn!(error = %error, "cannot prepare iptables chains for port mapping");
            }
            // A plugin killed while qemu-img ran left its converted image
            // or its cephx key file behind.
            let removed = crate::storage::volume::remove_stale_temp_files(
                &crate::storage::volume::temp_file_dirs(),
            );
            if !removed.is_empty() {
                tracing::info!(files = ?removed, "removed temporary files a killed plugin left");
            }
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(tasks) = weak.upgrade() else { return };
            let removed = tasks.remove_unfinished().await;
            if !removed.is_empty() {
                tracing::info!(tasks = ?removed, "removed what unfinished starts left behind");
            }
            drop(tasks);
            // Chained disks share parent images; delete the ones no disk has
            // used for a while, so the pool does not fill up over time.
            loop {
                let Some(tasks) = weak.upgrade() else { return };
                let hypervisor = tasks.hypervisor.clone();
                drop(tasks);
                let pools = pools.clone();
                let pruned = tokio::task::spawn_blocking(move || {
                    hypervisor.prune_unused_parents(&pools, PARENT_IDLE)
                })
                .await;
                match pruned {
                    Ok(Ok(pruned)) if !pruned.is_empty() => {
                        tracing::info!(volumes = ?pruned, "deleted parent images no disk uses any more");
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error, "pruning unused parent images failed");
                    }
                    _ => {}
                }
                tokio::time::sleep(PARENT_IDLE).await;
            }
        });
    }

    /// Removes everything journal records of unknown tasks name (starts a
    /// killed plugin never finished, tasks Nomad no longer has), proving
    /// ownership of each domain by its metadata first. Returns the task ids
    /// cleaned up completely; the others are retried next time.
    pub async fn remove_unfinished(&self) -> Vec<String> {
        // A start of this process still running has a record too (written
        // before it creates anything): it is not an orphan.
        let orphans = self.journal.orphans(|task_id| self.store.is_known(task_id));
        let mut removed = Vec::new();
        for record in orphans {
            let task_id = record.task_id.clone();
            let result = self.clear_record(record).await;
            match result {
                Ok(()) => removed.push(task_id),
                Err(error) => {
                    tracing::warn!(error = %error, task_id = %task_id, "cannot remove what an unfinished start left; retrying later");
                }
            }
        }
        removed
    }

    /// Removes what a journal record names, then the record.
    async fn clear_record(&self, record: TaskRecord) -> Result<(), TaskError> {
        let (hypervisor, net, journal) = (
            self.hypervisor.clone(),
            self.net.clone(),
            self.journal.clone(),
        );
        blocking("removing what an unfinished start left", move || {
            remove_recorded(hypervisor.as_ref(), net.as_ref(), &record)?;
            journal.forget(&record.task_id);
            Ok(())
        })
        .await
    }

    /// Whether the hypervisor answers (health between full fingerprints).
    pub async fn hypervisor_reachable(self: &Arc<Self>) -> bool {
        let tasks = self.clone();
        matches!(
            tokio::task::spawn_blocking(move || {
                let pinged = tasks.hypervisor.ping();
                // The ping is what usually reconnects: catch up at once.
                tasks.reconcile_if_reconnected();
                pinged
            })
            .await,
            Ok(Ok(()))
        )
    }

    /// After a new libvirt connection, events may have been missed:
    /// settles every running task from its domain's real state. Called by
    /// the event dispatcher and after the health check's ping.
    fn reconcile_if_reconnected(&self) {
        let generation = self.hypervisor.connection_generation();
        let seen = self
            .reconciled_generation
            .swap(generation, Ordering::SeqCst);
        if generation != seen && generation > 1 {
            self.reconcile_all();
        }
    }

    /// `driver.virt.network.*` attributes (all strings).
    pub async fn network_fingerprint(&self) -> BTreeMap<String, String> {
        let net = self.net.clone();
        tokio::task::spawn_blocking(move || net.fingerprint())
            .await
            .unwrap_or_default()
    }

    /// Subscribes to task events (the TaskEvents stream).
    pub fn subscribe_events(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    /// A function that sends an event about one task, from any thread.
    fn emitter(
        &self,
        task_id: &str,
        alloc_id: &str,
        task_name: &str,
    ) -> impl Fn(&str) + Send + Sync + 'static {
        let events = self.events.clone();
        let (task_id, alloc_id, task_name) = (
            task_id.to_string(),
            alloc_id.to_string(),
            task_name.to_string(),
        );
        move |message: &str| {
            tracing::info!(task_id = %task_id, alloc_id = %alloc_id, task = %task_name, "{message}");
            let _ = events.send(TaskEvent {
                task_id: task_id.clone(),
                alloc_id: alloc_id.clone(),
                task_name: task_name.clone(),
                message: message.to_string(),
                at: SystemTime::now(),
            });
        }
    }

    fn entry(&self, task_id: &str) -> Result<Arc<TaskEntry>, TaskError> {
        self.store
            .get(task_id)
            .ok_or_else(|| TaskError::NotFound(task_id.to_string()))
    }

    /// StartTask.
    pub async fn start(
        &self,
        request: StartRequest,
        settings: Arc<Settings>,
    ) -> Result<StartedTask, TaskError> {
        // Held until the task is in the store (or the start failed and
        // rolled back), so a concurrent start of the same id never touches
        // what this one creates.
        let Some(_claim) = self.store.claim_start(&request.task_id) else {
            return Err(TaskError::Conflict(format!(
                "task {} is already running or being started; Nomad starts a task id once",
                request.task_id
            )));
        };
        // A record of this id left by a dead plugin (Nomad retries a start
        // the plugin died in): remove what it names before starting again.
        if let Some(record) = self.journal.record(&request.task_id) {
            if record.owner != journal::Owner::current() && record.owner.is_alive() {
                return Err(TaskError::Conflict(format!(
                    "task {} is being started by another plugin process (pid {})",
                    request.task_id, record.owner.pid
                )));
            }
            self.clear_record(record).await?;
        }
        let request = Arc::new(request);
        let progress = self.emitter(&request.task_id, &request.alloc_id, &request.task_name);
        let booted = {
            let (hypervisor, net, request, settings) = (
                self.hypervisor.clone(),
                self.net.clone(),
                request.clone(),
                settings.clone(),
            );
            let journal = self.journal.clone();
            blocking("starting the VM", move || {
                let plan = start::prepare(&request, &settings)?;
                start::boot(
                    hypervisor.as_ref(),
                    net.as_ref(),
                    &journal,
                    &request,
                    &settings,
                    &plan,
                    &progress,
                )
                .inspect_err(|error| {
                    progress(&format!(
                        "Start failed, everything it created was removed: {error}"
                    ));
                })
            })
            .await?
        };
        let mut network = booted.network;
        if network.is_none() && request.config.guest_agent && !booted.direct_macs.is_empty() {
            network = self
                .agent_address(
                    &request.task_id,
                    &booted.domain_name,
                    &booted.direct_macs,
                    settings.dhcp_timeout,
                )
                .await;
        }
        let state = DriverState {
            version: DRIVER_STATE_VERSION,
            task_id: request.task_id.clone(),
            task_name: request.task_name.clone(),
            alloc_id: request.alloc_id.clone(),
            domain_name: booted.domain_name.clone(),
            started_at_unix_nanos: unix_nanos(SystemTime::now()),
            volumes: booted.volumes,
            console_log: Some(booted.console_log.clone()),
            stdout_path: request.stdout_path.to_string_lossy().into_owned(),
            net: booted.teardown,
            guest_ip: network.as_ref().map(|network| network.ip),
            origin: StateOrigin::Native,
            guest_agent: request.config.guest_agent,
            signal_commands: request.config.signal_commands.clone(),
        };
        let entry = TaskEntry::new(state.clone());
        if !request.stdout_path.as_os_str().is_empty() {
            entry.attach_console(ConsoleCopier::spawn(
                booted.console_log,
                request.stdout_path.clone(),
                false,
            ));
        }
        self.store.insert(entry);
        self.emitter(&request.task_id, &request.alloc_id, &request.task_name)(&format!(
            "Started VM {}",
            booted.domain_name
        ));
        Ok(StartedTask { state, network })
    }

    /// WaitTask: answers when the task has exited (at once if it has).
    pub async fn wait(&self, task_id: &str) -> Result<TaskExit, TaskError> {
        let entry = self.entry(task_id)?;
        Ok(entry.wait().await)
    }

    /// StopTask: the guest agent's shutdown when it answers, the ACPI power
    /// button, then power off once `timeout` has passed.
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
            // The agent first (guests without acpid stop too), then ACPI
            // for the rest of the time, then destroy.
            let mut remaining = timeout;
            if self.agent_shutdown(&entry).await {
                let share = timeout / 2;
                if tokio::time::timeout(share, entry.wait()).await.is_ok() {
                    return Ok(());
                }
                remaining = timeout.saturating_sub(share);
            }
            self.acpi_shutdown(&entry).await;
            if tokio::time::timeout(remaining, entry.wait()).await.is_ok() {
                return Ok(());
            }
            tracing::info!(domain = %name, timeout = ?timeout, "guest did not power off in time; destroying it");
        }
        entry.mark_forced();
        let (hypervisor, domain) = (self.hypervisor.clone(), name.clone());
        blocking("powering the VM off", move || {
            Ok(hypervisor.power_off(&domain)?)
        })
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

    /// DestroyTask: removes the domain, its volumes, its network setup, and
    /// forgets the task. Safe to repeat after a partial failure.
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
        let (hypervisor, mut state) = (self.hypervisor.clone(), entry.state.clone());
        blocking("removing the VM", move || {
            if state.origin == StateOrigin::GoDriver && state.volumes.is_empty() {
                state.volumes = adopted_go_volumes(hypervisor.as_ref(), &state.domain_name)?;
            }
            hypervisor.remove_domain(&state.domain_name)?;
            crash_point("destroy:domain");
            let mut failures = Vec::new();
            for volume in state.volumes.iter().rev() {
                if let Err(error) = hypervisor.delete_volume(volume) {
                    failures.push(error);
                }
            }
            // Report the first failure; the rest are logged. A retry
            // removes whatever is left.
            for error in failures.iter().skip(1) {
                tracing::warn!(error = %error, "deleting a task volume failed");
            }
            match failures.into_iter().next() {
                Some(error) => Err(error.into()),
                None => Ok(()),
            }
        })
        .await?;
        crash_point("destroy:volumes");
        if let Some(spec) = entry.state.net.clone() {
            let net = self.net.clone();
            blocking("removing the network setup", move || {
                net.vm_terminated_teardown(&VmTerminatedTeardownRequest {
                    teardown_spec: spec,
                })?;
                Ok(())
            })
            .await?;
        }
        entry.set_exit(exit_from(lifecycle::exit_for_stop(
            lifecycle::StopReason::Destroyed,
            true,
            true,
        )));
        self.journal.forget(task_id);
        self.store.remove(task_id);
        Ok(())
    }

    /// InspectTask.
    pub fn inspect(&self, task_id: &str) -> Result<TaskStatus, TaskError> {
        let entry = self.entry(task_id)?;
        let started_nanos = u64::try_from(entry.state.started_at_unix_nanos).unwrap_or(0);
        Ok(TaskStatus {
            task_id: entry.state.task_id.clone(),
            task_name: entry.state.task_name.clone(),
            domain_name: entry.state.domain_name.clone(),
            started_at: UNIX_EPOCH + Duration::from_nanos(started_nanos),
            exit: entry.exit(),
            guest_ip: entry.state.guest_ip,
        })
    }

    /// RecoverTask: re-attach to a task from its handle's state after a
    /// plugin or agent restart.
    pub async fn recover(&self, mut state: DriverState) -> Result<(), TaskError> {
        if self.store.get(&state.task_id).is_some() {
            return Ok(());
        }
        if state.origin == StateOrigin::GoDriver && state.volumes.is_empty() {
            // The Go driver's handle lists no volumes: find them now, while
            // the domain still references them.
            let (hypervisor, domain) = (self.hypervisor.clone(), state.domain_name.clone());
            match blocking("finding the Go driver's volumes", move || {
                Ok(adopted_go_volumes(hypervisor.as_ref(), &domain)?)
            })
            .await
            {
                Ok(volumes) => state.volumes = volumes,
                Err(error) => {
                    tracing::warn!(error = %error, domain = %state.domain_name, "cannot list the volumes of an adopted Go driver domain; destroy will look again");
                }
            }
        }
        let entry = TaskEntry::new(state.clone());
        self.store.insert(entry.clone());
        // Its journal record (if this plugin made it) is ours from now on.
        self.journal.adopt(&state.task_id);
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
        let hypervisor = self.hypervisor.clone();
        let settled =
            tokio::task::spawn_blocking(move || settle_from_state(hypervisor.as_ref(), &entry))
                .await;
        if let Ok(Err(error)) = settled {
            tracing::warn!(error = %error, "cannot reconcile task state with the hypervisor");
        }
    }

    /// TaskStats: one sample per interval until the client goes away or
    /// `stop` turns true.
    pub fn stats(
        &self,
        task_id: &str,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<UsageSample>, TaskError> {
        let entry = self.entry(task_id)?;
        let interval = if interval.is_zero() {
            Duration::from_secs(1)
        } else {
            interval
        };
        let (sender, receiver) = mpsc::channel(4);
        let hypervisor = self.hypervisor.clone();
        let origin = Instant::now();
        tokio::spawn(async move {
            // The host's clock speed does not change: read it once.
            let facts = {
                let hypervisor = hypervisor.clone();
                tokio::task::spawn_blocking(move || hypervisor.host_facts()).await
            };
            let mhz = match facts {
                Ok(Ok(facts)) => f64::from(facts.mhz_per_core),
                _ => 0.0,
            };
            let mut previous: Option<CpuSample> = None;
            loop {
                if !entry.is_running() {
                    return;
                }
                let (hypervisor, name) = (hypervisor.clone(), entry.state.domain_name.clone());
                let counters =
                    tokio::task::spawn_blocking(move || hypervisor.counters(&name)).await;
                if let Ok(Ok(Some(counters))) = counters {
                    let now = CpuSample {
                        cpu_time_ns: counters.cpu_time_ns,
                        at_ns: u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
                        vcpus: counters.vcpus,
                    };
                    let percent = previous.map_or(0.0, |before| stats::cpu_percent(&before, &now));
                    previous = Some(now);
                    let (rss, usage, max_usage) = stats::memory_usage_bytes(&counters.memory);
                    let sample = UsageSample {
                        cpu_percent: percent,
                        cpu_total_ticks: stats::total_ticks(percent, mhz),
                        memory_rss_bytes: rss,
                        memory_usage_bytes: usage,
                        memory_max_usage_bytes: max_usage,
                        at: SystemTime::now(),
                    };
                    if sender.send(sample).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|stopping| *stopping) => return,
                    () = sender.closed() => return,
                }
            }
        });
        Ok(receiver)
    }

    fn handle_event(&self, event: &LifecycleEvent) {
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
            if let Err(error) = settle_from_state(self.hypervisor.as_ref(), &entry) {
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
            if let Err(error) = settle_from_state(self.hypervisor.as_ref(), &entry) {
                tracing::warn!(error = %error, "cannot reconcile task state with the hypervisor");
                return;
            }
        }
    }
}

/// Removes what a journal record names: the domain only when its metadata
/// says it is this task's, then the recorded volumes, then the network
/// setup. Each step tolerates the thing being gone.
fn remove_recorded(
    hypervisor: &dyn Hypervisor,
    net: &dyn Net,
    record: &TaskRecord,
) -> Result<(), TaskError> {
    if record.domain_defined {
        match hypervisor.domain_owner(&record.domain_name)? {
            Some(owner) if owner == record.task_id => {
                hypervisor.remove_domain(&record.domain_name)?;
            }
            Some(other) => {
                tracing::warn!(domain = %record.domain_name, owner = %other, task_id = %record.task_id, "domain belongs to another task; leaving it");
            }
            None => {}
        }
    }
    for volume in record.volumes.iter().rev() {
        hypervisor.delete_volume(volume)?;
    }
    if let Some(intent) = &record.net {
        net.remove_unfinished(intent)?;
    }
    Ok(())
}

/// Reads the domain's state and records an exit if it has ended.
fn settle_from_state(hypervisor: &dyn Hypervisor, entry: &TaskEntry) -> Result<(), TaskError> {
    match hypervisor.domain_state(&entry.state.domain_name)? {
        None => {
            entry.set_exit(exit_from(lifecycle::exit_for_vanished()));
        }
        Some(state) => {
            if let Some(outcome) = lifecycle::exit_for_state(
                state.state,
                state.reason,
                entry.stop_requested(),
                entry.forced(),
            ) {
                entry.set_exit(exit_from(outcome));
            }
        }
    }
    Ok(())
}

/// Runs on its own thread: applies hypervisor events and reconciles after
/// reconnects. Wakes on events; otherwise only every
/// [`RECONCILE_CHECK`], as the health check's ping (every few seconds while
/// Nomad fingerprints) already reconciles after a reconnect.
fn dispatch_events(tasks: &Weak<Tasks>, receiver: &std::sync::mpsc::Receiver<LifecycleEvent>) {
    loop {
        let received = receiver.recv_timeout(RECONCILE_CHECK);
        let Some(tasks) = tasks.upgrade() else { return };
        match received {
            Ok(event) => tasks.handle_event(&event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // The connection object owning the sender is gone; keep
                // reconciling on reconnects but do not spin.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        tasks.reconcile_if_reconnected();
        drop(tasks);
    }
}
