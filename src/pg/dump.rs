//! pg_dump and pg_restore orchestration: filtering an archive's table of contents (TOC) down to the
//! tables a database entry selects. Running the programs (as cancellable child processes, in a
//! private temporary directory) is [`crate::pg::tools`]'s.
//!
//! # The TOC filtering rule
//!
//! The schema of a partial selection is the source schema minus what `DROP TABLE <every unselected
//! table> CASCADE` would remove, with two refinements that protect the selected tables:
//!
//! * Start from the unselected tables (a partition follows its root, see `catalog::select`) and
//!   follow `pg_depend` to everything that depends on them (normal, automatic, internal and
//!   partition dependencies), and from an object with an internal dependency to the object it is
//!   part of (a view's rewrite rule -> the view). That removes the tables' indexes, constraints,
//!   defaults, triggers, rules, policies, statistics, identity sequences, partitions and
//!   publication memberships; foreign keys that reference them; views and materialized views built
//!   on them (and views on those views); and functions whose signature uses their row type.
//! * A sequence merely OWNED BY a column of an unselected table is kept (it may feed a selected
//!   table's default); only its `SEQUENCE OWNED BY` entry goes.
//! * A foreign key of a SELECTED table that references an unselected table is dropped (reported).
//!   Anything else of a selected table that would have to go (a column whose type is an unselected
//!   table's row type, an inherited parent, a default, index, trigger, policy or check that uses a
//!   removed object) is an error: pgferry never silently changes a selected table.
//!
//! TOC entries are matched by their catalog id (`tableoid oid`, which `pg_restore -l` prints) when
//! they have one; ROW SECURITY entries by their table's oid; and the dependent entries that have
//! none (COMMENT, ACL, SECURITY LABEL, SEQUENCE OWNED BY, TABLE ATTACH, INDEX ATTACH) by their exact
//! `DESC SCHEMA TAG OWNER` text, built from the catalog the way pg_dump builds it. Everything else
//! (schemas, extensions, types, domains, functions, sequences, other views, ...) is kept. With no
//! unselected table nothing is dropped, except pgferry's own publication on the source (the one
//! `provision` creates for CDC), which never belongs on the target.
//!
//! The catalog is read in the transaction whose snapshot pg_dump uses (`--snapshot`), so the OIDs
//! the rule computes are exactly those of the archive.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::ident::QualifiedName;

/// System catalog OIDs (fixed in every PostgreSQL version).
const PG_CLASS: u32 = 1259;
const PG_CONSTRAINT: u32 = 2606;
const PG_PUBLICATION: u32 = 6104;
const PG_PUBLICATION_REL: u32 = 6106;
const PG_PUBLICATION_NAMESPACE: u32 = 6237;
const PG_EVENT_TRIGGER: u32 = 3466;
/// OIDs below this belong to initdb's objects; user objects start here.
const FIRST_NORMAL_OID: u32 = 16384;

// ----- the table of contents --------------------------------------------------------------------

/// One entry line of `pg_restore -l`: `ID; TABLEOID OID DESC SCHEMA TAG OWNER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    pub id: u32,
    pub tableoid: u32,
    pub oid: u32,
    /// `DESC SCHEMA TAG OWNER`, as printed.
    pub rest: String,
}

impl TocEntry {
    pub fn parse(line: &str) -> Option<TocEntry> {
        let (id, after) = line.split_once("; ")?;
        let id = id.trim().parse().ok()?;
        let mut parts = after.splitn(3, ' ');
        let tableoid = parts.next()?.parse().ok()?;
        let oid = parts.next()?.parse().ok()?;
        let rest = parts.next()?.to_string();
        Some(TocEntry {
            id,
            tableoid,
            oid,
            rest,
        })
    }

    /// The entry's kind (`TABLE`, `FK CONSTRAINT`, `SEQUENCE OWNED BY`, ...).
    pub fn desc(&self) -> &str {
        const MULTI: &[&str] = &[
            "MATERIALIZED VIEW DATA",
            "MATERIALIZED VIEW",
            "FK CONSTRAINT",
            "CHECK CONSTRAINT",
            "SEQUENCE OWNED BY",
            "SEQUENCE SET",
            "TABLE ATTACH",
            "TABLE DATA",
            "INDEX ATTACH",
            "ROW SECURITY",
            "DEFAULT ACL",
            "SECURITY LABEL",
            "PUBLICATION TABLES IN SCHEMA",
            "PUBLICATION TABLE",
            "LARGE OBJECT",
            "BLOB METADATA",
            "EVENT TRIGGER",
            "FOREIGN TABLE",
            "FOREIGN DATA WRAPPER",
            "FOREIGN SERVER",
            "USER MAPPING",
            "TEXT SEARCH CONFIGURATION",
            "TEXT SEARCH DICTIONARY",
            "TEXT SEARCH PARSER",
            "TEXT SEARCH TEMPLATE",
            "OPERATOR CLASS",
            "OPERATOR FAMILY",
            "ACCESS METHOD",
            "SHELL TYPE",
            "PROCEDURAL LANGUAGE",
            "STATISTICS DATA",
        ];
        for m in MULTI {
            if self.rest.starts_with(m) && self.rest[m.len()..].starts_with(' ') {
                return &self.rest[..m.len()];
            }
        }
        self.rest.split(' ').next().unwrap_or("")
    }
}

/// Which TOC entries to leave out. Built by [`analyze_selection`].
#[derive(Debug, Default, Clone)]
pub struct TocFilter {
    /// `(tableoid, oid)` of entries that go.
    pub catalog_ids: HashSet<(u32, u32)>,
    /// Tables whose `ROW SECURITY` entries go (printed as `0 <table oid>`).
    pub row_security: HashSet<u32>,
    /// The exact `DESC SCHEMA TAG OWNER` text of entries without a catalog id that go.
    pub lines: HashSet<String>,
}

impl TocFilter {
    pub fn is_empty(&self) -> bool {
        self.catalog_ids.is_empty() && self.row_security.is_empty() && self.lines.is_empty()
    }

    fn drops(&self, e: &TocEntry) -> bool {
        if e.tableoid != 0 {
            return self.catalog_ids.contains(&(e.tableoid, e.oid));
        }
        if e.oid != 0 && e.desc() == "ROW SECURITY" {
            return self.row_security.contains(&e.oid);
        }
        self.lines.contains(&e.rest)
    }
}

/// A filtered TOC, ready for `pg_restore -L`.
#[derive(Debug, Default)]
pub struct FilteredToc {
    /// The list with the dropped entries commented out (`;`).
    pub list: String,
    pub entries: usize,
    /// `DESC SCHEMA TAG OWNER` of every dropped entry.
    pub dropped: Vec<String>,
    /// Kept entries by kind.
    pub kept_by_desc: BTreeMap<String, usize>,
}

/// Comments out the entries `filter` drops; keeps comment lines and unknown lines as they are.
pub fn filter_toc(list: &str, filter: &TocFilter) -> FilteredToc {
    let mut out = FilteredToc::default();
    for line in list.lines() {
        if line.starts_with(';') || line.trim().is_empty() {
            out.list.push_str(line);
            out.list.push('\n');
            continue;
        }
        match TocEntry::parse(line) {
            Some(e) => {
                out.entries += 1;
                if filter.drops(&e) {
                    out.list.push(';');
                    out.dropped.push(e.rest.clone());
                } else {
                    *out.kept_by_desc.entry(e.desc().to_string()).or_default() += 1;
                }
            }
            None => out.entries += 1,
        }
        out.list.push_str(line);
        out.list.push('\n');
    }
    out
}

/// `pg_restore -l` replaces newlines in names with spaces; expected lines must too.
fn sanitize(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

// ----- the selection analysis -------------------------------------------------------------------

/// What the filtering removes beyond the unselected tables and what belongs to them.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SelectionReport {
    pub unselected_tables: usize,
    /// Foreign keys of selected tables that reference unselected tables.
    pub dropped_foreign_keys: Vec<String>,
    /// Views, functions and other objects that depend on unselected tables.
    pub dropped_objects: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Edge {
    classid: u32,
    objid: u32,
    refclassid: u32,
    refobjid: u32,
    deptype: u8,
}

type Obj = (u32, u32);

/// Works out what to leave out of the dump of a database, in the transaction whose snapshot
/// pg_dump will use: see the module documentation for the rule. `selected` and `unselected` are
/// the database's tables (partitions included); `own_publication` is pgferry's publication name.
pub async fn analyze_selection(
    client: &Client,
    selected: &[QualifiedName],
    unselected: &[QualifiedName],
    own_publication: &str,
) -> Result<(TocFilter, SelectionReport)> {
    let mut filter = TocFilter::default();
    let mut report = SelectionReport {
        unselected_tables: unselected.len(),
        ..Default::default()
    };

    // pgferry's own publication never goes to the target.
    let pub_rows = client
        .query(
            "SELECT p.oid, r.oid FROM pg_catalog.pg_publication p \
             LEFT JOIN pg_catalog.pg_publication_rel r ON r.prpubid = p.oid WHERE p.pubname = $1",
            &[&own_publication],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking up pgferry's publication"))?;
    for r in &pub_rows {
        filter
            .catalog_ids
            .insert((PG_PUBLICATION, r.get::<_, u32>(0)));
        if let Some(rel) = r.get::<_, Option<u32>>(1) {
            filter.catalog_ids.insert((PG_PUBLICATION_REL, rel));
        }
    }
    if !pub_rows.is_empty() {
        let has_ns: bool = client
            .query_one(
                "SELECT to_regclass('pg_catalog.pg_publication_namespace') IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| Error::pg(&e, "reading the catalog"))?
            .get(0);
        if has_ns {
            let rows = client
                .query(
                    "SELECT n.oid FROM pg_catalog.pg_publication_namespace n \
                     JOIN pg_catalog.pg_publication p ON p.oid = n.pnpubid WHERE p.pubname = $1",
                    &[&own_publication],
                )
                .await
                .map_err(|e| Error::pg(&e, "looking up pgferry's publication"))?;
            for r in &rows {
                filter
                    .catalog_ids
                    .insert((PG_PUBLICATION_NAMESPACE, r.get::<_, u32>(0)));
            }
        }
        let owner: String = client
            .query_one(
                "SELECT pg_catalog.pg_get_userbyid(pubowner)::text FROM pg_catalog.pg_publication WHERE pubname = $1",
                &[&own_publication],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking up pgferry's publication"))?
            .get(0);
        for desc in ["COMMENT", "SECURITY LABEL"] {
            filter.lines.insert(sanitize(&format!(
                "{desc} - PUBLICATION {} {owner}",
                crate::pg::ident::quote_ident(own_publication)
            )));
        }
    }

    // Nor do the DDL capture's event triggers (`ddl = "replicate"`; their functions live in a
    // schema pg_dump is told to leave out).
    let capture_rows = client
        .query(
            "SELECT oid FROM pg_catalog.pg_event_trigger WHERE evtname LIKE 'pgferry\\_ddl\\_%'",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking up pgferry's event triggers"))?;
    for r in &capture_rows {
        filter
            .catalog_ids
            .insert((PG_EVENT_TRIGGER, r.get::<_, u32>(0)));
    }

    if unselected.is_empty() {
        return Ok((filter, report));
    }

    let selected_oids: HashSet<u32> = resolve(client, selected).await?.into_iter().collect();
    let unselected_oids = resolve(client, unselected).await?;

    // The dependency graph of user objects.
    let rows = client
        .query(
            "SELECT classid, objid, refclassid, refobjid, deptype::text FROM pg_catalog.pg_depend \
             WHERE deptype IN ('n', 'a', 'i', 'P', 'S') AND objid >= $1 AND refobjid >= $1",
            &[&FIRST_NORMAL_OID],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading pg_depend"))?;
    let edges: Vec<Edge> = rows
        .iter()
        .map(|r| Edge {
            classid: r.get(0),
            objid: r.get(1),
            refclassid: r.get(2),
            refobjid: r.get(3),
            deptype: r.get::<_, String>(4).bytes().next().unwrap_or(b'n'),
        })
        .collect();
    let sequences: HashSet<u32> = client
        .query(
            "SELECT oid FROM pg_catalog.pg_class WHERE relkind = 'S'",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing sequences"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let foreign_keys: HashSet<u32> = client
        .query(
            "SELECT oid FROM pg_catalog.pg_constraint WHERE contype = 'f'",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing foreign keys"))?
        .iter()
        .map(|r| r.get(0))
        .collect();

    let closure = close_over(
        &edges,
        &unselected_oids,
        &selected_oids,
        &sequences,
        &foreign_keys,
    );

    if !closure.conflicts.is_empty() {
        let mut objs: Vec<Obj> = Vec::new();
        for (a, b) in &closure.conflicts {
            objs.push(*a);
            objs.push(*b);
        }
        let names = describe(client, &objs).await?;
        let mut needs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (a, b) in &closure.conflicts {
            let v = needs.entry(names[a].as_str()).or_default();
            if !v.contains(&names[b].as_str()) {
                v.push(names[b].as_str());
            }
        }
        let lines: Vec<String> = needs
            .iter()
            .map(|(a, bs)| format!("  - {a} depends on {}", bs.join(", ")))
            .collect();
        return Err(Error::permanent(format!(
            "the selection cannot be restored without tables it leaves out: {} selected object(s) depend on unselected tables (or on objects that depend on them):\n{}",
            lines.len(),
            lines.join("\n")
        ))
        .hint("add the tables they need to `tables` (or take them out of `exclude`), or leave out the selected tables that need them"));
    }

    // Report what goes beyond the unselected tables' own objects.
    let initial: HashSet<Obj> = unselected_oids.iter().map(|o| (PG_CLASS, *o)).collect();
    let mut part_of: HashSet<Obj> = HashSet::new();
    for e in &edges {
        if matches!(e.deptype, b'a' | b'i' | b'P' | b'S')
            && closure.dropped.contains(&(e.refclassid, e.refobjid))
        {
            part_of.insert((e.classid, e.objid));
        }
    }
    let fks: Vec<Obj> = closure.dropped_fks.iter().copied().collect();
    let standalone: Vec<Obj> = closure
        .dropped
        .iter()
        .filter(|o| {
            !initial.contains(o) && !part_of.contains(o) && !closure.dropped_fks.contains(o)
        })
        .copied()
        .collect();
    let names = describe(client, &[fks.clone(), standalone.clone()].concat()).await?;
    report.dropped_foreign_keys = sorted(fks.iter().map(|o| names[o].clone()));
    report.dropped_objects = sorted(standalone.iter().map(|o| names[o].clone()));

    // The TOC filter.
    for (class, oid) in &closure.dropped {
        filter.catalog_ids.insert((*class, *oid));
        if *class == PG_CLASS {
            filter.row_security.insert(*oid);
        }
    }
    let dropped: Vec<Obj> = closure.dropped.iter().copied().collect();
    let classids: Vec<u32> = dropped.iter().map(|o| o.0).collect();
    let objids: Vec<u32> = dropped.iter().map(|o| o.1).collect();
    let owned: Vec<u32> = closure.owned_sequences.iter().copied().collect();
    let rows = client
        .query(DEPENDENT_ENTRIES_SQL, &[&classids, &objids, &owned])
        .await
        .map_err(|e| Error::pg(&e, "reading the names of the objects to leave out"))?;
    for r in &rows {
        let desc: String = r.get(0);
        let schema: String = r.get(1);
        let tag: String = r.get(2);
        let owner: String = r.get(3);
        let schema = if schema.is_empty() {
            "-".into()
        } else {
            schema
        };
        if desc == "*" {
            for d in ["COMMENT", "ACL", "SECURITY LABEL"] {
                filter
                    .lines
                    .insert(sanitize(&format!("{d} {schema} {tag} {owner}")));
            }
        } else {
            filter
                .lines
                .insert(sanitize(&format!("{desc} {schema} {tag} {owner}")));
        }
    }
    Ok((filter, report))
}

/// The `DESC SCHEMA TAG OWNER` parts of the entries that hang off dropped objects without a
/// catalog id of their own. `*` stands for COMMENT, ACL and SECURITY LABEL, whose tags pg_dump
/// builds with quoted names (`TABLE "my table"`, `COLUMN t.c`, `CONSTRAINT c ON t`,
/// `FUNCTION f(a integer)`). Parameters: the dropped objects' class ids and object ids, and the
/// kept sequences whose OWNED BY entry goes.
const DEPENDENT_ENTRIES_SQL: &str = "
WITH d AS (SELECT * FROM unnest($1::oid[], $2::oid[]) AS d(classid, objid)),
rel AS (
    SELECT c.oid, n.nspname::text AS nsp, c.relname::text AS name, c.relkind::text AS kind,
           c.relispartition AS part, pg_catalog.pg_get_userbyid(c.relowner)::text AS owner
    FROM d JOIN pg_catalog.pg_class c ON d.classid = 'pg_catalog.pg_class'::regclass AND c.oid = d.objid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
)
SELECT '*', nsp,
       CASE kind WHEN 'v' THEN 'VIEW ' WHEN 'm' THEN 'MATERIALIZED VIEW ' WHEN 'i' THEN 'INDEX '
                 WHEN 'I' THEN 'INDEX ' WHEN 'S' THEN 'SEQUENCE ' WHEN 'f' THEN 'FOREIGN TABLE '
                 ELSE 'TABLE ' END || pg_catalog.quote_ident(name),
       owner
FROM rel
UNION ALL
SELECT '*', nsp, 'TABLE ' || pg_catalog.quote_ident(name), owner FROM rel WHERE kind IN ('v', 'm', 'f')
UNION ALL
SELECT '*', r.nsp, 'COLUMN ' || pg_catalog.quote_ident(r.name) || '.' || pg_catalog.quote_ident(a.attname::text), r.owner
FROM rel r JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE r.kind IN ('r', 'p', 'v', 'm', 'f')
UNION ALL
SELECT 'TABLE ATTACH', nsp, name, owner FROM rel WHERE part AND kind IN ('r', 'p', 'f')
UNION ALL
SELECT 'INDEX ATTACH', nsp, name, owner FROM rel WHERE part AND kind IN ('i', 'I')
UNION ALL
SELECT '*', n.nspname::text,
       'CONSTRAINT ' || pg_catalog.quote_ident(co.conname::text) || ' ON ' || pg_catalog.quote_ident(c.relname::text),
       pg_catalog.pg_get_userbyid(c.relowner)::text
FROM d JOIN pg_catalog.pg_constraint co ON d.classid = 'pg_catalog.pg_constraint'::regclass AND co.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = co.conrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT '*', n.nspname::text,
       'TRIGGER ' || pg_catalog.quote_ident(t.tgname::text) || ' ON ' || pg_catalog.quote_ident(c.relname::text),
       pg_catalog.pg_get_userbyid(c.relowner)::text
FROM d JOIN pg_catalog.pg_trigger t ON d.classid = 'pg_catalog.pg_trigger'::regclass AND t.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT '*', n.nspname::text,
       'RULE ' || pg_catalog.quote_ident(w.rulename::text) || ' ON ' || pg_catalog.quote_ident(c.relname::text),
       pg_catalog.pg_get_userbyid(c.relowner)::text
FROM d JOIN pg_catalog.pg_rewrite w ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND w.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = w.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT '*', n.nspname::text,
       'POLICY ' || pg_catalog.quote_ident(p.polname::text) || ' ON ' || pg_catalog.quote_ident(c.relname::text),
       pg_catalog.pg_get_userbyid(c.relowner)::text
FROM d JOIN pg_catalog.pg_policy p ON d.classid = 'pg_catalog.pg_policy'::regclass AND p.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT '*', n.nspname::text, k.kind || pg_catalog.quote_ident(p.proname::text) || '(' || pg_catalog.pg_get_function_identity_arguments(p.oid) || ')',
       pg_catalog.pg_get_userbyid(p.proowner)::text
FROM d JOIN pg_catalog.pg_proc p ON d.classid = 'pg_catalog.pg_proc'::regclass AND p.oid = d.objid
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
CROSS JOIN (VALUES ('FUNCTION '), ('PROCEDURE ')) AS k(kind)
UNION ALL
SELECT '*', n.nspname::text, CASE WHEN t.typtype = 'd' THEN 'DOMAIN ' ELSE 'TYPE ' END || pg_catalog.quote_ident(t.typname::text),
       pg_catalog.pg_get_userbyid(t.typowner)::text
FROM d JOIN pg_catalog.pg_type t ON d.classid = 'pg_catalog.pg_type'::regclass AND t.oid = d.objid
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
UNION ALL
SELECT '*', n.nspname::text, 'STATISTICS ' || pg_catalog.quote_ident(s.stxname::text),
       pg_catalog.pg_get_userbyid(s.stxowner)::text
FROM d JOIN pg_catalog.pg_statistic_ext s ON d.classid = 'pg_catalog.pg_statistic_ext'::regclass AND s.oid = d.objid
JOIN pg_catalog.pg_namespace n ON n.oid = s.stxnamespace
UNION ALL
SELECT 'SEQUENCE OWNED BY', n.nspname::text, c.relname::text, pg_catalog.pg_get_userbyid(c.relowner)::text
FROM unnest($3::oid[]) AS s(oid) JOIN pg_catalog.pg_class c ON c.oid = s.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
";

/// The OIDs of tables given by name.
async fn resolve(client: &Client, names: &[QualifiedName]) -> Result<Vec<u32>> {
    let schemas: Vec<&str> = names.iter().map(|n| n.schema.as_str()).collect();
    let rels: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT c.oid FROM unnest($1::text[], $2::text[]) AS u(s, r) \
             JOIN pg_catalog.pg_namespace n ON n.nspname = u.s \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.r",
            &[&schemas, &rels],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking up tables"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// `pg_describe_object` of each object (`table public.c`, `view public.v`, ...).
async fn describe(client: &Client, objs: &[Obj]) -> Result<HashMap<Obj, String>> {
    let classids: Vec<u32> = objs.iter().map(|o| o.0).collect();
    let objids: Vec<u32> = objs.iter().map(|o| o.1).collect();
    let rows = client
        .query(
            "SELECT d.classid, d.objid, pg_catalog.pg_describe_object(d.classid, d.objid, 0) \
             FROM unnest($1::oid[], $2::oid[]) AS d(classid, objid)",
            &[&classids, &objids],
        )
        .await
        .map_err(|e| Error::pg(&e, "describing objects"))?;
    let mut out = HashMap::new();
    for r in &rows {
        let key: Obj = (r.get(0), r.get(1));
        let name: Option<String> = r.get(2);
        out.insert(
            key,
            name.unwrap_or_else(|| format!("object {} of catalog {}", key.1, key.0)),
        );
    }
    for o in objs {
        out.entry(*o)
            .or_insert_with(|| format!("object {} of catalog {}", o.1, o.0));
    }
    Ok(out)
}

fn sorted(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = it.collect();
    v.sort();
    v.dedup();
    v
}

/// The outcome of following the dependencies of the unselected tables.
#[derive(Debug, Default)]
struct Closure {
    dropped: HashSet<Obj>,
    /// Foreign keys of selected tables that reference a dropped object (also in `dropped`).
    dropped_fks: HashSet<Obj>,
    /// Sequences kept although they are OWNED BY a dropped column.
    owned_sequences: HashSet<u32>,
    /// (object of a selected table, the dropped object it needs).
    conflicts: Vec<(Obj, Obj)>,
}

/// The dependency walk of the module documentation, on an in-memory `pg_depend`.
fn close_over(
    edges: &[Edge],
    unselected: &[u32],
    selected: &HashSet<u32>,
    sequences: &HashSet<u32>,
    foreign_keys: &HashSet<u32>,
) -> Closure {
    let mut dependents: HashMap<Obj, Vec<usize>> = HashMap::new();
    let mut outgoing: HashMap<Obj, Vec<usize>> = HashMap::new();
    for (i, e) in edges.iter().enumerate() {
        dependents
            .entry((e.refclassid, e.refobjid))
            .or_default()
            .push(i);
        outgoing.entry((e.classid, e.objid)).or_default().push(i);
    }
    // The selected table an object belongs to (automatic, internal or partition dependency).
    let belongs_to_selected = |o: Obj| -> bool {
        outgoing.get(&o).is_some_and(|v| {
            v.iter().any(|&i| {
                let e = &edges[i];
                matches!(e.deptype, b'a' | b'i' | b'S')
                    && e.refclassid == PG_CLASS
                    && selected.contains(&e.refobjid)
            })
        })
    };
    let is_selected_table = |o: Obj| o.0 == PG_CLASS && selected.contains(&o.1);

    let mut c = Closure::default();
    let mut queue: Vec<Obj> = Vec::new();
    for oid in unselected {
        if c.dropped.insert((PG_CLASS, *oid)) {
            queue.push((PG_CLASS, *oid));
        }
    }
    while let Some(x) = queue.pop() {
        let mut next: Vec<(Obj, u8)> = Vec::new();
        // What depends on x.
        for &i in dependents.get(&x).map(Vec::as_slice).unwrap_or(&[]) {
            let e = &edges[i];
            next.push(((e.classid, e.objid), e.deptype));
        }
        // What x is an internal part of (a view's rule -> the view).
        for &i in outgoing.get(&x).map(Vec::as_slice).unwrap_or(&[]) {
            let e = &edges[i];
            if e.deptype == b'i' {
                next.push(((e.refclassid, e.refobjid), b'I'));
            }
        }
        for (o, deptype) in next {
            if c.dropped.contains(&o) {
                continue;
            }
            if is_selected_table(o) {
                c.conflicts.push((o, x));
                continue;
            }
            if o.0 == PG_CLASS && sequences.contains(&o.1) && deptype == b'a' {
                c.owned_sequences.insert(o.1);
                continue;
            }
            if belongs_to_selected(o) {
                if o.0 == PG_CONSTRAINT && foreign_keys.contains(&o.1) {
                    c.dropped_fks.insert(o);
                    c.dropped.insert(o);
                    queue.push(o);
                } else {
                    c.conflicts.push((o, x));
                }
                continue;
            }
            c.dropped.insert(o);
            queue.push(o);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOC: &str = "\
;
; Archive created at 2026-01-01 00:00:00 UTC
;
; Selected TOC Entries:
;
217; 1259 16396 TABLE public c postgres
3413; 0 0 COMMENT public TABLE c postgres
3415; 0 0 ACL public TABLE c postgres
215; 1259 16387 TABLE public a postgres
3417; 0 0 SEQUENCE OWNED BY public cs postgres
216; 1259 16395 SEQUENCE public c_id_seq postgres
225; 1259 16457 TABLE public my table odd owner
3419; 0 0 COMMENT public TABLE \"my table\" odd owner
3233; 0 0 TABLE ATTACH public p1 postgres
3254; 2606 16415 FK CONSTRAINT public b b_c_id_fkey postgres
3402; 0 16396 ROW SECURITY public c postgres
3403; 0 16387 ROW SECURITY public a postgres
";

    #[test]
    fn parses_entries() {
        let e = TocEntry::parse("3254; 2606 16415 FK CONSTRAINT public b b_c_id_fkey postgres")
            .unwrap();
        assert_eq!((e.id, e.tableoid, e.oid), (3254, 2606, 16415));
        assert_eq!(e.desc(), "FK CONSTRAINT");
        assert_eq!(e.rest, "FK CONSTRAINT public b b_c_id_fkey postgres");
        let e = TocEntry::parse("3417; 0 0 SEQUENCE OWNED BY public cs postgres").unwrap();
        assert_eq!(e.desc(), "SEQUENCE OWNED BY");
        let e = TocEntry::parse("216; 1259 16395 SEQUENCE public c_id_seq postgres").unwrap();
        assert_eq!(e.desc(), "SEQUENCE");
        assert!(TocEntry::parse("; comment").is_none());
    }

    #[test]
    fn filters_by_catalog_id_row_security_and_text() {
        let mut f = TocFilter::default();
        f.catalog_ids.insert((1259, 16396));
        f.catalog_ids.insert((2606, 16415));
        f.row_security.insert(16396);
        f.lines.insert("COMMENT public TABLE c postgres".into());
        f.lines.insert("ACL public TABLE c postgres".into());
        f.lines
            .insert("SEQUENCE OWNED BY public cs postgres".into());
        f.lines.insert("TABLE ATTACH public p1 postgres".into());
        let out = filter_toc(TOC, &f);
        assert_eq!(out.entries, 12);
        assert_eq!(out.dropped.len(), 7, "{:?}", out.dropped);
        // Comment lines stay; dropped entries are commented out; the rest is untouched.
        assert!(out.list.starts_with(";\n; Archive created"));
        assert!(
            out.list
                .contains("\n;217; 1259 16396 TABLE public c postgres\n")
        );
        assert!(
            out.list
                .contains("\n;3402; 0 16396 ROW SECURITY public c postgres\n")
        );
        assert!(
            out.list
                .contains("\n3403; 0 16387 ROW SECURITY public a postgres\n")
        );
        assert!(
            out.list
                .contains("\n215; 1259 16387 TABLE public a postgres\n")
        );
        assert!(
            out.list
                .contains("\n3419; 0 0 COMMENT public TABLE \"my table\" odd owner\n")
        );
        assert_eq!(out.kept_by_desc.get("TABLE"), Some(&2));
        assert_eq!(out.kept_by_desc.get("SEQUENCE"), Some(&1));
        // No filter keeps everything.
        let all = filter_toc(TOC, &TocFilter::default());
        assert!(all.dropped.is_empty());
        assert_eq!(all.list, TOC);
    }

    fn edge(classid: u32, objid: u32, refclassid: u32, refobjid: u32, deptype: u8) -> Edge {
        Edge {
            classid,
            objid,
            refclassid,
            refobjid,
            deptype,
        }
    }

    #[test]
    fn dependency_walk() {
        const PG_INDEX_REL: u32 = PG_CLASS;
        const PG_REWRITE: u32 = 2618;
        const PG_PROC: u32 = 1255;
        const PG_TYPE: u32 = 1247;
        const PG_ATTRDEF: u32 = 2604;
        // Tables: a=100 (selected), b=101 (selected), c=102 (unselected).
        let edges = vec![
            edge(PG_INDEX_REL, 200, PG_CLASS, 102, b'a'), // index on c
            edge(PG_CONSTRAINT, 300, PG_CLASS, 101, b'a'), // FK of b ...
            edge(PG_CONSTRAINT, 300, PG_CLASS, 102, b'n'), // ... referencing c
            edge(PG_REWRITE, 400, PG_CLASS, 102, b'n'),   // view rule over c
            edge(PG_REWRITE, 400, PG_CLASS, 401, b'i'),   // ... of view 401
            edge(PG_REWRITE, 410, PG_CLASS, 401, b'n'),   // view 411 over view 401
            edge(PG_REWRITE, 410, PG_CLASS, 411, b'i'),
            edge(PG_TYPE, 500, PG_CLASS, 102, b'i'), // c's row type
            edge(PG_PROC, 600, PG_TYPE, 500, b'n'),  // function returning SETOF c
            edge(PG_CLASS, 700, PG_CLASS, 102, b'a'), // serial sequence owned by c
            edge(PG_ATTRDEF, 800, PG_CLASS, 100, b'a'), // a's default ...
            edge(PG_ATTRDEF, 800, PG_CLASS, 700, b'n'), // ... uses that sequence
            edge(PG_CLASS, 701, PG_CLASS, 102, b'i'), // identity sequence of c
        ];
        let selected: HashSet<u32> = [100, 101].into();
        let sequences: HashSet<u32> = [700, 701].into();
        let fks: HashSet<u32> = [300].into();
        let c = close_over(&edges, &[102], &selected, &sequences, &fks);
        assert!(c.conflicts.is_empty(), "{:?}", c.conflicts);
        for o in [
            (PG_CLASS, 102),
            (PG_CLASS, 200),
            (PG_CONSTRAINT, 300),
            (PG_REWRITE, 400),
            (PG_CLASS, 401),
            (PG_CLASS, 411),
            (PG_TYPE, 500),
            (PG_PROC, 600),
            (PG_CLASS, 701),
        ] {
            assert!(c.dropped.contains(&o), "{o:?} should be dropped");
        }
        assert!(
            !c.dropped.contains(&(PG_CLASS, 700)),
            "owned sequence is kept"
        );
        assert!(!c.dropped.contains(&(PG_ATTRDEF, 800)));
        assert!(!c.dropped.contains(&(PG_CLASS, 100)));
        assert_eq!(c.owned_sequences, [700].into());
        assert_eq!(c.dropped_fks, [(PG_CONSTRAINT, 300)].into());

        // A selected table with a column of c's row type cannot be restored without c.
        let mut edges2 = edges.clone();
        edges2.push(edge(PG_CLASS, 100, PG_TYPE, 500, b'n'));
        // A trigger of b whose function goes with c.
        edges2.push(edge(2620, 900, PG_CLASS, 101, b'a'));
        edges2.push(edge(2620, 900, PG_PROC, 600, b'n'));
        let c = close_over(&edges2, &[102], &selected, &sequences, &fks);
        let mut conflicts: Vec<Obj> = c.conflicts.iter().map(|(a, _)| *a).collect();
        conflicts.sort();
        assert_eq!(conflicts, vec![(PG_CLASS, 100), (2620, 900)]);
    }
}
