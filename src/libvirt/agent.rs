//! The QEMU guest agent as libvirt exposes it: raw agent JSON commands,
//! agent-based shutdown, guest interface addresses, and whether the agent's
//! channel is connected. The only place that calls the `virt` crate's agent
//! APIs; the protocol on top lives in `crate::guest_agent`.
//!
//! Every function blocks: call them inside `Libvirt::call`.

use std::net::IpAddr;
use std::time::Duration;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_CHANNEL_NAME: &str = "org.qemu.guest_agent.0";

/// Why an agent call failed. The first variants are the agent's own states,
/// which callers treat differently from a broken libvirt.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("domain {domain} has no guest agent channel; set guest_agent = true in the task config so the VM gets one")]
    NotConfigured { domain: String },
    #[error("the guest agent of domain {domain} is not connected: {message}; install and start qemu-guest-agent in the image (it may also still be booting)")]
    NotConnected { domain: String, message: String },
    #[error("the guest agent of domain {domain} did not answer {command} within {timeout:?}")]
    TimedOut {
        domain: String,
        command: String,
        timeout: Duration,
    },
    #[error("domain {domain} is not running")]
    NotRunning { domain: String },
    #[error("no domain named {domain}")]
    NoDomain { domain: String },
    /// The agent answered with an error (e.g. a file that does not exist).
    #[error("the guest agent of domain {domain} refused {command}: {message}")]
    Refused {
        domain: String,
        command: String,
        message: String,
    },
    #[error("libvirt failed running {command} on domain {domain}")]
    Libvirt {
        domain: String,
        command: String,
        #[source]
        source: virt::error::Error,
    },
}

impl AgentCallError {
    /// Whether retrying later may help (agent still starting, busy, slow).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AgentCallError::NotConnected { .. } | AgentCallError::TimedOut { .. }
        )
    }

    /// Sorts a libvirt error from an agent call into our variants, using the
    /// codes libvirt's QEMU driver reports for the agent's states.
    fn classify(
        domain: &str,
        command: &str,
        timeout: Duration,
        error: virt::error::Error,
    ) -> AgentCallError {
        let message = error.message().to_string();
        let domain = domain.to_string();
        let command = command.to_string();
        match error.code().unwrap_or(ErrorNumber::InternalError) {
            _ if !error.code().is_known() => AgentCallError::Libvirt {
                domain,
                command,
                source: error,
            },
            ErrorNumber::NoDomain => AgentCallError::NoDomain { domain },
            // "QEMU guest agent is not configured": no channel in the XML.
            ErrorNumber::ArgumentUnsupported => AgentCallError::NotConfigured { domain },
            ErrorNumber::OperationInvalid if message.contains("not running") => {
                AgentCallError::NotRunning { domain }
            }
            // libvirt uses this code both for "not connected" and for a
            // command the agent did not answer in time.
            ErrorNumber::AgentUnresponsive | ErrorNumber::OperationTimeout => {
                if message.contains("not connected") || message.contains("not available due") {
                    AgentCallError::NotConnected { domain, message }
                } else {
                    AgentCallError::TimedOut {
                        domain,
                        command,
                        timeout,
                    }
                }
            }
            // The agent replied with {"error": ...}; libvirt wraps it as
            // "unable to execute QEMU agent command '<cmd>': <desc>".
            ErrorNumber::InternalError
                if message.contains("unable to execute QEMU agent command") =>
            {
                let detail = message
                    .split_once("': ")
                    .map(|(_, detail)| detail.to_string())
                    .unwrap_or(message);
                AgentCallError::Refused {
                    domain,
                    command,
                    message: detail,
                }
            }
            _ => AgentCallError::Libvirt {
                domain,
                command,
                source: error,
            },
        }
    }
}

/// One interface as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    pub name: String,
    pub mac: Option<String>,
    pub addresses: Vec<GuestIpAddress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestIpAddress {
    pub address: IpAddr,
    pub prefix: u32,
}

fn lookup(conn: &Connect, domain: &str, command: &str) -> Result<Domain, AgentCallError> {
    conn.lookup_domain_by_name(domain)
        .map_err(|error| AgentCallError::classify(domain, command, Duration::ZERO, error))
}

/// libvirt takes whole seconds; round up so a short timeout is not 0 (which
/// means "do not wait at all").
fn timeout_seconds(timeout: Duration) -> i32 {
    let seconds = timeout
        .as_secs()
        .saturating_add(u64::from(timeout.subsec_nanos() > 0));
    i32::try_from(seconds.max(1)).unwrap_or(i32::MAX)
}

/// The `execute` name of a JSON command, for error messages.
fn command_name(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|value| value.get("execute")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "agent command".to_string())
}

/// Sends one JSON command (`{"execute": ..., "arguments": ...}`) to the
/// agent of `domain` and returns its raw JSON reply. libvirt serialises agent
/// commands per domain, so `timeout` also bounds how long a stuck command
/// can hold up the next one.
pub fn agent_command(
    conn: &Connect,
    domain: &str,
    command_json: &str,
    timeout: Duration,
) -> Result<String, AgentCallError> {
    let command = command_name(command_json);
    let dom = lookup(conn, domain, &command)?;
    dom.qemu_agent_command(command_json, timeout_seconds(timeout), 0)
        .map_err(|error| AgentCallError::classify(domain, &command, timeout, error))
}

/// Asks the guest to power off through the agent (`guest-shutdown`), which
/// libvirt sends without waiting for the reply the agent never gives.
pub fn shutdown_with_agent(conn: &Connect, domain: &str) -> Result<(), AgentCallError> {
    let command = "guest-shutdown";
    let dom = lookup(conn, domain, command)?;
    dom.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        .map_err(|error| AgentCallError::classify(domain, command, Duration::ZERO, error))
}

/// The guest's interfaces and addresses as its agent reports them (works
/// where DHCP leases do not, e.g. macvtap or static addresses).
pub fn agent_interface_addresses(
    conn: &Connect,
    domain: &str,
) -> Result<Vec<GuestInterface>, AgentCallError> {
    let command = "guest-network-get-interfaces";
    let dom = lookup(conn, domain, command)?;
    let raw = super::ffi::agent_interface_addresses(&dom)
        .map_err(|error| AgentCallError::classify(domain, command, Duration::ZERO, error))?;
    Ok(raw.into_iter().map(interface_from_raw).collect())
}

/// Whether the agent in the guest has opened its port: the live XML's
/// channel target says `state='connected'`. False when the domain has no
/// agent channel at all or is not running.
pub fn agent_connected(conn: &Connect, domain: &str) -> Result<bool, AgentCallError> {
    let command = "domain XML";
    let dom = lookup(conn, domain, command)?;
    let xml = dom
        .xml_desc(0)
        .map_err(|error| AgentCallError::classify(domain, command, Duration::ZERO, error))?;
    Ok(channel_state_connected(&xml))
}

/// Finds the `<target .../>` of the agent channel in a live domain XML and
/// reads its `state` attribute. libvirt writes its own canonical XML, so a
/// tag-level scan is enough here.
fn channel_state_connected(xml: &str) -> bool {
    xml.split("<target ")
        .skip(1)
        .filter_map(|rest| rest.split('>').next())
        .any(|tag| {
            let has = |attr: &str, value: &str| {
                tag.contains(&format!("{attr}='{value}'"))
                    || tag.contains(&format!("{attr}=\"{value}\""))
            };
            has("name", AGENT_CHANNEL_NAME) && has("state", "connected")
        })
}

fn interface_from_raw(raw: super::ffi::RawInterface) -> GuestInterface {
    GuestInterface {
        name: raw.name.unwrap_or_default(),
        mac: raw.hwaddr.filter(|m| !m.is_empty()),
        addresses: raw
            .addresses
            .into_iter()
            .filter_map(|(text, prefix)| {
                Some(GuestIpAddress {
                    address: text.parse::<IpAddr>().ok()?,
                    prefix,
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_state_is_read_from_the_agent_channel_only() {
        let connected = "<devices><channel type='unix'><source mode='bind' path='/x'/>\
            <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>\
            <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0' state='disconnected'/></channel></devices>";
        assert!(channel_state_connected(connected));
        let disconnected = connected.replace("state='connected'", "state='disconnected'");
        assert!(!channel_state_connected(&disconnected));
        let other_connected = "<channel><target type='virtio' name='com.redhat.spice.0' state='connected'/></channel>\
            <channel><target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/></channel>";
        assert!(!channel_state_connected(other_connected));
        assert!(!channel_state_connected("<domain/>"));
    }

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(timeout_seconds(Duration::ZERO), 1);
        assert_eq!(timeout_seconds(Duration::from_millis(1)), 1);
        assert_eq!(timeout_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(timeout_seconds(Duration::from_secs(5)), 5);
        assert_eq!(timeout_seconds(Duration::MAX), i32::MAX);
    }

    #[test]
    fn command_names_come_from_the_json() {
        assert_eq!(command_name(r#"{"execute":"guest-ping"}"#), "guest-ping");
        assert_eq!(command_name("not json"), "agent command");
    }
}
