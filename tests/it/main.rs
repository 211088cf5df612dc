//! The integration tests: one test binary, one module per area, sharing `tests/support` (compiled
//! once, and one source+target cluster pair started lazily for the whole binary).
//!
//! Run one area with `cargo test --test it -- <module>::`, e.g. `cargo test --test it -- cdc::`.

#[path = "../support/mod.rs"]
mod support;

mod cdc;
mod ddl;
mod demo;
mod executor;
mod fallback;
mod faults;
mod full_load;
mod harness;
mod hostile_names;
mod kill_matrix;
mod managed;
mod offline_migration;
mod online_migration;
mod plan_errors;
mod plan_fuzz;
mod plan_reference;
mod post_data_stages;
mod preflight;
mod real_schemas;
mod regression_corpus;
mod rehearsal;
mod replication_stream;
mod report;
mod schema_stages;
mod schema_sync;
mod security;
mod status_watch;
mod tls;
mod validate;
mod versions;
