//! Comparing a source and a target database: every table's rows, every sequence, the large
//! objects and the schema.

use std::collections::BTreeMap;
use std::time::Instant;

use super::cluster::{Cluster, Pair, pair, row_digest};

/// Every ordinary table and partition, quoted for SQL, with its unquoted `schema.table` name as
/// pgferry reports it. (Read hex-encoded: names may hold newlines.)
pub fn tables(c: &Cluster, db: &str) -> Vec<(String, String)> {
    let hex = |s: &str| {
        String::from_utf8(hex::decode(s).expect("hex from the server")).expect("a UTF-8 name")
    };
    c.psql(
        db,
        "SELECT encode(convert_to(quote_ident(n.nspname) || '.' || quote_ident(c.relname), 'UTF8'), 'hex') || '|' || \
                encode(convert_to(n.nspname || '.' || c.relname, 'UTF8'), 'hex') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') \
           AND n.nspname NOT LIKE 'pg_toast%' ORDER BY quote_ident(n.nspname) || '.' || quote_ident(c.relname)",
    )
    .lines()
    .map(|l| {
        let (quoted, plain) = l.split_once('|').expect("quoted|plain");
        (hex(quoted), hex(plain))
    })
    .collect()
}

/// `last_value,is_called` of every sequence, by name.
pub fn sequences(c: &Cluster, db: &str) -> BTreeMap<String, String> {
    let names = c.psql(
        db,
        "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) FROM pg_sequences \
         WHERE schemaname <> 'pgferry' ORDER BY 1",
    );
    names
        .lines()
        .map(|seq| {
            let value = c.psql(
                db,
                &format!("SELECT last_value || ',' || is_called FROM {seq}"),
            );
            (seq.to_string(), value)
        })
        .collect()
}

pub const LARGE_OBJECTS: &str = "SELECT coalesce(string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid), '') \
                             FROM pg_largeobject_metadata";

/// `pg_dump --schema-only` of a database without pgferry's schema and the `\restrict` lines (they
/// carry a random key).
/// The server's version line is left out: two servers of different versions hold the same schema.
pub fn schema_dump(c: &Cluster, db: &str) -> String {
    super::cluster::strip_restrict(&c.run_tool(
        "pg_dump",
        db,
        &["--schema-only", "--exclude-schema=pgferry"],
    ))
    .lines()
    .filter(|l| !l.starts_with("-- Dumped from database version"))
    .collect::<Vec<_>>()
    .join("\n")
}

/// The first lines where two dumps differ, with a little context.
pub fn first_differences(a: &str, b: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let Some(at) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) else {
        return "no difference".into();
    };
    let from = at.saturating_sub(3);
    let show = |v: &[&str]| v[from.min(v.len())..(at + 8).min(v.len())].join("\n");
    format!(
        "{} vs {} lines; first difference at line {}\n--- source ---\n{}\n--- target ---\n{}",
        a.len(),
        b.len(),
        at + 1,
        show(&a),
        show(&b)
    )
}

/// What is compared of one database.
pub struct Snapshot {
    /// Every ordinary table and partition: (quoted, plain).
    pub tables: Vec<(String, String)>,
    /// `count:md5` of each table's rows ([`row_digest`]), in the order of `tables`.
    pub digests: Vec<String>,
    pub sequences: BTreeMap<String, String>,
    pub large_objects: String,
    pub schema: String,
}

impl Snapshot {
    /// Reads it all. The row digests of large tables take seconds, so callers read the source and the
    /// target at the same time.
    pub fn take(c: &Cluster, db: &str) -> Snapshot {
        let tables = tables(c, db);
        let digests = tables.iter().map(|(q, _)| row_digest(c, db, q)).collect();
        Snapshot {
            tables,
            digests,
            sequences: sequences(c, db),
            large_objects: c.psql(db, LARGE_OBJECTS),
            schema: schema_dump(c, db),
        }
    }

    /// The number of rows in the tables.
    pub fn total_rows(&self) -> i64 {
        self.digests
            .iter()
            .map(|d| d.split(':').next().unwrap().parse::<i64>().unwrap())
            .sum()
    }
}

/// (a) every table's rows, (b) every sequence, (c) the large objects and (d) the schema are equal
/// on both sides. Returns the source's snapshot.
pub fn assert_same(sdb: &str, tdb: &str) -> Snapshot {
    assert_same_on(pair(), sdb, tdb)
}

/// [`assert_same`] on a pair other than the shared one. Both schemas are printed by the newer
/// pg_dump of the two clusters' client tools. When the servers' major versions differ, the source's
/// schema as the target's server holds it is the reference (a server prints some definitions, such
/// as a view's query, in its own way): `pg_dump --schema-only` of the source loaded with psql into a
/// new database on the target server.
pub fn assert_same_on(p: &Pair, sdb: &str, tdb: &str) -> Snapshot {
    let started = Instant::now();
    let reference = (p.source.major != p.target.major).then(|| {
        let rdb = p.target.fresh_database("schema_reference");
        let mut dump = p.source.run_tool("pg_dump", sdb, &["--schema-only"]);
        if p.target.major < 17 {
            // pg_dump 17+ writes this setting, which older servers do not know.
            dump = dump.replace("SET transaction_timeout = 0;\n", "");
        }
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(file.path(), dump).expect("writing the dump");
        p.target.psql_file(&rdb, file.path());
        schema_dump(&p.target, &rdb)
    });
    let (mut source, target) = std::thread::scope(|scope| {
        let source = scope.spawn(|| Snapshot::take(&p.source, sdb));
        let target = scope.spawn(|| Snapshot::take(&p.target, tdb));
        (
            source.join().expect("reading the source"),
            target.join().expect("reading the target"),
        )
    });
    // (a) rows.
    assert!(
        source.tables.len() > 1,
        "the source has tables: {:?}",
        source.tables
    );
    assert_eq!(
        source.tables, target.tables,
        "the same tables on both sides"
    );
    for ((quoted, _), (s, t)) in source
        .tables
        .iter()
        .zip(source.digests.iter().zip(&target.digests))
    {
        assert_eq!(s, t, "table {quoted} differs (count:md5)");
    }
    assert!(source.total_rows() > 0, "the source has rows");
    // (b) sequences.
    assert!(!source.sequences.is_empty(), "the source has sequences");
    assert_eq!(
        source.sequences, target.sequences,
        "sequences (last_value,is_called) differ"
    );
    // (c) large objects.
    assert_eq!(
        source.large_objects, target.large_objects,
        "large objects differ"
    );
    // (d) the whole schema.
    assert!(source.schema.contains("CREATE TABLE"), "{}", source.schema);
    if let Some(reference) = reference {
        source.schema = reference;
    }
    assert!(
        source.schema == target.schema,
        "the target's schema differs from the source's: {}",
        first_differences(&source.schema, &target.schema)
    );
    eprintln!(
        "[test] {sdb} vs {tdb}: {} tables, {} rows, {} sequences, {} large object(s), {} schema lines equal ({:.2?})",
        source.tables.len(),
        source.total_rows(),
        source.sequences.len(),
        source
            .large_objects
            .split(',')
            .filter(|x| !x.is_empty())
            .count(),
        source.schema.lines().count(),
        started.elapsed()
    );
    source
}

/// Asserts that `table` holds the same rows in both databases; when it does not, the message shows
/// the rows only one side has (at most 20 of each), not only two digests.
pub fn assert_same_rows(source: &Cluster, sdb: &str, target: &Cluster, tdb: &str, table: &str) {
    let (a, b) = (
        row_digest(source, sdb, table),
        row_digest(target, tdb, table),
    );
    if a == b {
        return;
    }
    let sql = format!("SELECT t::text FROM {table} t ORDER BY 1");
    let (x, y) = (source.psql(sdb, &sql), target.psql(tdb, &sql));
    let (xs, ys): (Vec<&str>, Vec<&str>) = (x.lines().collect(), y.lines().collect());
    let only = |v: &[&str], other: &[&str]| -> String {
        v.iter()
            .filter(|l| !other.contains(l))
            .take(20)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    };
    panic!(
        "{table} differs: source {a}, target {b}\n--- only on the source ---\n{}\n--- only on the target ---\n{}",
        only(&xs, &ys),
        only(&ys, &xs)
    );
}
