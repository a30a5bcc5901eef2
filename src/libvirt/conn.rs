//! One libvirt connection per plugin, opened lazily, checked before each use
//! and reopened when it was lost (libvirtd restarted, socket closed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};

pub use virt::connect::Connect;
use virt::connect::{ConnectAuth, ConnectCredential, ConnectCredentialType};

use super::events::{register_lifecycle_events, EventRegistration, LifecycleEvent};
use super::VirtError;

/// Errors talking to libvirt, each naming what was being done; the libvirt
/// error is the source.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(
        "cannot connect to {uri}; is libvirtd running and is the URI right \
         (plugin config provider.libvirt.uri)?"
    )]
    Connect {
        uri: String,
        #[source]
        source: VirtError,
    },
    /// A call about one domain failed.
    #[error("libvirt failed while {action} domain {domain:?}")]
    Domain {
        domain: String,
        action: &'static str,
        #[source]
        source: VirtError,
    },
    #[error("domain {domain:?} does not exist")]
    NoDomain { domain: String },
    /// A call about the host or the connection failed.
    #[error("libvirt failed while {action}")]
    Host {
        action: &'static str,
        #[source]
        source: VirtError,
    },
    #[error("libvirt worker thread failed: {0}")]
    Worker(String),
}

impl LibvirtError {
    /// libvirt refused a host call's arguments ([`VirtError::is_invalid_argument`]).
    pub fn is_invalid_host_argument(&self) -> bool {
        matches!(self, LibvirtError::Host { source, .. } if source.is_invalid_argument())
    }

    /// Whether retrying could succeed: every libvirt failure may be
    /// transient (a restarting daemon, a busy pool). Exhaustive on purpose.
    pub fn is_recoverable(&self) -> bool {
        match self {
            LibvirtError::Connect { .. }
            | LibvirtError::Domain { .. }
            | LibvirtError::NoDomain { .. }
            | LibvirtError::Host { .. }
            | LibvirtError::Worker(_) => true,
        }
    }

    pub(crate) fn domain(domain: &str, action: &'static str, error: impl Into<VirtError>) -> Self {
        LibvirtError::Domain {
            domain: domain.to_string(),
            action,
            source: error.into(),
        }
    }

    pub(crate) fn host(action: &'static str, error: impl Into<VirtError>) -> Self {
        LibvirtError::Host {
            action,
            source: error.into(),
        }
    }
}

struct ConnectionState {
    uri: String,
    credentials: Option<(String, String)>,
    connection: Option<Connect>,
    /// Lifecycle events of the current connection go here.
    event_sink: Option<Sender<LifecycleEvent>>,
    registration: Option<EventRegistration>,
}

/// The plugin's shared libvirt connection.
#[derive(Clone)]
pub struct Libvirt {
    state: Arc<Mutex<ConnectionState>>,
    /// Bumped on every new connection: events may have been missed, so
    /// whoever tracks domains reconciles with their real state.
    generation: Arc<AtomicU64>,
}

/// libvirt's auth callback is a plain fn pointer with no user data we can
/// reach from safe code, so the credentials of the open in progress live here.
static PENDING_CREDENTIALS: Mutex<Option<(String, String)>> = Mutex::new(None);
static OPEN_LOCK: Mutex<()> = Mutex::new(());

// The signature is fixed by virt's `ConnectAuthCallback` type.
#[allow(clippy::ptr_arg)]
fn answer_credentials(credentials: &mut Vec<ConnectCredential>) {
    let pending = PENDING_CREDENTIALS
        .lock()
        .ok()
        .and_then(|guard| guard.clone());
    for credential in credentials.iter_mut() {
        credential.result = match (&credential.typed, &pending) {
            (
                ConnectCredentialType::AuthName | ConnectCredentialType::UserName,
                Some((user, _)),
            ) => Some(user.clone()),
            (ConnectCredentialType::Passphrase, Some((_, password))) => Some(password.clone()),
            _ => None,
        };
    }
}

/// Process-wide libvirt setup: silence libvirt's own printing of errors to
/// stderr (we log them ourselves) and run the default event loop, which
/// keepalives and domain events need.
pub fn init_process() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        virt::error::clear_error_callback();
        match virt::event::event_register_default_impl() {
            Ok(()) => {
                let spawned = std::thread::Builder::new()
                    .name("libvirt-events".into())
                    .spawn(|| loop {
                        if let Err(error) = virt::event::event_run_default_impl() {
                            tracing::warn!(error = %error, "libvirt event loop iteration failed");
                            std::thread::sleep(std::time::Duration::from_millis(200));
                        }
                    });
                if let Err(error) = spawned {
                    tracing::error!(error = %error, "cannot start the libvirt event loop thread");
                }
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot register libvirt's default event loop");
            }
        }
    });
}

impl Libvirt {
    pub fn new(uri: impl Into<String>, credentials: Option<(String, String)>) -> Self {
        init_process();
        Self {
            state: Arc::new(Mutex::new(ConnectionState {
                uri: uri.into(),
                credentials,
                connection: None,
                event_sink: None,
                registration: None,
            })),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Points the connection at another URI or credentials; reconnects lazily.
    pub fn reconfigure(&self, uri: &str, credentials: Option<(String, String)>) {
        if let Ok(mut state) = self.state.lock() {
            if state.uri != uri || state.credentials != credentials {
                state.uri = uri.to_string();
                state.credentials = credentials;
                disconnect(&mut state);
            }
        }
    }

    /// The URI in use.
    pub fn uri(&self) -> String {
        self.state
            .lock()
            .map(|state| state.uri.clone())
            .unwrap_or_default()
    }

    /// Sends lifecycle events of every domain to `sink`, across reconnects.
    pub fn subscribe_events(&self, sink: Sender<LifecycleEvent>) {
        if let Ok(mut state) = self.state.lock() {
            state.event_sink = Some(sink.clone());
            // Move the live connection's registration to the new sink; a
            // reconnect would lose state (and on test:/// files, the node).
            if let Some(connection) = state.connection.clone() {
                drop_registration(&mut state);
                match register_lifecycle_events(&connection, sink) {
                    Ok(registration) => state.registration = Some(registration),
                    Err(error) => {
                        tracing::warn!(error = %error.message(), "cannot subscribe to libvirt domain events");
                    }
                }
            }
        }
    }

    /// How many connections have been opened so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Runs `work` with a live connection on this thread (which may block).
    pub fn call_blocking<T, F>(&self, work: F) -> Result<T, LibvirtError>
    where
        F: FnOnce(&Connect) -> Result<T, LibvirtError>,
    {
        let mut state = self
            .state
            .lock()
            .map_err(|_| LibvirtError::Worker("connection lock poisoned".into()))?;
        let connection = ensure_connected(&mut state, &self.generation)?;
        drop(state);
        work(&connection)
    }

    /// Runs `work` with a live connection on the blocking pool.
    pub async fn call<T, F>(&self, work: F) -> Result<T, LibvirtError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, LibvirtError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.call_blocking(work))
            .await
            .map_err(|error| LibvirtError::Worker(error.to_string()))?
    }
}

/// Returns a live connection, reopening it if it was lost.
fn ensure_connected(
    state: &mut ConnectionState,
    generation: &AtomicU64,
) -> Result<Connect, LibvirtError> {
    if let Some(connection) = &state.connection {
        if connection.is_alive().unwrap_or(false) {
            return Ok(connection.clone());
        }
        tracing::warn!(uri = %state.uri, "libvirt connection lost; reconnecting");
        disconnect(state);
    }
    let connection = open(&state.uri, state.credentials.as_ref())?;
    // Keepalive lets libvirt notice a dead daemon; the test driver lacks it.
    if let Err(error) = connection.set_keep_alive(5, 3) {
        tracing::debug!(error = %error.message(), "libvirt keepalive not available on this connection");
    }
    if let Some(sink) = &state.event_sink {
        match register_lifecycle_events(&connection, sink.clone()) {
            Ok(registration) => state.registration = Some(registration),
            Err(error) => {
                tracing::warn!(error = %error.message(), "cannot subscribe to libvirt domain events");
            }
        }
    }
    tracing::info!(uri = %state.uri, "connected to libvirt");
    state.connection = Some(connection.clone());
    generation.fetch_add(1, Ordering::SeqCst);
    Ok(connection)
}

fn open(uri: &str, credentials: Option<&(String, String)>) -> Result<Connect, LibvirtError> {
    let connect_error = |error: virt::error::Error| LibvirtError::Connect {
        uri: uri.to_string(),
        source: error.into(),
    };
    match credentials {
        None => Connect::open(Some(uri)).map_err(connect_error),
        Some(credentials) => {
            let _serialised = OPEN_LOCK
                .lock()
                .map_err(|_| LibvirtError::Worker("open lock poisoned".into()))?;
            if let Ok(mut pending) = PENDING_CREDENTIALS.lock() {
                *pending = Some(credentials.clone());
            }
            let mut auth = ConnectAuth::new(
                vec![
                    ConnectCredentialType::AuthName,
                    ConnectCredentialType::Passphrase,
                ],
                answer_credentials,
            );
            let result = Connect::open_auth(Some(uri), &mut auth, 0).map_err(connect_error);
            if let Ok(mut pending) = PENDING_CREDENTIALS.lock() {
                *pending = None;
            }
            result
        }
    }
}

/// Drops the event registration, then the connection.
fn disconnect(state: &mut ConnectionState) {
    drop_registration(state);
    close_quietly(state.connection.take());
}

fn drop_registration(state: &mut ConnectionState) {
    if let Some(registration) = state.registration.take() {
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(registration)));
        if result.is_err() {
            tracing::debug!(
                "dropping an event registration on a dead connection reported an error"
            );
        }
    }
}

/// Drops a connection; the `virt` crate panics if closing fails (a dead
/// connection), which must not take the plugin down.
fn close_quietly(connection: Option<Connect>) {
    if let Some(connection) = connection {
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(connection)));
        if result.is_err() {
            tracing::debug!("closing a dead libvirt connection reported an error");
        }
    }
}
