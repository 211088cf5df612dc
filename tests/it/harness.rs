//! Tests of the integration-test harness itself (tests/support).

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::support::{Cluster, PASSWORD, load_pagila, pair, pgferry, row_digest};

fn clusters() -> [&'static Cluster; 2] {
    let p = pair();
    [&p.source, &p.target]
}

#[test]
fn both_clusters_answer_select_1_via_psql() {
    let [source, target] = clusters();
    assert_ne!(source.port, target.port);
    assert_ne!(source.dir, target.dir);
    for c in [source, target] {
        assert_eq!(c.psql("postgres", "select 1"), "1", "cluster {}", c.name);
        assert!(c.data_dir.join("PG_VERSION").is_file());
        assert!(c.bindir.join("psql").is_file());
    }
}

#[tokio::test]
async fn both_clusters_answer_select_1_via_client() {
    for c in clusters() {
        let client = c.client("postgres").await;
        let row = client.query_one("select 1::int4", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1, "cluster {}", c.name);
    }
}

#[test]
fn clusters_are_configured_for_logical_replication() {
    for c in clusters() {
        assert_eq!(
            c.psql("postgres", "show wal_level"),
            "logical",
            "{}",
            c.name
        );
        assert_eq!(c.psql("postgres", "show max_replication_slots"), "32");
        assert_eq!(c.psql("postgres", "show max_wal_senders"), "32");
        assert_eq!(c.psql("postgres", "show max_connections"), "200");
        assert_eq!(c.psql("postgres", "show listen_addresses"), "127.0.0.1");
        assert_eq!(c.psql("postgres", "show server_encoding"), "UTF8");
        assert_eq!(c.psql("postgres", "show fsync"), "off");
        assert_eq!(
            c.psql("postgres", "show port"),
            c.port.to_string(),
            "{}",
            c.name
        );
        assert_eq!(
            c.psql("postgres", "show unix_socket_directories"),
            c.dir.display().to_string()
        );
    }
}

#[test]
fn fresh_databases_are_distinct_and_exist() {
    let c = &pair().source;
    let a = c.fresh_database("Harness-Test");
    let b = c.fresh_database("Harness-Test");
    assert_ne!(a, b);
    for name in [&a, &b] {
        assert!(name.starts_with("harness_test_"), "{name}");
        assert!(
            name.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
            "{name}"
        );
        let exists = c.psql(
            "postgres",
            &format!("select count(*) from pg_database where datname = '{name}'"),
        );
        assert_eq!(exists, "1", "database {name} should exist");
        assert_eq!(c.psql(name, "select current_database()"), *name);
    }

    // Unique across threads, and long prefixes still fit in an identifier.
    let names: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| c.fresh_database(&"Very-Long Prefix ".repeat(8))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    for name in &names {
        assert!(name.len() <= 63, "{name}");
        assert_eq!(c.psql(name, "select current_database()"), *name);
    }
}

#[tokio::test]
async fn tcp_connections_require_the_password() {
    for c in clusters() {
        // No password: refused.
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(c.port)
            .user("postgres")
            .dbname("postgres");
        let err = config
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .expect("a password-less TCP connection must be refused");
        let text = format!("{err} / {:?}", std::error::Error::source(&err));
        assert!(
            text.contains("password missing"),
            "unexpected error for {}: {text}",
            c.name
        );

        // Wrong password: refused by the server.
        config.password("not-the-password");
        let err = config
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .expect("a wrong password must be refused");
        let db_err = err.as_db_error().expect("server-side auth error");
        assert_eq!(db_err.code().code(), "28P01", "{err}");

        // With the password (built from the URL helper): accepted.
        let url = c.url_with_password("postgres");
        let config: tokio_postgres::Config = url.parse().unwrap();
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "postgres");

        // psql without PGPASSWORD (and no prompting) is refused, too.
        let out = Command::new(c.bindir.join("psql"))
            .args(["-X", "-w", "-At", "-c", "select 1", "--dbname"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                c.port
            ))
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/dev/null")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "psql without password succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no password supplied"), "{stderr}");
    }
}

#[test]
fn urls_hide_or_encode_the_password() {
    let c = &pair().target;
    assert_eq!(
        c.url("app_db"),
        format!("postgres://postgres@127.0.0.1:{}/app_db", c.port)
    );
    assert!(!c.url("app_db").contains(PASSWORD));
    assert_eq!(
        c.url_with_password("app_db"),
        format!(
            "postgres://postgres:ferry-Secret-7x%21@127.0.0.1:{}/app_db",
            c.port
        )
    );
}

#[test]
fn replication_connections_are_allowed_with_the_password() {
    for c in clusters() {
        for mode in ["database", "true"] {
            let out = Command::new(c.bindir.join("psql"))
                .args(["-X", "-w", "-At", "-c", "IDENTIFY_SYSTEM", "--dbname"])
                .arg(format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres replication={mode}",
                    c.port
                ))
                .env("PGPASSWORD", PASSWORD)
                .env("PGPASSFILE", "/dev/null")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "replication={mode} on {}: {}",
                c.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn pg_ctl_restart_and_server_log_work() {
    // A dedicated cluster, so restarting it can't disturb the shared pair.
    let c = Cluster::start("restart-check");
    let port = c.port;
    c.psql(
        "postgres",
        "do $$ begin raise warning 'pgferry-harness-marker-1'; end $$",
    );
    c.pg_ctl(&["restart", "-m", "fast"]);
    assert_eq!(c.port, port);
    assert_eq!(c.psql("postgres", "show wal_level"), "logical");
    c.psql(
        "postgres",
        "do $$ begin raise warning 'pgferry-harness-marker-2'; end $$",
    );
    let log = c.server_log();
    assert!(log.contains("pgferry-harness-marker-1"), "log:\n{log}");
    assert!(log.contains("pgferry-harness-marker-2"), "log:\n{log}");
    c.pg_ctl(&["stop", "-m", "fast"]);
    assert!(!c.data_dir.join("postmaster.pid").exists());
}

#[test]
fn pagila_loads_and_row_digest_is_stable() {
    let c = &pair().source;
    let db = c.fresh_database("pagila");
    let started = Instant::now();
    if !load_pagila(c, &db) {
        return;
    }
    eprintln!("pagila load took {:.2?}", started.elapsed());
    assert_eq!(c.psql(&db, "select count(*) from public.actor"), "200");
    assert_eq!(c.psql(&db, "select count(*) from public.film"), "1000");
    let digest = row_digest(c, &db, "public.actor");
    let (count, md5) = digest.split_once(':').unwrap();
    assert_eq!(count, "200");
    assert_eq!(md5.len(), 32, "{digest}");
    assert_eq!(row_digest(c, &db, "public.actor"), digest);
    // Same rows in a different physical order give the same digest.
    c.psql(
        &db,
        "create table public.actor_copy as select * from public.actor order by actor_id desc",
    );
    assert_eq!(row_digest(c, &db, "public.actor_copy"), digest);
    // Empty table.
    c.psql(&db, "create table public.\"Empty Table\" (id int)");
    assert_eq!(row_digest(c, &db, "public.\"Empty Table\""), "0:");
}

#[test]
fn pgferry_command_is_sanitized() {
    let cmd = pgferry();
    assert!(std::path::Path::new(cmd.get_program()).is_file());
    let envs: Vec<_> = cmd.get_envs().collect();
    assert!(envs.contains(&(std::ffi::OsStr::new("PGPASSWORD"), None)));
    assert!(envs.contains(&(
        std::ffi::OsStr::new("NO_COLOR"),
        Some(std::ffi::OsStr::new("1"))
    )));
}
