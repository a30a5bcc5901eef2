//! The go-plugin transport: cookie check, unix-socket listener, handshake
//! line, go-plugin's internal services, signals and graceful exit.

pub mod handshake;
mod internal;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::driver::Driver;
use crate::pb::hashicorp::nomad::plugins::base::proto::base_plugin_server::BasePluginServer;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::driver_server::DriverServer;
use crate::pb::plugin::grpc_broker_server::GrpcBrokerServer;
use crate::pb::plugin::grpc_controller_server::GrpcControllerServer;
use crate::pb::plugin::grpc_stdio_server::GrpcStdioServer;

pub use internal::Shutdown;

/// Errors that stop the plugin from serving.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot create a private directory for the plugin socket in {path}: {source}")]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the plugin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set permissions on the plugin socket {path}: {source}")]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "PLUGIN_UNIX_SOCKET_GROUP {group:?} is neither a group name nor a numeric gid on this host"
    )]
    UnknownGroup { group: String },
    #[error("cannot write the handshake line: {0}")]
    Handshake(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// How long in-flight RPCs get to finish after a shutdown request.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// Serves the plugin on a unix socket until GRPCController/Shutdown or SIGTERM.
pub async fn serve(driver: Arc<Driver>) -> Result<(), PluginError> {
    let (app_version, offered_ours) =
        handshake::negotiate_protocol(std::env::var("PLUGIN_PROTOCOL_VERSIONS").ok().as_deref());
    if !offered_ours {
        tracing::warn!(
            offered = std::env::var("PLUGIN_PROTOCOL_VERSIONS").unwrap_or_default(),
            ours = app_version,
            "client does not offer our protocol version; answering with ours"
        );
    }

    let base = handshake::socket_base_dir(std::env::var("PLUGIN_UNIX_SOCKET_DIR").ok().as_deref());
    let private_dir =
        handshake::private_socket_dir(&base).map_err(|source| PluginError::SocketDir {
            path: base.clone(),
            source,
        })?;
    let _dir_guard = SocketDir(private_dir.clone());
    let path = handshake::socket_path(&private_dir);
    let group = std::env::var("PLUGIN_UNIX_SOCKET_GROUP").ok();
    // With a group, its members must be able to enter the directory.
    restrict(&private_dir, group.as_deref(), 0o700, 0o750)?;
    let listener = UnixListener::bind(&path).map_err(|source| PluginError::Bind {
        path: path.clone(),
        source,
    })?;
    let _socket_guard = SocketFile(path.clone());
    restrict(&path, group.as_deref(), 0o600, 0o660)?;

    let shutdown = Shutdown::new(driver.shutdown_sender());
    let shutdown_rx = driver.shutdown_signal();

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(PluginError::Signals)?;
    // Replacing SIGINT's default action keeps a Ctrl-C aimed at a foreground
    // Nomad agent from killing us; Nomad stops plugins itself.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(PluginError::Signals)?;
    tokio::spawn(async move {
        while sigint.recv().await.is_some() {
            tracing::trace!("ignoring SIGINT; Nomad shuts plugins down itself");
        }
    });
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if sigterm.recv().await.is_some() {
                tracing::info!("SIGTERM received, shutting down");
                shutdown.trigger();
            }
        });
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("plugin", tonic_health::ServingStatus::Serving)
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(GrpcControllerServer::new(internal::Controller::new(
            shutdown.clone(),
        )))
        .add_service(GrpcStdioServer::new(internal::Stdio::new(
            shutdown_rx.clone(),
        )))
        .add_service(GrpcBrokerServer::new(internal::Broker::new(
            shutdown_rx.clone(),
        )))
        .add_service(BasePluginServer::from_arc(driver.clone()))
        .add_service(DriverServer::from_arc(driver.clone()));

    // Every service is registered and the socket is bound: now announce it.
    let line = handshake::handshake_line(app_version, &path);
    {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(line.as_bytes())
            .map_err(PluginError::Handshake)?;
        stdout.flush().map_err(PluginError::Handshake)?;
    }
    tracing::info!(socket = %path.display(), version = env!("CARGO_PKG_VERSION"), "plugin serving");

    let mut stop_rx = shutdown_rx.clone();
    let stop_signal = async move {
        let _ = stop_rx.wait_for(|stopping| *stopping).await;
    };
    let server =
        router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop_signal);
    tokio::pin!(server);
    let mut grace_rx = shutdown_rx.clone();
    tokio::select! {
        result = &mut server => result?,
        _ = async {
            let _ = grace_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("in-flight RPCs did not finish within the shutdown grace period");
        }
    }
    health_reporter
        .set_service_status("plugin", tonic_health::ServingStatus::NotServing)
        .await;
    tracing::info!("plugin stopped");
    Ok(())
}

/// Removes the socket file when serving ends, however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes the private socket directory when serving ends (after the socket).
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Owner-only by default (`private`); with a group, owner and group
/// (`shared`, go-plugin's 0660 for the socket).
fn restrict(
    path: &Path,
    group: Option<&str>,
    private: u32,
    shared: u32,
) -> Result<(), PluginError> {
    let permissions_error = |source| PluginError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    match group {
        Some(group) if !group.is_empty() => {
            let gid = resolve_group(group).ok_or_else(|| PluginError::UnknownGroup {
                group: group.to_string(),
            })?;
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(permissions_error)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(shared))
                .map_err(permissions_error)
        }
        _ => std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))
            .map_err(permissions_error),
    }
}

/// A numeric gid, or a group name looked up in /etc/group.
fn resolve_group(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Some(gid);
    }
    let contents = std::fs::read_to_string("/etc/group").ok()?;
    group_gid_from_file(&contents, group)
}

fn group_gid_from_file(contents: &str, group: &str) -> Option<u32> {
    contents.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let gid = fields.next()?;
        (name == group).then(|| gid.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lookup_reads_etc_group_format() {
        let file = "root:x:0:\nkvm:x:104:alice\nlibvirt:x:117:\n";
        assert_eq!(group_gid_from_file(file, "kvm"), Some(104));
        assert_eq!(group_gid_from_file(file, "libvirt"), Some(117));
        assert_eq!(group_gid_from_file(file, "nobody"), None);
    }
}
