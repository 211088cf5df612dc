//! `pgferry init`: writes a commented plan with every standard stage.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// The plan `init` writes; a test compiles it.
pub const TEMPLATE: &str = include_str!("init_template.toml");

pub fn run(path: &str, force: bool) -> u8 {
    if std::path::Path::new(path).exists() && !force {
        eprintln!(
            "error: {path} already exists\n  hint: choose another path, or pass --force to overwrite it"
        );
        return EXIT_USAGE;
    }
    match std::fs::write(path, TEMPLATE) {
        Ok(()) => {
            println!(
                "wrote {path}: edit [source], [target] and [[databases]], then `pgferry check {path}` and `pgferry plan {path}`"
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: cannot write {path}: {e}");
            EXIT_FAILED
        }
    }
}
