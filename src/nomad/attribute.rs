//! Builders for fingerprint attributes, and how Nomad renders them.

use crate::pb::hashicorp::nomad::plugins::shared::structs::attribute::Value;
use crate::pb::hashicorp::nomad::plugins::shared::structs::Attribute;

pub fn string(value: &str) -> Attribute {
    Attribute {
        value: Some(Value::StringVal(value.to_string())),
        unit: String::new(),
    }
}

pub fn bool(value: bool) -> Attribute {
    Attribute {
        value: Some(Value::BoolVal(value)),
        unit: String::new(),
    }
}

pub fn int(value: i64) -> Attribute {
    Attribute {
        value: Some(Value::IntVal(value)),
        unit: String::new(),
    }
}

/// The text `nomad node status` shows for an attribute (Go's GoString:
/// value then unit with no space; unset renders empty).
pub fn render(attribute: &Attribute) -> String {
    let value = match &attribute.value {
        None => return String::new(),
        Some(Value::StringVal(text)) => text.clone(),
        Some(Value::BoolVal(flag)) => flag.to_string(),
        Some(Value::IntVal(number)) => number.to_string(),
        Some(Value::FloatVal(number)) => number.to_string(),
    };
    format!("{value}{}", attribute.unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_matches_nomad() {
        assert_eq!(render(&bool(true)), "true");
        assert_eq!(render(&int(9_000_000)), "9000000");
        assert_eq!(
            render(&Attribute {
                value: Some(Value::IntVal(5)),
                unit: "MiB".into()
            }),
            "5MiB"
        );
        assert_eq!(
            render(&Attribute {
                value: None,
                unit: String::new()
            }),
            ""
        );
    }
}
