//! Validation of the plugin's handshake line, as go-plugin's client does it.

/// A parsed handshake line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub core_version: u32,
    pub app_version: u32,
    pub network: String,
    pub address: String,
    pub protocol: String,
}

/// Why go-plugin's client would refuse the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("Unrecognized remote plugin message: {0:?}")]
    Unrecognized(String),
    #[error("Incompatible core API version with plugin. Plugin version: {0}, Core version: 1")]
    CoreVersion(String),
    #[error("Incompatible API version with plugin. Plugin version: {plugin}, Client versions: {client:?}")]
    AppVersion { plugin: String, client: Vec<u32> },
    #[error("Unknown address type: {0}")]
    Network(String),
    #[error("Unsupported plugin protocol {0:?}. Supported: [grpc]")]
    Protocol(String),
    #[error("plugin sent a TLS certificate but the client did not ask for mTLS")]
    UnexpectedCertificate,
}

/// Parses and checks one handshake line.
pub fn parse_handshake(
    line: &str,
    accepted_app_versions: &[u32],
) -> Result<Handshake, HandshakeError> {
    let trimmed = line.trim();
    let parts: Vec<&str> = trimmed.split('|').collect();
    if parts.len() < 4 {
        return Err(HandshakeError::Unrecognized(trimmed.to_string()));
    }
    let core_version = parts[0]
        .parse::<u32>()
        .ok()
        .filter(|version| *version == 1)
        .ok_or_else(|| HandshakeError::CoreVersion(parts[0].to_string()))?;
    let app_version = parts[1]
        .parse::<u32>()
        .ok()
        .filter(|version| accepted_app_versions.contains(version))
        .ok_or_else(|| HandshakeError::AppVersion {
            plugin: parts[1].to_string(),
            client: accepted_app_versions.to_vec(),
        })?;
    let network = parts[2].to_string();
    if network != "unix" && network != "tcp" {
        return Err(HandshakeError::Network(network));
    }
    // go-plugin defaults a missing protocol to netrpc, which Nomad refuses.
    let protocol = parts.get(4).copied().unwrap_or("netrpc").to_string();
    if protocol != "grpc" {
        return Err(HandshakeError::Protocol(protocol));
    }
    if parts.get(5).is_some_and(|cert| cert.len() > 50) {
        return Err(HandshakeError::UnexpectedCertificate);
    }
    Ok(Handshake {
        core_version,
        app_version,
        network,
        address: parts[3].to_string(),
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_both_go_plugin_forms() {
        for line in [
            "1|2|unix|/tmp/plugin1|grpc|\n",
            "1|2|unix|/tmp/plugin1|grpc",
        ] {
            let handshake = parse_handshake(line, &[2]).expect(line);
            assert_eq!(handshake.address, "/tmp/plugin1");
        }
    }

    #[test]
    fn rejects_like_go_plugin() {
        assert!(matches!(
            parse_handshake("hello", &[2]),
            Err(HandshakeError::Unrecognized(_))
        ));
        assert!(matches!(
            parse_handshake("2|2|unix|/x|grpc|", &[2]),
            Err(HandshakeError::CoreVersion(_))
        ));
        assert!(matches!(
            parse_handshake("1|1|unix|/x|grpc|", &[2]),
            Err(HandshakeError::AppVersion { .. })
        ));
        assert!(matches!(
            parse_handshake("1|2|udp|/x|grpc|", &[2]),
            Err(HandshakeError::Network(_))
        ));
        assert!(matches!(
            parse_handshake("1|2|unix|/x", &[2]),
            Err(HandshakeError::Protocol(_))
        ));
        let cert = "A".repeat(60);
        assert_eq!(
            parse_handshake(&format!("1|2|unix|/x|grpc|{cert}"), &[2]),
            Err(HandshakeError::UnexpectedCertificate)
        );
    }
}
