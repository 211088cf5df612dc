//! The plan reference, `docs/plan-reference.md`, generated from the plan's JSON Schema (the
//! `schemas/plan.schema.json` compiled into the binary): every section and stage kind, every key with
//! its type, default, allowed values, description and an example, and a plan that uses every key.
//!
//! `pgferry schema --markdown` prints it; `tests/it/plan_reference.rs` fails when the committed file
//! differs and compiles [`example_plan`]. The text comes from the schema's `markdownDescription`
//! (else `description`); a `default: ...` paragraph in it becomes the default when the key has no
//! `default` keyword. Examples come from `examples`, else from the default or the allowed values; a
//! key for which none can be derived is an error, so a new option cannot go undocumented.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::schema::SCHEMA_TEXT;

/// How to regenerate the committed reference (printed by the test when it is out of date).
pub const REGENERATE: &str = "cargo run -q -- schema --markdown > docs/plan-reference.md";

/// Where the reference is committed, relative to the repository.
pub const PATH: &str = "docs/plan-reference.md";

/// The plan reference as Markdown.
pub fn markdown() -> Result<String, String> {
    Reference::load()?.markdown()
}

/// A plan (TOML) that sets every key of the schema to its example value; it compiles with
/// `SOURCE_PASSWORD`, `TARGET_PASSWORD` and `STATE_PASSWORD` in the environment.
pub fn example_plan() -> Result<String, String> {
    Reference::load()?.example_plan()
}

/// The stage kinds in the schema's order, each with its own definition.
struct Kind<'a> {
    name: &'a str,
    /// The kind's description from the `kind` enum (the long one).
    text: String,
    def: &'a Map<String, Value>,
}

struct Reference {
    root: Value,
}

/// Keys every stage has, in the order the reference shows them.
const COMMON: &[&str] = &["kind", "after", "description", "retries"];

impl Reference {
    fn load() -> Result<Reference, String> {
        let root: Value = serde_json::from_str(SCHEMA_TEXT)
            .map_err(|e| format!("the built-in plan schema is not valid JSON: {e}"))?;
        Ok(Reference { root })
    }

    fn at(&self, pointer: &str) -> Result<&Value, String> {
        self.root
            .pointer(pointer)
            .ok_or_else(|| format!("the plan schema has nothing at `{pointer}`"))
    }

    fn object(&self, pointer: &str) -> Result<&Map<String, Value>, String> {
        self.at(pointer)?
            .as_object()
            .ok_or_else(|| format!("the plan schema's `{pointer}` is not an object"))
    }

    /// The node a `$ref` points to (followed until there is none), or the node itself.
    fn resolve<'a>(&'a self, mut node: &'a Value) -> Result<&'a Value, String> {
        for _ in 0..8 {
            match node.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let pointer = r
                        .strip_prefix('#')
                        .ok_or_else(|| format!("the plan schema has a non-local $ref `{r}`"))?;
                    node = self.at(pointer)?;
                }
                None => return Ok(node),
            }
        }
        Err("the plan schema's $refs loop".into())
    }

    fn kinds(&self) -> Result<Vec<Kind<'_>>, String> {
        let kind = self.at("/$defs/stage/properties/kind")?;
        let names = strings(kind.get("enum"), "/$defs/stage/properties/kind/enum")?;
        let texts = strings(
            kind.get("markdownEnumDescriptions"),
            "/$defs/stage/properties/kind/markdownEnumDescriptions",
        )?;
        if texts.len() != names.len() {
            return Err(
                "the stage kinds and their markdownEnumDescriptions differ in number".into(),
            );
        }
        let branches = self
            .at("/$defs/stage/allOf")?
            .as_array()
            .ok_or("the plan schema's `/$defs/stage/allOf` is not an array")?;
        let mut kinds = Vec::new();
        for (name, text) in names.into_iter().zip(texts) {
            let branch = branches
                .iter()
                .find(|b| {
                    b.pointer("/if/properties/kind/const")
                        .and_then(Value::as_str)
                        == Some(name)
                })
                .ok_or_else(|| {
                    format!("the plan schema has no `if` branch for stage kind `{name}`")
                })?;
            let then = branch
                .get("then")
                .ok_or_else(|| format!("the branch of stage kind `{name}` has no `then`"))?;
            let def = self
                .resolve(then)?
                .as_object()
                .ok_or_else(|| format!("the definition of stage kind `{name}` is not an object"))?;
            kinds.push(Kind {
                name,
                text: text.to_string(),
                def,
            });
        }
        // The common keys must mean the same in every kind, or documenting them once would lie.
        let first = kinds.first().ok_or("the plan schema has no stage kinds")?;
        for kind in &kinds {
            for key in COMMON.iter().filter(|k| **k != "kind") {
                if kind.def.get("properties").and_then(|p| p.get(*key))
                    != first.def.get("properties").and_then(|p| p.get(*key))
                {
                    return Err(format!(
                        "stage kinds `{}` and `{}` describe `{key}` differently; every kind must share the common keys {COMMON:?}",
                        first.name, kind.name
                    ));
                }
            }
        }
        Ok(kinds)
    }

    fn markdown(&self) -> Result<String, String> {
        let kinds = self.kinds()?;
        let mut out = String::new();
        out.push_str("# Plan reference\n\n");
        let _ = writeln!(
            out,
            "<!-- Generated from schemas/plan.schema.json by `pgferry schema --markdown`. Do not edit: edit the schema, then run `{REGENERATE}`. -->\n"
        );
        let _ = writeln!(
            out,
            "Generated from [`schemas/plan.schema.json`](../schemas/plan.schema.json) (the schema the binary embeds and \
             validates plans with) by `pgferry schema --markdown`. Do not edit this file: edit the schema and run \
             `{REGENERATE}`; `tests/it/plan_reference.rs` fails while the two differ.\n"
        );
        out.push_str(&paragraphs(&text(&self.root)));
        out.push_str(
            "\n\nA plan is a TOML file. `{{ vars.NAME }}` comes from `[vars]` or `--var NAME=VALUE`, `{{ env.NAME }}` \
             from the environment; an undefined variable is an error. `pgferry check PLAN` reports every error of a \
             plan at once without connecting to anything, and editors that read the `#:schema` directive (taplo, \
             Even Better TOML) check a plan as you type.\n\n",
        );
        out.push_str("## Contents\n\n");
        out.push_str("- [Top level](#top-level)\n");
        out.push_str("- [The `[source]` and `[target]` tables](#the-source-and-target-tables)\n");
        out.push_str("- [The `[state]` table](#the-state-table)\n");
        out.push_str("- [The `[[databases]]` tables](#the-databases-tables)\n");
        out.push_str(
            "- [The `[stages]` tables](#the-stages-tables): [keys every stage has](#keys-every-stage-has)",
        );
        for kind in &kinds {
            let _ = write!(out, ", [`{0}`](#{0})", kind.name);
        }
        out.push('\n');
        out.push_str("- [Value types](#value-types): [duration](#duration), [size](#size)\n");
        out.push_str("- [A plan with every key](#a-plan-with-every-key)\n\n");

        out.push_str("## Top level\n\n");
        self.keys(&mut out, self.root_map()?, &[], None)?;

        out.push_str("## The `[source]` and `[target]` tables\n\n");
        out.push_str(
            "`[source]` is the server migrated from, `[target]` the server migrated to. Both are tables with the same keys.\n\n",
        );
        self.keys(&mut out, self.object("/$defs/endpoint")?, &[], None)?;
        out.push_str("Example:\n\n```toml\n");
        out.push_str(&self.table_toml("source", self.at("/properties/source")?)?);
        out.push('\n');
        out.push_str(&self.table_toml("target", self.at("/properties/target")?)?);
        out.push_str("```\n\n");

        out.push_str("## The `[state]` table\n\n");
        out.push_str(&paragraphs(&text(self.at("/$defs/state")?)));
        out.push_str("\n\n");
        self.keys(&mut out, self.object("/$defs/state")?, &[], None)?;
        out.push_str("Example:\n\n```toml\n");
        out.push_str(&self.table_toml("state", self.at("/properties/state")?)?);
        out.push_str("```\n\n");

        out.push_str("## The `[[databases]]` tables\n\n");
        out.push_str(&paragraphs(&text(self.at("/properties/databases")?)));
        out.push_str(" Each entry is a `[[databases]]` table:\n\n");
        self.keys(&mut out, self.object("/$defs/database")?, &[], None)?;
        out.push_str("Example:\n\n```toml\n");
        out.push_str(&self.table_toml("[databases]", self.at("/$defs/database")?)?);
        out.push_str("```\n\n");

        out.push_str("## The `[stages]` tables\n\n");
        out.push_str(&paragraphs(&text(self.at("/properties/stages")?)));
        out.push_str("\n\n");
        out.push_str(&paragraphs(&text(self.at("/$defs/stage")?)));
        out.push_str("\n\n| kind | what it does |\n|---|---|\n");
        let short = strings(
            self.at("/$defs/stage/properties/kind")?
                .pointer("/x-taplo/docs/enumValues"),
            "/$defs/stage/properties/kind/x-taplo/docs/enumValues",
        )?;
        for (kind, short) in kinds.iter().zip(short) {
            let _ = writeln!(out, "| [`{0}`](#{0}) | {1} |", kind.name, cell(short));
        }
        out.push('\n');

        out.push_str("### Keys every stage has\n\n");
        let common = self.common_keys(&kinds)?;
        self.keys(&mut out, &common, &[], Some("####"))?;
        out.push_str("Example:\n\n```toml\n[stages.indexes]\nkind = \"post_data\"\n");
        for key in COMMON.iter().filter(|k| **k != "kind") {
            let node = common
                .get("properties")
                .and_then(|p| p.get(*key))
                .ok_or_else(|| format!("no common key `{key}`"))?;
            let _ = writeln!(out, "{key} = {}", toml(&self.example(key, node)?));
        }
        out.push_str("```\n\n");

        for kind in &kinds {
            let _ = writeln!(out, "### `{}`\n", kind.name);
            out.push_str(&paragraphs(&kind.text));
            out.push_str("\n\n");
            let props = kind
                .def
                .get("properties")
                .and_then(Value::as_object)
                .ok_or_else(|| format!("stage kind `{}` has no properties", kind.name))?;
            let own: Vec<&String> = props
                .keys()
                .filter(|k| !COMMON.contains(&k.as_str()))
                .collect();
            if own.is_empty() {
                out.push_str(
                    "No options besides the [keys every stage has](#keys-every-stage-has).\n\n",
                );
            } else {
                out.push_str(
                    "Options, besides the [keys every stage has](#keys-every-stage-has):\n\n",
                );
                self.keys(&mut out, kind.def, COMMON, Some("####"))?;
            }
            out.push_str("Example:\n\n```toml\n");
            out.push_str(&self.stage_toml(kind, kind.name, None)?);
            out.push_str("```\n\n");
        }

        out.push_str("## Value types\n\n");
        for (name, title) in [("duration", "Duration"), ("size", "Size")] {
            let def = self.at(&format!("/$defs/{name}"))?;
            let _ = writeln!(out, "### {title}\n");
            out.push_str(&paragraphs(&text(def)));
            let examples = def
                .get("examples")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("`/$defs/{name}` has no examples"))?;
            out.push_str(" Examples: ");
            let shown: Vec<String> = examples.iter().map(|e| format!("`{}`", toml(e))).collect();
            out.push_str(&shown.join(", "));
            out.push_str(".\n\n");
        }

        out.push_str("## A plan with every key\n\n");
        out.push_str(
            "Every key set to its example value, to show the syntax in one place (the stages simply run one after \
             the other in the order of this reference). It compiles (`tests/it/plan_reference.rs` checks it), but it is \
             not a sensible migration: start from `pgferry init` or [`pipelines/dvdrental.toml`](../pipelines/dvdrental.toml).\n\n",
        );
        out.push_str("```toml\n");
        out.push_str(&self.example_plan()?);
        out.push_str("```\n");
        Ok(out)
    }

    fn root_map(&self) -> Result<&Map<String, Value>, String> {
        self.root
            .as_object()
            .ok_or_else(|| "the plan schema is not an object".to_string())
    }

    /// The common keys as one object schema (`kind` described by the stage's kind enum, the others
    /// by the first kind's definition, which [`Reference::kinds`] checked is everyone's).
    fn common_keys(&self, kinds: &[Kind<'_>]) -> Result<Map<String, Value>, String> {
        let first = kinds.first().ok_or("the plan schema has no stage kinds")?;
        let mut properties = Map::new();
        properties.insert(
            "kind".into(),
            self.at("/$defs/stage/properties/kind")?.clone(),
        );
        for key in COMMON.iter().filter(|k| **k != "kind") {
            let node = first
                .def
                .get("properties")
                .and_then(|p| p.get(*key))
                .ok_or_else(|| format!("stage kind `{}` has no `{key}`", first.name))?;
            properties.insert(key.to_string(), node.clone());
        }
        let mut object = Map::new();
        object.insert("properties".into(), Value::Object(properties));
        object.insert("required".into(), Value::Array(vec!["kind".into()]));
        Ok(object)
    }

    /// A summary table of an object's keys, then each key in detail.
    fn keys(
        &self,
        out: &mut String,
        object: &Map<String, Value>,
        skip: &[&str],
        heading: Option<&str>,
    ) -> Result<(), String> {
        let heading = heading.unwrap_or("###");
        object
            .get("properties")
            .and_then(Value::as_object)
            .ok_or("an object of the plan schema has no properties")?;
        let required: Vec<&str> = object
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let keys: Vec<(&String, &Value)> = ordered(object)
            .into_iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .collect();
        out.push_str("| key | type | default |\n|---|---|---|\n");
        for (key, node) in &keys {
            let _ = writeln!(
                out,
                "| `{key}` | {} | {} |",
                cell(&self.type_name(node)?),
                cell(&self.default(node, required.contains(&key.as_str()))?)
            );
        }
        out.push('\n');
        for (key, node) in &keys {
            let _ = writeln!(out, "{heading} `{key}`\n");
            let (body, _) = split_default(&text(node), node.get("enum").is_some());
            if !body.is_empty() {
                out.push_str(&paragraphs(&body));
                out.push_str("\n\n");
            }
            let _ = writeln!(out, "- type: {}", self.type_name(node)?);
            let _ = writeln!(
                out,
                "- default: {}",
                self.default(node, required.contains(&key.as_str()))?
            );
            for rule in self.rules(node)? {
                let _ = writeln!(out, "- {rule}");
            }
            let resolved = self.resolve(node)?;
            if let Some(values) = resolved.get("enum").and_then(Value::as_array) {
                let described = resolved
                    .get("markdownEnumDescriptions")
                    .and_then(Value::as_array);
                out.push_str("- allowed values:\n");
                for (i, value) in values.iter().enumerate() {
                    match described.and_then(|d| d.get(i)).and_then(Value::as_str) {
                        Some(d) => {
                            let _ = writeln!(out, "  - `{}`: {}", toml(value), d);
                        }
                        None => {
                            let _ = writeln!(out, "  - `{}`", toml(value));
                        }
                    }
                }
            }
            match self.example_line(key, node)? {
                Some(line) => {
                    let _ = writeln!(out, "- example: `{line}`");
                }
                None => {
                    let _ = writeln!(out, "- example: see below");
                }
            }
            out.push('\n');
        }
        Ok(())
    }

    /// `key = value` for a key whose example fits on one line; `None` for the plan's tables
    /// (`source`, `stages`, ...), which have their own sections with examples.
    fn example_line(&self, key: &str, node: &Value) -> Result<Option<String>, String> {
        let resolved = self.resolve(node)?;
        let is_section = node.get("$ref").is_some() && resolved.get("properties").is_some()
            || resolved
                .get("items")
                .is_some_and(|i| i.get("$ref").is_some())
            || resolved
                .get("additionalProperties")
                .is_some_and(|i| i.get("$ref").is_some());
        if is_section {
            return Ok(None);
        }
        Ok(Some(format!("{key} = {}", toml(&self.example(key, node)?))))
    }

    /// The type of a key, in words, with links to the value types.
    fn type_name(&self, node: &Value) -> Result<String, String> {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            return Ok(match r {
                "#/$defs/duration" => "[duration](#duration) (string)".into(),
                "#/$defs/size" => "[size](#size) (string)".into(),
                "#/$defs/endpoint" => {
                    "table, see [`[source]` and `[target]`](#the-source-and-target-tables)".into()
                }
                "#/$defs/state" => "table, see [`[state]`](#the-state-table)".into(),
                other => return Err(format!("the reference does not know the type `{other}`")),
            });
        }
        let base = match node.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(ts)) => {
                let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
                names.join(" or ")
            }
            _ if node.get("const").is_some() => "string".into(),
            _ => return Err(format!("a key of the plan schema has no type: {node}")),
        };
        Ok(match base.as_str() {
            "array" => {
                let items = node.get("items").ok_or("an array without items")?;
                match items.get("$ref").and_then(Value::as_str) {
                    Some("#/$defs/database") => {
                        "array of tables, see [`[[databases]]`](#the-databases-tables)".into()
                    }
                    _ => format!("array of {}s", self.type_name(items)?),
                }
            }
            "object" => match node.get("additionalProperties") {
                Some(extra)
                    if extra.get("$ref").and_then(Value::as_str) == Some("#/$defs/stage") =>
                {
                    "table of stage tables, see [`[stages]`](#the-stages-tables)".into()
                }
                Some(extra) if extra.is_object() => {
                    format!("table of {} values", self.type_name(extra)?)
                }
                _ => "table".into(),
            },
            _ => base,
        })
    }

    /// The default in words: the `default` keyword, a `default: ...` paragraph of the description,
    /// **required**, or that the key may be left out.
    fn default(&self, node: &Value, required: bool) -> Result<String, String> {
        if required {
            return Ok("**required**".into());
        }
        if let Some(d) = node.get("default") {
            return Ok(format!("`{}`", toml(d)));
        }
        let (_, from_text) = split_default(&text(node), false);
        Ok(match from_text {
            Some(d) => d,
            None => "not set".into(),
        })
    }

    /// The constraints a value must meet, other than its type and the enum.
    fn rules(&self, node: &Value) -> Result<Vec<String>, String> {
        let node = self.resolve(node)?;
        let mut rules = Vec::new();
        if let Some(c) = node.get("const") {
            rules.push(format!("must be `{}`", toml(c)));
        }
        match (node.get("minimum"), node.get("maximum")) {
            (Some(lo), Some(hi)) => rules.push(format!("from {lo} to {hi}")),
            (Some(lo), None) => rules.push(format!("at least {lo}")),
            (None, Some(hi)) => rules.push(format!("at most {hi}")),
            (None, None) => {}
        }
        if node.get("minLength").and_then(Value::as_u64) == Some(1) {
            rules.push("not empty".into());
        }
        if let Some(n) = node.get("minItems").and_then(Value::as_u64) {
            rules.push(format!(
                "at least {n} item{}",
                if n == 1 { "" } else { "s" }
            ));
        }
        if node.get("minProperties").and_then(Value::as_u64) == Some(1) {
            rules.push("at least one".into());
        }
        if node.get("uniqueItems").and_then(Value::as_bool) == Some(true) {
            rules.push("no duplicates".into());
        }
        if let Some(p) = node.get("pattern").and_then(Value::as_str) {
            rules.push(format!("matches the regular expression `{p}`"));
        }
        if let Some(p) = node.pointer("/items/pattern").and_then(Value::as_str) {
            rules.push(format!("each item matches the regular expression `{p}`"));
        }
        if node.pointer("/items/minLength").and_then(Value::as_u64) == Some(1) {
            rules.push("items not empty".into());
        }
        if let Some(p) = node
            .pointer("/propertyNames/pattern")
            .and_then(Value::as_str)
        {
            rules.push(format!("ids match the regular expression `{p}`"));
        }
        Ok(rules)
    }

    /// The example value of a key: its `examples`, else one derived from its default or allowed
    /// values; an error when there is none, so that every key of the reference has one.
    fn example(&self, key: &str, node: &Value) -> Result<Value, String> {
        if let Some(e) = node
            .get("examples")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return Ok(e.clone());
        }
        let resolved = self.resolve(node)?;
        if let Some(c) = resolved.get("const") {
            return Ok(c.clone());
        }
        let default = node.get("default").or_else(|| resolved.get("default"));
        if let Some(values) = resolved.get("enum").and_then(Value::as_array) {
            return values
                .iter()
                .find(|v| Some(*v) != default)
                .or_else(|| values.first())
                .cloned()
                .ok_or_else(|| format!("`{key}` has an empty enum"));
        }
        if resolved.get("type").and_then(Value::as_str) == Some("boolean") {
            return Ok(Value::Bool(
                !default.and_then(Value::as_bool).unwrap_or(false),
            ));
        }
        if let Some(d) = default {
            return Ok(d.clone());
        }
        if let Some(e) = resolved
            .get("examples")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return Ok(e.clone());
        }
        Err(format!(
            "key `{key}` of the plan schema has no example: add `\"examples\": [...]` to it in schemas/plan.schema.json"
        ))
    }

    /// `[name]` and one line per key of a table-valued key (`source`, `state`, `[databases]`).
    fn table_toml(&self, name: &str, node: &Value) -> Result<String, String> {
        let mut out = format!("[{name}]\n");
        if let Some(Value::Object(example)) = node
            .get("examples")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            let def = self.resolve(node)?.as_object();
            let mut keys: Vec<&String> = def
                .map(ordered)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| example.contains_key(*k))
                .collect();
            keys.extend(
                example
                    .keys()
                    .filter(|k| !keys.contains(k))
                    .collect::<Vec<_>>(),
            );
            for key in keys {
                let _ = writeln!(out, "{} = {}", toml_key(key), toml(&example[key]));
            }
            return Ok(out);
        }
        let resolved = self.resolve(node)?;
        let object = resolved
            .as_object()
            .ok_or_else(|| format!("`{name}` is not an object"))?;
        for (key, value) in ordered(object) {
            let _ = writeln!(
                out,
                "{} = {}",
                toml_key(key),
                toml(&self.example(key, value)?)
            );
        }
        Ok(out)
    }

    /// A stage table of kind `kind` with id `id`: `kind`, `after` when given, then every option.
    fn stage_toml(&self, kind: &Kind<'_>, id: &str, after: Option<&str>) -> Result<String, String> {
        let mut out = format!(
            "[stages.{}]\nkind = {}\n",
            toml_key(id),
            toml(&kind.name.into())
        );
        if let Some(after) = after {
            let _ = writeln!(out, "after = [{}]", toml(&after.into()));
        }
        for (key, node) in ordered(kind.def) {
            if COMMON.contains(&key.as_str()) {
                continue;
            }
            let _ = writeln!(
                out,
                "{} = {}",
                toml_key(key),
                toml(&self.example(key, node)?)
            );
        }
        Ok(out)
    }

    fn example_plan(&self) -> Result<String, String> {
        let kinds = self.kinds()?;
        let root = self.root_map()?;
        let mut out = String::from("#:schema ../schemas/plan.schema.json\n");
        let mut tables = String::new();
        for (key, node) in ordered(root) {
            match key.as_str() {
                "vars" => {
                    tables.push('\n');
                    tables.push_str(&self.table_toml("vars", node)?);
                }
                "source" | "target" | "state" => {
                    tables.push('\n');
                    tables.push_str(&self.table_toml(key, node)?);
                }
                "databases" => {
                    tables.push('\n');
                    tables.push_str(&self.table_toml("[databases]", self.at("/$defs/database")?)?);
                }
                "stages" => {}
                _ => {
                    let _ = writeln!(
                        out,
                        "{} = {}",
                        toml_key(key),
                        toml(&self.example(key, node)?)
                    );
                }
            }
        }
        out.push_str(&tables);
        let common = self.common_keys(&kinds)?;
        let mut previous: Option<&str> = None;
        for kind in &kinds {
            out.push('\n');
            out.push_str(&self.stage_toml(kind, kind.name, previous)?);
            if previous.is_none() {
                for key in ["description", "retries"] {
                    let node = common
                        .get("properties")
                        .and_then(|p| p.get(key))
                        .ok_or_else(|| format!("no common key `{key}`"))?;
                    let _ = writeln!(out, "{key} = {}", toml(&self.example(key, node)?));
                }
            }
            previous = Some(kind.name);
        }
        Ok(out)
    }
}

/// An object's properties: the required ones in the order of `required`, then the others in
/// alphabetical order (serde_json's maps are sorted; the schema's own order is not kept).
fn ordered(object: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let Some(props) = object.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    let required: Vec<&str> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut keys: Vec<(&String, &Value)> = props.iter().collect();
    keys.sort_by_key(|(k, _)| {
        (
            required
                .iter()
                .position(|r| *r == k.as_str())
                .unwrap_or(usize::MAX),
            k.to_string(),
        )
    });
    keys
}

fn strings<'a>(value: Option<&'a Value>, what: &str) -> Result<Vec<&'a str>, String> {
    value
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .ok_or_else(|| format!("the plan schema's `{what}` is not an array of strings"))
}

/// The Markdown description of a node (else its plain description).
fn text(node: &Value) -> String {
    node.get("markdownDescription")
        .or_else(|| node.get("description"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Splits a `default: ...` paragraph off a description; with `has_enum`, also drops a paragraph
/// that only lists the allowed values (the reference lists them itself).
fn split_default(text: &str, has_enum: bool) -> (String, Option<String>) {
    let mut default = None;
    let mut kept = Vec::new();
    for paragraph in text.split("\n\n") {
        let p = paragraph.trim();
        if let Some(d) = p.strip_prefix("default: ") {
            default = Some(d.to_string());
        } else if has_enum && !p.is_empty() && p.lines().all(|l| l.starts_with("- `")) {
            continue;
        } else if !p.is_empty() {
            kept.push(p.to_string());
        }
    }
    (kept.join("\n\n"), default)
}

fn paragraphs(text: &str) -> String {
    text.trim().to_string()
}

/// Text safe inside a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// A key as TOML writes it: bare when it can be.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_string()
    } else {
        toml(&Value::String(key.to_string()))
    }
}

/// A JSON value as a TOML value (inline tables for objects). JSON string escapes are valid TOML
/// basic-string escapes.
fn toml(value: &Value) -> String {
    match value {
        Value::String(s) => serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\"")),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), toml(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        Value::Null => "\"\"".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_values() {
        assert_eq!(toml(&serde_json::json!("a\"b")), r#""a\"b""#);
        assert_eq!(toml(&serde_json::json!(["x", 1])), r#"["x", 1]"#);
        assert_eq!(
            toml(&serde_json::json!({"target_host": "h", "a b": true})),
            r#"{ "a b" = true, target_host = "h" }"#
        );
    }

    #[test]
    fn default_paragraph_is_split_off() {
        let (body, default) = split_default(
            "Does X.\n\n- `a`: one\n- `b`: two\n\ndefault: `\"a\"`",
            true,
        );
        assert_eq!(body, "Does X.");
        assert_eq!(default.as_deref(), Some("`\"a\"`"));
    }
}
