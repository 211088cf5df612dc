//! Compiling a plan: parse (keeping positions), render templates, check against the JSON Schema,
//! resolve stage references, find cycles, type every option and build the DAG — collecting every
//! problem in one pass, so a broken plan is reported whole. Nothing here connects to anything.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::diagnostic::{Diagnostic, SourceFile, closest};
use super::raw::{COMMON_STAGE_KEYS, RawPlan, RawState, StageCommon, StageOptions};
use super::source::{Path, PlanDocument};
use super::template::{DatabaseScope, Scope, TemplateError};
use super::{Database, Endpoint, Plan, Stage, StateLocation, fingerprint};
use crate::dag::Dag;
use crate::path;
use crate::secret::Secret;
use crate::select::{Glob, GlobError};

/// What the command line adds to a plan.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// `--var key=value`, applied over `[vars]`.
    pub vars: Vec<(String, String)>,
    /// The environment templates see as `env` (the process environment in real use).
    pub env: BTreeMap<String, String>,
}

/// Reads and compiles a plan file. Errors come back as diagnostics together with the source they
/// point into (which is empty when the file could not be read).
pub fn compile_file(
    path: &str,
    opts: &CompileOptions,
) -> Result<Plan, (SourceFile, Vec<Diagnostic>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let src = SourceFile::new(path, "");
            let hint = if e.kind() == std::io::ErrorKind::InvalidData {
                "a plan is UTF-8 text (TOML); convert the file, e.g. `iconv -f latin1 -t utf-8`"
            } else {
                "pass the path of a plan, e.g. `pgferry check pipelines/dvdrental.toml`"
            };
            let d = Diagnostic::error(format!("cannot read plan file: {e}")).hint(hint);
            return Err((src, vec![d]));
        }
    };
    let src = SourceFile::new(path, text);
    compile(&src, opts).map_err(|d| (src, d))
}

/// Compiles plan text.
pub fn compile(src: &SourceFile, opts: &CompileOptions) -> Result<Plan, Vec<Diagnostic>> {
    let doc = PlanDocument::parse(&src.text).map_err(|d| vec![d])?;
    if doc.value.as_object().is_none_or(Map::is_empty) {
        return Err(vec![Diagnostic::error("the plan is empty").hint(
            "`pgferry init PLAN.toml` writes a plan to start from, with every standard stage",
        )]);
    }
    let mut diags = Diags::default();

    // 1. Variables: [vars] rendered with `env` only, then `--var` overrides.
    let mut scope = Scope::new(opts.env.clone());
    let mut vars = Map::new();
    if let Some(Value::Object(raw_vars)) = doc.value.get("vars") {
        for (k, v) in raw_vars {
            let mut p = path!["vars", k.as_str()];
            let rendered =
                scope.render_value(v, &mut p, &mut |p, e| diags.template(&doc, src, p, e));
            vars.insert(k.clone(), rendered);
        }
    }
    for (k, v) in &opts.vars {
        vars.insert(k.clone(), Value::String(v.clone()));
    }
    scope.set_vars(vars.clone());

    // 2. Everything but the stages, rendered with `env` and `vars`.
    let mut top = Map::new();
    if let Value::Object(map) = &doc.value {
        for (k, v) in map {
            let rendered = match k.as_str() {
                "stages" => v.clone(),
                "vars" => Value::Object(vars.clone()),
                "databases" => {
                    render_databases(&mut scope, v, &mut |p, e| diags.template(&doc, src, p, e))
                }
                _ => {
                    let mut p = path![k.as_str()];
                    scope.render_value(v, &mut p, &mut |p, e| diags.template(&doc, src, p, e))
                }
            };
            top.insert(k.clone(), rendered);
        }
    }

    // 3. The databases, as templates see them.
    let database_list = database_entries(&top);
    let databases: Vec<&Database> = database_list.iter().map(|(_, d)| d).collect();

    // 4. Stages, rendered once per database (`database` in scope), then the whole plan checked
    //    against the schema, once per rendering. Without a usable database (which is reported on its
    //    own), they are rendered once, leaving what uses `database` as written.
    let raw_stages = doc.value.get("stages").cloned().unwrap_or(Value::Null);
    let renderings: Vec<DatabaseScope> = if databases.is_empty() {
        vec![DatabaseScope::Unknown]
    } else {
        databases
            .iter()
            .map(|d| DatabaseScope::Stage(serde_json::to_value(d).unwrap_or(Value::Null)))
            .collect()
    };
    let mut rendered_plans = Vec::new();
    for db in renderings {
        scope.set_database(db);
        let mut p = path!["stages"];
        let stages = scope.render_value(&raw_stages, &mut p, &mut |p, e| {
            diags.template(&doc, src, p, e)
        });
        let mut plan = top.clone();
        if !stages.is_null() {
            plan.insert("stages".into(), stages);
        }
        let plan = Value::Object(plan);
        for d in super::schema::check(&plan, &doc) {
            diags.push(d);
        }
        rendered_plans.push(plan);
    }

    // 5. Meaning: database names, stage references, cycles.
    check_databases(&database_list, &top, &doc, &mut diags);
    let first = rendered_plans.first().cloned().unwrap_or(Value::Null);
    let stage_map = first
        .get("stages")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    // Stages in the order they appear in the file.
    let mut ids: Vec<String> = stage_map.keys().cloned().collect();
    ids.sort_by_key(|id| {
        doc.key_span(&path!["stages", id.as_str()])
            .map(|s| s.start)
            .unwrap_or(usize::MAX)
    });
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
    for (i, id) in ids.iter().enumerate() {
        let after = stage_map
            .get(id)
            .and_then(|s| s.get("after"))
            .and_then(Value::as_array);
        for (j, dep) in after.into_iter().flatten().enumerate() {
            let Some(dep) = dep.as_str() else { continue };
            // A repeated entry is reported by the schema check.
            if after
                .into_iter()
                .flatten()
                .take(j)
                .any(|d| d.as_str() == Some(dep))
            {
                continue;
            }
            let span = doc.value_span(&path!["stages", id.as_str(), "after", j]);
            if dep == id {
                diags.push(
                    Diagnostic::error(format!("stage `{id}` runs after itself"))
                        .at(span)
                        .hint("remove it from its own `after` list"),
                );
                continue;
            }
            match index.get(dep) {
                Some(&d) => deps[i].push(d),
                None => {
                    let hint = match closest(dep, ids.iter().map(String::as_str)) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None => format!("stages in this plan: {}", ids.join(", ")),
                    };
                    diags.push(
                        Diagnostic::error(format!(
                            "stage `{id}` runs after `{dep}`, which is not a stage of this plan"
                        ))
                        .at(span)
                        .hint(hint),
                    );
                }
            }
        }
    }
    let dag = Dag::new(&deps);
    for cycle in dag.cycles() {
        // `a waits for b, which waits for a`: each stage names the next in its `after`.
        let mut names = cycle.iter().map(|&i| ids[i].as_str());
        let mut text = format!(
            "{} waits for {}",
            names.next().unwrap_or_default(),
            names.next().unwrap_or_default()
        );
        for name in names {
            text.push_str(&format!(", which waits for {name}"));
        }
        // Point at the `after` entry of the first stage that names the second.
        let (a, b) = (cycle[0], cycle[1]);
        let after = stage_map
            .get(&ids[a])
            .and_then(|s| s.get("after"))
            .and_then(Value::as_array);
        let pos = after
            .and_then(|arr| arr.iter().position(|v| v.as_str() == Some(ids[b].as_str())))
            .unwrap_or(0);
        diags.push(
            Diagnostic::error(format!("stages form a cycle: {text}"))
                .at(doc.value_span(&path!["stages", ids[a].as_str(), "after", pos]))
                .hint("remove one of these `after` entries"),
        );
    }

    if !diags.list.is_empty() {
        // In file order, like a compiler; problems without a position last.
        diags
            .list
            .sort_by_key(|d| d.span.as_ref().map(|s| s.start).unwrap_or(usize::MAX));
        return Err(diags.list);
    }

    // 6. Typed values. The schema check passed, so these only fail if schema and types disagree.
    let raw: RawPlan = serde_json::from_value(first.clone()).map_err(|e| {
        vec![
            Diagnostic::error(format!(
                "internal: the plan passed its schema but not its types: {e}"
            ))
            .hint("please report this; the schema and the program disagree"),
        ]
    })?;
    let dbs: Vec<Database> = raw
        .databases
        .iter()
        .map(|d| Database {
            name: d.name.clone(),
            target: d.target.clone().unwrap_or_else(|| d.name.clone()),
            tables: d.tables.clone(),
            exclude: d.exclude.clone(),
        })
        .collect();
    let source = Endpoint {
        url: raw.source.url.clone(),
        password: raw.source.password.clone().map(Secret::new),
    };
    let target = Endpoint {
        url: raw.target.url.clone(),
        password: raw.target.password.clone().map(Secret::new),
    };
    let state = match &raw.state {
        Some(s) if s.url.is_some() => StateLocation {
            endpoint: Endpoint {
                url: s.url.clone().unwrap_or_default(),
                password: s.password.clone().map(Secret::new),
            },
            database: None,
            schema: s.schema(),
        },
        other => StateLocation {
            endpoint: target.clone(),
            database: dbs.first().map(|d| d.target.clone()),
            schema: other
                .as_ref()
                .map(RawState::schema)
                .unwrap_or_else(|| super::raw::defaults::STATE_SCHEMA.into()),
        },
    };

    let mut stages = Vec::with_capacity(ids.len());
    let mut errors = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut per_db = Vec::new();
        let mut common = StageCommon::default();
        for rendered in &rendered_plans {
            let Some(Value::Object(stage)) = rendered.get("stages").and_then(|s| s.get(id)) else {
                continue;
            };
            common = serde_json::from_value(Value::Object(
                stage
                    .iter()
                    .filter(|(k, _)| COMMON_STAGE_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ))
            .unwrap_or_default();
            let options: Map<String, Value> = stage
                .iter()
                .filter(|(k, _)| !COMMON_STAGE_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            match StageOptions::from_json(&common.kind, Value::Object(options)) {
                Ok(o) => per_db.push(o),
                Err(e) => errors.push(
                    Diagnostic::error(format!("stage `{id}`: {e}"))
                        .at(doc.value_span(&path!["stages", id.as_str()])),
                ),
            }
        }
        let Some(kind) = per_db.first().map(StageOptions::kind) else {
            continue;
        };
        let fp = fingerprint(kind, &per_db, &dbs, &source, &target);
        stages.push(Stage {
            id: id.clone(),
            kind,
            after: deps[i].clone(),
            description: common.description.clone(),
            retries: common.retries(),
            options: per_db,
            fingerprint: fp,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    Ok(Plan {
        name: raw.name,
        path: src.path.clone(),
        description: raw.description,
        vars,
        source,
        target,
        state,
        databases: dbs,
        stages,
        dag,
    })
}

/// Renders the `[[databases]]` entries key by key: `name` first (`database` not defined yet), then
/// `target` with `database.name`, then the other keys with `database.name` and `database.target` (the
/// rendered target, or the name when there is none), so `target = "{{ database.name }}_copy"` and
/// `exclude = ["{{ database.target }}.*"]` work.
fn render_databases(
    scope: &mut Scope,
    value: &Value,
    on_error: &mut dyn FnMut(&Path, TemplateError),
) -> Value {
    let Value::Array(entries) = value else {
        return value.clone();
    };
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let Value::Object(map) = entry else {
            out.push(entry.clone());
            continue;
        };
        let mut rendered = Map::new();
        // What `database` holds so far. `None` when the entry has no `name` or a key `database`
        // needs failed to render: that is reported, so the keys after it leave `database` unchecked.
        let mut known = map.contains_key("name").then(Map::new);
        let first = ["name", "target"];
        let order = first.into_iter().filter(|k| map.contains_key(*k)).chain(
            map.keys()
                .map(String::as_str)
                .filter(|k| !first.contains(k)),
        );
        for key in order {
            scope.set_database(match &known {
                Some(entry) => DatabaseScope::Entry {
                    key: key.to_string(),
                    entry: entry.clone(),
                },
                None => DatabaseScope::Unknown,
            });
            let mut failed = false;
            let mut p = path!["databases", i, key];
            let v = scope.render_value(&map[key], &mut p, &mut |p, e| {
                failed = true;
                on_error(p, e);
            });
            if first.contains(&key) {
                match (&mut known, failed) {
                    (Some(entry), false) => {
                        entry.insert(key.to_string(), v.clone());
                        if key == "name" && !map.contains_key("target") {
                            entry.insert("target".into(), v.clone());
                        }
                    }
                    _ => known = None,
                }
            }
            rendered.insert(key.to_string(), v);
        }
        scope.set_database(DatabaseScope::Outside);
        out.push(Value::Object(rendered));
    }
    Value::Array(out)
}

/// The `[[databases]]` entries as templates see them (`target` defaults to `name`), each with its
/// index in the list. Entries without a name are left out (the schema check reports them).
fn database_entries(top: &Map<String, Value>) -> Vec<(usize, Database)> {
    let Some(Value::Array(entries)) = top.get("databases") else {
        return Vec::new();
    };
    entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let name = e.get("name")?.as_str()?.to_string();
            let strings = |k: &str| -> Vec<String> {
                e.get(k)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let db = Database {
                target: e
                    .get("target")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| name.clone()),
                tables: strings("tables"),
                exclude: strings("exclude"),
                name,
            };
            Some((i, db))
        })
        .collect()
}

fn check_databases(
    dbs: &[(usize, Database)],
    top: &Map<String, Value>,
    doc: &PlanDocument,
    diags: &mut Diags,
) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut targets: HashMap<&str, usize> = HashMap::new();
    for (i, db) in dbs {
        let i = *i;
        let name_repeated = names.insert(&db.name, i);
        if let Some(first) = name_repeated {
            diags.push(
                Diagnostic::error(format!("database `{}` is listed twice", db.name))
                    .at(doc.value_span(&path!["databases", i, "name"]))
                    .hint(format!(
                        "[[databases]] entry {} already migrates it; remove one",
                        first + 1
                    )),
            );
        }
        if let Some(first) = targets
            .insert(&db.target, i)
            .filter(|_| name_repeated.is_none())
        {
            let field = if doc
                .value
                .get("databases")
                .and_then(|d| d.get(i))
                .and_then(|d| d.get("target"))
                .is_some()
            {
                "target"
            } else {
                "name"
            };
            diags.push(
                Diagnostic::error(format!(
                    "two databases would be migrated into the same target database `{}`",
                    db.target
                ))
                .at(doc.value_span(&path!["databases", i, field]))
                .hint(format!(
                    "[[databases]] entry {} already targets it; give this one another `target`",
                    first + 1
                )),
            );
        }
    }
    // Table patterns, in every entry (named or not).
    let entries = top.get("databases").and_then(Value::as_array);
    for (i, entry) in entries.into_iter().flatten().enumerate() {
        for field in ["tables", "exclude"] {
            let patterns = entry.get(field).and_then(Value::as_array);
            for (j, pattern) in patterns.into_iter().flatten().enumerate() {
                let Some(g) = pattern.as_str() else { continue };
                let Err(why) = Glob::parse(g) else {
                    continue;
                };
                let message = match why {
                    GlobError::Empty => "empty table pattern".to_string(),
                    _ => format!("`{g}` is not a table pattern: {why}"),
                };
                let hint = match why {
                    GlobError::Empty => {
                        "remove it, or write a `schema.table` pattern such as `public.*`".into()
                    }
                    GlobError::NoDot if Glob::parse(&format!("public.{g}")).is_ok() => {
                        format!("patterns are `schema.table`: did you mean `public.{g}`?")
                    }
                    // A TOML "..." string escapes `\` itself; a '...' string keeps it as written.
                    GlobError::UnclosedClass if !g.contains(['\'', '\\']) => format!(
                        "close it with `]`, or match a literal `[` with `\\[`: in TOML, \
                         '{}' (single quotes keep the `\\`)",
                        g.replace('[', "\\[")
                    ),
                    GlobError::TrailingBackslash => {
                        "remove the last `\\`, or double it to match a `\\` itself".into()
                    }
                    _ => "patterns are `schema.table` with `*`, `?` and `[...]` wildcards, e.g. \
                          `public.*`, `sales.order_?` or `public.audit_[0-9]`"
                        .into(),
                };
                diags.push(
                    Diagnostic::error(message)
                        .at(doc.value_span(&path!["databases", i, field, j]))
                        .hint(hint),
                );
            }
        }
    }
}

/// Collected diagnostics, without duplicates (a stage rendered for several databases reports a
/// problem once).
#[derive(Default)]
struct Diags {
    list: Vec<Diagnostic>,
}

impl Diags {
    fn push(&mut self, d: Diagnostic) {
        if !self.list.contains(&d) {
            self.list.push(d);
        }
    }

    fn template(&mut self, doc: &PlanDocument, src: &SourceFile, path: &Path, e: TemplateError) {
        let value_span = doc.value_span(path);
        // Point into the string when its source text is a plain quoted string (no escapes), so the
        // caret lands on the variable itself.
        let span = match (&value_span, &e.range) {
            (Some(vs), Some(r)) => {
                let raw = &src.text[vs.clone()];
                let simple =
                    (raw.starts_with('"') && !raw.contains('\\') && !raw.starts_with("\"\"\""))
                        || (raw.starts_with('\'') && !raw.starts_with("'''"));
                if simple && vs.start + 1 + r.end <= vs.end {
                    Some(vs.start + 1 + r.start..vs.start + 1 + r.end)
                } else {
                    value_span.clone()
                }
            }
            _ => value_span.clone(),
        };
        let mut d = Diagnostic::error(e.message).at(span);
        if let Some(h) = e.hint {
            d = d.hint(h);
        }
        self.push(d);
    }
}
