//! Copying large objects (`pg_largeobject`): logical decoding does not carry them, so full_load
//! copies them from its snapshot and the cutover copies them again once the source is fenced.
//! Each object is read whole (`lo_get`) and written whole (`lo_from_bytea`): fine for the
//! documents and images large objects usually hold, not for multi-gigabyte ones.

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pg::ident::quote_ident;

/// Makes the target's large objects those of the source (data and owner, when the owner exists on
/// the target): replaces every source object, removes target objects the source does not have.
/// One target transaction. Returns (objects, bytes) copied.
pub async fn copy_all(
    source: &Client,
    target: &Client,
    cancel: &CancellationToken,
) -> Result<(u64, u64)> {
    let oids: Vec<(u32, String)> = source
        .query("SELECT m.oid, r.rolname::text FROM pg_catalog.pg_largeobject_metadata m JOIN pg_catalog.pg_roles r ON r.oid = m.lomowner ORDER BY 1", &[])
        .await
        .map_err(|e| Error::pg(&e, "listing large objects"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    target
        .batch_execute("BEGIN")
        .await
        .map_err(|e| Error::pg(&e, "starting the large object copy"))?;
    let keep: Vec<u32> = oids.iter().map(|o| o.0).collect();
    target
        .execute(
            "SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata WHERE oid <> ALL($1::oid[])",
            &[&keep],
        )
        .await
        .map_err(|e| Error::pg(&e, "removing large objects the source does not have"))?;
    let mut bytes = 0u64;
    for (oid, owner) in &oids {
        if cancel.is_cancelled() {
            return Err(Error::interrupted());
        }
        let data: Vec<u8> = source
            .query_one("SELECT pg_catalog.lo_get($1)", &[oid])
            .await
            .map_err(|e| Error::pg(&e, format!("reading large object {oid}")))?
            .get(0);
        bytes += data.len() as u64;
        target
            .execute("SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata WHERE oid = $1", &[oid])
            .await
            .map_err(|e| Error::pg(&e, format!("replacing large object {oid}")))?;
        target
            .execute("SELECT pg_catalog.lo_from_bytea($1, $2)", &[oid, &data])
            .await
            .map_err(|e| Error::pg(&e, format!("writing large object {oid}")))?;
        let owner_exists: bool = target
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
                &[owner],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking up a role"))?
            .get(0);
        if owner_exists {
            target
                .batch_execute(&format!(
                    "ALTER LARGE OBJECT {oid} OWNER TO {}",
                    quote_ident(owner)
                ))
                .await
                .map_err(|e| Error::pg(&e, format!("setting the owner of large object {oid}")))?;
        }
    }
    target
        .batch_execute("COMMIT")
        .await
        .map_err(|e| Error::pg(&e, "committing the large objects"))?;
    Ok((oids.len() as u64, bytes))
}
