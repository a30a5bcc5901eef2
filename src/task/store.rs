//! The driver's running tasks, keyed by Nomad task id, and each task's exit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use super::console::ConsoleCopier;
pub use super::contract::TaskExit;
use crate::nomad::driver_state::DriverState;

/// One task the driver knows about.
pub struct TaskEntry {
    pub state: DriverState,
    exit: watch::Sender<Option<TaskExit>>,
    stop_requested: AtomicBool,
    forced: AtomicBool,
    console: Mutex<Option<ConsoleCopier>>,
}

impl TaskEntry {
    pub fn new(state: DriverState) -> Arc<Self> {
        let (exit, _) = watch::channel(None);
        Arc::new(Self {
            state,
            exit,
            stop_requested: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            console: Mutex::new(None),
        })
    }

    /// Records the exit once; later reports are ignored. Returns whether
    /// this call set it.
    pub fn set_exit(&self, exit: TaskExit) -> bool {
        let mut changed = false;
        self.exit.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(exit);
                changed = true;
            }
            changed
        });
        if changed {
            if let Ok(mut console) = self.console.lock() {
                // Leave the copier running briefly is not needed: the file is complete.
                if let Some(copier) = console.take() {
                    copier.stop();
                }
            }
        }
        changed
    }

    pub fn exit(&self) -> Option<TaskExit> {
        self.exit.borrow().clone()
    }

    pub fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Waits until the task has exited.
    pub async fn wait(&self) -> TaskExit {
        let mut receiver = self.exit.subscribe();
        loop {
            if let Some(exit) = receiver.borrow_and_update().clone() {
                return exit;
            }
            if receiver.changed().await.is_err() {
                // The sender lives in self, so this cannot happen while we hold self.
                return TaskExit {
                    exit_code: 1,
                    signal: 0,
                    error: Some("task state lost".into()),
                    at: SystemTime::now(),
                };
            }
        }
    }

    pub fn mark_stop_requested(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    pub fn mark_forced(&self) {
        self.forced.store(true, Ordering::SeqCst);
    }

    pub fn forced(&self) -> bool {
        self.forced.load(Ordering::SeqCst)
    }

    pub fn attach_console(&self, copier: ConsoleCopier) {
        if let Ok(mut console) = self.console.lock() {
            *console = Some(copier);
        }
    }
}

/// All tasks, keyed by Nomad task id, and the ids being started.
#[derive(Default)]
pub struct TaskStore {
    tasks: Mutex<HashMap<String, Arc<TaskEntry>>>,
    starting: Arc<Mutex<HashSet<String>>>,
}

/// Holds a task id while its start runs; released on drop.
pub struct StartClaim {
    task_id: String,
    starting: Arc<Mutex<HashSet<String>>>,
}

impl Drop for StartClaim {
    fn drop(&mut self) {
        if let Ok(mut starting) = self.starting.lock() {
            starting.remove(&self.task_id);
        }
    }
}

impl TaskStore {
    /// Claims `task_id` for a start: `None` when the task exists or another
    /// start of it is under way, so exactly one of racing starts proceeds.
    pub fn claim_start(&self, task_id: &str) -> Option<StartClaim> {
        let tasks = self.tasks.lock().ok()?;
        let mut starting = self.starting.lock().ok()?;
        if tasks.contains_key(task_id) || !starting.insert(task_id.to_string()) {
            return None;
        }
        Some(StartClaim {
            task_id: task_id.to_string(),
            starting: self.starting.clone(),
        })
    }

    /// Whether `task_id` is in the store or a start of it is under way:
    /// either way its journal record is live, not an orphan.
    pub fn is_known(&self, task_id: &str) -> bool {
        self.get(task_id).is_some()
            || self
                .starting
                .lock()
                .map(|starting| starting.contains(task_id))
                .unwrap_or(true)
    }

    pub fn insert(&self, entry: Arc<TaskEntry>) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.insert(entry.state.task_id.clone(), entry);
        }
    }

    pub fn get(&self, task_id: &str) -> Option<Arc<TaskEntry>> {
        self.tasks
            .lock()
            .ok()
            .and_then(|tasks| tasks.get(task_id).cloned())
    }

    pub fn remove(&self, task_id: &str) -> Option<Arc<TaskEntry>> {
        self.tasks
            .lock()
            .ok()
            .and_then(|mut tasks| tasks.remove(task_id))
    }

    pub fn by_domain(&self, domain_name: &str) -> Option<Arc<TaskEntry>> {
        self.tasks.lock().ok().and_then(|tasks| {
            tasks
                .values()
                .find(|entry| entry.state.domain_name == domain_name)
                .cloned()
        })
    }

    pub fn all(&self) -> Vec<Arc<TaskEntry>> {
        self.tasks
            .lock()
            .map(|tasks| tasks.values().cloned().collect())
            .unwrap_or_default()
    }
}
