//! A thin client for PostgreSQL's replication protocol, on `postgres-protocol` (tokio-postgres has no
//! replication support). It opens a `replication=database` session with the same TLS settings and
//! authentication (trust, password, md5, SCRAM-SHA-256) as ordinary connections, and runs replication
//! commands over the simple query protocol — here, creating a logical slot that exports its snapshot,
//! which must stay open while the full load imports that snapshot.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::TlsConnect;

use crate::error::{Error, Result, classify_sqlstate};
use crate::pg::connect::{ConnInfo, TlsMode};
use crate::pg::ident::quote_ident;

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

/// A logical slot just created, with the snapshot it exported.
#[derive(Debug, Clone)]
pub struct SlotSnapshot {
    pub slot_name: String,
    /// The LSN from which the slot decodes; the snapshot shows exactly the data committed before it.
    pub consistent_point: String,
    /// The exported snapshot, valid while this session stays idle and open.
    pub snapshot_name: String,
}

/// A replication session.
pub struct ReplicationClient {
    stream: BoxedStream,
    buf: BytesMut,
    describe: String,
}

fn io_err(e: std::io::Error, doing: &str, describe: &str) -> Error {
    Error::transient(format!(
        "{doing} on the replication connection to {describe}: {e}"
    ))
}

impl ReplicationClient {
    /// Opens a `replication=database` session to the endpoint's database.
    pub async fn connect(conn: &ConnInfo, purpose: &str) -> Result<ReplicationClient> {
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
        let mut client = ReplicationClient {
            stream,
            buf: BytesMut::with_capacity(8192),
            describe,
        };
        client.startup(conn, purpose).await?;
        Ok(client)
    }

    async fn send(&mut self, out: &BytesMut) -> Result<()> {
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
        loop {
            match backend::Message::parse(&mut self.buf) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::permanent(format!(
                        "replication protocol error from {}: {e}",
                        self.describe
                    )));
                }
            }
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

    async fn startup(&mut self, conn: &ConnInfo, purpose: &str) -> Result<()> {
        let config = conn.config();
        let user = config.get_user().unwrap_or("postgres").to_string();
        let app = format!("pgferry {purpose}");
        let params = [
            ("user", user.as_str()),
            ("database", conn.dbname()),
            ("replication", "database"),
            ("application_name", app.as_str()),
            ("client_encoding", "UTF8"),
        ];
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut out)
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
                backend::Message::ParameterStatus(_)
                | backend::Message::BackendKeyData(_)
                | backend::Message::NoticeResponse(_) => {}
                _ => {
                    return Err(Error::permanent(format!(
                        "{} asked for an authentication method pgferry does not support (only trust, password, md5 and SCRAM-SHA-256)",
                        self.describe
                    )));
                }
            }
        }
    }

    /// Runs one command over the simple query protocol; returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>> {
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
            consistent_point: get("consistent_point")?,
            snapshot_name: get("snapshot_name")?,
        })
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
                Error::permanent(format!("TLS handshake with {describe} failed: {e}"))
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
