//! The command line (clap). Every command takes `--var`; exit codes: 0 success, 1 a stage or command
//! failed, 2 an invalid plan or bad usage, 3 data differs, 130 interrupted (the next run resumes).

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "pgferry",
    version,
    about = "Declarative, resumable online PostgreSQL-to-PostgreSQL migrations",
    long_about = None,
    after_help = "Exit codes: 0 ok, 1 failed, 2 invalid plan or usage, 3 data differs, 130 interrupted (run again to resume)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Only warnings and errors in the log (RUST_LOG overrides).
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyMode {
    Count,
    Checksum,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}

/// Arguments every plan command shares.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The plan file (TOML).
    pub plan: String,
    /// Set a plan variable, overriding [vars]: `--var target_host=db2`. Repeatable.
    #[arg(long = "var", value_name = "KEY=VALUE", value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= std::time::Duration::from_millis(100) => Ok(d),
        Ok(_) => Err("the interval must be at least 100ms".into()),
        Err(e) => Err(format!("`{s}` is not a duration like 2s or 500ms: {e}")),
    }
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compile a plan and report every error in it; connects to nothing.
    Check {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Dry run: connect read-only, show what each stage would do, the selected tables and preflight
    /// findings. Changes nothing anywhere.
    Plan {
        #[command(flatten)]
        plan: PlanArgs,
        /// Print what preflight finds (per database: servers, selected tables, findings) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draw the stage DAG as Graphviz DOT or Mermaid.
    Graph {
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        /// Colour each stage with its state from the checkpoint store, failing when it cannot be
        /// read. Without it the store is tried anyway and the states shown when a run exists.
        #[arg(long)]
        state: bool,
    },
    /// Run the plan: every stage not yet done, resuming from checkpoints.
    Run {
        #[command(flatten)]
        plan: PlanArgs,
        /// Stop once this stage (and everything it needs) is done.
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
        /// Run this stage again (and everything after it), even if done or its configuration changed.
        #[arg(long, value_name = "STAGE")]
        rerun: Vec<String>,
        /// A rehearsal: the whole plan, cutover included, without fencing the source (the drain
        /// goes to the source's position at the simulated fence); `pgferry reset` tears it down.
        #[arg(long)]
        rehearsal: bool,
    },
    /// Show the state of the migration: stages, runner, run log.
    Status {
        #[command(flatten)]
        plan: PlanArgs,
        /// Machine-readable output (Azure DMS field names).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh a compact view (stages, tables, cdc lag, counters) until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// How often --watch refreshes.
        #[arg(long, default_value = "2s", value_parser = parse_interval, requires = "watch")]
        interval: std::time::Duration,
    },
    /// Compare the source and the target now, as of the same moment (while cdc runs too), using the
    /// plan's connections and its validate stage's options; exit code 3 when the data differs.
    Verify {
        #[command(flatten)]
        plan: PlanArgs,
        /// Also write the report (every difference: table, key, kind, columns) to this file, as JSON.
        #[arg(long, value_name = "FILE")]
        report: Option<String>,
        /// How to compare (default: the plan's validate stage's mode, else checksum).
        #[arg(long, value_enum)]
        mode: Option<VerifyMode>,
        /// Chunks compared in parallel (default: the validate stage's jobs, else 4).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
        jobs: Option<u32>,
    },
    /// Approve the cutover of a running migration whose cutover stage has `approval = "manual"`.
    Cutover {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Lift the cutover fence: make the source databases writable again (after a rollback, or once
    /// the old primary is to be reused).
    Unfence {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Take the cutover back (plans with a `fallback` stage): fence the target, apply its last
    /// changes to the source, set the source's sequences, make the source writable again.
    Rollback {
        #[command(flatten)]
        plan: PlanArgs,
        /// Record the request and return without waiting for the rollback to finish.
        #[arg(long)]
        no_wait: bool,
    },
    /// End the fallback stream of a plan with a `fallback` stage: drop its slot and publication on
    /// the target, so the cutover can no longer be taken back without losing writes.
    FallbackStop {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Tear down what the plan created: replication slots, publications, the checkpoints (runs and
    /// reports are kept) and the target databases pgferry created, so a rehearsal can be repeated.
    Reset {
        #[command(flatten)]
        plan: PlanArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Leave the target databases alone (drop only the source-side objects and checkpoints).
        #[arg(long)]
        keep_target: bool,
    },
    /// Show what runs did: stages, table copies, index builds, the cdc lag profile, the downtime and
    /// the validation; with several kept reports (rehearsals) a side-by-side comparison.
    Report {
        #[command(flatten)]
        plan: PlanArgs,
        /// The run to show (default: the latest with a report).
        #[arg(long, value_name = "N")]
        run: Option<i64>,
        /// Print the report as JSON instead.
        #[arg(long)]
        json: bool,
        /// Also write one self-contained HTML page (DAG, timeline, lag curve, validation) to FILE.
        #[arg(long, value_name = "FILE")]
        html: Option<String>,
        /// How many of the latest reports to compare.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        compare: u32,
    },
    /// Try an online migration end to end, with nothing to configure: two throwaway clusters from
    /// the installed PostgreSQL server binaries, a generated DVD-rental database, a writer, the
    /// bundled plan with an automatic cutover, and a summary. Set PGFERRY_PG_BINDIR to choose the
    /// server binaries.
    Demo {
        /// Size of the generated database: about 350,000 rows (~50 MB) per unit.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        scale: u32,
        /// Leave the clusters running afterwards and print how to connect to them.
        #[arg(long)]
        keep: bool,
        /// Ports for the clusters: the source on P, the target on P+1 (default: free ports).
        #[arg(long, value_name = "P")]
        port_base: Option<u16>,
    },
    /// Write a commented plan with every standard stage.
    Init {
        /// Where to write it.
        #[arg(default_value = "pgferry.toml")]
        path: String,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the plan's JSON Schema (what editors use to complete plans), or with --markdown the
    /// plan reference generated from it (docs/plan-reference.md).
    #[command(hide = true)]
    Schema {
        /// The plan reference in Markdown instead of the JSON Schema.
        #[arg(long)]
        markdown: bool,
    },
}
