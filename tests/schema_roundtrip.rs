//! The advertised schemas against the typed configs: every config block in
//! examples/ goes through the plugin's advertised schema (as Nomad would
//! encode it) and decodes into the typed config; and the schema and the
//! types cannot drift apart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nomad_driver_virt::config::plugin::PluginConfig;
use nomad_driver_virt::config::task::{self, TaskConfig};
use nomad_driver_virt::nomad::cty::CtyValue;
use nomad_driver_virt::nomad::hclspec::Spec;
use nomad_driver_virt::nomad_client::hcldec;

/// Config blocks found in an HCL file: (kind, description, body as HCL text).
fn config_blocks(path: &Path) -> Vec<(&'static str, String, String)> {
    let text = std::fs::read_to_string(path).expect("read example");
    let body =
        hcl::parse(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    let mut found = Vec::new();
    collect(&body, path, &mut found);
    found
}

fn collect(body: &hcl::Body, path: &Path, found: &mut Vec<(&'static str, String, String)>) {
    for block in body.blocks() {
        match block.identifier.as_str() {
            "plugin" if block.labels.first().map(|l| l.as_str()) == Some("nomad-driver-virt") => {
                for config in block
                    .body
                    .blocks()
                    .filter(|b| b.identifier.as_str() == "config")
                {
                    let text = hcl::to_string(&config.body).expect("format config");
                    found.push(("plugin", format!("{} plugin config", path.display()), text));
                }
            }
            "task" => {
                let is_virt = block.body.attributes().any(|attribute| {
                    attribute.key.as_str() == "driver"
                        && matches!(&attribute.expr, hcl::Expression::String(driver) if driver == "virt")
                });
                if is_virt {
                    let name = block
                        .labels
                        .first()
                        .map(|l| l.as_str().to_string())
                        .unwrap_or_default();
                    for config in block
                        .body
                        .blocks()
                        .filter(|b| b.identifier.as_str() == "config")
                    {
                        let text = hcl::to_string(&config.body).expect("format config");
                        found.push(("task", format!("{} task {name}", path.display()), text));
                    }
                }
            }
            _ => collect(&block.body, path, found),
        }
    }
}

fn example_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files = Vec::new();
    let mut pending = vec![root];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("read examples dir")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "hcl") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[tokio::test]
async fn every_example_config_round_trips_through_the_advertised_schema() {
    let plugin = common::launch().await;
    let plugin_spec = plugin.plugin_config_schema().await.expect("plugin schema");
    let task_spec = plugin.task_config_schema().await.expect("task schema");
    let context = hcl::eval::Context::new();
    let mut checked = BTreeMap::new();
    for file in example_files() {
        for (kind, what, body) in config_blocks(&file) {
            match kind {
                "plugin" => {
                    let bytes = hcldec::encode_hcl(&plugin_spec, &body, &context)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    let config: PluginConfig =
                        nomad_driver_virt::config::decode_msgpack("plugin config", &bytes)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                    config.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
                }
                _ => {
                    let bytes = hcldec::encode_hcl(&task_spec, &body, &context)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    task::decode_and_validate(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
            }
            *checked.entry(kind).or_insert(0) += 1;
        }
    }
    assert!(
        checked.get("plugin").copied().unwrap_or(0) >= 1,
        "no plugin config in examples: {checked:?}"
    );
    assert!(
        checked.get("task").copied().unwrap_or(0) >= 4,
        "too few task configs in examples: {checked:?}"
    );
    plugin.kill().await.expect("exit");
}

/// A value for every attribute and one of every block, as Nomad would encode
/// a config that sets everything.
fn full_sample(spec: &Spec) -> CtyValue {
    match spec {
        Spec::Object(fields) => CtyValue::map(
            fields
                .iter()
                .map(|(key, child)| (key.clone(), full_sample(child))),
        ),
        Spec::Array(items) => CtyValue::List(items.iter().map(full_sample).collect()),
        Spec::Attr { ty, .. } => sample_of_type(ty),
        Spec::BlockAttrs { ty, .. } => CtyValue::map([("key", sample_of_type(ty))]),
        Spec::Block { nested, .. } => full_sample(nested),
        Spec::BlockList { nested, .. } | Spec::BlockSet { nested, .. } => {
            CtyValue::List(vec![full_sample(nested)])
        }
        Spec::BlockMap { labels, nested, .. } => {
            let mut value = full_sample(nested);
            for label in labels.iter().rev() {
                value = CtyValue::map([(format!("sample-{label}"), value)]);
            }
            value
        }
        Spec::Default { primary, .. } => full_sample(primary),
        Spec::Literal(_) => CtyValue::string("literal"),
    }
}

fn sample_of_type(ty: &str) -> CtyValue {
    match ty {
        "string" => CtyValue::string("sample"),
        "bool" => CtyValue::Bool(true),
        "number" | "any" => CtyValue::int(1),
        list if list.starts_with("list(") || list.starts_with("set(") => {
            CtyValue::List(vec![sample_of_type(
                &list[list.find('(').unwrap_or(0) + 1..list.len() - 1],
            )])
        }
        map if map.starts_with("map(") => {
            CtyValue::map([("key", sample_of_type(&map[4..map.len() - 1]))])
        }
        other => panic!("sample generator does not know type {other}"),
    }
}

/// The key structure of a value: objects by key, lists by first element.
fn shape_of_cty(value: &CtyValue) -> Shape {
    match value {
        CtyValue::Map(entries) => Shape::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), shape_of_cty(v)))
                .collect(),
        ),
        CtyValue::List(items) => items.first().map(shape_of_cty).unwrap_or(Shape::Leaf),
        _ => Shape::Leaf,
    }
}

fn shape_of_json(value: &serde_json::Value) -> Shape {
    match value {
        serde_json::Value::Object(entries) => Shape::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), shape_of_json(v)))
                .collect(),
        ),
        serde_json::Value::Array(items) => items.first().map(shape_of_json).unwrap_or(Shape::Leaf),
        _ => Shape::Leaf,
    }
}

#[derive(Debug, PartialEq)]
enum Shape {
    Leaf,
    Object(BTreeMap<String, Shape>),
}

fn differences(schema: &Shape, typed: &Shape, path: &str, out: &mut Vec<String>) {
    if let (Shape::Object(left), Shape::Object(right)) = (schema, typed) {
        let keys: BTreeSet<&String> = left.keys().chain(right.keys()).collect();
        for key in keys {
            let child = format!("{path}.{key}");
            match (left.get(key), right.get(key)) {
                (Some(a), Some(b)) => differences(a, b, &child, out),
                (Some(_), None) => out.push(format!(
                    "{child} is in the schema but not in the typed config"
                )),
                (None, Some(_)) => out.push(format!(
                    "{child} is in the typed config but not in the schema"
                )),
                (None, None) => {}
            }
        }
    } else if schema != typed {
        out.push(format!(
            "{path}: schema shape {schema:?} differs from typed shape {typed:?}"
        ));
    }
}

fn assert_no_drift<T>(spec: &Spec, what: &'static str)
where
    T: serde::de::DeserializeOwned + serde::Serialize + Default,
{
    let sample = full_sample(spec);
    let typed: T = nomad_driver_virt::config::decode_msgpack(what, &sample.to_msgpack())
        .unwrap_or_else(|e| {
            panic!("{what}: a config using every schema field does not decode: {e}")
        });
    let json = serde_json::to_value(&typed).expect("serialise typed config");
    let mut problems = Vec::new();
    differences(
        &shape_of_cty(&sample),
        &shape_of_json(&json),
        what,
        &mut problems,
    );
    assert!(
        problems.is_empty(),
        "schema and typed config drifted:\n{}",
        problems.join("\n")
    );
}

#[test]
fn task_schema_and_type_cannot_drift() {
    assert_no_drift::<TaskConfig>(&task::schema(), "task config");
}

#[test]
fn plugin_schema_and_type_cannot_drift() {
    assert_no_drift::<PluginConfig>(
        &nomad_driver_virt::config::plugin::schema(),
        "plugin config",
    );
}

#[test]
fn drift_detector_catches_a_schema_only_field() {
    let Spec::Object(mut fields) = task::schema() else {
        panic!("object schema")
    };
    fields.insert("surplus".into(), Spec::attr("string"));
    let sample = full_sample(&Spec::Object(fields));
    let result = nomad_driver_virt::config::decode_msgpack::<TaskConfig>(
        "task config",
        &sample.to_msgpack(),
    );
    assert!(
        result.is_err(),
        "a field only in the schema must fail decoding"
    );
}

#[test]
fn drift_detector_catches_a_type_only_field() {
    let Spec::Object(mut fields) = task::schema() else {
        panic!("object schema")
    };
    fields.remove("timezone");
    let sample = full_sample(&Spec::Object(fields));
    let typed: TaskConfig =
        nomad_driver_virt::config::decode_msgpack("task config", &sample.to_msgpack())
            .expect("decodes");
    let json = serde_json::to_value(&typed).expect("json");
    let mut problems = Vec::new();
    differences(
        &shape_of_cty(&sample),
        &shape_of_json(&json),
        "task config",
        &mut problems,
    );
    assert_eq!(
        problems,
        vec!["task config.timezone is in the typed config but not in the schema".to_string()]
    );
}
