//! The Driver gRPC service.

use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::fingerprint::{FINGERPRINT_PERIOD, HEALTH_CHECK_PERIOD};
use super::Driver;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::driver_server::Driver as DriverService;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::*;

/// Answer for RPCs whose implementation has not landed yet.
fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented yet by the virt driver (plugin version {})",
        super::PLUGIN_VERSION
    ))
}

#[tonic::async_trait]
impl DriverService for Driver {
    async fn init(&self, _request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        Ok(Response::new(InitResponse {}))
    }

    async fn task_config_schema(
        &self,
        _request: Request<TaskConfigSchemaRequest>,
    ) -> Result<Response<TaskConfigSchemaResponse>, Status> {
        Ok(Response::new(TaskConfigSchemaResponse {
            spec: Some((&crate::config::task::schema()).into()),
        }))
    }

    async fn capabilities(
        &self,
        _request: Request<CapabilitiesRequest>,
    ) -> Result<Response<CapabilitiesResponse>, Status> {
        Ok(Response::new(CapabilitiesResponse {
            capabilities: Some(super::capabilities::capabilities()),
        }))
    }

    async fn fingerprint(
        &self,
        _request: Request<FingerprintRequest>,
    ) -> Result<Response<BoxStream<FingerprintResponse>>, Status> {
        let (sender, receiver) = mpsc::channel(4);
        let first = self.fingerprint_once().await;
        let mut stop = self.shutdown_signal();
        let driver = self.self_arc();
        tokio::spawn(async move {
            let mut last_health = first.health;
            let mut last_sent = Instant::now();
            if sender.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(HEALTH_CHECK_PERIOD) => {}
                    _ = stop.wait_for(|stopping| *stopping) => return,
                    _ = sender.closed() => return,
                }
                let Some(driver) = driver.upgrade() else {
                    return;
                };
                let response = driver.fingerprint_once().await;
                drop(driver);
                let changed = response.health != last_health;
                if changed || last_sent.elapsed() >= FINGERPRINT_PERIOD {
                    if changed {
                        tracing::info!(health = response.health, description = %response.health_description, "driver health changed");
                    }
                    last_health = response.health;
                    last_sent = Instant::now();
                    if sender.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn recover_task(
        &self,
        _request: Request<RecoverTaskRequest>,
    ) -> Result<Response<RecoverTaskResponse>, Status> {
        Err(not_yet("RecoverTask"))
    }

    async fn start_task(
        &self,
        _request: Request<StartTaskRequest>,
    ) -> Result<Response<StartTaskResponse>, Status> {
        Err(not_yet("StartTask"))
    }

    async fn wait_task(
        &self,
        _request: Request<WaitTaskRequest>,
    ) -> Result<Response<WaitTaskResponse>, Status> {
        Err(not_yet("WaitTask"))
    }

    async fn stop_task(
        &self,
        _request: Request<StopTaskRequest>,
    ) -> Result<Response<StopTaskResponse>, Status> {
        Err(not_yet("StopTask"))
    }

    async fn destroy_task(
        &self,
        _request: Request<DestroyTaskRequest>,
    ) -> Result<Response<DestroyTaskResponse>, Status> {
        Err(not_yet("DestroyTask"))
    }

    async fn inspect_task(
        &self,
        _request: Request<InspectTaskRequest>,
    ) -> Result<Response<InspectTaskResponse>, Status> {
        Err(not_yet("InspectTask"))
    }

    async fn task_stats(
        &self,
        _request: Request<TaskStatsRequest>,
    ) -> Result<Response<BoxStream<TaskStatsResponse>>, Status> {
        Err(not_yet("TaskStats"))
    }

    async fn task_events(
        &self,
        _request: Request<TaskEventsRequest>,
    ) -> Result<Response<BoxStream<DriverTaskEvent>>, Status> {
        // No task emits events yet; hold the stream open until shutdown so
        // Nomad does not reopen it in a loop.
        Ok(Response::new(crate::plugin::idle_until_shutdown(
            self.shutdown_signal(),
        )))
    }

    async fn shutdown(
        &self,
        _request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        Ok(Response::new(ShutdownResponse {}))
    }

    async fn signal_task(
        &self,
        _request: Request<SignalTaskRequest>,
    ) -> Result<Response<SignalTaskResponse>, Status> {
        Err(Status::unimplemented(
            "signals are not supported by the virt driver: there is no channel into the guest (capabilities: send_signals=false)",
        ))
    }

    async fn exec_task(
        &self,
        _request: Request<ExecTaskRequest>,
    ) -> Result<Response<ExecTaskResponse>, Status> {
        Err(Status::unimplemented(
            "exec is not supported by the virt driver: there is no guest agent channel (capabilities: exec=false)",
        ))
    }

    async fn exec_task_streaming(
        &self,
        _request: Request<Streaming<ExecTaskStreamingRequest>>,
    ) -> Result<Response<BoxStream<ExecTaskStreamingResponse>>, Status> {
        Err(Status::unimplemented(
            "exec is not supported by the virt driver: there is no guest agent channel (capabilities: exec=false)",
        ))
    }

    async fn create_network(
        &self,
        _request: Request<CreateNetworkRequest>,
    ) -> Result<Response<CreateNetworkResponse>, Status> {
        Err(Status::unimplemented(
            "the virt driver does not create network namespaces (capabilities: must_create_network=false)",
        ))
    }

    async fn destroy_network(
        &self,
        _request: Request<DestroyNetworkRequest>,
    ) -> Result<Response<DestroyNetworkResponse>, Status> {
        Err(Status::unimplemented(
            "the virt driver does not create network namespaces (capabilities: must_create_network=false)",
        ))
    }
}
