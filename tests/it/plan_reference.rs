//! `docs/plan-reference.md` is generated from `schemas/plan.schema.json`: this test regenerates it
//! with the real binary (`pgferry schema --markdown`) and fails when the committed file differs,
//! printing the command that regenerates it. It also compiles the reference's plan with every key,
//! so no example in the reference is a value the plan compiler would refuse.
//!
//! Needs no database.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use pgferry::plan::diagnostic::{SourceFile, render_all};
use pgferry::plan::reference::{PATH, REGENERATE, example_plan, markdown};
use pgferry::plan::{CompileOptions, StageOptions, compile};

fn committed() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nGenerate it with:\n    {REGENERATE}",
            path.display()
        )
    })
}

#[test]
fn committed_reference_is_up_to_date() {
    let output = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["schema", "--markdown"])
        .output()
        .expect("run pgferry schema --markdown");
    assert!(
        output.status.success(),
        "pgferry schema --markdown failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let generated = String::from_utf8(output.stdout).expect("the reference is UTF-8");
    assert_eq!(
        generated,
        markdown().expect("the library generates the reference"),
        "the command and the library disagree"
    );
    let committed = committed();
    if generated != committed {
        let first = generated
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| generated.lines().count().min(committed.lines().count()));
        panic!(
            "{PATH} is out of date with schemas/plan.schema.json (first difference at line {}:\n  generated: {:?}\n  committed: {:?})\nRegenerate it with:\n    {REGENERATE}",
            first + 1,
            generated.lines().nth(first).unwrap_or("<end of file>"),
            committed.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

#[test]
fn reference_covers_every_stage_kind_and_option() {
    let reference = committed();
    let schema: serde_json::Value =
        serde_json::from_str(pgferry::plan::schema::SCHEMA_TEXT).expect("schema is JSON");
    let defs = schema["$defs"].as_object().expect("$defs");
    let kinds = schema["$defs"]["stage"]["properties"]["kind"]["enum"]
        .as_array()
        .expect("kind enum");
    assert_eq!(kinds.len(), 12, "a kind was added or removed: {kinds:?}");
    for kind in kinds {
        let kind = kind.as_str().expect("kind is a string");
        assert!(
            reference.contains(&format!("\n### `{kind}`\n")),
            "no section for stage kind `{kind}`"
        );
        assert!(
            reference.contains(&format!("[stages.{kind}]\nkind = \"{kind}\"\n")),
            "no example for stage kind `{kind}`"
        );
        let def = &defs[&format!("{kind}_stage")];
        for key in def["properties"].as_object().expect("properties").keys() {
            assert!(
                reference.contains(&format!("`{key}`")),
                "option `{key}` of stage kind `{kind}` is not in the reference"
            );
        }
    }
    // Defaults and allowed values come from the schema, not from prose.
    assert!(reference.contains("| `jobs` | integer | `4` |"));
    assert!(reference.contains("| `approval` | string | `\"manual\"` |"));
    assert!(reference.contains("  - `\"auto\"`: Proceed as soon as lag and quiet period allow."));
    assert!(reference.contains("- example: `split_tables_larger_than = \"512MB\"`"));
    assert!(reference.contains("| `sql` | string | **required** |"));
}

#[test]
fn plan_with_every_key_compiles() {
    let text = example_plan().expect("the reference builds its example plan");
    assert!(
        committed().contains(&text),
        "{PATH} does not contain the current example plan; regenerate it with:\n    {REGENERATE}"
    );
    let env: BTreeMap<String, String> = ["SOURCE_PASSWORD", "TARGET_PASSWORD", "STATE_PASSWORD"]
        .into_iter()
        .map(|k| (k.to_string(), "secret".to_string()))
        .collect();
    let src = SourceFile::new("plan-reference.toml", text.clone());
    let plan = match compile(
        &src,
        &CompileOptions {
            vars: Vec::new(),
            env,
        },
    ) {
        Ok(plan) => plan,
        Err(diags) => panic!(
            "the reference's plan with every key does not compile:\n{}\n{text}",
            render_all(&diags, &src)
        ),
    };
    assert_eq!(plan.stages.len(), 12);
    // The examples are not the defaults where that matters: the compiled plan carries them.
    let load = plan
        .stages
        .iter()
        .find(|s| s.id == "full_load")
        .expect("full_load stage");
    match &load.options[0] {
        StageOptions::FullLoad(o) => assert_eq!(o.jobs, Some(8)),
        other => panic!("full_load compiled to {other:?}"),
    }
    assert_eq!(plan.databases[0].target, "dvdrental_new");
}
