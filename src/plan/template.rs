//! Template rendering of plan strings with minijinja. In scope: `env` (the process environment),
//! `vars` (the plan's `[vars]` overridden by `--var`) and, in stage options and in the later keys of a
//! `[[databases]]` entry, `database` (the current entry). An undefined variable is an error, never an
//! empty string; only a reference guarded by the `default` (`d`) filter or an `is defined` /
//! `is undefined` test may name one.
//!
//! Before rendering, the template's text is scanned for its references to `env`, `vars` and
//! `database`, so that an undefined one is named precisely with the caret on it, and so that none of
//! them is used as a whole: the environment holds secrets, and a plan names each variable it reads
//! (`env.NAME` or `env['NAME']`). Rendering itself is strict and sees the three as objects that can
//! only be looked up by name (not iterated, not printed whole), so what the scan might miss fails too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde_json::{Map, Value};

use super::diagnostic::closest;

/// The names a template may start a reference with.
const ROOTS: [&str; 3] = ["env", "vars", "database"];
/// The keys of a database as stages see it.
const DATABASE_KEYS: [&str; 4] = ["name", "target", "tables", "exclude"];

/// What `database` is where a string is rendered.
#[derive(Debug, Clone, Default)]
pub enum DatabaseScope {
    /// Outside stage options and `[[databases]]`: `database` is not defined.
    #[default]
    Outside,
    /// In the key `key` of a `[[databases]]` entry, which sees the keys rendered before it (`name`,
    /// then `target`): `entry`.
    Entry {
        key: String,
        entry: Map<String, Value>,
    },
    /// In stage options, rendered for one database (its `name`, `target`, `tables`, `exclude`).
    Stage(Value),
    /// In stage options when the plan has no usable database. The missing database is reported on
    /// its own, so references to `database` are neither checked nor rendered: a string that uses one
    /// is kept as written.
    Unknown,
}

/// What a template may refer to.
pub struct Scope {
    env: BTreeMap<String, String>,
    vars: Map<String, Value>,
    /// False while `[vars]` itself is rendered (with `env` only).
    vars_ready: bool,
    database: DatabaseScope,
}

/// A template failure: the message, the hint, and the part of the template it is about (a byte range
/// within the template text, when known).
#[derive(Debug, Clone)]
pub struct TemplateError {
    pub message: String,
    pub hint: Option<String>,
    pub range: Option<Range<usize>>,
}

impl TemplateError {
    fn new(message: impl Into<String>, hint: impl Into<String>) -> TemplateError {
        TemplateError {
            message: message.into(),
            hint: Some(hint.into()),
            range: None,
        }
    }

    fn at(mut self, range: Option<Range<usize>>) -> TemplateError {
        self.range = range;
        self
    }
}

impl Scope {
    pub fn new(env: BTreeMap<String, String>) -> Scope {
        Scope {
            env,
            vars: Map::new(),
            vars_ready: false,
            database: DatabaseScope::Outside,
        }
    }

    /// Sets `vars`; until then (while `[vars]` is rendered) templates may use `env` only.
    pub fn set_vars(&mut self, vars: Map<String, Value>) {
        self.vars = vars;
        self.vars_ready = true;
    }

    pub fn set_database(&mut self, database: DatabaseScope) {
        self.database = database;
    }

    /// Does this string need rendering at all?
    pub fn is_template(text: &str) -> bool {
        text.contains("{{") || text.contains("{%") || text.contains("{#")
    }

    /// Renders one string.
    pub fn render(&self, text: &str) -> Result<String, TemplateError> {
        if !Scope::is_template(text) {
            return Ok(text.to_string());
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // `debug()` prints the whole context.
        env.remove_global("debug");
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        let tmpl = env.template_from_str(text).map_err(|e| {
            let detail = e.detail().unwrap_or("syntax error");
            // At the end of the text when it ends too soon (a block left open), else where the
            // parser stopped.
            let range = if detail.starts_with("unexpected end of input") {
                Some(text.len()..text.len())
            } else {
                e.range().and_then(|r| whole_chars(text, r))
            };
            TemplateError::new(
                format!("invalid template: {detail}"),
                "templates use minijinja (Jinja2) syntax: `{{ vars.name }}`, \
                 `{% if ... %}...{% endif %}`",
            )
            .at(range)
        })?;

        // Name an undefined variable precisely, before rendering says only "undefined value".
        let undeclared = tmpl.undeclared_variables(true);
        let used_roots: BTreeSet<&str> = undeclared
            .iter()
            .map(|n| n.split('.').next().unwrap_or_default())
            .collect();
        let refs = references(text);
        let mut problems = Vec::new();
        for &root in &used_roots {
            let found: Vec<&Reference> = refs.iter().filter(|r| r.root == root).collect();
            if !ROOTS.contains(&root) {
                // The name as minijinja tracks it (`x.y.z`).
                let name = undeclared
                    .iter()
                    .filter(|n| n.split('.').next() == Some(root))
                    .max_by_key(|n| n.len())
                    .map_or(root, String::as_str);
                problems.push(
                    self.unknown_root(name)
                        .at(found.first().map(|r| r.range.clone())),
                );
                continue;
            }
            let skip_keys = root == "database" && matches!(self.database, DatabaseScope::Unknown);
            // A key guarded once (`default`, `is defined`) is left to the strict rendering.
            let guarded: BTreeSet<&str> = found
                .iter()
                .filter(|r| r.guarded)
                .filter_map(|r| match &r.access {
                    Access::Key(k) => Some(k.as_str()),
                    _ => None,
                })
                .collect();
            for r in found {
                match &r.access {
                    Access::Whole | Access::Dynamic => {
                        problems.push(self.whole_object(root).at(Some(r.range.clone())));
                    }
                    Access::Key(k) if skip_keys || guarded.contains(k.as_str()) => {}
                    Access::Key(k) => {
                        if let Err(e) = self.check_key(root, k) {
                            problems.push(e.at(Some(r.range.clone())));
                        }
                    }
                }
            }
        }
        // The first problem in the text.
        if let Some(first) = problems
            .into_iter()
            .min_by_key(|p| p.range.as_ref().map_or(usize::MAX, |r| r.start))
        {
            return Err(first);
        }
        if used_roots.contains("database") && matches!(self.database, DatabaseScope::Unknown) {
            return Ok(text.to_string());
        }

        let database = match &self.database {
            DatabaseScope::Stage(db) => Namespace::from_json("database", db),
            DatabaseScope::Entry { entry, .. } => {
                Namespace::from_json("database", &Value::Object(entry.clone()))
            }
            DatabaseScope::Outside | DatabaseScope::Unknown => minijinja::Value::UNDEFINED,
        };
        let ctx = minijinja::context! {
            env => Namespace::value(
                "env",
                self.env.iter().map(|(k, v)| (k.clone(), minijinja::Value::from(v.as_str()))).collect(),
            ),
            vars => Namespace::from_json("vars", &Value::Object(self.vars.clone())),
            database => database,
        };
        tmpl.render(ctx).map_err(|e| self.render_error(&e, text))
    }

    /// Explains a failure of the (strict) rendering itself.
    fn render_error(&self, e: &minijinja::Error, text: &str) -> TemplateError {
        let range = e.range().and_then(|r| whole_chars(text, r));
        // "`env.X` is undefined"
        let undefined = (e.kind() == ErrorKind::UndefinedError)
            .then(|| {
                e.detail()?
                    .strip_prefix('`')?
                    .split_once('`')
                    .map(|(n, _)| n)
            })
            .flatten();
        if let Some(name) = undefined {
            let mut parts = name.splitn(3, '.');
            let root = parts.next().unwrap_or_default();
            let e = match (parts.next(), parts.next()) {
                _ if !ROOTS.contains(&root) => self.unknown_root(name),
                (None, _) => self.whole_object(root),
                (Some(key), rest) => match (self.check_key(root, key), rest) {
                    (Err(e), _) => TemplateError {
                        message: format!("undefined variable `{name}`"),
                        ..e
                    },
                    (Ok(()), Some(rest)) => TemplateError::new(
                        format!("undefined variable `{name}`"),
                        format!("`{root}.{key}` has no `{rest}`"),
                    ),
                    (Ok(()), None) => TemplateError::new(
                        format!("undefined variable `{name}`"),
                        "only a `default` filter or an `is defined` test may use an undefined variable",
                    ),
                },
            };
            return e.at(range);
        }
        TemplateError::new(
            format!(
                "template failed: {}{}",
                e.kind(),
                e.detail().map(|d| format!(": {d}")).unwrap_or_default()
            ),
            "in scope: `env.NAME`, `vars.NAME`, and in stages `database.name`",
        )
        .at(range)
    }

    /// Is `root.key` defined here? If not, the error says why (without a range).
    fn check_key(&self, root: &str, key: &str) -> Result<(), TemplateError> {
        let undefined =
            |hint: String| TemplateError::new(format!("undefined variable `{root}.{key}`"), hint);
        match root {
            "env" if !self.env.contains_key(key) => Err(undefined(format!(
                "set the environment variable `{key}` before running pgferry"
            ))),
            "vars" if !self.vars_ready => Err(undefined(
                "[vars] values are rendered before `vars` exists, so they can use `env` only"
                    .into(),
            )),
            "vars" if !self.vars.contains_key(key) => Err(undefined(
                match closest(key, self.vars.keys().map(String::as_str)) {
                    Some(c) => format!("did you mean `vars.{c}`?"),
                    None => format!("define `{key}` under [vars], or pass `--var {key}=VALUE`"),
                },
            )),
            "database" => self.check_database_key(key),
            _ => Ok(()),
        }
    }

    fn check_database_key(&self, key: &str) -> Result<(), TemplateError> {
        let undefined =
            |hint: String| TemplateError::new(format!("undefined variable `database.{key}`"), hint);
        match &self.database {
            DatabaseScope::Outside => Err(undefined(
                "`database` is only defined in stage options, which run once per [[databases]] \
                 entry, and inside a [[databases]] entry after its `name`"
                    .into(),
            )),
            DatabaseScope::Unknown => Ok(()),
            DatabaseScope::Stage(db) => match db.get(key) {
                Some(_) => Ok(()),
                None => Err(undefined(match closest(key, DATABASE_KEYS) {
                    Some(c) => format!("did you mean `database.{c}`?"),
                    None => "a database entry has `name`, `target`, `tables` and `exclude`".into(),
                })),
            },
            DatabaseScope::Entry { key: own, entry } => {
                if entry.contains_key(key) {
                    return Ok(());
                }
                let defined: Vec<String> =
                    entry.keys().map(|k| format!("`database.{k}`")).collect();
                let here = match defined.as_slice() {
                    [] => format!(
                        "`{own}` is rendered first, before `database` exists: write the name of the \
                         source database, or use `vars.NAME`"
                    ),
                    [one] => format!("in `{own}`, only {one} is defined"),
                    [init @ .., last] => {
                        format!(
                            "in `{own}`, only {} and {last} are defined",
                            init.join(", ")
                        )
                    }
                };
                if key == own {
                    return Err(TemplateError::new(
                        format!("a database's `{own}` cannot refer to itself"),
                        here,
                    ));
                }
                // A typo of a key defined here, or a key defined only later (or not at all).
                let typo = (!DATABASE_KEYS.contains(&key))
                    .then(|| closest(key, entry.keys().map(String::as_str)))
                    .flatten();
                Err(undefined(match typo {
                    Some(c) => format!("did you mean `database.{c}`? {}", capitalize(&here)),
                    None => here,
                }))
            }
        }
    }

    /// A variable that is none of `env`, `vars` and `database`.
    fn unknown_root(&self, name: &str) -> TemplateError {
        let root = name.split('.').next().unwrap_or_default();
        let hint = match closest(root, ROOTS) {
            Some(c) => format!("did you mean `{c}`? In scope: `env`, `vars`, `database`"),
            None => "in scope: `env.NAME`, `vars.NAME`, and in stages `database.name`".into(),
        };
        TemplateError::new(format!("undefined variable `{name}`"), hint)
    }

    /// `env`, `vars` or `database` used as a whole (or looked up by a computed name).
    fn whole_object(&self, root: &str) -> TemplateError {
        match root {
            "env" => TemplateError::new(
                "`env` can only be read one variable at a time: `env.NAME` or `env['NAME']`",
                "the environment holds secrets, so a plan names each variable it uses, e.g. \
                 `{{ env.SOURCE_PASSWORD }}`",
            ),
            "vars" => TemplateError::new(
                "`vars` can only be read one variable at a time: `vars.NAME` or `vars['NAME']`",
                match self.vars.keys().next() {
                    _ if !self.vars_ready => {
                        "[vars] values are rendered before `vars` exists, so they can use `env` only"
                            .into()
                    }
                    Some(k) => format!("e.g. `{{{{ vars.{k} }}}}`"),
                    None => "define variables under [vars] and use them as `{{ vars.NAME }}`".into(),
                },
            ),
            _ => TemplateError::new(
                format!("`{root}` can only be read one key at a time, e.g. `{root}.name`"),
                "a database entry has `name`, `target`, `tables` and `exclude`",
            ),
        }
    }

    /// Renders every string inside a JSON value, calling `on_error` with the path of each failure.
    pub fn render_value(
        &self,
        value: &Value,
        path: &mut super::source::Path,
        on_error: &mut dyn FnMut(&super::source::Path, TemplateError),
    ) -> Value {
        use super::source::Seg;
        match value {
            Value::String(s) => match self.render(s) {
                Ok(r) => Value::String(r),
                Err(e) => {
                    on_error(path, e);
                    Value::String(s.clone())
                }
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        path.push(Seg::Index(i));
                        let r = self.render_value(v, path, on_error);
                        path.pop();
                        r
                    })
                    .collect(),
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        path.push(Seg::Key(k.clone()));
                        let r = self.render_value(v, path, on_error);
                        path.pop();
                        (k.clone(), r)
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// `range` widened to whole characters of `text`, if it lies within it. (minijinja's ranges are in
/// bytes and may split a character.)
fn whole_chars(text: &str, range: Range<usize>) -> Option<Range<usize>> {
    if range.start > range.end || range.end > text.len() {
        return None;
    }
    let mut start = range.start;
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = range.end;
    while !text.is_char_boundary(end) {
        end += 1;
    }
    Some(start..end)
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `env`, `vars` or `database` as templates see them: values looked up by name, nothing more. Not
/// iterable, and printed whole only as a placeholder, so no filter or loop can dump the environment.
#[derive(Debug)]
struct Namespace {
    name: &'static str,
    values: BTreeMap<String, minijinja::Value>,
}

impl Namespace {
    fn value(name: &'static str, values: BTreeMap<String, minijinja::Value>) -> minijinja::Value {
        minijinja::Value::from_object(Namespace { name, values })
    }

    fn from_json(name: &'static str, value: &Value) -> minijinja::Value {
        let values = value
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.clone(),
                    minijinja::Value::from(minijinja::value::Serde(v)),
                )
            })
            .collect();
        Namespace::value(name, values)
    }
}

impl Object for Namespace {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        self.values.get(key.as_str()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::NonEnumerable
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.name)
    }
}

// ---------------------------------------------------------------------------------------------------
// Finding references in a template's text.

/// A variable reference in a template's code.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    root: String,
    access: Access,
    /// The reference in the template text: its root and first lookup (`env.X`, `env['X']`).
    range: Range<usize>,
    /// In a block that allows undefined values: a `default`/`d` filter, an `is (not) defined` or
    /// `is (not) undefined` test.
    guarded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    /// `root.key` or `root['key']`.
    Key(String),
    /// `root[expression]`.
    Dynamic,
    /// `root` itself.
    Whole,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The byte just past the string literal whose opening quote is at `start`.
fn string_end(b: &[u8], start: usize) -> usize {
    let quote = b[start];
    let mut i = start + 1;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            return i + 1;
        } else {
            i += 1;
        }
    }
    b.len()
}

/// Where `close` first occurs from `from` on, outside string literals.
fn find_close(b: &[u8], from: usize, close: &[u8]) -> Option<usize> {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => i = string_end(b, i),
            _ if b[i..].starts_with(close) => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The contents of the template's `{{ … }}` and `{% … %}` blocks, as byte ranges; comments and
/// `{% raw %}` sections are left out.
fn code_blocks(text: &str) -> Vec<Range<usize>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut in_raw = false;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] != b'{' {
            i += 1;
            continue;
        }
        let close: &[u8] = match b[i + 1] {
            b'{' => b"}}",
            b'%' => b"%}",
            b'#' => b"#}",
            _ => {
                i += 1;
                continue;
            }
        };
        let start = i + 2;
        let end = if close == b"#}" {
            b[start..]
                .windows(2)
                .position(|w| w == b"#}")
                .map_or(b.len(), |p| start + p)
        } else {
            find_close(b, start, close).unwrap_or(b.len())
        };
        if close != b"#}" {
            let word =
                text[start..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
            let statement = close == b"%}";
            if in_raw {
                in_raw = !(statement && word == "endraw");
            } else if statement && word == "raw" {
                in_raw = true;
            } else {
                out.push(start..end);
            }
        }
        i = (end + 2).min(b.len());
    }
    out
}

/// `code` with every string literal blanked out (same length, so offsets still hold).
fn blank_strings(code: &str) -> Vec<u8> {
    let mut b = code.as_bytes().to_vec();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' || b[i] == b'\'' {
            let end = string_end(&b, i);
            b[i..end].fill(b' ');
            i = end;
        } else {
            i += 1;
        }
    }
    b
}

/// Does this block of code (strings blanked) guard against undefined values?
fn is_guarded(code: &[u8]) -> bool {
    let mut tokens: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    while i < code.len() {
        if code[i].is_ascii_whitespace() {
            i += 1;
        } else if is_ident(code[i]) {
            let s = i;
            while i < code.len() && is_ident(code[i]) {
                i += 1;
            }
            tokens.push(&code[s..i]);
        } else {
            tokens.push(&code[i..i + 1]);
            i += 1;
        }
    }
    let test = |t: &[u8]| t == b"defined" || t == b"undefined";
    tokens.iter().enumerate().any(|(i, &t)| {
        let next = tokens.get(i + 1).copied().unwrap_or_default();
        match t {
            b"|" => next == b"default" || next == b"d",
            b"is" => test(next) || (next == b"not" && tokens.get(i + 2).is_some_and(|&t| test(t))),
            _ => false,
        }
    })
}

fn skip_ws(b: &[u8], mut i: usize, limit: usize) -> usize {
    while i < limit && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The lookup that follows a variable name ending at `pos` (within a block ending at `limit`), and
/// where it ends.
fn accessor(text: &str, pos: usize, limit: usize) -> (Access, usize) {
    let b = text.as_bytes();
    let i = skip_ws(b, pos, limit);
    match b.get(i) {
        Some(b'.') if i < limit => {
            let k = skip_ws(b, i + 1, limit);
            let mut e = k;
            while e < limit && is_ident(b[e]) {
                e += 1;
            }
            if e > k && is_ident_start(b[k]) {
                (Access::Key(text[k..e].to_string()), e)
            } else {
                (Access::Dynamic, pos)
            }
        }
        Some(b'[') if i < limit => {
            let k = skip_ws(b, i + 1, limit);
            if k < limit && (b[k] == b'"' || b[k] == b'\'') {
                let end = string_end(b, k);
                let close = skip_ws(b, end, limit);
                let closed = end <= limit && end > k + 1 && b[end - 1] == b[k];
                let inner = text.get(k + 1..end.saturating_sub(1)).filter(|_| closed);
                if let Some(inner) = inner
                    && close < limit
                    && b[close] == b']'
                    && !inner.contains('\\')
                {
                    return (Access::Key(inner.to_string()), close + 1);
                }
            }
            (Access::Dynamic, pos)
        }
        _ => (Access::Whole, pos),
    }
}

/// Every variable reference in the code of a template, in text order. Names after a `.` (attributes)
/// or a `|` (filters) are not variables; neither is a name being assigned (`name = …`).
fn references(text: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    for block in code_blocks(text) {
        let code = blank_strings(&text[block.clone()]);
        let guarded = is_guarded(&code);
        let mut j = 0;
        while j < code.len() {
            if !is_ident_start(code[j]) || (j > 0 && is_ident(code[j - 1])) {
                j += 1;
                continue;
            }
            let s = j;
            while j < code.len() && is_ident(code[j]) {
                j += 1;
            }
            let prev = code[..s].iter().rev().find(|b| !b.is_ascii_whitespace());
            if matches!(prev, Some(b'.' | b'|')) {
                continue;
            }
            let next = skip_ws(&code, j, code.len());
            if code.get(next) == Some(&b'=') && code.get(next + 1) != Some(&b'=') {
                continue;
            }
            let (access, end) = accessor(text, block.start + j, block.end);
            out.push(Reference {
                root: text[block.start + s..block.start + j].to_string(),
                access,
                range: block.start + s..end,
                guarded,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        let mut env = BTreeMap::new();
        env.insert("PW".to_string(), "s3cret".to_string());
        let mut s = Scope::new(env);
        let mut vars = Map::new();
        vars.insert("host".into(), Value::String("db1".into()));
        vars.insert("schema_name".into(), Value::String("public".into()));
        s.set_vars(vars);
        s
    }

    #[test]
    fn renders_env_and_vars() {
        let s = scope();
        assert_eq!(
            s.render("x{{ env.PW }}-{{ vars.host }}").unwrap(),
            "xs3cret-db1"
        );
        assert_eq!(
            s.render("{{ env['PW'] }}/{{ vars[\"host\"] }}").unwrap(),
            "s3cret/db1"
        );
        assert_eq!(s.render("{{ env . PW }}").unwrap(), "s3cret");
        assert_eq!(s.render("plain").unwrap(), "plain");
    }

    #[test]
    fn undefined_is_an_error_with_a_name() {
        let s = scope();
        let e = s.render("{{ env.NOPE }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `env.NOPE`");
        assert_eq!(e.range, Some(3..11));
        let e = s.render("{{ vars.hots }}").unwrap_err();
        assert_eq!(e.hint.as_deref(), Some("did you mean `vars.host`?"));
        let e = s.render("{{ database.name }}").unwrap_err();
        assert!(e.hint.unwrap().contains("only defined in stage options"));
        let e = s.render("{{ nope }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `nope`");
        assert_eq!(e.range, Some(3..7));
        let e = s.render("{{ env['NOPE'] }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `env.NOPE`");
        assert_eq!(e.range, Some(3..14));
        // An attribute of a defined value that does not exist.
        let e = s.render("{{ vars.host.port }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `vars.host.port`");
        assert_eq!(e.hint.as_deref(), Some("`vars.host` has no `port`"));
    }

    #[test]
    fn the_caret_goes_to_the_undefined_reference() {
        let s = scope();
        let text = "ANALYZE {{ vars.schema_name }}.a, {{ vars.schema }}.b";
        let e = s.render(text).unwrap_err();
        assert_eq!(e.message, "undefined variable `vars.schema`");
        assert_eq!(&text[e.range.unwrap()], "vars.schema");

        // Not in a string literal, not as an attribute, not outside the blocks.
        let text = "vars.schema {{ 'vars.schema' ~ x.vars.schema ~ vars.schema }}";
        let e = s.render(text).unwrap_err();
        assert_eq!(e.message, "undefined variable `x.vars.schema`");
        let text = "vars.schema {{ 'vars.schema' ~ vars.schema_name ~ vars.schema }}";
        let e = s.render(text).unwrap_err();
        let r = e.range.unwrap();
        assert_eq!(
            (&text[r.clone()], r.start),
            ("vars.schema", text.rfind("vars.schema").unwrap())
        );

        // The first undefined reference in the text is reported.
        let e = s.render("{{ vars.zz }} {{ vars.aa }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `vars.zz`");
    }

    #[test]
    fn references_are_found_in_code_only() {
        let refs = references(
            "{# env.A #}{% raw %}{{ env.B }}{% endraw %}{{ env.C ~ \"env.D\" }}{%- if vars['x'] is defined -%}{{ database[k] | upper }}{% endif %}",
        );
        let found: Vec<(&str, &Access, bool)> = refs
            .iter()
            .filter(|r| ROOTS.contains(&r.root.as_str()))
            .map(|r| (r.root.as_str(), &r.access, r.guarded))
            .collect();
        assert_eq!(
            found,
            vec![
                ("env", &Access::Key("C".into()), false),
                ("vars", &Access::Key("x".into()), true),
                ("database", &Access::Dynamic, false),
            ]
        );
    }

    #[test]
    fn default_filter_and_defined_test_allow_undefined() {
        let s = scope();
        // Strict mode lets `default` and `is defined` see an undefined value.
        assert_eq!(s.render("{{ env.X | default('y') }}").unwrap(), "y");
        assert_eq!(s.render("{{ env.X|d('y') }}").unwrap(), "y");
        assert_eq!(s.render("{{ env['X'] | default('y') }}").unwrap(), "y");
        assert_eq!(s.render("{{ env.PW | default('y') }}").unwrap(), "s3cret");
        assert_eq!(s.render("{{ vars.port | default(5432) }}").unwrap(), "5432");
        assert_eq!(
            s.render("{% if env.X is defined %}{{ env.X }}{% else %}none{% endif %}")
                .unwrap(),
            "none"
        );
        assert_eq!(
            s.render("{% if env.X is not defined %}none{% endif %}")
                .unwrap(),
            "none"
        );
        assert_eq!(s.render("{{ env.X is undefined }}").unwrap(), "True");

        // A plain reference stays an error, with the same words as the pre-check, even when the
        // same name is guarded elsewhere.
        let text = "{{ env.X | default('y') }}-{{ env.X }}";
        let e = s.render(text).unwrap_err();
        assert_eq!(e.message, "undefined variable `env.X`");
        assert_eq!(
            e.hint.as_deref(),
            Some("set the environment variable `X` before running pgferry")
        );
        assert_eq!(e.range.map(|r| &text[r]), Some("env.X"));
        // A guard elsewhere in the string does not cover an unguarded block.
        let e = s
            .render("{{ env.A | default('') }}{{ env.B }}")
            .unwrap_err();
        assert_eq!(e.message, "undefined variable `env.B`");
        // A default on something else does not excuse an unknown name.
        let e = s.render("{{ nope.X | default('z') }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `nope.X`");
        // Falsy is not defined: `or` does not guard.
        assert!(s.render("{{ env.X or 'z' }}").is_err());
    }

    #[test]
    fn whole_namespaces_cannot_be_used() {
        let s = scope();
        for (text, root) in [
            ("{{ env }}", "env"),
            ("{{ env | items }}", "env"),
            ("{% for k in env %}{{ k }}{% endfor %}", "env"),
            ("{% set e = env %}{{ e.PW }}", "env"),
            ("{{ env[vars.host] }}", "env"),
            ("{{ (env) }}", "env"),
            ("{{ env | default('x') }}", "env"),
            ("{{ vars }}", "vars"),
            ("{{ vars|length }}", "vars"),
        ] {
            let e = s.render(text).unwrap_err();
            assert!(
                e.message
                    .starts_with(&format!("`{root}` can only be read one variable at a time")),
                "{text}: {e:?}"
            );
            assert_eq!(e.range.clone().map(|r| &text[r]), Some(root), "{text}");
        }
        let e = s.render("{{ env }}").unwrap_err();
        assert!(e.hint.unwrap().contains("secrets"));
        let mut s = scope();
        s.set_database(DatabaseScope::Stage(serde_json::json!({"name": "a"})));
        let e = s.render("{{ database }}").unwrap_err();
        assert!(
            e.message
                .starts_with("`database` can only be read one key at a time")
        );
        // `debug()` would print the whole context.
        assert!(s.render("{{ debug() }}").is_err());
    }

    #[test]
    fn namespaces_render_no_values_as_a_whole() {
        // Whatever the scan misses, the engine itself cannot list or print a namespace.
        let ns = Namespace::value("env", [("PW".to_string(), "s3cret".into())].into());
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let ctx = minijinja::context! { e => ns };
        for text in ["{{ e }}", "{{ e|string }}", "{{ [e] }}", "{{ e|pprint }}"] {
            let out = env.render_str(text, &ctx).unwrap_or_default();
            assert!(!out.contains("s3cret"), "{text}: {out}");
        }
        for text in [
            "{{ e|items }}",
            "{{ e|list }}",
            "{% for k in e %}{{ k }}{% endfor %}",
        ] {
            assert!(env.render_str(text, &ctx).is_err(), "{text}");
        }
        assert_eq!(
            env.render_str("{{ e.PW }}{{ e['PW'] }}", &ctx).unwrap(),
            "s3crets3cret"
        );
    }

    #[test]
    fn database_in_scope_for_stages() {
        let mut s = scope();
        s.set_database(DatabaseScope::Stage(
            serde_json::json!({"name": "dvd", "target": "dvd2", "tables": [], "exclude": []}),
        ));
        assert_eq!(s.render("{{ database.target }}").unwrap(), "dvd2");
        let e = s.render("{{ database.nam }}").unwrap_err();
        assert_eq!(e.hint.as_deref(), Some("did you mean `database.name`?"));
    }

    #[test]
    fn unknown_database_is_left_as_written() {
        let mut s = scope();
        s.set_database(DatabaseScope::Unknown);
        assert_eq!(
            s.render("ANALYZE -- {{ database.name }}").unwrap(),
            "ANALYZE -- {{ database.name }}"
        );
        // Other problems in the same string are still reported.
        let e = s.render("{{ database.name }}{{ vars.nope }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `vars.nope`");
    }

    #[test]
    fn database_entries_see_what_is_rendered_before() {
        let mut s = scope();
        s.set_database(DatabaseScope::Entry {
            key: "name".into(),
            entry: Map::new(),
        });
        let e = s.render("{{ database.name }}").unwrap_err();
        assert_eq!(e.message, "a database's `name` cannot refer to itself");
        let e = s.render("{{ database.target }}").unwrap_err();
        assert_eq!(e.message, "undefined variable `database.target`");
        assert!(
            e.hint
                .unwrap()
                .contains("write the name of the source database")
        );

        let name = serde_json::json!({"name": "app"});
        s.set_database(DatabaseScope::Entry {
            key: "target".into(),
            entry: name.as_object().unwrap().clone(),
        });
        assert_eq!(s.render("{{ database.name }}_copy").unwrap(), "app_copy");
        let e = s.render("{{ database.nam }}").unwrap_err();
        assert_eq!(
            e.hint.as_deref(),
            Some("did you mean `database.name`? In `target`, only `database.name` is defined")
        );
        let e = s.render("{{ database.target }}").unwrap_err();
        assert_eq!(e.message, "a database's `target` cannot refer to itself");

        let both = serde_json::json!({"name": "app", "target": "app2"});
        s.set_database(DatabaseScope::Entry {
            key: "exclude".into(),
            entry: both.as_object().unwrap().clone(),
        });
        assert_eq!(s.render("{{ database.target }}.*").unwrap(), "app2.*");
        let e = s.render("{{ database.tables }}").unwrap_err();
        assert_eq!(
            e.hint.as_deref(),
            Some("in `exclude`, only `database.name` and `database.target` are defined")
        );
    }

    #[test]
    fn vars_cannot_use_vars() {
        let s = Scope::new(BTreeMap::new());
        let e = s.render("{{ vars.host }}").unwrap_err();
        assert!(e.hint.unwrap().contains("can use `env` only"));
    }

    #[test]
    fn syntax_errors_point_into_the_template() {
        let s = scope();
        let text = "postgres://u@{{ vars.host }:1/src";
        let e = s.render(text).unwrap_err();
        assert!(e.message.starts_with("invalid template: unexpected `}`"));
        assert_eq!(e.range.map(|r| &text[r]), Some("}"));
        // A block left open: at the end of the text.
        let text = "ANALYZE {% if vars.host %}";
        let e = s.render(text).unwrap_err();
        assert!(e.message.contains("unexpected end of input"), "{e:?}");
        assert_eq!(e.range, Some(text.len()..text.len()));
    }
}
