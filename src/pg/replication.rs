//! The replication protocol on a [`WireClient`] session opened with `replication=database`:
//! creating a logical slot that exports its snapshot (which must stay open while the full load
//! imports that snapshot), dropping slots, and streaming changes from a slot with the pgoutput
//! plugin. The session itself (transport, TLS, authentication, framing, simple queries) is
//! [`crate::pg::wire`].
//!
//! Streaming: [`ReplicationClient::start_replication`] enters copy-both mode;
//! [`ReplicationClient::next_message`] then yields one decoded message at a time (a transaction of
//! any size is never held whole: each change is its own CopyData message, decoded and handed over
//! before the next is read); [`ReplicationClient::send_status`] reports progress, which is what lets
//! the server advance the slot and answer its keepalives; [`WireClient::stop_replication`]
//! returns the session to command mode.
//!
//! Cancellation: `next_message` is cancellation-safe (bytes read stay buffered, and a message is
//! taken out of the buffer only when it is returned), so it can sit in a `tokio::select!`.

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::{backend, frontend};

use super::wire::{COPY_BOTH_RESPONSE_TAG, Mode};
use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;
use crate::pg::ident::quote_ident;
use crate::pg::lsn::Lsn;
use crate::pg::pgoutput::{
    self, Decoder, PgOutputMessage, PrimaryKeepalive, StandbyStatusUpdate, StreamMessage, XLogData,
};
use crate::pg::version::ServerVersion;
pub use crate::pg::wire::{Row, WireClient};

/// A session in replication mode: a [`WireClient`] opened by [`ReplicationClient::connect`].
pub type ReplicationClient = WireClient;

/// A logical slot just created, with the snapshot it exported.
#[derive(Debug, Clone)]
pub struct SlotSnapshot {
    pub slot_name: String,
    /// The LSN from which the slot decodes; the snapshot shows exactly the data committed before it.
    pub consistent_point: Lsn,
    /// The exported snapshot, valid while this session stays idle and open.
    pub snapshot_name: String,
}

/// What to ask pgoutput for in `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOptions {
    /// The publications whose tables are streamed (at least one).
    pub publications: Vec<String>,
    /// Also send logical decoding messages (`pg_logical_emit_message`); PostgreSQL 14 and later.
    pub messages: bool,
    /// Leave out changes written under a replication origin (pgoutput's `origin = 'none'`);
    /// PostgreSQL 16 and later.
    pub origin_none: bool,
}

impl StreamOptions {
    pub fn new(publication: &str) -> StreamOptions {
        StreamOptions {
            publications: vec![publication.to_string()],
            messages: false,
            origin_none: false,
        }
    }
}

/// A message from a replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// One pgoutput message with its WAL positions.
    XLogData(XLogData<PgOutputMessage>),
    /// The server's heartbeat; when `reply_requested`, answer with [`ReplicationClient::send_status`]
    /// soon, or the server ends the session after `wal_sender_timeout`.
    Keepalive(PrimaryKeepalive),
}

impl WireClient {
    /// Opens a `replication=database` session to the endpoint's database.
    pub async fn connect(conn: &ConnInfo, purpose: &str) -> Result<ReplicationClient> {
        Self::open(conn, purpose, true).await
    }

    /// Creates a logical slot with the pgoutput plugin and exports its snapshot. The snapshot stays
    /// usable (`SET TRANSACTION SNAPSHOT`) while this session is open and runs nothing else.
    pub async fn create_slot(&mut self, name: &str, temporary: bool) -> Result<SlotSnapshot> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" }
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::permanent("CREATE_REPLICATION_SLOT returned no row"))?;
        let get = |c: &str| {
            row.get(c)
                .map(str::to_string)
                .ok_or_else(|| Error::permanent(format!("CREATE_REPLICATION_SLOT returned no {c}")))
        };
        Ok(SlotSnapshot {
            slot_name: get("slot_name")?,
            consistent_point: get("consistent_point")?.parse()?,
            snapshot_name: get("snapshot_name")?,
        })
    }

    /// Drops a replication slot. Without `wait`, fails if another session is using the slot; with
    /// it (PostgreSQL 13 and later), waits until that session releases it.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<()> {
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name),
            if wait { " WAIT" } else { "" }
        );
        self.simple_query(&sql).await.map(|_| ())
    }

    /// Starts streaming `slot` from `start` (`Lsn::INVALID`: where the slot's confirmed position
    /// is) with pgoutput protocol version 1, for the tables of `publication`.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<()> {
        self.start_replication_with(slot, start, &StreamOptions::new(publication))
            .await
    }

    /// [`ReplicationClient::start_replication`] with more options.
    pub async fn start_replication_with(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &StreamOptions,
    ) -> Result<()> {
        let proto = self
            .version
            .map_or(1, ServerVersion::pgoutput_proto_version);
        if options.messages && !self.version.is_some_and(ServerVersion::pgoutput_messages) {
            return Err(Error::permanent(format!(
                "{} cannot send logical decoding messages in the stream (pgoutput's `messages` option is PostgreSQL 14+)",
                self.describe
            )));
        }
        if options.origin_none
            && !self
                .version
                .is_some_and(ServerVersion::pgoutput_origin_filter)
        {
            return Err(Error::permanent(format!(
                "{} cannot leave changes of a replication origin out of the stream (pgoutput's `origin` option is PostgreSQL 16+)",
                self.describe
            )));
        }
        let sql = start_replication_command(slot, start, proto, options)?;
        self.ready_for_commands().await?;
        self.busy = Some("starting replication");
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(|e| Error::permanent(e.to_string()))?;
        self.send(&out).await?;
        loop {
            let (tag, body) = self.next_frame().await?;
            match tag {
                // CopyBothResponse: the stream has started.
                COPY_BOTH_RESPONSE_TAG => {
                    self.mode = Mode::Streaming;
                    self.decoder = Decoder::new();
                    self.busy = None;
                    return Ok(());
                }
                backend::ERROR_RESPONSE_TAG => {
                    let e = self.server_error(
                        tag,
                        body,
                        &format!("starting replication from slot {slot}"),
                    );
                    self.mode = Mode::Ending {
                        send_copy_done: false,
                    };
                    self.finish_stream().await?;
                    self.busy = None;
                    return Err(e);
                }
                backend::NOTICE_RESPONSE_TAG => self.log_notice(tag, body),
                backend::PARAMETER_STATUS_TAG => {}
                other => return Err(self.unexpected(other, "starting replication")),
            }
        }
    }

    /// The next message of the stream: a decoded pgoutput message or a keepalive.
    ///
    /// Cancellation-safe: if the future is dropped before it completes, no message is lost (the
    /// bytes read so far stay buffered for the next call). Memory stays bounded by the largest single
    /// message, whatever the size of the transaction. The returned values are slices of the read
    /// buffer: hold them only as long as needed.
    ///
    /// When the server ends the stream (CopyDone, or an error it reports), this returns an error and
    /// [`ReplicationClient::stop_replication`] brings the session back to command mode.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage> {
        self.check_usable()?;
        if self.mode != Mode::Streaming {
            return Err(self.not_streaming());
        }
        loop {
            let (tag, body) = self.next_frame().await?;
            match tag {
                backend::COPY_DATA_TAG => {
                    let describe = &self.describe;
                    let in_stream = |e: pgoutput::DecodeError| {
                        Error::permanent(format!("{e} (in the replication stream from {describe})"))
                    };
                    return match pgoutput::decode_copy_data(body).map_err(in_stream)? {
                        StreamMessage::XLogData(x) => {
                            let data = self.decoder.decode(x.data).map_err(in_stream)?;
                            Ok(ReplicationMessage::XLogData(XLogData {
                                wal_start: x.wal_start,
                                wal_end: x.wal_end,
                                send_time: x.send_time,
                                data,
                            }))
                        }
                        StreamMessage::Keepalive(k) => Ok(ReplicationMessage::Keepalive(k)),
                    };
                }
                backend::COPY_DONE_TAG => {
                    self.mode = Mode::Ending {
                        send_copy_done: true,
                    };
                    return Err(Error::transient(format!(
                        "{} ended the replication stream",
                        self.describe
                    )));
                }
                // A walsender that shuts down (a fast or smart server stop) ends the stream with
                // CommandComplete, without CopyDone.
                backend::COMMAND_COMPLETE_TAG => {
                    self.mode = Mode::Ending {
                        send_copy_done: false,
                    };
                    return Err(Error::transient(format!(
                        "{} ended the replication stream (the server is shutting down or restarting)",
                        self.describe
                    )));
                }
                backend::ERROR_RESPONSE_TAG => {
                    self.mode = Mode::Ending {
                        send_copy_done: false,
                    };
                    return Err(self.server_error(tag, body, "streaming changes"));
                }
                backend::NOTICE_RESPONSE_TAG => self.log_notice(tag, body),
                backend::PARAMETER_STATUS_TAG => {}
                other => return Err(self.unexpected(other, "streaming changes")),
            }
        }
    }

    /// Sends a standby status update: `write`, `flush` and `apply` are the positions (end of the
    /// last byte + 1) received, durably applied, and applied. The server moves the slot's
    /// `confirmed_flush_lsn` to `flush` (so WAL before it can be recycled and a restart resumes
    /// there): report a commit's `end_lsn` only once that transaction is safely applied.
    /// `reply_requested` asks the server for an immediate keepalive. Not cancellation-safe.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<()> {
        self.check_usable()?;
        if self.mode != Mode::Streaming {
            return Err(self.not_streaming());
        }
        let update = StandbyStatusUpdate {
            write,
            flush,
            apply,
            client_time: pgoutput::pg_time_now(),
            reply_requested,
        };
        let mut out = BytesMut::with_capacity(5 + StandbyStatusUpdate::LEN);
        out.put_u8(backend::COPY_DATA_TAG);
        out.put_i32(4 + StandbyStatusUpdate::LEN as i32);
        update.encode(&mut out);
        self.busy = Some("sending a status update");
        self.send(&out).await?;
        self.busy = None;
        Ok(())
    }
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y (proto_version '1', publication_names '"a","b"')`.
/// The replication grammar's string literals know only `''` as an escape (no `E''`), and
/// `publication_names` is a comma-separated list of identifiers, quoted here.
fn start_replication_command(
    slot: &str,
    start: Lsn,
    proto: u32,
    options: &StreamOptions,
) -> Result<String> {
    if options.publications.is_empty() {
        return Err(Error::permanent(
            "starting replication needs at least one publication",
        ));
    }
    let names = options
        .publications
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(",");
    let mut sql = format!(
        "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '{proto}', publication_names {}",
        quote_ident(slot),
        repl_literal(&names)
    );
    if options.messages {
        sql.push_str(", messages 'true'");
    }
    if options.origin_none {
        sql.push_str(", origin 'none'");
    }
    sql.push(')');
    Ok(sql)
}

/// A string literal for the replication command grammar.
fn repl_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_replication_quotes_names() {
        let mut o = StreamOptions::new("p'1");
        o.publications.push("Pub \"2\"".into());
        assert_eq!(
            start_replication_command("s\"x", Lsn(0x16_B374_D848), 1, &o).unwrap(),
            r#"START_REPLICATION SLOT "s""x" LOGICAL 16/B374D848 (proto_version '1', publication_names '"p''1","Pub ""2"""')"#
        );
        o.messages = true;
        o.publications.truncate(1);
        assert_eq!(
            start_replication_command("s", Lsn::INVALID, 1, &o).unwrap(),
            r#"START_REPLICATION SLOT "s" LOGICAL 0/0 (proto_version '1', publication_names '"p''1"', messages 'true')"#
        );
        o.publications.clear();
        assert!(start_replication_command("s", Lsn::INVALID, 1, &o).is_err());
    }
}
