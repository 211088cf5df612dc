//! Serde types mirroring the plan's TOML, after template rendering. The JSON Schema in
//! `schemas/plan.schema.json` describes exactly these types (a test keeps them in sync), so by the time
//! a value is deserialized here the schema check has already explained anything wrong with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::units::{ByteSize, Dur};

/// The whole plan except its stages, which are deserialized one by one (see [`StageOptions`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub version: i64,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    pub source: RawEndpoint,
    pub target: RawEndpoint,
    #[serde(default)]
    pub state: Option<RawState>,
    pub databases: Vec<RawDatabase>,
    pub stages: BTreeMap<String, serde_json::Value>,
}

/// A server to connect to: a libpq-style URL (or `key=value` string) and an optional password.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub url: String,
    #[serde(default)]
    pub password: Option<String>,
}

/// Where the checkpoint store lives; by default the first target database, schema `pgferry`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub schema: Option<String>,
}

/// One database to migrate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub name: String,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Keys every stage has, whatever its kind.
pub const COMMON_STAGE_KEYS: &[&str] = &["kind", "after", "description", "retries"];

/// The stage keys shared by all kinds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageCommon {
    pub kind: String,
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// How many times a transient failure (connection lost, serialization failure, ...) is retried.
    #[serde(default)]
    pub retries: Option<u32>,
}

macro_rules! stage_kinds {
    ($($kind:literal => $variant:ident($options:ident)),* $(,)?) => {
        /// Every stage kind, in the order a migration usually runs them.
        pub const STAGE_KINDS: &[&str] = &[$($kind),*];

        /// The kind-specific options of a stage.
        #[derive(Debug, Clone, Serialize)]
        #[serde(untagged)]
        pub enum StageOptions {
            $($variant($options)),*
        }

        impl StageOptions {
            /// Deserializes the kind-specific keys (the common keys already removed).
            pub fn from_json(kind: &str, value: serde_json::Value) -> Result<StageOptions, String> {
                match kind {
                    $($kind => serde_json::from_value(value).map(StageOptions::$variant).map_err(|e| e.to_string()),)*
                    other => Err(format!("unknown stage kind `{other}`")),
                }
            }

            /// The options of `kind` with every key at its default (used to list a kind's keys).
            pub fn default_for(kind: &str) -> Option<StageOptions> {
                match kind {
                    $($kind => Some(StageOptions::$variant($options::default())),)*
                    _ => None,
                }
            }

            pub fn kind(&self) -> &'static str {
                match self {
                    $(StageOptions::$variant(_) => $kind,)*
                }
            }
        }
    };
}

stage_kinds! {
    "preflight" => Preflight(PreflightOptions),
    "schema_dump" => SchemaDump(SchemaDumpOptions),
    "provision" => Provision(ProvisionOptions),
    "full_load" => FullLoad(FullLoadOptions),
    "post_data" => PostData(PostDataOptions),
    "cdc" => Cdc(CdcOptions),
    "validate" => Validate(ValidateOptions),
    "cutover" => Cutover(CutoverOptions),
    "sequence_reset" => SequenceReset(SequenceResetOptions),
    "cleanup" => Cleanup(CleanupOptions),
    "sql" => Sql(SqlOptions),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreflightOptions {
    /// Fail the stage on warnings too, not only on errors.
    #[serde(default)]
    pub fail_on_warning: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaDumpOptions {
    #[serde(default)]
    pub no_owner: bool,
    #[serde(default)]
    pub no_privileges: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionOptions {
    /// What to do when the target already has some of the objects: "compare" (continue when they
    /// match) or "refuse".
    #[serde(default)]
    pub existing: Option<String>,
    /// Online plans: what to do with selected tables that have no primary key or replica identity:
    /// "refuse", "index" (a unique index on NOT NULL columns, else FULL) or "full".
    #[serde(default)]
    pub replica_identity: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullLoadOptions {
    #[serde(default)]
    pub jobs: Option<u32>,
    #[serde(default)]
    pub split_tables_larger_than: Option<ByteSize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostDataOptions {
    #[serde(default)]
    pub jobs: Option<u32>,
    #[serde(default)]
    pub maintenance_work_mem: Option<ByteSize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcOptions {
    #[serde(default)]
    pub batch_changes: Option<u32>,
    #[serde(default)]
    pub batch_delay: Option<Dur>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateOptions {
    /// "count", "checksum" (default) or "full".
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub jobs: Option<u32>,
    /// About how many rows one checksum chunk covers.
    #[serde(default)]
    pub chunk_rows: Option<u32>,
    #[serde(default)]
    pub exclude_generated: Option<bool>,
    /// How long to wait for a running cdc stage to hold its apply at the validation snapshot.
    #[serde(default)]
    pub hold_timeout: Option<Dur>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverOptions {
    #[serde(default)]
    pub approval: Option<String>,
    #[serde(default)]
    pub max_lag: Option<Dur>,
    #[serde(default)]
    pub quiet_for: Option<Dur>,
    #[serde(default)]
    pub fence: Option<String>,
    #[serde(default)]
    pub timeout: Option<Dur>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceResetOptions {}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupOptions {
    #[serde(default)]
    pub drop_slot: Option<bool>,
    #[serde(default)]
    pub drop_publication: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlOptions {
    /// "source" or "target".
    #[serde(default)]
    pub on: String,
    #[serde(default)]
    pub sql: String,
    /// Run the SQL in one transaction (default). Set false for statements such as VACUUM.
    #[serde(default)]
    pub transaction: Option<bool>,
}
