//! The host side of a local allocation's ports: the address ports are
//! offered on (what a Nomad client fingerprints as its primary address) and
//! dynamic ports from Nomad's range.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;

/// Nomad's default dynamic port range (client `min_dynamic_port`/`max_dynamic_port`).
pub const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 20000..=32000;

/// The address ports bound to a `host_network` are offered on. The local
/// runner has no client `host_network` blocks; the only one worth having on
/// a single machine is loopback.
pub const HOST_NETWORK_ADDRESS: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Parses `ip -4 route show default`: the device and, if given, the
/// preferred source address of the first default route.
pub fn parse_default_route(output: &str) -> Option<(String, Option<Ipv4Addr>)> {
    let line = output
        .lines()
        .find(|line| line.trim_start().starts_with("default"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|word| *word == key)
            .and_then(|index| words.get(index + 1))
            .copied()
    };
    let device = after("dev")?.to_string();
    let source = after("src").and_then(|text| text.parse().ok());
    Some((device, source))
}

/// Parses `ip -4 -o addr show dev DEV`: its first IPv4 address.
pub fn parse_first_address(output: &str) -> Option<Ipv4Addr> {
    output.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let index = words.iter().position(|word| *word == "inet")?;
        let cidr = words.get(index + 1)?;
        cidr.split('/').next()?.parse().ok()
    })
}

fn ip_command(args: &[&str]) -> Result<String, String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("cannot run `ip {}`: {error}", args.join(" ")))?;
    if !output.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The host's primary IPv4 address: the one on the default route's device,
/// as Nomad's client picks its network address.
pub fn primary_ipv4() -> Result<Ipv4Addr, String> {
    let routes = ip_command(&["-4", "route", "show", "default"])?;
    let (device, source) =
        parse_default_route(&routes).ok_or_else(|| "there is no IPv4 default route".to_string())?;
    if let Some(source) = source {
        return Ok(source);
    }
    let addresses = ip_command(&["-4", "-o", "addr", "show", "dev", &device])?;
    parse_first_address(&addresses)
        .ok_or_else(|| format!("the default route's device {device} has no IPv4 address"))
}

/// Whether nothing listens on this TCP port (on any address).
fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// Picks a free port from Nomad's dynamic range that is not in `taken`,
/// starting at a random point like Nomad's network index does.
pub fn pick_dynamic_port(taken: &BTreeSet<u16>) -> Option<u16> {
    pick_port_with(taken, random_u16(), port_is_free)
}

/// [`pick_dynamic_port`] with the start and the in-use check given.
pub fn pick_port_with(
    taken: &BTreeSet<u16>,
    start: u16,
    is_free: impl Fn(u16) -> bool,
) -> Option<u16> {
    let low = *DYNAMIC_PORTS.start();
    let span = DYNAMIC_PORTS.end() - low + 1;
    (0..span)
        .map(|step| low + (start % span + step) % span)
        .find(|port| !taken.contains(port) && is_free(*port))
}

fn random_u16() -> u16 {
    let mut bytes = [0u8; 2];
    // A fixed start only makes collisions between runners likelier.
    let _ = getrandom::fill(&mut bytes);
    u16::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route() {
        let output = "default via 10.0.0.1 dev ens3 proto dhcp src 10.0.0.5 metric 100\n";
        assert_eq!(
            parse_default_route(output),
            Some(("ens3".into(), Some(Ipv4Addr::new(10, 0, 0, 5))))
        );
        assert_eq!(
            parse_default_route("default via 192.168.1.1 dev eth0 onlink\n"),
            Some(("eth0".into(), None))
        );
        assert_eq!(parse_default_route(""), None);
    }

    #[test]
    fn first_address() {
        let output = "2: eth0    inet 192.168.1.20/24 brd 192.168.1.255 scope global eth0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(
            parse_first_address(output),
            Some(Ipv4Addr::new(192, 168, 1, 20))
        );
        assert_eq!(parse_first_address(""), None);
    }

    #[test]
    fn dynamic_ports_skip_taken_and_busy() {
        let taken = BTreeSet::from([20000, 20001]);
        assert_eq!(pick_port_with(&taken, 0, |_| true), Some(20002));
        assert_eq!(pick_port_with(&taken, 0, |port| port > 20005), Some(20006));
        // Wraps around the end of the range.
        assert_eq!(
            pick_port_with(&BTreeSet::new(), 12000, |_| true),
            Some(32000)
        );
        assert_eq!(
            pick_port_with(&BTreeSet::new(), 12001, |_| true),
            Some(20000)
        );
        assert_eq!(pick_port_with(&BTreeSet::new(), 0, |_| false), None);
        let port = pick_dynamic_port(&BTreeSet::new()).expect("a free port");
        assert!(DYNAMIC_PORTS.contains(&port));
    }
}
