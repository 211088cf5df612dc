//! Names of the objects pgferry creates on the servers, derived from the migration's name so that
//! `reset` and `cleanup` find them again, and so that two migrations never collide.

use sha2::{Digest, Sha256};

/// PostgreSQL truncates identifiers to 63 bytes; we shorten with a hash instead, so names stay unique.
fn bounded(name: String) -> String {
    if name.len() <= 63 {
        return name;
    }
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..4]);
    let mut cut = 54;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{hash}", &name[..cut])
}

/// Replication slot names allow only `[a-z0-9_]`; slots are per server, so the database is part of
/// the name.
pub fn slot_name(migration: &str, database: &str) -> String {
    let db: String = database
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let raw = format!("pgferry_{migration}_{db}");
    // Different database names can sanitize alike; a short hash of the real name keeps them apart.
    let hash = hex::encode(&Sha256::digest(database.as_bytes())[..3]);
    bounded(format!("{raw}_{hash}")).to_ascii_lowercase()
}

/// Publications live in one database, so the migration's name is enough.
pub fn publication_name(migration: &str) -> String {
    bounded(format!("pgferry_{migration}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_and_distinct() {
        let a = slot_name("dvd", "Sales-DB");
        let b = slot_name("dvd", "sales_db");
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        assert!(slot_name("m", &"x".repeat(100)).len() <= 63);
        assert_eq!(publication_name("dvd"), "pgferry_dvd");
    }
}
