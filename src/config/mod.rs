//! Plugin and task configuration: the typed values, their defaults and
//! validation, and the hclspec schema next to them so a field cannot exist in
//! one and not the other (see the drift tests in `tests/schema_roundtrip.rs`).
//!
//! - `task`: the task config, wire form and typed [`task::TaskSpec`]
//!   ([`task::parse_task_config`] is the one entry for StartTask and the CLI);
//! - `network`: its `network_interface` blocks;
//! - `plugin`: the plugin config and its [`plugin::Settings`];
//! - `policy`: a task config against the operator's `allow_*` settings;
//! - `client`: finding the plugin's block in a Nomad client config file;
//! - `names`, `units`: the newtypes (hostname, interface name, MAC, ...),
//!   byte sizes and Go durations the configs are made of;
//! - `hclspec`: the schema language.

pub mod client;
pub mod hclspec;
pub mod names;
pub mod network;
pub mod plugin;
pub mod policy;
pub mod task;
pub mod units;

use std::fmt;

use serde::de::DeserializeOwned;

/// One problem with a config value: which field, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `disk[0].source.image`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in one config, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// Which config: "plugin config" or "task config".
    pub what: &'static str,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: ", self.what)?;
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The old name of [`ConfigErrors`], kept for callers not yet renamed.
pub type ConfigError = ConfigErrors;

/// Collects field errors while validating.
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: printable(field.into()),
            message: message.into(),
        });
    }

    /// Records `result`'s error under `field`; the value when it is fine.
    pub fn check<T, E: fmt::Display>(
        &mut self,
        field: impl Into<String>,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.add(field, error.to_string());
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result<T>(self, what: &'static str, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors {
                what,
                errors: self.0,
            })
        }
    }
}

/// Decodes cty-msgpack (as Nomad encodes it) into a typed config, naming the
/// field on a type error. Empty input means "no config block".
pub fn decode_msgpack<T: DeserializeOwned + Default>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, ConfigErrors> {
    if bytes.is_empty() {
        return Ok(T::default());
    }
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let field = error.path().to_string();
        let field = if field == "." {
            String::new()
        } else {
            printable(field)
        };
        let message = explain_decode_error(&error.inner().to_string());
        ConfigErrors {
            what,
            errors: vec![FieldError { field, message }],
        }
    })
}

/// A field path with control characters escaped: map keys in it come from
/// the job, and the path is printed to terminals and logs.
fn printable(field: String) -> String {
    if field.chars().any(char::is_control) {
        field
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_debug().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        field
    }
}

/// Turns serde's wording into advice a job author can act on.
fn explain_decode_error(raw: &str) -> String {
    if let Some(rest) = raw.strip_prefix("unknown field ") {
        format!("unknown attribute or block {rest}")
    } else if raw.starts_with("invalid type") {
        format!("wrong type ({raw})")
    } else if let Some(marker) = raw.strip_prefix("wrong msgpack marker ") {
        // rmp's wording for a value of a msgpack type (bin, ext, ...) the
        // field can never hold.
        format!("wrong type (a msgpack {marker} value); give a value of the attribute's type")
    } else {
        raw.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgpack_signal_commands(key: &str, value: rmpv_like::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_map_len(&mut out, 1).unwrap();
        rmp::encode::write_str(&mut out, "signal_commands").unwrap();
        rmp::encode::write_map_len(&mut out, 1).unwrap();
        rmp::encode::write_str(&mut out, key).unwrap();
        match value {
            rmpv_like::Value::Str(s) => rmp::encode::write_str(&mut out, s).unwrap(),
            rmpv_like::Value::Int(i) => {
                rmp::encode::write_sint(&mut out, i).unwrap();
            }
        }
        out
    }

    mod rmpv_like {
        pub enum Value {
            Str(&'static str),
            Int(i64),
        }
    }

    /// Found by tests/fuzz.rs: a map key a job controls went into the field
    /// path raw, so a newline or escape sequence in it forged lines in
    /// `validate` output and in the logs.
    #[test]
    fn hostile_map_keys_are_escaped_in_field_paths() {
        let hostile = "\u{1b}[2J\nSIGHUP";
        for value in [rmpv_like::Value::Str("x"), rmpv_like::Value::Int(5)] {
            let bytes = msgpack_signal_commands(hostile, value);
            let errors = task::parse_task_config(&bytes).expect_err("hostile key");
            let text = errors.to_string();
            assert!(!text.chars().any(char::is_control), "{text:?}");
            assert!(
                errors
                    .errors
                    .iter()
                    .any(|e| e.field.starts_with("signal_commands")),
                "{errors:?}"
            );
        }
    }

    /// Found by tests/fuzz.rs: a msgpack type the field cannot take (bin,
    /// ext) was reported as "wrong msgpack marker Bin8", which does not say
    /// what to change.
    #[test]
    fn wrong_msgpack_markers_read_as_wrong_types() {
        let mut bytes = Vec::new();
        rmp::encode::write_map_len(&mut bytes, 1).unwrap();
        rmp::encode::write_str(&mut bytes, "guest_agent").unwrap();
        rmp::encode::write_bin(&mut bytes, b"x").unwrap();
        let errors = task::parse_task_config(&bytes).expect_err("bin for a bool");
        assert_eq!(errors.errors[0].field, "guest_agent");
        assert!(
            errors.errors[0].message.starts_with("wrong type"),
            "{errors}"
        );
    }
}
