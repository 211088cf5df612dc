//! Our own PostgreSQL protocol session, on `postgres-protocol`, for what tokio-postgres cannot do:
//! replication sessions ([`crate::pg::replication`], slots and streaming) and forwarding COPY data
//! between two servers as raw frames. This file is the session itself: the transport (TCP or Unix
//! socket) with the same TLS settings as ordinary connections, startup and authentication (trust,
//! password, md5, SCRAM-SHA-256), framing, simple queries, copy-both mode's ending, and
//! [`WireClient::copy_into`].
//!
//! Cancellation: reading the next frame is cancellation-safe (bytes read stay buffered, and a
//! message is taken out of the buffer only when it is returned). Every other method writes or reads
//! several messages; if one of their futures is dropped half-way, the session is marked broken and
//! every later call fails (reconnect instead).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::TlsConnect;

use crate::error::{Error, Result, classify_sqlstate};
use crate::pg::connect::{ConnInfo, TlsMode};
use crate::pg::pgoutput::Decoder;
use crate::pg::version::ServerVersion;

/// A byte stream: TCP or Unix socket, with or without TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct BoxedStream(Box<dyn Stream>);

impl AsyncRead for BoxedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoxedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// One row of a simple query's result: column names and text values.
#[derive(Debug, Clone)]
pub struct Row {
    pub columns: Vec<String>,
    pub values: Vec<Option<String>>,
}

impl Row {
    pub fn get(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values.get(i)?.as_deref()
    }
}

/// Where the session is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Ready for commands.
    Idle,
    /// In copy-both mode after `START_REPLICATION`.
    Streaming,
    /// The stream is over (the server ended it or reported an error) and its closing messages, up to
    /// ReadyForQuery, are still to be read; `send_copy_done`: the server sent CopyDone and waits for
    /// ours.
    Ending { send_copy_done: bool },
}

/// Bytes read from the socket at a time (at least).
const READ_CHUNK: usize = 64 * 1024;

/// CopyBothResponse, which `postgres_protocol::message::backend` does not know.
pub(super) const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// A protocol session: plain, or in replication mode (see [`crate::pg::replication`]).
pub struct WireClient {
    stream: BoxedStream,
    buf: BytesMut,
    pub(super) describe: String,
    pub(super) mode: Mode,
    pub(super) decoder: Decoder,
    /// Set while an operation that is not cancellation-safe runs; still set afterwards if its
    /// future was dropped half-way, which leaves the protocol state unknown.
    pub(super) busy: Option<&'static str>,
    /// What the server reported as `server_version` at startup.
    pub(super) version: Option<ServerVersion>,
}

fn io_err(e: std::io::Error, doing: &str, describe: &str) -> Error {
    Error::transient(format!(
        "{doing} on the replication connection to {describe}: {e}"
    ))
}

impl WireClient {
    /// Opens an ordinary (non-replication) session on the same transport, TLS and authentication:
    /// used to forward COPY data between servers as raw protocol frames ([`WireClient::copy_into`]).
    pub async fn connect_plain(conn: &ConnInfo, purpose: &str) -> Result<WireClient> {
        Self::open(conn, purpose, false).await
    }

    pub(super) async fn open(
        conn: &ConnInfo,
        purpose: &str,
        replication: bool,
    ) -> Result<WireClient> {
        let config = conn.config();
        let describe = conn.describe();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let (raw, host_name): (BoxedStream, String) = match config.get_hosts().first() {
            Some(Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| io_err(e, "connecting", &describe))?;
                (BoxedStream(Box::new(s)), "localhost".to_string())
            }
            Some(Host::Tcp(h)) => {
                let s = tokio::time::timeout(
                    config
                        .get_connect_timeout()
                        .copied()
                        .unwrap_or(std::time::Duration::from_secs(10)),
                    tokio::net::TcpStream::connect((h.as_str(), port)),
                )
                .await
                .map_err(|_| {
                    Error::transient(format!(
                        "connecting to {describe} for replication: timed out"
                    ))
                })?
                .map_err(|e| io_err(e, "connecting", &describe))?;
                let _ = s.set_nodelay(true);
                (BoxedStream(Box::new(s)), h.clone())
            }
            None => {
                return Err(Error::permanent(format!(
                    "no host to connect to for {describe}"
                )));
            }
        };
        let stream = match conn.tls_mode() {
            TlsMode::Disable => raw,
            mode => negotiate_tls(raw, conn, mode, &host_name, &describe).await?,
        };
        let mut client = WireClient {
            stream,
            buf: BytesMut::with_capacity(8192),
            describe,
            mode: Mode::Idle,
            decoder: Decoder::new(),
            busy: None,
            version: None,
        };
        client.startup(conn, purpose, replication).await?;
        Ok(client)
    }

    /// Copies rows from this session into `target`: `copy_out` (`COPY ... TO STDOUT`) here and
    /// `copy_in` (`COPY ... FROM STDIN`) there, with the same format on both sides. The CopyData
    /// frames are forwarded as they are — the frontend and backend CopyData messages have the same
    /// layout — so no row is decoded or copied more than once on its way. Returns (rows, bytes);
    /// adds the bytes to `progress` as they go. On an error both sessions are left unusable.
    pub async fn copy_into(
        &mut self,
        copy_out: &str,
        target: &mut WireClient,
        copy_in: &str,
        progress: &std::sync::atomic::AtomicU64,
    ) -> Result<(u64, u64)> {
        self.ready_for_commands().await?;
        target.ready_for_commands().await?;
        self.busy = Some("copying");
        target.busy = Some("copying");
        let result = self
            .copy_into_inner(copy_out, target, copy_in, progress)
            .await;
        if result.is_ok() {
            self.busy = None;
            target.busy = None;
        }
        result
    }

    async fn copy_into_inner(
        &mut self,
        copy_out: &str,
        target: &mut WireClient,
        copy_in: &str,
        progress: &std::sync::atomic::AtomicU64,
    ) -> Result<(u64, u64)> {
        const FLUSH_AT: usize = 256 * 1024;
        let mut out = BytesMut::new();
        // The target first: it must be receiving before the source starts sending.
        frontend::query(copy_in, &mut out).map_err(|e| Error::permanent(e.to_string()))?;
        target.send(&out).await?;
        loop {
            let (tag, body) = target.next_frame().await?;
            match tag {
                b'G' => break,
                b'E' => {
                    let e = target.server_error(tag, body, "starting COPY FROM on the target");
                    return Err(e);
                }
                b'N' => target.log_notice(tag, body),
                _ => {}
            }
        }
        out.clear();
        frontend::query(copy_out, &mut out).map_err(|e| Error::permanent(e.to_string()))?;
        self.send(&out).await?;
        loop {
            let (tag, body) = self.next_frame().await?;
            match tag {
                b'H' => break,
                b'E' => {
                    let e = self.server_error(tag, body, "starting COPY TO on the source");
                    target.abort_copy_in(&e.message).await;
                    return Err(e);
                }
                b'N' => self.log_notice(tag, body),
                _ => {}
            }
        }
        let mut pending = BytesMut::with_capacity(FLUSH_AT + READ_CHUNK);
        let mut bytes = 0u64;
        loop {
            let (tag, body) = self.next_frame().await?;
            match tag {
                b'd' => {
                    let n = body.len();
                    bytes += n as u64;
                    progress.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    pending.put_u8(b'd');
                    pending.put_i32(i32::try_from(n + 4).map_err(|_| {
                        Error::permanent("a COPY row is larger than the protocol allows")
                    })?);
                    pending.extend_from_slice(&body);
                    if pending.len() >= FLUSH_AT {
                        target
                            .stream
                            .write_all(&pending)
                            .await
                            .map_err(|e| io_err(e, "writing COPY data", &target.describe))?;
                        pending.clear();
                    }
                }
                b'c' => break,
                b'E' => {
                    let e = self.server_error(tag, body, "reading COPY data from the source");
                    target.abort_copy_in(&e.message).await;
                    return Err(e);
                }
                b'N' => self.log_notice(tag, body),
                _ => {}
            }
        }
        frontend::copy_done(&mut pending);
        target.send(&pending).await?;
        let mut rows = 0u64;
        let mut target_error = None;
        loop {
            let (tag, body) = target.next_frame().await?;
            match tag {
                b'C' => {
                    let text = String::from_utf8_lossy(&body);
                    rows = text
                        .trim_end_matches('\0')
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
                b'E' => {
                    target_error =
                        Some(target.server_error(tag, body, "writing COPY data to the target"));
                }
                b'Z' => break,
                b'N' => target.log_notice(tag, body),
                _ => {}
            }
        }
        let mut source_error = None;
        loop {
            let (tag, body) = self.next_frame().await?;
            match tag {
                b'E' => {
                    source_error =
                        Some(self.server_error(tag, body, "finishing COPY TO on the source"))
                }
                b'Z' => break,
                b'N' => self.log_notice(tag, body),
                _ => {}
            }
        }
        if let Some(e) = target_error.or(source_error) {
            return Err(e);
        }
        Ok((rows, bytes))
    }

    /// Ends a COPY FROM STDIN with CopyFail and reads the target's answer; best effort.
    async fn abort_copy_in(&mut self, why: &str) {
        let mut out = BytesMut::new();
        if frontend::copy_fail(why, &mut out).is_err() || self.send(&out).await.is_err() {
            return;
        }
        while let Ok((tag, _)) = self.next_frame().await {
            if tag == b'Z' {
                break;
            }
        }
    }

    pub(super) async fn send(&mut self, out: &BytesMut) -> Result<()> {
        self.stream
            .write_all(out)
            .await
            .map_err(|e| io_err(e, "writing", &self.describe))?;
        self.stream
            .flush()
            .await
            .map_err(|e| io_err(e, "writing", &self.describe))
    }

    /// The next backend message.
    async fn next(&mut self) -> Result<backend::Message> {
        // One framing path for the whole client: `next_frame` reads and frames, postgres-protocol
        // parses the messages it knows.
        let (tag, body) = self.next_frame().await?;
        Self::parse_frame(tag, &body).ok_or_else(|| self.unexpected(tag, "reading a message"))
    }

    async fn startup(&mut self, conn: &ConnInfo, purpose: &str, replication: bool) -> Result<()> {
        let config = conn.config();
        let user = config.get_user().unwrap_or("postgres").to_string();
        let app = format!("pgferry {purpose}");
        let mut params = vec![
            ("user", user.as_str()),
            ("database", conn.dbname()),
            ("application_name", app.as_str()),
            ("client_encoding", "UTF8"),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        // `options` (`-c name=value ...`), as libpq sends it: e.g. a per-session wal_sender_timeout.
        let options = config.get_options().map(|o| ("options", o));
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied().chain(options), &mut out)
            .map_err(|e| Error::permanent(e.to_string()))?;
        self.send(&out).await?;
        let password = config.get_password().map(<[u8]>::to_vec);
        let need_password = || {
            Error::permanent(format!(
                "the server {} asks for a password and none is configured",
                conn.describe()
            ))
            .hint("set `password` in the plan, PGPASSWORD, or ~/.pgpass")
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = password.clone().ok_or_else(need_password)?;
                    let mut out = BytesMut::new();
                    frontend::password_message(&pw, &mut out)
                        .map_err(|e| Error::permanent(e.to_string()))?;
                    self.send(&out).await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = password.clone().ok_or_else(need_password)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        &pw,
                        body.salt(),
                    );
                    let mut out = BytesMut::new();
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| Error::permanent(e.to_string()))?;
                    self.send(&out).await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let pw = password.clone().ok_or_else(need_password)?;
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| Error::permanent(e.to_string()))?
                    {
                        if m == "SCRAM-SHA-256" {
                            has_scram = true;
                        }
                    }
                    if !has_scram {
                        return Err(Error::permanent(format!(
                            "{} offers no supported SASL mechanism",
                            self.describe
                        )));
                    }
                    let s = ScramSha256::new(&pw, ChannelBinding::unsupported());
                    let mut out = BytesMut::new();
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .map_err(|e| Error::permanent(e.to_string()))?;
                    self.send(&out).await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| Error::permanent("unexpected SASL continuation"))?;
                    s.update(body.data()).map_err(|e| {
                        Error::permanent(format!("SCRAM authentication failed: {e}"))
                    })?;
                    let mut out = BytesMut::new();
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(|e| Error::permanent(e.to_string()))?;
                    self.send(&out).await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| Error::permanent("unexpected SASL final message"))?;
                    s.finish(body.data()).map_err(|e| {
                        Error::permanent(format!("SCRAM server verification failed: {e}"))
                    })?;
                }
                backend::Message::ErrorResponse(body) => {
                    return Err(db_error(
                        &body,
                        &format!("connecting to {} for replication", self.describe),
                    ));
                }
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ParameterStatus(p) => {
                    if p.name().ok() == Some("server_version") {
                        self.version = p.value().ok().and_then(ServerVersion::parse);
                    }
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                _ => {
                    return Err(Error::permanent(format!(
                        "{} asked for an authentication method pgferry does not support (only trust, password, md5 and SCRAM-SHA-256)",
                        self.describe
                    )));
                }
            }
        }
    }

    /// Runs one command over the simple query protocol; returns its rows. Not while streaming (see
    /// [`WireClient::stop_replication`]).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>> {
        self.ready_for_commands().await?;
        self.busy = Some("running a command");
        let rows = self.simple_query_inner(sql).await;
        self.busy = None;
        rows
    }

    async fn simple_query_inner(&mut self, sql: &str) -> Result<Vec<Row>> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| Error::permanent(e.to_string()))?;
        self.send(&out).await?;
        let mut columns: Vec<String> = Vec::new();
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next().await? {
                backend::Message::RowDescription(body) => {
                    columns = body
                        .fields()
                        .map(|f| Ok(f.name().to_string()))
                        .collect()
                        .map_err(|e| Error::permanent(e.to_string()))?;
                }
                backend::Message::DataRow(body) => {
                    let buffer = body.buffer();
                    let values: Vec<Option<String>> = body
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned())))
                        .collect()
                        .map_err(|e| Error::permanent(e.to_string()))?;
                    rows.push(Row {
                        columns: columns.clone(),
                        values,
                    });
                }
                backend::Message::ErrorResponse(body) => {
                    error = Some(db_error(&body, &format!("running `{}`", first_words(sql))));
                }
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Ends the stream and brings the session back to command mode, discarding the changes still in
    /// flight (read and dropped one by one). The server notices the request only between the
    /// messages it decodes, so this can take as long as the rest of a large transaction. Does
    /// nothing when not streaming.
    pub async fn stop_replication(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.mode == Mode::Idle {
            return Ok(());
        }
        self.busy = Some("stopping replication");
        if self.mode == Mode::Streaming {
            self.mode = Mode::Ending {
                send_copy_done: true,
            };
        }
        self.finish_stream().await?;
        self.busy = None;
        Ok(())
    }

    /// Whether a whole message has been read already and waits in the buffer: the next read
    /// returns it without waiting on the socket.
    pub fn has_buffered_message(&self) -> bool {
        self.head_frame()
            .and_then(|(_, total)| total)
            .is_some_and(|total| self.buf.len() >= total)
    }

    /// The message at the head of the read buffer, once its header (tag and length) is in: its
    /// length field, and its whole size with the tag (`None` when the length is invalid).
    fn head_frame(&self) -> Option<(i32, Option<usize>)> {
        let header = self.buf.get(..5)?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let total = usize::try_from(len).ok().filter(|&l| l >= 4).map(|l| l + 1);
        Some((len, total))
    }

    /// Whether the session is in copy-both mode.
    pub fn is_streaming(&self) -> bool {
        self.mode == Mode::Streaming
    }

    pub(super) fn not_streaming(&self) -> Error {
        Error::permanent(format!(
            "the replication session to {} is not streaming",
            self.describe
        ))
    }

    /// Reads the end of a stream up to ReadyForQuery (sending our CopyDone first if owed).
    pub(super) async fn finish_stream(&mut self) -> Result<()> {
        if let Mode::Ending {
            send_copy_done: true,
        } = self.mode
        {
            let mut out = BytesMut::new();
            frontend::copy_done(&mut out);
            self.send(&out).await?;
            self.mode = Mode::Ending {
                send_copy_done: false,
            };
        }
        loop {
            let (tag, body) = self.next_frame().await?;
            match tag {
                backend::READY_FOR_QUERY_TAG => {
                    self.mode = Mode::Idle;
                    return Ok(());
                }
                backend::ERROR_RESPONSE_TAG => {
                    let e = self.server_error(tag, body, "ending the replication stream");
                    tracing::debug!(error = %e, "error while ending the replication stream");
                }
                backend::NOTICE_RESPONSE_TAG => self.log_notice(tag, body),
                // Changes still in flight, the server's CopyDone, CommandComplete.
                _ => {}
            }
        }
    }

    /// Fails if an earlier operation was abandoned half-way.
    pub(super) fn check_usable(&self) -> Result<()> {
        match self.busy {
            None => Ok(()),
            Some(what) => Err(Error::transient(format!(
                "the replication session to {} was interrupted while {what}; it must be reopened",
                self.describe
            ))),
        }
    }

    /// Checks the session can run a command, finishing a stream the server already ended.
    pub(super) async fn ready_for_commands(&mut self) -> Result<()> {
        self.check_usable()?;
        match self.mode {
            Mode::Idle => Ok(()),
            Mode::Streaming => Err(Error::permanent(format!(
                "the replication session to {} is streaming; stop the stream before running commands",
                self.describe
            ))),
            Mode::Ending { .. } => self.stop_replication().await,
        }
    }

    /// The next whole message from the server: its tag and body. Framed here rather than by
    /// `backend::Message::parse`, which does not know CopyBothResponse. Cancellation-safe: what was
    /// read stays in `self.buf`, and a message leaves it only when returned.
    pub(super) async fn next_frame(&mut self) -> Result<(u8, Bytes)> {
        loop {
            let mut want = READ_CHUNK;
            if let Some((len, total)) = self.head_frame() {
                let Some(total) = total else {
                    return Err(Error::permanent(format!(
                        "replication protocol error from {}: invalid message length {len}",
                        self.describe
                    )));
                };
                if self.buf.len() >= total {
                    let frame = self.buf.split_to(total).freeze();
                    return Ok((frame[0], frame.slice(5..)));
                }
                want = want.max(total - self.buf.len());
            }
            self.buf.reserve(want);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| io_err(e, "reading", &self.describe))?;
            if n == 0 {
                return Err(Error::transient(format!(
                    "the replication connection to {} was closed by the server",
                    self.describe
                )));
            }
        }
    }

    /// Parses a frame that postgres-protocol knows (errors, notices) with postgres-protocol.
    fn parse_frame(tag: u8, body: &Bytes) -> Option<backend::Message> {
        let mut buf = BytesMut::with_capacity(body.len() + 5);
        buf.put_u8(tag);
        buf.put_i32(i32::try_from(body.len() + 4).ok()?);
        buf.extend_from_slice(body);
        backend::Message::parse(&mut buf).ok().flatten()
    }

    pub(super) fn server_error(&self, tag: u8, body: Bytes, doing: &str) -> Error {
        match Self::parse_frame(tag, &body) {
            Some(backend::Message::ErrorResponse(b)) => db_error(&b, doing),
            _ => Error::permanent(format!(
                "{doing}: {} sent an unreadable error message",
                self.describe
            )),
        }
    }

    pub(super) fn log_notice(&self, tag: u8, body: Bytes) {
        if let Some(backend::Message::NoticeResponse(b)) = Self::parse_frame(tag, &body) {
            let mut fields = b.fields();
            while let Ok(Some(f)) = fields.next() {
                if f.type_() == b'M' {
                    tracing::info!(
                        server = %self.describe,
                        "replication notice: {}",
                        String::from_utf8_lossy(f.value_bytes())
                    );
                }
            }
        }
    }

    pub(super) fn unexpected(&self, tag: u8, doing: &str) -> Error {
        Error::permanent(format!(
            "replication protocol error from {}: unexpected message type {:?} while {doing}",
            self.describe,
            char::from(tag)
        ))
    }

    /// The server's version, as it reported it at startup (`None` when it did not: a pooler).
    pub fn server_version(&self) -> Option<ServerVersion> {
        self.version
    }

    /// Sends the version's session setup ([`ServerVersion::session_setup_sql`]) on a plain session.
    pub async fn set_up_session(&mut self) -> Result<()> {
        if let Some(sql) = self.version.and_then(ServerVersion::session_setup_sql) {
            self.simple_query(sql)
                .await
                .map_err(|e| e.context("setting up the session"))?;
        }
        Ok(())
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.send(&out).await;
    }
}

fn first_words(sql: &str) -> String {
    sql.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Negotiates TLS on a fresh stream (SSLRequest), as `sslmode` asks.
async fn negotiate_tls(
    mut raw: BoxedStream,
    conn: &ConnInfo,
    mode: TlsMode,
    host: &str,
    describe: &str,
) -> Result<BoxedStream> {
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    raw.write_all(&out)
        .await
        .map_err(|e| io_err(e, "writing", describe))?;
    raw.flush()
        .await
        .map_err(|e| io_err(e, "writing", describe))?;
    let mut answer = [0u8; 1];
    raw.read_exact(&mut answer)
        .await
        .map_err(|e| io_err(e, "reading", describe))?;
    match answer[0] {
        b'S' => {
            let connector = postgres_native_tls::TlsConnector::new(conn.native_tls(mode)?, host);
            let tls = connector.connect(raw).await.map_err(|e| {
                let err = Error::permanent(format!("TLS handshake with {describe} failed: {e}"));
                match crate::pg::connect::tls_hint(&err.message) {
                    Some(hint) => err.hint(hint),
                    None => err,
                }
            })?;
            Ok(BoxedStream(Box::new(tls)))
        }
        b'N' if matches!(mode, TlsMode::Allow | TlsMode::Prefer) => Ok(raw),
        b'N' => Err(Error::permanent(format!(
            "{describe} does not accept TLS connections, and sslmode requires TLS"
        ))
        .hint("enable ssl on the server, or lower sslmode")),
        other => Err(Error::permanent(format!(
            "unexpected answer {other} to the TLS request from {describe}"
        ))),
    }
}

fn db_error(body: &backend::ErrorResponseBody, doing: &str) -> Error {
    let mut severity = String::from("ERROR");
    let mut code = String::new();
    let mut message = String::new();
    let mut hint = None;
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    let mut e = Error {
        kind: classify_sqlstate(&code),
        message: format!("{doing}: {severity}: {message}"),
        context: Vec::new(),
        hint,
        sqlstate: (!code.is_empty()).then_some(code),
    };
    if e.hint.is_none()
        && e.sqlstate
            .as_deref()
            .is_some_and(|c| c == "28P01" || c == "28000")
    {
        e.hint = Some("check the user and password, and that pg_hba.conf allows replication connections for this user".into());
    }
    e
}
