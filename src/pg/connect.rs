//! Ordinary connections: a plan endpoint (libpq URL or `key=value` string) plus what libpq would also
//! read (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGSSLMODE, PGSSLROOTCERT, ~/.pgpass), turned into a
//! tokio-postgres connection with TLS as `sslmode` asks (disable, allow, prefer, require, verify-ca,
//! verify-full). Passwords are never part of anything this module prints.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config, NoTls};

use crate::error::{Error, Result};
use crate::pg::version::ServerVersion;
use crate::plan::Endpoint;

/// How TLS is negotiated (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for TlsMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<TlsMode> {
        Ok(match s {
            "disable" => TlsMode::Disable,
            "allow" => TlsMode::Allow,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(Error::permanent(format!("invalid sslmode `{other}`"))
                    .hint("use disable, allow, prefer, require, verify-ca or verify-full"));
            }
        })
    }
}

/// Everything needed to open connections to one server.
#[derive(Clone)]
pub struct ConnInfo {
    config: Config,
    tls: TlsMode,
    root_cert: Option<PathBuf>,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnInfo({})", self.describe())
    }
}

/// libpq-style parameters that tokio-postgres does not parse itself; we take them out first.
const TLS_KEYS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslpassword",
];

impl ConnInfo {
    /// Builds connection settings for `endpoint`, connecting to database `dbname` when given (else
    /// the URL's own database).
    pub fn new(endpoint: &Endpoint, dbname: Option<&str>) -> Result<ConnInfo> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (rest, tls_params) = split_tls_params(&endpoint.url);
        let mut config = Config::from_str(&rest).map_err(|e| {
            Error::permanent(format!("invalid connection string `{}`: {e}", endpoint.display()))
                .hint("use a URL such as postgres://user@host:5432/dbname?sslmode=require, or key=value pairs")
        })?;
        if config.get_hosts().is_empty() {
            match env("PGHOST") {
                Some(h) => {
                    config.host(&h);
                }
                None => {
                    config.host_path("/var/run/postgresql");
                }
            }
        }
        if config.get_ports().is_empty() {
            let port = env("PGPORT").and_then(|p| p.parse().ok()).unwrap_or(5432);
            config.port(port);
        }
        if config.get_user().is_none() {
            let user = env("PGUSER")
                .or_else(|| env("USER"))
                .unwrap_or_else(|| "postgres".into());
            config.user(&user);
        }
        if let Some(db) = dbname {
            config.dbname(db);
        } else if config.get_dbname().is_none()
            && let Some(db) = env("PGDATABASE")
        {
            config.dbname(&db);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.keepalives_idle(Duration::from_secs(30));
        // Password: the plan's, else the URL's, else PGPASSWORD, else the password file.
        if let Some(pw) = &endpoint.password
            && !pw.expose().is_empty()
        {
            config.password(pw.expose());
        }
        if config.get_password().is_none() {
            if let Some(pw) = env("PGPASSWORD") {
                config.password(pw);
            } else if let Some(pw) = pgpass_lookup(&config) {
                config.password(pw);
            }
        }
        let mode = match tls_params.iter().find(|(k, _)| k == "sslmode") {
            Some((_, v)) => v.parse()?,
            None => match env("PGSSLMODE") {
                Some(v) => v.parse()?,
                None => TlsMode::Prefer,
            },
        };
        let root_cert = tls_params
            .iter()
            .find(|(k, _)| k == "sslrootcert")
            .map(|(_, v)| PathBuf::from(v))
            .or_else(|| env("PGSSLROOTCERT").map(PathBuf::from));
        config.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Allow | TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        Ok(ConnInfo {
            config,
            tls: mode,
            root_cert,
        })
    }

    /// `user@host:port/dbname`, for messages. Never includes the password.
    pub fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{}:{}/{}",
            self.config.get_user().unwrap_or("?"),
            host,
            port,
            self.dbname()
        )
    }

    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("")
    }

    /// The same server, another database.
    pub fn with_dbname(&self, dbname: &str) -> ConnInfo {
        let mut c = self.clone();
        c.config.dbname(dbname);
        c
    }

    /// The same endpoint for sessions that must write to a fenced source database (the cutover's
    /// own fence, cleanup, unfence): the fence is `default_transaction_read_only = on` on the
    /// database, which a session may override at startup.
    pub fn past_fence(&self) -> ConnInfo {
        let mut c = self.clone();
        let options = match self.config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c default_transaction_read_only=off"),
            _ => "-c default_transaction_read_only=off".to_string(),
        };
        c.config.options(&options);
        c
    }

    /// Host and port, which identify the server (used to tell whether two endpoints are the same).
    pub fn server_key(&self) -> String {
        let d = self.describe();
        d.rsplit_once('/').map(|(s, _)| s.to_string()).unwrap_or(d)
    }

    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or("")
    }

    /// The environment for a libpq child process (pg_dump, pg_restore, psql) that must reach the
    /// same server: PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD, PGSSLMODE, PGSSLROOTCERT,
    /// PGAPPNAME, PGCONNECT_TIMEOUT. The password travels only in the environment, never in
    /// arguments, so it does not show in `ps`.
    pub fn child_env(&self, purpose: &str) -> Vec<(String, String)> {
        let mut env = Vec::new();
        match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => env.push(("PGHOST".into(), h.clone())),
            Some(Host::Unix(p)) => env.push(("PGHOST".into(), p.display().to_string())),
            None => {}
        }
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        env.push(("PGPORT".into(), port.to_string()));
        env.push(("PGUSER".into(), self.user().to_string()));
        env.push(("PGDATABASE".into(), self.dbname().to_string()));
        if let Some(pw) = self.config.get_password() {
            env.push((
                "PGPASSWORD".into(),
                String::from_utf8_lossy(pw).into_owned(),
            ));
        }
        let mode = match self.tls {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        };
        env.push(("PGSSLMODE".into(), mode.into()));
        if let Some(root) = &self.root_cert {
            env.push(("PGSSLROOTCERT".into(), root.display().to_string()));
        }
        env.push(("PGAPPNAME".into(), format!("pgferry {purpose}")));
        env.push(("PGCONNECT_TIMEOUT".into(), "10".into()));
        env
    }

    /// Applies [`ConnInfo::child_env`] to a command, clearing the libpq variables it does not set.
    pub fn configure_child(&self, cmd: &mut tokio::process::Command, purpose: &str) {
        for k in [
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGPASSWORD",
            "PGPASSFILE",
            "PGSERVICE",
            "PGSSLMODE",
            "PGSSLROOTCERT",
            "PGAPPNAME",
            "PGOPTIONS",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in self.child_env(purpose) {
            cmd.env(k, v);
        }
    }

    /// The underlying tokio-postgres configuration (for the replication client).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn tls_mode(&self) -> TlsMode {
        self.tls
    }

    /// A TLS connector for this endpoint's `sslmode` (not for `disable`).
    pub fn make_tls(&self) -> Result<postgres_native_tls::MakeTlsConnector> {
        self.tls_connector(self.tls)
    }

    /// Opens a connection. `purpose` becomes part of `application_name`, so a DBA can see in
    /// `pg_stat_activity` what each pgferry session does.
    pub async fn connect(&self, purpose: &str) -> Result<Client> {
        Ok(self.connect_versioned(purpose).await?.0)
    }

    /// [`ConnInfo::connect`], also returning the server's version (what it reports at startup, so
    /// it costs no query).
    pub async fn connect_versioned(&self, purpose: &str) -> Result<(Client, ServerVersion)> {
        let mut config = self.config.clone();
        config.application_name(format!("pgferry {purpose}"));
        let describe = || format!("connecting to {}", self.describe());
        let version: Option<ServerVersion>;
        let client = match self.tls {
            TlsMode::Disable => {
                let (client, conn) = config
                    .connect(NoTls)
                    .await
                    .map_err(|e| connect_error(&e, describe()))?;
                version = conn
                    .parameter("server_version")
                    .and_then(ServerVersion::parse);
                spawn_connection(conn);
                client
            }
            mode => {
                let tls = self.tls_connector(mode)?;
                match config.connect(tls).await {
                    Ok((client, conn)) => {
                        version = conn
                            .parameter("server_version")
                            .and_then(ServerVersion::parse);
                        spawn_connection(conn);
                        client
                    }
                    // `allow`: try without TLS when the TLS attempt fails.
                    Err(_) if mode == TlsMode::Allow => {
                        config.ssl_mode(SslMode::Disable);
                        let (client, conn) = config
                            .connect(NoTls)
                            .await
                            .map_err(|e| connect_error(&e, describe()))?;
                        version = conn
                            .parameter("server_version")
                            .and_then(ServerVersion::parse);
                        spawn_connection(conn);
                        client
                    }
                    Err(e) => return Err(connect_error(&e, describe())),
                }
            }
        };
        // A pooler may not pass the startup parameters on: then ask.
        let version = match version {
            Some(v) => v,
            None => {
                let row = client
                    .query_one(
                        "SELECT pg_catalog.current_setting('server_version_num')::int4",
                        &[],
                    )
                    .await
                    .map_err(|e| {
                        Error::pg(
                            &e,
                            format!("reading the server version of {}", self.describe()),
                        )
                    })?;
                ServerVersion::from_num(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
            }
        };
        // Let the server notice a vanished client (a killed runner) and abort its statement instead
        // of finishing and committing it (where the version has the setting).
        if let Some(sql) = version.session_setup_sql() {
            client.batch_execute(sql).await.map_err(|e| {
                Error::pg(&e, format!("setting up the session on {}", self.describe()))
            })?;
        }
        Ok((client, version))
    }

    fn tls_connector(&self, mode: TlsMode) -> Result<postgres_native_tls::MakeTlsConnector> {
        Ok(postgres_native_tls::MakeTlsConnector::new(
            self.native_tls(mode)?,
        ))
    }

    /// The native-tls connector for `mode`, with libpq's verification rules.
    pub fn native_tls(&self, mode: TlsMode) -> Result<native_tls::TlsConnector> {
        let mut b = native_tls::TlsConnector::builder();
        // libpq refuses a named root certificate file that is missing when it must verify.
        if let Some(path) = &self.root_cert
            && !path.exists()
            && matches!(mode, TlsMode::VerifyCa | TlsMode::VerifyFull)
        {
            return Err(Error::permanent(format!(
                "sslrootcert {} does not exist, and sslmode={} needs it to verify the server",
                path.display(),
                if mode == TlsMode::VerifyCa { "verify-ca" } else { "verify-full" }
            ))
            .hint("point sslrootcert (in the URL, or PGSSLROOTCERT) at the PEM file of the CA that signed the server's certificate"));
        }
        let root = self.root_cert.as_ref().filter(|p| p.exists());
        if let Some(path) = root {
            let pem = std::fs::read(path).map_err(|e| {
                Error::permanent(format!("cannot read sslrootcert {}: {e}", path.display()))
            })?;
            let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| {
                Error::permanent(format!(
                    "sslrootcert {} is not a PEM certificate: {e}",
                    path.display()
                ))
            })?;
            b.add_root_certificate(cert);
        }
        match mode {
            // libpq: `require` verifies the CA only when a root certificate is configured.
            TlsMode::Allow | TlsMode::Prefer | TlsMode::Require if root.is_none() => {
                b.danger_accept_invalid_certs(true);
                b.danger_accept_invalid_hostnames(true);
            }
            TlsMode::Allow | TlsMode::Prefer | TlsMode::Require | TlsMode::VerifyCa => {
                b.danger_accept_invalid_hostnames(true);
            }
            TlsMode::VerifyFull | TlsMode::Disable => {}
        }
        b.build()
            .map_err(|e| Error::permanent(format!("cannot set up TLS: {e}")))
    }
}

fn connect_error(e: &tokio_postgres::Error, doing: String) -> Error {
    let mut err = Error::pg(e, doing);
    if err.hint.is_none()
        && let Some(hint) = tls_hint(&err.message)
    {
        err.hint = Some(hint.into());
    }
    if err.hint.is_none() && err.sqlstate.is_none() {
        err.hint = Some(
            "check that the server is running and reachable from here (host, port, firewall, pg_hba.conf)".into(),
        );
    }
    err
}

/// What to do about a failed TLS handshake, from OpenSSL's reason (`IP address mismatch`,
/// `hostname mismatch`, `unable to get local issuer certificate`, `self-signed certificate`).
pub fn tls_hint(message: &str) -> Option<&'static str> {
    if message.contains("address mismatch") || message.contains("hostname mismatch") {
        Some(
            "the server's certificate does not name the host connected to (sslmode=verify-full checks its CN and subjectAltName): connect with a host name the certificate lists, or use sslmode=verify-ca to check the CA only",
        )
    } else if message.contains("certificate verify failed") {
        Some(
            "the server's certificate is not signed by a CA pgferry trusts: point sslrootcert (in the URL, or PGSSLROOTCERT) at the CA that signed it",
        )
    } else {
        None
    }
}

fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection closed with an error");
        }
    });
}

/// Takes the TLS parameters out of a connection string (URL query or key=value), returning the rest.
fn split_tls_params(url: &str) -> (String, Vec<(String, String)>) {
    let mut found = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), found);
        };
        let mut keep = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_KEYS.contains(&k) {
                found.push((k.to_string(), percent_decode(v)));
            } else {
                keep.push(pair);
            }
        }
        let rest = if keep.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", keep.join("&"))
        };
        (rest, found)
    } else {
        let mut keep = Vec::new();
        for (k, v) in split_keyvalues(url) {
            if TLS_KEYS.contains(&k.as_str()) {
                found.push((k, v));
            } else {
                keep.push(format!(
                    "{k}='{}'",
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
        (keep.join(" "), found)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq key=value syntax: `host=h port=5432 password='a b'`.
fn split_keyvalues(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() == Some(&'=') {
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
    out
}

/// Looks the connection up in the password file (PGPASSFILE or ~/.pgpass), as libpq does: lines of
/// `host:port:database:user:password`, `*` matches anything, `\` escapes `:` and `\`. The file is
/// ignored (with a warning) when group or others can read it.
fn pgpass_lookup(config: &Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "password file has group or world access; ignoring it (chmod 0600 to use it)"
            );
            return None;
        }
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let db = config.get_dbname().unwrap_or("");
    let user = config.get_user().unwrap_or("");
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        let ok = |pat: &str, val: &str| pat == "*" || pat == val;
        if ok(&fields[0], &host)
            && ok(&fields[1], &port)
            && ok(&fields[2], db)
            && ok(&fields[3], user)
        {
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(n), Some(f)) = (chars.next(), fields.last_mut()) {
                    f.push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c)
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn tls_params_are_split_from_urls() {
        let (rest, tls) = split_tls_params(
            "postgres://u@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(
            tls,
            vec![
                ("sslmode".into(), "verify-full".into()),
                ("sslrootcert".into(), "/tmp/ca.pem".into())
            ]
        );
        let (rest, tls) = split_tls_params("host=h sslmode=require password='a b'");
        assert_eq!(rest, "host='h' password='a b'");
        assert_eq!(tls, vec![("sslmode".into(), "require".into())]);
    }

    #[test]
    fn endpoint_password_and_dbname() {
        let ep = Endpoint {
            url: "postgres://dms@db.example:6432/app?sslmode=require".into(),
            password: Some(Secret::new("pw")),
        };
        let ci = ConnInfo::new(&ep, Some("other")).unwrap();
        assert_eq!(ci.describe(), "dms@db.example:6432/other");
        assert_eq!(ci.tls, TlsMode::Require);
        assert!(!format!("{ci:?}").contains("pw"));
        let bad = Endpoint {
            url: "postgres://h/db?sslmode=sometimes".into(),
            password: None,
        };
        assert!(
            ConnInfo::new(&bad, None)
                .unwrap_err()
                .message
                .contains("invalid sslmode")
        );
    }

    #[test]
    fn pgpass_lines() {
        assert_eq!(
            split_pgpass_line("h:5432:*:u:p\\:w:x"),
            vec!["h", "5432", "*", "u", "p:w:x"]
        );
    }
}
