//! Template rendering of plan strings with minijinja. In scope: `env` (the process environment),
//! `vars` (the plan's `[vars]` overridden by `--var`) and, in stage options, `database` (the current
//! `[[databases]]` entry). An undefined variable is an error, never an empty string.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

use super::diagnostic::closest;

/// What a template may refer to.
pub struct Scope {
    env: BTreeMap<String, String>,
    vars: Map<String, Value>,
    database: Option<Value>,
}

/// A template failure: the message, the hint, and the part of the template it is about (a byte range
/// within the template text, when known).
#[derive(Debug, Clone)]
pub struct TemplateError {
    pub message: String,
    pub hint: Option<String>,
    pub range: Option<std::ops::Range<usize>>,
}

impl Scope {
    pub fn new(env: BTreeMap<String, String>) -> Scope {
        Scope {
            env,
            vars: Map::new(),
            database: None,
        }
    }

    pub fn set_vars(&mut self, vars: Map<String, Value>) {
        self.vars = vars;
    }

    pub fn set_database(&mut self, database: Option<Value>) {
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
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        let tmpl = env.template_from_str(text).map_err(|e| TemplateError {
            message: format!("invalid template: {}", e.detail().unwrap_or("syntax error")),
            hint: Some("templates use minijinja (Jinja2) syntax: `{{ vars.name }}`".into()),
            range: None,
        })?;
        // Name the undefined variable precisely, before rendering says only "undefined value".
        let mut names: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
        names.sort();
        for name in names {
            self.check_defined(text, &name)?;
        }
        let ctx = minijinja::context! {
            env => minijinja::Value::from(minijinja::value::Serde(&self.env)),
            vars => minijinja::Value::from(minijinja::value::Serde(&self.vars)),
            database => match &self.database {
                Some(db) => minijinja::Value::from(minijinja::value::Serde(db)),
                None => minijinja::Value::UNDEFINED,
            },
        };
        tmpl.render(ctx).map_err(|e| TemplateError {
            message: format!(
                "template failed: {}{}",
                e.kind(),
                e.detail().map(|d| format!(": {d}")).unwrap_or_default()
            ),
            hint: Some("in scope: `env.NAME`, `vars.NAME`, and in stages `database.name`".into()),
            range: None,
        })
    }

    fn check_defined(&self, text: &str, name: &str) -> Result<(), TemplateError> {
        let mut parts = name.split('.');
        let root = parts.next().unwrap_or_default();
        let key = parts.next();
        let range = text.find(name).map(|i| i..i + name.len());
        let undefined = |hint: String| TemplateError {
            message: format!("undefined variable `{name}`"),
            hint: Some(hint),
            range: range.clone(),
        };
        match (root, key) {
            ("env", Some(k)) => {
                if !self.env.contains_key(k) {
                    return Err(undefined(format!(
                        "set the environment variable `{k}` before running pgferry"
                    )));
                }
            }
            ("vars", Some(k)) => {
                if !self.vars.contains_key(k) {
                    let hint = match closest(k, self.vars.keys().map(String::as_str)) {
                        Some(c) => format!("did you mean `vars.{c}`?"),
                        None => format!("define `{k}` under [vars], or pass `--var {k}=VALUE`"),
                    };
                    return Err(undefined(hint));
                }
            }
            ("database", Some(k)) => match &self.database {
                None => {
                    return Err(undefined(
                        "`database` is only defined in stage options, where each stage runs once per [[databases]] entry".into(),
                    ))
                }
                Some(db) => {
                    if db.get(k).is_none() {
                        return Err(undefined(
                            "a database entry has `name`, `target`, `tables` and `exclude`".into(),
                        ));
                    }
                }
            },
            ("env" | "vars" | "database", None) => {}
            (other, _) => {
                let hint = match closest(other, ["env", "vars", "database"]) {
                    Some(c) => format!("did you mean `{c}`? In scope: `env`, `vars`, `database`"),
                    None => "in scope: `env.NAME`, `vars.NAME`, and in stages `database.name`".into(),
                };
                return Err(undefined(hint));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        let mut env = BTreeMap::new();
        env.insert("PW".to_string(), "s3cret".to_string());
        let mut s = Scope::new(env);
        let mut vars = Map::new();
        vars.insert("host".into(), Value::String("db1".into()));
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
    }

    #[test]
    fn database_in_scope_for_stages() {
        let mut s = scope();
        s.set_database(Some(serde_json::json!({"name": "dvd", "target": "dvd2"})));
        assert_eq!(s.render("{{ database.target }}").unwrap(), "dvd2");
    }
}
