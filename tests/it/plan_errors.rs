//! The plan diagnostics, as a user sees them: the real `pgferry` binary run over a corpus of broken
//! plans, plus the shipped plans, `graph`, `init`, `--var`, stage arguments and bad usage.
//!
//! Every `tests/fixtures/plans/NAME.toml` is a broken plan, and `NAME.stderr` next to it is the exact
//! stderr of `pgferry check tests/fixtures/plans/NAME.toml` run from the crate root (exit code 2,
//! nothing on stdout). After an intended change to a message, rewrite the `.stderr` files with
//!
//! ```text
//! UPDATE_EXPECT=1 cargo test --test it -- plan_errors::
//! ```
//!
//! then read the diff (`git diff tests/fixtures/plans`) before committing it: every message must stay
//! right, point at the right place and carry a useful hint. A fixture marked `#[ignore]` holds the
//! output the message *should* have and currently does not (the reason names the bug); once fixed,
//! remove the `#[ignore]` and run `cargo test --test it -- plan_errors:: --include-ignored`.
//!
//! The binary runs with an empty environment (`PATH` only) plus exactly the variables each test
//! needs, so no result depends on the machine. Needs no database: nothing here connects anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pgferry");
const FIXTURES_DIR: &str = "tests/fixtures/plans";
/// The environment every fixture is checked with; `undefined_env.toml` relies on it.
const FIXTURE_ENV: &[(&str, &str)] = &[("PGFERRY_FIXTURE_PASSWORD", "fixture")];

/// What one run of the binary gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    stderr_bytes: Vec<u8>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `pgferry ARGS` from the crate root with only `PATH` and `env` in its environment.
fn pgferry(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(crate_root())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stderr_bytes: out.stderr,
    }
}

fn update_expect() -> bool {
    std::env::var_os("UPDATE_EXPECT").is_some_and(|v| v == "1")
}

/// Compares `actual` with the file at `path` (relative to the crate root), or rewrites the file when
/// `UPDATE_EXPECT=1`.
fn expect_file(path: &str, actual: &[u8]) {
    let full = crate_root().join(path);
    let expected = fs::read(&full).ok();
    if update_expect() {
        if expected.as_deref() != Some(actual) {
            fs::write(&full, actual).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
            eprintln!("updated {path}");
        }
        return;
    }
    let Some(expected) = expected else {
        panic!(
            "{path} is missing; create it with `UPDATE_EXPECT=1 cargo test --test it -- plan_errors::` and read it.\nactual:\n{}",
            String::from_utf8_lossy(actual)
        );
    };
    if expected != actual {
        let (e, a) = (
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(actual),
        );
        let first = e
            .lines()
            .zip(a.lines())
            .position(|(x, y)| x != y)
            .unwrap_or_else(|| e.lines().count().min(a.lines().count()));
        panic!(
            "{path} differs from the actual output, first at line {}\n\
             expected: {:?}\n  actual: {:?}\n\
             --- expected ---\n{e}--- actual ---\n{a}--- (UPDATE_EXPECT=1 rewrites the file)",
            first + 1,
            e.lines().nth(first).unwrap_or("<end>"),
            a.lines().nth(first).unwrap_or("<end>"),
        );
    }
}

/// `pgferry check` on one fixture: exit 2, nothing on stdout, stderr exactly as in its `.stderr`.
fn check_fixture(name: &str) {
    let plan = format!("{FIXTURES_DIR}/{name}.toml");
    assert!(crate_root().join(&plan).is_file(), "{plan} is missing");
    let run = pgferry(&["check", &plan], FIXTURE_ENV);
    assert_eq!(run.code, 2, "`pgferry check {plan}`: {run:?}");
    assert_eq!(run.stdout, "", "`pgferry check {plan}` printed on stdout");
    expect_file(&format!("{FIXTURES_DIR}/{name}.stderr"), &run.stderr_bytes);
}

/// One `#[test]` per fixture (so a failure names it), and the list of them all.
macro_rules! fixtures {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        const FIXTURES: &[&str] = &[$(stringify!($name)),*];
        mod fixture {
            $(
                #[test]
                $(#[$attr])*
                fn $name() {
                    super::check_fixture(stringify!($name));
                }
            )*
        }
    };
}

fixtures! {
    syntax_error,
    unknown_kind,
    unknown_after,
    cycle,
    self_dependency,
    duplicate_database,
    duplicate_target,
    bad_duration,
    bad_size,
    wrong_type,
    out_of_range,
    unknown_key,
    missing_required,
    undefined_env,
    undefined_var,
    database_outside_stage,
    empty_databases,
    no_stages,
    empty_stages,
    bad_name,
    bad_glob,
    bad_enum,
    bad_template_syntax,
    many_errors,
    bad_stage_id,
    bad_version,
    version_string,
    bad_vars_type,
    missing_top_level,
    empty_plan,
    database_var_without_databases,
    undefined_var_position,
    database_entry_templates,
    after_duplicates,
    template_guards,
    env_as_a_whole,
    float_for_integer,
    duplicate_key,
    integer_overflow,
    not_utf8,
}

#[test]
fn every_fixture_has_a_test_and_an_expected_stderr() {
    let dir = crate_root().join(FIXTURES_DIR);
    let mut plans = BTreeSet::new();
    let mut stderrs = BTreeSet::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => plans.insert(stem),
            Some("stderr") => stderrs.insert(stem),
            _ => panic!("unexpected file in {FIXTURES_DIR}: {}", path.display()),
        };
    }
    let listed: BTreeSet<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        plans, listed,
        "every {FIXTURES_DIR}/*.toml needs an entry in `fixtures!` and vice versa"
    );
    if !update_expect() {
        assert_eq!(
            plans, stderrs,
            "every fixture needs its .stderr (UPDATE_EXPECT=1 writes them)"
        );
    }
}

#[test]
fn many_errors_reports_every_error() {
    let run = pgferry(
        &["check", &format!("{FIXTURES_DIR}/many_errors.toml")],
        FIXTURE_ENV,
    );
    let messages: Vec<&str> = run
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("error: "))
        .collect();
    for expected in [
        "is not a migration name",
        "unknown key `pasword` in [source]",
        "undefined variable `vars.target_hots`",
        "`film` is not a table pattern",
        "database `app` is listed twice",
        "unknown stage kind `preflite`",
        "stages form a cycle",
        "`stages.load.jobs` must be an integer",
        "invalid size `1 parsec`",
        "unknown key `jbos`",
        "runs after `lod`, which is not a stage",
        "stage `cut` runs after itself",
        "invalid duration `5 sex`",
        "`stages.cut.approval` must be one of",
        "undefined variable `env.PGFERRY_FIXTURE_UNSET`",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "no error containing {expected:?}: {run:?}"
        );
    }
    assert!(messages.len() >= 15, "{run:?}");
    assert!(
        run.stderr
            .ends_with(&format!("{} errors in plan\n", messages.len())),
        "{run:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// The shipped plans.

/// `pipelines/*.toml` and `examples/*.toml`, relative to the crate root.
fn shipped_plans() -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["pipelines", "examples"] {
        for entry in fs::read_dir(crate_root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                out.push(format!(
                    "{dir}/{}",
                    path.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    assert!(out.contains(&"pipelines/dvdrental.toml".to_string()));
    assert!(out.iter().filter(|p| p.starts_with("examples/")).count() >= 5);
    out
}

fn parse_toml(path: &str) -> toml::Table {
    let text = fs::read_to_string(crate_root().join(path)).unwrap();
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The environment variables a plan's strings refer to (`env.NAME` in any string value; comments are
/// not looked at).
fn env_vars_of(path: &str) -> BTreeSet<String> {
    fn walk(v: &toml::Value, out: &mut BTreeSet<String>) {
        match v {
            toml::Value::String(s) => {
                let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
                for (i, _) in s.match_indices("env.") {
                    if s[..i].chars().next_back().is_some_and(ident) {
                        continue;
                    }
                    let name: String = s[i + 4..].chars().take_while(|&c| ident(c)).collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            toml::Value::Table(t) => t.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for v in parse_toml(path).values() {
        walk(v, &mut out);
    }
    out
}

/// Values for every variable a plan needs.
fn env_for(vars: &BTreeSet<String>) -> Vec<(&str, &str)> {
    vars.iter().map(|v| (v.as_str(), "secret")).collect()
}

#[test]
fn env_vars_are_found_in_dvdrental() {
    let expected: BTreeSet<String> = ["SOURCE_PASSWORD", "TARGET_PASSWORD"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(env_vars_of("pipelines/dvdrental.toml"), expected);
    assert!(env_vars_of("examples/rehearsal.toml").contains("REHEARSAL_PASSWORD"));
}

#[test]
fn shipped_plans_check_with_their_env_vars_set() {
    for plan in shipped_plans() {
        let vars = env_vars_of(&plan);
        let run = pgferry(&["check", &plan], &env_for(&vars));
        assert_eq!(
            run.code, 0,
            "`pgferry check {plan}` with {vars:?} set: {run:?}"
        );
        assert!(run.stdout.contains("is valid"), "{plan}: {run:?}");
        assert_eq!(run.stderr, "", "{plan}: {run:?}");
    }
}

#[test]
fn shipped_plans_name_a_missing_env_var() {
    for plan in shipped_plans() {
        let vars = env_vars_of(&plan);
        assert!(!vars.is_empty(), "{plan} reads no environment variable");
        for missing in &vars {
            let rest: BTreeSet<String> = vars.iter().filter(|v| *v != missing).cloned().collect();
            let run = pgferry(&["check", &plan], &env_for(&rest));
            assert_eq!(run.code, 2, "{plan} without {missing}: {run:?}");
            assert_eq!(run.stdout, "", "{plan} without {missing}: {run:?}");
            assert!(
                run.stderr
                    .contains(&format!("error: undefined variable `env.{missing}`")),
                "{plan} without {missing}: {run:?}"
            );
            assert!(
                run.stderr.contains(&format!(
                    "hint: set the environment variable `{missing}` before running pgferry"
                )),
                "{plan} without {missing}: {run:?}"
            );
            assert!(
                run.stderr.ends_with(&format!("{plan}: 1 error in plan\n")),
                "{plan} without {missing}: {run:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// graph

/// The `after` edges of a plan, as (the stage waited for, the stage that waits).
fn after_edges(path: &str) -> BTreeSet<(String, String)> {
    let plan = parse_toml(path);
    let stages = plan["stages"].as_table().expect("[stages]");
    let mut out = BTreeSet::new();
    for (id, stage) in stages {
        if let Some(after) = stage.get("after").and_then(toml::Value::as_array) {
            for dep in after {
                out.insert((dep.as_str().unwrap().to_string(), id.clone()));
            }
        }
    }
    out
}

/// The `after` edges whose waiting stage starts while the stage waited for still runs: a
/// post_data stage after a full_load (the executor's overlap contract).
fn overlap_edges(path: &str) -> BTreeSet<(String, String)> {
    let plan = parse_toml(path);
    let stages = plan["stages"].as_table().expect("[stages]");
    let kind = |id: &str| stages[id]["kind"].as_str().unwrap_or("").to_string();
    after_edges(path)
        .into_iter()
        .filter(|(dep, id)| kind(dep) == "full_load" && kind(id) == "post_data")
        .collect()
}

fn stage_ids(path: &str) -> BTreeSet<String> {
    parse_toml(path)["stages"]
        .as_table()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// Parses graph output into (node id -> stage id, edges between stage ids, the edges drawn as
/// overlaps: `-. overlaps .->` in Mermaid, `[style=dashed, label="overlaps"]` in DOT).
#[allow(clippy::type_complexity)]
fn parse_graph(
    out: &str,
    node_label: impl Fn(&str) -> Option<(String, String)>,
    arrow: &str,
) -> (
    BTreeMap<String, String>,
    BTreeSet<(String, String)>,
    BTreeSet<(String, String)>,
) {
    let mut nodes = BTreeMap::new();
    let mut edges = Vec::new();
    let mut overlapping = Vec::new();
    for line in out.lines() {
        let plain = line
            .replace(" -. overlaps .-> ", " --> ")
            .replace(" [style=dashed, label=\"overlaps\"]", "");
        if plain != line
            && let Some((a, b)) = plain.trim().trim_end_matches(';').split_once(arrow)
        {
            overlapping.push((a.trim().to_string(), b.trim().to_string()));
        }
        let line = plain.as_str();
        if let Some((node, stage)) = node_label(line) {
            assert!(
                nodes.insert(node.clone(), stage).is_none(),
                "node {node} twice"
            );
        } else if let Some((a, b)) = line.trim().trim_end_matches(';').split_once(arrow) {
            edges.push((a.trim().to_string(), b.trim().to_string()));
        }
    }
    let name = |n: &str| {
        nodes
            .get(n)
            .unwrap_or_else(|| panic!("edge to undeclared node {n} in:\n{out}"))
            .clone()
    };
    let mut set = BTreeSet::new();
    for (a, b) in &edges {
        assert!(
            set.insert((name(a), name(b))),
            "edge {a} {arrow} {b} twice in:\n{out}"
        );
    }
    let overlapping = overlapping
        .iter()
        .map(|(a, b)| (name(a), name(b)))
        .collect();
    (nodes, set, overlapping)
}

fn check_graph(format: &str) {
    for plan in shipped_plans() {
        let vars = env_vars_of(&plan);
        let run = pgferry(&["graph", &plan, "--format", format], &env_for(&vars));
        assert_eq!(run.code, 0, "graph {plan} --format {format}: {run:?}");
        let (nodes, edges, overlapping) = match format {
            "mermaid" => {
                assert!(run.stdout.starts_with("flowchart LR\n"), "{run:?}");
                // `  n3["load<br/>full_load"]`
                let label = |line: &str| {
                    let (node, rest) = line.trim().split_once("[\"")?;
                    let label = rest.strip_suffix("\"]")?;
                    let stage = label.split("<br/>").next()?;
                    Some((node.to_string(), stage.to_string()))
                };
                parse_graph(&run.stdout, label, "-->")
            }
            "dot" => {
                assert!(run.stdout.starts_with("digraph pgferry {\n"), "{run:?}");
                assert!(run.stdout.ends_with("}\n"), "{run:?}");
                // `  n3 [label="load\nfull_load", fillcolor="#ffffff"];`
                let label = |line: &str| {
                    let (node, rest) = line.trim().split_once(" [label=\"")?;
                    let label = &rest[..rest.find('"')?];
                    let stage = label.split("\\n").next()?;
                    Some((node.to_string(), stage.to_string()))
                };
                parse_graph(&run.stdout, label, "->")
            }
            _ => unreachable!(),
        };
        let labelled: BTreeSet<String> = nodes.values().cloned().collect();
        assert_eq!(labelled, stage_ids(&plan), "{plan}: nodes in {run:?}");
        assert_eq!(labelled.len(), nodes.len(), "{plan}: {run:?}");
        assert_eq!(
            edges,
            after_edges(&plan),
            "{plan} --format {format}: edges (waited for, waiting) in {run:?}"
        );
        assert_eq!(
            overlapping,
            overlap_edges(&plan),
            "{plan} --format {format}: edges drawn as overlaps in {run:?}"
        );
    }
}

#[test]
fn graph_mermaid_has_an_edge_per_after_entry() {
    check_graph("mermaid");
    let run = pgferry(
        &["graph", "pipelines/dvdrental.toml", "--format", "mermaid"],
        &[("SOURCE_PASSWORD", "x"), ("TARGET_PASSWORD", "y")],
    );
    assert!(run.stdout.contains("flowchart LR"), "{run:?}");
}

#[test]
fn graph_dot_has_an_edge_per_after_entry() {
    check_graph("dot");
}

#[test]
fn graph_of_a_broken_plan_reports_it() {
    let plan = format!("{FIXTURES_DIR}/cycle.toml");
    let run = pgferry(&["graph", &plan, "--format", "mermaid"], FIXTURE_ENV);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.contains("stages form a cycle"), "{run:?}");
}

// ---------------------------------------------------------------------------------------------------
// init

#[test]
fn init_writes_a_plan_that_checks_without_env_vars() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let p = path.to_str().unwrap();

    let run = pgferry(&["init", p], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(&format!("wrote {p}")), "{run:?}");
    let written = fs::read_to_string(&path).unwrap();
    assert!(written.contains("[stages."), "{written}");

    let run = pgferry(&["check", p], &[]);
    assert_eq!(run.code, 0, "check of the init plan: {run:?}");
    assert!(run.stdout.contains("is valid"), "{run:?}");
    assert_eq!(run.stderr, "", "{run:?}");

    // A second init refuses to overwrite, and leaves the file alone.
    fs::write(&path, "# edited\n").unwrap();
    let run = pgferry(&["init", p], &[]);
    assert_eq!(run.code, 2, "second init: {run:?}");
    assert!(run.stderr.contains("already exists"), "{run:?}");
    assert!(run.stderr.contains("--force"), "{run:?}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "# edited\n");

    let run = pgferry(&["init", p, "--force"], &[]);
    assert_eq!(run.code, 0, "init --force: {run:?}");
    assert_eq!(fs::read_to_string(&path).unwrap(), written);
}

// ---------------------------------------------------------------------------------------------------
// --var

/// A valid plan in a temp dir whose URLs point at 127.0.0.1 port 1 (nothing listens there).
fn temp_plan(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.toml");
    fs::write(&path, text).unwrap();
    (dir, path)
}

const VAR_PLAN: &str = r#"version = 1
name = "var_{{ vars.suffix }}"

[vars]
host = "127.0.0.1"
suffix = "a"

[source]
url = "postgres://u@{{ vars.host }}:1/src"

[target]
url = "postgres://u@{{ vars.host }}:{{ vars.missing }}/dst"

[[databases]]
name = "app"

[stages.preflight]
kind = "preflight"
"#;

#[test]
fn var_defines_a_missing_variable() {
    let (_dir, path) = temp_plan(VAR_PLAN);
    let p = path.to_str().unwrap();

    let run = pgferry(&["check", p], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("error: undefined variable `vars.missing`"),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains("hint: define `missing` under [vars], or pass `--var missing=VALUE`"),
        "{run:?}"
    );

    let run = pgferry(&["check", p, "--var", "missing=1"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("plan `var_a` is valid"), "{run:?}");
}

#[test]
fn var_overrides_vars_and_is_checked() {
    let (_dir, path) = temp_plan(VAR_PLAN);
    let p = path.to_str().unwrap();

    let run = pgferry(
        &["check", p, "--var", "missing=1", "--var", "suffix=b"],
        &[],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("plan `var_b` is valid"), "{run:?}");

    // The overridden value goes through the same checks as the plan's own.
    let run = pgferry(
        &["check", p, "--var", "missing=1", "--var", "suffix=B\n"],
        &[],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("is not a migration name") && run.stderr.contains("\"var_B\\n\""),
        "{run:?}"
    );

    // Not KEY=VALUE: a usage error from the command line parser.
    let run = pgferry(&["check", p, "--var", "missing"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("is not KEY=VALUE"), "{run:?}");
}

// ---------------------------------------------------------------------------------------------------
// Templates: what may name an unset variable, and what may not be used whole.

const GUARDED_PLAN: &str = r#"version = 1
name = "guarded"

[vars]
port = "{{ env.PGFERRY_TEST_PORT | default('1') }}"

[source]
url = "postgres://u@127.0.0.1:{{ vars.port }}/src{% if env.PGFERRY_TEST_SSLMODE is defined %}?sslmode={{ env.PGFERRY_TEST_SSLMODE }}{% endif %}"

[target]
url = "postgres://u@127.0.0.1:1/{{ env['PGFERRY_TEST_DB'] | d('dst') }}"

[[databases]]
name = "app"
target = "{{ database.name }}_copy"
exclude = ["{{ database.target }}.audit_*"]

[stages.preflight]
kind = "preflight"
"#;

#[test]
fn default_and_is_defined_may_name_an_unset_variable() {
    let (_dir, path) = temp_plan(GUARDED_PLAN);
    let p = path.to_str().unwrap();
    let set = [
        ("PGFERRY_TEST_PORT", "5432"),
        ("PGFERRY_TEST_SSLMODE", "require"),
        ("PGFERRY_TEST_DB", "x"),
    ];
    for env in [&[][..], &set[..]] {
        let run = pgferry(&["check", p], env);
        assert_eq!(run.code, 0, "with {env:?}: {run:?}");
        assert_eq!(run.stderr, "", "with {env:?}: {run:?}");
    }
}

#[test]
fn the_environment_is_never_pasted_whole() {
    let secret = "pgferry-test-secret-value";
    for template in [
        "{{ env }}",
        "{{ env | string }}",
        "{% for k in env %}{{ k }}{% endfor %}",
        "{% set e = env %}{{ e }}",
        "{{ env[vars.which] }}",
        "{{ debug() }}",
    ] {
        let plan = VAR_PLAN
            .replace("{{ vars.missing }}", "1")
            .replace(
                "suffix = \"a\"",
                "suffix = \"a\"\nwhich = \"PGFERRY_TEST_SECRET\"",
            )
            .replace(
                "url = \"postgres://u@{{ vars.host }}:1/src\"",
                &format!(
                    "url = \"postgres://u@{{{{ vars.host }}}}:1/src\"\npassword = \"{template}\""
                ),
            );
        let (_dir, path) = temp_plan(&plan);
        let run = pgferry(
            &["check", path.to_str().unwrap()],
            &[("PGFERRY_TEST_SECRET", secret)],
        );
        assert_eq!(run.code, 2, "{template}: {run:?}");
        assert!(!run.stderr.contains(secret), "{template}: {run:?}");
        assert!(
            run.stderr.ends_with(": 1 error in plan\n"),
            "{template}: {run:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// run: stage arguments are checked before anything is contacted.

const RUN_PLAN: &str = r#"version = 1
name = "until_check"

[source]
url = "postgres://u@127.0.0.1:1/src"

[target]
url = "postgres://u@127.0.0.1:1/dst"

[state]
url = "postgres://u@127.0.0.1:1/state"

[[databases]]
name = "app"

[stages.preflight]
kind = "preflight"

[stages.load]
kind = "full_load"
after = ["preflight"]
"#;

#[test]
fn run_until_an_unknown_stage_is_refused() {
    let (_dir, path) = temp_plan(RUN_PLAN);
    let p = path.to_str().unwrap();

    let run = pgferry(&["run", p, "--until", "nosuchstage"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(
        run.stderr
            .contains("error: --until `nosuchstage`: the plan has no such stage"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("hint: stages: preflight, load"),
        "{run:?}"
    );

    let run = pgferry(&["run", p, "--until", "lod"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("error: --until `lod`: the plan has no such stage"),
        "{run:?}"
    );
    assert!(run.stderr.contains("did you mean `load`?"), "{run:?}");

    let run = pgferry(&["run", p, "--rerun", "preflite"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("error: --rerun `preflite`: the plan has no such stage"),
        "{run:?}"
    );
    assert!(run.stderr.contains("did you mean `preflight`?"), "{run:?}");
}

// ---------------------------------------------------------------------------------------------------
// Bad usage and unreadable files.

#[test]
fn check_without_a_plan_is_a_usage_error() {
    let run = pgferry(&["check"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.contains("<PLAN>"), "{run:?}");

    let run = pgferry(&["chek", "pipelines/dvdrental.toml"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("check"), "suggests `check`: {run:?}");
}

#[test]
fn check_of_a_missing_file_says_so() {
    let run = pgferry(&["check", "tests/fixtures/plans/does_not_exist.toml"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(
        run.stderr.starts_with("error: cannot read plan file: "),
        "{run:?}"
    );
    assert!(
        run.stderr
            .ends_with("tests/fixtures/plans/does_not_exist.toml: 1 error in plan\n"),
        "{run:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// No input makes `check` panic.

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random edit of `text`.
fn mutate(text: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = text.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let join = |lines: &[Vec<u8>]| lines.join(&b'\n');
    match rng.below(5) {
        // Delete a line.
        0 => {
            let i = rng.below(lines.len());
            lines.remove(i);
            join(&lines)
        }
        // Duplicate a line.
        1 => {
            let i = rng.below(lines.len());
            let l = lines[i].clone();
            lines.insert(i, l);
            join(&lines)
        }
        // Truncate at some byte.
        2 => text[..rng.below(text.len() + 1)].to_vec(),
        // Replace a byte with one of the characters that matter to TOML and templates.
        3 => {
            const CHARS: &[u8] = b"\"[]={}\n#";
            let mut out = text.to_vec();
            if !out.is_empty() {
                let i = rng.below(out.len());
                out[i] = CHARS[rng.below(CHARS.len())];
            }
            out
        }
        // Swap two lines.
        _ => {
            let (i, j) = (rng.below(lines.len()), rng.below(lines.len()));
            lines.swap(i, j);
            join(&lines)
        }
    }
}

/// What must hold for any input: exit 0 or 2, no panic, no internal error, and a consistent report.
fn check_survives(plan: &str, env: &[(&str, &str)]) -> Result<(), String> {
    let run = pgferry(&["check", plan], env);
    let fail = |why: &str| Err(format!("{plan}: {why}: {run:?}"));
    if run.stderr.contains("panicked") {
        return fail("panicked");
    }
    if run.stderr.contains("error: internal:") {
        return fail("internal error");
    }
    match run.code {
        0 => {
            if !run.stdout.contains("is valid") || !run.stderr.is_empty() {
                return fail("exit 0 without a valid report");
            }
        }
        2 => {
            let errors = run
                .stderr
                .lines()
                .filter(|l| l.starts_with("error: "))
                .count();
            let s = if errors == 1 { "" } else { "s" };
            let last = format!("{plan}: {errors} error{s} in plan\n");
            if errors == 0 || !run.stderr.ends_with(&last) || !run.stdout.is_empty() {
                return fail(&format!("exit 2, but stderr does not end with {last:?}"));
            }
        }
        _ => return fail("exit code neither 0 nor 2"),
    }
    Ok(())
}

#[test]
fn no_input_makes_check_panic() {
    const MUTANTS: usize = 200;
    let base = fs::read(crate_root().join("pipelines/dvdrental.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut plans: Vec<String> = FIXTURES
        .iter()
        .map(|f| format!("{FIXTURES_DIR}/{f}.toml"))
        .collect();
    for i in 0..MUTANTS {
        let mut text = base.clone();
        for _ in 0..1 + rng.below(3) {
            text = mutate(&text, &mut rng);
        }
        let path = dir.path().join(format!("mutant_{i:03}.toml"));
        fs::write(&path, &text).unwrap();
        plans.push(path.to_str().unwrap().to_string());
    }
    let mut env: Vec<(&str, &str)> = FIXTURE_ENV.to_vec();
    env.extend([("SOURCE_PASSWORD", "x"), ("TARGET_PASSWORD", "y")]);

    // A few at a time: the binary starts fast, but 200 runs one after the other add up.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let chunk = plans.len().div_ceil(threads);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = plans
            .chunks(chunk)
            .map(|part| {
                let env = &env;
                s.spawn(move || {
                    part.iter()
                        .filter_map(|p| check_survives(p, env).err())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    if !failures.is_empty() {
        // Keep the inputs for a look.
        let keep = dir.keep();
        panic!(
            "{} of {} inputs failed (mutants kept in {}):\n\n{}",
            failures.len(),
            plans.len(),
            keep.display(),
            failures.join("\n\n")
        );
    }
}
