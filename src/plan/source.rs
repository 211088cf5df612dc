//! The plan's TOML document: parsed once with positions kept, turned into a JSON value (for the JSON
//! Schema check and typed deserialization), with an index from every value's path to its byte spans so
//! that any later diagnostic can point at the exact key or value it is about.

use std::collections::HashMap;
use std::ops::Range;

use serde_json::{Map, Value};
use toml_edit::{Document, Item, Table};

use super::diagnostic::Diagnostic;

/// One step of a path into the plan document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Seg {
        Seg::Key(s.to_string())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Seg {
        Seg::Index(i)
    }
}

/// A path into the plan document, such as `stages.load.after[0]`.
pub type Path = Vec<Seg>;

/// Builds a path from a list of segments: `path!["stages", id, "after", 0]`.
#[macro_export]
macro_rules! path {
    ($($seg:expr),* $(,)?) => {
        ::std::vec::Vec::<$crate::plan::source::Seg>::from([$($crate::plan::source::Seg::from($seg)),*])
    };
}

/// Spans of one key/value pair in the source.
#[derive(Debug, Clone, Default)]
struct Spans {
    key: Option<Range<usize>>,
    value: Option<Range<usize>>,
}

/// The parsed document: its JSON form and the spans of every node.
#[derive(Debug)]
pub struct PlanDocument {
    pub value: Value,
    spans: HashMap<Path, Spans>,
}

impl PlanDocument {
    /// Parses TOML text. A syntax error is reported as a single diagnostic (nothing after it can be
    /// trusted).
    pub fn parse(text: &str) -> Result<PlanDocument, Diagnostic> {
        let doc = Document::parse(text.to_string()).map_err(|e| {
            let message = e.message().trim().to_string();
            let message = message.lines().next().unwrap_or("invalid TOML").to_string();
            Diagnostic::error(format!("invalid TOML: {message}"))
                .at(e.span())
                .hint("see https://toml.io for the syntax; strings need quotes, tables `[name]`")
        })?;
        let mut spans = HashMap::new();
        let value = table_to_json(doc.as_table(), &mut Vec::new(), &mut spans);
        Ok(PlanDocument { value, spans })
    }

    /// The span of the value at `path`, or of its nearest ancestor that has one.
    pub fn value_span(&self, path: &[Seg]) -> Option<Range<usize>> {
        self.nearest(path, |s| s.value.clone().or_else(|| s.key.clone()))
    }

    /// The span of the key at `path` (falls back to the value, then to ancestors).
    pub fn key_span(&self, path: &[Seg]) -> Option<Range<usize>> {
        self.nearest(path, |s| s.key.clone().or_else(|| s.value.clone()))
    }

    fn nearest(
        &self,
        path: &[Seg],
        pick: impl Fn(&Spans) -> Option<Range<usize>>,
    ) -> Option<Range<usize>> {
        let mut p = path;
        loop {
            if let Some(span) = self.spans.get(p).and_then(&pick) {
                return Some(span);
            }
            if p.is_empty() {
                return None;
            }
            p = &p[..p.len() - 1];
        }
    }
}

fn table_to_json(table: &Table, path: &mut Path, spans: &mut HashMap<Path, Spans>) -> Value {
    let mut map = Map::new();
    for (key, item) in table.iter() {
        let key_span = table.key(key).and_then(|k| k.span());
        path.push(Seg::Key(key.to_string()));
        let value = item_to_json(item, path, spans);
        let entry = spans.entry(path.clone()).or_default();
        entry.key = key_span;
        path.pop();
        map.insert(key.to_string(), value);
    }
    Value::Object(map)
}

fn item_to_json(item: &Item, path: &mut Path, spans: &mut HashMap<Path, Spans>) -> Value {
    let span = item.span();
    let value = match item {
        Item::None => Value::Null,
        Item::Value(v) => value_to_json(v, path, spans),
        Item::Table(t) => table_to_json(t, path, spans),
        Item::ArrayOfTables(a) => {
            let mut out = Vec::new();
            for (i, t) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                let v = table_to_json(t, path, spans);
                spans.entry(path.clone()).or_default().value = t.span();
                path.pop();
                out.push(v);
            }
            Value::Array(out)
        }
    };
    if span.is_some() {
        spans.entry(path.clone()).or_default().value = span;
    }
    value
}

fn value_to_json(v: &toml_edit::Value, path: &mut Path, spans: &mut HashMap<Path, Spans>) -> Value {
    use toml_edit::Value as V;
    spans.entry(path.clone()).or_default().value = v.span();
    match v {
        V::String(s) => Value::String(s.value().clone()),
        V::Integer(i) => Value::from(*i.value()),
        V::Float(f) => serde_json::Number::from_f64(*f.value())
            .map(Value::Number)
            .unwrap_or(Value::Null),
        V::Boolean(b) => Value::Bool(*b.value()),
        V::Datetime(d) => Value::String(d.value().to_string()),
        V::Array(a) => {
            let mut out = Vec::new();
            for (i, item) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(value_to_json(item, path, spans));
                path.pop();
            }
            Value::Array(out)
        }
        V::InlineTable(t) => {
            let mut map = Map::new();
            for (key, item) in t.iter() {
                path.push(Seg::Key(key.to_string()));
                let value = value_to_json(item, path, spans);
                spans.entry(path.clone()).or_default().key = t.key(key).and_then(|k| k.span());
                path.pop();
                map.insert(key.to_string(), value);
            }
            Value::Object(map)
        }
    }
}

/// Renders a path the way a user would write it: `stages.load.after[0]`.
pub fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_values_and_keys() {
        let text = "name = \"x\"\n[stages.load]\nkind = \"full_load\"\nafter = [\"a\", \"b\"]\n\n[[databases]]\nname = \"d\"\n";
        let doc = PlanDocument::parse(text).unwrap();
        let span = doc
            .value_span(&path!["stages", "load", "after", 1])
            .unwrap();
        assert_eq!(&text[span], "\"b\"");
        let span = doc.key_span(&path!["stages", "load", "kind"]).unwrap();
        assert_eq!(&text[span], "kind");
        let span = doc.value_span(&path!["databases", 0, "name"]).unwrap();
        assert_eq!(&text[span], "\"d\"");
        assert_eq!(doc.value["stages"]["load"]["after"][0], "a");
        // A missing key falls back to its parent.
        let span = doc.value_span(&path!["stages", "load", "nope"]).unwrap();
        assert_eq!(&text[span], "[stages.load]");
    }

    #[test]
    fn syntax_error_has_span() {
        let err = PlanDocument::parse("name = \n").unwrap_err();
        assert!(err.message.starts_with("invalid TOML"));
        assert!(err.span.is_some());
    }
}
