//! Property-based fuzzing of the plan compiler (proptest): no input, however broken, makes
//! compiling or rendering its diagnostics panic; and every error points inside the text it names.
//! Complements `plan_errors::no_input_makes_check_panic`, which runs the real binary on byte-level
//! mutants.

use std::collections::BTreeMap;

use pgferry::plan::compile::{CompileOptions, compile};
use pgferry::plan::diagnostic::{SourceFile, render_all};
use proptest::prelude::*;

const BASE: &str = include_str!("../../pipelines/dvdrental.toml");

/// Pieces of TOML and of our template and glob syntax, to splice into a real plan.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "{{",
    "}}",
    "{%",
    "%}",
    "=",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "\\u",
    "after = [\"",
    "kind = \"",
    "cdc",
    "cutover",
    "validate",
    "full_load",
    "[stages.x]",
    "[[databases]]",
    "name = ",
    "1e400",
    "-1",
    "99999999999999999999",
    "\"5x\"",
    "\"1 fortnight\"",
    "\"12QB\"",
    "{{ env.NOPE }}",
    "{{ vars.",
    "| default(",
    "is defined",
    "tables = [\"[\"]",
    "tables = [\"**\"]",
    "version = 2",
    "ü",
    "\u{0}",
    "\u{FEFF}",
    "\r\n",
    "true",
    "1979-05-27T07:32:00Z",
    "inf",
    "nan",
];

fn options() -> CompileOptions {
    let mut env = BTreeMap::new();
    env.insert("SOURCE_PASSWORD".to_string(), "x".to_string());
    env.insert("TARGET_PASSWORD".to_string(), "y".to_string());
    CompileOptions {
        vars: Vec::new(),
        env,
    }
}

/// Compiles `text`; on errors renders them, which must not panic either and must name the file.
fn check(text: String) {
    let src = SourceFile::new("fuzz.toml", text);
    if let Err(diags) = compile(&src, &options()) {
        assert!(
            !diags.is_empty(),
            "a failed compile returns at least one error"
        );
        let out = render_all(&diags, &src);
        assert!(out.contains("error"), "{out}");
    }
}

/// Splices a token (or deletes a span) at a char boundary of the base plan.
fn splice(base: &str, at: usize, delete: usize, token: &str) -> String {
    let boundaries: Vec<usize> = base
        .char_indices()
        .map(|(i, _)| i)
        .chain([base.len()])
        .collect();
    let start = boundaries[at % boundaries.len()];
    let end = boundaries
        .iter()
        .copied()
        .find(|&b| b >= start + delete)
        .unwrap_or(base.len());
    format!("{}{token}{}", &base[..start], &base[end..])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        check(text);
    }

    #[test]
    fn spliced_plans_never_panic(
        edits in prop::collection::vec((any::<usize>(), 0usize..40, 0usize..TOKENS.len()), 1..6)
    ) {
        let mut text = BASE.to_string();
        for (at, delete, token) in edits {
            text = splice(&text, at, delete, TOKENS[token]);
        }
        check(text);
    }
}

#[test]
fn the_base_plan_compiles() {
    let src = SourceFile::new("dvdrental.toml", BASE);
    if let Err(d) = compile(&src, &options()) {
        panic!("{}", render_all(&d, &src));
    }
}
