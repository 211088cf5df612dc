//! The wire formats of logical replication, decoded into typed values: the `pgoutput` plugin's
//! messages (protocol version 1, PostgreSQL 10 and later, plus the stream-control messages of
//! version 2) and the streaming-replication framing they travel in (XLogData and primary keepalive
//! messages from the server, standby status updates from us).
//!
//! Decoding never panics and never trusts a length from the wire: malformed input is a
//! [`DecodeError`]. Values are zero-copy slices ([`Bytes`]) of the buffer the message was read into,
//! so a value kept for long keeps that whole buffer alive; copy it (`Bytes::copy_from_slice`) if it
//! must outlive the stream's next few reads.
//!
//! Timestamps are PostgreSQL's: microseconds since 2000-01-01 00:00:00 UTC (see [`pg_time_now`] and
//! [`pg_time_to_system`]).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::Error;
/// The LSN type lives in [`crate::pg::lsn`]; the messages here carry it.
pub use crate::pg::lsn::Lsn;

// ----- timestamps ---------------------------------------------------------------------

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// Now, in microseconds since 2000-01-01 UTC (for standby status updates).
pub fn pg_time_now() -> i64 {
    system_to_pg_time(SystemTime::now())
}

/// A system time in microseconds since 2000-01-01 UTC (saturating).
pub fn system_to_pg_time(t: SystemTime) -> i64 {
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    match t.duration_since(pg_epoch) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |v| -v),
    }
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as a system time.
pub fn pg_time_to_system(micros: i64) -> SystemTime {
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    let d = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        pg_epoch.checked_add(d).unwrap_or(pg_epoch)
    } else {
        pg_epoch.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

// ----- errors ------------------------------------------------------------------------------------

/// A message that does not follow the protocol (truncated, garbled, or of an unknown kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// What was wrong, e.g. `Insert message: truncated at byte 7 reading the relation OID`.
    pub message: String,
}

impl DecodeError {
    fn new(message: impl Into<String>) -> DecodeError {
        DecodeError {
            message: message.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed replication message: {}", self.message)
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Error {
        Error::permanent(e.to_string())
    }
}

type DResult<T> = Result<T, DecodeError>;

/// A bounds-checked cursor over one message.
struct Reader {
    data: Bytes,
    pos: usize,
    /// The kind of message being read, for error messages.
    kind: &'static str,
}

impl Reader {
    fn new(data: Bytes, kind: &'static str) -> Reader {
        Reader { data, pos: 0, kind }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn err(&self, what: &str) -> DecodeError {
        DecodeError::new(format!("{}: {what} at byte {}", self.kind, self.pos))
    }

    fn take(&mut self, n: usize, what: &str) -> DResult<&[u8]> {
        if self.remaining() < n {
            return Err(self.err(&format!(
                "truncated reading {what} ({n} bytes wanted, {} left)",
                self.remaining()
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> DResult<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> DResult<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn i16(&mut self, what: &str) -> DResult<i16> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &str) -> DResult<i32> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> DResult<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &str) -> DResult<i64> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn lsn(&mut self, what: &str) -> DResult<Lsn> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    /// A count that must not be negative (Int16 or Int32 on the wire).
    fn count16(&mut self, what: &str) -> DResult<usize> {
        let n = self.i16(what)?;
        usize::try_from(n).map_err(|_| self.err(&format!("negative {what} {n}")))
    }

    fn count32(&mut self, what: &str) -> DResult<usize> {
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| self.err(&format!("negative {what} {n}")))
    }

    /// `n` bytes as a slice of the message (zero-copy).
    fn bytes(&mut self, n: usize, what: &str) -> DResult<Bytes> {
        if self.remaining() < n {
            return Err(self.err(&format!(
                "truncated reading {what} ({n} bytes announced, {} left)",
                self.remaining()
            )));
        }
        let b = self.data.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// Everything left.
    fn rest(&mut self) -> Bytes {
        let b = self.data.slice(self.pos..);
        self.pos = self.data.len();
        b
    }

    /// A NUL-terminated UTF-8 string (the replication session asks for client_encoding UTF8).
    fn cstring(&mut self, what: &str) -> DResult<String> {
        let rest = &self.data[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.err(&format!("unterminated {what}")));
        };
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| self.err(&format!("{what} is not valid UTF-8")))?
            .to_string();
        self.pos += nul + 1;
        Ok(s)
    }

    /// Fails if bytes are left over: every message we decode has a fixed layout.
    fn finish(self) -> DResult<()> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.err(&format!("{} unexpected trailing bytes", self.remaining())))
        }
    }
}

// ----- pgoutput messages -------------------------------------------------------------------------

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    /// A logical decoding message (`pg_logical_emit_message`); sent only with `messages 'true'`.
    Message(LogicalMessage),
    /// Protocol version 2, streaming of in-progress transactions (`streaming 'on'`).
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

impl PgOutputMessage {
    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            PgOutputMessage::Begin(_) => "Begin",
            PgOutputMessage::Commit(_) => "Commit",
            PgOutputMessage::Origin(_) => "Origin",
            PgOutputMessage::Relation(_) => "Relation",
            PgOutputMessage::Type(_) => "Type",
            PgOutputMessage::Insert(_) => "Insert",
            PgOutputMessage::Update(_) => "Update",
            PgOutputMessage::Delete(_) => "Delete",
            PgOutputMessage::Truncate(_) => "Truncate",
            PgOutputMessage::Message(_) => "Message",
            PgOutputMessage::StreamStart(_) => "Stream Start",
            PgOutputMessage::StreamStop => "Stream Stop",
            PgOutputMessage::StreamCommit(_) => "Stream Commit",
            PgOutputMessage::StreamAbort(_) => "Stream Abort",
        }
    }
}

/// The start of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

/// The end of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Unused so far (0).
    pub flags: u8,
    /// The LSN of the commit record (the Begin's `final_lsn`).
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the transaction is applied.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// The transaction came from a replication origin (it was itself replicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `pg_class.relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (if any).
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Option<ReplicaIdentity> {
        Some(match b {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }

    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod` (-1 when none).
    pub type_modifier: i32,
}

impl Column {
    /// Part of the replica identity key (sent in old key tuples).
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A table's description, sent before its first change in a session and again after it changes.
/// Later messages name the table by `oid` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Set inside a streamed transaction (protocol version 2).
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// The published columns, in the order tuples carry them.
    pub columns: Vec<Column>,
}

/// A data type's name, sent before the first Relation that uses a non-built-in type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`
    Null,
    /// `u`: a TOASTed value that did not change; the message does not carry it.
    UnchangedToast,
    /// `t`: the type's text output.
    Text(Bytes),
    /// `b`: the type's binary (send) output, with `binary 'true'` (PostgreSQL 14+).
    Binary(Bytes),
}

impl TupleValue {
    /// The text value, if this is valid UTF-8 text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            TupleValue::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, TupleValue::Null)
    }
}

/// A row: one value per column of the relation, in the Relation message's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    pub values: Vec<TupleValue>,
}

/// The old row of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns are set, the others are null.
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation: u32,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation: u32,
    /// Present when the key changed (`K`) or with REPLICA IDENTITY FULL (`O`).
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation: u32,
    pub old: OldTuple,
}

/// TRUNCATE options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TruncateOptions(pub u8);

impl TruncateOptions {
    pub const CASCADE: u8 = 1;
    pub const RESTART_IDENTITY: u8 = 2;

    pub fn cascade(self) -> bool {
        self.0 & Self::CASCADE != 0
    }

    pub fn restart_identity(self) -> bool {
        self.0 & Self::RESTART_IDENTITY != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    pub options: TruncateOptions,
    /// The truncated relations' OIDs.
    pub relations: Vec<u32>,
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub xid: Option<u32>,
    /// Emitted as part of a transaction (sent between its Begin and Commit); otherwise sent at once.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    pub first_segment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
}

/// Decodes pgoutput messages one at a time. It remembers only whether it is inside a streamed
/// block (between Stream Start and Stream Stop, protocol version 2), where messages carry an xid;
/// with protocol version 1 it is stateless.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes one message (the payload of one XLogData).
    pub fn decode(&mut self, data: Bytes) -> Result<PgOutputMessage, DecodeError> {
        let Some(&tag) = data.first() else {
            return Err(DecodeError::new("empty pgoutput message"));
        };
        let kind = match tag {
            b'B' => "Begin message",
            b'C' => "Commit message",
            b'O' => "Origin message",
            b'R' => "Relation message",
            b'Y' => "Type message",
            b'I' => "Insert message",
            b'U' => "Update message",
            b'D' => "Delete message",
            b'T' => "Truncate message",
            b'M' => "Message message",
            b'S' => "Stream Start message",
            b'E' => "Stream Stop message",
            b'c' => "Stream Commit message",
            b'A' => "Stream Abort message",
            other => {
                return Err(DecodeError::new(format!(
                    "unknown pgoutput message type {}",
                    show_tag(other)
                )));
            }
        };
        let mut r = Reader::new(data, kind);
        r.pos = 1;
        let streamed = self.in_stream;
        let xid = |r: &mut Reader| -> DResult<Option<u32>> {
            if streamed {
                Ok(Some(r.u32("the transaction ID")?))
            } else {
                Ok(None)
            }
        };
        let msg = match tag {
            b'B' => PgOutputMessage::Begin(Begin {
                final_lsn: r.lsn("the final LSN")?,
                commit_time: r.i64("the commit timestamp")?,
                xid: r.u32("the transaction ID")?,
            }),
            b'C' => PgOutputMessage::Commit(Commit {
                flags: r.u8("the flags")?,
                commit_lsn: r.lsn("the commit LSN")?,
                end_lsn: r.lsn("the end LSN")?,
                commit_time: r.i64("the commit timestamp")?,
            }),
            b'O' => PgOutputMessage::Origin(Origin {
                commit_lsn: r.lsn("the origin's commit LSN")?,
                name: r.cstring("the origin name")?,
            }),
            b'R' => {
                let xid = xid(&mut r)?;
                let oid = r.u32("the relation OID")?;
                let namespace = r.cstring("the namespace")?;
                let name = r.cstring("the relation name")?;
                let ident = r.u8("the replica identity")?;
                let replica_identity = ReplicaIdentity::from_byte(ident).ok_or_else(|| {
                    r.err(&format!("unknown replica identity {}", show_tag(ident)))
                })?;
                let n = r.count16("column count")?;
                // Each column takes at least 10 bytes: never reserve more than the message holds.
                let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
                for _ in 0..n {
                    columns.push(Column {
                        flags: r.u8("the column flags")?,
                        name: r.cstring("the column name")?,
                        type_oid: r.u32("the column type OID")?,
                        type_modifier: r.i32("the column type modifier")?,
                    });
                }
                PgOutputMessage::Relation(Relation {
                    xid,
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }
            b'Y' => PgOutputMessage::Type(Type {
                xid: xid(&mut r)?,
                oid: r.u32("the type OID")?,
                namespace: r.cstring("the namespace")?,
                name: r.cstring("the type name")?,
            }),
            b'I' => {
                let xid = xid(&mut r)?;
                let relation = r.u32("the relation OID")?;
                match r.u8("the tuple marker")? {
                    b'N' => {}
                    other => {
                        return Err(r.err(&format!(
                            "expected new tuple marker 'N', found {}",
                            show_tag(other)
                        )));
                    }
                }
                PgOutputMessage::Insert(Insert {
                    xid,
                    relation,
                    new: tuple(&mut r)?,
                })
            }
            b'U' => {
                let xid = xid(&mut r)?;
                let relation = r.u32("the relation OID")?;
                let mut old = None;
                let mut marker = r.u8("the tuple marker")?;
                if marker == b'K' || marker == b'O' {
                    let t = tuple(&mut r)?;
                    old = Some(if marker == b'K' {
                        OldTuple::Key(t)
                    } else {
                        OldTuple::Full(t)
                    });
                    marker = r.u8("the new tuple marker")?;
                }
                if marker != b'N' {
                    return Err(r.err(&format!(
                        "expected tuple marker 'K', 'O' or 'N', found {}",
                        show_tag(marker)
                    )));
                }
                PgOutputMessage::Update(Update {
                    xid,
                    relation,
                    old,
                    new: tuple(&mut r)?,
                })
            }
            b'D' => {
                let xid = xid(&mut r)?;
                let relation = r.u32("the relation OID")?;
                let old = match r.u8("the tuple marker")? {
                    b'K' => OldTuple::Key(tuple(&mut r)?),
                    b'O' => OldTuple::Full(tuple(&mut r)?),
                    other => {
                        return Err(r.err(&format!(
                            "expected tuple marker 'K' or 'O', found {}",
                            show_tag(other)
                        )));
                    }
                };
                PgOutputMessage::Delete(Delete { xid, relation, old })
            }
            b'T' => {
                let xid = xid(&mut r)?;
                let n = r.count32("relation count")?;
                let options = TruncateOptions(r.u8("the options")?);
                let mut relations = Vec::with_capacity(n.min(r.remaining() / 4));
                for _ in 0..n {
                    relations.push(r.u32("a relation OID")?);
                }
                PgOutputMessage::Truncate(Truncate {
                    xid,
                    options,
                    relations,
                })
            }
            b'M' => {
                let xid = xid(&mut r)?;
                let flags = r.u8("the flags")?;
                let lsn = r.lsn("the message LSN")?;
                let prefix = r.cstring("the prefix")?;
                let len = r.count32("content length")?;
                PgOutputMessage::Message(LogicalMessage {
                    xid,
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: r.bytes(len, "the content")?,
                })
            }
            b'S' => {
                let m = StreamStart {
                    xid: r.u32("the transaction ID")?,
                    first_segment: r.u8("the first-segment flag")? == 1,
                };
                r.finish()?;
                self.in_stream = true;
                return Ok(PgOutputMessage::StreamStart(m));
            }
            b'E' => {
                r.finish()?;
                self.in_stream = false;
                return Ok(PgOutputMessage::StreamStop);
            }
            b'c' => PgOutputMessage::StreamCommit(StreamCommit {
                xid: r.u32("the transaction ID")?,
                flags: r.u8("the flags")?,
                commit_lsn: r.lsn("the commit LSN")?,
                end_lsn: r.lsn("the end LSN")?,
                commit_time: r.i64("the commit timestamp")?,
            }),
            b'A' => PgOutputMessage::StreamAbort(StreamAbort {
                xid: r.u32("the transaction ID")?,
                subxid: r.u32("the subtransaction ID")?,
            }),
            _ => unreachable_tag(tag)?,
        };
        r.finish()?;
        Ok(msg)
    }
}

/// The tags above are matched twice; this keeps the second match total without a panic.
fn unreachable_tag(tag: u8) -> DResult<PgOutputMessage> {
    Err(DecodeError::new(format!(
        "unknown pgoutput message type {}",
        show_tag(tag)
    )))
}

/// Decodes one pgoutput message outside any streamed block (protocol version 1).
pub fn decode(data: Bytes) -> Result<PgOutputMessage, DecodeError> {
    Decoder::new().decode(data)
}

/// TupleData: Int16 column count, then per column a kind byte and, for `t`/`b`, Int32 length and
/// the bytes.
fn tuple(r: &mut Reader) -> DResult<TupleData> {
    let n = r.count16("tuple column count")?;
    let mut values = Vec::with_capacity(n.min(r.remaining()));
    for _ in 0..n {
        let v = match r.u8("a column kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => {
                let len = r.count32("text length")?;
                TupleValue::Text(r.bytes(len, "a text value")?)
            }
            b'b' => {
                let len = r.count32("binary length")?;
                TupleValue::Binary(r.bytes(len, "a binary value")?)
            }
            other => {
                return Err(r.err(&format!("unknown column kind {}", show_tag(other))));
            }
        };
        values.push(v);
    }
    Ok(TupleData { values })
}

fn show_tag(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

// ----- streaming replication framing -------------------------------------------------------------

/// WAL data from the server; for logical replication, `data` is one output-plugin message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData<T = Bytes> {
    /// The starting point of the WAL data in this message.
    pub wal_start: Lsn,
    /// The current end of WAL on the server.
    pub wal_end: Lsn,
    /// The server's clock when sending, microseconds since 2000-01-01 UTC.
    pub send_time: i64,
    pub data: T,
}

/// The server's heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    /// The current end of WAL on the server.
    pub wal_end: Lsn,
    pub send_time: i64,
    /// Answer at once with a standby status update, or the server disconnects after
    /// `wal_sender_timeout`.
    pub reply_requested: bool,
}

/// What the server sends inside CopyData once replication has started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    XLogData(XLogData),
    Keepalive(PrimaryKeepalive),
}

/// Decodes the payload of one CopyData message from the server.
pub fn decode_copy_data(data: Bytes) -> Result<StreamMessage, DecodeError> {
    match data.first() {
        Some(b'w') => {
            let mut r = Reader::new(data, "XLogData");
            r.pos = 1;
            Ok(StreamMessage::XLogData(XLogData {
                wal_start: r.lsn("the WAL start")?,
                wal_end: r.lsn("the WAL end")?,
                send_time: r.i64("the send time")?,
                data: r.rest(),
            }))
        }
        Some(b'k') => {
            let mut r = Reader::new(data, "primary keepalive");
            r.pos = 1;
            let k = PrimaryKeepalive {
                wal_end: r.lsn("the WAL end")?,
                send_time: r.i64("the send time")?,
                reply_requested: r.u8("the reply-requested flag")? != 0,
            };
            r.finish()?;
            Ok(StreamMessage::Keepalive(k))
        }
        Some(&other) => Err(DecodeError::new(format!(
            "unknown replication stream message type {}",
            show_tag(other)
        ))),
        None => Err(DecodeError::new("empty replication stream message")),
    }
}

/// Our progress report. For logical replication the server advances the slot's
/// `confirmed_flush_lsn` to `flush`: report there only what is durably applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// The last WAL byte + 1 received and written.
    pub write: Lsn,
    /// The last WAL byte + 1 durably applied (the slot may release WAL before it).
    pub flush: Lsn,
    /// The last WAL byte + 1 applied.
    pub apply: Lsn,
    /// Our clock, microseconds since 2000-01-01 UTC.
    pub client_time: i64,
    /// Ask the server to answer with a keepalive at once.
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Length of the encoded message.
    pub const LEN: usize = 1 + 8 * 4 + 1;

    /// Appends the message (the payload of a CopyData message) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(Self::LEN);
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.client_time);
        out.put_u8(u8::from(self.reply_requested));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- a small encoder for building test messages ---

    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn tag(t: u8) -> W {
            W(vec![t])
        }
        fn u8(mut self, v: u8) -> W {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> W {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, v: &[u8]) -> W {
            self.0.extend_from_slice(v);
            self
        }
        fn text(self, v: &str) -> W {
            self.u8(b't').i32(v.len() as i32).raw(v.as_bytes())
        }
        fn done(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn text(v: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(v.as_bytes()))
    }

    /// One valid example of every message kind, with what it decodes to.
    fn samples() -> Vec<(Bytes, PgOutputMessage)> {
        vec![
            (
                W::tag(b'B').u64(0x1_0000_0010).i64(123_456).u32(77).done(),
                PgOutputMessage::Begin(Begin {
                    final_lsn: Lsn(0x1_0000_0010),
                    commit_time: 123_456,
                    xid: 77,
                }),
            ),
            (
                W::tag(b'C').u8(0).u64(10).u64(20).i64(-5).done(),
                PgOutputMessage::Commit(Commit {
                    flags: 0,
                    commit_lsn: Lsn(10),
                    end_lsn: Lsn(20),
                    commit_time: -5,
                }),
            ),
            (
                W::tag(b'O').u64(0xAB).s("sub_1").done(),
                PgOutputMessage::Origin(Origin {
                    commit_lsn: Lsn(0xAB),
                    name: "sub_1".into(),
                }),
            ),
            (
                W::tag(b'R')
                    .u32(16384)
                    .s("public")
                    .s("Film ü")
                    .u8(b'd')
                    .i16(2)
                    .u8(1)
                    .s("id")
                    .u32(23)
                    .i32(-1)
                    .u8(0)
                    .s("title")
                    .u32(1043)
                    .i32(14)
                    .done(),
                PgOutputMessage::Relation(Relation {
                    xid: None,
                    oid: 16384,
                    namespace: "public".into(),
                    name: "Film ü".into(),
                    replica_identity: ReplicaIdentity::Default,
                    columns: vec![
                        Column {
                            flags: 1,
                            name: "id".into(),
                            type_oid: 23,
                            type_modifier: -1,
                        },
                        Column {
                            flags: 0,
                            name: "title".into(),
                            type_oid: 1043,
                            type_modifier: 14,
                        },
                    ],
                }),
            ),
            (
                W::tag(b'Y').u32(16390).s("public").s("mood").done(),
                PgOutputMessage::Type(Type {
                    xid: None,
                    oid: 16390,
                    namespace: "public".into(),
                    name: "mood".into(),
                }),
            ),
            (
                W::tag(b'I')
                    .u32(16384)
                    .u8(b'N')
                    .i16(4)
                    .text("1")
                    .u8(b'n')
                    .u8(b'u')
                    .u8(b'b')
                    .i32(2)
                    .raw(&[0, 255])
                    .done(),
                PgOutputMessage::Insert(Insert {
                    xid: None,
                    relation: 16384,
                    new: TupleData {
                        values: vec![
                            text("1"),
                            TupleValue::Null,
                            TupleValue::UnchangedToast,
                            TupleValue::Binary(Bytes::from_static(&[0, 255])),
                        ],
                    },
                }),
            ),
            (
                W::tag(b'U')
                    .u32(5)
                    .u8(b'K')
                    .i16(2)
                    .text("1")
                    .u8(b'n')
                    .u8(b'N')
                    .i16(2)
                    .text("2")
                    .text("")
                    .done(),
                PgOutputMessage::Update(Update {
                    xid: None,
                    relation: 5,
                    old: Some(OldTuple::Key(TupleData {
                        values: vec![text("1"), TupleValue::Null],
                    })),
                    new: TupleData {
                        values: vec![text("2"), text("")],
                    },
                }),
            ),
            (
                W::tag(b'U').u32(5).u8(b'N').i16(1).text("x").done(),
                PgOutputMessage::Update(Update {
                    xid: None,
                    relation: 5,
                    old: None,
                    new: TupleData {
                        values: vec![text("x")],
                    },
                }),
            ),
            (
                W::tag(b'U')
                    .u32(5)
                    .u8(b'O')
                    .i16(1)
                    .text("a")
                    .u8(b'N')
                    .i16(1)
                    .text("b")
                    .done(),
                PgOutputMessage::Update(Update {
                    xid: None,
                    relation: 5,
                    old: Some(OldTuple::Full(TupleData {
                        values: vec![text("a")],
                    })),
                    new: TupleData {
                        values: vec![text("b")],
                    },
                }),
            ),
            (
                W::tag(b'D').u32(6).u8(b'O').i16(1).text("z").done(),
                PgOutputMessage::Delete(Delete {
                    xid: None,
                    relation: 6,
                    old: OldTuple::Full(TupleData {
                        values: vec![text("z")],
                    }),
                }),
            ),
            (
                W::tag(b'D').u32(6).u8(b'K').i16(0).done(),
                PgOutputMessage::Delete(Delete {
                    xid: None,
                    relation: 6,
                    old: OldTuple::Key(TupleData { values: vec![] }),
                }),
            ),
            (
                W::tag(b'T').i32(2).u8(3).u32(7).u32(8).done(),
                PgOutputMessage::Truncate(Truncate {
                    xid: None,
                    options: TruncateOptions(3),
                    relations: vec![7, 8],
                }),
            ),
            (
                W::tag(b'M')
                    .u8(1)
                    .u64(99)
                    .s("pgferry")
                    .i32(3)
                    .raw(b"a\0b")
                    .done(),
                PgOutputMessage::Message(LogicalMessage {
                    xid: None,
                    transactional: true,
                    lsn: Lsn(99),
                    prefix: "pgferry".into(),
                    content: Bytes::from_static(b"a\0b"),
                }),
            ),
            (
                W::tag(b'c').u32(9).u8(0).u64(1).u64(2).i64(3).done(),
                PgOutputMessage::StreamCommit(StreamCommit {
                    xid: 9,
                    flags: 0,
                    commit_lsn: Lsn(1),
                    end_lsn: Lsn(2),
                    commit_time: 3,
                }),
            ),
            (
                W::tag(b'A').u32(9).u32(10).done(),
                PgOutputMessage::StreamAbort(StreamAbort { xid: 9, subxid: 10 }),
            ),
        ]
    }

    #[test]
    fn pgoutput_decodes_every_message_kind() {
        for (bytes, want) in samples() {
            assert_eq!(decode(bytes.clone()), Ok(want), "{bytes:?}");
        }
        let truncate = match decode(W::tag(b'T').i32(1).u8(2).u32(7).done()) {
            Ok(PgOutputMessage::Truncate(t)) => t,
            other => panic!("{other:?}"),
        };
        assert!(truncate.options.restart_identity() && !truncate.options.cascade());
    }

    #[test]
    fn pgoutput_values_are_slices_of_the_message() {
        let bytes = W::tag(b'I').u32(1).u8(b'N').i16(1).text("hello").done();
        let PgOutputMessage::Insert(ins) = decode(bytes.clone()).unwrap() else {
            panic!()
        };
        let TupleValue::Text(v) = &ins.new.values[0] else {
            panic!()
        };
        assert_eq!(v.as_ptr(), bytes[bytes.len() - 5..].as_ptr());
        assert_eq!(ins.new.values[0].as_text(), Some("hello"));
    }

    #[test]
    fn pgoutput_streamed_blocks_carry_xids() {
        let mut d = Decoder::new();
        assert_eq!(
            d.decode(W::tag(b'S').u32(42).u8(1).done()),
            Ok(PgOutputMessage::StreamStart(StreamStart {
                xid: 42,
                first_segment: true
            }))
        );
        let ins = d
            .decode(W::tag(b'I').u32(42).u32(5).u8(b'N').i16(0).done())
            .unwrap();
        assert_eq!(
            ins,
            PgOutputMessage::Insert(Insert {
                xid: Some(42),
                relation: 5,
                new: TupleData::default()
            })
        );
        assert_eq!(
            d.decode(W::tag(b'E').done()),
            Ok(PgOutputMessage::StreamStop)
        );
        // Outside the block the same bytes are an Insert into relation 42 with trailing garbage.
        assert!(
            d.decode(W::tag(b'I').u32(42).u32(5).u8(b'N').i16(0).done())
                .is_err()
        );
    }

    #[test]
    fn pgoutput_rejects_every_truncation_and_trailing_bytes() {
        for (bytes, _) in samples() {
            for cut in 0..bytes.len() {
                let r = decode(bytes.slice(..cut));
                assert!(r.is_err(), "prefix {cut} of {bytes:?} decoded: {r:?}");
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            let e = decode(Bytes::from(longer)).unwrap_err();
            assert!(e.message.contains("trailing"), "{e}");
        }
    }

    #[test]
    fn pgoutput_survives_garbled_input() {
        // xorshift: deterministic, no dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let samples = samples();
        let mut decoded_ok = 0;
        for round in 0..20_000 {
            let (bytes, _) = &samples[round % samples.len()];
            let mut v = bytes.to_vec();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % v.len();
                v[i] = next() as u8;
            }
            if next() % 3 == 0 {
                let keep = (next() as usize) % (v.len() + 1);
                v.truncate(keep);
            }
            let mut d = Decoder::new();
            if d.decode(Bytes::from(v.clone())).is_ok() {
                decoded_ok += 1;
            }
            let _ = decode_copy_data(Bytes::from(v));
        }
        // Some mutations hit values only; most must be refused.
        assert!(decoded_ok < 20_000);
        // Pure noise of every length.
        for len in 0..200 {
            let v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(Bytes::from(v.clone()));
            let _ = decode_copy_data(Bytes::from(v));
        }
    }

    #[test]
    fn pgoutput_refuses_absurd_lengths_without_allocating() {
        let huge = W::tag(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(i32::MAX)
            .done();
        assert!(decode(huge).unwrap_err().message.contains("truncated"));
        let negative = W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-1).done();
        assert!(decode(negative).unwrap_err().message.contains("negative"));
        let many = W::tag(b'T').i32(i32::MAX).u8(0).u32(1).done();
        assert!(decode(many).is_err());
        let cols = W::tag(b'I').u32(1).u8(b'N').i16(-3).done();
        assert!(decode(cols).is_err());
        assert!(decode(Bytes::new()).is_err());
        assert!(
            decode(W::tag(b'x').done())
                .unwrap_err()
                .message
                .contains("unknown pgoutput message type 'x'")
        );
        let bad_ident = W::tag(b'R').u32(1).s("").s("t").u8(b'q').i16(0).done();
        assert!(
            decode(bad_ident)
                .unwrap_err()
                .message
                .contains("replica identity")
        );
        let bad_utf8 = W::tag(b'Y').u32(1).raw(&[0xff, 0]).s("t").done();
        assert!(decode(bad_utf8).unwrap_err().message.contains("UTF-8"));
    }

    #[test]
    fn pgoutput_times_use_the_2000_epoch() {
        let t = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS + 1);
        assert_eq!(system_to_pg_time(t), 1_000_000);
        assert_eq!(pg_time_to_system(1_000_000), t);
        assert_eq!(system_to_pg_time(UNIX_EPOCH), -946_684_800_000_000);
        assert_eq!(pg_time_to_system(-946_684_800_000_000), UNIX_EPOCH);
        // 2020 or later.
        assert!(pg_time_now() > 631_152_000_000_000);
    }

    #[test]
    fn pgoutput_stream_framing() {
        let w = W::tag(b'w').u64(0x10).u64(0x20).i64(7).raw(b"B...").done();
        assert_eq!(
            decode_copy_data(w),
            Ok(StreamMessage::XLogData(XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                send_time: 7,
                data: Bytes::from_static(b"B..."),
            }))
        );
        let k = W::tag(b'k').u64(0x30).i64(8).u8(1).done();
        assert_eq!(
            decode_copy_data(k.clone()),
            Ok(StreamMessage::Keepalive(PrimaryKeepalive {
                wal_end: Lsn(0x30),
                send_time: 8,
                reply_requested: true,
            }))
        );
        for cut in 0..k.len() {
            assert!(decode_copy_data(k.slice(..cut)).is_err());
        }
        assert!(decode_copy_data(W::tag(b'w').u64(1).done()).is_err());
        assert!(decode_copy_data(W::tag(b'z').done()).is_err());

        let mut out = BytesMut::new();
        StandbyStatusUpdate {
            write: Lsn(0x0102_0304_0506_0708),
            flush: Lsn(2),
            apply: Lsn(3),
            client_time: -1,
            reply_requested: true,
        }
        .encode(&mut out);
        let want = W::tag(b'r')
            .u64(0x0102_0304_0506_0708)
            .u64(2)
            .u64(3)
            .i64(-1)
            .u8(1)
            .done();
        assert_eq!(&out[..], &want[..]);
        assert_eq!(out.len(), StandbyStatusUpdate::LEN);
    }
}
