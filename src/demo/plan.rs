//! The bundled online plan (`pipelines/demo.toml`, embedded), compiled for the demo's clusters.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::plan::diagnostic::render_all;
use crate::plan::{CompileOptions, Plan, compile_file};

/// The plan's text, as committed in `pipelines/demo.toml`.
pub const TEMPLATE: &str = include_str!("../../pipelines/demo.toml");
/// The environment variable the plan reads the clusters' password from.
pub const PASSWORD_VAR: &str = "PGFERRY_DEMO_PASSWORD";
/// The database the demo migrates.
pub const DATABASE: &str = "dvdrental";

/// Writes the plan into `dir` (so `pgferry status` can read it while the demo runs, or after with
/// `--keep`) and compiles it for the given ports. The password only enters the compiler's `env`.
pub fn compile(
    dir: &Path,
    source_port: u16,
    target_port: u16,
    password: &str,
) -> Result<Arc<Plan>> {
    let path = dir.join("demo.toml");
    std::fs::write(&path, TEMPLATE)
        .map_err(|e| Error::permanent(format!("writing {}: {e}", path.display())))?;
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    env.insert(PASSWORD_VAR.into(), password.into());
    let opts = CompileOptions {
        vars: vec![
            ("source_port".into(), source_port.to_string()),
            ("target_port".into(), target_port.to_string()),
        ],
        env,
    };
    let path_text = path.display().to_string();
    match compile_file(&path_text, &opts) {
        Ok(plan) => Ok(Arc::new(plan)),
        Err((src, diags)) => Err(Error::permanent(format!(
            "internal: the bundled demo plan does not compile:\n{}",
            render_all(&diags, &src)
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bundled_plan_compiles() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = super::compile(dir.path(), 5432, 5433, "pw").expect("compiles");
        assert!(plan.has_kind("cutover"));
        assert!(plan.has_kind("cdc"));
        assert_eq!(plan.databases[0].name, super::DATABASE);
    }
}
