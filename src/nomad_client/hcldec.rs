//! Decodes an HCL `config {}` body against an hclspec schema the way Nomad
//! does (hcl v2.20 `hcldec.Decode` of the spec converted by
//! `helper/pluginutils/hclspecutils`, with go-cty's `convert` rules), giving the
//! cty value Nomad would msgpack-encode into `msgpack_driver_config`.
//!
//! Emulated: every hclspec kind; body checks (unsupported arguments and
//! blocks with hcl's "Did you mean" hints, missing required arguments, label
//! counts, duplicates, item limits); attribute evaluation with the caller's
//! variables; cty type conversion and unification (including `list(any)`,
//! `map(any)`, set ordering and de-duplication).
//!
//! Not emulated: the first error is returned rather than every diagnostic;
//! source ranges (errors carry a path instead); Unicode NFC normalisation of
//! strings; numbers beyond `f64` precision in HCL source (hcl-rs parses them
//! as `f64`) and 512-bit arithmetic; HCL's standard functions (only those in
//! the caller's context exist, and `Literal` specs see none); unknown values,
//! which hcldec would produce in a few type-inconsistent cases that are errors
//! here. Nomad itself decodes the task config from the job's JSON form, which
//! also accepts `disk = { ... }` where a `disk` block is expected; native
//! syntax, as here, does not.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::str::FromStr;

use hcl::eval::{Context, Evaluate};
use hcl::{Body, Expression};

use crate::nomad::cty::{to_msgpack, CtyNumber, CtyValue};
use crate::nomad::hclspec::Spec;

/// Why an HCL body could not be decoded against a spec.
#[derive(Debug, thiserror::Error)]
pub enum HclDecodeError {
    /// The HCL source does not parse; the source error has line and column.
    #[error("Invalid HCL syntax")]
    Parse(#[source] hcl::Error),
    /// The schema itself is unusable; Nomad rejects it before decoding.
    #[error("Invalid spec at {}: {summary}; {detail}", display_path(path))]
    InvalidSpec {
        path: String,
        summary: String,
        detail: String,
    },
    /// The body does not satisfy the schema: one hcldec diagnostic.
    /// `path` locates it, e.g. `network_interface[0].bridge.name`.
    #[error("{}{summary}; {detail}", path_prefix(path))]
    Invalid {
        path: String,
        summary: String,
        detail: String,
    },
}

impl HclDecodeError {
    /// The diagnostic summary (e.g. "Unsupported argument"), if any.
    pub fn summary(&self) -> Option<&str> {
        match self {
            HclDecodeError::Parse(_) => None,
            HclDecodeError::InvalidSpec { summary, .. }
            | HclDecodeError::Invalid { summary, .. } => Some(summary),
        }
    }

    /// Where in the body or spec the problem is; empty for the top level.
    pub fn path(&self) -> Option<&str> {
        match self {
            HclDecodeError::Parse(_) => None,
            HclDecodeError::InvalidSpec { path, .. } | HclDecodeError::Invalid { path, .. } => {
                Some(path)
            }
        }
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "top level"
    } else {
        path
    }
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

fn invalid(path: String, summary: impl Into<String>, detail: impl Into<String>) -> HclDecodeError {
    HclDecodeError::Invalid {
        path,
        summary: summary.into(),
        detail: detail.into(),
    }
}

fn invalid_spec(
    path: &str,
    summary: impl Into<String>,
    detail: impl Into<String>,
) -> HclDecodeError {
    HclDecodeError::InvalidSpec {
        path: path.to_string(),
        summary: summary.into(),
        detail: detail.into(),
    }
}

/// Decodes `body` against `spec` as Nomad's hcldec would, evaluating
/// expressions with `ctx` (its variables are the task environment).
pub fn decode_body(
    spec: &Spec,
    body: &Body,
    ctx: &Context<'_>,
) -> Result<CtyValue, HclDecodeError> {
    let dec = compile(spec, "", "")?;
    Ok(decode_block_body(&dec, body, ctx, "")?.into_cty())
}

/// Parses `src` (the contents of a `config {}` block) and returns the msgpack
/// bytes Nomad would put in `msgpack_driver_config` / `msgpack_config`.
pub fn encode_hcl(spec: &Spec, src: &str, ctx: &Context<'_>) -> Result<Vec<u8>, HclDecodeError> {
    let body = hcl::parse(src).map_err(HclDecodeError::Parse)?;
    Ok(to_msgpack(&decode_body(spec, &body, ctx)?))
}

// ---------------------------------------------------------------------------
// cty types and typed values

/// A cty type (no capsules, no optional attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ty {
    String,
    Number,
    Bool,
    /// `any`: cty.DynamicPseudoType.
    Dynamic,
    List(Box<Ty>),
    Set(Box<Ty>),
    Map(Box<Ty>),
    Tuple(Vec<Ty>),
    Object(BTreeMap<String, Ty>),
}

impl Ty {
    fn is_primitive(&self) -> bool {
        matches!(self, Ty::String | Ty::Number | Ty::Bool)
    }

    fn is_collection(&self) -> bool {
        matches!(self, Ty::List(_) | Ty::Set(_) | Ty::Map(_))
    }

    fn element(&self) -> Option<&Ty> {
        match self {
            Ty::List(e) | Ty::Set(e) | Ty::Map(e) => Some(e),
            _ => None,
        }
    }

    fn has_dynamic(&self) -> bool {
        match self {
            Ty::Dynamic => true,
            Ty::String | Ty::Number | Ty::Bool => false,
            Ty::List(e) | Ty::Set(e) | Ty::Map(e) => e.has_dynamic(),
            Ty::Tuple(es) => es.iter().any(Ty::has_dynamic),
            Ty::Object(atys) => atys.values().any(Ty::has_dynamic),
        }
    }

    /// cty `FriendlyName` / `FriendlyNameForConstraint`.
    fn friendly(&self, constraint: bool) -> String {
        let elem = |e: &Ty| {
            if constraint && *e == Ty::Dynamic {
                "any single type".to_string()
            } else {
                e.friendly(constraint)
            }
        };
        match self {
            Ty::String => "string".into(),
            Ty::Number => "number".into(),
            Ty::Bool => "bool".into(),
            Ty::Dynamic if constraint => "any type".into(),
            Ty::Dynamic => "dynamic".into(),
            Ty::List(e) => format!("list of {}", elem(e)),
            Ty::Set(e) => format!("set of {}", elem(e)),
            Ty::Map(e) => format!("map of {}", elem(e)),
            Ty::Tuple(_) => "tuple".into(),
            Ty::Object(_) => "object".into(),
        }
    }
}

/// A known cty value with its type, as the decoder needs it for conversions.
#[derive(Debug, Clone)]
enum TVal {
    Null(Ty),
    Bool(bool),
    Number(CtyNumber),
    String(String),
    List(Ty, Vec<TVal>),
    /// Elements already de-duplicated and in cty iteration order.
    Set(Ty, Vec<TVal>),
    Map(Ty, BTreeMap<String, TVal>),
    Tuple(Vec<TVal>),
    Object(BTreeMap<String, TVal>),
}

impl TVal {
    fn ty(&self) -> Ty {
        match self {
            TVal::Null(t) => t.clone(),
            TVal::Bool(_) => Ty::Bool,
            TVal::Number(_) => Ty::Number,
            TVal::String(_) => Ty::String,
            TVal::List(e, _) => Ty::List(Box::new(e.clone())),
            TVal::Set(e, _) => Ty::Set(Box::new(e.clone())),
            TVal::Map(e, _) => Ty::Map(Box::new(e.clone())),
            TVal::Tuple(vs) => Ty::Tuple(vs.iter().map(TVal::ty).collect()),
            TVal::Object(vs) => Ty::Object(vs.iter().map(|(k, v)| (k.clone(), v.ty())).collect()),
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, TVal::Null(_))
    }

    fn into_cty(self) -> CtyValue {
        match self {
            TVal::Null(_) => CtyValue::Null,
            TVal::Bool(b) => CtyValue::Bool(b),
            TVal::Number(n) => CtyValue::Number(n),
            TVal::String(s) => CtyValue::String(s),
            TVal::List(_, vs) | TVal::Set(_, vs) | TVal::Tuple(vs) => {
                CtyValue::List(vs.into_iter().map(TVal::into_cty).collect())
            }
            TVal::Map(_, vs) | TVal::Object(vs) => {
                CtyValue::Map(vs.into_iter().map(|(k, v)| (k, v.into_cty())).collect())
            }
        }
    }

    /// An HCL value as cty sees it: arrays are tuples, objects are objects.
    fn from_hcl(v: hcl::Value) -> Result<TVal, String> {
        Ok(match v {
            hcl::Value::Null => TVal::Null(Ty::Dynamic),
            hcl::Value::Bool(b) => TVal::Bool(b),
            hcl::Value::Number(n) => {
                let num = if let Some(i) = n.as_i64() {
                    Some(CtyNumber::from(i))
                } else if let Some(u) = n.as_u64() {
                    Some(CtyNumber::from(u))
                } else {
                    n.as_f64().and_then(CtyNumber::from_f64)
                };
                TVal::Number(num.ok_or_else(|| format!("{n} is not a number"))?)
            }
            hcl::Value::String(s) => TVal::String(s),
            hcl::Value::Array(vs) => TVal::Tuple(
                vs.into_iter()
                    .map(TVal::from_hcl)
                    .collect::<Result<_, _>>()?,
            ),
            hcl::Value::Object(vs) => TVal::Object(
                vs.into_iter()
                    .map(|(k, v)| Ok((k, TVal::from_hcl(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// cty `Value.Equals` for known values: nulls equal each other, numbers
/// compare numerically, types must match.
fn cty_equals(a: &TVal, b: &TVal) -> bool {
    match (a, b) {
        (TVal::Null(_), TVal::Null(_)) => true,
        (TVal::Null(_), _) | (_, TVal::Null(_)) => false,
        _ if a.ty() != b.ty() => false,
        (TVal::Bool(x), TVal::Bool(y)) => x == y,
        (TVal::Number(x), TVal::Number(y)) => x == y,
        (TVal::String(x), TVal::String(y)) => x == y,
        (TVal::List(_, xs), TVal::List(_, ys))
        | (TVal::Set(_, xs), TVal::Set(_, ys))
        | (TVal::Tuple(xs), TVal::Tuple(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| cty_equals(x, y))
        }
        (TVal::Map(_, xs), TVal::Map(_, ys)) | (TVal::Object(xs), TVal::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .zip(ys)
                    .all(|((kx, x), (ky, y))| kx == ky && cty_equals(x, y))
        }
        _ => false,
    }
}

/// The element type `cty.ListVal`/`SetVal`/`MapVal` would give these values,
/// or `None` where cty would panic on inconsistent types (`CanListVal`).
fn common_type<'a>(vals: impl IntoIterator<Item = &'a TVal>) -> Option<Ty> {
    let mut ety = Ty::Dynamic;
    for v in vals {
        let t = v.ty();
        if ety == Ty::Dynamic {
            ety = t;
        } else if t != Ty::Dynamic && t != ety {
            return None;
        }
    }
    Some(ety)
}

/// `cty.SetVal`: drops duplicates and orders as cty's set iterator does
/// (nulls last; strings, numbers and bools by value; anything else by its
/// set-hash text). Ties keep insertion order, which is cty's bucket order
/// because equal hash text means equal hash.
fn make_set(ety: Ty, vals: Vec<TVal>) -> TVal {
    let mut out: Vec<TVal> = Vec::with_capacity(vals.len());
    for v in vals {
        if !out.iter().any(|o| cty_equals(o, &v)) {
            out.push(v);
        }
    }
    out.sort_by(|a, b| set_order(&ety, a, b));
    TVal::Set(ety, out)
}

fn set_order(ety: &Ty, a: &TVal, b: &TVal) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a.is_null(), b.is_null()) {
        (true, true) => return Ordering::Equal,
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        _ => {}
    }
    match (ety, a, b) {
        (Ty::String, TVal::String(x), TVal::String(y)) => x.cmp(y),
        (Ty::Number, TVal::Number(x), TVal::Number(y)) => x.cmp(y),
        (Ty::Bool, TVal::Bool(x), TVal::Bool(y)) => x.cmp(y),
        _ => {
            let (mut ha, mut hb) = (String::new(), String::new());
            set_hash_text(a, &mut ha);
            set_hash_text(b, &mut hb);
            ha.as_bytes().cmp(hb.as_bytes())
        }
    }
}

/// cty's `appendSetHashBytes`.
fn set_hash_text(v: &TVal, out: &mut String) {
    match v {
        TVal::Null(_) => out.push('~'),
        TVal::Number(n) => out.push_str(&n.to_g10_text()),
        TVal::Bool(b) => out.push(if *b { 'T' } else { 'F' }),
        TVal::String(s) => out.push_str(&go_quote(s)),
        TVal::Map(_, vs) => {
            out.push('{');
            for (k, v) in vs {
                out.push_str(&go_quote(k));
                out.push(':');
                set_hash_text(v, out);
                out.push(';');
            }
            out.push('}');
        }
        TVal::List(_, vs) | TVal::Set(_, vs) => {
            out.push('[');
            for v in vs {
                set_hash_text(v, out);
                out.push(';');
            }
            out.push(']');
        }
        TVal::Tuple(vs) => {
            out.push('<');
            for v in vs {
                set_hash_text(v, out);
                out.push(';');
            }
            out.push('>');
        }
        TVal::Object(vs) => {
            out.push('<');
            for v in vs.values() {
                set_hash_text(v, out);
                out.push(';');
            }
            out.push('>');
        }
    }
}

/// Go's `strconv.Quote` (`%q`), close enough for messages and set hashes.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// go-cty convert: conversions, unification and mismatch messages

/// Whether cty has a conversion from `from` to `to` (`getConversion != nil`).
/// Like cty, equal primitive types have no conversion: callers check
/// equality first.
fn conversion_exists(from: &Ty, to: &Ty, unsafe_: bool) -> bool {
    match (from, to) {
        (_, Ty::Dynamic) => true,
        (Ty::Dynamic, _) => unsafe_,
        (Ty::Number | Ty::Bool, Ty::String) => true,
        (Ty::String, Ty::Number | Ty::Bool) => unsafe_,
        (f, t) if f.is_primitive() && t.is_primitive() => false,
        (Ty::Object(fa), Ty::Object(ta)) => ta.iter().all(|(name, t)| match fa.get(name) {
            None => false,
            Some(f) => f == t || conversion_exists(f, t, unsafe_),
        }),
        (Ty::Tuple(fe), Ty::Tuple(te)) => {
            fe.len() == te.len()
                && fe
                    .iter()
                    .zip(te)
                    .all(|(f, t)| f == t || conversion_exists(f, t, unsafe_))
        }
        (Ty::List(fe) | Ty::Set(fe), Ty::List(te)) => {
            fe == te || conversion_exists(fe, te, unsafe_)
        }
        (Ty::List(_), Ty::Set(_)) if !unsafe_ => false,
        (Ty::List(fe) | Ty::Set(fe), Ty::Set(te)) => fe == te || conversion_exists(fe, te, unsafe_),
        (Ty::Map(fe), Ty::Map(te)) => conversion_exists(fe, te, unsafe_),
        (Ty::Tuple(fe), Ty::List(te) | Ty::Set(te)) => {
            tuple_to_collection_ety(fe, te, unsafe_).is_some()
        }
        (Ty::Object(fa), Ty::Map(te)) => object_to_map_ety(fa, te, unsafe_).is_some(),
        (Ty::Map(fe), Ty::Object(ta)) => {
            unsafe_
                && ta
                    .values()
                    .all(|t| t == &**fe || conversion_exists(fe, t, unsafe_))
        }
        _ => false,
    }
}

/// The element type a tuple converts to for `list(te)`/`set(te)`, if any.
fn tuple_to_collection_ety(etys: &[Ty], te: &Ty, unsafe_: bool) -> Option<Ty> {
    if etys.is_empty() {
        return Some(te.clone());
    }
    let mut ety = te.clone();
    if ety == Ty::Dynamic {
        ety = unify(etys, unsafe_)?.0;
        if ety == Ty::Dynamic && etys.iter().any(|t| *t != Ty::Dynamic) {
            return None;
        }
    }
    etys.iter()
        .all(|t| *t == ety || conversion_exists(t, &ety, unsafe_))
        .then_some(ety)
}

/// The element type an object converts to for `map(te)`, if any.
fn object_to_map_ety(atys: &BTreeMap<String, Ty>, te: &Ty, unsafe_: bool) -> Option<Ty> {
    if atys.is_empty() {
        return Some(te.clone());
    }
    let mut ety = te.clone();
    if ety == Ty::Dynamic {
        ety = unify(&atys.values().cloned().collect::<Vec<_>>(), unsafe_)?.0;
    }
    atys.values()
        .all(|t| *t == ety || conversion_exists(t, &ety, unsafe_))
        .then_some(ety)
}

/// cty `convert.Convert` (unsafe conversions allowed); errors are cty's
/// messages.
fn convert(v: TVal, want: &Ty) -> Result<TVal, String> {
    let from = v.ty();
    if from == *want {
        return Ok(v);
    }
    if !conversion_exists(&from, want, true) {
        return Err(mismatch_message(&from, want));
    }
    apply(v, want, true)
}

/// Runs the conversion to `to`; `conversion_exists(v.ty(), to)` must hold.
fn apply(v: TVal, to: &Ty, unsafe_: bool) -> Result<TVal, String> {
    if *to == Ty::Dynamic {
        return Ok(v);
    }
    if let TVal::Null(t) = &v {
        return Ok(TVal::Null(dynamic_replace(t, to)));
    }
    let conv = |v: TVal, to: &Ty| -> Result<TVal, String> {
        if v.ty() == *to {
            Ok(v)
        } else {
            apply(v, to, unsafe_)
        }
    };
    match (v, to) {
        (TVal::Number(n), Ty::String) => Ok(TVal::String(n.to_text())),
        (TVal::Bool(b), Ty::String) => Ok(TVal::String(b.to_string())),
        (TVal::String(s), Ty::Number) => s
            .parse()
            .map(TVal::Number)
            .map_err(|_| "a number is required".to_string()),
        (TVal::String(s), Ty::Bool) => match s.as_str() {
            "true" | "1" => Ok(TVal::Bool(true)),
            "false" | "0" => Ok(TVal::Bool(false)),
            _ => Err(match s.to_lowercase().as_str() {
                "true" => "a bool is required; to convert from string, use lowercase \"true\"",
                "false" => "a bool is required; to convert from string, use lowercase \"false\"",
                _ => "a bool is required",
            }
            .to_string()),
        },
        (TVal::Object(mut attrs), Ty::Object(want)) => {
            let mut out = BTreeMap::new();
            for (name, t) in want {
                // Present: conversion_exists checked every wanted attribute.
                let a = attrs
                    .remove(name)
                    .ok_or_else(|| format!("attribute {} is required", go_quote(name)))?;
                out.insert(name.clone(), conv(a, t)?);
            }
            Ok(TVal::Object(out))
        }
        (TVal::Tuple(elems), Ty::Tuple(want)) => Ok(TVal::Tuple(
            elems
                .into_iter()
                .zip(want)
                .map(|(e, t)| conv(e, t))
                .collect::<Result<_, _>>()?,
        )),
        (TVal::List(from_ety, elems) | TVal::Set(from_ety, elems), Ty::List(te) | Ty::Set(te)) => {
            let elems = elems
                .into_iter()
                .map(|e| conv(e, te))
                .collect::<Result<Vec<_>, _>>()?;
            let is_list = matches!(to, Ty::List(_));
            if elems.is_empty() {
                let ety = if **te == Ty::Dynamic {
                    from_ety
                } else {
                    (**te).clone()
                };
                return Ok(if is_list {
                    TVal::List(ety, elems)
                } else {
                    TVal::Set(ety, elems)
                });
            }
            collection_of(is_list, elems)
        }
        (TVal::Map(from_ety, elems), Ty::Map(te)) => {
            let mut out = BTreeMap::new();
            for (k, e) in elems {
                out.insert(k, conv(e, te)?);
            }
            if out.is_empty() {
                let ety = if **te == Ty::Dynamic {
                    from_ety
                } else {
                    (**te).clone()
                };
                return Ok(TVal::Map(ety, out));
            }
            if te.is_collection() || matches!(**te, Ty::Object(_)) {
                out = unify_map_elements(out, false)?;
            }
            let ety = common_type(out.values())
                .ok_or("element types must all match for conversion to map")?;
            Ok(TVal::Map(ety, out))
        }
        (TVal::Tuple(elems), Ty::List(te) | Ty::Set(te)) => {
            let is_list = matches!(to, Ty::List(_));
            if elems.is_empty() {
                return Ok(if is_list {
                    TVal::List((**te).clone(), elems)
                } else {
                    TVal::Set((**te).clone(), elems)
                });
            }
            let etys: Vec<Ty> = elems.iter().map(TVal::ty).collect();
            let ety = tuple_to_collection_ety(&etys, te, unsafe_)
                .ok_or_else(|| mismatch_message(&Ty::Tuple(etys), to))?;
            let mut elems = elems
                .into_iter()
                .map(|e| conv(e, &ety))
                .collect::<Result<Vec<_>, _>>()?;
            if is_list {
                elems = unify_list_elements(elems, unsafe_)?;
            }
            collection_of(is_list, elems)
        }
        (TVal::Object(attrs), Ty::Map(te)) => {
            if attrs.is_empty() {
                return Ok(TVal::Map((**te).clone(), BTreeMap::new()));
            }
            let atys = attrs.iter().map(|(k, v)| (k.clone(), v.ty())).collect();
            let ety = object_to_map_ety(&atys, te, unsafe_)
                .ok_or_else(|| mismatch_message(&Ty::Object(atys), to))?;
            let mut out = BTreeMap::new();
            for (k, e) in attrs {
                out.insert(k, conv(e, &ety)?);
            }
            if ety.is_collection() || matches!(ety, Ty::Object(_)) {
                out = unify_map_elements(out, unsafe_)?;
            }
            let ety = common_type(out.values())
                .ok_or("attribute types must all match for conversion to map")?;
            Ok(TVal::Map(ety, out))
        }
        (TVal::Map(from_ety, elems), Ty::Object(want)) => {
            let mut out = BTreeMap::new();
            for (k, e) in elems {
                if let Some(t) = want.get(&k) {
                    let e = if *t == from_ety {
                        e
                    } else {
                        apply(e, t, unsafe_)?
                    };
                    out.insert(k, e);
                }
            }
            if let Some(name) = want.keys().find(|k| !out.contains_key(*k)) {
                return Err(format!(
                    "map has no element for required attribute {}",
                    go_quote(name)
                ));
            }
            Ok(TVal::Object(out))
        }
        (v, _) => Err(mismatch_message(&v.ty(), to)),
    }
}

fn collection_of(is_list: bool, elems: Vec<TVal>) -> Result<TVal, String> {
    let kind = if is_list { "list" } else { "set" };
    let ety = common_type(&elems)
        .ok_or_else(|| format!("element types must all match for conversion to {kind}"))?;
    Ok(if is_list {
        TVal::List(ety, elems)
    } else {
        make_set(ety, elems)
    })
}

/// cty `conversionUnifyListElements`.
fn unify_list_elements(elems: Vec<TVal>, unsafe_: bool) -> Result<Vec<TVal>, String> {
    let tys: Vec<Ty> = elems.iter().map(TVal::ty).collect();
    let (ety, _) = unify(&tys, unsafe_).ok_or("cannot find a common base type for all elements")?;
    elems
        .into_iter()
        .map(|e| convert_to_unified(e, &ety, unsafe_))
        .collect()
}

/// cty `conversionUnifyCollectionElements`.
fn unify_map_elements(
    elems: BTreeMap<String, TVal>,
    unsafe_: bool,
) -> Result<BTreeMap<String, TVal>, String> {
    let tys: Vec<Ty> = elems.values().map(TVal::ty).collect();
    let (ety, _) = unify(&tys, unsafe_).ok_or("cannot find a common base type for all elements")?;
    elems
        .into_iter()
        .map(|(k, e)| Ok((k, convert_to_unified(e, &ety, unsafe_)?)))
        .collect()
}

fn convert_to_unified(e: TVal, ety: &Ty, unsafe_: bool) -> Result<TVal, String> {
    let t = e.ty();
    if t == *ety {
        Ok(e)
    } else if conversion_exists(&t, ety, unsafe_) {
        apply(e, ety, unsafe_)
    } else {
        // cty would call a nil conversion here and panic.
        Err(mismatch_message(&t, ety))
    }
}

/// cty `dynamicReplace`: the type of a converted null.
fn dynamic_replace(from: &Ty, to: &Ty) -> Ty {
    if *from == Ty::Dynamic {
        return to.clone();
    }
    let unified = |tys: Vec<Ty>, fallback: &Ty| match unify(&tys, true) {
        Some((t, _)) => dynamic_replace(&t, fallback),
        None => fallback.clone(),
    };
    match to {
        Ty::Dynamic => from.clone(),
        Ty::String | Ty::Number | Ty::Bool => to.clone(),
        Ty::Map(te) => match from {
            Ty::Map(fe) => Ty::Map(Box::new(dynamic_replace(fe, te))),
            Ty::Object(fa) => Ty::Map(Box::new(unified(fa.values().cloned().collect(), te))),
            _ => to.clone(),
        },
        Ty::Object(ta) => Ty::Object(
            ta.iter()
                .filter_map(|(name, t)| match from {
                    Ty::Map(fe) => Some((name.clone(), dynamic_replace(fe, t))),
                    Ty::Object(fa) => Some((
                        name.clone(),
                        fa.get(name)
                            .map_or_else(|| t.clone(), |f| dynamic_replace(f, t)),
                    )),
                    _ => None,
                })
                .collect(),
        ),
        Ty::Set(te) | Ty::List(te) => {
            let ety = match from {
                Ty::Set(fe) | Ty::List(fe) => dynamic_replace(fe, te),
                Ty::Tuple(fe) => unified(fe.clone(), te),
                _ => return to.clone(),
            };
            if matches!(to, Ty::Set(_)) {
                Ty::Set(Box::new(ety))
            } else {
                Ty::List(Box::new(ety))
            }
        }
        Ty::Tuple(te) => Ty::Tuple(
            te.iter()
                .enumerate()
                .map(|(i, t)| match from {
                    Ty::Tuple(fe) if i < fe.len() => dynamic_replace(&fe[i], t),
                    _ => t.clone(),
                })
                .collect(),
        ),
    }
}

/// cty `unify`: the type all `types` convert to, and whether cty would turn
/// the values into unknowns on the way (`unifyAllAsDynamic`).
fn unify(types: &[Ty], unsafe_: bool) -> Option<(Ty, bool)> {
    if types.is_empty() {
        return None;
    }
    let count = |f: fn(&Ty) -> bool| types.iter().filter(|t| f(t)).count();
    let maps = count(|t| matches!(t, Ty::Map(_)));
    let lists = count(|t| matches!(t, Ty::List(_)));
    let sets = count(|t| matches!(t, Ty::Set(_)));
    let objects = count(|t| matches!(t, Ty::Object(_)));
    let tuples = count(|t| matches!(t, Ty::Tuple(_)));
    let dynamics = count(|t| *t == Ty::Dynamic);
    let n = types.len();
    // Go's switch: the first matching case runs; a failed attempt falls
    // through to the general preference search, not to later cases.
    if maps > 0 && maps + dynamics == n {
        return unify_collections(|e| Ty::Map(Box::new(e)), types, unsafe_, dynamics > 0);
    } else if maps > 0 && maps + objects + dynamics == n {
        if let Some((t @ Ty::Map(_), u)) = unify_objects_as_maps(types, unsafe_) {
            return Some((t, u));
        }
    } else if lists > 0 && lists + dynamics == n {
        return unify_collections(|e| Ty::List(Box::new(e)), types, unsafe_, dynamics > 0);
    } else if lists > 0 && lists + tuples + dynamics == n {
        if let Some((t @ Ty::List(_), u)) = unify_tuples_as_list(types, unsafe_) {
            return Some((t, u));
        }
    } else if sets > 0 && sets + dynamics == n {
        return unify_collections(|e| Ty::Set(Box::new(e)), types, unsafe_, dynamics > 0);
    } else if objects > 0 && objects + dynamics == n {
        return unify_objects(types, unsafe_, dynamics > 0);
    } else if tuples > 0 && tuples + dynamics == n {
        return unify_tuples(types, unsafe_, dynamics > 0);
    } else if objects > 0 && tuples > 0 {
        return None;
    }
    for want_idx in sort_types(types) {
        let want = &types[want_idx];
        let all = types
            .iter()
            .enumerate()
            .all(|(i, t)| i == want_idx || t == want || conversion_exists(t, want, unsafe_));
        if all {
            return Some((want.clone(), false));
        }
    }
    None
}

fn all_convert(types: &[Ty], to: &Ty, unsafe_: bool) -> bool {
    types
        .iter()
        .all(|t| t == to || conversion_exists(t, to, unsafe_))
}

fn unify_collections(
    make: fn(Ty) -> Ty,
    types: &[Ty],
    unsafe_: bool,
    has_dynamic: bool,
) -> Option<(Ty, bool)> {
    if has_dynamic {
        return Some((Ty::Dynamic, true));
    }
    let etys: Vec<Ty> = types.iter().filter_map(|t| t.element().cloned()).collect();
    let ret = make(unify(&etys, unsafe_)?.0);
    all_convert(types, &ret, unsafe_).then_some((ret, false))
}

fn unify_objects_as_maps(types: &[Ty], unsafe_: bool) -> Option<(Ty, bool)> {
    unify_after_collapsing(
        types,
        unsafe_,
        |t| matches!(t, Ty::Object(_)),
        unify_objects_to_map,
        |t| matches!(t, Ty::Map(_)),
    )
}

fn unify_tuples_as_list(types: &[Ty], unsafe_: bool) -> Option<(Ty, bool)> {
    unify_after_collapsing(
        types,
        unsafe_,
        |t| matches!(t, Ty::Tuple(_)),
        unify_tuples_to_list,
        |t| matches!(t, Ty::List(_)),
    )
}

/// A unification step: the unified type, and whether the conversion is unsafe.
type Unifier = fn(&[Ty], bool) -> Option<(Ty, bool)>;

/// Collapses the structural members of `types` (objects or tuples) into one
/// collection type, then unifies that with the rest; the result must be of
/// the collection kind.
fn unify_after_collapsing(
    types: &[Ty],
    unsafe_: bool,
    is_structural: fn(&Ty) -> bool,
    collapse: Unifier,
    is_collection: fn(&Ty) -> bool,
) -> Option<(Ty, bool)> {
    let structural: Vec<Ty> = types.iter().filter(|t| is_structural(t)).cloned().collect();
    let (collection, _) = collapse(&structural, unsafe_)?;
    let replaced: Vec<Ty> = types
        .iter()
        .map(|t| {
            if is_structural(t) {
                collection.clone()
            } else {
                t.clone()
            }
        })
        .collect();
    let (t, u) = unify(&replaced, unsafe_)?;
    is_collection(&t).then_some((t, u))
}

fn unify_objects(types: &[Ty], unsafe_: bool, has_dynamic: bool) -> Option<(Ty, bool)> {
    if has_dynamic {
        return Some((Ty::Dynamic, true));
    }
    let attrs = |t: &Ty| match t {
        Ty::Object(a) => a.clone(),
        _ => BTreeMap::new(),
    };
    let first = attrs(&types[0]);
    let same_names = types[1..].iter().all(|t| {
        let a = attrs(t);
        a.len() == first.len() && a.keys().all(|k| first.contains_key(k))
    });
    if !same_names {
        return unify_objects_to_map(types, unsafe_);
    }
    let mut ret = BTreeMap::new();
    for name in first.keys() {
        let across: Vec<Ty> = types
            .iter()
            .filter_map(|t| attrs(t).get(name).cloned())
            .collect();
        ret.insert(name.clone(), unify(&across, unsafe_)?.0);
    }
    let ret = Ty::Object(ret);
    if all_convert(types, &ret, unsafe_) {
        Some((ret, false))
    } else {
        unify_objects_to_map(types, unsafe_)
    }
}

fn unify_objects_to_map(types: &[Ty], unsafe_: bool) -> Option<(Ty, bool)> {
    let atys: Vec<Ty> = types
        .iter()
        .flat_map(|t| match t {
            Ty::Object(a) => a.values().cloned().collect(),
            _ => Vec::new(),
        })
        .collect();
    let ret = Ty::Map(Box::new(unify(&atys, unsafe_)?.0));
    all_convert(types, &ret, unsafe_).then_some((ret, false))
}

fn tuple_elems(t: &Ty) -> &[Ty] {
    match t {
        Ty::Tuple(es) => es,
        _ => &[],
    }
}

fn unify_tuples(types: &[Ty], unsafe_: bool, has_dynamic: bool) -> Option<(Ty, bool)> {
    if has_dynamic {
        return Some((Ty::Dynamic, true));
    }
    let len = tuple_elems(&types[0]).len();
    if types.iter().any(|t| tuple_elems(t).len() != len) {
        return unify_tuples_to_list(types, unsafe_);
    }
    let mut ret = Vec::with_capacity(len);
    for i in 0..len {
        let across: Vec<Ty> = types.iter().map(|t| tuple_elems(t)[i].clone()).collect();
        ret.push(unify(&across, unsafe_)?.0);
    }
    let ret = Ty::Tuple(ret);
    if all_convert(types, &ret, unsafe_) {
        Some((ret, false))
    } else {
        unify_tuples_to_list(types, unsafe_)
    }
}

fn unify_tuples_to_list(types: &[Ty], unsafe_: bool) -> Option<(Ty, bool)> {
    let etys: Vec<Ty> = types.iter().flat_map(|t| tuple_elems(t).to_vec()).collect();
    let ret = Ty::List(Box::new(unify(&etys, unsafe_)?.0));
    all_convert(types, &ret, unsafe_).then_some((ret, false))
}

/// cty `sortTypes`: a topological order of preference (Kahn's algorithm,
/// breadth first), padded with index 0 as Go's slice would be.
fn sort_types(types: &[Ty]) -> Vec<usize> {
    let n = types.len();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        for j in i + 1..n {
            match compare_types(&types[i], &types[j]) {
                c if c < 0 => edges[i].push(j),
                c if c > 0 => edges[j].push(i),
                _ => {}
            }
        }
    }
    let mut in_degree = vec![0usize; n];
    for outs in &edges {
        for &j in outs {
            in_degree[j] += 1;
        }
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| in_degree[i] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let i = order[next];
        next += 1;
        for &j in &edges[i] {
            in_degree[j] -= 1;
            if in_degree[j] == 0 {
                order.push(j);
            }
        }
    }
    order.resize(n, 0);
    order
}

/// cty `compareTypes`: negative when `a` is the preferred unification target.
fn compare_types(a: &Ty, b: &Ty) -> i32 {
    if *a == Ty::Dynamic || *b == Ty::Dynamic {
        return match (*a == Ty::Dynamic, *b == Ty::Dynamic) {
            (false, _) => -1,
            (_, false) => 1,
            _ => 0,
        };
    }
    if a.is_primitive() && b.is_primitive() && (*a == Ty::String || *b == Ty::String) {
        return match (*a == Ty::String, *b == Ty::String) {
            (false, _) => 1,
            (_, false) => -1,
            _ => 0,
        };
    }
    match (a, b) {
        (Ty::List(x), Ty::List(y)) | (Ty::Set(x), Ty::Set(y)) | (Ty::Map(x), Ty::Map(y)) => {
            return compare_types(x, y);
        }
        _ => {}
    }
    let (a, b, swap) = match (a, b) {
        (Ty::Tuple(_), Ty::List(_))
        | (Ty::Object(_), Ty::Map(_))
        | (Ty::Set(_), Ty::Tuple(_))
        | (Ty::Set(_), Ty::List(_)) => (b, a, -1),
        _ => (a, b, 1),
    };
    match (a, b) {
        (Ty::Tuple(_) | Ty::List(_), Ty::Set(_)) => -swap,
        (Ty::List(_), Ty::Tuple(_)) => -swap,
        (Ty::Map(_), Ty::Object(_)) => -swap,
        (Ty::Object(x), Ty::Object(y)) => {
            if x.len() != y.len() || x.keys().any(|k| !y.contains_key(k)) {
                return 0;
            }
            supers(x.iter().map(|(k, t)| compare_types(t, &y[k])), swap)
        }
        (Ty::Tuple(x), Ty::Tuple(y)) => {
            if x.len() != y.len() {
                return 0;
            }
            supers(x.iter().zip(y).map(|(p, q)| compare_types(p, q)), swap)
        }
        _ => 0,
    }
}

fn supers(cmps: impl Iterator<Item = i32>, swap: i32) -> i32 {
    let (mut a_super, mut b_super) = (false, false);
    for c in cmps {
        a_super |= c < 0;
        b_super |= c > 0;
    }
    match (a_super, b_super) {
        (true, false) => -swap,
        (false, true) => swap,
        _ => 0,
    }
}

/// cty `convert.MismatchMessage`.
fn mismatch_message(got: &Ty, want: &Ty) -> String {
    match (got, want) {
        (Ty::Object(_), Ty::Object(_)) => mismatch_objects(got, want),
        (Ty::Tuple(_), Ty::List(e)) if **e == Ty::Dynamic => {
            "all list elements must have the same type".into()
        }
        (Ty::Tuple(_), Ty::Set(e)) if **e == Ty::Dynamic => {
            "all set elements must have the same type".into()
        }
        (Ty::Object(_), Ty::Map(e)) if **e == Ty::Dynamic => {
            "all map elements must have the same type".into()
        }
        (Ty::Tuple(_) | Ty::Object(_), w) if w.is_collection() => {
            mismatch_from_structural(got, want)
        }
        (g, w) if g.is_collection() && w.is_collection() => mismatch_from_collections(got, want),
        _ if !likely_confusing(got, want) => {
            format!(
                "{} required, but have {}",
                want.friendly(false),
                got.friendly(false)
            )
        }
        _ => format!("{} required", want.friendly(true)),
    }
}

fn mismatch_objects(got: &Ty, want: &Ty) -> String {
    let (Ty::Object(got_a), Ty::Object(want_a)) = (got, want) else {
        return "incorrect object attributes".into();
    };
    let missing: Vec<String> = want_a
        .keys()
        .filter(|k| !got_a.contains_key(*k))
        .map(|k| go_quote(k))
        .collect();
    match missing.as_slice() {
        [] => {}
        [one] => return format!("attribute {one} is required"),
        [a, b] => return format!("attributes {a} and {b} are required"),
        [init @ .., last] => {
            return format!("attributes {}, and {last} are required", init.join(", "));
        }
    }
    let (mut unsafe_mismatch, mut safe_mismatch) = (None, None);
    for (name, w) in want_a {
        let Some(g) = got_a.get(name) else { continue };
        if g == w || unsafe_mismatch.is_some() {
            continue;
        }
        let msg = || format!("attribute {}: {}", go_quote(name), mismatch_message(g, w));
        if !conversion_exists(g, w, true) {
            unsafe_mismatch = Some(msg());
        }
        if safe_mismatch.is_none() && !conversion_exists(g, w, false) {
            safe_mismatch = Some(msg());
        }
    }
    unsafe_mismatch
        .or(safe_mismatch)
        .unwrap_or_else(|| "incorrect object attributes".into())
}

fn mismatch_from_structural(got: &Ty, want: &Ty) -> String {
    let required = || format!("{} required", want.friendly(true));
    let Some(wety) = want.element() else {
        return required();
    };
    match (got, want) {
        (Ty::Tuple(etys), Ty::List(_) | Ty::Set(_)) => {
            for (i, g) in etys.iter().enumerate() {
                if g != wety && !conversion_exists(g, wety, true) {
                    return format!("element {i}: {}", mismatch_message(g, wety));
                }
            }
            format!("all elements must be {}", wety.friendly(true))
        }
        (Ty::Object(atys), Ty::Map(_)) => {
            for (name, g) in atys {
                if g != wety && !conversion_exists(g, wety, true) {
                    return format!("element {}: {}", go_quote(name), mismatch_message(g, wety));
                }
            }
            format!("all elements must be {}", wety.friendly(true))
        }
        _ => required(),
    }
}

fn mismatch_from_collections(got: &Ty, want: &Ty) -> String {
    let noun = match (got, want) {
        (Ty::List(_) | Ty::Set(_), Ty::List(_)) => "list element type",
        (Ty::List(_) | Ty::Set(_), Ty::Set(_)) => "set element type",
        (Ty::Map(_), Ty::Map(_)) => "map element type",
        _ => return format!("{} required", want.friendly(true)),
    };
    match (got.element(), want.element()) {
        (Some(g), Some(w)) => format!("incorrect {noun}: {}", mismatch_message(g, w)),
        _ => format!("{} required", want.friendly(true)),
    }
}

/// cty `typesAreLikelyToCauseConfusion`.
fn likely_confusing(got: &Ty, want: &Ty) -> bool {
    if got.is_primitive() != want.is_primitive() || *want == Ty::String {
        return false;
    }
    if matches!((want, got), (Ty::Bool, Ty::Number) | (Ty::Number, Ty::Bool)) {
        return false;
    }
    if let (Some(g), Some(w)) = (got.element(), want.element()) {
        if !g.has_dynamic() && w.has_dynamic() {
            return false;
        }
    }
    !matches!((got, want), (Ty::Tuple(_), Ty::Object(_)))
}

// ---------------------------------------------------------------------------
// Spec compilation (hclspecutils.Convert)

/// An hclspec with names resolved, types parsed and literals evaluated.
#[derive(Debug, Clone)]
enum Dec {
    Object(Vec<(String, Dec)>),
    Tuple(Vec<Dec>),
    Attr {
        name: String,
        ty: Ty,
        required: bool,
    },
    Block {
        name: String,
        required: bool,
        nested: Box<Dec>,
    },
    BlockAttrs {
        name: String,
        ty: Ty,
        required: bool,
    },
    BlockList {
        name: String,
        min: u64,
        max: u64,
        set: bool,
        nested: Box<Dec>,
    },
    BlockMap {
        name: String,
        labels: Vec<String>,
        nested: Box<Dec>,
    },
    Default {
        primary: Box<Dec>,
        default: Box<Dec>,
    },
    Literal(TVal),
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn compile(spec: &Spec, implied: &str, path: &str) -> Result<Dec, HclDecodeError> {
    let resolve = |name: &str| {
        if name.is_empty() {
            implied.to_string()
        } else {
            name.to_string()
        }
    };
    let need_name = |name: &str, kind: &str, what: &str| {
        if name.is_empty() {
            Err(invalid_spec(
                path,
                format!("Missing name in {kind} spec"),
                format!(
                    "The name attribute is required, to specify the {what} name that is expected in an input HCL file."
                ),
            ))
        } else {
            Ok(())
        }
    };
    let nested = |spec: &Spec, name: &str| compile(spec, "", &join(path, name)).map(Box::new);
    Ok(match spec {
        Spec::Object(fields) => Dec::Object(
            fields
                .iter()
                .map(|(k, s)| Ok((k.clone(), compile(s, k, &join(path, k))?)))
                .collect::<Result<_, HclDecodeError>>()?,
        ),
        Spec::Array(items) => Dec::Tuple(
            items
                .iter()
                .enumerate()
                .map(|(i, s)| compile(s, "", &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Spec::Attr { name, ty, required } => {
            let ty = parse_type_expr(ty).map_err(|(s, d)| invalid_spec(path, s, d))?;
            let name = resolve(name);
            need_name(&name, "attribute", "attribute")?;
            Dec::Attr {
                name,
                ty,
                required: *required,
            }
        }
        Spec::Block {
            name,
            required,
            nested: n,
        } => {
            let name = resolve(name);
            Dec::Block {
                nested: nested(n, &name)?,
                name,
                required: *required,
            }
        }
        Spec::BlockAttrs { name, ty, required } => {
            let ty = parse_type_expr(ty).map_err(|(s, d)| invalid_spec(path, s, d))?;
            let name = resolve(name);
            need_name(&name, "block_attrs", "block attr")?;
            Dec::BlockAttrs {
                name,
                ty,
                required: *required,
            }
        }
        Spec::BlockList {
            name,
            min_items,
            max_items,
            nested: n,
        }
        | Spec::BlockSet {
            name,
            min_items,
            max_items,
            nested: n,
        } => {
            let set = matches!(spec, Spec::BlockSet { .. });
            let name = resolve(name);
            let nested = nested(n, &name)?;
            need_name(
                &name,
                if set { "block_set" } else { "block_list" },
                "block type",
            )?;
            Dec::BlockList {
                name,
                min: *min_items,
                max: *max_items,
                set,
                nested,
            }
        }
        Spec::BlockMap {
            name,
            labels,
            nested: n,
        } => {
            let name = resolve(name);
            let nested = nested(n, &name)?;
            need_name(&name, "block_map", "block type")?;
            if labels.is_empty() {
                return Err(invalid_spec(
                    path,
                    "Invalid block label name list",
                    "A block_map must have at least one label specified.",
                ));
            }
            Dec::BlockMap {
                name,
                labels: labels.clone(),
                nested,
            }
        }
        Spec::Default { primary, default } => Dec::Default {
            primary: Box::new(compile(primary, "", path)?),
            default: Box::new(compile(default, "", path)?),
        },
        Spec::Literal(text) => {
            let expr = Expression::from_str(text).map_err(|e| {
                invalid_spec(
                    path,
                    "Invalid literal",
                    format!("{text:?} does not parse: {e}"),
                )
            })?;
            let value = expr.evaluate(&Context::new()).map_err(|e| {
                invalid_spec(
                    path,
                    "Invalid literal",
                    format!("{text:?} does not evaluate: {e}"),
                )
            })?;
            Dec::Literal(
                TVal::from_hcl(value).map_err(|d| invalid_spec(path, "Invalid literal", d))?,
            )
        }
    })
}

/// Parses an hclspec type expression (`string`, `list(map(number))`,
/// `object({name = string})`, ...) as Nomad's `evalTypeExpr` does; `null`
/// means `any`. Errors are (summary, detail).
fn parse_type_expr(text: &str) -> Result<Ty, (String, String)> {
    let expr = Expression::from_str(text).map_err(|e| {
        (
            "Invalid type expression".to_string(),
            format!("{text:?} does not parse: {e}"),
        )
    })?;
    type_of_expr(&expr)
}

fn type_of_expr(expr: &Expression) -> Result<Ty, (String, String)> {
    let not_a_type = |what: &str| {
        (
            "Invalid type expression".to_string(),
            format!("A type is required, not {what}."),
        )
    };
    match expr {
        Expression::Null => Ok(Ty::Dynamic),
        Expression::Parenthesis(inner) => type_of_expr(inner),
        Expression::Variable(v) => match v.as_str() {
            "string" => Ok(Ty::String),
            "number" => Ok(Ty::Number),
            "bool" => Ok(Ty::Bool),
            "any" => Ok(Ty::Dynamic),
            other => Err((
                "Unknown variable".to_string(),
                format!("There is no variable named {}.", go_quote(other)),
            )),
        },
        Expression::FuncCall(call) => {
            let name = call.name.name.as_str();
            if !call.name.namespace.is_empty()
                || !matches!(name, "list" | "set" | "map" | "tuple" | "object")
            {
                return Err((
                    "Call to unknown function".to_string(),
                    format!(
                        "There is no function named {}.",
                        go_quote(&call.name.to_string())
                    ),
                ));
            }
            let [arg] = call.args.as_slice() else {
                return Err((
                    "Invalid type expression".to_string(),
                    format!("Function {name:?} expects exactly one argument."),
                ));
            };
            match (name, arg) {
                ("list", a) => Ok(Ty::List(Box::new(type_of_expr(a)?))),
                ("set", a) => Ok(Ty::Set(Box::new(type_of_expr(a)?))),
                ("map", a) => Ok(Ty::Map(Box::new(type_of_expr(a)?))),
                ("tuple", Expression::Array(items)) => Ok(Ty::Tuple(
                    items.iter().map(type_of_expr).collect::<Result<_, _>>()?,
                )),
                ("object", Expression::Object(fields)) => {
                    let mut atys = BTreeMap::new();
                    for (k, v) in fields {
                        let key = match k {
                            hcl::ObjectKey::Identifier(id) => id.to_string(),
                            hcl::ObjectKey::Expression(Expression::String(s)) => s.clone(),
                            hcl::ObjectKey::Expression(Expression::Variable(v)) => v.to_string(),
                            _ => return Err(not_a_type("an attribute name")),
                        };
                        atys.insert(key, type_of_expr(v)?);
                    }
                    Ok(Ty::Object(atys))
                }
                ("tuple", _) => Err(not_a_type("a non-list argument to tuple")),
                _ => Err(not_a_type("a non-object argument to object")),
            }
        }
        Expression::String(_) | Expression::TemplateExpr(_) => Err(not_a_type("string")),
        Expression::Number(_) => Err(not_a_type("number")),
        Expression::Bool(_) => Err(not_a_type("bool")),
        Expression::Array(_) => Err(not_a_type("tuple")),
        Expression::Object(_) => Err(not_a_type("object")),
        _ => Err(not_a_type("this expression")),
    }
}

impl Dec {
    /// hcldec `impliedType`.
    fn implied_type(&self) -> Ty {
        match self {
            Dec::Object(fields) => Ty::Object(
                fields
                    .iter()
                    .map(|(k, d)| (k.clone(), d.implied_type()))
                    .collect(),
            ),
            Dec::Tuple(items) => Ty::Tuple(items.iter().map(Dec::implied_type).collect()),
            Dec::Attr { ty, .. } => ty.clone(),
            Dec::Block { nested, .. } => nested.implied_type(),
            Dec::BlockAttrs { ty, .. } => Ty::Map(Box::new(ty.clone())),
            Dec::BlockList { nested, set, .. } => {
                let e = Box::new(nested.implied_type());
                if *set {
                    Ty::Set(e)
                } else {
                    Ty::List(e)
                }
            }
            Dec::BlockMap { labels, nested, .. } => labels
                .iter()
                .fold(nested.implied_type(), |t, _| Ty::Map(Box::new(t))),
            Dec::Default { primary, .. } => primary.implied_type(),
            Dec::Literal(v) => v.ty(),
        }
    }

    /// hcldec `attrSpec.attrSchemata`, or `None` if not an attribute spec.
    fn attr_schemata(&self) -> Option<Vec<(String, bool)>> {
        match self {
            Dec::Attr { name, required, .. } => Some(vec![(name.clone(), *required)]),
            Dec::Default { primary, default } => {
                let mut out = primary.attr_schemata().unwrap_or_default();
                out.extend(default.attr_schemata().unwrap_or_default());
                Some(out)
            }
            _ => None,
        }
    }

    /// hcldec `blockSpec.blockHeaderSchemata`: (type, label names).
    fn block_schemata(&self) -> Option<Vec<(String, Vec<String>)>> {
        match self {
            Dec::Block { name, .. }
            | Dec::BlockAttrs { name, .. }
            | Dec::BlockList { name, .. } => Some(vec![(name.clone(), Vec::new())]),
            Dec::BlockMap { name, labels, .. } => Some(vec![(name.clone(), labels.clone())]),
            Dec::Default { primary, .. } => Some(primary.block_schemata().unwrap_or_default()),
            _ => None,
        }
    }

    fn same_body_children(&self) -> Vec<&Dec> {
        match self {
            Dec::Object(fields) => fields.iter().map(|(_, d)| d).collect(),
            Dec::Tuple(items) => items.iter().collect(),
            Dec::Default { primary, default } => vec![primary, default],
            _ => Vec::new(),
        }
    }
}

/// hcldec `ImpliedSchema`. As in hcldec, an attribute under a `Default` is
/// listed twice, so a required one always reports "Missing required argument".
#[derive(Default)]
struct Schema {
    attrs: Vec<(String, bool)>,
    blocks: Vec<(String, Vec<String>)>,
}

fn implied_schema(dec: &Dec) -> Schema {
    fn visit(d: &Dec, schema: &mut Schema) {
        if let Some(a) = d.attr_schemata() {
            schema.attrs.extend(a);
        }
        if let Some(b) = d.block_schemata() {
            schema.blocks.extend(b);
        }
        for child in d.same_body_children() {
            visit(child, schema);
        }
    }
    let mut schema = Schema::default();
    visit(dec, &mut schema);
    schema
}

// ---------------------------------------------------------------------------
// Decoding

/// A body's content once checked against a schema (`hcl.BodyContent`).
struct Content<'a> {
    attrs: HashMap<&'a str, &'a hcl::Attribute>,
    blocks: Vec<&'a hcl::Block>,
}

/// hclsyntax `Body.Content`: the first diagnostic in hcl's order.
fn body_content<'a>(
    body: &'a Body,
    schema: &Schema,
    path: &str,
) -> Result<Content<'a>, HclDecodeError> {
    let mut present: HashMap<&str, &hcl::Attribute> = HashMap::new();
    for attr in body.attributes() {
        if present.insert(attr.key.as_str(), attr).is_some() {
            return Err(invalid(
                join(path, attr.key.as_str()),
                "Duplicate argument",
                format!(
                    "The argument {} was already set. Each argument may be set only once.",
                    go_quote(attr.key.as_str())
                ),
            ));
        }
    }
    let mut content = Content {
        attrs: HashMap::new(),
        blocks: Vec::new(),
    };
    let mut hidden: HashSet<&str> = HashSet::new();
    for (name, required) in &schema.attrs {
        match present.get(name.as_str()) {
            Some(attr) if !hidden.contains(name.as_str()) => {
                hidden.insert(attr.key.as_str());
                content.attrs.insert(attr.key.as_str(), attr);
            }
            _ if *required => {
                return Err(invalid(
                    join(path, name),
                    "Missing required argument",
                    format!(
                        "The argument {} is required, but no definition was found.",
                        go_quote(name)
                    ),
                ));
            }
            _ => {}
        }
    }
    let wanted: HashMap<&str, &Vec<String>> = schema
        .blocks
        .iter()
        .map(|(t, labels)| (t.as_str(), labels))
        .collect();
    for block in body.blocks() {
        let ty = block.identifier.as_str();
        let Some(labels) = wanted.get(ty) else {
            continue;
        };
        let names = labels.join(", ");
        if block.labels.len() > labels.len() {
            let detail = if labels.is_empty() {
                format!("No labels are expected for {ty} blocks.")
            } else {
                format!(
                    "Only {} labels ({names}) are expected for {ty} blocks.",
                    labels.len()
                )
            };
            return Err(invalid(
                join(path, ty),
                format!("Extraneous label for {ty}"),
                detail,
            ));
        }
        if block.labels.len() < labels.len() {
            return Err(invalid(
                join(path, ty),
                format!("Missing {} for {ty}", labels[block.labels.len()]),
                format!(
                    "All {ty} blocks must have {} labels ({names}).",
                    labels.len()
                ),
            ));
        }
        content.blocks.push(block);
    }
    for attr in body.attributes() {
        let name = attr.key.as_str();
        if hidden.contains(name) {
            continue;
        }
        let candidates = schema
            .attrs
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !content.attrs.contains_key(n));
        let hint = match name_suggestion(name, candidates) {
            Some(s) => format!(" Did you mean {}?", go_quote(s)),
            None if wanted.contains_key(name) => {
                format!(
                    " Did you mean to define a block of type {}?",
                    go_quote(name)
                )
            }
            None => String::new(),
        };
        return Err(invalid(
            join(path, name),
            "Unsupported argument",
            format!(
                "An argument named {} is not expected here.{hint}",
                go_quote(name)
            ),
        ));
    }
    for block in body.blocks() {
        let ty = block.identifier.as_str();
        if wanted.contains_key(ty) {
            continue;
        }
        let hint = match name_suggestion(ty, schema.blocks.iter().map(|(t, _)| t.as_str())) {
            Some(s) => format!(" Did you mean {}?", go_quote(s)),
            None if schema.attrs.iter().any(|(n, _)| n == ty) => format!(
                " Did you mean to define argument {}? If so, use the equals sign to assign it a value.",
                go_quote(ty)
            ),
            None => String::new(),
        };
        return Err(invalid(
            join(path, ty),
            "Unsupported block type",
            format!(
                "Blocks of type {} are not expected here.{hint}",
                go_quote(ty)
            ),
        ));
    }
    Ok(content)
}

/// hclsyntax `nameSuggestion`: the first candidate within edit distance 2.
fn name_suggestion<'a>(given: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates.into_iter().find(|c| levenshtein(given, c) < 3)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn decode_block_body(
    dec: &Dec,
    body: &Body,
    ctx: &Context<'_>,
    path: &str,
) -> Result<TVal, HclDecodeError> {
    let content = body_content(body, &implied_schema(dec), path)?;
    decode_content(dec, &content, ctx, path)
}

fn blocks_named<'a>(content: &Content<'a>, name: &str) -> Vec<&'a hcl::Block> {
    content
        .blocks
        .iter()
        .copied()
        .filter(|b| b.identifier.as_str() == name)
        .collect()
}

fn evaluate(expr: &Expression, ctx: &Context<'_>, path: &str) -> Result<TVal, HclDecodeError> {
    let value = expr.evaluate(ctx).map_err(|e| {
        let (summary, detail) = match e.kind() {
            hcl::eval::ErrorKind::UndefinedVar(name) => (
                "Unknown variable",
                format!("There is no variable named {}.", go_quote(name.as_str())),
            ),
            hcl::eval::ErrorKind::UndefinedFunc(name) => (
                "Call to unknown function",
                format!(
                    "There is no function named {}.",
                    go_quote(&name.to_string())
                ),
            ),
            hcl::eval::ErrorKind::NoSuchKey(key) => (
                "Unsupported attribute",
                format!(
                    "This object does not have an attribute named {}.",
                    go_quote(key)
                ),
            ),
            hcl::eval::ErrorKind::Index(_) => (
                "Invalid index",
                "The given key does not identify an element in this collection value.".to_string(),
            ),
            _ => ("Invalid expression", e.to_string()),
        };
        invalid(path.to_string(), summary, detail)
    })?;
    TVal::from_hcl(value).map_err(|d| invalid(path.to_string(), "Invalid expression", d))
}

fn decode_content(
    dec: &Dec,
    content: &Content<'_>,
    ctx: &Context<'_>,
    path: &str,
) -> Result<TVal, HclDecodeError> {
    match dec {
        Dec::Object(fields) => {
            let mut out = BTreeMap::new();
            for (k, d) in fields {
                out.insert(k.clone(), decode_content(d, content, ctx, path)?);
            }
            Ok(TVal::Object(out))
        }
        Dec::Tuple(items) => Ok(TVal::Tuple(
            items
                .iter()
                .map(|d| decode_content(d, content, ctx, path))
                .collect::<Result<_, _>>()?,
        )),
        Dec::Attr { name, ty, .. } => {
            let Some(attr) = content.attrs.get(name.as_str()) else {
                return Ok(TVal::Null(ty.clone()));
            };
            let at = join(path, name);
            let value = evaluate(&attr.expr, ctx, &at)?;
            convert(value, ty).map_err(|msg| {
                invalid(
                    at,
                    "Incorrect attribute value type",
                    format!(
                        "Inappropriate value for attribute {}: {msg}.",
                        go_quote(name)
                    ),
                )
            })
        }
        Dec::Block {
            name,
            required,
            nested,
        } => {
            let at = join(path, name);
            match blocks_named(content, name).as_slice() {
                [] if *required => Err(missing_block(at, name)),
                [] => Ok(TVal::Null(nested.implied_type())),
                [block] => decode_block_body(nested, &block.body, ctx, &at),
                _ => Err(duplicate_block(at, name)),
            }
        }
        Dec::BlockAttrs { name, ty, required } => {
            let at = join(path, name);
            let block = match blocks_named(content, name).as_slice() {
                [] if *required => return Err(missing_block(at, name)),
                [] => return Ok(TVal::Null(Ty::Map(Box::new(ty.clone())))),
                [block] => *block,
                _ => return Err(duplicate_block(at, name)),
            };
            decode_block_attrs(name, ty, &block.body, ctx, &at)
        }
        Dec::BlockList {
            name,
            min,
            max,
            set,
            nested,
        } => decode_block_list(name, *min, *max, *set, nested, content, ctx, path),
        Dec::BlockMap { name, nested, .. } => decode_block_map(name, nested, content, ctx, path),
        Dec::Default { primary, default } => {
            let v = decode_content(primary, content, ctx, path)?;
            if v.is_null() {
                decode_content(default, content, ctx, path)
            } else {
                Ok(v)
            }
        }
        Dec::Literal(v) => Ok(v.clone()),
    }
}

fn missing_block(at: String, name: &str) -> HclDecodeError {
    invalid(
        at,
        format!("Missing {name} block"),
        format!("A block of type {} is required here.", go_quote(name)),
    )
}

fn duplicate_block(at: String, name: &str) -> HclDecodeError {
    invalid(
        at,
        format!("Duplicate {name} block"),
        format!("Only one block of type {} is allowed.", go_quote(name)),
    )
}

/// hcldec `BlockAttrsSpec`: the block's attributes as a map of `ty`.
fn decode_block_attrs(
    name: &str,
    ty: &Ty,
    body: &Body,
    ctx: &Context<'_>,
    at: &str,
) -> Result<TVal, HclDecodeError> {
    if let Some(block) = body.blocks().next() {
        let ty = block.identifier.as_str();
        return Err(invalid(
            join(at, ty),
            format!("Unexpected {} block", go_quote(ty)),
            "Blocks are not allowed here.",
        ));
    }
    let mut vals = BTreeMap::new();
    for attr in body.attributes() {
        let key = attr.key.as_str();
        let attr_at = join(at, key);
        if vals.contains_key(key) {
            return Err(invalid(
                attr_at,
                "Duplicate argument",
                format!(
                    "The argument {} was already set. Each argument may be set only once.",
                    go_quote(key)
                ),
            ));
        }
        let value = evaluate(&attr.expr, ctx, &attr_at)?;
        let value = convert(value, ty).map_err(|msg| {
            invalid(
                attr_at.clone(),
                "Invalid attribute value",
                format!(
                    "Invalid value for attribute of {} block: {msg}.",
                    go_quote(name)
                ),
            )
        })?;
        vals.insert(key.to_string(), value);
    }
    if vals.is_empty() {
        return Ok(TVal::Map(ty.clone(), vals));
    }
    // cty.MapVal panics on mixed element types (possible with `any`).
    let ety = common_type(vals.values()).ok_or_else(|| {
        invalid(
            at.to_string(),
            "Invalid attribute value",
            format!(
                "Attributes of {} blocks must all have the same type.",
                go_quote(name)
            ),
        )
    })?;
    Ok(TVal::Map(ety, vals))
}

#[allow(clippy::too_many_arguments)]
fn decode_block_list(
    name: &str,
    min: u64,
    max: u64,
    set: bool,
    nested: &Dec,
    content: &Content<'_>,
    ctx: &Context<'_>,
    path: &str,
) -> Result<TVal, HclDecodeError> {
    let at = join(path, name);
    let mut elems = Vec::new();
    for (i, block) in blocks_named(content, name).into_iter().enumerate() {
        elems.push(decode_block_body(
            nested,
            &block.body,
            ctx,
            &format!("{at}[{i}]"),
        )?);
    }
    let count = elems.len() as u64;
    if count < min {
        return Err(invalid(
            at,
            format!("Insufficient {name} blocks"),
            format!("At least {min} {} blocks are required.", go_quote(name)),
        ));
    }
    if max > 0 && count > max {
        return Err(invalid(
            format!("{at}[{max}]"),
            format!("Too many {name} blocks"),
            format!("No more than {max} {} blocks are allowed", go_quote(name)),
        ));
    }
    if elems.is_empty() {
        let ety = nested.implied_type();
        return Ok(if set {
            TVal::Set(ety, elems)
        } else {
            TVal::List(ety, elems)
        });
    }
    let inconsistent = |at: String, detail: String| {
        invalid(
            at,
            format!("Unconsistent argument types in {name} blocks"),
            detail,
        )
    };
    let tys: Vec<Ty> = elems.iter().map(TVal::ty).collect();
    let (ety, to_unknown) = unify(&tys, true).ok_or_else(|| {
        inconsistent(
            format!("{at}[0]"),
            "Corresponding attributes in all blocks of this type must be the same.".into(),
        )
    })?;
    let mut converted = Vec::with_capacity(elems.len());
    for (i, e) in elems.into_iter().enumerate() {
        let e = if e.ty() == ety || to_unknown {
            e
        } else {
            convert(e, &ety).map_err(|err| {
                inconsistent(
                    format!("{at}[{i}]"),
                    format!("Block with index {i} has inconsistent argument types: {err}."),
                )
            })?
        };
        converted.push(e);
    }
    // hcldec would produce unknown values (or panic) where cty cannot build
    // the collection; that is never a valid config, so report it.
    let ety = common_type(&converted)
        .filter(|_| !to_unknown)
        .ok_or_else(|| {
            inconsistent(
                at.clone(),
                "Corresponding attributes in all blocks of this type must be the same.".into(),
            )
        })?;
    Ok(if set {
        make_set(ety, converted)
    } else {
        TVal::List(ety, converted)
    })
}

/// Labelled blocks as (nested) maps keyed by label, built before typing.
enum LabelTree {
    Leaf(TVal),
    Node(BTreeMap<String, LabelTree>),
}

/// Inserts `value` under its labels; false if that key is already taken.
fn insert_labelled(tree: &mut BTreeMap<String, LabelTree>, labels: &[&str], value: TVal) -> bool {
    match labels {
        [] => false,
        [last] => {
            if tree.contains_key(*last) {
                return false;
            }
            tree.insert((*last).to_string(), LabelTree::Leaf(value));
            true
        }
        [first, rest @ ..] => match tree
            .entry((*first).to_string())
            .or_insert_with(|| LabelTree::Node(BTreeMap::new()))
        {
            LabelTree::Node(children) => insert_labelled(children, rest, value),
            LabelTree::Leaf(_) => false,
        },
    }
}

fn decode_block_map(
    name: &str,
    nested: &Dec,
    content: &Content<'_>,
    ctx: &Context<'_>,
    path: &str,
) -> Result<TVal, HclDecodeError> {
    let at = join(path, name);
    if nested.implied_type().has_dynamic() {
        return Err(invalid_spec(
            &at,
            "Invalid block_map spec",
            "cty.DynamicPseudoType attributes may not be used inside a BlockMapSpec",
        ));
    }
    let mut root: BTreeMap<String, LabelTree> = BTreeMap::new();
    for block in blocks_named(content, name) {
        let labels: Vec<&str> = block.labels.iter().map(|l| l.as_str()).collect();
        let key_path: String = labels
            .iter()
            .map(|l| format!("[{}]", go_quote(l)))
            .collect();
        let value = decode_block_body(nested, &block.body, ctx, &format!("{at}{key_path}"))?;
        if !insert_labelled(&mut root, &labels, value) {
            let quoted: String = labels.iter().map(|l| format!(" {}", go_quote(l))).collect();
            return Err(invalid(
                format!("{at}{key_path}"),
                format!("Duplicate {name} block"),
                format!("A block for {name}{quoted} was already defined. The {name} labels must be unique."),
            ));
        }
    }
    if root.is_empty() {
        return Ok(TVal::Map(nested.implied_type(), BTreeMap::new()));
    }
    fn to_map(tree: BTreeMap<String, LabelTree>, at: &str) -> Result<TVal, HclDecodeError> {
        let vals = tree
            .into_iter()
            .map(|(k, t)| {
                let v = match t {
                    LabelTree::Leaf(v) => v,
                    LabelTree::Node(children) => to_map(children, at)?,
                };
                Ok((k, v))
            })
            .collect::<Result<BTreeMap<_, _>, HclDecodeError>>()?;
        let ety = common_type(vals.values()).ok_or_else(|| {
            invalid(
                at.to_string(),
                "Inconsistent block types",
                "All blocks of this type must decode to the same type.",
            )
        })?;
        Ok(TVal::Map(ety, vals))
    }
    to_map(root, &at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nomad::cty::tests::decode as decode_msgpack;

    fn ctx() -> Context<'static> {
        Context::new()
    }

    fn decode(spec: &Spec, src: &str) -> Result<CtyValue, HclDecodeError> {
        let body = hcl::parse(src).expect("test HCL parses");
        decode_body(spec, &body, &ctx())
    }

    fn ok(spec: &Spec, src: &str) -> CtyValue {
        match decode(spec, src) {
            Ok(v) => v,
            Err(e) => panic!("decode failed: {e}"),
        }
    }

    fn err(spec: &Spec, src: &str) -> HclDecodeError {
        match decode(spec, src) {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e,
        }
    }

    fn s(v: &str) -> CtyValue {
        CtyValue::string(v)
    }

    fn n(v: &str) -> CtyValue {
        CtyValue::Number(v.parse().expect("number"))
    }

    fn list(items: impl IntoIterator<Item = CtyValue>) -> CtyValue {
        CtyValue::List(items.into_iter().collect())
    }

    fn one(ty: &str) -> Spec {
        Spec::object([("x", Spec::attr(ty))])
    }

    fn x(v: CtyValue) -> CtyValue {
        CtyValue::map([("x", v)])
    }

    /// `Display` of the error, for message assertions.
    fn msg(e: &HclDecodeError) -> String {
        e.to_string()
    }

    #[test]
    fn attr_primitive_types_and_conversions() {
        assert_eq!(ok(&one("string"), r#"x = "hi""#), x(s("hi")));
        assert_eq!(ok(&one("string"), "x = 5"), x(s("5")));
        assert_eq!(ok(&one("string"), "x = 1.5"), x(s("1.5")));
        assert_eq!(ok(&one("string"), "x = true"), x(s("true")));
        assert_eq!(ok(&one("number"), "x = 5"), x(n("5")));
        assert_eq!(ok(&one("number"), r#"x = "42""#), x(n("42")));
        assert_eq!(ok(&one("number"), r#"x = "0.1""#), x(n("0.1")));
        assert_eq!(ok(&one("number"), "x = 1 + 1"), x(n("2")));
        assert_eq!(ok(&one("bool"), "x = false"), x(CtyValue::Bool(false)));
        assert_eq!(ok(&one("bool"), r#"x = "true""#), x(CtyValue::Bool(true)));
        assert_eq!(ok(&one("bool"), r#"x = "0""#), x(CtyValue::Bool(false)));
    }

    #[test]
    fn attr_conversion_failures_name_attribute_and_type() {
        let e = err(&one("number"), r#"x = "five""#);
        assert_eq!(e.summary(), Some("Incorrect attribute value type"));
        assert_eq!(e.path(), Some("x"));
        assert_eq!(
            msg(&e),
            "x: Incorrect attribute value type; Inappropriate value for attribute \"x\": a number is required."
        );
        let e = err(&one("bool"), r#"x = "yes""#);
        assert!(msg(&e).ends_with("\"x\": a bool is required."), "{e}");
        let e = err(&one("bool"), r#"x = "TRUE""#);
        assert!(
            msg(&e).contains("use lowercase \\\"true\\\"")
                || msg(&e).contains("use lowercase \"true\""),
            "{e}"
        );
        let e = err(&one("bool"), "x = 1");
        assert!(msg(&e).ends_with("bool required, but have number."), "{e}");
        let e = err(&one("string"), r#"x = ["a"]"#);
        assert!(msg(&e).ends_with("string required, but have tuple."), "{e}");
        let e = err(&one("list(number)"), r#"x = [1, "a"]"#);
        assert!(msg(&e).ends_with(": a number is required."), "{e}");
        let e = err(&one("list(string)"), "x = { a = 1 }");
        assert!(msg(&e).ends_with(": list of string required."), "{e}");
        let e = err(&one("list(any)"), "x = [1, true]");
        assert!(
            msg(&e).ends_with(": all list elements must have the same type."),
            "{e}"
        );
        let e = err(&one("list(string)"), "x = [[1]]");
        assert!(
            msg(&e).ends_with(": element 0: string required, but have tuple."),
            "{e}"
        );
        let e = err(&one("map(string)"), r#"x = { a = ["b"] }"#);
        assert!(
            msg(&e).ends_with(": element \"a\": string required, but have tuple."),
            "{e}"
        );
        let e = err(&one("object({a = string, b = number})"), r#"x = { c = 1 }"#);
        assert!(
            msg(&e).ends_with(": attributes \"a\" and \"b\" are required."),
            "{e}"
        );
        let e = err(&one("object({a = bool})"), r#"x = { a = [] }"#);
        assert!(
            msg(&e).ends_with(": attribute \"a\": bool required, but have tuple."),
            "{e}"
        );
        let e = err(&one("tuple([string, string])"), r#"x = ["a"]"#);
        assert!(msg(&e).ends_with(": tuple required."), "{e}");
    }

    #[test]
    fn attr_collection_types() {
        assert_eq!(
            ok(&one("list(string)"), r#"x = ["a", 1, true]"#),
            x(list([s("a"), s("1"), s("true")]))
        );
        assert_eq!(ok(&one("list(string)"), "x = []"), x(list([])));
        // any keeps a tuple a tuple; list(any) unifies the elements.
        assert_eq!(
            ok(&one("any"), r#"x = ["a", 1]"#),
            x(list([s("a"), n("1")]))
        );
        assert_eq!(
            ok(&one("list(any)"), r#"x = ["a", 1]"#),
            x(list([s("a"), s("1")]))
        );
        assert_eq!(
            ok(&one("list(any)"), r#"x = [["a"], [1, 2]]"#),
            x(list([list([s("a")]), list([s("1"), s("2")])]))
        );
        assert_eq!(
            ok(&one("map(any)"), r#"x = { b = 1, a = "z" }"#),
            x(CtyValue::map([("a", s("z")), ("b", s("1"))]))
        );
        assert_eq!(
            ok(&one("map(number)"), r#"x = { b = 1, a = "2" }"#),
            x(CtyValue::map([("a", n("2")), ("b", n("1"))]))
        );
        // Sets drop duplicates and iterate in cty order (strings sorted).
        assert_eq!(
            ok(&one("set(string)"), r#"x = ["b", "a", "b", 1]"#),
            x(list([s("1"), s("a"), s("b")]))
        );
        assert_eq!(
            ok(&one("set(number)"), r#"x = [10, 9, "9", 1.5]"#),
            x(list([n("1.5"), n("9"), n("10")]))
        );
        assert_eq!(
            ok(&one("set(bool)"), "x = [true, false, null]"),
            x(list([
                CtyValue::Bool(false),
                CtyValue::Bool(true),
                CtyValue::Null
            ]))
        );
        assert_eq!(
            ok(&one("tuple([string, number])"), r#"x = [1, "2"]"#),
            x(list([s("1"), n("2")]))
        );
        assert_eq!(
            ok(
                &one("object({a = string, b = list(number)})"),
                r#"x = { a = 1, b = ["2"], c = 3 }"#
            ),
            x(CtyValue::map([("a", s("1")), ("b", list([n("2")]))]))
        );
        assert_eq!(
            ok(&one("object({a = string})"), r#"x = { a = null }"#),
            x(CtyValue::map([("a", CtyValue::Null)]))
        );
    }

    #[test]
    fn missing_null_and_required_attributes() {
        let spec = Spec::object([
            ("a", Spec::attr("string")),
            ("b", Spec::required_attr("number")),
        ]);
        assert_eq!(
            ok(&spec, "b = 1"),
            CtyValue::map([("a", CtyValue::Null), ("b", n("1"))])
        );
        assert_eq!(
            ok(&spec, "a = null\nb = null"),
            CtyValue::map([("a", CtyValue::Null), ("b", CtyValue::Null)])
        );
        let e = err(&spec, r#"a = "x""#);
        assert_eq!(
            msg(&e),
            "b: Missing required argument; The argument \"b\" is required, but no definition was found."
        );
    }

    #[test]
    fn defaults_apply_when_missing_or_null() {
        let spec = Spec::object([
            (
                "shell",
                Spec::attr_with_default("shell", "string", "\"bash\""),
            ),
            ("n", Spec::attr_with_default("n", "number", "10")),
        ]);
        assert_eq!(
            ok(&spec, ""),
            CtyValue::map([("n", n("10")), ("shell", s("bash"))])
        );
        assert_eq!(
            ok(&spec, "shell = \"zsh\"\nn = null"),
            CtyValue::map([("n", n("10")), ("shell", s("zsh"))])
        );
        // The default is not converted to the primary's type, as in hcldec.
        let odd = Spec::object([("v", Spec::attr_with_default("v", "string", "3"))]);
        assert_eq!(ok(&odd, ""), CtyValue::map([("v", n("3"))]));
    }

    #[test]
    fn required_attribute_under_default_always_errors_like_hcldec() {
        // hcldec lists it twice in the schema; the second sighting is "missing".
        let spec = Spec::object([(
            "k",
            Spec::Default {
                primary: Box::new(Spec::Attr {
                    name: "k".into(),
                    ty: "string".into(),
                    required: true,
                }),
                default: Box::new(Spec::Literal("\"d\"".into())),
            },
        )]);
        let e = err(&spec, r#"k = "v""#);
        assert_eq!(e.summary(), Some("Missing required argument"));
    }

    #[test]
    fn literals_evaluate_as_hcl_expressions() {
        let spec = Spec::object([
            ("uri", Spec::Literal("\"qemu:///system\"".into())),
            ("count", Spec::Literal("10".into())),
            ("off", Spec::Literal("false".into())),
            ("list", Spec::Literal("[\"a\"]".into())),
            ("none", Spec::Literal("null".into())),
        ]);
        assert_eq!(
            ok(&spec, ""),
            CtyValue::map([
                ("count", n("10")),
                ("list", list([s("a")])),
                ("none", CtyValue::Null),
                ("off", CtyValue::Bool(false)),
                ("uri", s("qemu:///system")),
            ])
        );
    }

    #[test]
    fn array_spec_is_a_tuple_over_the_same_body() {
        let spec = Spec::object([(
            "pair",
            Spec::Array(vec![
                Spec::Attr {
                    name: "a".into(),
                    ty: "string".into(),
                    required: false,
                },
                Spec::Literal("2".into()),
            ]),
        )]);
        assert_eq!(
            ok(&spec, r#"a = "x""#),
            CtyValue::map([("pair", list([s("x"), n("2")]))])
        );
    }

    #[test]
    fn unknown_arguments_and_blocks_are_rejected_with_hints() {
        let spec = Spec::object([
            ("hostname", Spec::attr("string")),
            (
                "disk",
                Spec::block_list(Spec::object([("size", Spec::attr("string"))])),
            ),
        ]);
        assert_eq!(
            msg(&err(&spec, "x = 1")),
            "x: Unsupported argument; An argument named \"x\" is not expected here."
        );
        assert_eq!(
            msg(&err(&spec, "hostnme = \"a\"")),
            "hostnme: Unsupported argument; An argument named \"hostnme\" is not expected here. Did you mean \"hostname\"?"
        );
        assert_eq!(
            msg(&err(&spec, "disk = {}")),
            "disk: Unsupported argument; An argument named \"disk\" is not expected here. Did you mean to define a block of type \"disk\"?"
        );
        assert_eq!(
            msg(&err(&spec, "nic {\n}")),
            "nic: Unsupported block type; Blocks of type \"nic\" are not expected here."
        );
        assert_eq!(
            msg(&err(&spec, "disks {\n}")),
            "disks: Unsupported block type; Blocks of type \"disks\" are not expected here. Did you mean \"disk\"?"
        );
        assert_eq!(
            msg(&err(&spec, "hostname {\n}")),
            "hostname: Unsupported block type; Blocks of type \"hostname\" are not expected here. Did you mean to define argument \"hostname\"? If so, use the equals sign to assign it a value."
        );
        let e = err(&spec, "disk {\n  sise = 2\n}");
        assert_eq!(e.path(), Some("disk[0].sise"));
        assert!(msg(&e).ends_with("Did you mean \"size\"?"), "{e}");
        // Like hcl, arguments already set are not suggested.
        let e = err(&spec, "disk {\n  size = \"1G\"\n  sise = 2\n}");
        assert!(msg(&e).ends_with("is not expected here."), "{e}");
    }

    #[test]
    fn single_blocks() {
        let spec = Spec::object([
            (
                "os",
                Spec::block(Spec::object([("arch", Spec::attr("string"))])),
            ),
            (
                "must",
                Spec::Block {
                    name: String::new(),
                    required: true,
                    nested: Box::new(Spec::object([("v", Spec::attr("number"))])),
                },
            ),
        ]);
        assert_eq!(
            ok(&spec, "must {\n}"),
            CtyValue::map([
                ("must", CtyValue::map([("v", CtyValue::Null)])),
                ("os", CtyValue::Null)
            ])
        );
        assert_eq!(
            ok(&spec, "os {\n  arch = \"x86_64\"\n}\nmust {\n  v = 1\n}"),
            CtyValue::map([
                ("must", CtyValue::map([("v", n("1"))])),
                ("os", CtyValue::map([("arch", s("x86_64"))])),
            ])
        );
        assert_eq!(
            msg(&err(&spec, "")),
            "must: Missing must block; A block of type \"must\" is required here."
        );
        assert_eq!(
            msg(&err(&spec, "must {\n}\nos {\n}\nos {\n}")),
            "os: Duplicate os block; Only one block of type \"os\" is allowed."
        );
        assert_eq!(
            msg(&err(&spec, "must \"x\" {\n}")),
            "must: Extraneous label for must; No labels are expected for must blocks."
        );
    }

    #[test]
    fn block_lists_and_item_limits() {
        let item = Spec::object([("v", Spec::attr("number"))]);
        let spec = Spec::object([(
            "item",
            Spec::BlockList {
                name: String::new(),
                min_items: 1,
                max_items: 2,
                nested: Box::new(item.clone()),
            },
        )]);
        assert_eq!(
            ok(&spec, "item {\n  v = 2\n}\nitem {\n  v = 1\n}"),
            CtyValue::map([(
                "item",
                list([
                    CtyValue::map([("v", n("2"))]),
                    CtyValue::map([("v", n("1"))])
                ])
            )])
        );
        assert_eq!(
            msg(&err(&spec, "")),
            "item: Insufficient item blocks; At least 1 \"item\" blocks are required."
        );
        assert_eq!(
            msg(&err(&spec, "item {\n}\nitem {\n}\nitem {\n}")),
            "item[2]: Too many item blocks; No more than 2 \"item\" blocks are allowed"
        );
        let unlimited = Spec::object([("item", Spec::block_list(item))]);
        assert_eq!(ok(&unlimited, ""), CtyValue::map([("item", list([]))]));
        let many: String = (0..20)
            .map(|i| format!("item {{\n  v = {i}\n}}\n"))
            .collect();
        let CtyValue::Map(m) = ok(&unlimited, &many) else {
            panic!("not a map");
        };
        assert_eq!(
            m["item"],
            list((0..20).map(|i| CtyValue::map([("v", CtyValue::int(i))])))
        );
    }

    #[test]
    fn block_list_with_any_attribute_unifies_across_blocks() {
        let spec = Spec::object([(
            "b",
            Spec::block_list(Spec::object([("v", Spec::attr("any"))])),
        )]);
        assert_eq!(
            ok(&spec, "b {\n  v = 1\n}\nb {\n  v = \"x\"\n}"),
            CtyValue::map([(
                "b",
                list([
                    CtyValue::map([("v", s("1"))]),
                    CtyValue::map([("v", s("x"))])
                ])
            )])
        );
        // A missing `any` attribute is a dynamic null, which unifies with anything.
        assert_eq!(
            ok(&spec, "b {\n  v = 1\n}\nb {\n}"),
            CtyValue::map([(
                "b",
                list([
                    CtyValue::map([("v", n("1"))]),
                    CtyValue::map([("v", CtyValue::Null)])
                ])
            )])
        );
        let e = err(&spec, "b {\n  v = [1]\n}\nb {\n  v = { a = 1 }\n}");
        assert_eq!(e.summary(), Some("Unconsistent argument types in b blocks"));
    }

    #[test]
    fn block_sets_dedupe_and_order() {
        let spec = Spec::object([(
            "port",
            Spec::BlockSet {
                name: String::new(),
                min_items: 0,
                max_items: 0,
                nested: Box::new(Spec::object([("n", Spec::attr("number"))])),
            },
        )]);
        // Ordered by cty's set-hash text: "<443;>" < "<80;>".
        assert_eq!(
            ok(
                &spec,
                "port {\n  n = 80\n}\nport {\n  n = 443\n}\nport {\n  n = 80\n}"
            ),
            CtyValue::map([(
                "port",
                list([
                    CtyValue::map([("n", n("443"))]),
                    CtyValue::map([("n", n("80"))])
                ])
            )])
        );
        assert_eq!(ok(&spec, ""), CtyValue::map([("port", list([]))]));
    }

    #[test]
    fn block_maps_by_labels() {
        let inner = Spec::object([("to", Spec::attr("number"))]);
        let spec = Spec::object([("port", Spec::block_map("name", inner.clone()))]);
        assert_eq!(
            ok(
                &spec,
                "port \"http\" {\n  to = 80\n}\nport \"dns\" {\n  to = 53\n}"
            ),
            CtyValue::map([(
                "port",
                CtyValue::map([
                    ("dns", CtyValue::map([("to", n("53"))])),
                    ("http", CtyValue::map([("to", n("80"))])),
                ])
            )])
        );
        assert_eq!(
            ok(&spec, ""),
            CtyValue::map([("port", CtyValue::map::<String>([]))])
        );
        assert_eq!(
            msg(&err(&spec, "port {\n}")),
            "port: Missing name for port; All port blocks must have 1 labels (name)."
        );
        assert_eq!(
            msg(&err(&spec, "port \"a\" \"b\" {\n}")),
            "port: Extraneous label for port; Only 1 labels (name) are expected for port blocks."
        );
        assert_eq!(
            msg(&err(&spec, "port \"a\" {\n}\nport \"a\" {\n}")),
            "port[\"a\"]: Duplicate port block; A block for port \"a\" was already defined. The port labels must be unique."
        );
        let e = err(&spec, "port \"a\" {\n  to = \"x\"\n}");
        assert_eq!(e.path(), Some("port[\"a\"].to"));

        let two = Spec::object([(
            "rule",
            Spec::BlockMap {
                name: String::new(),
                labels: vec!["proto".into(), "port".into()],
                nested: Box::new(inner),
            },
        )]);
        assert_eq!(
            ok(&two, "rule \"tcp\" \"80\" {\n  to = 8080\n}\nrule \"tcp\" \"22\" {\n  to = 2222\n}\nrule \"udp\" \"53\" {\n  to = 53\n}"),
            CtyValue::map([(
                "rule",
                CtyValue::map([
                    (
                        "tcp",
                        CtyValue::map([
                            ("22", CtyValue::map([("to", n("2222"))])),
                            ("80", CtyValue::map([("to", n("8080"))])),
                        ])
                    ),
                    ("udp", CtyValue::map([("53", CtyValue::map([("to", n("53"))]))])),
                ])
            )])
        );
        assert_eq!(
            msg(&err(&two, "rule \"tcp\" {\n}")),
            "rule: Missing port for rule; All rule blocks must have 2 labels (proto, port)."
        );
    }

    #[test]
    fn block_attrs_become_a_map() {
        let spec = Spec::object([(
            "env",
            Spec::BlockAttrs {
                name: String::new(),
                ty: "string".into(),
                required: false,
            },
        )]);
        assert_eq!(ok(&spec, ""), CtyValue::map([("env", CtyValue::Null)]));
        assert_eq!(
            ok(&spec, "env {\n}"),
            CtyValue::map([("env", CtyValue::map::<String>([]))])
        );
        assert_eq!(
            ok(&spec, "env {\n  B = 1\n  A = \"x\"\n}"),
            CtyValue::map([("env", CtyValue::map([("A", s("x")), ("B", s("1"))]))])
        );
        assert_eq!(
            msg(&err(&spec, "env {\n  nested {\n  }\n}")),
            "env.nested: Unexpected \"nested\" block; Blocks are not allowed here."
        );
        let numbers = Spec::object([(
            "limits",
            Spec::BlockAttrs {
                name: String::new(),
                ty: "number".into(),
                required: true,
            },
        )]);
        assert_eq!(
            msg(&err(&numbers, "limits {\n  cpu = \"lots\"\n}")),
            "limits.cpu: Invalid attribute value; Invalid value for attribute of \"limits\" block: a number is required."
        );
        assert_eq!(err(&numbers, "").summary(), Some("Missing limits block"));
    }

    #[test]
    fn interpolation_uses_context_variables() {
        let spec = Spec::object([
            ("name", Spec::attr("string")),
            ("cpus", Spec::attr("number")),
        ]);
        let mut ctx = Context::new();
        ctx.declare_var("NOMAD_TASK_NAME", "web");
        ctx.declare_var("node", hcl::value!({ cpus = 4 }));
        let body =
            hcl::parse("name = \"${NOMAD_TASK_NAME}-1\"\ncpus = \"${node.cpus}\"").expect("parses");
        assert_eq!(
            decode_body(&spec, &body, &ctx).expect("decodes"),
            CtyValue::map([("cpus", n("4")), ("name", s("web-1"))])
        );
        let body = hcl::parse("name = \"${NOPE}\"").expect("parses");
        let e = decode_body(&spec, &body, &ctx).expect_err("unknown variable");
        assert_eq!(
            msg(&e),
            "name: Unknown variable; There is no variable named \"NOPE\"."
        );
        let body = hcl::parse("name = node.gpus").expect("parses");
        let e = decode_body(&spec, &body, &ctx).expect_err("no such attribute");
        assert_eq!(
            msg(&e),
            "name: Unsupported attribute; This object does not have an attribute named \"gpus\"."
        );
        let body = hcl::parse("name = upper(\"a\")").expect("parses");
        let e = decode_body(&spec, &body, &ctx).expect_err("unknown function");
        assert_eq!(e.summary(), Some("Call to unknown function"));
    }

    #[test]
    fn parse_errors_carry_position() {
        let spec = one("string");
        let e = encode_hcl(&spec, "x = ", &ctx()).expect_err("parse error");
        assert!(matches!(e, HclDecodeError::Parse(_)));
        let source = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(source.contains("line 1, column"), "{source}");
        // hcl-rs, like hcl, allows only one attribute in a one-line block.
        let spec = Spec::object([(
            "b",
            Spec::block(Spec::object([
                ("a", Spec::attr("number")),
                ("c", Spec::attr("number")),
            ])),
        )]);
        assert!(matches!(
            encode_hcl(&spec, "b { a = 1 c = 2 }", &ctx()),
            Err(HclDecodeError::Parse(_))
        ));
        assert!(encode_hcl(&spec, "b { a = 1 }", &ctx()).is_ok());
    }

    #[test]
    fn invalid_specs_are_reported() {
        let bad_ty = Spec::object([("a", Spec::attr("strin"))]);
        let e = err(&bad_ty, "");
        assert!(matches!(e, HclDecodeError::InvalidSpec { .. }), "{e:?}");
        assert_eq!(e.path(), Some("a"));
        assert_eq!(
            msg(&e),
            "Invalid spec at a: Unknown variable; There is no variable named \"strin\"."
        );
        assert!(matches!(
            err(&one("list(string, number)"), ""),
            HclDecodeError::InvalidSpec { .. }
        ));
        assert!(matches!(
            err(&one("\"string\""), ""),
            HclDecodeError::InvalidSpec { .. }
        ));
        assert!(matches!(
            err(&one("foo(string)"), ""),
            HclDecodeError::InvalidSpec { .. }
        ));
        let no_labels = Spec::object([(
            "m",
            Spec::BlockMap {
                name: String::new(),
                labels: vec![],
                nested: Box::new(Spec::object::<String>([])),
            },
        )]);
        assert_eq!(
            err(&no_labels, "").summary(),
            Some("Invalid block label name list")
        );
        let unnamed = Spec::Default {
            primary: Box::new(Spec::attr("string")),
            default: Box::new(Spec::Literal("1".into())),
        };
        assert_eq!(
            err(&unnamed, "").summary(),
            Some("Missing name in attribute spec")
        );
        let bad_literal = Spec::object([("l", Spec::Literal("\"unterminated".into()))]);
        assert_eq!(err(&bad_literal, "").summary(), Some("Invalid literal"));
        let dynamic_map = Spec::object([(
            "m",
            Spec::block_map("k", Spec::object([("v", Spec::attr("any"))])),
        )]);
        assert!(matches!(
            err(&dynamic_map, ""),
            HclDecodeError::InvalidSpec { .. }
        ));
    }

    #[test]
    fn type_expressions_parse() {
        let t = |s: &str| parse_type_expr(s).expect("type");
        assert_eq!(t("string"), Ty::String);
        assert_eq!(t("null"), Ty::Dynamic);
        assert_eq!(t("any"), Ty::Dynamic);
        assert_eq!(
            t("list(map(number))"),
            Ty::List(Box::new(Ty::Map(Box::new(Ty::Number))))
        );
        assert_eq!(t("set(bool)"), Ty::Set(Box::new(Ty::Bool)));
        assert_eq!(
            t("tuple([string, any])"),
            Ty::Tuple(vec![Ty::String, Ty::Dynamic])
        );
        assert_eq!(
            t("object({ name = string, \"size\" = number })"),
            Ty::Object(BTreeMap::from([
                ("name".into(), Ty::String),
                ("size".into(), Ty::Number)
            ]))
        );
        assert_eq!(t("object({})"), Ty::Object(BTreeMap::new()));
        assert_eq!(
            t("object({\n  a = list(string)\n  b = bool\n})"),
            Ty::Object(BTreeMap::from([
                ("a".into(), Ty::List(Box::new(Ty::String))),
                ("b".into(), Ty::Bool),
            ]))
        );
    }

    #[test]
    fn unify_and_sort_follow_cty() {
        let l = |t: Ty| Ty::List(Box::new(t));
        assert_eq!(
            unify(&[Ty::Number, Ty::String], true),
            Some((Ty::String, false))
        );
        assert_eq!(unify(&[Ty::Number, Ty::Bool], true), None);
        assert_eq!(
            unify(&[Ty::Number, Ty::Dynamic], true),
            Some((Ty::Number, false))
        );
        assert_eq!(
            unify(&[l(Ty::Number), Ty::Tuple(vec![Ty::String])], true),
            Some((l(Ty::String), false))
        );
        assert_eq!(
            unify(&[Ty::Tuple(vec![]), Ty::Dynamic], true),
            Some((Ty::Dynamic, true))
        );
        assert_eq!(
            sort_types(&[Ty::Number, Ty::String, Ty::Dynamic]),
            vec![1, 0, 2]
        );
    }

    fn driver_spec() -> Spec {
        Spec::object([
            ("hostname", Spec::required_attr("string")),
            ("cmds", Spec::attr("list(string)")),
            ("user_data", Spec::attr("string")),
            (
                "timezone",
                Spec::attr_with_default("timezone", "string", "\"UTC\""),
            ),
            (
                "os",
                Spec::block(Spec::object([
                    ("arch", Spec::attr("string")),
                    ("machine", Spec::attr("string")),
                ])),
            ),
            (
                "disk",
                Spec::block_list(Spec::object([
                    (
                        "source",
                        Spec::block(Spec::object([("image", Spec::required_attr("string"))])),
                    ),
                    ("size", Spec::attr("string")),
                    ("chained", Spec::attr("bool")),
                    ("fmt", Spec::attr_with_default("fmt", "string", "\"qcow2\"")),
                ])),
            ),
            (
                "network_interface",
                Spec::block_list(Spec::object([(
                    "bridge",
                    Spec::block(Spec::object([
                        ("name", Spec::required_attr("string")),
                        ("ports", Spec::attr("list(string)")),
                    ])),
                )])),
            ),
        ])
    }

    const DRIVER_CONFIG: &str = r#"
hostname = "web-1"
cmds = ["echo hi"]
os {
  arch = "x86_64"
  machine = "pc"
}
disk {
  source {
    image = "/var/lib/virt/images/debian.qcow2"
  }
  size = "10GiB"
  chained = true
}
network_interface {
  bridge {
    name  = "virbr0"
    ports = ["http"]
  }
}
"#;

    #[test]
    fn realistic_driver_config_structure() {
        let bytes = encode_hcl(&driver_spec(), DRIVER_CONFIG, &ctx()).expect("encodes");
        let want = CtyValue::map([
            ("cmds", list([s("echo hi")])),
            (
                "disk",
                list([CtyValue::map([
                    ("chained", CtyValue::Bool(true)),
                    ("fmt", s("qcow2")),
                    ("size", s("10GiB")),
                    (
                        "source",
                        CtyValue::map([("image", s("/var/lib/virt/images/debian.qcow2"))]),
                    ),
                ])]),
            ),
            ("hostname", s("web-1")),
            (
                "network_interface",
                list([CtyValue::map([(
                    "bridge",
                    CtyValue::map([("name", s("virbr0")), ("ports", list([s("http")]))]),
                )])]),
            ),
            (
                "os",
                CtyValue::map([("arch", s("x86_64")), ("machine", s("pc"))]),
            ),
            ("timezone", s("UTC")),
            ("user_data", CtyValue::Null),
        ]);
        assert_eq!(decode_msgpack(&bytes), want);
        assert_eq!(bytes[0], 0x87, "top-level fixmap of the 7 spec keys");
    }

    #[test]
    fn realistic_driver_config_errors_have_paths() {
        let spec = driver_spec();
        let broken = DRIVER_CONFIG.replace("name  = \"virbr0\"", "nmae = \"virbr0\"");
        let e = err(&spec, &broken);
        assert_eq!(e.path(), Some("network_interface[0].bridge.name"));
        assert_eq!(e.summary(), Some("Missing required argument"));
        let broken = DRIVER_CONFIG.replace("chained = true", "chained = \"maybe\"");
        let e = err(&spec, &broken);
        assert_eq!(
            msg(&e),
            "disk[0].chained: Incorrect attribute value type; Inappropriate value for attribute \"chained\": a bool is required."
        );
        let broken = DRIVER_CONFIG.replace("hostname = \"web-1\"", "");
        assert_eq!(err(&spec, &broken).path(), Some("hostname"));
    }

    #[test]
    fn small_config_exact_bytes() {
        let spec = Spec::object([
            ("name", Spec::attr("string")),
            ("count", Spec::attr_with_default("count", "number", "1")),
            ("tags", Spec::attr("list(string)")),
            ("ratio", Spec::attr("number")),
        ]);
        let bytes = encode_hcl(&spec, "name = \"a\"\nratio = 0.1", &ctx()).expect("encodes");
        let mut want = vec![0x84];
        want.extend([0xa5, b'c', b'o', b'u', b'n', b't', 0x01]);
        want.extend([0xa4, b'n', b'a', b'm', b'e', 0xa1, b'a']);
        want.extend([0xa5, b'r', b'a', b't', b'i', b'o', 0xa3, b'0', b'.', b'1']);
        want.extend([0xa4, b't', b'a', b'g', b's', 0xc0]);
        assert_eq!(bytes, want);
        let bytes = encode_hcl(&spec, "count = 2.5\ntags = [\"x\"]", &ctx()).expect("encodes");
        let mut want = vec![0x84, 0xa5, b'c', b'o', b'u', b'n', b't', 0xcb];
        want.extend(2.5f64.to_bits().to_be_bytes());
        want.extend([0xa4, b'n', b'a', b'm', b'e', 0xc0]);
        want.extend([0xa5, b'r', b'a', b't', b'i', b'o', 0xc0]);
        want.extend([0xa4, b't', b'a', b'g', b's', 0x91, 0xa1, b'x']);
        assert_eq!(bytes, want);
    }

    #[test]
    fn plugin_config_with_empty_body_applies_defaults() {
        // Nomad decodes a missing plugin `config {}` from an empty body.
        let spec = Spec::object([
            (
                "uri",
                Spec::attr_with_default("uri", "string", "\"qemu:///system\""),
            ),
            ("image_paths", Spec::attr("list(string)")),
        ]);
        let bytes = encode_hcl(&spec, "", &ctx()).expect("encodes");
        assert_eq!(
            decode_msgpack(&bytes),
            CtyValue::map([
                ("image_paths", CtyValue::Null),
                ("uri", s("qemu:///system"))
            ])
        );
    }

    #[test]
    fn error_fits_anyhow() {
        fn assert_send_sync<T: std::error::Error + Send + Sync + 'static>() {}
        assert_send_sync::<HclDecodeError>();
    }

    #[test]
    fn helpers_match_go() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "ab"), 2);
        assert_eq!(go_quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\x01\"");
    }
}
