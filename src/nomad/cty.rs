//! cty values as Nomad's hcldec produces them, and their msgpack encoding
//! byte-for-byte as `zclconf/go-cty` `cty/msgpack.Marshal` writes it
//! (vmihailenco/msgpack v5: compact ints on, compact floats off).
//!
//! Types are erased here: the encoding of a known value does not depend on its
//! cty type, so lists, sets and tuples are all [`CtyValue::List`] and maps and
//! objects are both [`CtyValue::Map`]. The decoder that needs types for
//! conversions keeps them itself (`nomad_client::hcldec`).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use rmp::encode::{self, ByteBuf, ValueWriteError};

/// A known cty value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtyValue {
    /// A null of any type; encoded as msgpack nil.
    Null,
    Bool(bool),
    Number(CtyNumber),
    String(String),
    /// A list, set or tuple, in cty iteration order (sets already ordered).
    List(Vec<CtyValue>),
    /// A map or object. `BTreeMap<String, _>` iterates in Go byte order,
    /// which is the order cty emits keys in.
    Map(BTreeMap<String, CtyValue>),
}

impl CtyValue {
    /// A string value.
    pub fn string(s: impl Into<String>) -> CtyValue {
        CtyValue::String(s.into())
    }

    /// A number value from an integer.
    pub fn int(i: i64) -> CtyValue {
        CtyValue::Number(CtyNumber::from(i))
    }

    /// A map/object value from `(key, value)` pairs.
    pub fn map<K: Into<String>>(entries: impl IntoIterator<Item = (K, CtyValue)>) -> CtyValue {
        CtyValue::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// The msgpack encoding of this value; see [`to_msgpack`].
    pub fn to_msgpack(&self) -> Vec<u8> {
        to_msgpack(self)
    }
}

/// Largest decimal exponent accepted. go's big.Float allows far more, but a
/// number like `1e999999999` would print as a gigabyte of digits.
const MAX_DECIMAL_EXP: i64 = 100_000;

/// A cty number: an arbitrary-precision decimal (or an infinity), kept in
/// normalised form so that derived equality is numeric equality.
///
/// go-cty holds numbers as 512-bit binary floats parsed from decimal text;
/// for inputs of fewer than ~150 significant digits that float and this
/// decimal print identically and classify identically for encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CtyNumber(Num);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Num {
    /// `(-1)^negative × digits × 10^exp`; `digits` is ASCII without leading or
    /// trailing zeros, empty for zero (zero is never negative).
    Finite {
        negative: bool,
        digits: String,
        exp: i64,
    },
    Infinity {
        negative: bool,
    },
}

/// The error cty gives when a string is not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a number is required")]
pub struct ParseNumberError;

impl CtyNumber {
    /// Positive or negative infinity.
    pub fn infinity(negative: bool) -> CtyNumber {
        CtyNumber(Num::Infinity { negative })
    }

    /// The number an `f64` holds, taken as its shortest round-trip decimal
    /// (so `0.1_f64` is the decimal 0.1, as the HCL source spelled it).
    /// `None` for NaN.
    pub fn from_f64(f: f64) -> Option<CtyNumber> {
        if f.is_nan() {
            None
        } else if f.is_infinite() {
            Some(CtyNumber::infinity(f < 0.0))
        } else {
            // Display never uses exponent notation and always round-trips.
            format!("{f}").parse().ok()
        }
    }

    fn finite(negative: bool, digits: &str, exp: i64) -> CtyNumber {
        let trimmed = digits.trim_start_matches('0');
        let kept = trimmed.trim_end_matches('0');
        let exp = exp + (trimmed.len() - kept.len()) as i64;
        if kept.is_empty() {
            return CtyNumber(Num::Finite {
                negative: false,
                digits: String::new(),
                exp: 0,
            });
        }
        CtyNumber(Num::Finite {
            negative,
            digits: kept.to_string(),
            exp,
        })
    }

    /// True for finite numbers without a fractional part.
    pub fn is_integer(&self) -> bool {
        matches!(&self.0, Num::Finite { exp, .. } if *exp >= 0)
    }

    /// The value as an `i64` if it is exactly one (go's `big.Float.Int64`
    /// with `big.Exact`).
    pub fn as_i64(&self) -> Option<i64> {
        let Num::Finite {
            negative,
            digits,
            exp,
        } = &self.0
        else {
            return None;
        };
        if *exp < 0 || digits.len() as i64 + exp > 19 {
            return None;
        }
        let mut magnitude: i128 = 0;
        for b in digits.bytes() {
            magnitude = magnitude * 10 + i128::from(b - b'0');
        }
        for _ in 0..*exp {
            magnitude *= 10;
        }
        let value = if *negative { -magnitude } else { magnitude };
        i64::try_from(value).ok()
    }

    /// The value as an `f64` when it is a non-integer that binary64 holds
    /// exactly, the case go-cty encodes as a msgpack float64.
    pub fn as_exact_fraction_f64(&self) -> Option<f64> {
        let Num::Finite { digits, exp, .. } = &self.0 else {
            return None;
        };
        if *exp >= 0 {
            return None;
        }
        // digits / 10^k is a binary fraction m / 2^k only if 5^k divides
        // digits; it then fits binary64 iff m < 2^53 and 2^-k is not below the
        // smallest subnormal.
        let k = exp.unsigned_abs();
        if k > 1074 {
            return None;
        }
        let mut m: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
        let mut left = k;
        while left > 0 {
            let step = left.min(27); // 5^27 < 2^63
            m = div_exact(&m, 5u64.pow(step as u32))?;
            left -= step;
        }
        if m.len() > 16 {
            return None;
        }
        let m = m.iter().fold(0u64, |acc, d| acc * 10 + u64::from(*d));
        if m >= 1 << 53 {
            return None;
        }
        // The value is exactly representable, so correctly rounded parsing
        // returns it exactly.
        self.to_text().parse().ok()
    }

    /// The decimal text go prints with `big.Float.Text('f', -1)`: no
    /// exponent, no trailing zeros; infinities are `+Inf`/`-Inf`.
    pub fn to_text(&self) -> String {
        match &self.0 {
            Num::Infinity { negative: true } => "-Inf".to_string(),
            Num::Infinity { negative: false } => "+Inf".to_string(),
            Num::Finite { digits, .. } if digits.is_empty() => "0".to_string(),
            Num::Finite {
                negative,
                digits,
                exp,
            } => {
                let mut out = String::new();
                if *negative {
                    out.push('-');
                }
                if *exp >= 0 {
                    out.push_str(digits);
                    out.extend(std::iter::repeat_n('0', *exp as usize));
                } else {
                    let point = digits.len() as i64 + exp;
                    if point > 0 {
                        let (int, frac) = digits.split_at(point as usize);
                        out.push_str(int);
                        out.push('.');
                        out.push_str(frac);
                    } else {
                        out.push_str("0.");
                        out.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
                        out.push_str(digits);
                    }
                }
                out
            }
        }
    }

    /// Text as go's `big.Float.String()` (`%.10g`), which cty uses in set
    /// hashes. Ties round half to even on the decimal digits.
    pub(crate) fn to_g10_text(&self) -> String {
        let (negative, digits, exp) = match &self.0 {
            Num::Infinity { .. } => return self.to_text(),
            Num::Finite { digits, .. } if digits.is_empty() => return "0".to_string(),
            Num::Finite {
                negative,
                digits,
                exp,
            } => (*negative, digits.as_bytes().to_vec(), *exp),
        };
        let (mant, point) = round_digits(&digits, digits.len() as i64 + exp, 10);
        let sign = if negative { "-" } else { "" };
        let x = point - 1; // exponent of the leading digit
        let mant = String::from_utf8_lossy(&mant).into_owned();
        if !(-4..10).contains(&x) {
            let (first, rest) = mant.split_at(1);
            let frac = if rest.is_empty() {
                String::new()
            } else {
                format!(".{rest}")
            };
            let esign = if x < 0 { '-' } else { '+' };
            format!("{sign}{first}{frac}e{esign}{:02}", x.unsigned_abs())
        } else {
            let n = CtyNumber::finite(negative, &mant, point - mant.len() as i64);
            n.to_text()
        }
    }
}

/// Round the digit string (value `0.d1d2... × 10^point`) to `prec`
/// significant digits, half to even, dropping trailing zeros.
fn round_digits(digits: &[u8], point: i64, prec: usize) -> (Vec<u8>, i64) {
    if digits.len() <= prec {
        return (digits.to_vec(), point);
    }
    let mut kept: Vec<u8> = digits[..prec].to_vec();
    let rest = &digits[prec..];
    let round_up = match rest[0].cmp(&b'5') {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => rest[1..].iter().any(|d| *d != b'0') || (kept[prec - 1] - b'0') % 2 == 1,
    };
    let mut point = point;
    if round_up {
        let mut i = prec;
        loop {
            if i == 0 {
                kept.insert(0, b'1');
                kept.pop();
                point += 1;
                break;
            }
            i -= 1;
            if kept[i] == b'9' {
                kept[i] = b'0';
            } else {
                kept[i] += 1;
                break;
            }
        }
    }
    while kept.last() == Some(&b'0') {
        kept.pop();
    }
    (kept, point)
}

/// `digits / divisor` if it divides exactly (digits are 0..=9 values).
fn div_exact(digits: &[u8], divisor: u64) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(digits.len());
    let mut rem: u128 = 0;
    for d in digits {
        rem = rem * 10 + u128::from(*d);
        let q = rem / u128::from(divisor);
        rem %= u128::from(divisor);
        if !(out.is_empty() && q == 0) {
            out.push(q as u8);
        }
    }
    (rem == 0).then_some(out)
}

impl FromStr for CtyNumber {
    type Err = ParseNumberError;

    /// Parses like cty's `ParseNumberVal` (go `big.ParseFloat` base 10):
    /// optional sign, digits with an optional point, optional `e` exponent,
    /// or `Inf`/`inf`. Base-2 `p` exponents are not supported.
    fn from_str(s: &str) -> Result<CtyNumber, ParseNumberError> {
        let (negative, body) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        if body == "Inf" || body == "inf" {
            return Ok(CtyNumber::infinity(negative));
        }
        let (mantissa, exponent) = match body.find(['e', 'E']) {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let (int, frac) = match mantissa.find('.') {
            Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
            None => (mantissa, ""),
        };
        let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
            return Err(ParseNumberError);
        }
        let exp = match exponent {
            None => 0,
            Some(e) => {
                let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
                if unsigned.is_empty() || !all_digits(unsigned) {
                    return Err(ParseNumberError);
                }
                e.parse::<i64>().map_err(|_| ParseNumberError)?
            }
        };
        let digits = format!("{int}{frac}");
        let n = CtyNumber::finite(negative, &digits, exp.saturating_sub(frac.len() as i64));
        if let Num::Finite { digits, exp, .. } = &n.0 {
            if exp.saturating_add(digits.len() as i64).abs() > MAX_DECIMAL_EXP
                || exp.abs() > MAX_DECIMAL_EXP
            {
                return Err(ParseNumberError);
            }
        }
        Ok(n)
    }
}

impl fmt::Display for CtyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl From<i64> for CtyNumber {
    fn from(i: i64) -> CtyNumber {
        CtyNumber::finite(i < 0, &i.unsigned_abs().to_string(), 0)
    }
}

impl From<u64> for CtyNumber {
    fn from(u: u64) -> CtyNumber {
        CtyNumber::finite(false, &u.to_string(), 0)
    }
}

impl Ord for CtyNumber {
    /// Numeric order (go `big.Float.Cmp`).
    fn cmp(&self, other: &CtyNumber) -> Ordering {
        fn rank(n: &Num) -> i8 {
            match n {
                Num::Infinity { negative: true } => -2,
                Num::Infinity { negative: false } => 2,
                Num::Finite { digits, .. } if digits.is_empty() => 0,
                Num::Finite { negative: true, .. } => -1,
                Num::Finite { .. } => 1,
            }
        }
        let (ra, rb) = (rank(&self.0), rank(&other.0));
        if ra != rb || ra.abs() != 1 {
            return ra.cmp(&rb);
        }
        let (
            Num::Finite {
                digits: da,
                exp: ea,
                ..
            },
            Num::Finite {
                digits: db,
                exp: eb,
                ..
            },
        ) = (&self.0, &other.0)
        else {
            return Ordering::Equal;
        };
        // Same sign and both non-zero: compare magnitudes, then flip for negatives.
        let magnitude = (da.len() as i64 + ea)
            .cmp(&(db.len() as i64 + eb))
            .then_with(|| da.as_bytes().cmp(db.as_bytes()));
        if ra < 0 {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

impl PartialOrd for CtyNumber {
    fn partial_cmp(&self, other: &CtyNumber) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Encodes `v` as go-cty's `msgpack.Marshal(v, v.Type())` does.
///
/// Numbers: exact int64 → smallest msgpack int (non-negatives always in the
/// unsigned forms); other exact binary64 fractions → float64; anything else
/// (e.g. `0.1`, integers beyond int64) → a msgpack string of the decimal text.
pub fn to_msgpack(v: &CtyValue) -> Vec<u8> {
    let mut out = ByteBuf::new();
    encode(v, &mut out);
    out.into_vec()
}

/// Writing into a `ByteBuf` cannot fail: its error type is uninhabited.
fn infallible<T>(result: Result<T, ValueWriteError<Infallible>>) -> T {
    match result {
        Ok(value) => value,
        Err(
            ValueWriteError::InvalidMarkerWrite(never) | ValueWriteError::InvalidDataWrite(never),
        ) => match never {},
    }
}

/// msgpack lengths are 32-bit. Nothing that long reaches us (the HCL it
/// comes from would be over 4 GiB); saturating keeps this total.
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

// rmp writes the compact forms vmihailenco/msgpack v5 (go-cty) writes:
// non-negative ints in the unsigned family, strings always as str (str8
// included, never bin), fix/16/32-bit array and map headers.
fn encode(v: &CtyValue, out: &mut ByteBuf) {
    match v {
        CtyValue::Null => match encode::write_nil(out) {
            Ok(()) => {}
            Err(never) => match never {},
        },
        CtyValue::Bool(b) => match encode::write_bool(out, *b) {
            Ok(()) => {}
            Err(never) => match never {},
        },
        CtyValue::Number(n) => encode_number(n, out),
        CtyValue::String(s) => infallible(encode::write_str(out, s)),
        CtyValue::List(items) => {
            infallible(encode::write_array_len(out, len32(items.len())));
            for item in items {
                encode(item, out);
            }
        }
        CtyValue::Map(entries) => {
            infallible(encode::write_map_len(out, len32(entries.len())));
            for (k, item) in entries {
                infallible(encode::write_str(out, k));
                encode(item, out);
            }
        }
    }
}

fn encode_number(n: &CtyNumber, out: &mut ByteBuf) {
    if let Num::Infinity { negative } = n.0 {
        let f = if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        infallible(encode::write_f64(out, f));
    } else if let Some(i) = n.as_i64() {
        infallible(encode::write_sint(out, i));
    } else if let Some(f) = n.as_exact_fraction_f64() {
        infallible(encode::write_f64(out, f));
    } else {
        infallible(encode::write_str(out, &n.to_text()));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes msgpack back into a `CtyValue` with rmp's low-level reader.
    /// Floats become numbers; string-encoded numbers stay strings.
    pub(crate) fn decode(bytes: &[u8]) -> CtyValue {
        let mut rd = bytes;
        let v = decode_one(&mut rd);
        assert!(rd.is_empty(), "trailing bytes: {rd:?}");
        v
    }

    fn take<const N: usize>(rd: &mut &[u8]) -> [u8; N] {
        let (head, tail) = rd.split_at(N);
        *rd = tail;
        head.try_into().expect("length")
    }

    fn take_vec(rd: &mut &[u8], n: usize) -> Vec<u8> {
        let (head, tail) = rd.split_at(n);
        *rd = tail;
        head.to_vec()
    }

    fn decode_one(rd: &mut &[u8]) -> CtyValue {
        use rmp::Marker;
        let marker = rmp::decode::read_marker(rd).expect("marker");
        let len = |rd: &mut &[u8], m: Marker| -> usize {
            match m {
                Marker::FixStr(n) | Marker::FixArray(n) | Marker::FixMap(n) => usize::from(n),
                Marker::Str8 => usize::from(take::<1>(rd)[0]),
                Marker::Str16 | Marker::Array16 | Marker::Map16 => {
                    usize::from(u16::from_be_bytes(take(rd)))
                }
                _ => u32::from_be_bytes(take(rd)) as usize,
            }
        };
        match marker {
            Marker::Null => CtyValue::Null,
            Marker::True => CtyValue::Bool(true),
            Marker::False => CtyValue::Bool(false),
            Marker::FixPos(n) => CtyValue::int(i64::from(n)),
            Marker::FixNeg(n) => CtyValue::int(i64::from(n)),
            Marker::U8 => CtyValue::int(i64::from(take::<1>(rd)[0])),
            Marker::U16 => CtyValue::int(i64::from(u16::from_be_bytes(take(rd)))),
            Marker::U32 => CtyValue::int(i64::from(u32::from_be_bytes(take(rd)))),
            Marker::U64 => CtyValue::Number(CtyNumber::from(u64::from_be_bytes(take(rd)))),
            Marker::I8 => CtyValue::int(i64::from(i8::from_be_bytes(take(rd)))),
            Marker::I16 => CtyValue::int(i64::from(i16::from_be_bytes(take(rd)))),
            Marker::I32 => CtyValue::int(i64::from(i32::from_be_bytes(take(rd)))),
            Marker::I64 => CtyValue::int(i64::from_be_bytes(take(rd))),
            Marker::F64 => CtyValue::Number(
                CtyNumber::from_f64(f64::from_be_bytes(take(rd))).expect("not NaN"),
            ),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = len(rd, marker);
                CtyValue::String(String::from_utf8(take_vec(rd, n)).expect("utf-8"))
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = len(rd, marker);
                CtyValue::List((0..n).map(|_| decode_one(rd)).collect())
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = len(rd, marker);
                let mut m = BTreeMap::new();
                let mut last: Option<String> = None;
                for _ in 0..n {
                    let CtyValue::String(k) = decode_one(rd) else {
                        panic!("map key is not a string");
                    };
                    assert!(last.as_ref().is_none_or(|l| *l < k), "keys not sorted");
                    last = Some(k.clone());
                    m.insert(k, decode_one(rd));
                }
                CtyValue::Map(m)
            }
            other => panic!("unexpected marker {other:?}"),
        }
    }

    fn num(s: &str) -> CtyNumber {
        s.parse().expect("number")
    }

    fn enc_num(s: &str) -> Vec<u8> {
        to_msgpack(&CtyValue::Number(num(s)))
    }

    fn f64_bytes(f: f64) -> Vec<u8> {
        let mut v = vec![0xcb];
        v.extend_from_slice(&f.to_bits().to_be_bytes());
        v
    }

    fn str_bytes(s: &str) -> Vec<u8> {
        let mut v = vec![0xa0 | s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn reference_worked_example() {
        // nomad-plugin-protocol.md §5.2.
        let v = CtyValue::map([
            ("count", CtyValue::int(3)),
            ("enabled", CtyValue::Bool(true)),
            ("greeting", CtyValue::string("hi")),
            ("missing", CtyValue::Null),
            ("ratio", CtyValue::Number(num("1.5"))),
            ("tags", CtyValue::List(vec![CtyValue::string("a")])),
        ]);
        let mut want = vec![0x86];
        want.extend(str_bytes("count"));
        want.push(0x03);
        want.extend(str_bytes("enabled"));
        want.push(0xc3);
        want.extend(str_bytes("greeting"));
        want.extend(str_bytes("hi"));
        want.extend(str_bytes("missing"));
        want.push(0xc0);
        want.extend(str_bytes("ratio"));
        want.extend([0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
        want.extend(str_bytes("tags"));
        want.extend([0x91, 0xa1, b'a']);
        assert_eq!(to_msgpack(&v), want);
        assert_eq!(decode(&want), v);
    }

    #[test]
    fn number_classification() {
        assert_eq!(enc_num("0.5"), f64_bytes(0.5));
        assert_eq!(enc_num("1.5"), f64_bytes(1.5));
        assert_eq!(enc_num("0.25"), f64_bytes(0.25));
        assert_eq!(enc_num("2.5e-1"), f64_bytes(0.25));
        assert_eq!(enc_num("-0.375"), f64_bytes(-0.375));
        assert_eq!(enc_num("0.1"), str_bytes("0.1"));
        assert_eq!(enc_num("-1.1"), str_bytes("-1.1"));
        assert_eq!(enc_num("1e3"), vec![0xcd, 0x03, 0xe8]);
        assert_eq!(enc_num("1000.000"), vec![0xcd, 0x03, 0xe8]);
        assert_eq!(enc_num("-3"), vec![0xfd]);
        assert_eq!(enc_num("0"), vec![0x00]);
        assert_eq!(enc_num("-0"), vec![0x00]);
        assert_eq!(enc_num("127"), vec![0x7f]);
        assert_eq!(enc_num("128"), vec![0xcc, 0x80]);
        assert_eq!(enc_num("255"), vec![0xcc, 0xff]);
        assert_eq!(enc_num("256"), vec![0xcd, 0x01, 0x00]);
        assert_eq!(enc_num("65535"), vec![0xcd, 0xff, 0xff]);
        assert_eq!(enc_num("65536"), vec![0xce, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(enc_num("4294967295"), vec![0xce, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(enc_num("4294967296"), vec![0xcf, 0, 0, 0, 0x01, 0, 0, 0, 0]);
        assert_eq!(enc_num("-32"), vec![0xe0]);
        assert_eq!(enc_num("-33"), vec![0xd0, 0xdf]);
        assert_eq!(enc_num("-128"), vec![0xd0, 0x80]);
        assert_eq!(enc_num("-129"), vec![0xd1, 0xff, 0x7f]);
        assert_eq!(enc_num("-33000"), vec![0xd2, 0xff, 0xff, 0x7f, 0x18]);
        assert_eq!(
            enc_num("-9223372036854775808"),
            [vec![0xd3], i64::MIN.to_be_bytes().to_vec()].concat()
        );
        assert_eq!(
            enc_num("9223372036854775807"),
            [vec![0xcf], i64::MAX.to_be_bytes().to_vec()].concat()
        );
        // Beyond int64, go-cty falls back to the decimal string even if a
        // uint64 or float64 could hold it.
        assert_eq!(
            enc_num("9223372036854775808"),
            str_bytes("9223372036854775808")
        );
        assert_eq!(enc_num("1e20"), str_bytes("100000000000000000000"));
        // Mantissa wider than 53 bits, and a fraction below the subnormal range.
        assert_eq!(enc_num("0.5000000000000000001"), {
            let mut v = vec![0xb5];
            v.extend(b"0.5000000000000000001");
            v
        });
        assert_eq!(enc_num("4503599627370495.5"), f64_bytes(4503599627370495.5));
        assert_eq!(enc_num("9007199254740991.5"), {
            let mut v = vec![0xb2];
            v.extend(b"9007199254740991.5");
            v
        });
        let tiny = "4.9406564584124654e-324"; // not exactly 2^-1074
        assert!(num(tiny).as_exact_fraction_f64().is_none());
        assert_eq!(
            CtyValue::Number(CtyNumber::infinity(true)).to_msgpack(),
            f64_bytes(f64::NEG_INFINITY)
        );
    }

    #[test]
    fn smallest_subnormal_is_exact() {
        // 2^-1074 = 5^1074 / 10^1074, written out exactly.
        let mut digits = vec![1u8];
        for _ in 0..1074 {
            let mut carry = 0;
            for d in digits.iter_mut().rev() {
                let cur = *d * 5 + carry;
                *d = cur % 10;
                carry = cur / 10;
            }
            if carry > 0 {
                digits.insert(0, carry);
            }
        }
        let text: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
        let n = CtyNumber::finite(false, &text, -1074);
        assert_eq!(n.as_exact_fraction_f64(), Some(f64::from_bits(1)));
        // Rust's shortest repr (5e-324) is a different decimal: not exact.
        let short = CtyNumber::from_f64(f64::from_bits(1)).expect("finite");
        assert_eq!(short.as_exact_fraction_f64(), None);
        let half = CtyNumber::finite(false, &format!("{text}0"), -1075);
        assert_eq!(half.as_exact_fraction_f64(), Some(f64::from_bits(1)));
    }

    #[test]
    fn text_is_go_f_format() {
        for (input, want) in [
            ("1.50", "1.5"),
            ("001.0", "1"),
            ("1e3", "1000"),
            ("1.5e-3", "0.0015"),
            (".5", "0.5"),
            ("5.", "5"),
            ("-12.340e1", "-123.4"),
            ("+7", "7"),
            ("0.000", "0"),
            ("Inf", "+Inf"),
            ("-inf", "-Inf"),
        ] {
            assert_eq!(num(input).to_text(), want, "{input}");
        }
        for bad in [
            "", "-", ".", "e3", "1e", "1e+", "1.2.3", " 1", "0x10", "1_000", "abc",
        ] {
            assert!(bad.parse::<CtyNumber>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            CtyNumber::from_f64(0.1).map(|n| n.to_text()),
            Some("0.1".into())
        );
        assert_eq!(
            CtyNumber::from_f64(1e21).map(|n| n.to_text()),
            Some(format!("1{}", "0".repeat(21)))
        );
        assert_eq!(CtyNumber::from_f64(f64::NAN), None);
    }

    #[test]
    fn g10_text_matches_go_big_float_string() {
        for (input, want) in [
            ("1", "1"),
            ("80", "80"),
            ("1.5", "1.5"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("1234567890", "1234567890"),
            ("12345678901", "1.23456789e+10"),
            ("123456789012", "1.23456789e+11"),
            ("3.14159265358979", "3.141592654"),
            ("-2.5", "-2.5"),
            ("9999999999.5", "1e+10"),
        ] {
            assert_eq!(num(input).to_g10_text(), want, "{input}");
        }
    }

    #[test]
    fn numeric_order_and_equality() {
        assert_eq!(num("1.0"), num("1"));
        assert!(num("-2") < num("-1.5"));
        assert!(num("-1") < num("0"));
        assert!(num("0.5") < num("1"));
        assert!(num("99") < num("100"));
        assert!(num("10") > num("9.99"));
        assert!(CtyNumber::infinity(true) < num("-1e300"));
        assert!(CtyNumber::infinity(false) > num("1e300"));
    }

    #[test]
    fn string_and_collection_headers() {
        let s31 = "x".repeat(31);
        assert_eq!(to_msgpack(&CtyValue::string(s31))[0], 0xbf);
        let s32 = "x".repeat(32);
        assert_eq!(to_msgpack(&CtyValue::string(s32))[..2], [0xd9, 32]);
        let s256 = "x".repeat(256);
        assert_eq!(to_msgpack(&CtyValue::string(s256))[..3], [0xda, 1, 0]);
        let s65536 = "x".repeat(65536);
        assert_eq!(
            to_msgpack(&CtyValue::string(s65536))[..5],
            [0xdb, 0, 1, 0, 0]
        );
        let list = |n| CtyValue::List(vec![CtyValue::Null; n]);
        assert_eq!(to_msgpack(&list(15))[0], 0x9f);
        assert_eq!(to_msgpack(&list(16))[..3], [0xdc, 0, 16]);
        assert_eq!(to_msgpack(&list(65536))[..5], [0xdd, 0, 1, 0, 0]);
        let map = |n: usize| CtyValue::map((0..n).map(|i| (format!("{i:05}"), CtyValue::Null)));
        assert_eq!(to_msgpack(&map(15))[0], 0x8f);
        assert_eq!(to_msgpack(&map(16))[..3], [0xde, 0, 16]);
        assert_eq!(to_msgpack(&map(65536))[..5], [0xdf, 0, 1, 0, 0]);
        assert_eq!(to_msgpack(&CtyValue::Bool(false)), [0xc2]);
        // Keys in Go byte order: uppercase before lowercase, "a" before "aa".
        let m = CtyValue::map([
            ("b", CtyValue::Null),
            ("aa", CtyValue::Null),
            ("a", CtyValue::Null),
            ("B", CtyValue::Null),
        ]);
        let bytes = to_msgpack(&m);
        assert_eq!(
            bytes,
            [
                &[
                    0x84, 0xa1, b'B', 0xc0, 0xa1, b'a', 0xc0, 0xa2, b'a', b'a', 0xc0, 0xa1, b'b',
                    0xc0
                ][..]
            ]
            .concat()
        );
        assert_eq!(decode(&bytes), m);
    }

    proptest! {
        #[test]
        fn any_i64_roundtrips(i in any::<i64>()) {
            let bytes = to_msgpack(&CtyValue::int(i));
            let mut rd = &bytes[..];
            let back: i64 = rmp::decode::read_int(&mut rd).expect("int");
            prop_assert_eq!(back, i);
            prop_assert!(rd.is_empty());
        }

        #[test]
        fn any_f64_never_panics(f in any::<f64>()) {
            if let Some(n) = CtyNumber::from_f64(f) {
                let bytes = to_msgpack(&CtyValue::Number(n.clone()));
                if n.as_i64().is_none() && !n.is_integer() {
                    if let Some(g) = n.as_exact_fraction_f64() {
                        prop_assert_eq!(g, f);
                    }
                }
                prop_assert!(!bytes.is_empty());
                let _ = n.to_g10_text();
            }
        }

        #[test]
        fn decimal_strings_never_panic(s in "[+-]?[0-9]{0,40}(\\.[0-9]{0,40})?([eE][+-]?[0-9]{1,7})?") {
            if let Ok(n) = s.parse::<CtyNumber>() {
                let bytes = to_msgpack(&CtyValue::Number(n.clone()));
                prop_assert!(!bytes.is_empty());
                // The printed text parses back to the same number.
                prop_assert_eq!(n.to_text().parse::<CtyNumber>().ok(), Some(n.clone()));
                let _ = n.to_g10_text();
            }
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,30}") {
            if let Ok(n) = s.parse::<CtyNumber>() {
                let _ = to_msgpack(&CtyValue::Number(n));
            }
        }

        #[test]
        fn exact_fractions_agree_with_f64(m in -(1i64 << 53)..(1i64 << 53), k in 1u32..60) {
            // m / 2^k is exact in binary64; its decimal text must classify as such.
            let f = m as f64 / 2f64.powi(k as i32);
            // Exact decimal text (`{:.80}` is exact for k < 60).
            let n = num(&format!("{f:.80}"));
            if f.fract() != 0.0 {
                prop_assert_eq!(n.as_exact_fraction_f64(), Some(f));
            } else {
                prop_assert_eq!(n.as_i64(), Some(f as i64));
            }
        }
    }
}
