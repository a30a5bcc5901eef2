//! The proto form of the hclspec schemas built in `config::hclspec`: the
//! driver advertises a [`Spec`] converted to proto; the Nomad-client
//! simulator converts an advertised proto spec back and encodes HCL against
//! it.

pub use crate::config::hclspec::Spec;

use crate::pb::hashicorp::nomad::plugins::shared::hclspec as proto;

impl From<&Spec> for proto::Spec {
    fn from(spec: &Spec) -> Self {
        use proto::spec::Block as Kind;
        let boxed = |nested: &Spec| Some(Box::new(proto::Spec::from(nested)));
        let kind = match spec {
            Spec::Object(fields) => Kind::Object(proto::Object {
                attributes: fields
                    .iter()
                    .map(|(key, value)| (key.clone(), value.into()))
                    .collect(),
            }),
            Spec::Array(values) => Kind::Array(proto::Array {
                values: values.iter().map(Into::into).collect(),
            }),
            Spec::Attr { name, ty, required } => Kind::Attr(proto::Attr {
                name: name.clone(),
                r#type: ty.clone(),
                required: *required,
            }),
            Spec::Block {
                name,
                required,
                nested,
            } => Kind::BlockValue(Box::new(proto::Block {
                name: name.clone(),
                required: *required,
                nested: boxed(nested),
            })),
            Spec::BlockAttrs { name, ty, required } => Kind::BlockAttrs(proto::BlockAttrs {
                name: name.clone(),
                r#type: ty.clone(),
                required: *required,
            }),
            Spec::BlockList {
                name,
                min_items,
                max_items,
                nested,
            } => Kind::BlockList(Box::new(proto::BlockList {
                name: name.clone(),
                min_items: *min_items,
                max_items: *max_items,
                nested: boxed(nested),
            })),
            Spec::BlockSet {
                name,
                min_items,
                max_items,
                nested,
            } => Kind::BlockSet(Box::new(proto::BlockSet {
                name: name.clone(),
                min_items: *min_items,
                max_items: *max_items,
                nested: boxed(nested),
            })),
            Spec::BlockMap {
                name,
                labels,
                nested,
            } => Kind::BlockMap(Box::new(proto::BlockMap {
                name: name.clone(),
                labels: labels.clone(),
                nested: boxed(nested),
            })),
            Spec::Default { primary, default } => Kind::Default(Box::new(proto::Default {
                primary: boxed(primary),
                default: boxed(default),
            })),
            Spec::Literal(value) => Kind::Literal(proto::Literal {
                value: value.clone(),
            }),
        };
        proto::Spec { block: Some(kind) }
    }
}

/// A proto spec that cannot be used: an empty oneof or a missing nested spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hclspec at {path}: {problem}")]
pub struct SpecError {
    pub path: String,
    pub problem: String,
}

impl TryFrom<&proto::Spec> for Spec {
    type Error = SpecError;

    fn try_from(spec: &proto::Spec) -> Result<Self, SpecError> {
        from_proto(spec, "spec")
    }
}

fn from_proto(spec: &proto::Spec, path: &str) -> Result<Spec, SpecError> {
    use proto::spec::Block as Kind;
    let nested = |nested: &Option<Box<proto::Spec>>, name: &str| -> Result<Box<Spec>, SpecError> {
        let child_path = format!("{path}.{name}");
        match nested {
            Some(child) => Ok(Box::new(from_proto(child, &child_path)?)),
            None => Err(SpecError {
                path: child_path,
                problem: "nested spec is missing".into(),
            }),
        }
    };
    Ok(match &spec.block {
        None => {
            return Err(SpecError {
                path: path.into(),
                problem: "spec has no kind set".into(),
            })
        }
        Some(Kind::Object(object)) => Spec::Object(
            object
                .attributes
                .iter()
                .map(|(key, value)| Ok((key.clone(), from_proto(value, &format!("{path}.{key}"))?)))
                .collect::<Result<_, SpecError>>()?,
        ),
        Some(Kind::Array(array)) => Spec::Array(
            array
                .values
                .iter()
                .enumerate()
                .map(|(index, value)| from_proto(value, &format!("{path}[{index}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::Attr(attr)) => Spec::Attr {
            name: attr.name.clone(),
            ty: attr.r#type.clone(),
            required: attr.required,
        },
        Some(Kind::BlockValue(block)) => Spec::Block {
            name: block.name.clone(),
            required: block.required,
            nested: nested(&block.nested, &block.name)?,
        },
        Some(Kind::BlockAttrs(block)) => Spec::BlockAttrs {
            name: block.name.clone(),
            ty: block.r#type.clone(),
            required: block.required,
        },
        Some(Kind::BlockList(block)) => Spec::BlockList {
            name: block.name.clone(),
            min_items: block.min_items,
            max_items: block.max_items,
            nested: nested(&block.nested, &block.name)?,
        },
        Some(Kind::BlockSet(block)) => Spec::BlockSet {
            name: block.name.clone(),
            min_items: block.min_items,
            max_items: block.max_items,
            nested: nested(&block.nested, &block.name)?,
        },
        Some(Kind::BlockMap(block)) => {
            if block.labels.is_empty() {
                return Err(SpecError {
                    path: path.into(),
                    problem: "block_map needs at least one label".into(),
                });
            }
            Spec::BlockMap {
                name: block.name.clone(),
                labels: block.labels.clone(),
                nested: nested(&block.nested, &block.name)?,
            }
        }
        Some(Kind::Default(default)) => Spec::Default {
            primary: nested(&default.primary, "primary")?,
            default: nested(&default.default, "default")?,
        },
        Some(Kind::Literal(literal)) => Spec::Literal(literal.value.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_keeps_every_node() {
        let spec = Spec::object([
            ("a", Spec::attr("string")),
            ("b", Spec::attr_with_default("b", "number", "10")),
            (
                "c",
                Spec::block_list(Spec::object([("d", Spec::required_attr("bool"))])),
            ),
            (
                "e",
                Spec::block_map("name", Spec::object([("f", Spec::attr("list(string)"))])),
            ),
            (
                "g",
                Spec::block(Spec::Array(vec![Spec::Literal("1".into())])),
            ),
            (
                "h",
                Spec::BlockAttrs {
                    name: String::new(),
                    ty: "string".into(),
                    required: false,
                },
            ),
            (
                "i",
                Spec::BlockSet {
                    name: String::new(),
                    min_items: 1,
                    max_items: 2,
                    nested: Box::new(Spec::attr("any")),
                },
            ),
        ]);
        let wire = proto::Spec::from(&spec);
        assert_eq!(Spec::try_from(&wire), Ok(spec));
    }

    #[test]
    fn empty_proto_spec_is_an_error() {
        let error = Spec::try_from(&proto::Spec { block: None }).expect_err("empty");
        assert_eq!(error.path, "spec");
    }
}
