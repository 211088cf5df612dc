//! One module per command. Each returns the process exit code; messages go to stderr, results to
//! stdout.

mod check;
mod cutover;
mod demo;
mod graph;
mod init;
mod plan;
mod report;
mod reset;
mod rollback;
mod run;
mod status;
mod unfence;
mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cli::{Cli, Command, PlanArgs};
use crate::error::Error;
use crate::pg::connect::ConnInfo;
use crate::plan::diagnostic::{closest, render_all};
use crate::plan::{CompileOptions, Plan, compile_file};
use crate::state::StateStore;
use crate::state::postgres::PgStore;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_DATA_DIFFERS: u8 = 3;
pub const EXIT_INTERRUPTED: u8 = 130;

pub async fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Check { plan } => check::run(&plan),
        Command::Plan { plan, json } => plan::run(&plan, json).await,
        Command::Graph {
            plan,
            format,
            state,
        } => graph::run(&plan, format, state).await,
        Command::Run {
            plan,
            until,
            rerun,
            rehearsal,
        } => run::run(&plan, until, rerun, rehearsal).await,
        Command::Verify {
            plan,
            report,
            mode,
            jobs,
        } => verify::run(&plan, report.as_deref(), mode, jobs).await,
        Command::Status {
            plan,
            json,
            watch,
            interval,
        } => {
            if watch {
                status::watch(&plan, interval).await
            } else {
                status::run(&plan, json).await
            }
        }
        Command::Cutover { plan } => cutover::run(&plan).await,
        Command::Unfence { plan } => unfence::run(&plan).await,
        Command::Rollback { plan, no_wait } => rollback::rollback(&plan, !no_wait).await,
        Command::FallbackStop { plan } => rollback::stop(&plan).await,
        Command::Reset {
            plan,
            yes,
            keep_target,
        } => reset::run(&plan, yes, keep_target).await,
        Command::Report {
            plan,
            run,
            json,
            html,
            compare,
        } => report::run(&plan, run, json, html.as_deref(), compare).await,
        Command::Init { path, force } => init::run(&path, force),
        Command::Schema { markdown } => schema(markdown),
        Command::Demo {
            scale,
            keep,
            port_base,
        } => demo::run(scale, keep, port_base).await,
    }
}

/// `pgferry schema [--markdown]` (hidden): the embedded JSON Schema, or the plan reference.
fn schema(markdown: bool) -> u8 {
    if !markdown {
        print!("{}", crate::plan::schema::SCHEMA_TEXT);
        return EXIT_OK;
    }
    match crate::plan::reference::markdown() {
        Ok(text) => {
            print!("{text}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!(
                "error: cannot generate the plan reference: {e}\n  hint: fix schemas/plan.schema.json and rebuild"
            );
            EXIT_FAILED
        }
    }
}

/// Compiles the plan; on errors prints them all and returns the exit code.
pub fn load(args: &PlanArgs) -> Result<Arc<Plan>, u8> {
    let opts = CompileOptions {
        vars: args.vars.clone(),
        env: std::env::vars().collect::<BTreeMap<_, _>>(),
    };
    match compile_file(&args.plan, &opts) {
        Ok(plan) => Ok(Arc::new(plan)),
        Err((src, diags)) => {
            eprint!("{}", render_all(&diags, &src));
            Err(EXIT_USAGE)
        }
    }
}

/// Prints an error for a person, with `error:` in front.
pub fn report(e: &Error) {
    eprintln!("error: {e}");
}

/// Resolves a stage id given on the command line.
pub fn stage_arg(plan: &Plan, id: &str, flag: &str) -> Result<usize, u8> {
    match plan.stage_index(id) {
        Some(i) => Ok(i),
        None => {
            let ids: Vec<&str> = plan.stages.iter().map(|s| s.id.as_str()).collect();
            let hint = match closest(id, ids.iter().copied()) {
                Some(c) => format!("did you mean `{c}`?"),
                None => format!("stages: {}", ids.join(", ")),
            };
            eprintln!("error: {flag} `{id}`: the plan has no such stage\n  hint: {hint}");
            Err(EXIT_USAGE)
        }
    }
}

/// Where the plan's checkpoint store lives.
pub fn store_conn(plan: &Plan) -> Result<ConnInfo, Error> {
    // Past the fence: the store may live in a database a cutover or a rollback fences.
    ConnInfo::new(&plan.state.endpoint, plan.state.database.as_deref())
        .map(|c| c.past_fence())
        .map_err(|e| e.context("[state]"))
}

/// Opens the existing store of a plan; `Ok(None)` when there is none yet. With
/// [`create_store`], the one place the commands construct a store: everything past it goes
/// through the [`StateStore`] trait.
pub async fn open_store(plan: &Plan) -> Result<Option<Box<dyn StateStore>>, Error> {
    let conn = store_conn(plan)?;
    match PgStore::open(conn.clone(), &plan.state.schema, &plan.name).await {
        Ok(s) => Ok(s.map(|s| Box::new(s) as Box<dyn StateStore>)),
        // The store's database does not exist yet: nothing has run.
        Err(e) if e.sqlstate.as_deref() == Some("3D000") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the store of a plan, creating its database and schema (and upgrading it) as needed.
pub async fn create_store(plan: &Plan) -> Result<Box<dyn StateStore>, Error> {
    let store = PgStore::open_or_create(store_conn(plan)?, &plan.state.schema, &plan.name).await?;
    Ok(Box::new(store))
}

/// [`create_store`] for `run`, which takes the runner lock next: its session is opened with the
/// store's.
pub async fn create_store_for_run(plan: &Plan) -> Result<Box<dyn StateStore>, Error> {
    let store =
        PgStore::open_or_create_for_run(store_conn(plan)?, &plan.state.schema, &plan.name).await?;
    Ok(Box::new(store))
}
