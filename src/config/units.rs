//! Lenient decoding of values whose msgpack form varies: Nomad sends whole
//! numbers as ints, exact fractions as float64 and inexact ones as strings.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// A byte size as written by a job author: `10737418240`, `"10GiB"`, `"20GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ByteSize(pub u64);

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

const SIZE_HELP: &str =
    "a whole number of bytes or a size such as \"512MiB\", \"10GiB\" or \"20GB\"";

impl<'de> Visitor<'de> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SIZE_HELP)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<ByteSize, E> {
        u64::try_from(value)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("{value} is negative; expected {SIZE_HELP}")))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<ByteSize, E> {
        if value.fract() == 0.0 && value >= 0.0 && value <= u64::MAX as f64 {
            Ok(ByteSize(value as u64))
        } else {
            Err(E::custom(format!(
                "{value} is not a whole number of bytes; expected {SIZE_HELP}"
            )))
        }
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<ByteSize, E> {
        parse_size(value).map(ByteSize).map_err(E::custom)
    }
}

/// Parses `"10GiB"`, `"20GB"`, `"512M"`, `"1.5GiB"`, `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000u64.pow(2),
        "g" | "gb" => 1000u64.pow(3),
        "t" | "tb" => 1000u64.pow(4),
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit; expected {SIZE_HELP}"
            ))
        }
    };
    // Exact decimal arithmetic: "1.5GiB" is 15 * 2^30 / 10, which must be whole.
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') || fraction.len() > 9 {
        return Err(format!(
            "{text:?} has no valid number; expected {SIZE_HELP}"
        ));
    }
    let digits = |part: &str| -> Option<u128> {
        if part.is_empty() {
            Some(0)
        } else {
            part.parse().ok()
        }
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let bytes = digits(whole)
        .zip(digits(fraction))
        .and_then(|(whole, fraction)| whole.checked_mul(scale)?.checked_add(fraction))
        .and_then(|scaled| scaled.checked_mul(u128::from(multiplier)))
        .filter(|total| total % scale == 0)
        .and_then(|total| u64::try_from(total / scale).ok());
    bytes.ok_or_else(|| {
        format!(
            "{text:?} is not a whole number of bytes that fits in 64 bits; expected {SIZE_HELP}"
        )
    })
}

/// Parses a Go-style duration such as `"90s"`, `"2m"`, `"1m30s"`, `"500ms"`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let help = || format!("{text:?} is not a duration such as \"90s\", \"2m\" or \"1m30s\"");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(help());
    }
    let mut total = std::time::Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(help());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| help())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => std::time::Duration::from_millis(number),
            "s" => std::time::Duration::from_secs(number),
            "m" => std::time::Duration::from_secs(number.saturating_mul(60)),
            "h" => std::time::Duration::from_secs(number.saturating_mul(3600)),
            _ => return Err(help()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        use std::time::Duration;
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "10", "1.5s", "-3s", "3 s", "1x"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("20GB"), Ok(20_000_000_000));
        assert_eq!(parse_size("512M"), Ok(512_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("7b"), Ok(7));
    }

    #[test]
    fn bad_sizes_are_rejected_with_help() {
        for bad in [
            "",
            "GiB",
            "10XB",
            "1.2.3G",
            "0.1",
            "99999999999999999999",
            "18446744073709551615KiB",
            "-5",
        ] {
            let error = parse_size(bad).expect_err(bad);
            assert!(error.contains("expected"), "{bad}: {error}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_size_never_panics(text in ".{0,40}") {
            let _ = parse_size(&text);
        }
    }
}
