//! The BasePlugin and Driver gRPC services. Thin: decode, validate, call the
//! domain modules, encode.

mod base;
pub mod capabilities;
pub mod convert;
pub mod fingerprint;
mod service;

use std::sync::{Arc, RwLock, Weak};

use tokio::sync::watch;

use crate::config::plugin::Settings;
use crate::hypervisor::libvirt::LibvirtHypervisor;
use crate::libvirt::Libvirt;
use crate::net::iptables::Iptables;
use crate::net::libvirt::LibvirtNet;
use crate::task::journal::Journal;
use crate::task::Tasks;

pub use crate::meta::{PLUGIN_API_VERSION, PLUGIN_NAME, PLUGIN_VERSION};

/// Port range Nomad gives for dynamic ports, from SetConfig's nomad_config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPortRange {
    pub min: u32,
    pub max: u32,
}

/// The driver: plugin settings, the libvirt connection and shutdown wiring.
pub struct Driver {
    settings: RwLock<Arc<Settings>>,
    libvirt: Libvirt,
    tasks: Arc<Tasks>,
    port_range: RwLock<Option<ClientPortRange>>,
    /// Turns true when the plugin shuts down; long-lived streams end then.
    shutdown: watch::Sender<bool>,
    /// Background work (fingerprint loops) holds this, not a strong ref.
    me: Weak<Driver>,
}

/// The start journal in its usual place; without access to it (not root),
/// a private one that lives as long as this process, with a warning.
fn open_journal() -> Journal {
    let dir = Journal::default_dir();
    match Journal::open(&dir) {
        Ok(journal) => journal,
        Err(error) => {
            let fallback = std::env::temp_dir()
                .join(format!("nomad-driver-virt-journal-{}", std::process::id()));
            tracing::warn!(error = %error, fallback = %fallback.display(), "cannot use the start journal; unfinished starts of this process will not be cleaned up after a crash");
            match Journal::open(&fallback) {
                Ok(journal) => journal,
                Err(error) => {
                    tracing::error!(error = %error, "cannot open any start journal");
                    Journal::unwritable(fallback)
                }
            }
        }
    }
}

impl Driver {
    /// A driver with default settings; SetConfig replaces them.
    pub fn new() -> Arc<Self> {
        let settings = Settings::default();
        let libvirt = Libvirt::new(
            settings.libvirt_uri.clone(),
            settings.libvirt_credentials.clone(),
        );
        let tasks = Tasks::new(
            Arc::new(LibvirtHypervisor::new(libvirt.clone())),
            Arc::new(LibvirtNet::new(libvirt.clone(), Iptables::host())),
            open_journal(),
        );
        Arc::new_cyclic(|me| Self {
            settings: RwLock::new(Arc::new(settings)),
            libvirt,
            tasks,
            port_range: RwLock::new(None),
            shutdown: watch::channel(false).0,
            me: me.clone(),
        })
    }

    /// The sender that starts the plugin's shutdown.
    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// A receiver that turns true at shutdown.
    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        match self.settings.read() {
            Ok(settings) => settings.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn apply_settings(&self, settings: Settings) {
        self.libvirt
            .reconfigure(&settings.libvirt_uri, settings.libvirt_credentials.clone());
        crate::logging::set_level_from_config(settings.log_level);
        match self.settings.write() {
            Ok(mut slot) => *slot = Arc::new(settings),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(settings),
        }
    }

    pub(crate) fn self_arc(&self) -> Weak<Driver> {
        self.me.clone()
    }

    /// The shared libvirt connection.
    pub fn libvirt(&self) -> &Libvirt {
        &self.libvirt
    }

    /// Names of the configured storage pools.
    pub(crate) fn pool_names(&self) -> Vec<String> {
        self.settings()
            .pools
            .iter()
            .map(|pool| pool.name.clone())
            .collect()
    }

    /// The task tracker.
    pub fn tasks(&self) -> &Arc<Tasks> {
        &self.tasks
    }

    /// The dynamic port range Nomad told us about, if any.
    pub fn port_range(&self) -> Option<ClientPortRange> {
        self.port_range.read().ok().and_then(|range| *range)
    }
}
