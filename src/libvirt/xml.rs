//! XML in and out of libvirt through quick-xml: the one writer every
//! document we send goes through (domain, pool, volume and DHCP host XML),
//! and a small element tree for what we read back (network, pool, volume
//! and capabilities XML).
//!
//! Escaping is the library's: text escapes `& < > ' "` and CR, attribute
//! values also tab and newline, so attribute-value normalisation cannot turn
//! them into spaces. Characters XML 1.0 cannot carry at all (NUL, other C0
//! controls, U+FFFE, U+FFFF) are replaced by U+FFFD before writing, so the
//! output always parses; renderers that must not alter a value reject such
//! characters before they get here (see [`is_xml_char`]).

use std::borrow::Cow;

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer, XmlVersion};

/// XML 1.0 `Char` production (Rust chars are never surrogates).
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// `text` with every character XML 1.0 cannot carry replaced by U+FFFD.
fn carriable(text: &str) -> Cow<'_, str> {
    if text.chars().all(is_xml_char) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(
            text.chars()
                .map(|c| if is_xml_char(c) { c } else { '\u{FFFD}' })
                .collect(),
        )
    }
}

/// An indenting XML writer (two spaces per level, one element per line,
/// `<name>text</name>` on one line). Names are ours; values are escaped by
/// quick-xml.
pub struct XmlWriter {
    writer: Writer<Vec<u8>>,
}

impl Default for XmlWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl XmlWriter {
    pub fn new() -> Self {
        XmlWriter {
            writer: Writer::new_with_indent(Vec::with_capacity(4096), b' ', 2),
        }
    }

    fn emit(&mut self, event: Event<'_>) {
        // Writing into a Vec<u8> cannot fail.
        let _ = self.writer.write_event(event);
    }

    fn start<'a>(name: &'a str, attrs: &[(&str, &str)]) -> BytesStart<'a> {
        let mut start = BytesStart::new(name);
        for (key, value) in attrs {
            start.push_attribute((*key, carriable(value)));
        }
        start
    }

    /// `<name attrs>`; children follow until [`XmlWriter::close`].
    pub fn open(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.emit(Event::Start(Self::start(name, attrs)));
    }

    /// `</name>`.
    pub fn close(&mut self, name: &str) {
        self.emit(Event::End(BytesEnd::new(name)));
    }

    /// `<name attrs/>`.
    pub fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.emit(Event::Empty(Self::start(name, attrs)));
    }

    /// `<name attrs>text</name>`.
    pub fn text(&mut self, name: &str, attrs: &[(&str, &str)], text: &str) {
        self.emit(Event::Start(Self::start(name, attrs)));
        self.emit(Event::Text(BytesText::new(&carriable(text))));
        self.emit(Event::End(BytesEnd::new(name)));
    }

    /// The document, ending in a newline when `trailing_newline`.
    pub fn finish(self, trailing_newline: bool) -> String {
        let bytes = self.writer.into_inner();
        // Everything written came from &str, so the bytes are UTF-8.
        let mut out = String::from_utf8(bytes)
            .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned());
        if trailing_newline {
            out.push('\n');
        }
        out
    }
}

/// A parse failure of XML read back from libvirt.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("malformed XML")]
    Syntax(#[from] quick_xml::Error),
    #[error("malformed XML attribute")]
    Attribute(#[from] quick_xml::events::attributes::AttrError),
    #[error("malformed XML: {0}")]
    Structure(&'static str),
}

/// One element of a parsed document: its name, attributes (unescaped and
/// normalised), direct text (unescaped) and child elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attributes: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// The value of attribute `key`.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The trimmed text of the element at `path` below this one
    /// (e.g. `["target", "path"]`).
    pub fn text_at(&self, path: &[&str]) -> Option<String> {
        let mut element = self;
        for name in path {
            element = element.child(name)?;
        }
        Some(element.text.trim().to_string())
    }

    /// This element and every element below it, depth first.
    pub fn descendants(&self) -> Vec<&Element> {
        let mut out = vec![self];
        let mut index = 0;
        while index < out.len() {
            let element = out[index];
            out.extend(element.children.iter());
            index += 1;
        }
        out
    }
}

fn element_from(start: &BytesStart<'_>) -> Result<Element, XmlError> {
    let mut attributes = Vec::new();
    for attribute in start.attributes() {
        let attribute = attribute?;
        // WFC "No < in Attribute Values"; quick-xml leaves that to us.
        if attribute.value.contains('<') {
            return Err(XmlError::Structure("'<' in an attribute value"));
        }
        let value = attribute.normalized_value(XmlVersion::Implicit1_0)?;
        check_chars(&value)?;
        attributes.push((attribute.key.into_inner().to_string(), value.into_owned()));
    }
    Ok(Element {
        name: start.name().into_inner().to_string(),
        attributes,
        ..Element::default()
    })
}

/// WFC "Legal Character": also for characters from references.
fn check_chars(text: &str) -> Result<(), XmlError> {
    if text.chars().all(is_xml_char) {
        Ok(())
    } else {
        Err(XmlError::Structure("a character XML cannot carry"))
    }
}

/// How deep elements may nest. libvirt's documents use fewer than 20
/// levels; the tree is dropped recursively, so an unbounded depth could
/// exhaust the stack.
const MAX_DEPTH: usize = 256;

/// Parses a whole document into its root element. Comments, processing
/// instructions and the declaration are skipped; CDATA counts as text.
pub fn parse(xml: &str) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader.read_event()?;
        match event {
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::Structure("elements nested too deeply"));
                }
                stack.push(element_from(&start)?);
            }
            Event::Empty(start) => {
                let element = element_from(&start)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None if root.is_none() => root = Some(element),
                    None => return Err(XmlError::Structure("more than one root element")),
                }
            }
            Event::End(_) => {
                let element = stack
                    .pop()
                    .ok_or(XmlError::Structure("end tag without start tag"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None if root.is_none() => root = Some(element),
                    None => return Err(XmlError::Structure("more than one root element")),
                }
            }
            Event::Text(text) => {
                check_chars(&text)?;
                if let Some(current) = stack.last_mut() {
                    current
                        .text
                        .push_str(&text.xml_content(XmlVersion::Implicit1_0));
                } else if !text.trim().is_empty() {
                    return Err(XmlError::Structure("text outside the root element"));
                }
            }
            Event::CData(data) => {
                if let Some(current) = stack.last_mut() {
                    current
                        .text
                        .push_str(&data.xml_content(XmlVersion::Implicit1_0));
                }
            }
            Event::GeneralRef(reference) => {
                let name = reference.xml_content(XmlVersion::Implicit1_0);
                let resolved = match reference.resolve_char_ref()? {
                    Some(c) => c.to_string(),
                    None => quick_xml::escape::resolve_predefined_entity(&name)
                        .ok_or(XmlError::Structure("unknown entity"))?
                        .to_string(),
                };
                check_chars(&resolved)?;
                if let Some(current) = stack.last_mut() {
                    current.text.push_str(&resolved);
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Structure("unclosed element"));
    }
    root.ok_or(XmlError::Structure("no root element"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn writes_indented_documents() {
        let mut w = XmlWriter::new();
        w.open("pool", &[("type", "dir")]);
        w.text("name", &[], "a<b&'c\"");
        w.empty("x", &[("v", "t\tn\nr\r'\"")]);
        w.close("pool");
        let xml = w.finish(true);
        assert_eq!(
            xml,
            "<pool type=\"dir\">\n  <name>a&lt;b&amp;&apos;c&quot;</name>\n  \
             <x v=\"t&#9;n&#10;r&#13;&apos;&quot;\"/>\n</pool>\n"
        );
        let root = parse(&xml).unwrap();
        assert_eq!(root.attr("type"), Some("dir"));
        assert_eq!(root.text_at(&["name"]).as_deref(), Some("a<b&'c\""));
        assert_eq!(root.child("x").unwrap().attr("v"), Some("t\tn\nr\r'\""));
    }

    #[test]
    fn reads_references_comments_and_cdata() {
        let root = parse(
            "<?xml version='1.0'?><!-- c --><a k='&#47;x&#x2F;&amp;'>caf&#xE9;<![CDATA[<&>]]>\
             <b/><b n='2'/></a>",
        )
        .unwrap();
        assert_eq!(root.attr("k"), Some("/x/&"));
        assert_eq!(root.text, "café<&>");
        assert_eq!(root.children_named("b").count(), 2);
        assert_eq!(root.descendants().len(), 3);
    }

    #[test]
    fn junk_is_an_error() {
        for junk in [
            "",
            "<",
            "<a",
            "<a>",
            "<a></b>",
            "no xml",
            "<a k=v/>",
            "<a k='1' k='2'/>",
            "<a/><b/>",
            "<a>&bogus;</a>",
            "<a x='<'/>",
            "<a>&#1;</a>",
            "<a x='&#xFFFE;'/>",
        ] {
            assert!(parse(junk).is_err(), "{junk:?}");
        }
    }

    /// Found by tests/fuzz.rs: 200 000 nested elements parsed into a tree
    /// whose drop overflowed the stack and aborted the plugin.
    #[test]
    fn deep_nesting_is_refused() {
        let doc = format!("{}{}", "<a>".repeat(200_000), "</a>".repeat(200_000));
        assert!(matches!(parse(&doc), Err(XmlError::Structure(_))));
        let fine = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        assert!(parse(&fine).is_ok());
    }

    proptest! {
        /// Any string written as text or attribute parses back, unchanged
        /// when XML can carry it, with U+FFFD for what it cannot.
        #[test]
        fn anything_written_parses_back(value in any::<String>()) {
            let mut w = XmlWriter::new();
            w.open("r", &[("a", &value)]);
            w.text("t", &[], &value);
            w.close("r");
            let root = parse(&w.finish(false)).expect("output parses");
            let expected: String = carriable(&value).into_owned();
            prop_assert_eq!(root.attr("a"), Some(expected.as_str()));
            let text = &root.child("t").expect("t").text;
            prop_assert_eq!(text, &expected);
        }
    }
}
