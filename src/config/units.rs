//! Units in configs: byte sizes (decoded leniently, because Nomad sends whole
//! numbers as ints, exact fractions as float64 and inexact ones as strings)
//! and Go durations (Go's `time.ParseDuration` grammar, as Nomad reads them).

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
        // 2^64 itself is out of range: `as` would saturate it to u64::MAX.
        if value.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&value) {
            Ok(ByteSize(value as u64))
        } else {
            Err(E::custom(format!(
                "{value} is not a whole number of bytes; expected {SIZE_HELP}"
            )))
        }
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<ByteSize, E> {
        value.parse().map_err(E::custom)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(text: &str) -> Result<Self, SizeError> {
        parse_size(text).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

/// Why a text is not a byte size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} has an unknown unit; expected {SIZE_HELP}")]
    UnknownUnit(String),
    #[error("{0:?} has no valid number; expected {SIZE_HELP}")]
    NoNumber(String),
    #[error("{0:?} is not a whole number of bytes that fits in 64 bits; expected {SIZE_HELP}")]
    OutOfRange(String),
}

/// Parses `"10GiB"`, `"20GB"`, `"512M"`, `"1.5GiB"`, `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
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
        _ => return Err(SizeError::UnknownUnit(text.to_string())),
    };
    // Exact decimal arithmetic: "1.5GiB" is 15 * 2^30 / 10, which must be whole.
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') || fraction.len() > 9 {
        return Err(SizeError::NoNumber(text.to_string()));
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
    bytes.ok_or_else(|| SizeError::OutOfRange(text.to_string()))
}

/// Why a text is not a Go duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration such as \"90s\", \"1.5h\" or \"2m30s\" (units ns, us, ms, s, m, h)")]
    Invalid(String),
    #[error("{text:?} is missing a unit after a number; use ns, us, ms, s, m or h, e.g. \"90s\"")]
    MissingUnit { text: String },
    #[error("{text:?} has the unknown unit {unit:?}; use ns, us, ms, s, m or h")]
    UnknownUnit { text: String, unit: String },
    #[error("{0:?} is out of range; durations go up to 2562047h47m16.854775807s")]
    Overflow(String),
    #[error("{0:?} is negative; give a duration of zero or more, e.g. \"30s\"")]
    Negative(String),
}

/// A Go `time.Duration`: signed nanoseconds, parsed exactly like Go's
/// `time.ParseDuration` (the grammar Nomad uses for every duration it reads):
/// an optional sign, then one or more decimal numbers each with a unit
/// (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`), e.g. `1.5h`, `300ms`,
/// `2m30s`, `-1h`; `0` alone needs no unit. No spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub i64);

const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1000 * NANOSECOND;
const MILLISECOND: u64 = 1000 * MICROSECOND;
const SECOND: u64 = 1000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
/// 1<<63: the magnitude of the most negative duration.
const LIMIT: u64 = 1 << 63;

fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => NANOSECOND,
        // U+00B5 micro sign and U+03BC Greek small letter mu, as Go accepts.
        "us" | "\u{b5}s" | "\u{3bc}s" => MICROSECOND,
        "ms" => MILLISECOND,
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        _ => return None,
    })
}

impl GoDuration {
    /// Go's `time.ParseDuration`, step for step (including its float64
    /// rounding of fractions), so a value means here what it means to Nomad.
    pub fn parse(text: &str) -> Result<GoDuration, DurationError> {
        let invalid = || DurationError::Invalid(text.to_string());
        let overflow = || DurationError::Overflow(text.to_string());
        let mut rest = text.as_bytes();
        let mut negative = false;
        if let Some((&sign @ (b'-' | b'+'), tail)) = rest.split_first() {
            negative = sign == b'-';
            rest = tail;
        }
        if rest == b"0" {
            return Ok(GoDuration(0));
        }
        if rest.is_empty() {
            return Err(invalid());
        }
        let mut total: u64 = 0;
        while !rest.is_empty() {
            if !(rest[0] == b'.' || rest[0].is_ascii_digit()) {
                return Err(invalid());
            }
            // The integer part.
            let before = rest.len();
            let (mut value, tail) = leading_int(rest).ok_or_else(overflow)?;
            rest = tail;
            let had_integer = before != rest.len();
            // The fraction.
            let mut fraction = 0u64;
            let mut scale = 1.0f64;
            let mut had_fraction = false;
            if let Some((b'.', tail)) = rest.split_first() {
                let before = tail.len();
                let (f, s, tail) = leading_fraction(tail);
                fraction = f;
                scale = s;
                rest = tail;
                had_fraction = before != rest.len();
            }
            if !had_integer && !had_fraction {
                return Err(invalid());
            }
            // The unit: everything up to the next number.
            let unit_len = rest
                .iter()
                .position(|b| *b == b'.' || b.is_ascii_digit())
                .unwrap_or(rest.len());
            if unit_len == 0 {
                return Err(DurationError::MissingUnit {
                    text: text.to_string(),
                });
            }
            let (unit, tail) = rest.split_at(unit_len);
            rest = tail;
            let unit_text = String::from_utf8_lossy(unit);
            let unit = unit_nanos(&unit_text).ok_or_else(|| DurationError::UnknownUnit {
                text: text.to_string(),
                unit: unit_text.to_string(),
            })?;
            if value > LIMIT / unit {
                return Err(overflow());
            }
            value *= unit;
            if fraction > 0 {
                // Go: v += uint64(float64(f) * (float64(unit) / scale)).
                #[allow(
                    clippy::cast_precision_loss,
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss
                )]
                let part = (fraction as f64 * (unit as f64 / scale)) as u64;
                value = value.checked_add(part).ok_or_else(overflow)?;
                if value > LIMIT {
                    return Err(overflow());
                }
            }
            total = total.checked_add(value).ok_or_else(overflow)?;
            if total > LIMIT {
                return Err(overflow());
            }
        }
        if negative {
            // total <= 1<<63, so the negation fits in i64.
            return Ok(GoDuration(0i64.wrapping_sub_unsigned(total)));
        }
        i64::try_from(total).map(GoDuration).map_err(|_| overflow())
    }

    /// The duration as a `std::time::Duration`, if it is not negative.
    pub fn to_std(self) -> Option<std::time::Duration> {
        u64::try_from(self.0)
            .ok()
            .map(std::time::Duration::from_nanos)
    }
}

/// Go's `Duration.String`: `1h2m3.5s`, `1.5ms`, `0s`; parses back to itself.
impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// `whole[.fraction]` with the fraction's trailing zeros dropped.
        fn decimal(f: &mut fmt::Formatter<'_>, value: u64, digits: u32) -> fmt::Result {
            let scale = 10u64.pow(digits);
            write!(f, "{}", value / scale)?;
            let fraction = value % scale;
            if fraction != 0 {
                let text = format!("{fraction:0width$}", width = digits as usize);
                write!(f, ".{}", text.trim_end_matches('0'))?;
            }
            Ok(())
        }
        if self.0 < 0 {
            f.write_str("-")?;
        }
        let nanos = self.0.unsigned_abs();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos < SECOND {
            let (digits, unit) = if nanos < MICROSECOND {
                (0, "ns")
            } else if nanos < MILLISECOND {
                (3, "\u{b5}s")
            } else {
                (6, "ms")
            };
            decimal(f, nanos, digits)?;
            return f.write_str(unit);
        }
        let seconds = nanos / SECOND;
        let (hours, minutes) = (seconds / 3600, seconds / 60 % 60);
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if hours > 0 || minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        decimal(f, seconds % 60 * SECOND + nanos % SECOND, 9)?;
        f.write_str("s")
    }
}

impl std::str::FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(text: &str) -> Result<Self, DurationError> {
        Self::parse(text)
    }
}

/// Go's `leadingInt`: the leading digits as a number up to 1<<63; `None` on overflow.
fn leading_int(text: &[u8]) -> Option<(u64, &[u8])> {
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut value: u64 = 0;
    for digit in &text[..digits] {
        if value > LIMIT / 10 {
            return None;
        }
        value = value * 10 + u64::from(digit - b'0');
        if value > LIMIT {
            return None;
        }
    }
    Some((value, &text[digits..]))
}

/// Go's `leadingFraction`: the leading digits as `value / scale`, dropping
/// the digits that would overflow (they cannot change the result).
fn leading_fraction(text: &[u8]) -> (u64, f64, &[u8]) {
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut value: u64 = 0;
    let mut scale = 1.0f64;
    let mut overflowed = false;
    for digit in &text[..digits] {
        if overflowed {
            continue;
        }
        if value > (LIMIT - 1) / 10 {
            overflowed = true;
            continue;
        }
        let next = value * 10 + u64::from(digit - b'0');
        if next > LIMIT {
            overflowed = true;
            continue;
        }
        value = next;
        scale *= 10.0;
    }
    (value, scale, &text[digits..])
}

/// Parses a Go duration that must not be negative (timeouts).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, DurationError> {
    GoDuration::parse(text)?
        .to_std()
        .ok_or_else(|| DurationError::Negative(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        use std::time::Duration;
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "10", "-3s", "3 s", " 3s", "1x", "1d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_duration("-3s"),
            Err(DurationError::Negative("-3s".into()))
        );
        assert!(matches!(
            parse_duration("10"),
            Err(DurationError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_duration("1d"),
            Err(DurationError::UnknownUnit { ref unit, .. }) if unit == "d"
        ));
    }

    /// Go's own table, `parseDurationTests` in src/time/time_test.go.
    #[test]
    fn go_parse_duration_table() {
        const NS: i64 = 1;
        const US: i64 = 1000 * NS;
        const MS: i64 = 1000 * US;
        const S: i64 = 1000 * MS;
        const M: i64 = 60 * S;
        const H: i64 = 60 * M;
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            // sign
            ("-5s", -5 * S),
            ("+5s", 5 * S),
            ("-0", 0),
            ("+0", 0),
            // decimal
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            // different units
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12\u{b5}s", 12 * US),
            ("12\u{3bc}s", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            // composite durations
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
            (
                "1h2m3s4ms5us6ns",
                H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
            ),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            // large value
            ("52763797000ns", 52_763_797_000 * NS),
            // more than 9 digits after the decimal point (golang.org/issue/6617)
            ("0.3333333333333333333h", 20 * M),
            // 1<<53+1 cannot be stored precisely in a float64
            ("9007199254740993ns", (1 << 53) + 1),
            // largest duration that can be represented by int64 in nanoseconds
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-9223372036s854ms775us808ns", i64::MIN),
            // largest negative round trip value (golang.org/issue/48629)
            ("-2562047h47m16.854775808s", i64::MIN),
            // huge string (golang.org/issue/15011)
            ("0.100000000000000000000h", 6 * M),
            // the first overflow check in leadingFraction
            (
                "0.830103483285477580265470936856h",
                49 * M + 48 * S + 372_539_827 * NS,
            ),
        ];
        for (text, nanos) in cases {
            assert_eq!(GoDuration::parse(text), Ok(GoDuration(*nanos)), "{text}");
        }
        // Go's `Duration.String` outputs (durationTests in time_test.go).
        for (text, nanos) in [
            ("0s", 0),
            ("1ns", 1),
            ("1.1\u{b5}s", 1100),
            ("2.2ms", 2_200_000),
            ("3.3s", 3_300_000_000),
            ("4m5s", 4 * M + 5 * S),
            ("4m5.001s", 4 * M + 5001 * MS),
            ("5h6m7.001s", 5 * H + 6 * M + 7001 * MS),
            ("8m0.000000001s", 8 * M + 1),
            ("2562047h47m16.854775807s", i64::MAX),
            ("-2562047h47m16.854775808s", i64::MIN),
        ] {
            assert_eq!(GoDuration(nanos).to_string(), text);
        }
        for bad in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "\u{85}\u{85}",
            "\u{ff}ff",
            "hello \u{ff}ff world",
            "9223372036854775808ns",
            "9223372036854775.808us",
            "9223372036854ms775us808ns",
            "-9223372036854775809ns",
        ] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn float_sizes_stop_below_two_to_the_64() {
        let decode = |value: f64| {
            let mut bytes = Vec::new();
            rmp::encode::write_f64(&mut bytes, value).expect("write");
            rmp_serde::from_slice::<ByteSize>(&bytes)
        };
        assert_eq!(decode(4096.0).expect("whole"), ByteSize(4096));
        assert_eq!(
            decode(9_007_199_254_740_992.0).expect("2^53"),
            ByteSize(1 << 53)
        );
        for bad in [
            18_446_744_073_709_551_616.0,
            -1.0,
            1.5,
            f64::NAN,
            f64::INFINITY,
        ] {
            assert!(decode(bad).is_err(), "{bad}");
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
            let error = parse_size(bad).expect_err(bad).to_string();
            assert!(error.contains("expected"), "{bad}: {error}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_size_never_panics(text in ".{0,40}") {
            let _ = parse_size(&text);
        }

        #[test]
        fn parse_size_never_panics_on_numbers(
            whole in "[0-9]{0,30}",
            fraction in "[0-9]{0,12}",
            unit in "(|b|k|kb|m|mb|g|gb|t|tb|ki|kib|mi|mib|gi|gib|ti|tib)",
        ) {
            let _ = parse_size(&format!("{whole}.{fraction}{unit}"));
            let _ = parse_size(&format!("{whole}{unit}"));
        }

        #[test]
        fn go_durations_never_panic(text in "[-+]?([0-9.]{0,25}(ns|us|ms|s|m|h|x)?){0,4}") {
            let _ = GoDuration::parse(&text);
        }

        #[test]
        fn go_durations_print_and_parse_back(nanos in proptest::num::i64::ANY) {
            let duration = GoDuration(nanos);
            proptest::prop_assert_eq!(GoDuration::parse(&duration.to_string()), Ok(duration));
        }

        #[test]
        fn go_durations_never_panic_on_anything(text in ".{0,40}") {
            let _ = GoDuration::parse(&text);
        }

        #[test]
        fn whole_seconds_round_trip(seconds in 0u64..=9_223_372_036) {
            let parsed = GoDuration::parse(&format!("{seconds}s"));
            proptest::prop_assert_eq!(parsed, Ok(GoDuration(i64::try_from(seconds * 1_000_000_000).unwrap_or(i64::MAX))));
        }
    }
}
