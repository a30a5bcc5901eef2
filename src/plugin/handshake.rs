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

/// Where sockets go: `PLUGIN_UNIX_SOCKET_DIR`, else the temp dir.
pub fn socket_base_dir(dir: Option<&str>) -> PathBuf {
    match dir {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::temp_dir(),
    }
}

/// Creates a fresh private directory (0700) in `base` for the socket:
/// nobody else can reach the socket, even for the moment between binding
/// it and restricting its own mode, nor swap a link in its place.
pub fn private_socket_dir(base: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut attempt = 0u32;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!(
            "nomad-driver-virt-{}-{nanos:09}-{attempt}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// The socket inside a private directory.
pub fn socket_path(private_dir: &Path) -> PathBuf {
    private_dir.join("plugin.sock")
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
    fn private_dirs_are_owner_only_and_distinct() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir();
        let first = private_socket_dir(&base).expect("first");
        let second = private_socket_dir(&base).expect("second");
        assert_ne!(first, second);
        let mode = std::fs::metadata(&first)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(socket_path(&first).parent(), Some(first.as_path()));
        std::fs::remove_dir(first).expect("rm");
        std::fs::remove_dir(second).expect("rm");
    }

    #[test]
    fn handshake_line_shape() {
        let line = handshake_line(2, Path::new("/tmp/plugin1"));
        assert_eq!(line, "1|2|unix|/tmp/plugin1|grpc|\n");
    }
}
