//! The plan's JSON Schema (`schemas/plan.schema.json`, compiled into the binary) and the translation
//! of its validation errors into diagnostics that point at the plan's own text.

use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::LocationSegment;
use jsonschema::{JsonType, Validator};
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

/// The schema as JSON, to look up what a property is (for hints).
fn schema_json() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| serde_json::from_str(SCHEMA_TEXT).unwrap_or(Value::Null))
}

/// The schema of property `name` of the object whose `required` keyword is at `required_at` (a JSON
/// pointer into the schema), `$ref`s followed.
fn property_schema(required_at: &str, name: &str) -> Option<&'static Value> {
    let object = required_at.strip_suffix("/required")?;
    let mut node = schema_json().pointer(&format!("{object}/properties/{name}"))?;
    for _ in 0..8 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) => node = schema_json().pointer(r.strip_prefix('#')?)?,
            None => break,
        }
    }
    Some(node)
}

/// The plan as the schema should see it. TOML tells integers from floats (`4` and `4.0`), JSON Schema
/// does not (`4.0` is an integer to it), and the typed plan follows TOML: so every float is made
/// non-integral (only types are judged on it; messages show the value as written).
fn toml_numbers(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => serde_json::Number::from_f64(0.5)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Value::Array(a) => Value::Array(a.iter().map(toml_numbers).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), toml_numbers(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Checks a rendered plan against the schema; every violation becomes a diagnostic.
pub fn check(value: &Value, doc: &PlanDocument) -> Vec<Diagnostic> {
    let validator = match validator() {
        Ok(v) => v,
        Err(e) => return vec![Diagnostic::error(e)],
    };
    let checked = toml_numbers(value);
    let errors: Vec<_> = validator
        .iter_errors(&checked)
        .map(|error| {
            let path: Path = error
                .instance_path()
                .iter()
                .map(|seg| match seg {
                    LocationSegment::Property(p) => Seg::Key(p.to_string()),
                    LocationSegment::Index(i) => Seg::Index(i),
                })
                .collect();
            (path, error)
        })
        .collect();
    // One error per value: a wrong constant says what the value must be, which covers its type; a
    // wrong type makes the value's other checks moot.
    let paths_with = |pred: fn(&ValidationErrorKind) -> bool| -> Vec<Path> {
        errors
            .iter()
            .filter(|(_, e)| pred(e.kind()))
            .map(|(p, _)| p.clone())
            .collect()
    };
    let constant = paths_with(|k| matches!(k, ValidationErrorKind::Constant { .. }));
    let typed = paths_with(|k| matches!(k, ValidationErrorKind::Type { .. }));
    let mut out = Vec::new();
    for (path, error) in &errors {
        let path = path.clone();
        let redundant = match error.kind() {
            ValidationErrorKind::Constant { .. } => false,
            ValidationErrorKind::Type { .. } => constant.contains(&path),
            _ => typed.contains(&path) || constant.contains(&path),
        };
        if redundant {
            continue;
        }
        let at = value_at(value, &path);
        let key = path.iter().rev().find_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        });
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
                let (span, hint) = if path.is_empty() {
                    // Nothing to point at but the top of the file.
                    (Some(0..0), top_level_hint(name))
                } else {
                    let property = property_schema(error.schema_path().as_str(), name);
                    let options: Vec<String> = property
                        .and_then(|p| p.get("enum"))
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|o| o.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    let is_string =
                        property.and_then(|p| p.get("type")) == Some(&Value::from("string"));
                    let hint = if !options.is_empty() {
                        format!(
                            "add `{name} = \"...\"` here, one of {}",
                            quoted_list(&options)
                        )
                    } else if is_string {
                        format!("add `{name} = \"...\"` here")
                    } else {
                        format!("add `{name} = ...` here")
                    };
                    (doc.key_span(&path), hint)
                };
                out.push(
                    Diagnostic::error(format!("missing key `{name}` in {}", context(&path, value)))
                        .at(span)
                        .hint(hint),
                );
            }
            ValidationErrorKind::Constant { expected_value } => {
                let expected = expected_value.as_ref();
                let found = at.map(Value::to_string).unwrap_or_else(|| "nothing".into());
                let key = key.unwrap_or_default();
                let same_number = match at {
                    Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
                    Some(Value::Number(n)) => n.as_f64(),
                    _ => None,
                }
                .is_some_and(|n| Some(n) == expected.as_f64());
                let hint = match at {
                    Some(Value::String(_)) if same_number => Some(format!(
                        "write the number without quotes: `{key} = {expected}`"
                    )),
                    Some(Value::Number(_)) if same_number => Some(format!(
                        "write it without a decimal point: `{key} = {expected}`"
                    )),
                    _ if path == [Seg::Key("version".into())] => Some(format!(
                        "this pgferry reads plans of format version {expected}"
                    )),
                    _ => None,
                };
                let mut d = Diagnostic::error(format!(
                    "`{}` must be {expected}, not {found}",
                    display_path(&path)
                ))
                .at(doc.value_span(&path));
                if let Some(h) = hint {
                    d = d.hint(h);
                }
                out.push(d);
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
                        "sizes look like 512MB, 1GB or 1.5GB; the units are B, kB, MB, GB and TB",
                    ),
                    other => (format!("`{text}` is not a valid {other}"), ""),
                };
                let mut d = Diagnostic::error(format!("`{}`: {message}", display_path(&path)))
                    .at(doc.value_span(&path));
                if !hint.is_empty() {
                    d = d.hint(hint);
                }
                out.push(d);
            }
            ValidationErrorKind::Type { kind } => {
                let mut expected: Vec<JsonType> = match kind {
                    TypeKind::Single(t) => vec![*t],
                    TypeKind::Multiple(set) => set.iter().collect(),
                };
                expected.sort_by_key(|t| TYPE_ORDER.iter().position(|o| o == t));
                let names: Vec<&str> = expected.iter().map(|t| type_name(*t)).collect();
                let mut d = Diagnostic::error(format!(
                    "`{}` must be {}, found {}",
                    display_path(&path),
                    one_of(&names),
                    json_type(at)
                ))
                .at(doc.value_span(&path));
                if let Some(h) = type_hint(&expected, at, key.unwrap_or_default(), &path) {
                    d = d.hint(h);
                }
                out.push(d);
            }
            ValidationErrorKind::UniqueItems => {
                let items = at.and_then(Value::as_array).cloned().unwrap_or_default();
                for (j, item) in items.iter().enumerate() {
                    let before = items[..j].iter().filter(|v| *v == item).count();
                    if before != 1 {
                        continue;
                    }
                    let times = match items.iter().filter(|v| *v == item).count() {
                        2 => "twice".to_string(),
                        n => format!("{n} times"),
                    };
                    let shown = item
                        .as_str()
                        .map_or_else(|| item.to_string(), str::to_string);
                    let message = match path.as_slice() {
                        [Seg::Key(s), Seg::Key(id), Seg::Key(k)] if s == "stages" => {
                            format!("stage `{id}` lists `{shown}` {times} in `{k}`")
                        }
                        _ => format!("`{}` lists `{shown}` {times}", display_path(&path)),
                    };
                    let mut p = path.clone();
                    p.push(Seg::Index(j));
                    out.push(
                        Diagnostic::error(message)
                            .at(doc.value_span(&p))
                            .hint("remove the repeated entry"),
                    );
                }
            }
            ValidationErrorKind::MinLength { .. }
                if matches!(path.as_slice(), [Seg::Key(d), Seg::Index(_), Seg::Key(f), Seg::Index(_)]
                    if d == "databases" && (f == "tables" || f == "exclude")) =>
            {
                // A table pattern: the pattern check says what is wrong with it.
            }
            ValidationErrorKind::MinLength { limit: 1 } => {
                out.push(
                    Diagnostic::error(format!("`{}` must not be empty", display_path(&path)))
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
            ValidationErrorKind::Pattern { .. }
                if matches!(path.as_slice(), [Seg::Key(s), _, Seg::Key(a), Seg::Index(_)]
                    if s == "stages" && a == "after") =>
            {
                // Not a stage id, so not a stage of the plan: the `after` check says so.
            }
            ValidationErrorKind::Pattern { .. } => {
                let what = match path.as_slice() {
                    [Seg::Key(k)] if k == "name" => {
                        "a migration name: 1 to 100 characters, no control characters, no space at either end (any other name is fine: the slot and publication names are derived from it)"
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

/// The hint for a missing top-level key: what to add, and where.
fn top_level_hint(name: &str) -> String {
    match name {
        "version" => "add `version = 1` at the top of the plan, before any [table]".into(),
        "name" => "add `name = \"...\"` at the top of the plan, before any [table]".into(),
        "source" => "add a [source] table with the `url` of the server to migrate from".into(),
        "target" => "add a [target] table with the `url` of the server to migrate to".into(),
        "databases" => "add a [[databases]] entry with the `name` of a source database".into(),
        "stages" => "add stages, for example [stages.preflight] with kind = \"preflight\"".into(),
        other => format!("add `{other} = ...` at the top of the plan, before any [table]"),
    }
}

/// The order types are listed in when a value may have several.
const TYPE_ORDER: [JsonType; 7] = [
    JsonType::String,
    JsonType::Integer,
    JsonType::Number,
    JsonType::Boolean,
    JsonType::Array,
    JsonType::Object,
    JsonType::Null,
];

/// A JSON Schema type as a TOML user knows it.
fn type_name(t: JsonType) -> &'static str {
    match t {
        JsonType::String => "a string",
        JsonType::Integer => "an integer",
        JsonType::Number => "a number",
        JsonType::Boolean => "a boolean",
        JsonType::Array => "an array",
        JsonType::Object => "a table",
        JsonType::Null => "nothing",
    }
}

/// `a`, `a or b`, `a, b or c`.
fn one_of(items: &[&str]) -> String {
    match items {
        [] => "something else".into(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// How to write `found` as the expected type, when that is plain.
fn type_hint(
    expected: &[JsonType],
    found: Option<&Value>,
    key: &str,
    path: &[Seg],
) -> Option<String> {
    let wants = |t: JsonType| expected.contains(&t);
    match found? {
        Value::String(s) if wants(JsonType::Array) => Some(format!(
            "write a list: `{key} = [{}]`",
            Value::from(s.as_str())
        )),
        Value::String(s)
            if (wants(JsonType::Integer) && s.trim().parse::<i64>().is_ok())
                || (wants(JsonType::Number) && s.trim().parse::<f64>().is_ok()) =>
        {
            Some(format!(
                "write the number without quotes: `{key} = {}`",
                s.trim()
            ))
        }
        Value::String(s) if wants(JsonType::Boolean) => Some(match s.trim() {
            b @ ("true" | "false") => format!("write it without quotes: `{key} = {b}`"),
            _ => format!("write `{key} = true` or `{key} = false`, without quotes"),
        }),
        Value::Number(n)
            if wants(JsonType::Integer) && n.as_f64().is_some_and(|f| f.fract() == 0.0) =>
        {
            Some(format!(
                "write it without a decimal point: `{key} = {}`",
                n.as_f64().unwrap_or_default() as i64
            ))
        }
        v @ (Value::Number(_) | Value::Bool(_)) if wants(JsonType::String) => {
            Some(format!("put it in quotes: `{key} = \"{v}\"`"))
        }
        _ if wants(JsonType::Object) && path.iter().all(|s| matches!(s, Seg::Key(_))) => {
            Some(format!(
                "write it as a table: [{}], with its keys on the lines below",
                display_path(path)
            ))
        }
        _ => None,
    }
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
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
