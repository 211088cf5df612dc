//! The plan's JSON Schema (`schemas/plan.schema.json`, compiled into the binary) and the translation
//! of its validation errors into diagnostics that point at the plan's own text.

use std::sync::OnceLock;

use jsonschema::Validator;
use jsonschema::error::ValidationErrorKind;
use jsonschema::paths::LocationSegment;
use serde_json::Value;

use super::diagnostic::{Diagnostic, closest};
use super::raw::{
    COMMON_STAGE_KEYS, RawDatabase, RawEndpoint, RawPlan, RawState, STAGE_KINDS, StageOptions,
};
use super::source::{Path, PlanDocument, Seg, display_path};
use super::units::{ByteSize, Dur};

/// The schema text, as shipped in `schemas/`.
pub const SCHEMA_TEXT: &str = include_str!("../../schemas/plan.schema.json");

fn validator() -> Result<&'static Validator, String> {
    static VALIDATOR: OnceLock<Result<Validator, String>> = OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            let schema: Value = serde_json::from_str(SCHEMA_TEXT)
                .map_err(|e| format!("the built-in plan schema is not valid JSON: {e}"))?;
            jsonschema::options()
                .should_validate_formats(true)
                .with_format("duration", |s: &str| Dur::parse(s).is_ok())
                .with_format("size", |s: &str| ByteSize::parse(s).is_ok())
                .build(&schema)
                .map_err(|e| format!("the built-in plan schema is invalid: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Checks a rendered plan against the schema; every violation becomes a diagnostic.
pub fn check(value: &Value, doc: &PlanDocument) -> Vec<Diagnostic> {
    let validator = match validator() {
        Ok(v) => v,
        Err(e) => return vec![Diagnostic::error(e)],
    };
    let mut out = Vec::new();
    for error in validator.iter_errors(value) {
        let path: Path = error
            .instance_path()
            .iter()
            .map(|seg| match seg {
                LocationSegment::Property(p) => Seg::Key(p.to_string()),
                LocationSegment::Index(i) => Seg::Index(i),
            })
            .collect();
        let at = value_at(value, &path);
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected }
            | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
                let allowed = allowed_keys(value, &path);
                for key in unexpected {
                    let mut p = path.clone();
                    p.push(Seg::Key(key.clone()));
                    let hint = match closest(key, allowed.iter().map(String::as_str)) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None if allowed.is_empty() => "remove this key".to_string(),
                        None => format!("allowed keys here: {}", allowed.join(", ")),
                    };
                    out.push(
                        Diagnostic::error(format!(
                            "unknown key `{key}` in {}",
                            context(&path, value)
                        ))
                        .at(doc.key_span(&p))
                        .hint(hint),
                    );
                }
            }
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                let span = doc.key_span(&path);
                let hint = match (path.as_slice(), name) {
                    ([], "databases") => {
                        "add at least one [[databases]] entry with a `name`".to_string()
                    }
                    ([], "stages") => {
                        "add stages, for example [stages.preflight] with kind = \"preflight\""
                            .to_string()
                    }
                    _ => format!("add `{name} = ...` here"),
                };
                out.push(
                    Diagnostic::error(format!("missing key `{name}` in {}", context(&path, value)))
                        .at(span)
                        .hint(hint),
                );
            }
            ValidationErrorKind::Enum { options } => {
                let found = at.and_then(Value::as_str).unwrap_or_default();
                let opts: Vec<String> = options
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|o| o.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let is_kind = matches!(path.as_slice(), [Seg::Key(s), Seg::Key(_), Seg::Key(k)] if s == "stages" && k == "kind");
                let message = if is_kind {
                    format!("unknown stage kind `{found}`")
                } else {
                    format!(
                        "`{}` must be one of {}, not `{found}`",
                        display_path(&path),
                        quoted_list(&opts)
                    )
                };
                let hint = match closest(found, opts.iter().map(String::as_str)) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None if is_kind => format!("stage kinds are {}", STAGE_KINDS.join(", ")),
                    None => format!("use one of {}", quoted_list(&opts)),
                };
                out.push(
                    Diagnostic::error(message)
                        .at(doc.value_span(&path))
                        .hint(hint),
                );
            }
            ValidationErrorKind::Format { format } => {
                let text = at.and_then(Value::as_str).unwrap_or_default();
                let (message, hint) = match format.as_str() {
                    "duration" => (
                        Dur::parse(text)
                            .err()
                            .unwrap_or_else(|| format!("invalid duration `{text}`")),
                        "durations look like 500ms, 1s, 5m or 1h 30m",
                    ),
                    "size" => (
                        ByteSize::parse(text)
                            .err()
                            .unwrap_or_else(|| format!("invalid size `{text}`")),
                        "sizes look like 512MB, 1GB or 1.5GB",
                    ),
                    other => (format!("`{text}` is not a valid {other}"), ""),
                };
                let mut d = Diagnostic::error(format!("{}: {message}", display_path(&path)))
                    .at(doc.value_span(&path));
                if !hint.is_empty() {
                    d = d.hint(hint);
                }
                out.push(d);
            }
            ValidationErrorKind::Type { kind } => {
                let expected = format!("{kind:?}")
                    .to_lowercase()
                    .replace("single(", "")
                    .replace("multiple(", "")
                    .replace(')', "");
                out.push(
                    Diagnostic::error(format!(
                        "`{}` must be {}, found {}",
                        display_path(&path),
                        article(expected.trim()),
                        json_type(at)
                    ))
                    .at(doc.value_span(&path)),
                );
            }
            ValidationErrorKind::MinItems { .. } if path == [Seg::Key("databases".into())] => {
                out.push(
                    Diagnostic::error("the plan migrates no database: `databases` is empty")
                        .at(doc.value_span(&path))
                        .hint("add a [[databases]] entry with the `name` of a source database"),
                );
            }
            ValidationErrorKind::MinProperties { .. } if path == [Seg::Key("stages".into())] => {
                out.push(
                    Diagnostic::error("the plan has no stages")
                        .at(doc.value_span(&path))
                        .hint("`pgferry init` writes a plan with every standard stage"),
                );
            }
            ValidationErrorKind::PropertyNames { .. } if path == [Seg::Key("stages".into())] => {
                let ids = at
                    .and_then(Value::as_object)
                    .map(|m| m.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default();
                for id in ids.into_iter().filter(|id| !is_stage_id(id)) {
                    out.push(
                        Diagnostic::error(format!("`{id}` is not a valid stage id"))
                            .at(doc.key_span(&[Seg::Key("stages".into()), Seg::Key(id.clone())]))
                            .hint("stage ids are letters, digits, `_` and `-`, starting with a letter or `_`, at most 63 characters"),
                    );
                }
            }
            ValidationErrorKind::Pattern { .. } => {
                let what = match path.as_slice() {
                    [Seg::Key(k)] if k == "name" => {
                        "a migration name: lowercase letters, digits and `_`, starting with a letter, at most 48 characters (it names checkpoints and replication slots)"
                    }
                    [Seg::Key(_), Seg::Key(k)] if k == "schema" => "a plain lowercase identifier",
                    [Seg::Key(s), _] if s == "stages" => {
                        "a stage id: letters, digits, `_` and `-`, starting with a letter or `_`"
                    }
                    _ => "the expected form",
                };
                let found = at.map(|v| v.to_string()).unwrap_or_default();
                let span = if matches!(path.as_slice(), [Seg::Key(s), _] if s == "stages") {
                    doc.key_span(&path)
                } else {
                    doc.value_span(&path)
                };
                out.push(
                    Diagnostic::error(format!("`{}` is not {what}: {found}", display_path(&path)))
                        .at(span),
                );
            }
            _ => {
                let p = display_path(&path);
                let where_ = if p.is_empty() {
                    "plan".to_string()
                } else {
                    format!("`{p}`")
                };
                out.push(Diagnostic::error(format!("{where_}: {error}")).at(doc.value_span(&path)));
            }
        }
    }
    out
}

/// The stage id pattern of the schema: `^[A-Za-z_][A-Za-z0-9_-]{0,62}$`.
fn is_stage_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && id.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn article(word: &str) -> String {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {word}"),
        _ => format!("a {word}"),
    }
}

fn json_type(v: Option<&Value>) -> &'static str {
    match v {
        None | Some(Value::Null) => "nothing",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => "an integer",
        Some(Value::Number(_)) => "a float",
        Some(Value::String(_)) => "a string",
        Some(Value::Array(_)) => "an array",
        Some(Value::Object(_)) => "a table",
    }
}

fn value_at<'a>(value: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let mut v = value;
    for seg in path {
        v = match seg {
            Seg::Key(k) => v.get(k)?,
            Seg::Index(i) => v.get(i)?,
        };
    }
    Some(v)
}

/// A phrase naming where `path` is: "stage `load` (full_load)", "[source]", "the plan".
fn context(path: &[Seg], value: &Value) -> String {
    match path {
        [] => "the plan".to_string(),
        [Seg::Key(s), Seg::Key(id), ..] if s == "stages" => {
            match value_at(value, &path[..2])
                .and_then(|v| v.get("kind"))
                .and_then(Value::as_str)
            {
                Some(kind) => format!("stage `{id}` ({kind})"),
                None => format!("stage `{id}`"),
            }
        }
        [Seg::Key(s), Seg::Index(i), ..] if s == "databases" => {
            format!("[[databases]] entry {}", i + 1)
        }
        [Seg::Key(s), ..] => format!("[{s}]"),
        _ => format!("`{}`", display_path(path)),
    }
}

fn object_keys<T: serde::Serialize>(t: &T) -> Vec<String> {
    match serde_json::to_value(t) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The keys allowed in the object at `path`, from the Rust types the schema mirrors.
fn allowed_keys(value: &Value, path: &[Seg]) -> Vec<String> {
    match path {
        [] => object_keys(&RawPlan::default()),
        [Seg::Key(s)] if s == "source" || s == "target" => object_keys(&RawEndpoint::default()),
        [Seg::Key(s)] if s == "state" => object_keys(&RawState::default()),
        [Seg::Key(s), Seg::Index(_)] if s == "databases" => object_keys(&RawDatabase::default()),
        [Seg::Key(s), Seg::Key(_)] if s == "stages" => {
            let kind = value_at(value, path)
                .and_then(|v| v.get("kind"))
                .and_then(Value::as_str);
            let mut keys: Vec<String> = COMMON_STAGE_KEYS.iter().map(|s| s.to_string()).collect();
            if let Some(opts) = kind.and_then(StageOptions::default_for) {
                keys.extend(object_keys(&opts));
            }
            keys
        }
        _ => Vec::new(),
    }
}
