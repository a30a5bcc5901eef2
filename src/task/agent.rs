//! Reaching inside a task's VM through the QEMU guest agent: exec, streaming
//! exec sessions, signals and the agent's share of a graceful stop. Every
//! path fails fast, naming cause and fix, when the task has no agent channel
//! or the agent does not answer.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::error::TaskError;
use super::store::TaskEntry;
use super::{blocking, Tasks};
use crate::guest_agent::{
    ExecOutput, ExecRequest, ExecSession, GuestAgent, GuestAgentError, SessionRequest,
};
use crate::libvirt::agent::{AgentCallError, GuestInterface};
use crate::net::DriverNetwork;

/// Bound on the liveness ping before an exec or a mapped signal.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one `signal_commands` command in the guest.
const SIGNAL_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// What an exec without a timeout (Nomad's 0) is bounded by.
const EXEC_UNBOUNDED: Duration = Duration::from_secs(24 * 3600);
/// Cap on the stderr quoted in a failed signal command's error.
const STDERR_IN_MESSAGE: usize = 512;

/// What SignalTask does for one signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalAction {
    /// Run this `signal_commands` entry in the guest.
    Command(String),
    /// Ask the guest to shut down (agent, else ACPI); SIGTERM/SIGINT.
    Shutdown,
    /// Power the VM off now; SIGKILL.
    PowerOff,
}

/// Nomad sends `SIGHUP`; people type `HUP` or `sighup` too.
pub fn normalize_signal(signal: &str) -> String {
    let upper = signal.trim().to_ascii_uppercase();
    if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    }
}

/// Picks the action for `signal`: a `signal_commands` entry wins; then the
/// built-in meaning of SIGTERM/SIGINT/SIGKILL; anything else is an error
/// naming `signal_commands`.
pub fn signal_action(
    commands: &BTreeMap<String, String>,
    signal: &str,
) -> Result<SignalAction, TaskError> {
    let signal = normalize_signal(signal);
    if let Some(command) = commands.get(&signal) {
        return Ok(SignalAction::Command(command.clone()));
    }
    match signal.as_str() {
        "SIGTERM" | "SIGINT" => Ok(SignalAction::Shutdown),
        "SIGKILL" => Ok(SignalAction::PowerOff),
        _ => Err(TaskError::UnmappedSignal { signal }),
    }
}

/// The guest's IPv4 address on one of `macs` (case-insensitive): global
/// addresses only (no loopback, link-local or unspecified). The MACs are
/// tried in their order (the task's interface order), whatever order the
/// guest lists its interfaces in.
pub fn guest_ipv4_on(interfaces: &[GuestInterface], macs: &[String]) -> Option<Ipv4Addr> {
    macs.iter().find_map(|wanted| {
        interfaces
            .iter()
            .filter(|interface| {
                interface
                    .mac
                    .as_deref()
                    .is_some_and(|mac| wanted.eq_ignore_ascii_case(mac))
            })
            .flat_map(|interface| interface.addresses.iter())
            .find_map(|address| match address.address {
                IpAddr::V4(ip)
                    if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() =>
                {
                    Some(ip)
                }
                _ => None,
            })
    })
}

impl Tasks {
    /// The address of a macvtap-only task, from its guest agent once the
    /// guest has one; waits at most `limit` (the plugin's `dhcp_timeout`).
    /// `None` (logged, and shown as an event) when it does not come.
    pub(super) async fn agent_address(
        &self,
        task_id: &str,
        domain: &str,
        macs: &[String],
        limit: Duration,
    ) -> Option<DriverNetwork> {
        let agent = self.hypervisor.guest_agent(domain)?;
        // Clamped: `Instant + Duration` panics on overflow.
        let deadline = Instant::now() + limit.min(Duration::from_secs(24 * 3600));
        let mut delay = Duration::from_millis(500);
        let outcome = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break Err("no address in time".to_string());
            }
            let agent = agent.clone().with_call_timeout(remaining.min(PING_TIMEOUT));
            match agent.interface_addresses().await {
                Ok(interfaces) => {
                    if let Some(ip) = guest_ipv4_on(&interfaces, macs) {
                        break Ok(ip);
                    }
                }
                Err(GuestAgentError::Agent(error)) if error.is_transient() => {}
                Err(error) => break Err(error.to_string()),
            }
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        };
        match outcome {
            Ok(ip) => {
                tracing::info!(task_id = %task_id, domain = %domain, ip = %ip, "guest address from the guest agent");
                Some(DriverNetwork {
                    ip,
                    port_map: Default::default(),
                })
            }
            Err(reason) => {
                tracing::warn!(task_id = %task_id, domain = %domain, limit = ?limit, reason = %reason, "no guest address for the macvtap interfaces from the guest agent; install and start qemu-guest-agent in the image for address_mode = \"driver\" services");
                None
            }
        }
    }

    /// The task's guest agent, checked to answer (fast): errors name the
    /// cause and the fix.
    async fn ready_agent(&self, task_id: &str) -> Result<GuestAgent, TaskError> {
        let entry = self.entry(task_id)?;
        let agent = self.agent_of(&entry)?;
        if !entry.is_running() {
            return Err(TaskError::Conflict(format!(
                "task {task_id} is not running"
            )));
        }
        match agent.clone().with_call_timeout(PING_TIMEOUT).ping().await {
            Ok(()) => Ok(agent),
            Err(GuestAgentError::Agent(AgentCallError::NotConfigured { .. })) => {
                Err(TaskError::AgentDisabled {
                    task_id: task_id.to_string(),
                })
            }
            Err(source) => Err(TaskError::AgentUnreachable {
                task_id: task_id.to_string(),
                source,
            }),
        }
    }

    /// The agent of a task whose domain has the channel.
    fn agent_of(&self, entry: &TaskEntry) -> Result<GuestAgent, TaskError> {
        if !entry.state.guest_agent {
            return Err(TaskError::AgentDisabled {
                task_id: entry.state.task_id.clone(),
            });
        }
        self.hypervisor
            .guest_agent(&entry.state.domain_name)
            .ok_or_else(|| {
                TaskError::Conflict("this hypervisor backend cannot reach guest agents".to_string())
            })
    }

    /// ExecTask: runs `argv` in the guest; `timeout` (zero: none) is
    /// enforced inside the guest.
    pub async fn exec(
        &self,
        task_id: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, TaskError> {
        let agent = self.ready_agent(task_id).await?;
        let timeout = if timeout.is_zero() {
            EXEC_UNBOUNDED
        } else {
            timeout
        };
        agent
            .exec(ExecRequest::new(argv, timeout))
            .await
            .map_err(|source| TaskError::Agent {
                task_id: task_id.to_string(),
                source,
            })
    }

    /// ExecTaskStreaming: starts an interactive session in the guest.
    /// Dropping the session's input ends it (the guest command is killed).
    pub async fn exec_session(
        &self,
        task_id: &str,
        request: SessionRequest,
    ) -> Result<ExecSession, TaskError> {
        let agent = self.ready_agent(task_id).await?;
        agent
            .start_session(request)
            .await
            .map_err(|source| TaskError::Agent {
                task_id: task_id.to_string(),
                source,
            })
    }

    /// SignalTask: runs the `signal_commands` entry, or shuts down
    /// (SIGTERM/SIGINT) or powers off (SIGKILL) without one.
    pub async fn signal(&self, task_id: &str, signal: &str) -> Result<(), TaskError> {
        let entry = self.entry(task_id)?;
        match signal_action(&entry.state.signal_commands, signal)? {
            SignalAction::Command(command) => {
                let signal = normalize_signal(signal);
                let agent = self.ready_agent(task_id).await?;
                let output = agent
                    .exec(ExecRequest::new(
                        vec!["/bin/sh".into(), "-c".into(), command],
                        SIGNAL_COMMAND_TIMEOUT,
                    ))
                    .await
                    .map_err(|source| TaskError::Agent {
                        task_id: task_id.to_string(),
                        source,
                    })?;
                if output.exit_code != 0 {
                    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
                    if let Some((cut, _)) = stderr.char_indices().nth(STDERR_IN_MESSAGE) {
                        stderr.truncate(cut);
                    }
                    return Err(TaskError::SignalCommandFailed {
                        signal,
                        exit_code: output.exit_code,
                        stderr,
                    });
                }
                Ok(())
            }
            SignalAction::Shutdown => {
                if !entry.is_running() {
                    return Ok(());
                }
                if !self.agent_shutdown(&entry).await {
                    self.acpi_shutdown(&entry).await;
                }
                Ok(())
            }
            SignalAction::PowerOff => {
                if !entry.is_running() {
                    return Ok(());
                }
                entry.mark_stop_requested();
                entry.mark_forced();
                let (hypervisor, domain) =
                    (self.hypervisor.clone(), entry.state.domain_name.clone());
                blocking("powering the VM off", move || {
                    Ok(hypervisor.power_off(&domain)?)
                })
                .await
            }
        }
    }

    /// Asks the guest to shut down through its agent (guests without acpid
    /// stop too). Returns whether the agent took the request; failures are
    /// logged, as ACPI and the caller's destroy follow.
    pub(super) async fn agent_shutdown(&self, entry: &TaskEntry) -> bool {
        let name = &entry.state.domain_name;
        if !entry.state.guest_agent {
            return false;
        }
        let Some(agent) = self.hypervisor.guest_agent(name) else {
            return false;
        };
        let agent = agent.with_call_timeout(PING_TIMEOUT);
        let asked = match agent.ping().await {
            Ok(()) => agent.shutdown().await,
            Err(error) => Err(error),
        };
        match asked {
            Ok(()) => {
                tracing::info!(domain = %name, "asked the guest agent to shut down");
                true
            }
            Err(error) => {
                tracing::info!(error = %error, domain = %name, "the guest agent did not take the shutdown; using ACPI");
                false
            }
        }
    }

    /// Presses the ACPI power button; a failure is logged.
    pub(super) async fn acpi_shutdown(&self, entry: &TaskEntry) {
        let name = entry.state.domain_name.clone();
        let (hypervisor, domain) = (self.hypervisor.clone(), name.clone());
        let asked = blocking("sending the ACPI power button", move || {
            Ok(hypervisor.request_shutdown(&domain)?)
        })
        .await;
        if let Err(error) = asked {
            tracing::warn!(error = %error, domain = %name, "could not send the ACPI power button");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::error::ErrorKind;

    #[test]
    fn signals_map_to_commands_then_built_ins() {
        let commands = BTreeMap::from([
            ("SIGHUP".to_string(), "touch /run/hup".to_string()),
            ("SIGTERM".to_string(), "systemctl stop app".to_string()),
        ]);
        assert_eq!(
            signal_action(&commands, "SIGHUP").expect("mapped"),
            SignalAction::Command("touch /run/hup".into())
        );
        assert_eq!(
            signal_action(&commands, "hup").expect("mapped"),
            SignalAction::Command("touch /run/hup".into())
        );
        assert_eq!(
            signal_action(&commands, "SIGTERM").expect("mapped"),
            SignalAction::Command("systemctl stop app".into())
        );
        let none = BTreeMap::new();
        assert_eq!(
            signal_action(&none, "SIGINT").expect("built in"),
            SignalAction::Shutdown
        );
        assert_eq!(
            signal_action(&none, "SIGKILL").expect("built in"),
            SignalAction::PowerOff
        );
        let error = signal_action(&none, "SIGUSR1").expect_err("unmapped");
        assert!(error.to_string().contains("signal_commands"), "{error}");
        assert_eq!(error.kind(), ErrorKind::Invalid);
    }

    #[test]
    fn the_guest_address_is_the_one_on_a_macvtap_mac() {
        use crate::libvirt::agent::GuestIpAddress;
        let iface = |name: &str, mac: &str, ips: &[&str]| GuestInterface {
            name: name.into(),
            mac: Some(mac.into()),
            addresses: ips
                .iter()
                .map(|ip| GuestIpAddress {
                    address: ip.parse().expect("ip"),
                    prefix: 24,
                })
                .collect(),
        };
        let interfaces = vec![
            iface("lo", "00:00:00:00:00:00", &["127.0.0.1"]),
            iface("eth0", "52:54:00:aa:bb:cc", &["10.0.0.5"]),
            iface(
                "eth1",
                "52:54:00:11:22:33",
                &["fe80::1", "169.254.1.1", "192.168.7.9"],
            ),
        ];
        let macs = vec!["52:54:00:11:22:33".to_string()];
        assert_eq!(
            guest_ipv4_on(&interfaces, &macs),
            Some(Ipv4Addr::new(192, 168, 7, 9))
        );
        let upper = vec!["52:54:00:AA:BB:CC".to_string()];
        assert_eq!(
            guest_ipv4_on(&interfaces, &upper),
            Some(Ipv4Addr::new(10, 0, 0, 5))
        );
        assert_eq!(guest_ipv4_on(&interfaces, &["x".to_string()]), None);
        // Several macvtap interfaces: the first in task order that has an
        // address, not the first the guest lists.
        let both = vec![
            "52:54:00:11:22:33".to_string(),
            "52:54:00:aa:bb:cc".to_string(),
        ];
        assert_eq!(
            guest_ipv4_on(&interfaces, &both),
            Some(Ipv4Addr::new(192, 168, 7, 9))
        );
        let first_bare = vec!["x".to_string(), "52:54:00:aa:bb:cc".to_string()];
        assert_eq!(
            guest_ipv4_on(&interfaces, &first_bare),
            Some(Ipv4Addr::new(10, 0, 0, 5))
        );
    }

    #[test]
    fn agent_errors_name_cause_and_fix() {
        let disabled = TaskError::AgentDisabled {
            task_id: "t".into(),
        };
        assert!(disabled.to_string().contains("set guest_agent = true"));
        assert_eq!(disabled.kind(), ErrorKind::Conflict);
        let unreachable = TaskError::AgentUnreachable {
            task_id: "t".into(),
            source: GuestAgentError::SessionClosed,
        };
        assert!(unreachable
            .to_string()
            .contains("install and start qemu-guest-agent in the image"));
        assert_eq!(unreachable.kind(), ErrorKind::Unavailable);
        let bad_argv = TaskError::Agent {
            task_id: "t".into(),
            source: GuestAgentError::EmptyArgv,
        };
        assert_eq!(bad_argv.kind(), ErrorKind::Invalid);
    }
}
