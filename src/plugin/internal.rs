//! go-plugin's own services: controller (shutdown), stdio and broker.
//! Nomad opens the stdio and broker streams at connect and never uses them
//! for drivers; we hold them open until shutdown so the client sees no errors.

use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pb::plugin::grpc_broker_server::GrpcBroker;
use crate::pb::plugin::grpc_controller_server::GrpcController;
use crate::pb::plugin::grpc_stdio_server::GrpcStdio;
use crate::pb::plugin::{ConnInfo, Empty, StdioData};

/// Starts a graceful stop of the whole plugin.
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    pub fn new(sender: watch::Sender<bool>) -> Self {
        Self(sender)
    }

    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

/// A stream that yields nothing and ends when shutdown starts or the
/// client goes away.
pub(crate) fn idle_until_shutdown<T: Send + 'static>(
    mut stop: watch::Receiver<bool>,
) -> BoxStream<T> {
    let (sender, receiver) = mpsc::channel::<Result<T, Status>>(1);
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.wait_for(|stopping| *stopping) => {}
            _ = sender.closed() => {}
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}

pub struct Controller {
    shutdown: Shutdown,
}

impl Controller {
    pub fn new(shutdown: Shutdown) -> Self {
        Self { shutdown }
    }
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        tracing::info!("shutdown requested by the plugin client");
        self.shutdown.trigger();
        Ok(Response::new(Empty {}))
    }
}

pub struct Stdio {
    stop: watch::Receiver<bool>,
}

impl Stdio {
    pub fn new(stop: watch::Receiver<bool>) -> Self {
        Self { stop }
    }
}

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    async fn stream_stdio(
        &self,
        _request: Request<()>,
    ) -> Result<Response<BoxStream<StdioData>>, Status> {
        // Our stdout/stderr are not redirected: logs go to the real stderr.
        Ok(Response::new(idle_until_shutdown(self.stop.clone())))
    }
}

pub struct Broker {
    stop: watch::Receiver<bool>,
}

impl Broker {
    pub fn new(stop: watch::Receiver<bool>) -> Self {
        Self { stop }
    }
}

#[tonic::async_trait]
impl GrpcBroker for Broker {
    async fn start_stream(
        &self,
        request: Request<Streaming<ConnInfo>>,
    ) -> Result<Response<BoxStream<ConnInfo>>, Status> {
        let mut incoming = request.into_inner();
        let mut stop = self.stop.clone();
        // Drain whatever the client sends; we never broker connections.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = incoming.next() => match message {
                        Some(Ok(info)) => tracing::debug!(service_id = info.service_id, "ignoring broker connection info"),
                        _ => break,
                    },
                    _ = stop.wait_for(|stopping| *stopping) => break,
                }
            }
        });
        Ok(Response::new(idle_until_shutdown(self.stop.clone())))
    }
}
