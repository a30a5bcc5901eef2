//! The HCL schema language Nomad uses to decode plugin and task config
//! (`hclspec.Spec`), as a Rust value we can build, compare and walk.
//!
//! The config types build their schemas with these helpers, next to the
//! types themselves; `nomad::hclspec` converts them to and from the proto the
//! driver advertises.

use std::collections::BTreeMap;

/// One node of an hclspec schema. Names mirror Nomad's `hcl_spec.proto`.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// An object whose keys are output keys; a child with an empty name takes the key as its name.
    Object(BTreeMap<String, Spec>),
    /// A tuple of specs.
    Array(Vec<Spec>),
    /// An attribute `name = value` of HCL type expression `ty`.
    Attr {
        name: String,
        ty: String,
        required: bool,
    },
    /// A single optional or required block.
    Block {
        name: String,
        required: bool,
        nested: Box<Spec>,
    },
    /// A block whose attributes form a map of type `ty`.
    BlockAttrs {
        name: String,
        ty: String,
        required: bool,
    },
    /// Repeated blocks decoded into a list.
    BlockList {
        name: String,
        min_items: u64,
        max_items: u64,
        nested: Box<Spec>,
    },
    /// Repeated blocks decoded into a set.
    BlockSet {
        name: String,
        min_items: u64,
        max_items: u64,
        nested: Box<Spec>,
    },
    /// Labelled blocks decoded into (nested) maps keyed by label.
    BlockMap {
        name: String,
        labels: Vec<String>,
        nested: Box<Spec>,
    },
    /// `primary`, or `default` when `primary` yields null.
    Default {
        primary: Box<Spec>,
        default: Box<Spec>,
    },
    /// An HCL expression, e.g. `"\"bash\""` or `10`.
    Literal(String),
}

impl Spec {
    /// An object from `(key, spec)` pairs.
    pub fn object<K: Into<String>>(fields: impl IntoIterator<Item = (K, Spec)>) -> Spec {
        Spec::Object(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// An optional attribute named by its object key.
    pub fn attr(ty: &str) -> Spec {
        Spec::Attr {
            name: String::new(),
            ty: ty.to_string(),
            required: false,
        }
    }

    /// A required attribute named by its object key.
    pub fn required_attr(ty: &str) -> Spec {
        Spec::Attr {
            name: String::new(),
            ty: ty.to_string(),
            required: true,
        }
    }

    /// An attribute with a default value. Inside `Default` no name is implied,
    /// so the attribute carries its name explicitly.
    pub fn attr_with_default(name: &str, ty: &str, literal: &str) -> Spec {
        Spec::Default {
            primary: Box::new(Spec::Attr {
                name: name.to_string(),
                ty: ty.to_string(),
                required: false,
            }),
            default: Box::new(Spec::Literal(literal.to_string())),
        }
    }

    /// An optional single block named by its object key.
    pub fn block(nested: Spec) -> Spec {
        Spec::Block {
            name: String::new(),
            required: false,
            nested: Box::new(nested),
        }
    }

    /// A list of blocks named by its object key, with no item limits.
    pub fn block_list(nested: Spec) -> Spec {
        Spec::BlockList {
            name: String::new(),
            min_items: 0,
            max_items: 0,
            nested: Box::new(nested),
        }
    }

    /// Blocks with one label, decoded into a map keyed by that label.
    pub fn block_map(label: &str, nested: Spec) -> Spec {
        Spec::BlockMap {
            name: String::new(),
            labels: vec![label.to_string()],
            nested: Box::new(nested),
        }
    }

    /// The explicit name of this node, if it names anything.
    pub fn explicit_name(&self) -> Option<&str> {
        match self {
            Spec::Attr { name, .. }
            | Spec::Block { name, .. }
            | Spec::BlockAttrs { name, .. }
            | Spec::BlockList { name, .. }
            | Spec::BlockSet { name, .. }
            | Spec::BlockMap { name, .. } => Some(name.as_str()),
            _ => None,
        }
    }
}
