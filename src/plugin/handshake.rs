//! The go-plugin handshake: the magic cookie, protocol negotiation and the
//! one line printed on stdout. Pure functions; `serve` does the I/O.

use std::path::{Path, PathBuf};

/// Environment variable carrying Nomad's magic cookie.
pub const MAGIC_COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
/// The value Nomad sets; any other value means we were not started by Nomad.
pub const MAGIC_COOKIE_VALUE: &str =
    "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
/// go-plugin's own protocol version.
pub const CORE_PROTOCOL_VERSION: u32 = 1;
/// Nomad's plugin protocol version for gRPC plugins.
pub const APP_PROTOCOL_VERSION: u32 = 2;

/// Printed on stderr when run by hand, as go-plugin servers do.
pub const NOT_A_PLUGIN_MESSAGE: &str =
    "This binary is a plugin. These are not meant to be executed directly.\n\
Nomad starts it from its plugin_dir (see the README for the client config);\n\
run `nomad-driver-virt help` for the commands meant for people.\n";

/// Whether the environment proves Nomad (go-plugin) started us.
pub fn cookie_matches(value: Option<&str>) -> bool {
    value == Some(MAGIC_COOKIE_VALUE)
}

/// Picks the app protocol version from `PLUGIN_PROTOCOL_VERSIONS`.
///
/// Like go-plugin: the highest version we support that the client offers;
/// when none matches we still answer with ours and the client reports the
/// mismatch. The bool says whether the client offered ours.
pub fn negotiate_protocol(offered: Option<&str>) -> (u32, bool) {
    let offered_ours = offered
        .map(|list| {
            list.split(',')
                .filter_map(|item| item.trim().parse::<u32>().ok())
                .any(|version| version == APP_PROTOCOL_VERSION)
        })
        .unwrap_or(true);
    (APP_PROTOCOL_VERSION, offered_ours)
}

/// The stdout line: `1|2|unix|<path>|grpc|` (an empty sixth field: no TLS cert).
pub fn handshake_line(app_version: u32, socket: &Path) -> String {
    format!(
        "{CORE_PROTOCOL_VERSION}|{app_version}|unix|{}|grpc|\n",
        socket.display()
    )
}

/// A fresh socket path in `dir` (from `PLUGIN_UNIX_SOCKET_DIR`, else the temp dir).
pub fn socket_path(dir: Option<&str>) -> PathBuf {
    let dir = match dir {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::temp_dir(),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!("plugin{}{:09}", std::process::id(), nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_must_match_exactly() {
        assert!(cookie_matches(Some(MAGIC_COOKIE_VALUE)));
        assert!(!cookie_matches(Some("nope")));
        assert!(!cookie_matches(None));
    }

    #[test]
    fn protocol_negotiation_follows_go_plugin() {
        assert_eq!(negotiate_protocol(Some("2")), (2, true));
        assert_eq!(negotiate_protocol(Some("1, 2,3")), (2, true));
        assert_eq!(negotiate_protocol(Some("1")), (2, false));
        assert_eq!(negotiate_protocol(None), (2, true));
    }

    #[test]
    fn handshake_line_shape() {
        let line = handshake_line(2, Path::new("/tmp/plugin1"));
        assert_eq!(line, "1|2|unix|/tmp/plugin1|grpc|\n");
    }
}
