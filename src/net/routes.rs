//! The host devices that carry a default route: where macvtap guests may
//! go when the operator names no devices (`allow_macvtap_devices`), i.e.
//! the host's own LAN, not its side networks (storage, management).

use std::collections::BTreeSet;

/// Devices with an IPv4 or IPv6 default route, from `/proc/net/route` and
/// `/proc/net/ipv6_route`; empty when neither can be read.
pub fn default_route_devices() -> Vec<String> {
    let ipv4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let ipv6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    parse_default_route_devices(&ipv4, &ipv6)
}

/// Pure part of [`default_route_devices`].
pub fn parse_default_route_devices(ipv4_table: &str, ipv6_table: &str) -> Vec<String> {
    let mut devices = BTreeSet::new();
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
    for line in ipv4_table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [iface, "00000000", _, _, _, _, _, "00000000", ..] = fields.as_slice() {
            devices.insert((*iface).to_string());
        }
    }
    // dest plen src splen nexthop metric refcnt use flags iface
    const ANY: &str = "00000000000000000000000000000000";
    for line in ipv6_table.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [dest, "00", _, _, _, _, _, _, _, iface] = fields.as_slice() {
            // The kernel lists unreachable defaults on `lo`.
            if *dest == ANY && *iface != "lo" {
                devices.insert((*iface).to_string());
            }
        }
    }
    devices
        .into_iter()
        .filter(|name| crate::config::names::is_interface_name(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_found() {
        let ipv4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
            virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let ipv6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wlan0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n\
            fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n";
        assert_eq!(
            parse_default_route_devices(ipv4, ipv6),
            vec!["eth0", "wlan0"]
        );
        assert!(parse_default_route_devices("", "").is_empty());
        assert!(parse_default_route_devices("garbage\nx y", "z").is_empty());
    }
}
