//! Serde types mirroring the plan's TOML, after template rendering. The JSON Schema in
//! `schemas/plan.schema.json` describes exactly these types (a test keeps them in sync), so by the time
//! a value is deserialized here the schema check has already explained anything wrong with it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{ByteSize, Dur};

/// The default of every option that has one: the only place they are defined. The options' typed
/// accessors below return them for an unset key; `defaults_of` lists them by schema location, and
/// `tests/it/schema_sync.rs` fails when a `default` of `schemas/plan.schema.json` (and so of
/// `docs/plan-reference.md`, generated from it) differs from them or is missing. Why each value
/// was chosen is said in the schema's description of its key.
pub mod defaults {
    use std::time::Duration;

    /// `[state] schema`.
    pub const STATE_SCHEMA: &str = "pgferry";
    /// Every stage's `retries`.
    pub const RETRIES: u32 = 3;
    pub const PREFLIGHT_FAIL_ON_WARNING: bool = false;
    pub const SCHEMA_DUMP_NO_OWNER: bool = false;
    pub const SCHEMA_DUMP_NO_PRIVILEGES: bool = false;
    pub const PROVISION_EXISTING: &str = "compare";
    pub const PROVISION_REPLICA_IDENTITY: &str = "refuse";
    pub const FULL_LOAD_JOBS: u32 = 4;
    pub const FULL_LOAD_SPLIT_TABLES_LARGER_THAN: u64 = 1 << 30;
    pub const POST_DATA_JOBS: u32 = 4;
    pub const POST_DATA_MAINTENANCE_WORK_MEM: u64 = 1 << 30;
    pub const CDC_BATCH_CHANGES: u32 = 10_000;
    pub const CDC_BATCH_DELAY: Duration = Duration::from_millis(100);
    pub const CDC_DDL: &str = "stop";
    pub const VALIDATE_MODE: &str = "checksum";
    pub const VALIDATE_JOBS: u32 = 4;
    pub const VALIDATE_CHUNK_ROWS: u32 = 20_000;
    pub const VALIDATE_EXCLUDE_GENERATED: bool = false;
    pub const VALIDATE_HOLD_TIMEOUT: Duration = Duration::from_secs(300);
    pub const CUTOVER_APPROVAL: &str = "manual";
    pub const CUTOVER_MAX_LAG: Duration = Duration::from_secs(1);
    pub const CUTOVER_QUIET_FOR: Duration = Duration::from_secs(10);
    pub const CUTOVER_FENCE: &str = "read_only";
    pub const CUTOVER_TIMEOUT: Duration = Duration::from_secs(600);
    pub const CUTOVER_ANALYZE: bool = true;
    pub const FALLBACK_TIMEOUT: Duration = Duration::from_secs(600);
    pub const CLEANUP_DROP_SLOT: bool = true;
    pub const CLEANUP_DROP_PUBLICATION: bool = true;
    pub const SQL_TRANSACTION: bool = true;
}

/// A default value, typed as its key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    Bool(bool),
    Integer(u64),
    Str(&'static str),
    Duration(Duration),
    Size(u64),
}

/// The defaults of the options of a JSON Schema definition (`state`, `preflight_stage`, ...): every
/// key that has one, with its value. Each stage definition also has `retries`.
pub fn defaults_of(definition: &str) -> Vec<(&'static str, DefaultValue)> {
    use DefaultValue::*;
    use defaults as d;
    let mut out = match definition {
        "state" => return vec![("schema", Str(d::STATE_SCHEMA))],
        "preflight_stage" => vec![("fail_on_warning", Bool(d::PREFLIGHT_FAIL_ON_WARNING))],
        "schema_dump_stage" => vec![
            ("no_owner", Bool(d::SCHEMA_DUMP_NO_OWNER)),
            ("no_privileges", Bool(d::SCHEMA_DUMP_NO_PRIVILEGES)),
        ],
        "provision_stage" => vec![
            ("existing", Str(d::PROVISION_EXISTING)),
            ("replica_identity", Str(d::PROVISION_REPLICA_IDENTITY)),
        ],
        "full_load_stage" => vec![
            ("jobs", Integer(d::FULL_LOAD_JOBS.into())),
            (
                "split_tables_larger_than",
                Size(d::FULL_LOAD_SPLIT_TABLES_LARGER_THAN),
            ),
        ],
        "post_data_stage" => vec![
            ("jobs", Integer(d::POST_DATA_JOBS.into())),
            (
                "maintenance_work_mem",
                Size(d::POST_DATA_MAINTENANCE_WORK_MEM),
            ),
        ],
        "cdc_stage" => vec![
            ("batch_changes", Integer(d::CDC_BATCH_CHANGES.into())),
            ("batch_delay", Duration(d::CDC_BATCH_DELAY)),
            ("ddl", Str(d::CDC_DDL)),
        ],
        "validate_stage" => vec![
            ("mode", Str(d::VALIDATE_MODE)),
            ("jobs", Integer(d::VALIDATE_JOBS.into())),
            ("chunk_rows", Integer(d::VALIDATE_CHUNK_ROWS.into())),
            ("exclude_generated", Bool(d::VALIDATE_EXCLUDE_GENERATED)),
            ("hold_timeout", Duration(d::VALIDATE_HOLD_TIMEOUT)),
        ],
        "cutover_stage" => vec![
            ("approval", Str(d::CUTOVER_APPROVAL)),
            ("max_lag", Duration(d::CUTOVER_MAX_LAG)),
            ("quiet_for", Duration(d::CUTOVER_QUIET_FOR)),
            ("fence", Str(d::CUTOVER_FENCE)),
            ("timeout", Duration(d::CUTOVER_TIMEOUT)),
            ("analyze", Bool(d::CUTOVER_ANALYZE)),
        ],
        "sequence_reset_stage" => vec![],
        "fallback_stage" => vec![("timeout", Duration(d::FALLBACK_TIMEOUT))],
        "cleanup_stage" => vec![
            ("drop_slot", Bool(d::CLEANUP_DROP_SLOT)),
            ("drop_publication", Bool(d::CLEANUP_DROP_PUBLICATION)),
        ],
        "sql_stage" => vec![("transaction", Bool(d::SQL_TRANSACTION))],
        _ => return Vec::new(),
    };
    out.insert(0, ("retries", Integer(d::RETRIES.into())));
    out
}

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

impl StageCommon {
    pub fn retries(&self) -> u32 {
        self.retries.unwrap_or(defaults::RETRIES)
    }
}

impl RawState {
    pub fn schema(&self) -> String {
        self.schema
            .clone()
            .unwrap_or_else(|| defaults::STATE_SCHEMA.into())
    }
}

macro_rules! stage_kinds {
    ($($kind:literal => $variant:ident($options:ident)),* $(,)?) => {
        /// Every stage kind, in the order a migration usually runs them.
        pub const STAGE_KINDS: &[&str] = &[$($kind),*];

        /// A stage kind. Code that chooses by kind matches on this exhaustively, so the compiler
        /// lists every place a new kind must be handled.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum StageKind {
            $($variant),*
        }

        impl StageKind {
            /// Every kind, in the order of [`STAGE_KINDS`].
            pub const ALL: &[StageKind] = &[$(StageKind::$variant),*];

            /// The kind as written in plans (`kind = "full_load"`) and in the store.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(StageKind::$variant => $kind,)*
                }
            }

            /// The kind written `s`, if there is one.
            pub fn parse(s: &str) -> Option<StageKind> {
                match s {
                    $($kind => Some(StageKind::$variant),)*
                    _ => None,
                }
            }
        }

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

            pub fn kind(&self) -> StageKind {
                match self {
                    $(StageOptions::$variant(_) => StageKind::$variant,)*
                }
            }
        }
    };
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl Serialize for StageKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
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
    "fallback" => Fallback(FallbackOptions),
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
    /// Schema changes on the source during cdc: "stop" or "replicate".
    #[serde(default)]
    pub ddl: Option<String>,
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
    /// ANALYZE every selected table on the target before the fence.
    #[serde(default)]
    pub analyze: Option<bool>,
}

impl ProvisionOptions {
    /// "compare" or "refuse".
    pub fn existing(&self) -> &str {
        self.existing
            .as_deref()
            .unwrap_or(defaults::PROVISION_EXISTING)
    }

    /// "refuse", "index" or "full".
    pub fn replica_identity(&self) -> &str {
        self.replica_identity
            .as_deref()
            .unwrap_or(defaults::PROVISION_REPLICA_IDENTITY)
    }
}

impl FullLoadOptions {
    pub fn jobs(&self) -> u32 {
        self.jobs.unwrap_or(defaults::FULL_LOAD_JOBS)
    }

    pub fn split_tables_larger_than(&self) -> u64 {
        self.split_tables_larger_than
            .map_or(defaults::FULL_LOAD_SPLIT_TABLES_LARGER_THAN, |b| b.0)
    }
}

impl PostDataOptions {
    pub fn jobs(&self) -> u32 {
        self.jobs.unwrap_or(defaults::POST_DATA_JOBS)
    }

    pub fn maintenance_work_mem(&self) -> u64 {
        self.maintenance_work_mem
            .map_or(defaults::POST_DATA_MAINTENANCE_WORK_MEM, |b| b.0)
    }
}

impl CdcOptions {
    pub fn batch_changes(&self) -> u32 {
        self.batch_changes.unwrap_or(defaults::CDC_BATCH_CHANGES)
    }

    pub fn batch_delay(&self) -> Duration {
        self.batch_delay.map_or(defaults::CDC_BATCH_DELAY, |d| d.0)
    }

    /// Whether DDL is captured on the source and replayed on the target (`ddl = "replicate"`).
    pub fn replicates_ddl(&self) -> bool {
        self.ddl.as_deref().unwrap_or(defaults::CDC_DDL) == "replicate"
    }
}

impl ValidateOptions {
    /// "count", "checksum" or "full".
    pub fn mode(&self) -> &str {
        self.mode.as_deref().unwrap_or(defaults::VALIDATE_MODE)
    }

    pub fn jobs(&self) -> u32 {
        self.jobs.unwrap_or(defaults::VALIDATE_JOBS)
    }

    pub fn chunk_rows(&self) -> u32 {
        self.chunk_rows.unwrap_or(defaults::VALIDATE_CHUNK_ROWS)
    }

    pub fn exclude_generated(&self) -> bool {
        self.exclude_generated
            .unwrap_or(defaults::VALIDATE_EXCLUDE_GENERATED)
    }

    pub fn hold_timeout(&self) -> Duration {
        self.hold_timeout
            .map_or(defaults::VALIDATE_HOLD_TIMEOUT, |d| d.0)
    }
}

impl CutoverOptions {
    /// Whether the cutover waits for `pgferry cutover` ("manual") rather than its lag condition.
    pub fn manual(&self) -> bool {
        self.approval
            .as_deref()
            .unwrap_or(defaults::CUTOVER_APPROVAL)
            == "manual"
    }

    pub fn max_lag(&self) -> Duration {
        self.max_lag.map_or(defaults::CUTOVER_MAX_LAG, |d| d.0)
    }

    pub fn quiet_for(&self) -> Duration {
        self.quiet_for.map_or(defaults::CUTOVER_QUIET_FOR, |d| d.0)
    }

    /// Whether the source is fenced read-only ("read_only").
    pub fn read_only_fence(&self) -> bool {
        self.fence.as_deref().unwrap_or(defaults::CUTOVER_FENCE) == "read_only"
    }

    /// Whether the source is fenced by revoking the write privileges ("revoke_writes").
    pub fn revoke_writes_fence(&self) -> bool {
        self.fence.as_deref().unwrap_or(defaults::CUTOVER_FENCE) == "revoke_writes"
    }

    pub fn timeout(&self) -> Duration {
        self.timeout.map_or(defaults::CUTOVER_TIMEOUT, |d| d.0)
    }

    pub fn analyze(&self) -> bool {
        self.analyze.unwrap_or(defaults::CUTOVER_ANALYZE)
    }
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
pub struct FallbackOptions {
    /// The longest the target stays fenced while a rollback drains the fallback stream.
    #[serde(default)]
    pub timeout: Option<Dur>,
}

impl FallbackOptions {
    pub fn timeout(&self) -> Duration {
        self.timeout.map_or(defaults::FALLBACK_TIMEOUT, |d| d.0)
    }
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

impl SqlOptions {
    pub fn transaction(&self) -> bool {
        self.transaction.unwrap_or(defaults::SQL_TRANSACTION)
    }
}

impl CleanupOptions {
    pub fn drop_slot(&self) -> bool {
        self.drop_slot.unwrap_or(defaults::CLEANUP_DROP_SLOT)
    }

    pub fn drop_publication(&self) -> bool {
        self.drop_publication
            .unwrap_or(defaults::CLEANUP_DROP_PUBLICATION)
    }
}
