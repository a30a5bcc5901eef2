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
            field: field.into(),
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
        let field = if field == "." { String::new() } else { field };
        let message = explain_decode_error(&error.inner().to_string());
        ConfigErrors {
            what,
            errors: vec![FieldError { field, message }],
        }
    })
}

/// Turns serde's wording into advice a job author can act on.
fn explain_decode_error(raw: &str) -> String {
    if let Some(rest) = raw.strip_prefix("unknown field ") {
        format!("unknown attribute or block {rest}")
    } else if raw.starts_with("invalid type") {
        format!("wrong type ({raw})")
    } else {
        raw.to_string()
    }
}
