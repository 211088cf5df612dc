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

/// Whether `name` is a plain lowercase identifier as migration names once had to be
/// (`[a-z][a-z0-9_]{0,47}`): such a name goes into object names as it is.
fn is_plain(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 48
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The migration's name as it goes into the names of server objects (slots, publications) and the
/// runner's `application_name`: `[a-z0-9_]` only, at most 48 bytes. A plain name
/// (`dvdrental`) is kept as it is, so migrations started before any name was allowed keep their
/// slots. Any other (`dvd-rental`, `Prod Move 2026`) is lowercased with every other character
/// made `_`, shortened, and followed by a short hash of the name as typed, so two names that
/// sanitize alike (`dvd-rental`, `dvd_rental`) never share a slot.
pub fn name_stem(migration: &str) -> String {
    if is_plain(migration) {
        return migration.to_string();
    }
    let mut clean: String = migration
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    clean.truncate(39);
    let hash = hex::encode(&Sha256::digest(migration.as_bytes())[..4]);
    format!("{clean}_{hash}")
}

/// Replication slot names allow only `[a-z0-9_]`; slots are per server, so the database is part of
/// the name.
pub fn slot_name(migration: &str, database: &str) -> String {
    let migration = name_stem(migration);
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
    bounded(format!("pgferry_{}", name_stem(migration)))
}

/// The schema on each source database that holds the DDL capture's functions (`ddl = "replicate"`),
/// shared by every migration of that database (each has its own functions and event triggers in it).
pub const CAPTURE_SCHEMA: &str = "pgferry_capture";

/// The name of one object of a migration's DDL capture: its functions (`capture`, `trigger`) and
/// event triggers (`end`, `drop`).
pub fn capture_object_name(migration: &str, what: &str) -> String {
    bounded(format!("pgferry_ddl_{what}_{}", name_stem(migration)))
}

/// The fallback stream's slot on the target (see `stages::fallback`): the forward slot's name
/// with `_fb`, kept within 63 bytes.
pub fn fallback_slot_name(migration: &str, database: &str) -> String {
    bounded(format!("{}_fb", slot_name(migration, database)))
}

/// The fallback stream's publication on the target.
pub fn fallback_publication_name(migration: &str) -> String {
    bounded(format!("pgferry_{}_fb", name_stem(migration)))
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

    fn valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    #[test]
    fn any_migration_name_gives_valid_distinct_names() {
        // Plain names keep the names migrations always had.
        assert_eq!(name_stem("dvdrental"), "dvdrental");
        assert_eq!(
            slot_name("dvdrental", "app"),
            format!(
                "pgferry_dvdrental_app_{}",
                hex::encode(&Sha256::digest(b"app")[..3])
            )
        );
        let names = [
            "dvd-rental",
            "dvd_rental",
            "Dvd Rental",
            "Prod Move 2026",
            "prod move 2026",
            "prod_move_2026",
            "déménagement",
            "移行",
            &"x".repeat(200),
            &"y".repeat(300),
        ];
        let mut stems = std::collections::BTreeSet::new();
        let mut slots = std::collections::BTreeSet::new();
        let mut publications = std::collections::BTreeSet::new();
        for n in names {
            let stem = name_stem(n);
            assert!(valid(&stem) && stem.len() <= 48, "{n:?} -> {stem:?}");
            for o in [slot_name(n, "Sales DB"), publication_name(n)] {
                assert!(valid(&o), "{n:?} -> {o:?}");
            }
            stems.insert(stem);
            slots.insert(slot_name(n, "Sales DB"));
            publications.insert(publication_name(n));
        }
        assert_eq!(stems.len(), names.len(), "{stems:?}");
        assert_eq!(slots.len(), names.len(), "{slots:?}");
        assert_eq!(publications.len(), names.len(), "{publications:?}");
        assert!(name_stem("dvd-rental").starts_with("dvd_rental_"));
    }
}
