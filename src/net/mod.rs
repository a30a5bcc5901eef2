//! VM networking: the `Net` contract's types. The trait and its libvirt
//! implementation arrive with the networking work; the config types live here
//! already because the task config schema includes them.

pub mod config;
pub mod dhcp;
pub mod iptables;

/// Prefix of every network fingerprint attribute.
pub const ATTRIBUTE_PREFIX: &str = "driver.virt.network.";

/// "active" or "inactive", as the network fingerprint attributes spell it.
pub fn is_active_string(active: bool) -> &'static str {
    if active {
        "active"
    } else {
        "inactive"
    }
}
