//! The tables to compare, read from the source inside its snapshot: leaf tables (partitions are
//! compared one by one, selected through their root), their columns in order (generated ones
//! flagged), and the key chunks follow: the primary key, else the narrowest unique index whose
//! columns are all NOT NULL (non-partial, no expressions).

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::ident::{QualifiedName, quote_ident};
use crate::select::Selection;

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub generated: bool,
}

/// One table to compare.
#[derive(Debug, Clone)]
pub struct ValTable {
    pub name: QualifiedName,
    pub root: Option<QualifiedName>,
    pub columns: Vec<Column>,
    /// Key columns, in index order; empty when the table has no usable key.
    pub key: Vec<String>,
    /// The SQL type of the first key column (`format_type`, schema-qualified when not visible).
    pub key_type: Option<String>,
    /// Main fork size and row estimate, for chunking and for scheduling large tables first.
    pub bytes: i64,
    pub estimated_rows: i64,
    /// How closely the first key column follows the physical row order (`pg_stats.correlation`,
    /// -1 to 1), when the table has been analyzed.
    pub key_correlation: Option<f32>,
}

impl ValTable {
    /// The columns compared: all, or all but the generated ones.
    pub fn compared(&self, exclude_generated: bool) -> Vec<&str> {
        self.columns
            .iter()
            .filter(|c| !(exclude_generated && c.generated))
            .map(|c| c.name.as_str())
            .collect()
    }

    /// `ROW("a", "b", ...)::text`: the row's text as both servers print it under the same
    /// settings.
    pub fn row_text(&self, exclude_generated: bool) -> String {
        let cols: Vec<String> = self
            .compared(exclude_generated)
            .iter()
            .map(|c| quote_ident(c))
            .collect();
        if cols.is_empty() {
            // A table without columns: every row prints alike.
            "'()'::text".to_string()
        } else {
            format!("ROW({})::text", cols.join(", "))
        }
    }

    /// `json_build_object('a', "a", ...)::text`: the key as JSON text, identical on both sides.
    pub fn key_json(&self) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{}, {}", crate::pg::ident::quote_literal(k), quote_ident(k)))
            .collect();
        format!("pg_catalog.json_build_object({})::text", parts.join(", "))
    }

    /// `"a", "b"` for ORDER BY.
    pub fn key_list(&self) -> String {
        self.key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The leaf tables of the source database that `selection` selects, largest first. Run in a
/// session with `search_path = ''` so type names come out schema-qualified.
pub async fn list(
    client: &Client,
    skip_schema: &str,
    selection: &Selection,
) -> Result<Vec<ValTable>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, rn.nspname::text, rc.relname::text, \
                    coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a \
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'), \
                    coalesce((SELECT array_agg(a.attgenerated <> '' ORDER BY a.attnum) FROM pg_catalog.pg_attribute a \
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'), \
                    k.cols, k.typ, pg_catalog.pg_relation_size(c.oid), c.reltuples::bigint, \
                    (SELECT s.correlation FROM pg_catalog.pg_stats s \
                      WHERE s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = k.cols[1] \
                      LIMIT 1) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_class rc ON c.relispartition AND rc.oid = pg_catalog.pg_partition_root(c.oid) \
             LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace \
             LEFT JOIN LATERAL ( \
                 SELECT (SELECT array_agg(a.attname::text ORDER BY o.ord) \
                           FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS o(att, ord) \
                           JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = o.att) AS cols, \
                        (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a \
                          WHERE a.attrelid = c.oid AND a.attnum = i.indkey[0]) AS typ \
                 FROM pg_catalog.pg_index i \
                 WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indpred IS NULL \
                   AND i.indexprs IS NULL AND i.indnkeyatts = i.indnatts \
                   AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) AS u(att) \
                                   JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.att \
                                   WHERE NOT a.attnotnull) \
                 ORDER BY i.indisprimary DESC, i.indnatts, i.indexrelid \
                 LIMIT 1) k ON true \
             WHERE c.relkind = 'r' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
               AND n.nspname <> $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                               WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY pg_catalog.pg_relation_size(c.oid) DESC, 1, 2",
            &[&skip_schema],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing the tables to compare"))?;
    let mut out = Vec::new();
    for r in &rows {
        let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let root = match (r.get::<_, Option<String>>(2), r.get::<_, Option<String>>(3)) {
            (Some(s), Some(n)) => Some(QualifiedName::new(s, n)),
            _ => None,
        };
        let sel = root.as_ref().unwrap_or(&name);
        if !selection.selects(&sel.schema, &sel.name) {
            continue;
        }
        let names: Vec<String> = r.get(4);
        let generated: Vec<bool> = r.get(5);
        let columns = names
            .into_iter()
            .zip(generated.into_iter().chain(std::iter::repeat(false)))
            .map(|(name, generated)| Column { name, generated })
            .collect();
        out.push(ValTable {
            name,
            root,
            columns,
            key: r.get::<_, Option<Vec<String>>>(6).unwrap_or_default(),
            key_type: r.get(7),
            bytes: r.get(8),
            estimated_rows: r.get(9),
            key_correlation: r.get(10),
        });
    }
    Ok(out)
}

/// Whether the target has the table, and the columns it lacks.
pub async fn target_columns(client: &Client, table: &QualifiedName) -> Result<Option<Vec<String>>> {
    let row = client
        .query_one(
            "SELECT c.oid IS NOT NULL, \
                    coalesce((SELECT array_agg(a.attname::text) FROM pg_catalog.pg_attribute a \
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}') \
             FROM (SELECT (SELECT c.oid FROM pg_catalog.pg_class c \
                           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                           WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')) AS oid) c",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("looking up table {table} on the target")))?;
    if row.get::<_, bool>(0) {
        Ok(Some(row.get(1)))
    } else {
        Ok(None)
    }
}
