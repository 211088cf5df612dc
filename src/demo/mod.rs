//! `pgferry demo`: throwaway clusters ([`cluster`]), a generated DVD-rental-like source database
//! ([`generator`]), an application writing to it during the migration ([`writer`]) and the bundled
//! online plan ([`plan`]). The command itself is `commands/demo.rs`.

pub mod cluster;
pub mod generator;
pub mod plan;
pub mod writer;
