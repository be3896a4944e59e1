//! SOAP plumbing for the vSphere API: building request envelopes, parsing responses into a
//! small bounded element tree, and turning SOAP faults into one-line errors.
//!
//! Owns: XML escaping of every value put into a request, the limits that keep a hostile or broken
//! server from making the parser panic or eat unbounded memory, and the fault → message mapping.
//! Must never: panic on any input, follow entities or DTDs, or put a request body (which may
//! hold a password) into an error message.

use crate::error::{Error, Result};
use quick_xml::events::Event;
use quick_xml::Reader;

/// Largest response body accepted (bytes).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Deepest element nesting accepted (snapshot trees and disk parent chains nest).
pub const MAX_DEPTH: usize = 512;
/// Most elements accepted in one response, and kept from all the pages of one property
/// retrieval (a tree costs ~100-200 bytes an element: this bounds it to a few hundred MiB).
pub const MAX_NODES: usize = 2_000_000;
/// Most attributes of one element accepted (vSphere's elements have one or two).
pub const MAX_ATTRS: usize = 64;

/// One XML element: local name (namespace prefix dropped), its `xsi:type` (prefix of the
/// value dropped), its plain `type` attribute (the type of a managed object reference), the
/// concatenated text directly inside it, and its child elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub xsi_type: Option<String>,
    pub type_attr: Option<String>,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    /// First child element with this local name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }
    /// All child elements with this local name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
    /// Follow a path of child names.
    pub fn path(&self, names: &[&str]) -> Option<&Node> {
        let mut n = self;
        for name in names {
            n = n.child(name)?;
        }
        Some(n)
    }
    /// Trimmed text of a child element.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }
    /// The trimmed text of this element.
    pub fn text(&self) -> &str {
        self.text.trim()
    }
    /// How many elements this tree holds (itself included).
    pub fn count(&self) -> usize {
        let mut n = 0;
        let mut stack = vec![self];
        while let Some(x) = stack.pop() {
            n += 1;
            stack.extend(x.children.iter());
        }
        n
    }
}

impl Drop for Node {
    // Tear down iteratively so that a deep tree can never overflow the stack.
    fn drop(&mut self) {
        let mut stack: Vec<Node> = std::mem::take(&mut self.children);
        while let Some(mut n) = stack.pop() {
            stack.append(&mut n.children);
        }
    }
}

fn strip_prefix(s: &str) -> &str {
    match s.rfind(':') {
        Some(i) => &s[i + 1..],
        None => s,
    }
}

/// Parse an XML document into its root element. Bounded: errors (never panics) on malformed
/// XML, a DTD, too deep nesting or too many elements.
pub fn parse(xml: &[u8]) -> Result<Node> {
    if xml.len() > MAX_RESPONSE_BYTES {
        return Err(Error::new(format!("XML document too large ({} bytes)", xml.len())));
    }
    let text = std::str::from_utf8(xml).map_err(|_| Error::new("XML document is not UTF-8"))?;
    let mut reader = Reader::from_str(text);
    {
        let cfg = reader.config_mut();
        cfg.check_end_names = true;
        cfg.expand_empty_elements = false;
        cfg.trim_text(false);
    }
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut count = 0usize;
    let bad = |what: String| Error::new(format!("malformed XML: {what}"));
    loop {
        let ev = reader.read_event().map_err(|e| bad(e.to_string()))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                if root.is_some() {
                    return Err(bad("content after the root element".into()));
                }
                count += 1;
                if count > MAX_NODES {
                    return Err(bad(format!("more than {MAX_NODES} elements")));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(bad(format!("elements nested deeper than {MAX_DEPTH}")));
                }
                let name = std::str::from_utf8(e.local_name().into_inner())
                    .map_err(|_| bad("element name is not UTF-8".into()))?
                    .to_string();
                let mut node = Node::default();
                node.name = name;
                // At most MAX_ATTRS of them (vSphere writes one or two): quick-xml's duplicate
                // check compares each attribute with every earlier one, and one start tag of
                // millions of attributes would take hours.
                for (i, a) in e.attributes().enumerate() {
                    if i >= MAX_ATTRS {
                        return Err(bad(format!("an element with more than {MAX_ATTRS} attributes")));
                    }
                    let a = a.map_err(|e| bad(e.to_string()))?;
                    if a.key.local_name().into_inner() != b"type" {
                        continue;
                    }
                    let v = a.unescape_value().map_err(|e| bad(e.to_string()))?;
                    if a.key.prefix().is_some() {
                        node.xsi_type = Some(strip_prefix(&v).to_string());
                    } else {
                        node.type_attr = Some(v.into_owned());
                    }
                }
                if matches!(ev, Event::Empty(_)) {
                    match stack.last_mut() {
                        Some(p) => p.children.push(node),
                        None => root = Some(node),
                    }
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or_else(|| bad("unexpected end tag".into()))?;
                match stack.last_mut() {
                    Some(p) => p.children.push(node),
                    None => root = Some(node),
                }
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(|e| bad(e.to_string()))?;
                match stack.last_mut() {
                    Some(n) => n.text.push_str(&s),
                    None => {
                        if !s.trim().is_empty() {
                            return Err(bad("text outside the root element".into()));
                        }
                    }
                }
            }
            Event::CData(c) => {
                let s = std::str::from_utf8(&c).map_err(|_| bad("CDATA is not UTF-8".into()))?;
                match stack.last_mut() {
                    Some(n) => n.text.push_str(s),
                    None => return Err(bad("CDATA outside the root element".into())),
                }
            }
            Event::DocType(_) => return Err(bad("DTDs are not accepted".into())),
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(bad("document ends inside an element".into()));
    }
    root.ok_or_else(|| bad("no root element".into()))
}

/// Escape text for an XML element or attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all are dropped rather than sent broken.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// `<tag>text</tag>` with the text escaped.
pub fn elem(tag: &str, text: &str) -> String {
    format!("<{tag}>{}</{tag}>", esc(text))
}

/// A managed object reference element: `<tag type="Kind">value</tag>`.
pub fn moref_elem(tag: &str, kind: &str, value: &str) -> String {
    format!("<{tag} type=\"{}\">{}</{tag}>", esc(kind), esc(value))
}

/// Wrap a method call (`<Method xmlns="urn:vim25">…</Method>`) in a SOAP envelope.
pub fn envelope(method: &str, inner: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\
<soapenv:Body><{method} xmlns=\"urn:vim25\">{inner}</{method}></soapenv:Body></soapenv:Envelope>"
    )
}

/// A SOAP fault as the server reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The vSphere fault type (`InvalidLogin`, `NotAuthenticated`, …), or the SOAP faultcode
    /// when the fault carries no detail.
    pub kind: String,
    /// The human message (`faultstring`), possibly empty.
    pub message: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            f.write_str(&self.kind)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

/// A fault is the source of the [`Error`] a call returns for it ([`fault_of`] finds it again).
impl std::error::Error for Fault {}

/// The host's fault behind an error, if the error is one: the SOAP fault of a call, or the
/// fault a task ended with. Callers that must tell faults apart (an `InvalidArgument` from a
/// `FileFault`) use its `kind`, never the message text.
pub fn fault_of(e: &Error) -> Option<&Fault> {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<Fault>())
}

impl Fault {
    fn from_node(f: &Node) -> Fault {
        let message = one_line(f.child_text("faultstring").unwrap_or(""));
        let detail_kind = f.child("detail").and_then(|d| d.children.first()).map(|d| match &d.xsi_type {
            Some(t) if !t.is_empty() => t.clone(),
            _ => d.name.strip_suffix("Fault").unwrap_or(&d.name).to_string(),
        });
        let kind = match detail_kind {
            Some(k) if !k.is_empty() => k,
            _ => strip_prefix(f.child_text("faultcode").unwrap_or("")).to_string(),
        };
        Fault { kind: one_line(&kind), message }
    }
}

/// Squash whitespace runs (newlines included) into single spaces and bound the length, so that
/// a server-provided string always fits on one line of an error message.
pub fn one_line(s: &str) -> String {
    let mut out = String::new();
    for (i, w) in s.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(w);
        if out.len() > 500 {
            let mut cut = 500;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
            break;
        }
    }
    out
}

/// What a SOAP response carried: the method's response element, or a fault.
#[derive(Debug)]
pub enum Reply {
    Ok(Node),
    Fault(Fault),
}

/// Parse a SOAP response envelope: the first child of Body is either a Fault or the
/// `<Method>Response` element.
pub fn parse_reply(xml: &[u8]) -> Result<Reply> {
    let mut root = parse(xml)?;
    if root.name != "Envelope" {
        return Err(Error::new(format!("not a SOAP envelope (root element <{}>)", one_line(&root.name))));
    }
    let body_idx = root
        .children
        .iter()
        .position(|c| c.name == "Body")
        .ok_or_else(|| Error::new("SOAP envelope without a Body"))?;
    let mut body = std::mem::take(&mut root.children[body_idx]);
    if body.children.is_empty() {
        return Err(Error::new("empty SOAP Body"));
    }
    let first = body.children.swap_remove(0);
    if first.name == "Fault" {
        return Ok(Reply::Fault(Fault::from_node(&first)));
    }
    Ok(Reply::Ok(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_simple_tree() {
        let n = parse(
            br#"<?xml version="1.0"?><a xmlns:x="urn:x"><x:b type="Folder">f&amp;1</x:b><c x:type="x:Foo"/></a>"#,
        )
        .unwrap();
        assert_eq!(n.name, "a");
        let b = n.child("b").unwrap();
        assert_eq!(b.text(), "f&1");
        assert_eq!(b.type_attr.as_deref(), Some("Folder"));
        assert_eq!(n.child("c").unwrap().xsi_type.as_deref(), Some("Foo"));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        let cases: &[&[u8]] = &[
            b"",
            b"<",
            b"<a>",
            b"<a></b>",
            b"</a>",
            b"<a/><b/>",
            b"text",
            b"<a>&unknown;</a>",
            b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
            b"\xff\xfe<a/>",
            b"<a b=\"1\" b=\"2\"/>",
            b"<a><![CDATA[x</a>",
            b"<a>&#xffffffff;</a>",
        ];
        for c in cases {
            assert!(parse(c).is_err(), "accepted {:?}", String::from_utf8_lossy(c));
            assert!(parse_reply(c).is_err());
        }
    }

    /// One start tag with a million attributes: refused at once (not hours of duplicate checks).
    #[test]
    fn attribute_limit() {
        let mut s = String::from("<a");
        for i in 0..1_000_000 {
            s.push_str(&format!(" a{i}=\"\""));
        }
        s.push_str("/>");
        let e = parse(s.as_bytes()).unwrap_err().to_string();
        assert!(e.contains(&format!("more than {MAX_ATTRS} attributes")), "{e}");
        let ok: String = format!("<a{}/>", (0..MAX_ATTRS).map(|i| format!(" a{i}=\"\"")).collect::<String>());
        parse(ok.as_bytes()).unwrap();
    }

    #[test]
    fn depth_limit() {
        let mut s = String::new();
        for _ in 0..(MAX_DEPTH + 5) {
            s.push_str("<a>");
        }
        for _ in 0..(MAX_DEPTH + 5) {
            s.push_str("</a>");
        }
        let e = parse(s.as_bytes()).unwrap_err();
        assert!(e.message().contains("deeper"), "{e}");
        // Just inside the limit works and drops without recursion trouble.
        let mut s = String::new();
        for _ in 0..MAX_DEPTH {
            s.push_str("<a>");
        }
        for _ in 0..MAX_DEPTH {
            s.push_str("</a>");
        }
        parse(s.as_bytes()).unwrap();
    }

    #[test]
    fn fault_real_esxi_style() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body>
<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Cannot complete login due to an incorrect user name or password.</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault>
</soapenv:Body>
</soapenv:Envelope>"#;
        match parse_reply(xml).unwrap() {
            Reply::Fault(f) => {
                assert_eq!(f.kind, "InvalidLogin");
                assert!(f.message.starts_with("Cannot complete login"));
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn fault_govmomi_style_and_bare() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>
   no such
   method</faultstring><detail><MethodNotFoundFault xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="MethodNotFound"><receiver type="VirtualMachine">1</receiver><method>X</method></MethodNotFoundFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        match parse_reply(xml).unwrap() {
            Reply::Fault(f) => {
                assert_eq!(f.kind, "MethodNotFound");
                assert_eq!(f.message, "no such method");
            }
            r => panic!("{r:?}"),
        }
        let xml = br#"<Envelope><Body><Fault><faultcode>soapenv:Client</faultcode><faultstring>bad</faultstring></Fault></Body></Envelope>"#;
        match parse_reply(xml).unwrap() {
            Reply::Fault(f) => assert_eq!((f.kind.as_str(), f.message.as_str()), ("Client", "bad")),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn not_an_envelope() {
        assert!(parse_reply(b"<html><body>503</body></html>").is_err());
        assert!(parse_reply(b"<Envelope><Body/></Envelope>").is_err());
        assert!(parse_reply(b"<Envelope/>").is_err());
    }

    #[test]
    fn escaping() {
        assert_eq!(esc("a<b>&\"c'\u{1}"), "a&lt;b&gt;&amp;&quot;c&apos;");
        let env = envelope("Login", &elem("password", "p<&>"));
        assert!(env.contains("<password>p&lt;&amp;&gt;</password>"));
        // round trip through our own parser
        match parse_reply(env.as_bytes()).unwrap() {
            Reply::Ok(n) => assert_eq!(n.child_text("password"), Some("p<&>")),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn one_line_bounds() {
        assert_eq!(one_line(" a \n b\tc "), "a b c");
        let long = "é".repeat(1000);
        assert!(one_line(&long).len() < 520);
    }
}
