//! Every conversion between Nomad's protos and the core's own types, and
//! the mapping of core errors to gRPC statuses. The only place where the
//! two vocabularies meet.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use prost::Message;
use tonic::{Code, Status};

use crate::guest_agent::{ExecOutput, SessionEvent, SessionInput, SessionRequest, TerminalSize};
use crate::net::AllocatedPort;
use crate::nomad::driver_state::{DriverState, DriverStateError, TASK_HANDLE_VERSION};
use crate::nomad::go_handle;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::{
    cpu_usage, memory_usage, CpuUsage, DriverTaskEvent, ExecTaskResponse,
    ExecTaskStreamingIoOperation, ExecTaskStreamingRequest, ExecTaskStreamingResponse, ExitResult,
    InspectTaskResponse, MemoryUsage, NetworkOverride, StartTaskResponse,
    TaskConfig as NomadTaskConfig, TaskDriverStatus, TaskHandle, TaskResourceUsage, TaskState,
    TaskStats, TaskStatsResponse, TaskStatus as NomadTaskStatus, WaitTaskResponse,
};
use crate::pb::hashicorp::nomad::plugins::shared::structs::RecoverableError;
use crate::task::contract::{
    Mount, Resources, StartRequest, StartedTask, TaskEvent, TaskExit, TaskStatus, UsageSample,
};
use crate::task::error::{ErrorKind, TaskError};

/// StartTask's task config, decoded and checked.
pub fn start_request(task: &NomadTaskConfig) -> Result<StartRequest, TaskError> {
    let config = crate::config::task::parse_task_config(&task.msgpack_driver_config)?;
    let resources = task.resources.as_ref();
    let allocated = resources.and_then(|r| r.allocated_resources.as_ref());
    let memory = allocated.and_then(|a| a.memory.as_ref());
    let ports = resources
        .map(|resources| {
            resources
                .ports
                .iter()
                .map(|port| AllocatedPort {
                    label: port.label.clone(),
                    value: u16::try_from(port.value).unwrap_or(0),
                    to: u16::try_from(port.to).unwrap_or(0),
                    host_ip: port.host_ip.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(StartRequest {
        task_id: task.id.clone(),
        task_name: task.name.clone(),
        alloc_id: task.alloc_id.clone(),
        alloc_dir: PathBuf::from(&task.alloc_dir),
        env: task
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        mounts: task
            .mounts
            .iter()
            .map(|mount| Mount {
                host_path: PathBuf::from(&mount.host_path),
                task_path: mount.task_path.clone(),
                read_only: mount.readonly,
            })
            .collect(),
        resources: Resources {
            memory_mb: memory.map_or(0, |m| m.memory_mb),
            memory_max_mb: memory.map_or(0, |m| m.memory_max_mb),
            cpu_shares: allocated
                .and_then(|a| a.cpu.as_ref())
                .map_or(0, |c| c.cpu_shares),
            cpuset_cpus: resources
                .and_then(|r| r.linux_resources.as_ref())
                .map_or_else(String::new, |l| l.cpuset_cpus.clone()),
            ports,
        },
        stdout_path: PathBuf::from(&task.stdout_path),
        config,
    })
}

/// The handle Nomad keeps for the task and gives back in RecoverTask.
pub fn task_handle(task: NomadTaskConfig, state: &DriverState) -> TaskHandle {
    TaskHandle {
        version: TASK_HANDLE_VERSION,
        config: Some(task),
        state: TaskState::Running as i32,
        driver_state: state.encode(),
    }
}

pub fn start_response(task: NomadTaskConfig, started: StartedTask) -> StartTaskResponse {
    StartTaskResponse {
        result: 0,
        driver_error_msg: String::new(),
        handle: Some(task_handle(task, &started.state)),
        // The guest's address for services with address_mode = "driver";
        // not advertised by default: ports are reached through the host.
        network_override: started.network.map(|network| NetworkOverride {
            port_map: network
                .port_map
                .into_iter()
                .map(|(label, port)| (label, i32::from(port)))
                .collect(),
            addr: network.ip.to_string(),
            auto_advertise: false,
        }),
    }
}

/// The driver state inside a RecoverTask handle: ours (JSON) or, told
/// apart by its first byte being a msgpack map, the Go driver's.
pub fn recovered_state(handle: &TaskHandle) -> Result<DriverState, TaskError> {
    let bytes = &handle.driver_state;
    match DriverState::decode(bytes) {
        Ok(state) => Ok(state),
        Err(DriverStateError::Corrupt(json)) if go_handle::looks_like_go_state(bytes) => {
            let fallback_id = handle
                .config
                .as_ref()
                .map_or("", |config| config.id.as_str());
            go_handle::decode(bytes, fallback_id)
                .map_err(|go| TaskError::Handle(DriverStateError::Unrecognised { json, go }))
        }
        Err(error) => Err(error.into()),
    }
}

pub fn wait_response(exit: &TaskExit) -> WaitTaskResponse {
    WaitTaskResponse {
        result: Some(exit_result(exit)),
        err: exit
            .error
            .clone()
            .filter(|_| exit.exit_code != 0)
            .unwrap_or_default(),
    }
}

fn exit_result(exit: &TaskExit) -> ExitResult {
    ExitResult {
        exit_code: exit.exit_code,
        signal: exit.signal,
        oom_killed: false,
    }
}

/// A guest exit code as Nomad's int32.
fn guest_exit_code(code: i64) -> i32 {
    i32::try_from(code).unwrap_or(if code < 0 { -1 } else { i32::MAX })
}

/// ExecTask's answer.
pub fn exec_response(output: ExecOutput) -> ExecTaskResponse {
    ExecTaskResponse {
        result: Some(ExitResult {
            exit_code: guest_exit_code(output.exit_code),
            signal: 0,
            oom_killed: false,
        }),
        stdout: output.stdout,
        stderr: output.stderr,
    }
}

/// ExecTask's timeout; none or zero is "no limit" (zero).
pub fn exec_timeout(timeout: Option<prost_types::Duration>) -> Duration {
    timeout
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::ZERO)
}

/// The first ExecTaskStreaming message: the session to start and any
/// input it already carries.
pub fn exec_setup(
    first: ExecTaskStreamingRequest,
) -> Result<(String, SessionRequest, Vec<SessionInput>), Status> {
    let Some(setup) = first.setup.clone() else {
        return Err(Status::invalid_argument(
            "ExecTaskStreaming: the first message must carry setup (task id, command, tty)",
        ));
    };
    let inputs = session_inputs(first);
    let size = inputs.iter().find_map(|input| match input {
        SessionInput::Resize(size) => Some(*size),
        _ => None,
    });
    let request = SessionRequest {
        argv: setup.command,
        tty: setup.tty.then(|| size.unwrap_or(DEFAULT_TERMINAL)),
    };
    Ok((setup.task_id, request, inputs))
}

/// The terminal size a TTY session starts with when Nomad sent none yet.
pub const DEFAULT_TERMINAL: TerminalSize = TerminalSize { rows: 24, cols: 80 };

/// What one ExecTaskStreaming message asks of the session, in order:
/// resize, stdin data, stdin close.
pub fn session_inputs(message: ExecTaskStreamingRequest) -> Vec<SessionInput> {
    let mut inputs = Vec::new();
    if let Some(size) = message.tty_size {
        let clamp = |value: i32| u16::try_from(value.max(1)).unwrap_or(u16::MAX);
        inputs.push(SessionInput::Resize(TerminalSize {
            rows: clamp(size.height),
            cols: clamp(size.width),
        }));
    }
    if let Some(stdin) = message.stdin {
        if !stdin.data.is_empty() {
            inputs.push(SessionInput::Stdin(stdin.data));
        }
        if stdin.close {
            inputs.push(SessionInput::CloseStdin);
        }
    }
    inputs
}

/// One session event as an ExecTaskStreaming answer, and whether it is the
/// last one.
pub fn session_event(
    task_id: &str,
    event: SessionEvent,
) -> (Result<ExecTaskStreamingResponse, Status>, bool) {
    let io = |data: Vec<u8>| Some(ExecTaskStreamingIoOperation { data, close: false });
    match event {
        SessionEvent::Stdout(data) => (
            Ok(ExecTaskStreamingResponse {
                stdout: io(data),
                ..Default::default()
            }),
            false,
        ),
        SessionEvent::Stderr(data) => (
            Ok(ExecTaskStreamingResponse {
                stderr: io(data),
                ..Default::default()
            }),
            false,
        ),
        SessionEvent::Exited { exit_code } => (
            Ok(ExecTaskStreamingResponse {
                exited: true,
                result: Some(ExitResult {
                    exit_code: guest_exit_code(exit_code),
                    signal: 0,
                    oom_killed: false,
                }),
                ..Default::default()
            }),
            true,
        ),
        SessionEvent::Failed(source) => (
            Err(Status::from(TaskError::Agent {
                task_id: task_id.to_string(),
                source,
            })),
            true,
        ),
    }
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// Go's zero time, which Nomad reads as "not completed".
fn go_zero_time() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: -62_135_596_800,
        nanos: 0,
    }
}

pub fn inspect_response(status: &TaskStatus) -> InspectTaskResponse {
    let exit = status.exit.as_ref();
    InspectTaskResponse {
        task: Some(NomadTaskStatus {
            id: status.task_id.clone(),
            name: status.task_name.clone(),
            state: if exit.is_some() {
                TaskState::Exited as i32
            } else {
                TaskState::Running as i32
            },
            started_at: Some(timestamp(status.started_at)),
            completed_at: Some(exit.map_or_else(go_zero_time, |e| timestamp(e.at))),
            result: Some(exit.map_or(
                ExitResult {
                    exit_code: 0,
                    signal: 0,
                    oom_killed: false,
                },
                exit_result,
            )),
        }),
        driver: Some(TaskDriverStatus {
            attributes: HashMap::from([("domain_name".to_string(), status.domain_name.clone())]),
        }),
        network_override: status.guest_ip.map(|ip| NetworkOverride {
            port_map: HashMap::new(),
            addr: ip.to_string(),
            auto_advertise: false,
        }),
    }
}

pub fn stats_response(task_id: &str, sample: &UsageSample) -> TaskStatsResponse {
    TaskStatsResponse {
        stats: Some(TaskStats {
            id: task_id.to_string(),
            timestamp: Some(timestamp(sample.at)),
            agg_resource_usage: Some(resource_usage(
                sample.cpu_percent,
                sample.cpu_total_ticks,
                (
                    sample.memory_rss_bytes,
                    sample.memory_usage_bytes,
                    sample.memory_max_usage_bytes,
                ),
            )),
            resource_usage_by_pid: HashMap::new(),
        }),
    }
}

pub fn task_event(event: TaskEvent) -> DriverTaskEvent {
    DriverTaskEvent {
        task_id: event.task_id,
        alloc_id: event.alloc_id,
        task_name: event.task_name,
        timestamp: Some(timestamp(event.at)),
        message: event.message,
        annotations: HashMap::new(),
    }
}

/// Nomad's `TaskResourceUsage` from our figures. `measured_fields` lists
/// what we measure: Percent and TotalTicks always; RSS, Usage and MaxUsage
/// when non-zero (a running VM never has zero of these, so zero means libvirt
/// did not report it, e.g. no balloon or the test driver).
pub fn resource_usage(
    cpu_percent: f64,
    total_ticks: f64,
    memory: (u64, u64, u64),
) -> TaskResourceUsage {
    let (rss, usage, max_usage) = memory;
    let finite = |value: f64| if value.is_finite() { value } else { 0.0 };
    let measured_memory = [
        (rss, memory_usage::Fields::Rss),
        (usage, memory_usage::Fields::Usage),
        (max_usage, memory_usage::Fields::MaxUsage),
    ]
    .into_iter()
    .filter(|(value, _)| *value > 0)
    .map(|(_, field)| field as i32)
    .collect();
    TaskResourceUsage {
        cpu: Some(CpuUsage {
            percent: finite(cpu_percent),
            total_ticks: finite(total_ticks),
            measured_fields: vec![
                cpu_usage::Fields::Percent as i32,
                cpu_usage::Fields::TotalTicks as i32,
            ],
            ..CpuUsage::default()
        }),
        memory: Some(MemoryUsage {
            rss,
            usage,
            max_usage,
            measured_fields: measured_memory,
            ..MemoryUsage::default()
        }),
    }
}

/// google.rpc.Status, the payload of `grpc-status-details-bin`.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

const RECOVERABLE_ERROR_TYPE_URL: &str =
    "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";

/// A status carrying Nomad's RecoverableError as its first detail.
pub fn status_with_recoverable(code: Code, message: String, recoverable: bool) -> Status {
    let detail = RecoverableError { recoverable };
    let details = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: RECOVERABLE_ERROR_TYPE_URL.into(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// Reads the RecoverableError detail back (used by the simulator and tests).
pub fn recoverable_from_status(status: &Status) -> Option<bool> {
    let details = RpcStatus::decode(status.details()).ok()?;
    let first = details.details.first()?;
    if first.type_url != RECOVERABLE_ERROR_TYPE_URL {
        return None;
    }
    RecoverableError::decode(first.value.as_slice())
        .ok()
        .map(|detail| detail.recoverable)
}

fn code_for(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Conflict => Code::FailedPrecondition,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The message shows the whole cause chain, once.
fn message_with_causes(error: &TaskError) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

impl From<TaskError> for Status {
    fn from(error: TaskError) -> Status {
        status_with_recoverable(
            code_for(error.kind()),
            message_with_causes(&error),
            error.recoverable(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::LibvirtError;
    use crate::pb::hashicorp::nomad::plugins::drivers::proto::exec_task_streaming_request::{
        Setup, TerminalSize as WireSize,
    };

    #[test]
    fn exec_streaming_messages_become_session_inputs_and_answers() {
        let first = ExecTaskStreamingRequest {
            setup: Some(Setup {
                task_id: "t".into(),
                command: vec!["/bin/sh".into()],
                tty: true,
            }),
            tty_size: Some(WireSize {
                height: 40,
                width: 100_000,
            }),
            stdin: Some(ExecTaskStreamingIoOperation {
                data: b"ls\n".to_vec(),
                close: true,
            }),
        };
        let (task_id, request, inputs) = exec_setup(first).expect("setup");
        assert_eq!(task_id, "t");
        let size = TerminalSize {
            rows: 40,
            cols: u16::MAX,
        };
        assert_eq!(request.tty, Some(size));
        assert_eq!(
            inputs,
            vec![
                SessionInput::Resize(size),
                SessionInput::Stdin(b"ls\n".to_vec()),
                SessionInput::CloseStdin
            ]
        );
        let no_setup = exec_setup(ExecTaskStreamingRequest::default()).expect_err("no setup");
        assert_eq!(no_setup.code(), Code::InvalidArgument);

        let (answer, last) = session_event("t", SessionEvent::Stderr(b"e".to_vec()));
        assert!(!last);
        assert_eq!(answer.expect("ok").stderr.expect("stderr").data, b"e");
        let (answer, last) = session_event("t", SessionEvent::Exited { exit_code: 3 });
        assert!(last);
        let answer = answer.expect("ok");
        assert!(answer.exited);
        assert_eq!(answer.result.expect("result").exit_code, 3);
        let (answer, last) = session_event(
            "t",
            SessionEvent::Failed(crate::guest_agent::GuestAgentError::SessionClosed),
        );
        assert!(last && answer.is_err());
    }

    #[test]
    fn agent_errors_map_to_clear_statuses() {
        let status = Status::from(TaskError::AgentDisabled {
            task_id: "t".into(),
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("set guest_agent = true"));
        let status = Status::from(TaskError::AgentUnreachable {
            task_id: "t".into(),
            source: crate::guest_agent::GuestAgentError::SessionClosed,
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status
            .message()
            .contains("install and start qemu-guest-agent in the image"));
        let status = Status::from(TaskError::UnmappedSignal {
            signal: "SIGUSR1".into(),
        });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("signal_commands"));
        assert_eq!(exec_timeout(None), Duration::ZERO);
    }

    #[test]
    fn errors_map_to_codes_and_recoverable_details() {
        let status: Status = TaskError::Libvirt(LibvirtError::Connect {
            uri: "qemu:///system".into(),
            source: crate::libvirt::VirtError::sample_unsupported(),
        })
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(recoverable_from_status(&status), Some(true));
        let status: Status = TaskError::Invalid("hostname: bad".into()).into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(recoverable_from_status(&status), Some(false));
        assert_eq!(status.message(), "hostname: bad");
        let status: Status = TaskError::NotFound("a/b/c".into()).into();
        assert_eq!(status.code(), Code::NotFound);
        let status: Status = TaskError::Conflict("running".into()).into();
        assert_eq!(status.code(), Code::FailedPrecondition);
    }

    #[test]
    fn a_running_task_inspects_with_go_zero_completion() {
        let status = TaskStatus {
            task_id: "a/web/1".into(),
            task_name: "web".into(),
            domain_name: "web-1".into(),
            started_at: SystemTime::UNIX_EPOCH,
            exit: None,
            guest_ip: Some(std::net::Ipv4Addr::new(192, 168, 122, 9)),
        };
        let response = inspect_response(&status);
        let task = response.task.expect("task");
        assert_eq!(task.state, TaskState::Running as i32);
        assert_eq!(task.completed_at, Some(go_zero_time()));
        assert_eq!(
            response.network_override.map(|n| n.addr),
            Some("192.168.122.9".to_string())
        );
    }

    #[test]
    fn resource_usage_lists_what_was_measured() {
        let usage = resource_usage(50.0, 1000.0, (1024, 2048, 4096));
        let cpu = usage.cpu.expect("cpu");
        assert_eq!(cpu.percent, 50.0);
        assert_eq!(cpu.total_ticks, 1000.0);
        assert_eq!(
            cpu.measured_fields,
            vec![
                cpu_usage::Fields::Percent as i32,
                cpu_usage::Fields::TotalTicks as i32
            ]
        );
        assert_eq!(
            (cpu.system_mode, cpu.user_mode, cpu.throttled_time),
            (0.0, 0.0, 0)
        );
        let memory = usage.memory.expect("memory");
        assert_eq!(
            (memory.rss, memory.usage, memory.max_usage),
            (1024, 2048, 4096)
        );
        assert_eq!(
            memory.measured_fields,
            vec![
                memory_usage::Fields::Rss as i32,
                memory_usage::Fields::Usage as i32,
                memory_usage::Fields::MaxUsage as i32
            ]
        );
        assert_eq!((memory.cache, memory.swap), (0, 0));
    }

    #[test]
    fn resource_usage_leaves_out_unreported_memory() {
        let usage = resource_usage(0.0, 0.0, (0, 0, 64 << 20));
        let memory = usage.memory.expect("memory");
        assert_eq!(
            memory.measured_fields,
            vec![memory_usage::Fields::MaxUsage as i32]
        );
        let cpu = resource_usage(f64::NAN, f64::INFINITY, (0, 0, 0))
            .cpu
            .expect("cpu");
        assert_eq!((cpu.percent, cpu.total_ticks), (0.0, 0.0));
    }
}
