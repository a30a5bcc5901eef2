//! The QEMU guest agent's JSON commands we use, as serde types. Pure: no I/O.
//! Field names follow qemu's `qga/qapi-schema.json`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// `{"execute": NAME, "arguments": ARGS}`.
#[derive(Debug, Serialize)]
pub struct Request<'a, A: Serialize> {
    pub execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<A>,
}

/// `{"return": R}`.
#[derive(Debug, Deserialize)]
pub struct Response<R> {
    #[serde(rename = "return")]
    pub value: R,
}

/// A `{}` return value.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Serialize)]
pub struct GuestExec<'a> {
    pub path: &'a str,
    pub arg: &'a [String],
    #[serde(rename = "capture-output")]
    pub capture_output: bool,
}

#[derive(Debug, Deserialize)]
pub struct GuestExecPid {
    pub pid: i64,
}

#[derive(Debug, Serialize)]
pub struct Pid {
    pub pid: i64,
}

/// `guest-exec-status`. In QEMU 7.2 the output is only returned once the
/// process has exited, and the entry is forgotten after that reply.
#[derive(Debug, Deserialize)]
pub struct GuestExecStatus {
    pub exited: bool,
    #[serde(default)]
    pub exitcode: Option<i64>,
    #[serde(default)]
    pub signal: Option<i64>,
    #[serde(rename = "out-data", default)]
    pub out_data: Option<String>,
    #[serde(rename = "err-data", default)]
    pub err_data: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct FileOpen<'a> {
    pub path: &'a str,
    pub mode: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Handle {
    pub handle: i64,
}

#[derive(Debug, Serialize)]
pub struct FileRead {
    pub handle: i64,
    pub count: u64,
}

#[derive(Debug, Deserialize)]
pub struct FileReadResult {
    pub count: u64,
    #[serde(rename = "buf-b64", default)]
    pub buf_b64: Option<String>,
    #[serde(default)]
    pub eof: bool,
}

#[derive(Debug, Serialize)]
pub struct FileWrite {
    pub handle: i64,
    #[serde(rename = "buf-b64")]
    pub buf_b64: String,
}

/// `guest-file-seek`; `whence` as the integer form (0 set, 1 cur, 2 end),
/// which every agent version accepts.
#[derive(Debug, Serialize)]
pub struct FileSeek {
    pub handle: i64,
    pub offset: i64,
    pub whence: i64,
}

pub const SEEK_CUR: i64 = 1;

#[derive(Debug, Deserialize)]
pub struct FileWriteResult {
    pub count: u64,
}

#[derive(Debug, Deserialize)]
pub struct NetworkInterface {
    pub name: String,
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<IpAddressEntry>,
}

#[derive(Debug, Deserialize)]
pub struct IpAddressEntry {
    #[serde(rename = "ip-address")]
    pub ip_address: String,
    #[serde(rename = "ip-address-type")]
    pub ip_address_type: String,
    pub prefix: u32,
}

/// Encodes bytes the way the agent expects them.
pub fn encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// Decodes an agent base64 field; `None` means "no data".
pub fn decode(field: Option<&str>) -> Result<Vec<u8>, base64::DecodeError> {
    match field {
        None => Ok(Vec::new()),
        Some(text) => BASE64.decode(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_serialise_like_the_agent_expects() {
        let arg = vec!["-c".to_string(), "true".to_string()];
        let request = Request {
            execute: "guest-exec",
            arguments: Some(GuestExec {
                path: "/bin/sh",
                arg: &arg,
                capture_output: true,
            }),
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","true"],"capture-output":true}}"#
        );
        let ping: Request<'_, Empty> = Request {
            execute: "guest-ping",
            arguments: None,
        };
        assert_eq!(
            serde_json::to_string(&ping).unwrap(),
            r#"{"execute":"guest-ping"}"#
        );
    }

    #[test]
    fn replies_parse() {
        let status: Response<GuestExecStatus> = serde_json::from_str(
            r#"{"return":{"exitcode":3,"out-data":"aGk=","out-truncated":false,"exited":true}}"#,
        )
        .unwrap();
        assert!(status.value.exited);
        assert_eq!(status.value.exitcode, Some(3));
        assert_eq!(decode(status.value.out_data.as_deref()).unwrap(), b"hi");
        let running: Response<GuestExecStatus> =
            serde_json::from_str(r#"{"return":{"exited":false}}"#).unwrap();
        assert!(!running.value.exited);
        let read: Response<FileReadResult> =
            serde_json::from_str(r#"{"return":{"count":0,"eof":true}}"#).unwrap();
        assert_eq!(read.value.count, 0);
        assert!(decode(read.value.buf_b64.as_deref()).unwrap().is_empty());
        let _: Response<Empty> = serde_json::from_str(r#"{"return":{}}"#).unwrap();
        let interfaces: Response<Vec<NetworkInterface>> = serde_json::from_str(
            r#"{"return":[{"name":"lo","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"127.0.0.1","prefix":8}],"hardware-address":"00:00:00:00:00:00"}]}"#,
        )
        .unwrap();
        assert_eq!(interfaces.value[0].ip_addresses[0].prefix, 8);
    }

    #[test]
    fn base64_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(Some(&encode(&bytes))).unwrap(), bytes);
        assert!(decode(Some("not base64!")).is_err());
    }
}
