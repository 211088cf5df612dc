//! Everything that speaks to PostgreSQL: connections, catalog queries, identifier quoting and the
//! names of the objects pgferry creates on servers.

pub mod catalog;
pub mod cluster;
pub mod connect;
pub mod copy;
pub mod dump;
pub mod event_trigger;
pub mod ident;
pub mod large_objects;
pub mod lsn;
pub mod names;
pub mod pgoutput;
pub mod post_data_script;
pub mod privileges;
pub mod publication;
pub mod replication;
pub mod sql_lexer;
pub mod tools;
pub mod version;
pub mod wire;
