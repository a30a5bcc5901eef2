//! Logging, its one home: hclog-format JSON on stderr when Nomad runs us, a
//! human format in the CLI, and the level (environment over plugin config). go-plugin parses each stderr line as JSON and files it at
//! `@level`; see the protocol reference §2.4 for the exact rules.

use std::fmt;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Registry;

/// Environment variable that overrides the log level from the plugin config.
pub const LOG_LEVEL_ENV: &str = "NOMAD_DRIVER_VIRT_LOG_LEVEL";

/// Log level used when neither the environment nor the plugin config sets one.
pub const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::INFO;

/// Go's `2006-01-02T15:04:05.000000Z07:00`: exactly six fractional digits and
/// a numeric zone, or go-plugin files the whole line as raw debug text.
pub const HCLOG_TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6f%:z";

/// Formats one event as one hclog JSON object per line.
pub struct HclogJson;

impl<S, N> FormatEvent<S, N> for HclogJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = JsonFields::default();
        // Span fields first so the event's own fields win on a name clash.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(stored) = span.extensions().get::<SpanFields>() {
                    for (key, value) in &stored.0 {
                        fields.0.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        event.record(&mut fields);
        let line = hclog_line(
            event.metadata().level(),
            event.metadata().target(),
            fields.0,
        );
        writeln!(writer, "{line}")
    }
}

/// Builds the JSON object for one log line. Pure, so tests can check the keys.
pub fn hclog_line(level: &Level, target: &str, mut fields: Map<String, Value>) -> String {
    let message = match fields.remove("message") {
        Some(Value::String(text)) => text,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let mut object = Map::new();
    // go-plugin asserts these are strings; anything else would crash its reader.
    object.insert("@level".into(), Value::String(level_name(level).into()));
    object.insert("@message".into(), Value::String(message));
    object.insert("@module".into(), Value::String(module_name(target)));
    object.insert(
        "@timestamp".into(),
        Value::String(
            chrono::Local::now()
                .format(HCLOG_TIMESTAMP_FORMAT)
                .to_string(),
        ),
    );
    for (key, value) in fields {
        // Keys starting with '@' are reserved for hclog's own fields.
        let key = if key.starts_with('@') {
            format!("field{key}")
        } else {
            key
        };
        object.insert(key, value);
    }
    Value::Object(object).to_string()
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// `nomad_driver_virt::driver::fingerprint` becomes `virt.driver.fingerprint`.
fn module_name(target: &str) -> String {
    let mut parts = target.split("::");
    match parts.next() {
        Some("nomad_driver_virt") | Some("nomad-driver-virt") => std::iter::once("virt")
            .chain(parts)
            .collect::<Vec<_>>()
            .join("."),
        _ => format!("virt.{}", target.replace("::", ".")),
    }
}

#[derive(Default)]
struct JsonFields(Map<String, Value>);

struct SpanFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::String(value.to_string()));
    }
}

/// Stores span fields so they can be added to every event inside the span.
struct SpanFieldLayer;

impl<S> tracing_subscriber::Layer<S> for SpanFieldLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = JsonFields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.0));
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// hclog JSON, for go-plugin under Nomad.
    HclogJson,
    /// Plain lines for people at a terminal (the CLI): no timestamps, colour
    /// only when stderr is a terminal.
    Human,
}

static RELOAD: OnceLock<reload::Handle<LevelFilter, Registry>> = OnceLock::new();

/// Parses a level name as hclog spells them (case-insensitive).
pub fn parse_level(name: &str) -> Option<LevelFilter> {
    match name.trim().to_ascii_lowercase().as_str() {
        "trace" => Some(LevelFilter::TRACE),
        "debug" => Some(LevelFilter::DEBUG),
        "info" => Some(LevelFilter::INFO),
        "warn" => Some(LevelFilter::WARN),
        "error" => Some(LevelFilter::ERROR),
        "off" => Some(LevelFilter::OFF),
        _ => None,
    }
}

/// The level from the environment, if set and valid.
pub fn env_level() -> Option<LevelFilter> {
    std::env::var(LOG_LEVEL_ENV)
        .ok()
        .and_then(|value| parse_level(&value))
}

/// Installs the global subscriber writing to stderr. Safe to call once.
pub fn init(format: LogFormat) {
    let (filter, handle) = reload::Layer::new(env_level().unwrap_or(DEFAULT_LOG_LEVEL));
    let _ = RELOAD.set(handle);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(SpanFieldLayer);
    let result = match format {
        LogFormat::HclogJson => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(HclogJson)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Human => {
            use std::io::IsTerminal as _;
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::stderr().is_terminal())
                        .with_target(false)
                        .without_time(),
                )
                .try_init()
        }
    };
    if result.is_err() {
        // A subscriber was already installed (tests); keep it.
    }
}

/// Applies the plugin config's level unless the environment overrides it.
pub fn set_level_from_config(level: Option<LevelFilter>) {
    let chosen = env_level().or(level).unwrap_or(DEFAULT_LOG_LEVEL);
    if let Some(handle) = RELOAD.get() {
        let _ = handle.modify(|filter| *filter = chosen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_hclog_keys_and_go_timestamp() {
        let mut fields = Map::new();
        fields.insert(
            "message".into(),
            Value::String("starting \"task\"\nnext".into()),
        );
        fields.insert("alloc_id".into(), Value::String("abc".into()));
        fields.insert("@level".into(), Value::String("spoof".into()));
        let line = hclog_line(&Level::WARN, "nomad_driver_virt::driver", fields);
        assert!(!line.contains('\n'));
        let parsed: Value = serde_json::from_str(&line).expect("valid json");
        assert_eq!(parsed["@level"], "warn");
        assert_eq!(parsed["@message"], "starting \"task\"\nnext");
        assert_eq!(parsed["@module"], "virt.driver");
        assert_eq!(parsed["alloc_id"], "abc");
        assert_eq!(parsed["field@level"], "spoof");
        let stamp = parsed["@timestamp"].as_str().expect("string timestamp");
        assert!(
            chrono::DateTime::parse_from_str(stamp, HCLOG_TIMESTAMP_FORMAT).is_ok(),
            "{stamp}"
        );
        let fraction = stamp.split('.').nth(1).expect("fraction");
        assert_eq!(
            fraction.chars().take_while(|c| c.is_ascii_digit()).count(),
            6,
            "{stamp}"
        );
    }

    #[test]
    fn levels_parse_like_hclog() {
        assert_eq!(parse_level(" WARN "), Some(LevelFilter::WARN));
        assert_eq!(parse_level("warning"), None);
        assert_eq!(parse_level("trace"), Some(LevelFilter::TRACE));
    }
}
