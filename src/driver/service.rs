//! The Driver gRPC service.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::fingerprint::{FINGERPRINT_PERIOD, HEALTH_CHECK_PERIOD};
use super::Driver;
use crate::guest_agent::SessionInput;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::driver_server::Driver as DriverService;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::*;

/// Time Nomad gets to recover running tasks before what unfinished starts
/// left behind is removed.
const RECONCILE_DELAY: Duration = Duration::from_secs(60);
/// Overrides [`RECONCILE_DELAY`] in seconds (tests that kill the plugin).
pub(crate) const RECONCILE_DELAY_ENV: &str = "NOMAD_DRIVER_VIRT_RECONCILE_DELAY";

/// The reconcile delay in force.
pub(crate) fn reconcile_delay() -> Duration {
    std::env::var(RECONCILE_DELAY_ENV)
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .unwrap_or(RECONCILE_DELAY)
}

/// How long a TTY session waits after setup for Nomad's terminal size.
const FIRST_SIZE_WAIT: Duration = Duration::from_millis(500);

/// StopTask timeout when Nomad sends none (Nomad's default kill timeout).
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[tonic::async_trait]
impl DriverService for Driver {
    async fn init(&self, _request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        self.tasks().init_host(reconcile_delay(), self.pool_names());
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
                // A cheap liveness check every period; the full fingerprint
                // (versions, capabilities, pools, networks) only when health
                // flips or the period is up.
                let reachable = driver.tasks().hypervisor_reachable().await;
                let was_healthy = last_health == HealthState::Healthy as i32;
                if reachable == was_healthy && last_sent.elapsed() < FINGERPRINT_PERIOD {
                    continue;
                }
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
        request: Request<RecoverTaskRequest>,
    ) -> Result<Response<RecoverTaskResponse>, Status> {
        let handle = request
            .into_inner()
            .handle
            .ok_or_else(|| Status::invalid_argument("RecoverTask needs a task handle"))?;
        let state = convert::recovered_state(&handle)?;
        self.tasks().recover(state).await?;
        Ok(Response::new(RecoverTaskResponse {}))
    }

    async fn start_task(
        &self,
        request: Request<StartTaskRequest>,
    ) -> Result<Response<StartTaskResponse>, Status> {
        let task = request
            .into_inner()
            .task
            .ok_or_else(|| Status::invalid_argument("StartTask needs a task config"))?;
        let start = convert::start_request(&task)?;
        let started = self.tasks().start(start, self.settings()).await?;
        Ok(Response::new(convert::start_response(task, started)))
    }

    async fn wait_task(
        &self,
        request: Request<WaitTaskRequest>,
    ) -> Result<Response<WaitTaskResponse>, Status> {
        let exit = self.tasks().wait(&request.into_inner().task_id).await?;
        Ok(Response::new(convert::wait_response(&exit)))
    }

    async fn stop_task(
        &self,
        request: Request<StopTaskRequest>,
    ) -> Result<Response<StopTaskResponse>, Status> {
        let request = request.into_inner();
        let timeout = request
            .timeout
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        self.tasks()
            .stop(&request.task_id, timeout, &request.signal)
            .await?;
        Ok(Response::new(StopTaskResponse {}))
    }

    async fn destroy_task(
        &self,
        request: Request<DestroyTaskRequest>,
    ) -> Result<Response<DestroyTaskResponse>, Status> {
        let request = request.into_inner();
        self.tasks()
            .destroy(&request.task_id, request.force)
            .await?;
        Ok(Response::new(DestroyTaskResponse {}))
    }

    async fn inspect_task(
        &self,
        request: Request<InspectTaskRequest>,
    ) -> Result<Response<InspectTaskResponse>, Status> {
        let status = self.tasks().inspect(&request.into_inner().task_id)?;
        Ok(Response::new(convert::inspect_response(&status)))
    }

    async fn task_stats(
        &self,
        request: Request<TaskStatsRequest>,
    ) -> Result<Response<BoxStream<TaskStatsResponse>>, Status> {
        let request = request.into_inner();
        let interval = request
            .collection_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(1));
        let samples = self
            .tasks()
            .stats(&request.task_id, interval, self.shutdown_signal())?;
        let task_id = request.task_id;
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(samples), move |sample| {
            Ok(convert::stats_response(&task_id, &sample))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn task_events(
        &self,
        _request: Request<TaskEventsRequest>,
    ) -> Result<Response<BoxStream<DriverTaskEvent>>, Status> {
        let mut events = self.tasks().subscribe_events();
        let mut stop = self.shutdown_signal();
        let (sender, receiver) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    return;
                }
                let event = tokio::select! {
                    event = events.recv() => event,
                    changed = stop.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ = sender.closed() => return,
                };
                match event {
                    Ok(event) => {
                        if sender.send(Ok(convert::task_event(event))).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(skipped, "task event stream fell behind; events dropped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn shutdown(
        &self,
        _request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        Ok(Response::new(ShutdownResponse {}))
    }

    async fn signal_task(
        &self,
        request: Request<SignalTaskRequest>,
    ) -> Result<Response<SignalTaskResponse>, Status> {
        let request = request.into_inner();
        self.tasks()
            .signal(&request.task_id, &request.signal)
            .await?;
        Ok(Response::new(SignalTaskResponse {}))
    }

    async fn exec_task(
        &self,
        request: Request<ExecTaskRequest>,
    ) -> Result<Response<ExecTaskResponse>, Status> {
        let request = request.into_inner();
        let timeout = convert::exec_timeout(request.timeout);
        let output = self
            .tasks()
            .exec(&request.task_id, request.command, timeout)
            .await?;
        Ok(Response::new(convert::exec_response(output)))
    }

    async fn exec_task_streaming(
        &self,
        request: Request<Streaming<ExecTaskStreamingRequest>>,
    ) -> Result<Response<BoxStream<ExecTaskStreamingResponse>>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("ExecTaskStreaming: the stream ended before its setup message")
        })?;
        let (task_id, mut session_request, mut pending) = convert::exec_setup(first)?;
        if session_request.tty.is_some()
            && !pending.iter().any(|i| matches!(i, SessionInput::Resize(_)))
        {
            // Nomad sends the terminal size right after setup: start with it.
            if let Ok(Ok(Some(next))) =
                tokio::time::timeout(FIRST_SIZE_WAIT, inbound.message()).await
            {
                let more = convert::session_inputs(next);
                if let Some(size) = more.iter().find_map(|input| match input {
                    SessionInput::Resize(size) => Some(*size),
                    _ => None,
                }) {
                    session_request.tty = Some(size);
                }
                pending.extend(more);
            }
        }
        let session = self.tasks().exec_session(&task_id, session_request).await?;
        let (input, mut events) = session.into_parts();
        tokio::spawn(async move {
            for item in pending {
                if input.send(item).await.is_err() {
                    return;
                }
            }
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        for item in convert::session_inputs(message) {
                            if input.send(item).await.is_err() {
                                return;
                            }
                        }
                    }
                    // The client finished sending: close stdin, keep the
                    // session going until the command exits.
                    Ok(None) => {
                        let _ = input.send(SessionInput::CloseStdin).await;
                        input.closed().await;
                        return;
                    }
                    // The client went away: the response side notices too
                    // and ends the session.
                    Err(_) => return,
                }
            }
        });
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    // The client went away: dropping `events` kills the
                    // command in the guest and cleans up.
                    _ = sender.closed() => return,
                };
                let Some(event) = event else { return };
                let (message, last) = convert::session_event(&task_id, event);
                if sender.send(message).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
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
