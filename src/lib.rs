//! pgferry: a declarative, resumable runner for online PostgreSQL-to-PostgreSQL migrations.
//!
//! A plan (TOML) is compiled ([`plan`]) into a DAG ([`dag`]) of stages ([`stages`]) that the
//! [`executor`] runs with checkpoints in a [`state`] store. Everything that speaks to a server lives
//! under [`pg`]. See `docs/design.md` for the map.

pub mod cli;
pub mod commands;
pub mod dag;
pub mod demo;
pub mod error;
pub mod executor;
pub mod lag;
pub mod pg;
pub mod plan;
pub mod progress;
pub mod report;
pub mod secret;
pub mod select;
pub mod stages;
pub mod state;
pub mod status;
