//! The compiled plan: every string rendered, every reference resolved to a stage index, every option
//! typed, the DAG built. Nothing after compilation looks at TOML again.

pub mod compile;
pub mod diagnostic;
pub mod raw;
pub mod reference;
pub mod schema;
pub mod source;
pub mod template;
pub mod units;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::dag::Dag;
use crate::secret::{Secret, redact_url};
pub use compile::{CompileOptions, compile, compile_file};
pub use raw::{StageKind, StageOptions};

/// A server the plan connects to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The connection string as written (rendered); may hold a password, so print [`Endpoint::display`].
    pub url: String,
    pub password: Option<Secret>,
}

impl Endpoint {
    /// The URL without any password, for messages and fingerprints.
    pub fn display(&self) -> String {
        redact_url(&self.url)
    }
}

/// Where checkpoints are kept.
#[derive(Debug, Clone)]
pub struct StateLocation {
    pub endpoint: Endpoint,
    /// The database to connect to (overrides the URL's), when the store shares the target server.
    pub database: Option<String>,
    pub schema: String,
}

/// One source database and where it goes.
#[derive(Debug, Clone, Serialize)]
pub struct Database {
    pub name: String,
    pub target: String,
    pub tables: Vec<String>,
    pub exclude: Vec<String>,
}

/// A compiled stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub id: String,
    pub kind: StageKind,
    /// Indices (into [`Plan::stages`]) of the stages this one runs after.
    pub after: Vec<usize>,
    pub description: Option<String>,
    pub retries: u32,
    /// The options rendered for each database, in the order of [`Plan::databases`].
    pub options: Vec<StageOptions>,
    /// A digest of everything that determines what the stage does.
    pub fingerprint: String,
}

impl Stage {
    /// A stage that keeps running after it has caught up (`ready`), until a later stage stops it.
    pub fn is_continuous(&self) -> bool {
        match self.kind {
            StageKind::Cdc => true,
            StageKind::Preflight
            | StageKind::SchemaDump
            | StageKind::Provision
            | StageKind::FullLoad
            | StageKind::PostData
            | StageKind::Validate
            | StageKind::Cutover
            | StageKind::SequenceReset
            | StageKind::Cleanup
            | StageKind::Sql
            // Runs until `pgferry rollback` or `pgferry fallback-stop` ends it: done, not ready.
            | StageKind::Fallback => false,
        }
    }
}

impl StageKind {
    /// Whether a stage of this kind may run beside a dependency of kind `dep` while `dep` is still
    /// running (the executor's overlap contract): post_data builds each table's indexes and
    /// constraints as soon as full_load has copied the table.
    pub fn overlaps(self, dep: StageKind) -> bool {
        matches!((self, dep), (StageKind::PostData, StageKind::FullLoad))
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    /// The plan file, as given on the command line.
    pub path: String,
    pub description: Option<String>,
    pub vars: serde_json::Map<String, serde_json::Value>,
    pub source: Endpoint,
    pub target: Endpoint,
    pub state: StateLocation,
    pub databases: Vec<Database>,
    pub stages: Vec<Stage>,
    pub dag: Dag,
}

impl Plan {
    pub fn stage_index(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.id == id)
    }

    /// The dependencies of stage `i` it may run beside (see [`StageKind::overlaps`]).
    pub fn overlaps(&self, i: usize) -> Vec<usize> {
        let s = &self.stages[i];
        s.after
            .iter()
            .copied()
            .filter(|&d| s.kind.overlaps(self.stages[d].kind))
            .collect()
    }

    pub fn has_kind(&self, kind: StageKind) -> bool {
        self.stages.iter().any(|s| s.kind == kind)
    }
}

/// The fingerprint of a stage: a SHA-256 over its kind, rendered options, the databases and the
/// servers it touches (never a password).
pub(crate) fn fingerprint(
    kind: StageKind,
    options: &[StageOptions],
    databases: &[Database],
    source: &Endpoint,
    target: &Endpoint,
) -> String {
    let doc = serde_json::json!({
        "kind": kind,
        "options": options,
        "databases": databases,
        "source": source.display(),
        "target": target.display(),
    });
    let mut h = Sha256::new();
    h.update(doc.to_string().as_bytes());
    hex::encode(&h.finalize()[..16])
}
