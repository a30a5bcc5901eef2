//! Task handles written by the Go driver (hashicorp/nomad-driver-virt), so
//! an operator can swap binaries under a running client and keep its VMs.
//!
//! What the Go driver stores (its `plugin/driver.go`, `TaskState`):
//!
//! ```text
//! TaskState { TaskConfig *drivers.TaskConfig; StartedAt time.Time;
//!             NetTeardown *net.TeardownSpec }
//! ```
//!
//! encoded by Nomad's `TaskHandle.SetDriverState` with `base.MsgpackHandle`
//! (hashicorp/go-msgpack v2, `WriteExt` off, `TimeNotBuiltin` on, only
//! `codec` struct tags, none of which these structs have):
//! - structs are maps keyed by the Go field name, every exported field
//!   present, nil pointers as nil;
//! - strings *and* byte slices use the old raw spec (fixstr, str16, str32;
//!   never str8 nor bin);
//! - `time.Time` is its `MarshalBinary` bytes (15, or 16 with a sub-minute
//!   zone offset) written as raw bytes;
//! - non-negative ints above 127 are written as *signed* int16/32/64.
//!
//! `net.TeardownSpec` exists in two shapes: v0.0.2-beta.1 has
//! `IPTablesRules [][]string`, `DHCPReservation string`, `Network string`;
//! main replaced the first with `FilterRemoval *FilterRemoval{Name string;
//! Data any}`, where Data is the iptables filter's `Rules [][]string`. Each
//! rule is `[table, chain, args...]`. `DHCPReservation` is libvirtxml's
//! `<host mac=".." name=".." ip=".."></host>`.
//!
//! The Go driver names the domain `vmNameFromTaskID`: the task ID's parts
//! after the allocation ID joined with `-`; and its pool volumes
//! `<domain>_<device>.img` (`virt/disks/config.go` Generate).

use crate::libvirt::dhcp::Reservation;
use crate::net::iptables::rules::{validate_rule, IptablesRule, RuleError};
use crate::net::TeardownSpec;
use crate::nomad::driver_state::{DriverState, StateOrigin, DRIVER_STATE_VERSION};

/// The `FilterRemoval.Name` of the Go driver's iptables filter.
pub const GO_FILTER_NAME: &str = "iptables";

/// Seconds from 0001-01-01 (Go's absolute epoch) to 1970-01-01.
const GO_UNIX_TO_ABSOLUTE: i64 = 62_135_596_800;

/// Deepest nesting accepted; Go's state is about five levels deep.
const MAX_DEPTH: usize = 32;

/// Why a Go driver state cannot be adopted; each names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoHandleError {
    #[error("Go driver state is not msgpack: {0}")]
    Malformed(String),
    #[error("Go driver state: {field} is missing")]
    Missing { field: String },
    #[error("Go driver state: {field} should be {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("Go driver state: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("Go driver state: {field}: {source}")]
    Rule {
        field: String,
        #[source]
        source: RuleError,
    },
}

/// A decoded msgpack value, as the Go codec writes them.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    /// Raw/str/bin: the Go codec writes strings and `[]byte` alike.
    Bytes(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Ext(i8, Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bytes(_) => "a string",
            Value::Array(_) => "an array",
            Value::Map(_) => "a map",
            Value::Ext(..) => "an extension value",
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GoHandleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                GoHandleError::Malformed(format!(
                    "truncated: {n} byte(s) needed at offset {}",
                    self.pos
                ))
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, GoHandleError> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, width: usize) -> Result<u64, GoHandleError> {
        Ok(self
            .take(width)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn int(&mut self, width: usize) -> Result<i128, GoHandleError> {
        let raw = self.uint(width)?;
        let bits = 64 - 8 * width as u32;
        // Sign-extend from `width` bytes.
        Ok(i128::from(((raw << bits) as i64) >> bits))
    }

    fn length(&mut self, width: usize) -> Result<usize, GoHandleError> {
        usize::try_from(self.uint(width)?)
            .map_err(|_| GoHandleError::Malformed("length does not fit in memory".into()))
    }

    /// A container length, bounded by the bytes left (each element takes
    /// at least one), so hostile lengths cannot make us allocate.
    fn count(&mut self, n: usize, per_element: usize) -> Result<usize, GoHandleError> {
        let left = self.bytes.len() - self.pos;
        if n.saturating_mul(per_element) > left {
            return Err(GoHandleError::Malformed(format!(
                "a container of {n} element(s) at offset {} exceeds the {left} byte(s) left",
                self.pos
            )));
        }
        Ok(n)
    }

    fn value(&mut self, depth: usize) -> Result<Value, GoHandleError> {
        if depth > MAX_DEPTH {
            return Err(GoHandleError::Malformed(format!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        let marker = self.byte()?;
        let value = match marker {
            0x00..=0x7f => Value::Int(i128::from(marker)),
            0x80..=0x8f => self.map(usize::from(marker & 0x0f), depth)?,
            0x90..=0x9f => self.array(usize::from(marker & 0x0f), depth)?,
            0xa0..=0xbf => self.bytes(usize::from(marker & 0x1f))?,
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 | 0xd9 => {
                let n = self.length(1)?;
                self.bytes(n)?
            }
            0xc5 | 0xda => {
                let n = self.length(2)?;
                self.bytes(n)?
            }
            0xc6 | 0xdb => {
                let n = self.length(4)?;
                self.bytes(n)?
            }
            0xc7 => {
                let n = self.length(1)?;
                self.ext(n)?
            }
            0xc8 => {
                let n = self.length(2)?;
                self.ext(n)?
            }
            0xc9 => {
                let n = self.length(4)?;
                self.ext(n)?
            }
            0xca => {
                let bits = self.uint(4)? as u32;
                Value::Float(f64::from(f32::from_bits(bits)))
            }
            0xcb => Value::Float(f64::from_bits(self.uint(8)?)),
            0xcc => Value::Int(i128::from(self.uint(1)?)),
            0xcd => Value::Int(i128::from(self.uint(2)?)),
            0xce => Value::Int(i128::from(self.uint(4)?)),
            0xcf => Value::Int(i128::from(self.uint(8)?)),
            0xd0 => Value::Int(self.int(1)?),
            0xd1 => Value::Int(self.int(2)?),
            0xd2 => Value::Int(self.int(4)?),
            0xd3 => Value::Int(self.int(8)?),
            0xd4 => self.ext(1)?,
            0xd5 => self.ext(2)?,
            0xd6 => self.ext(4)?,
            0xd7 => self.ext(8)?,
            0xd8 => self.ext(16)?,
            0xdc => {
                let n = self.length(2)?;
                self.array(n, depth)?
            }
            0xdd => {
                let n = self.length(4)?;
                self.array(n, depth)?
            }
            0xde => {
                let n = self.length(2)?;
                self.map(n, depth)?
            }
            0xdf => {
                let n = self.length(4)?;
                self.map(n, depth)?
            }
            0xe0..=0xff => Value::Int(i128::from(marker as i8)),
            0xc1 => {
                return Err(GoHandleError::Malformed(format!(
                    "reserved byte 0xc1 at offset {}",
                    self.pos - 1
                )))
            }
        };
        Ok(value)
    }

    fn bytes(&mut self, n: usize) -> Result<Value, GoHandleError> {
        Ok(Value::Bytes(self.take(n)?.to_vec()))
    }

    fn ext(&mut self, n: usize) -> Result<Value, GoHandleError> {
        let kind = self.byte()? as i8;
        Ok(Value::Ext(kind, self.take(n)?.to_vec()))
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value, GoHandleError> {
        let n = self.count(n, 1)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value, GoHandleError> {
        let n = self.count(n, 2)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let key = self.value(depth + 1)?;
            let value = self.value(depth + 1)?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

fn parse(bytes: &[u8]) -> Result<Value, GoHandleError> {
    let mut reader = Reader { bytes, pos: 0 };
    let value = reader.value(0)?;
    if reader.pos != bytes.len() {
        return Err(GoHandleError::Malformed(format!(
            "{} byte(s) left over after the state",
            bytes.len() - reader.pos
        )));
    }
    Ok(value)
}

/// Whether `bytes` starts like the Go driver's state: a msgpack map (our
/// own state is JSON and starts with `{`, a msgpack fixint).
pub fn looks_like_go_state(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

/// A Go struct (a map keyed by field name) with the path it was found at.
struct Struct<'a> {
    path: String,
    entries: &'a [(Value, Value)],
}

impl<'a> Struct<'a> {
    fn new(path: &str, value: &'a Value) -> Result<Self, GoHandleError> {
        match value {
            Value::Map(entries) => Ok(Struct {
                path: path.to_string(),
                entries,
            }),
            other => Err(wrong_type(path, "a map (a Go struct)", other)),
        }
    }

    fn path_of(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    /// The field's value; nil and absent are both `None`.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.entries
            .iter()
            .find(|(key, _)| matches!(key, Value::Bytes(name) if name == field.as_bytes()))
            .map(|(_, value)| value)
            .filter(|value| **value != Value::Nil)
    }

    fn string(&self, field: &str) -> Result<String, GoHandleError> {
        match self.get(field) {
            None => Ok(String::new()),
            Some(value) => text(&self.path_of(field), value),
        }
    }

    fn child(&self, field: &str) -> Result<Option<Struct<'a>>, GoHandleError> {
        self.get(field)
            .map(|value| Struct::new(&self.path_of(field), value))
            .transpose()
    }
}

fn wrong_type(field: &str, expected: &'static str, found: &Value) -> GoHandleError {
    GoHandleError::WrongType {
        field: field.to_string(),
        expected,
        found: found.kind(),
    }
}

fn text(field: &str, value: &Value) -> Result<String, GoHandleError> {
    match value {
        Value::Bytes(bytes) => {
            String::from_utf8(bytes.clone()).map_err(|_| GoHandleError::Invalid {
                field: field.to_string(),
                reason: "not valid UTF-8".into(),
            })
        }
        other => Err(wrong_type(field, "a string", other)),
    }
}

/// Go's `time.Time.MarshalBinary` (versions 1 and 2) as Unix nanoseconds.
pub fn go_time_unix_nanos(bytes: &[u8]) -> Result<i64, String> {
    let (version, body) = bytes.split_first().ok_or("empty time value")?;
    let expected = match version {
        1 => 14,
        2 => 15,
        other => return Err(format!("unknown time encoding version {other}")),
    };
    if body.len() != expected {
        return Err(format!(
            "time encoding version {version} has {} byte(s), expected {}",
            bytes.len(),
            expected + 1
        ));
    }
    let absolute = body[..8]
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)) as i64;
    let nanos = body[8..12]
        .iter()
        .fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
    if nanos >= 1_000_000_000 {
        return Err(format!("nanoseconds {nanos} out of range"));
    }
    if absolute == 0 && nanos == 0 {
        // Go's zero time: never set.
        return Ok(0);
    }
    absolute
        .checked_sub(GO_UNIX_TO_ABSOLUTE)
        .and_then(|secs| secs.checked_mul(1_000_000_000))
        .and_then(|n| n.checked_add(i64::from(nanos)))
        .ok_or_else(|| "time out of range".to_string())
}

fn started_at(value: Option<&Value>) -> Result<i64, GoHandleError> {
    let invalid = |reason: String| GoHandleError::Invalid {
        field: "StartedAt".into(),
        reason,
    };
    match value {
        None => Ok(0),
        Some(Value::Bytes(bytes)) => go_time_unix_nanos(bytes).map_err(invalid),
        // The msgpack timestamp extension, written when TimeNotBuiltin is off.
        Some(Value::Ext(-1, data)) => msgpack_timestamp(data).ok_or_else(|| {
            invalid(format!(
                "a timestamp extension of {} byte(s) is not valid",
                data.len()
            ))
        }),
        Some(other) => Err(wrong_type("StartedAt", "Go's binary time", other)),
    }
}

fn msgpack_timestamp(data: &[u8]) -> Option<i64> {
    let be = |bytes: &[u8]| bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let (secs, nanos) = match data.len() {
        4 => (be(data) as i64, 0),
        8 => {
            let raw = be(data);
            ((raw & 0x3_ffff_ffff) as i64, (raw >> 34) as i64)
        }
        12 => (be(&data[4..]) as i64, be(&data[..4]) as i64),
        _ => return None,
    };
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// The domain the Go driver made for a task (`vmNameFromTaskID`).
pub fn go_domain_name(task_id: &str) -> String {
    let parts: Vec<&str> = task_id.split('/').collect();
    parts.get(1..).unwrap_or_default().join("-")
}

/// Whether `volume` is one the Go driver created for `domain`
/// (`<domain>_<device>.img`), so deleting it with the domain is safe.
pub fn is_go_task_volume(domain: &str, volume: &str) -> bool {
    volume
        .strip_prefix(domain)
        .and_then(|rest| rest.strip_prefix('_'))
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|device| {
            !device.is_empty() && device.chars().all(|c| c.is_ascii_alphanumeric())
        })
}

/// `[table, chain, args...]` lists as exact rules.
fn rules(field: &str, value: Option<&Value>) -> Result<Vec<IptablesRule>, GoHandleError> {
    let items = match value {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(wrong_type(field, "a list of rules", other)),
    };
    let mut rules = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let path = format!("{field}[{index}]");
        let Value::Array(words) = item else {
            return Err(wrong_type(&path, "a list of strings", item));
        };
        let words = words
            .iter()
            .enumerate()
            .map(|(i, word)| text(&format!("{path}[{i}]"), word))
            .collect::<Result<Vec<_>, _>>()?;
        let [table, chain, args @ ..] = words.as_slice() else {
            return Err(GoHandleError::Invalid {
                field: path,
                reason: format!("a rule needs a table, a chain and arguments, found {words:?}"),
            });
        };
        let rule = IptablesRule {
            table: table.clone(),
            chain: chain.clone(),
            args: args.to_vec(),
        };
        validate_rule(&rule).map_err(|source| GoHandleError::Rule {
            field: path,
            source,
        })?;
        rules.push(rule);
    }
    Ok(rules)
}

/// libvirtxml's `<host mac=".." name=".." ip=".."></host>`, read by the
/// same parser as the network XML's `<dhcp>` hosts.
fn reservation(network: &str, xml: &str) -> Result<Reservation, GoHandleError> {
    let hosts = crate::libvirt::dhcp::reservations_in_xml(&format!("<dhcp>{xml}</dhcp>"));
    match hosts.as_slice() {
        [(mac, ip, name)] => Ok(Reservation {
            network: network.to_string(),
            mac: mac.clone(),
            ip: *ip,
            hostname: name.clone().filter(|name| !name.is_empty()),
        }),
        _ => Err(GoHandleError::Invalid {
            field: "NetTeardown.DHCPReservation".into(),
            reason: format!("{xml:?} is not one DHCP host entry with a mac and an IPv4 ip"),
        }),
    }
}

fn teardown(spec: &Struct<'_>) -> Result<TeardownSpec, GoHandleError> {
    // v0.0.2-beta.1: the rules directly; main: behind the filter's name.
    let mut legacy = rules(&spec.path_of("IPTablesRules"), spec.get("IPTablesRules"))?;
    if let Some(removal) = spec.child("FilterRemoval")? {
        let name = removal.string("Name")?;
        let data = removal.get("Data");
        if data.is_some() && name != GO_FILTER_NAME {
            return Err(GoHandleError::Invalid {
                field: removal.path_of("Name"),
                reason: format!(
                    "filter {name:?} is unknown; only the Go driver's {GO_FILTER_NAME:?} filter can be undone"
                ),
            });
        }
        legacy.extend(rules(&removal.path_of("Data"), data)?);
    }
    let network = spec.string("Network")?;
    let entry = spec.string("DHCPReservation")?;
    let dhcp_reservation = if network.is_empty() || entry.is_empty() {
        None
    } else {
        Some(reservation(&network, &entry)?)
    };
    Ok(TeardownSpec {
        // The Go driver tags nothing: its rules go by exact match.
        task_tag: String::new(),
        iptables_rules: Vec::new(),
        legacy_iptables_rules: legacy,
        dhcp_reservation,
        network: (!network.is_empty()).then_some(network),
        // Looked up from the network at teardown.
        bridge: None,
        more_bridges: Vec::new(),
    })
}

/// Decodes the Go driver's state into ours. `fallback_task_id` is the
/// handle's own task config ID, used when the state carries none.
pub fn decode(bytes: &[u8], fallback_task_id: &str) -> Result<DriverState, GoHandleError> {
    let root = parse(bytes)?;
    let state = Struct::new("", &root)?;
    let config = state.child("TaskConfig")?;
    let (mut task_id, mut task_name, mut alloc_id, mut stdout_path) =
        (String::new(), String::new(), String::new(), String::new());
    if let Some(config) = &config {
        task_id = config.string("ID")?;
        task_name = config.string("Name")?;
        alloc_id = config.string("AllocID")?;
        stdout_path = config.string("StdoutPath")?;
    }
    if task_id.is_empty() {
        task_id = fallback_task_id.to_string();
    }
    let parts: Vec<&str> = task_id.split('/').collect();
    if parts.len() < 3 || parts.iter().any(|part| part.is_empty()) {
        return Err(if task_id.is_empty() {
            GoHandleError::Missing {
                field: "TaskConfig.ID".into(),
            }
        } else {
            GoHandleError::Invalid {
                field: "TaskConfig.ID".into(),
                reason: format!("{task_id:?} is not a Nomad task ID (alloc/task/id)"),
            }
        });
    }
    if task_name.is_empty() {
        task_name = parts[1].to_string();
    }
    if alloc_id.is_empty() {
        alloc_id = parts[0].to_string();
    }
    let net = state
        .child("NetTeardown")?
        .map(|spec| teardown(&spec))
        .transpose()?;
    // The reserved address is the guest's (the Go driver reserved the lease
    // it found).
    let guest_ip = net
        .as_ref()
        .and_then(|spec| spec.dhcp_reservation.as_ref())
        .map(|reservation| reservation.ip);
    Ok(DriverState {
        version: DRIVER_STATE_VERSION,
        domain_name: go_domain_name(&task_id),
        task_id,
        task_name,
        alloc_id,
        started_at_unix_nanos: started_at(state.get("StartedAt"))?,
        // Found from the domain's disks at recovery (see `is_go_task_volume`).
        volumes: Vec::new(),
        // The Go driver's serial console is a pty, not a file we copy.
        console_log: None,
        stdout_path,
        net,
        guest_ip,
        origin: StateOrigin::GoDriver,
        guest_agent: false,
        signal_commands: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_and_volume_names_follow_go() {
        assert_eq!(go_domain_name("a1b2/web/12345678"), "web-12345678");
        assert_eq!(go_domain_name("a/my/task/x"), "my-task-x");
        assert!(is_go_task_volume("web-12345678", "web-12345678_vda.img"));
        assert!(is_go_task_volume("web-12345678", "web-12345678_sda.img"));
        assert!(!is_go_task_volume("web-12345678", "web-12345678_vda.qcow2"));
        assert!(!is_go_task_volume("web-12345678", "web-123456789_vda.img"));
        assert!(!is_go_task_volume("web-12345678", "web-12345678_.img"));
        assert!(!is_go_task_volume("web-12345678", "web-12345678_../x.img"));
        assert!(!is_go_task_volume("web-12345678", "nmdsrc-qcow2-ab.img"));
    }

    #[test]
    fn go_time_binary_versions() {
        // 2024-01-02T03:04:05.000000006Z, version 1, UTC (-1 offset).
        let secs: i64 = 1_704_164_645;
        let mut v1 = vec![1];
        v1.extend_from_slice(&((secs + GO_UNIX_TO_ABSOLUTE) as u64).to_be_bytes());
        v1.extend_from_slice(&6u32.to_be_bytes());
        v1.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(go_time_unix_nanos(&v1), Ok(secs * 1_000_000_000 + 6));
        let mut v2 = v1.clone();
        v2[0] = 2;
        v2.push(30);
        assert_eq!(go_time_unix_nanos(&v2), Ok(secs * 1_000_000_000 + 6));
        assert!(go_time_unix_nanos(&v1[..10]).is_err());
        // time.Time{} is "not set", not an error.
        let mut zero = vec![1];
        zero.extend_from_slice(&[0; 12]);
        zero.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(go_time_unix_nanos(&zero), Ok(0));
        assert!(go_time_unix_nanos(&[]).is_err());
        let mut bad = v1.clone();
        bad[0] = 9;
        assert!(go_time_unix_nanos(&bad).unwrap_err().contains("version 9"));
    }

    #[test]
    fn hostile_lengths_and_depth_are_refused() {
        // An array claiming 2^32-1 elements in 5 bytes.
        assert!(matches!(
            parse(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(GoHandleError::Malformed(_))
        ));
        let deep = vec![0x91; 100];
        assert!(parse(&deep).unwrap_err().to_string().contains("nested"));
        assert!(parse(&[0x81, 0xa1]).is_err());
        assert!(parse(&[0xc0, 0xc0])
            .unwrap_err()
            .to_string()
            .contains("left over"));
        assert!(parse(&[0xc1]).is_err());
    }

    #[test]
    fn integers_sign_extend() {
        assert_eq!(parse(&[0xd1, 0xff, 0xfe]), Ok(Value::Int(-2)));
        assert_eq!(parse(&[0xd1, 0x01, 0x00]), Ok(Value::Int(256)));
        assert_eq!(parse(&[0xe0]), Ok(Value::Int(-32)));
        assert_eq!(
            parse(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok(Value::Int(i128::from(u64::MAX)))
        );
    }

    #[test]
    fn detection_is_by_first_byte() {
        assert!(looks_like_go_state(&[0x83]));
        assert!(looks_like_go_state(&[0xde, 0, 3]));
        assert!(!looks_like_go_state(b"{\"version\":1}"));
        assert!(!looks_like_go_state(b""));
    }
}
