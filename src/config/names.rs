//! Newtypes for the names and addresses a task config carries. Each is
//! checked once, when it is made, so a value of the type is valid by
//! construction; the parse errors say what is allowed.

use std::fmt;
use std::str::FromStr;

/// Why a text is not a valid name or address of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not a valid hostname: use 1-63 letters, digits and '-', not starting or ending with '-'")]
    Hostname(String),
    #[error("{0:?} is not a valid network interface name: use 1-15 letters, digits, '-', '_' or '.' (Linux IFNAMSIZ), not \".\" or \"..\"")]
    Interface(String),
    #[error("{0:?} is not a port label; use the label of a group network port block (letters, digits, '_', '-')")]
    PortLabel(String),
    #[error("{0:?} is not a valid libvirt object name (letters, digits, '-', '_', '.'; up to 64, not starting with '.')")]
    Object(String),
    #[error("{0:?} is not a guest device name such as \"vda\" or \"sdb\"")]
    GuestDevice(String),
    #[error("{0:?} is not a MAC address such as \"52:54:00:12:34:56\"")]
    Mac(String),
    #[error("{0:?} is not a tz database name such as \"Europe/Berlin\" or \"UTC\"")]
    Timezone(String),
}

/// Declares a string newtype with `parse`, `as_str`, `Display`, `FromStr`
/// and `AsRef<str>`, valid by construction through `$check`.
macro_rules! checked_name {
    ($(#[$meta:meta])* $name:ident, $variant:ident, $check:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Checks `text` and wraps it.
            pub fn parse(text: &str) -> Result<Self, NameError> {
                let check: fn(&str) -> bool = $check;
                if check(text) {
                    Ok(Self(text.to_string()))
                } else {
                    Err(NameError::$variant(text.to_string()))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(text: &str) -> Result<Self, NameError> {
                Self::parse(text)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

checked_name!(
    /// A guest hostname: an RFC 1123 DNS label.
    Hostname,
    Hostname,
    is_dns_label
);

checked_name!(
    /// A Linux network interface name (a bridge or a host device). Linux
    /// allows up to IFNAMSIZ-1 = 15 bytes other than '/', ':' and whitespace,
    /// and not "." or ".."; we also keep to `[A-Za-z0-9_.-]` because the name
    /// goes into libvirt XML and iptables arguments.
    InterfaceName,
    Interface,
    is_interface_name
);

checked_name!(
    /// A port label as Nomad allows them: letters, digits, '_' and '-'.
    PortLabel,
    PortLabel,
    |label| {
        !label.is_empty()
            && label.len() <= 64
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    }
);

checked_name!(
    /// A libvirt object name we create or look up (pools, volumes): no path
    /// separators or XML specials, reasonable length.
    ObjectName,
    Object,
    is_object_name
);

checked_name!(
    /// A guest disk device name such as `vda` or `sdb`.
    GuestDeviceName,
    GuestDevice,
    |name| {
        !name.is_empty()
            && name.len() <= 8
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    }
);

checked_name!(
    /// A tz database name such as `Europe/Berlin` or `UTC`.
    Timezone,
    Timezone,
    |zone| {
        !zone.is_empty()
            && zone.len() <= 64
            && zone
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'))
            && !zone.contains("..")
    }
);

/// An RFC 1123 DNS label: what a guest hostname must be.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// See [`InterfaceName`].
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name != "."
        && name != ".."
}

/// See [`ObjectName`].
pub fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

impl Hostname {
    /// A hostname derived from a Nomad task name: lower-case, invalid runs
    /// replaced by '-', trimmed to a DNS label; `vm` when nothing is left.
    pub fn from_task_name(task_name: &str) -> Hostname {
        let mut label = String::new();
        for c in task_name.chars() {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                label.push(c);
            } else if !label.ends_with('-') {
                label.push('-');
            }
        }
        let label: String = label.trim_matches('-').chars().take(63).collect();
        let label = label.trim_end_matches('-');
        if label.is_empty() {
            Hostname("vm".to_string())
        } else {
            Hostname(label.to_string())
        }
    }
}

/// A 48-bit Ethernet MAC address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Parses six two-digit hex octets separated by ':' (either case).
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let error = || NameError::Mac(text.to_string());
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(error)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(error());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(MacAddress(octets))
    }

    /// Locally administered and unicast: what we may make up for a guest.
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0b10 != 0 && self.0[0] & 0b1 == 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = NameError;
    fn from_str(text: &str) -> Result<Self, NameError> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(Hostname::parse("web-1").is_ok());
        assert!(Hostname::parse("-web").is_err());
        assert!(Hostname::parse("web_1").is_err());
        assert!(Hostname::parse(&"a".repeat(64)).is_err());
        assert_eq!(
            Hostname::from_task_name("My_Web Task!").as_str(),
            "my-web-task"
        );
        assert_eq!(Hostname::from_task_name("___").as_str(), "vm");
        let long = Hostname::from_task_name(&"x-".repeat(80));
        assert!(is_dns_label(long.as_str()), "{long}");
    }

    #[test]
    fn interface_names_follow_ifnamsiz_and_stay_argument_safe() {
        for good in ["virbr0", "eth0", "br-lan.10", &"a".repeat(15)] {
            assert!(InterfaceName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            &"a".repeat(16),
            "a/b",
            "a:b",
            "a b",
            "virbr0 -j ACCEPT",
            "br'0",
            "br0\n",
            "br<0>",
        ] {
            assert!(InterfaceName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macs_parse_and_print() {
        let mac = MacAddress::parse("52:54:00:AB:cd:0f").expect("valid");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        // QEMU's 52:54:00 prefix is locally administered.
        assert!(mac.is_local_unicast());
        for global_or_multicast in ["00:16:3e:00:00:01", "53:00:00:00:00:01"] {
            let mac = MacAddress::parse(global_or_multicast).expect("valid");
            assert!(!mac.is_local_unicast(), "{mac}");
        }
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "52-54-00-ab-cd-0f",
            "5:54:00:ab:cd:0f0",
            "+5:54:00:ab:cd:0f",
        ] {
            assert!(MacAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_say_what_is_allowed() {
        let error = PortLabel::parse("x;y").expect_err("bad");
        assert!(error.to_string().contains("letters, digits"), "{error}");
    }

    proptest::proptest! {
        #[test]
        fn mac_display_round_trips(octets in proptest::array::uniform6(0u8..)) {
            let mac = MacAddress(octets);
            proptest::prop_assert_eq!(MacAddress::parse(&mac.to_string()), Ok(mac));
        }

        #[test]
        fn names_never_panic(text in ".{0,80}") {
            let _ = Hostname::parse(&text);
            let _ = InterfaceName::parse(&text);
            let _ = MacAddress::parse(&text);
            let _ = Hostname::from_task_name(&text);
        }
    }
}
