//! The bundled online plan (`pipelines/demo.toml`, embedded), compiled for the demo's clusters.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::plan::diagnostic::render_all;
use crate::plan::{CompileOptions, Plan, compile_file};

/// The plan's text, as committed in `pipelines/demo.toml`.
pub const TEMPLATE: &str = include_str!("../../pipelines/demo.toml");
/// The environment variables the plan reads the clusters' password from.
pub const PASSWORD_VARS: [&str; 2] = [
    "PGFERRY_DEMO_SOURCE_PASSWORD",
    "PGFERRY_DEMO_TARGET_PASSWORD",
];
/// The file (next to the written plan) holding the clusters' password.
pub const PASSWORD_FILE: &str = "password";
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
    // The ports go into the written plan's [vars] too, so `pgferry status` works on it as it is.
    let text = TEMPLATE
        .replacen(
            "source_port = \"5432\"",
            &format!("source_port = \"{source_port}\""),
            1,
        )
        .replacen(
            "target_port = \"5433\"",
            &format!("target_port = \"{target_port}\""),
            1,
        );
    std::fs::write(&path, text)
        .map_err(|e| Error::permanent(format!("writing {}: {e}", path.display())))?;
    // The password, for commands run by hand on kept clusters; only the owner can read it.
    let pw_path = dir.join(PASSWORD_FILE);
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&pw_path)
            .and_then(|mut f| f.write_all(password.as_bytes()))
            .map_err(|e| Error::permanent(format!("writing {}: {e}", pw_path.display())))?;
    }
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    for var in PASSWORD_VARS {
        env.insert(var.into(), password.into());
    }
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
    use crate::plan::StageKind;

    #[test]
    fn bundled_plan_compiles() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = super::compile(dir.path(), 5432, 5433, "pw").expect("compiles");
        assert!(plan.has_kind(StageKind::Cutover));
        assert!(plan.has_kind(StageKind::Cdc));
        assert_eq!(plan.databases[0].name, super::DATABASE);
        let written = std::fs::read_to_string(dir.path().join("demo.toml")).expect("plan");
        assert!(written.contains("source_port = \"5432\""), "{written}");
        let plan = super::compile(dir.path(), 6001, 6002, "pw").expect("compiles");
        let written = std::fs::read_to_string(dir.path().join("demo.toml")).expect("plan");
        assert!(written.contains("source_port = \"6001\""), "{written}");
        assert!(written.contains("target_port = \"6002\""), "{written}");
        assert!(plan.source.url.contains(":6001/"), "{}", plan.source.url);
    }
}
