//! Shared integration-test support: throwaway PostgreSQL clusters and helpers.
//!
//! Every integration test binary includes this with `mod support;`. Not every
//! binary uses every helper, hence the crate-wide `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod compare;
pub mod corpus;
pub mod gate;
pub mod managed;
pub mod plan;

// Not every test binary uses every re-export.
#[allow(unused_imports)]
pub use cluster::{
    Cluster, PASSWORD, Pair, load_pagila, pagila_dir, pair, pgferry, row_digest, strip_restrict,
};
#[allow(unused_imports)]
pub use gate::Gate;
#[allow(unused_imports)]
pub use plan::{PASSWORD_VAR, TestPlan, show, wait_for};
