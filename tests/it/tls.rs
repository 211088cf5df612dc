//! TLS against a real server with a certificate signed by a CA the test makes with the `openssl`
//! CLI (skipped loudly when openssl is missing): `sslmode` require, verify-ca and verify-full for
//! ordinary connections (`ConnInfo::connect`) and replication connections
//! (`ReplicationClient::connect`), with `sslrootcert` in the URL; each session checked to really
//! be encrypted in `pg_stat_ssl`. verify-full to a host name the certificate does not name, and
//! verify-ca with another CA, are refused with an error that says why. A whole online plan (pg_dump
//! and psql children included) runs over verify-full.
//!
//! The server's certificate names `localhost` only (CN and SAN), so `localhost` passes verify-full
//! and `127.0.0.1` — the same server — is the wrong host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::{self, Cluster, PASSWORD, PASSWORD_VAR, TestPlan, pair, row_digest, show};
use pgferry::pg::connect::ConnInfo;
use pgferry::pg::replication::ReplicationClient;
use pgferry::plan::Endpoint;
use pgferry::secret::Secret;

struct Tls {
    cluster: Cluster,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server has.
    other_ca: PathBuf,
    _dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The TLS cluster of this test binary, or `None` without the openssl CLI (a failure under CI, a
/// loud SKIPPED line naming the test elsewhere: `support::missing`).
fn tls() -> Option<&'static Tls> {
    static TLS: OnceLock<Option<Tls>> = OnceLock::new();
    let tls = TLS.get_or_init(|| {
        if Command::new("openssl").arg("version").output().is_err() {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for ca in ["ca", "other_ca"] {
            openssl(
                d,
                &[
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
                    &format!("{ca}.key"), "-out", &format!("{ca}.crt"), "-subj",
                    &format!("/CN=pgferry test {ca}"),
                ],
            );
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        )
        .expect("write extensions");
        openssl(
            d,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
                "server.csr", "-subj", "/CN=localhost",
            ],
        );
        openssl(
            d,
            &[
                "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt",
            ],
        );
        let read = |f: &str| std::fs::read(d.join(f)).expect("read certificate");
        let (crt, key) = (read("server.crt"), read("server.key"));
        let cluster = Cluster::start_with(
            "tls",
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'",
            &[("server.crt", &crt), ("server.key", &key)],
        );
        Some(Tls {
            cluster,
            ca: d.join("ca.crt"),
            other_ca: d.join("other_ca.crt"),
            _dir: dir,
        })
    });
    if tls.is_none() {
        support::missing(
            "the openssl CLI is not installed",
            "apt-get install openssl",
        );
    }
    tls.as_ref()
}

fn conn(host: &str, port: u16, query: &str) -> ConnInfo {
    ConnInfo::new(
        &Endpoint {
            url: format!("postgres://postgres@{host}:{port}/postgres?{query}"),
            password: Some(Secret::new(PASSWORD)),
        },
        None,
    )
    .expect("connection info")
}

/// Connects ordinarily and for replication; checks both sessions are encrypted.
async fn both_connect(tls: &Tls, host: &str, query: &str) {
    let c = conn(host, tls.cluster.port, query);
    let client = c
        .connect("tls test")
        .await
        .unwrap_or_else(|e| panic!("{query}: ordinary connection failed: {e}"));
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "{query}: the ordinary session is not encrypted");

    let mut repl = ReplicationClient::connect(&c, "tls replication test")
        .await
        .unwrap_or_else(|e| panic!("{query}: replication connection failed: {e}"));
    let rows = repl
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .expect("IDENTIFY_SYSTEM");
    assert!(rows[0].get("xlogpos").is_some_and(|l| l.contains('/')));
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'pgferry tls replication test' AND a.backend_type = 'walsender' AND s.ssl",
            &[],
        )
        .await
        .expect("pg_stat_ssl of the walsender")
        .get(0);
    assert_eq!(
        encrypted, 1,
        "{query}: the replication session is not encrypted"
    );
    repl.close().await;
}

/// Both kinds of connection fail; both errors contain `expected` and the hint `hint`.
async fn both_refused(tls: &Tls, host: &str, query: &str, expected: &[&str], hint: &str) {
    let c = conn(host, tls.cluster.port, query);
    let err = match c.connect("tls test").await {
        Ok(_) => panic!("{query} to {host}: the ordinary connection should be refused"),
        Err(e) => {
            let h = e.hint.clone().unwrap_or_default();
            assert!(h.contains(hint), "{query} to {host}: hint {h:?} for {e}");
            format!("{e}")
        }
    };
    eprintln!("[test] {query} to {host}: {err}");
    for word in expected {
        assert!(
            err.contains(word),
            "{query} to {host}: error lacks `{word}`: {err}"
        );
    }
    assert!(!err.contains(PASSWORD), "{err}");
    let err = match ReplicationClient::connect(&c, "tls replication test").await {
        Ok(_) => panic!("{query} to {host}: the replication connection should be refused"),
        Err(e) => {
            let h = e.hint.clone().unwrap_or_default();
            assert!(
                h.contains(hint),
                "replication, {query} to {host}: hint {h:?} for {e}"
            );
            format!("{e}")
        }
    };
    eprintln!("[test] replication, {query} to {host}: {err}");
    for word in expected {
        assert!(
            err.contains(word),
            "{query} to {host}: replication error lacks `{word}`: {err}"
        );
    }
}

#[tokio::test]
async fn require_verify_ca_and_verify_full_connect_encrypted() {
    let Some(tls) = tls() else { return };
    let ca = tls.ca.display().to_string();
    both_connect(tls, "127.0.0.1", "sslmode=require").await;
    both_connect(
        tls,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    )
    .await;
    both_connect(
        tls,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    )
    .await;
}

#[tokio::test]
async fn verify_full_refuses_a_host_the_certificate_does_not_name() {
    let Some(tls) = tls() else { return };
    let ca = tls.ca.display().to_string();
    // The same server and CA: only the name differs.
    both_refused(
        tls,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
        &["127.0.0.1", "certificate", "mismatch"],
        "does not name the host",
    )
    .await;
}

#[tokio::test]
async fn verify_ca_refuses_a_certificate_of_another_ca() {
    let Some(tls) = tls() else { return };
    let other = tls.other_ca.display().to_string();
    both_refused(
        tls,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
        &["certificate verify failed"],
        "point sslrootcert",
    )
    .await;
    both_refused(
        tls,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
        &["certificate verify failed"],
        "point sslrootcert",
    )
    .await;
    // A root certificate file that does not exist is an error, not "trust the system's CAs".
    both_refused(
        tls,
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
        &["sslrootcert /nonexistent/ca.crt does not exist"],
        "point sslrootcert",
    )
    .await;
}

#[tokio::test]
async fn require_refuses_a_server_without_tls() {
    let p = pair();
    let c = conn("127.0.0.1", p.source.port, "sslmode=require");
    let err = c.connect("tls test").await.expect_err("refused");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    let Err(err) = ReplicationClient::connect(&c, "tls test").await else {
        panic!("refused");
    };
    assert!(
        err.to_string().contains("does not accept TLS connections"),
        "{err}"
    );
}

/// An online plan whose source and target (two databases of the TLS server) are reached with
/// verify-full: the schema dump and restore (pg_dump, psql), the copy and cdc all go over TLS.
#[test]
fn an_online_plan_runs_over_verify_full() {
    let Some(tls) = tls() else { return };
    let c = &tls.cluster;
    let s = c.fresh_database("tls_src");
    let t = c.fresh_database("tls_tgt");
    c.psql(
        &s,
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);\n\
         INSERT INTO public.t SELECT g, md5(g::text) FROM generate_series(1, 1000) g;",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plan.toml");
    let url = |db: &str| {
        format!(
            "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
            c.port,
            tls.ca.display()
        )
    };
    std::fs::write(
        &path,
        format!(
            "version = 1\nname = \"tls_plan\"\n\n\
             [source]\nurl = \"{}\"\npassword = \"{{{{ env.{PASSWORD_VAR} }}}}\"\n\n\
             [target]\nurl = \"{}\"\npassword = \"{{{{ env.{PASSWORD_VAR} }}}}\"\n\n\
             [[databases]]\nname = \"{s}\"\ntarget = \"{t}\"\n\n\
             [stages.schema]\nkind = \"schema_dump\"\n\n\
             [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
             [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
             [stages.cdc]\nkind = \"cdc\"\nafter = [\"load\"]\n",
            url(&s),
            url(&t)
        ),
    )
    .expect("write plan");
    let plan = TestPlan {
        dir,
        path,
        name: "tls_plan".into(),
        source_db: s.clone(),
        target_db: t.clone(),
        bindir: None,
    };
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    c.psql(
        &s,
        "UPDATE public.t SET v = 'changed' WHERE id % 10 = 0; DELETE FROM public.t WHERE id > 990;",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(row_digest(c, &s, "public.t"), row_digest(c, &t, "public.t"));
    assert!(row_digest(c, &t, "public.t").starts_with("990:"));
}
