//! What a pgferry publication holds and the statement that creates it, shared by the forward
//! publication on the source (`provision`) and the reverse one on the target (`fallback`).

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::catalog::TableInfo;
use crate::pg::ident::quote_ident;

/// The quoted names to publish among `tables`: never unlogged tables (logical decoding does not
/// carry them); partitioned tables by their root where the server can (`by_root`, see
/// [`crate::pg::version::ServerVersion::publishes_partitioned_tables`]), else each leaf.
pub fn tables_to_publish(tables: &[TableInfo], by_root: bool) -> Vec<String> {
    tables
        .iter()
        .filter(|t| !t.unlogged)
        .filter(|t| {
            if by_root {
                t.root.is_none()
            } else {
                t.kind == "r"
            }
        })
        .map(|t| t.name.quoted())
        .collect()
}

/// The `WITH (...)` options of a pgferry publication.
pub fn options(by_root: bool) -> &'static str {
    if by_root {
        "publish = 'insert, update, delete, truncate', publish_via_partition_root = true"
    } else {
        "publish = 'insert, update, delete, truncate'"
    }
}

/// `CREATE PUBLICATION` for `name` publishing `tables` (quoted names; none: an empty publication).
pub fn create_sql(name: &str, tables: &[String], by_root: bool) -> String {
    let q = quote_ident(name);
    let options = options(by_root);
    if tables.is_empty() {
        format!("CREATE PUBLICATION {q} WITH ({options})")
    } else {
        format!(
            "CREATE PUBLICATION {q} FOR TABLE {} WITH ({options})",
            tables.join(", ")
        )
    }
}

/// Whether publication `name` exists in the database of `client`; `what` names it in an error.
pub async fn exists(client: &Client, name: &str, what: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("looking up {what}")))?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_sql_quotes_and_lists() {
        assert_eq!(
            create_sql("p\"x", &[], false),
            "CREATE PUBLICATION \"p\"\"x\" WITH (publish = 'insert, update, delete, truncate')"
        );
        assert_eq!(
            create_sql("p", &["public.a".into(), "public.b".into()], true),
            "CREATE PUBLICATION \"p\" FOR TABLE public.a, public.b WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = true)"
        );
    }
}
