//! Shared integration-test support: throwaway PostgreSQL clusters and helpers.
//!
//! The one integration-test binary (`tests/it/main.rs`) includes this once with `mod support;`.
//! Not every helper is used by every build of it, hence the module-wide `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod compare;
pub mod corpus;
pub mod gate;
pub mod managed;
pub mod plan;
pub mod require;
pub mod writer;

// Not every test binary uses every re-export.
#[allow(unused_imports)]
pub use cluster::{
    Cluster, PASSWORD, Pair, load_pagila, pagila_dir, pair, pgferry, row_digest, strip_restrict,
};
#[allow(unused_imports)]
pub use gate::Gate;
#[allow(unused_imports)]
pub use plan::{PASSWORD_VAR, TestPlan, show, wait_for, wait_for_exit};
#[allow(unused_imports)]
pub use require::{missing, under_ci};
#[allow(unused_imports)]
pub use writer::{FENCE_CODES, Writer, WriterSpec, Written};
