//! Keeps `schemas/plan.schema.json` in sync with the serde types of `src/plan/raw.rs`, and checks
//! that every plan shipped in `pipelines/` and `examples/` validates against it (and deserializes).
//!
//! Needs no database: it reads files of the repository and compiles the shipped plans (which renders
//! templates and checks the DAG but connects to nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::fs;
use std::path::{Path, PathBuf};

use pgferry::plan::diagnostic::{SourceFile, render_all};
use pgferry::plan::raw::{
    COMMON_STAGE_KEYS, RawDatabase, RawEndpoint, RawPlan, RawState, STAGE_KINDS, StageCommon,
    StageOptions,
};
use pgferry::plan::units::{ByteSize, Dur};
use pgferry::plan::{CompileOptions, Plan, compile};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

const SCHEMA_PATH: &str = "schemas/plan.schema.json";
const SCHEMA_DIRECTIVE: &str = "#:schema ../schemas/plan.schema.json";

/// Plans that must be present (more may be added; every `*.toml` there is checked).
const EXPECTED_PLANS: &[&str] = &[
    "pipelines/dvdrental.toml",
    "examples/selected-tables.toml",
    "examples/two-databases.toml",
    "examples/rehearsal.toml",
    "examples/offline.toml",
    "examples/preflight-only.toml",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn schema() -> Value {
    let path = root().join(SCHEMA_PATH);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{SCHEMA_PATH} is not valid JSON: {e}"))
}

/// The validator the way the program builds it: formats asserted, with its two custom formats
/// checked by the program's own parsers.
fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .with_format("duration", |s: &str| Dur::parse(s).is_ok())
        .with_format("size", |s: &str| ByteSize::parse(s).is_ok())
        .build(schema)
        .unwrap_or_else(|e| panic!("{SCHEMA_PATH} is not a valid JSON Schema: {e}"))
}

/// All validation errors of `instance`: where (a JSON pointer into the plan) and what.
fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<(String, String)> {
    validator
        .iter_errors(instance)
        .map(|e| (e.instance_path().as_str().to_string(), e.to_string()))
        .collect()
}

fn show(errors: &[(String, String)]) -> String {
    errors
        .iter()
        .map(|(at, what)| format!("  {at}: {what}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The schema node at a JSON pointer (`/$defs/stage`), or a panic naming it.
fn node<'a>(schema: &'a Value, pointer: &str) -> &'a Value {
    schema
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{SCHEMA_PATH} has nothing at `{pointer}`"))
}

fn object<'a>(value: &'a Value, what: &str) -> &'a Map<String, Value> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {value}"))
}

fn keys(map: &Map<String, Value>) -> BTreeSet<String> {
    map.keys().cloned().collect()
}

/// The keys of `properties` of the schema object at `pointer`.
fn property_keys(schema: &Value, pointer: &str) -> BTreeSet<String> {
    let pointer = format!("{pointer}/properties");
    keys(object(node(schema, &pointer), &pointer))
}

/// The keys a Rust value serializes to (every field serializes, `None` as `null`).
fn serialized_keys<T: Serialize>(value: &T, what: &str) -> BTreeSet<String> {
    let value = serde_json::to_value(value).unwrap();
    keys(object(&value, what))
}

fn string_set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The `required` list of the schema object at `pointer` (empty when absent).
fn required(schema: &Value, pointer: &str) -> BTreeSet<String> {
    match node(schema, pointer).get("required") {
        None => BTreeSet::new(),
        Some(list) => list
            .as_array()
            .unwrap_or_else(|| panic!("`{pointer}/required` is not an array"))
            .iter()
            .map(|k| k.as_str().expect("`required` holds strings").to_string())
            .collect(),
    }
}

#[track_caller]
fn assert_same_keys(what: &str, in_schema: &BTreeSet<String>, in_rust: &BTreeSet<String>) {
    let schema_only: Vec<_> = in_schema.difference(in_rust).collect();
    let rust_only: Vec<_> = in_rust.difference(in_schema).collect();
    assert!(
        schema_only.is_empty() && rust_only.is_empty(),
        "{what}: {SCHEMA_PATH} and src/plan/raw.rs disagree\n  only in the schema: {schema_only:?}\n  only in Rust: {rust_only:?}"
    );
}

/// The keys serde cannot do without: removing any of them from a serialized default fails
/// deserialization.
fn required_by_serde<T: Default + Serialize + DeserializeOwned + Debug>(
    what: &str,
) -> BTreeSet<String> {
    let full = serde_json::to_value(T::default()).unwrap();
    serde_json::from_value::<T>(full.clone())
        .unwrap_or_else(|e| panic!("{what}: its serialized default does not deserialize: {e}"));
    let full = object(&full, what);
    full.keys()
        .filter(|key| {
            let mut without = full.clone();
            without.remove(*key);
            serde_json::from_value::<T>(Value::Object(without)).is_err()
        })
        .cloned()
        .collect()
}

/// Whether serde rejects a key it does not know (`deny_unknown_fields`).
fn denies_unknown_fields<T: Default + Serialize + DeserializeOwned + Debug>() -> bool {
    let mut value = serde_json::to_value(T::default()).unwrap();
    value
        .as_object_mut()
        .unwrap()
        .insert("no_such_key".into(), json!(1));
    serde_json::from_value::<T>(value).is_err()
}

/// Checks one struct against the schema object at `pointer`: same properties, same required keys,
/// and `additionalProperties: false` exactly when serde denies unknown fields.
fn check_struct<T: Default + Serialize + DeserializeOwned + Debug>(
    schema: &Value,
    pointer: &str,
    rust_name: &str,
) {
    assert_same_keys(
        &format!("properties of `{pointer}` vs {rust_name}"),
        &property_keys(schema, pointer),
        &serialized_keys(&T::default(), rust_name),
    );
    assert_same_keys(
        &format!("`required` of `{pointer}` vs the fields {rust_name} cannot do without"),
        &required(schema, pointer),
        &required_by_serde::<T>(rust_name),
    );
    let closed = node(schema, pointer).get("additionalProperties") == Some(&json!(false));
    assert_eq!(
        closed,
        denies_unknown_fields::<T>(),
        "`{pointer}` has additionalProperties: false exactly when {rust_name} has deny_unknown_fields"
    );
}

fn stage_def(kind: &str) -> String {
    format!("/$defs/{kind}_stage")
}

#[test]
fn stage_kinds_match_raw_rs() {
    let schema = schema();
    let enum_values: Vec<&str> = node(&schema, "/$defs/stage/properties/kind/enum")
        .as_array()
        .expect("the kind enum is an array")
        .iter()
        .map(|v| v.as_str().expect("kinds are strings"))
        .collect();
    assert_eq!(
        enum_values, STAGE_KINDS,
        "`$defs/stage` kind enum must list STAGE_KINDS, in the same order"
    );
    assert_eq!(
        required(&schema, "/$defs/stage"),
        string_set(&["kind"]),
        "a stage requires `kind`"
    );

    // One if/then per kind, in the same order, each dispatching to that kind's definition.
    let all_of = node(&schema, "/$defs/stage/allOf")
        .as_array()
        .expect("`$defs/stage/allOf` is an array");
    let expected: Vec<Value> = STAGE_KINDS
        .iter()
        .map(|kind| {
            json!({
                "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                "then": {"$ref": format!("#{}", stage_def(kind))},
            })
        })
        .collect();
    assert_eq!(
        all_of, &expected,
        "`$defs/stage/allOf` must hold one if/then per kind"
    );

    // No stale per-kind definitions.
    let defs: BTreeSet<String> = keys(object(node(&schema, "/$defs"), "$defs"))
        .into_iter()
        .filter(|name| name.ends_with("_stage"))
        .collect();
    let expected: BTreeSet<String> = STAGE_KINDS.iter().map(|k| format!("{k}_stage")).collect();
    assert_same_keys("`$defs/*_stage` vs STAGE_KINDS", &defs, &expected);

    for kind in STAGE_KINDS {
        let options = StageOptions::default_for(kind)
            .unwrap_or_else(|| panic!("StageOptions::default_for({kind:?}) is None"));
        assert_eq!(options.kind().as_str(), *kind);
        assert_eq!(
            node(
                &schema,
                &format!("{}/properties/kind/const", stage_def(kind))
            ),
            &json!(kind),
            "`{}` must pin `kind` to {kind:?}",
            stage_def(kind)
        );
    }
}

#[test]
fn stage_properties_match_options() {
    let schema = schema();
    let common = string_set(COMMON_STAGE_KEYS);
    assert_same_keys(
        "COMMON_STAGE_KEYS vs the fields of StageCommon",
        &common,
        &serialized_keys(&StageCommon::default(), "StageCommon"),
    );

    let first_common = stage_def(STAGE_KINDS[0]);
    for kind in STAGE_KINDS {
        let pointer = stage_def(kind);
        let options = StageOptions::default_for(kind).unwrap();
        let option_keys = serialized_keys(&options, kind);
        let shadowed: Vec<_> = option_keys.intersection(&common).collect();
        assert!(
            shadowed.is_empty(),
            "{kind} options reuse common stage keys: {shadowed:?}"
        );
        let rust: BTreeSet<String> = common.union(&option_keys).cloned().collect();
        assert_same_keys(
            &format!("properties of `{pointer}` vs COMMON_STAGE_KEYS + {kind} options"),
            &property_keys(&schema, &pointer),
            &rust,
        );

        // Unknown keys: rejected by serde, so the schema must reject them too (and say so first).
        assert!(
            StageOptions::from_json(kind, json!({"no_such_key": 1})).is_err(),
            "{kind} options accept unknown keys"
        );
        assert_eq!(
            node(&schema, &pointer).get("additionalProperties"),
            Some(&json!(false)),
            "`{pointer}` must have additionalProperties: false"
        );
        assert_eq!(node(&schema, &pointer).get("type"), Some(&json!("object")));
        assert!(
            required(&schema, &pointer).contains("kind"),
            "`{pointer}` must require `kind`"
        );

        // The common keys are described identically for every kind (except `kind` itself).
        for key in COMMON_STAGE_KEYS.iter().filter(|k| **k != "kind") {
            assert_eq!(
                node(&schema, &format!("{pointer}/properties/{key}")),
                node(&schema, &format!("{first_common}/properties/{key}")),
                "common key `{key}` is described differently for {kind}"
            );
        }
    }
}

/// A value the property's schema accepts: its default, else its first enum value, else one per type.
fn sample(property: &Value) -> Value {
    if let Some(default) = property.get("default") {
        return default.clone();
    }
    if let Some(first) = property
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    if let Some(constant) = property.get("const") {
        return constant.clone();
    }
    match property.get("$ref").and_then(Value::as_str) {
        Some("#/$defs/duration") => return json!("1m 30s"),
        Some("#/$defs/size") => return json!("256MB"),
        Some(other) => panic!("no sample for a property referring to {other}"),
        None => {}
    }
    match property.get("type").and_then(Value::as_str) {
        Some("string") => json!("SELECT 1"),
        Some("integer") => json!(property.get("minimum").and_then(Value::as_i64).unwrap_or(1)),
        Some("boolean") => json!(true),
        Some("array") => json!(["preflight"]),
        other => panic!("no sample for a property of type {other:?}: {property}"),
    }
}

/// A small valid plan to put stages into.
fn minimal_plan(stages: Value) -> Value {
    json!({
        "version": 1,
        "name": "sync_test",
        "source": {"url": "postgres://postgres@source:5432/app"},
        "target": {"url": "postgres://postgres@target:5432/app"},
        "databases": [{"name": "app"}],
        "stages": stages,
    })
}

/// Every key of every kind, at its default (or a sample value): the schema accepts it, and so does
/// serde, and so do every enum value and every default on its own. Keeps the types in sync, not only
/// the names.
#[test]
fn stage_defaults_and_enum_values_deserialize() {
    let schema = schema();
    let validator = validator(&schema);
    let mut stages = Map::new();
    for kind in STAGE_KINDS {
        let pointer = stage_def(kind);
        let properties = object(node(&schema, &format!("{pointer}/properties")), &pointer);
        let mut stage = Map::new();
        for (key, property) in properties {
            let value = if key == "after" {
                json!([])
            } else {
                sample(property)
            };
            stage.insert(key.clone(), value);
        }
        let common: Map<String, Value> = stage
            .iter()
            .filter(|(k, _)| COMMON_STAGE_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let options: Map<String, Value> = stage
            .iter()
            .filter(|(k, _)| !COMMON_STAGE_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        serde_json::from_value::<StageCommon>(Value::Object(common))
            .unwrap_or_else(|e| panic!("{kind}: sample common keys do not deserialize: {e}"));
        StageOptions::from_json(kind, Value::Object(options.clone()))
            .unwrap_or_else(|e| panic!("{kind}: every option at its default/sample: {e}"));

        for (key, property) in &options {
            let property_schema = &properties[key.as_str()];
            let mut values: Vec<Value> = property_schema
                .get("enum")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            values.extend(property_schema.get("default").cloned());
            values.push(property.clone());
            for value in values {
                StageOptions::from_json(kind, json!({ key: value })).unwrap_or_else(|e| {
                    panic!("{kind}.{key} = {value}: the schema allows it, serde does not: {e}")
                });
            }
        }
        stages.insert(format!("{kind}_stage"), Value::Object(stage));
    }
    let plan = minimal_plan(Value::Object(stages));
    let errs = errors(&validator, &plan);
    assert!(
        errs.is_empty(),
        "a plan with every stage key at its default/sample value is rejected:\n{}",
        show(&errs)
    );
}

#[test]
fn plan_properties_match_raw_rs() {
    let schema = schema();
    check_struct::<RawPlan>(&schema, "", "RawPlan");
    check_struct::<RawEndpoint>(&schema, "/$defs/endpoint", "RawEndpoint");
    check_struct::<RawState>(&schema, "/$defs/state", "RawState");
    check_struct::<RawDatabase>(&schema, "/$defs/database", "RawDatabase");

    // The nested structs are wired to their definitions.
    for (pointer, target) in [
        ("/properties/source/$ref", "#/$defs/endpoint"),
        ("/properties/target/$ref", "#/$defs/endpoint"),
        ("/properties/state/$ref", "#/$defs/state"),
        ("/properties/databases/items/$ref", "#/$defs/database"),
        (
            "/properties/stages/additionalProperties/$ref",
            "#/$defs/stage",
        ),
    ] {
        assert_eq!(node(&schema, pointer), &json!(target), "`{pointer}`");
    }

    // A plan using every top-level key validates and deserializes.
    let full = json!({
        "version": 1,
        "name": "full_plan",
        "description": "every key",
        "vars": {"host": "db.internal", "port": 5432, "ratio": 0.5, "dry": false},
        "source": {"url": "postgres://postgres@source:5432/app", "password": "s3cret"},
        "target": {"url": "postgres://postgres@target:5432/app", "password": "s3cret"},
        "state": {"url": "postgres://postgres@state:5432/ops", "password": "s3cret", "schema": "pgferry_state"},
        "databases": [{"name": "app", "target": "app2", "tables": ["public.*"], "exclude": ["public.tmp_*"]}],
        "stages": {"check": {"kind": "preflight"}},
    });
    assert_same_keys(
        "the full sample plan (update it) vs the schema",
        &property_keys(&schema, ""),
        &keys(full.as_object().unwrap()),
    );
    for (pointer, sample) in [
        ("/$defs/endpoint", &full["source"]),
        ("/$defs/state", &full["state"]),
        ("/$defs/database", &full["databases"][0]),
    ] {
        assert_same_keys(
            &format!("the full sample plan (update it) vs `{pointer}`"),
            &property_keys(&schema, pointer),
            &keys(sample.as_object().unwrap()),
        );
    }
    let errs = errors(&validator(&schema), &full);
    assert!(errs.is_empty(), "{}", show(&errs));
    serde_json::from_value::<RawPlan>(full).expect("the full sample plan deserializes");
}

/// Names of the stage properties that hold a duration or a size: a template there is replaced by a
/// value of the right format.
fn formatted_keys(schema: &Value) -> BTreeMap<String, &'static str> {
    let mut out = BTreeMap::new();
    for kind in STAGE_KINDS {
        let pointer = format!("{}/properties", stage_def(kind));
        for (key, property) in object(node(schema, &pointer), &pointer) {
            match property.get("$ref").and_then(Value::as_str) {
                Some("#/$defs/duration") => out.insert(key.clone(), "1s"),
                Some("#/$defs/size") => out.insert(key.clone(), "1GB"),
                _ => None,
            };
        }
    }
    out
}

/// Stands in for template rendering: every string holding `{{` becomes a plausible value.
fn replace_templates(value: &mut Value, key: Option<&str>, formatted: &BTreeMap<String, &str>) {
    match value {
        Value::String(s) if s.contains("{{") => {
            let placeholder = key.and_then(|k| formatted.get(k)).copied();
            *s = placeholder.unwrap_or("placeholder").to_string();
        }
        Value::Array(items) => {
            for item in items {
                replace_templates(item, key, formatted);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                replace_templates(v, Some(k), formatted);
            }
        }
        _ => {}
    }
}

fn plan_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["pipelines", "examples"] {
        let dir = root().join(dir);
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                files.push(path);
            }
        }
    }
    files.sort();
    for expected in EXPECTED_PLANS {
        assert!(
            files.contains(&root().join(expected)),
            "{expected} is missing"
        );
    }
    files
}

/// A plan file as the schema sees it: TOML turned into JSON, templates replaced.
fn load_plan(path: &Path, formatted: &BTreeMap<String, &str>) -> Value {
    let text = fs::read_to_string(path).unwrap();
    let toml: toml::Value = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()));
    let mut value = serde_json::to_value(toml).unwrap();
    replace_templates(&mut value, None, formatted);
    value
}

/// Checks that `after` names existing stages and that the stages form a DAG.
fn check_dag(name: &str, stages: &Map<String, Value>) {
    let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (id, stage) in stages {
        let after = stage.get("after").and_then(Value::as_array);
        for dep in after.into_iter().flatten() {
            let dep = dep.as_str().unwrap();
            assert!(
                stages.contains_key(dep),
                "{name}: stage `{id}` runs after `{dep}`, which does not exist"
            );
            edges.entry(id.as_str()).or_default().push(dep);
        }
    }
    // Depth-first search; 1 = on the current path, 2 = done.
    fn visit<'a>(
        id: &'a str,
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        name: &str,
    ) {
        match state.get(id) {
            Some(2) => return,
            Some(1) => panic!("{name}: the stages form a cycle through `{id}`"),
            _ => {}
        }
        state.insert(id, 1);
        for dep in edges.get(id).into_iter().flatten() {
            visit(dep, edges, state, name);
        }
        state.insert(id, 2);
    }
    let mut state = BTreeMap::new();
    for id in stages.keys() {
        visit(id, &edges, &mut state, name);
    }
}

#[test]
fn shipped_plans_validate_and_deserialize() {
    let schema = schema();
    let validator = validator(&schema);
    let formatted = formatted_keys(&schema);
    assert!(
        formatted.contains_key("max_lag") && formatted.contains_key("split_tables_larger_than"),
        "durations and sizes refer to `$defs/duration` and `$defs/size`"
    );

    for path in plan_files() {
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next(),
            Some(SCHEMA_DIRECTIVE),
            "{name}: the first line must be `{SCHEMA_DIRECTIVE}` (editors find the schema through it)"
        );

        let plan = load_plan(&path, &formatted);
        let errs = errors(&validator, &plan);
        assert!(
            errs.is_empty(),
            "{name} does not validate against {SCHEMA_PATH}:\n{}",
            show(&errs)
        );
        serde_json::from_value::<RawPlan>(plan.clone())
            .unwrap_or_else(|e| panic!("{name} does not deserialize into RawPlan: {e}"));

        let stages = object(&plan["stages"], "stages");
        for (id, stage) in stages {
            let mut options = object(stage, id).clone();
            let mut common = Map::new();
            for key in COMMON_STAGE_KEYS {
                if let Some(v) = options.remove(*key) {
                    common.insert(key.to_string(), v);
                }
            }
            let common: StageCommon = serde_json::from_value(Value::Object(common))
                .unwrap_or_else(|e| panic!("{name}: stage `{id}`: {e}"));
            StageOptions::from_json(&common.kind, Value::Object(options))
                .unwrap_or_else(|e| panic!("{name}: stage `{id}`: {e}"));
        }
        check_dag(&name, stages);

        // Passwords come from the environment, never from the file (checked before rendering).
        let raw: toml::Value = toml::from_str(&text).unwrap();
        for section in ["source", "target", "state"] {
            if let Some(password) = raw.get(section).and_then(|s| s.get("password")) {
                let password = password.as_str().unwrap_or_default();
                assert!(
                    password.contains("{{") && password.contains("env."),
                    "{name}: {section}.password must come from the environment ({{{{ env.NAME }}}}), not be written in the plan"
                );
            }
        }
    }
}

/// The environment variables a plan refers to (`{{ env.NAME }}`), each set to a dummy value.
fn env_for(text: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (i, _) in text.match_indices("env.") {
        let name: String = text[i + 4..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            env.insert(name, "not-a-real-password".to_string());
        }
    }
    env
}

/// Compiles a plan file the way `pgferry` does (templates rendered for real), with `--var`s.
fn compile_plan(path: &Path, vars: &[(&str, &str)]) -> Plan {
    let text = fs::read_to_string(path).unwrap();
    let src = SourceFile::new(path.display().to_string(), text.clone());
    let opts = CompileOptions {
        vars: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        env: env_for(&text),
    };
    compile(&src, &opts).unwrap_or_else(|diagnostics| {
        panic!(
            "{} does not compile:\n{}",
            path.display(),
            render_all(&diagnostics, &src)
        )
    })
}

/// The shipped plans compile for real: templates rendered with their real scopes (`database` only
/// in stages), schema checked per database, references and DAG resolved, options typed.
#[test]
fn shipped_plans_compile() {
    for path in plan_files() {
        let plan = compile_plan(&path, &[]);
        let text = fs::read_to_string(&path).unwrap();
        let raw: toml::Value = toml::from_str(&text).unwrap();
        let ids: BTreeSet<String> = raw["stages"].as_table().unwrap().keys().cloned().collect();
        let compiled: BTreeSet<String> = plan.stages.iter().map(|s| s.id.clone()).collect();
        assert_eq!(
            compiled,
            ids,
            "{}: stages lost in compilation",
            path.display()
        );
    }

    // The rehearsal is meant to be driven by `--var`.
    let plan = compile_plan(
        &root().join("examples/rehearsal.toml"),
        &[("suffix", "try2"), ("target_host", "rehearsal-2.internal")],
    );
    assert_eq!(plan.name, "dvdrental_try2");
    assert_eq!(plan.databases[0].target, "dvdrental_try2");
    assert!(plan.target.url.contains("rehearsal-2.internal"));
    let label = &plan.stages[plan
        .stage_index("label")
        .expect("rehearsal has a `label` stage")];
    match &label.options[0] {
        StageOptions::Sql(options) => assert_eq!(
            options.sql,
            "COMMENT ON DATABASE dvdrental_try2 IS 'pgferry rehearsal try2 of dvdrental'"
        ),
        other => panic!("`label` should be a sql stage, is {}", other.kind()),
    }
}

/// The dvdrental pipeline, templates replaced.
fn dvdrental(schema: &Value) -> Value {
    load_plan(
        &root().join("pipelines/dvdrental.toml"),
        &formatted_keys(schema),
    )
}

/// The id of the plan's first stage of `kind`.
fn stage_id(plan: &Value, kind: &str) -> String {
    object(&plan["stages"], "stages")
        .iter()
        .find(|(_, stage)| stage["kind"] == json!(kind))
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| panic!("pipelines/dvdrental.toml has no {kind} stage"))
}

#[test]
fn schema_rejects_broken_plans() {
    let schema = schema();
    let validator = validator(&schema);
    let base = dvdrental(&schema);
    assert!(
        errors(&validator, &base).is_empty(),
        "the base plan must be valid"
    );
    let load = stage_id(&base, "full_load");
    let cutover = stage_id(&base, "cutover");

    let broken: Vec<(&str, String, Value)> = vec![
        (
            "an unknown key in a full_load stage",
            format!("/stages/{load}"),
            json!({"stages": {&load: {"parallelism": 4}}}),
        ),
        (
            "an unknown stage kind",
            format!("/stages/{load}"),
            json!({"stages": {&load: {"kind": "full_lod"}}}),
        ),
        (
            "a key of another kind (jobs in cutover)",
            format!("/stages/{cutover}"),
            json!({"stages": {&cutover: {"jobs": 4}}}),
        ),
        (
            "a duration humantime cannot parse",
            format!("/stages/{cutover}/max_lag"),
            json!({"stages": {&cutover: {"max_lag": "1 sex"}}}),
        ),
        (
            "a size with an unknown unit",
            format!("/stages/{load}/split_tables_larger_than"),
            json!({"stages": {&load: {"split_tables_larger_than": "1 parsec"}}}),
        ),
        (
            "an approval that is neither manual nor auto",
            format!("/stages/{cutover}/approval"),
            json!({"stages": {&cutover: {"approval": "maybe"}}}),
        ),
        (
            "jobs = 0",
            format!("/stages/{load}/jobs"),
            json!({"stages": {&load: {"jobs": 0}}}),
        ),
        (
            "a stage id with a space",
            "/stages".to_string(),
            json!({"stages": {"bad id": {"kind": "preflight"}}}),
        ),
        (
            "a plan name with a control character",
            "/name".to_string(),
            json!({"name": "DVD\nRental"}),
        ),
        (
            "a plan name ending in a space",
            "/name".to_string(),
            json!({"name": "DVD Rental "}),
        ),
        (
            "an empty plan name",
            "/name".to_string(),
            json!({"name": ""}),
        ),
        (
            "a plan name of 101 characters",
            "/name".to_string(),
            json!({"name": "x".repeat(101)}),
        ),
        (
            "an unknown top-level key",
            String::new(),
            json!({"sources": {"url": "postgres://x"}}),
        ),
        ("version 2", "/version".to_string(), json!({"version": 2})),
        (
            "no databases",
            "/databases".to_string(),
            json!({"databases": []}),
        ),
    ];
    // Any name a person would type is a plan name.
    for name in ["dvd-rental", "Prod Move 2026", "déménagement", "x"] {
        let mut plan = base.clone();
        merge(&mut plan, json!({ "name": name }));
        let errs = errors(&validator, &plan);
        assert!(errs.is_empty(), "name {name:?}: {}", show(&errs));
    }
    for (what, location, patch) in broken {
        let mut plan = base.clone();
        merge(&mut plan, patch);
        let errs = errors(&validator, &plan);
        assert!(!errs.is_empty(), "{what}: the schema accepts it");
        let nested = format!("{location}/");
        assert!(
            errs.iter()
                .any(|(at, _)| *at == location || at.starts_with(&nested)),
            "{what}: expected an error at `{location}`, got:\n{}",
            show(&errs)
        );
    }

    // The sql stage's `on` and `sql` are required by the schema (serde alone would default them).
    // (The pipeline has no sql stage of its own: the cutover gathers the statistics.)
    let mut with_sql = base.clone();
    merge(
        &mut with_sql,
        json!({"stages": {"notes": {"kind": "sql", "on": "target", "after": [&load], "sql": "SELECT 1"}}}),
    );
    assert!(
        errors(&validator, &with_sql).is_empty(),
        "a complete sql stage is valid:\n{}",
        show(&errors(&validator, &with_sql))
    );
    for key in ["on", "sql"] {
        let mut plan = with_sql.clone();
        plan["stages"]["notes"].as_object_mut().unwrap().remove(key);
        assert!(
            !errors(&validator, &plan).is_empty(),
            "a sql stage without `{key}` is accepted"
        );
    }

    // Serde agrees on the unknown key and the unknown kind.
    assert!(StageOptions::from_json("full_load", json!({"parallelism": 4})).is_err());
    assert!(StageOptions::from_json("full_lod", json!({})).is_err());
}

/// Merges `patch` into `value`, object by object (a JSON merge patch without deletions).
fn merge(value: &mut Value, patch: Value) {
    match (value, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, patch) in patch {
                merge(target.entry(key).or_insert(Value::Null), patch);
            }
        }
        (slot, patch) => *slot = patch,
    }
}

/// The defaults of the JSON Schema (and so of `docs/plan-reference.md`, generated from it) are
/// the code's: every `default` of a definition equals the typed default in `plan::raw::defaults`,
/// and every typed default is documented.
#[test]
fn schema_defaults_are_the_codes() {
    use pgferry::plan::raw::{DefaultValue, defaults_of};
    let schema = schema();
    let defs = object(&schema["$defs"], "$defs");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (name, def) in defs {
        let Some(props) = def.get("properties").and_then(Value::as_object) else {
            continue;
        };
        let code: BTreeMap<&str, DefaultValue> = defaults_of(name).into_iter().collect();
        for (key, prop) in props {
            let documented = prop.get("default");
            match (documented, code.get(key.as_str())) {
                (None, None) => {}
                (Some(d), None) => wrong.push(format!(
                    "{name}.{key}: the schema documents default {d}, the code has none"
                )),
                (None, Some(c)) => wrong.push(format!(
                    "{name}.{key}: the code defaults to {c:?}, the schema documents no default"
                )),
                (Some(d), Some(c)) => {
                    checked += 1;
                    // The words say the same as the keyword (editors show the descriptions).
                    for (field, said) in [
                        ("description", format!("default: {d}")),
                        ("markdownDescription", format!("default: `{d}`")),
                    ] {
                        let text = prop.get(field).and_then(Value::as_str).unwrap_or("");
                        if !text.contains(&said) {
                            wrong.push(format!("{name}.{key}: its {field} does not say `{said}`"));
                        }
                    }
                    let same = match (c, d) {
                        (DefaultValue::Bool(b), Value::Bool(x)) => b == x,
                        (DefaultValue::Integer(n), Value::Number(x)) => x.as_u64() == Some(*n),
                        (DefaultValue::Str(s), Value::String(x)) => s == x,
                        (DefaultValue::Duration(t), Value::String(x)) => {
                            Dur::parse(x).is_ok_and(|p| p.0 == *t)
                        }
                        (DefaultValue::Size(b), Value::String(x)) => {
                            ByteSize::parse(x).is_ok_and(|p| p.0 == *b)
                        }
                        _ => false,
                    };
                    if !same {
                        wrong.push(format!(
                            "{name}.{key}: the schema documents default {d}, the code uses {c:?}"
                        ));
                    }
                }
            }
        }
        for key in code.keys() {
            if !props.contains_key(*key) {
                wrong.push(format!(
                    "{name}.{key}: a code default for a key the schema lacks"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "defaults differ:\n  {}",
        wrong.join("\n  ")
    );
    assert!(checked >= 30, "only {checked} defaults compared");
    // The plain booleans default through serde to `false`: the same as the typed defaults.
    use pgferry::plan::raw::defaults as d;
    assert_eq!(
        pgferry::plan::raw::PreflightOptions::default().fail_on_warning,
        d::PREFLIGHT_FAIL_ON_WARNING
    );
    assert_eq!(
        pgferry::plan::raw::SchemaDumpOptions::default().no_owner,
        d::SCHEMA_DUMP_NO_OWNER
    );
    assert_eq!(
        pgferry::plan::raw::SchemaDumpOptions::default().no_privileges,
        d::SCHEMA_DUMP_NO_PRIVILEGES
    );
}
