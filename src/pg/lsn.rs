//! A WAL position (`XLogRecPtr`, SQL type `pg_lsn`): the one type LSNs have wherever they cross a
//! boundary — the replication protocol, the checkpoint store (positions), stage checkpoints and
//! artifacts (serde, as text), and what stages hand each other. Parsed once, where it enters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// A WAL position (`XLogRecPtr`). Displays as PostgreSQL does, `16/B374D848`; parses that form
/// (any case, with or without zero padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: no position. As a start position it means "where the slot left off".
    pub const INVALID: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Lsn, Error> {
        let invalid = || {
            Error::permanent(format!("invalid LSN `{s}`"))
                .hint("an LSN is two hexadecimal numbers separated by a slash, such as 16/B374D848")
        };
        let (hi, lo) = s.split_once('/').ok_or_else(invalid)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            u32::from_str_radix(p, 16).map_err(|_| invalid())
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Lsn {
        Lsn(v)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse()
            .map_err(|e: Error| serde::de::Error::custom(e.message))
    }
}

/// As a query parameter, an LSN is its text (`$1::text::pg_lsn` in SQL).
impl tokio_postgres::types::ToSql for Lsn {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.to_string().to_sql(ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <String as tokio_postgres::types::ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The server's current WAL insert position (`pg_current_wal_insert_lsn()`; every commit so far is
/// before it). A primary only.
pub async fn current_insert_lsn(client: &tokio_postgres::Client) -> Result<Lsn, Error> {
    client
        .query_one("SELECT pg_catalog.pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| Error::pg(&e, "reading the source's WAL position"))?
        .get::<_, String>(0)
        .parse()
}

/// Parses an LSN a query returned as text (`lsn::text`); `None` for NULL.
pub fn parse_opt(text: Option<String>) -> Result<Option<Lsn>, Error> {
    text.map(|s| s.parse()).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_formats_parses_and_orders() {
        let l = Lsn(0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), l);
        assert_eq!("16/b374d848".parse::<Lsn>().unwrap(), l);
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::INVALID);
        assert_eq!(Lsn::INVALID.to_string(), "0/0");
        assert_eq!("0/000001A0".parse::<Lsn>().unwrap(), Lsn(0x1A0));
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "12",
            "1/2/3",
            "g/1",
            "1/123456789",
            "+1/2",
            " 1/2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
        assert!(Lsn(0x1_0000_0000) > Lsn(0xFFFF_FFFF));
        assert!("1/0".parse::<Lsn>().unwrap() > "0/FFFFFFFF".parse::<Lsn>().unwrap());
    }

    #[test]
    fn lsn_serializes_as_text() {
        let l = Lsn(0x16_B374_D848);
        assert_eq!(
            serde_json::to_value(l).unwrap(),
            serde_json::json!("16/B374D848")
        );
        let back: Lsn = serde_json::from_value(serde_json::json!("16/b374d848")).unwrap();
        assert_eq!(back, l);
        assert!(serde_json::from_value::<Lsn>(serde_json::json!("nope")).is_err());
    }
}
