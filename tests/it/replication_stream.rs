//! Streaming logical replication against real clusters: every kind of pgoutput message decoded
//! exactly (types printed as text, TOAST left out, old keys and old rows), transactions paired and
//! ordered, a 100k-row transaction consumed in bounded memory, progress confirmed on the slot, and
//! keepalives answered on an idle stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::{Cluster, PASSWORD, pair, wait_for};
use bytes::Bytes;
use pgferry::pg::connect::ConnInfo;
use pgferry::pg::pgoutput::{
    Column, Commit, Delete, Insert, LogicalMessage, Lsn, OldTuple, Origin, PgOutputMessage,
    Relation, ReplicaIdentity, Truncate, TruncateOptions, TupleData, TupleValue, Type, Update,
    pg_time_now,
};
use pgferry::pg::replication::{ReplicationClient, ReplicationMessage, StreamOptions};
use pgferry::plan::Endpoint;
use pgferry::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(60);

fn conn_info(cluster: &Cluster, db: &str, options: Option<&str>) -> ConnInfo {
    let mut url = cluster.url(db);
    if let Some(o) = options {
        url.push_str("?options=");
        url.push_str(&o.replace(' ', "%20").replace('=', "%3D"));
    }
    ConnInfo::new(
        &Endpoint {
            url,
            password: Some(Secret::new(PASSWORD)),
        },
        None,
    )
    .expect("connection info")
}

async fn connect(cluster: &Cluster, db: &str, options: Option<&str>) -> ReplicationClient {
    ReplicationClient::connect(&conn_info(cluster, db, options), "replication test")
        .await
        .unwrap_or_else(|e| panic!("replication connection: {e}"))
}

/// The slot's `confirmed_flush_lsn`.
fn confirmed_flush(cluster: &Cluster, db: &str, slot: &str) -> Lsn {
    cluster
        .psql(
            db,
            &format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ),
        )
        .parse()
        .expect("an LSN")
}

/// Waits until the slot's confirmed position reaches `lsn` exactly.
fn assert_confirmed(cluster: &Cluster, db: &str, slot: &str, lsn: Lsn) {
    wait_for(
        &format!("confirmed_flush_lsn of {slot} to reach {lsn}"),
        Duration::from_secs(20),
        || confirmed_flush(cluster, db, slot) == lsn,
    );
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The next pgoutput message, answering keepalives that ask for a reply with `confirmed`.
async fn next_data(client: &mut ReplicationClient, confirmed: Lsn) -> PgOutputMessage {
    loop {
        let m = tokio::time::timeout(TIMEOUT, client.next_message())
            .await
            .expect("a message within the timeout")
            .unwrap_or_else(|e| panic!("reading the stream: {e}"));
        match m {
            ReplicationMessage::XLogData(x) => return x.data,
            ReplicationMessage::Keepalive(k) => {
                if k.reply_requested {
                    client
                        .send_status(confirmed, confirmed, confirmed, false)
                        .await
                        .expect("status update");
                }
            }
        }
    }
}

fn t(v: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(v.as_bytes()))
}

const N: TupleValue = TupleValue::Null;

fn tuple(values: Vec<TupleValue>) -> TupleData {
    TupleData { values }
}

fn col(flags: u8, name: &str, type_oid: u32, type_modifier: i32) -> Column {
    Column {
        flags,
        name: name.into(),
        type_oid,
        type_modifier,
    }
}

fn oid(cluster: &Cluster, db: &str, expr: &str) -> u32 {
    cluster
        .psql(db, &format!("SELECT ({expr})::oid"))
        .parse()
        .expect("an OID")
}

/// What the data part of the stream must hold: transaction boundaries and exact messages.
#[derive(Debug)]
enum Expect {
    Begin,
    Commit,
    Msg(PgOutputMessage),
}

#[tokio::test]
async fn every_kind_of_change_is_decoded_exactly() {
    let p = pair();
    let src = &p.source;
    let db = src.fresh_database("rs_changes");
    let publication = "pub \"Q\" it's";
    src.psql(
        &db,
        "CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE public.items (id int PRIMARY KEY, name varchar(10), t text, j jsonb, b bytea, n numeric,
                                    ts timestamptz, arr int[], m public.mood, big text);
         CREATE TABLE public.full_t (id int, v text);
         ALTER TABLE public.full_t REPLICA IDENTITY FULL;
         CREATE PUBLICATION \"pub \"\"Q\"\" it's\" FOR TABLE public.items, public.full_t;",
    );
    let items = oid(src, &db, "'public.items'::regclass");
    let full_t = oid(src, &db, "'public.full_t'::regclass");
    let mood = oid(src, &db, "'public.mood'::regtype");

    let mut client = connect(src, &db, None).await;
    let slot = format!("rs_changes_{}", std::process::id());
    let created = client.create_slot(&slot, false).await.expect("slot");
    let start = created.consistent_point;

    // The changes, one transaction per psql call unless BEGIN/COMMIT say otherwise.
    src.psql(
        &db,
        "INSERT INTO public.items VALUES
           (1, 'short', 'it''s ünïcode', '{\"a\": [1, \"x\"]}', '\\x00ff10', 'NaN', 'infinity', '{1,2,NULL}', 'happy',
            (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)),
           (2, NULL, NULL, NULL, NULL, NULL, '-infinity', '{}', NULL, NULL)",
    );
    let big = src.psql(&db, "SELECT big FROM public.items WHERE id = 1");
    assert_eq!(big.len(), 12_800);
    let toast = src.psql(
        &db,
        "SELECT reltoastrelid::regclass FROM pg_class WHERE oid = 'public.items'::regclass",
    );
    assert_ne!(
        src.psql(&db, &format!("SELECT count(*) FROM {toast}")),
        "0",
        "the big value is stored out of line"
    );
    src.psql(&db, "UPDATE public.items SET t = 'changed' WHERE id = 1");
    src.psql(&db, "UPDATE public.items SET id = 3 WHERE id = 2");
    src.psql(&db, "DELETE FROM public.items WHERE id = 3");
    src.psql(
        &db,
        "BEGIN;
         INSERT INTO public.full_t VALUES (1, 'a');
         UPDATE public.full_t SET v = 'b';
         DELETE FROM public.full_t;
         COMMIT;",
    );
    src.psql(&db, "TRUNCATE public.items, public.full_t RESTART IDENTITY");
    src.psql(&db, "TRUNCATE public.full_t CASCADE");
    src.psql(
        &db,
        "SELECT pg_logical_emit_message(true, 'pgferry', 'in a transaction')",
    );
    src.psql(
        &db,
        "SELECT pg_logical_emit_message(false, 'pgferry', '\\x00ff'::bytea)",
    );
    let origin = format!("rs_origin_{}", std::process::id());
    src.psql(
        &db,
        &format!("SELECT pg_replication_origin_create('{origin}')"),
    );
    src.psql(
        &db,
        &format!(
            "SELECT pg_replication_origin_session_setup('{origin}');
             SELECT pg_replication_origin_xact_setup('0/ABCD', now());
             INSERT INTO public.full_t VALUES (99, 'from origin');"
        ),
    );
    src.psql(
        &db,
        &format!("SELECT pg_replication_origin_drop('{origin}')"),
    );

    let mut options = StreamOptions::new(publication);
    options.messages = true;
    client
        .start_replication_with(&slot, start, &options)
        .await
        .expect("START_REPLICATION");
    assert!(client.is_streaming());

    // Read until the ninth commit (the origin transaction).
    let mut stream = Vec::new();
    let mut commits = 0;
    while commits < 9 {
        let m = next_data(&mut client, start).await;
        if matches!(m, PgOutputMessage::Commit(_)) {
            commits += 1;
        }
        stream.push(m);
    }

    // Relation metadata: a Type message for the enum, then the relations, each described before
    // its first change (and identical whenever it is described again).
    let want_items = Relation {
        xid: None,
        oid: items,
        namespace: "public".into(),
        name: "items".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col(1, "id", 23, -1),
            col(0, "name", 1043, 14),
            col(0, "t", 25, -1),
            col(0, "j", 3802, -1),
            col(0, "b", 17, -1),
            col(0, "n", 1700, -1),
            col(0, "ts", 1184, -1),
            col(0, "arr", 1007, -1),
            col(0, "m", mood, -1),
            col(0, "big", 25, -1),
        ],
    };
    let want_full = Relation {
        xid: None,
        oid: full_t,
        namespace: "public".into(),
        name: "full_t".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: vec![col(1, "id", 23, -1), col(1, "v", 25, -1)],
    };
    let want_type = Type {
        xid: None,
        oid: mood,
        namespace: "public".into(),
        name: "mood".into(),
    };
    let mut described: HashMap<u32, &Relation> = HashMap::new();
    let mut type_seen = false;
    let mut data = Vec::new();
    for m in &stream {
        match m {
            PgOutputMessage::Type(ty) => {
                assert_eq!(ty, &want_type);
                type_seen = true;
            }
            PgOutputMessage::Relation(r) => {
                if r.oid == items {
                    assert_eq!(r, &want_items);
                    assert!(
                        type_seen,
                        "the enum's Type message comes before the relation"
                    );
                } else {
                    assert_eq!(r, &want_full);
                }
                described.insert(r.oid, r);
            }
            other => {
                let used: Vec<u32> = match other {
                    PgOutputMessage::Insert(i) => vec![i.relation],
                    PgOutputMessage::Update(u) => vec![u.relation],
                    PgOutputMessage::Delete(d) => vec![d.relation],
                    PgOutputMessage::Truncate(t) => t.relations.clone(),
                    _ => vec![],
                };
                for oid in used {
                    assert!(
                        described.contains_key(&oid),
                        "relation {oid} used before it was described"
                    );
                }
                data.push(other.clone());
            }
        }
    }
    assert!(described.contains_key(&items) && described.contains_key(&full_t));

    // Transactions: Begin and Commit pair up, commit LSNs increase, times are now-ish.
    let mut commit_lsns = Vec::new();
    let mut xids = Vec::new();
    let mut open = None;
    for m in &data {
        match m {
            PgOutputMessage::Begin(b) => {
                assert!(open.is_none(), "nested Begin");
                open = Some(*b);
            }
            PgOutputMessage::Commit(c) => {
                let b = open.take().expect("Commit without Begin");
                assert_eq!(c.flags, 0);
                assert_eq!(b.final_lsn, c.commit_lsn);
                assert_eq!(b.commit_time, c.commit_time);
                assert!(c.end_lsn > c.commit_lsn);
                assert!(c.commit_lsn > start);
                let age = pg_time_now() - c.commit_time;
                assert!((0..600_000_000).contains(&age), "commit time {age} µs ago");
                commit_lsns.push(c.commit_lsn);
                xids.push(b.xid);
            }
            PgOutputMessage::Message(m) if !m.transactional => {
                assert!(
                    open.is_none(),
                    "a non-transactional message inside a transaction"
                );
            }
            _ => assert!(open.is_some(), "{} outside a transaction", m.kind()),
        }
    }
    assert!(
        commit_lsns.windows(2).all(|w| w[0] < w[1]),
        "{commit_lsns:?}"
    );
    assert!(xids.windows(2).all(|w| w[0] < w[1]), "{xids:?}");

    // The changes themselves, exactly.
    use Expect::{Begin as B, Commit as C, Msg};
    let row1 = |t_value: TupleValue, big_value: TupleValue| {
        tuple(vec![
            t("1"),
            t("short"),
            t_value,
            t("{\"a\": [1, \"x\"]}"),
            t("\\x00ff10"),
            t("NaN"),
            t("infinity"),
            t("{1,2,NULL}"),
            t("happy"),
            big_value,
        ])
    };
    let row2 = |id: &str| tuple(vec![t(id), N, N, N, N, N, t("-infinity"), t("{}"), N, N]);
    let key_only = |id: &str| tuple(vec![t(id), N, N, N, N, N, N, N, N, N]);
    let expected = vec![
        B,
        Msg(PgOutputMessage::Insert(Insert {
            xid: None,
            relation: items,
            new: row1(t("it's ünïcode"), t(&big)),
        })),
        Msg(PgOutputMessage::Insert(Insert {
            xid: None,
            relation: items,
            new: row2("2"),
        })),
        C,
        // A non-key column changed: no old tuple, and the unchanged TOASTed value is left out.
        B,
        Msg(PgOutputMessage::Update(Update {
            xid: None,
            relation: items,
            old: None,
            new: row1(t("changed"), TupleValue::UnchangedToast),
        })),
        C,
        // The key changed: the old key comes along.
        B,
        Msg(PgOutputMessage::Update(Update {
            xid: None,
            relation: items,
            old: Some(OldTuple::Key(key_only("2"))),
            new: row2("3"),
        })),
        C,
        B,
        Msg(PgOutputMessage::Delete(Delete {
            xid: None,
            relation: items,
            old: OldTuple::Key(key_only("3")),
        })),
        C,
        // REPLICA IDENTITY FULL: whole old rows.
        B,
        Msg(PgOutputMessage::Insert(Insert {
            xid: None,
            relation: full_t,
            new: tuple(vec![t("1"), t("a")]),
        })),
        Msg(PgOutputMessage::Update(Update {
            xid: None,
            relation: full_t,
            old: Some(OldTuple::Full(tuple(vec![t("1"), t("a")]))),
            new: tuple(vec![t("1"), t("b")]),
        })),
        Msg(PgOutputMessage::Delete(Delete {
            xid: None,
            relation: full_t,
            old: OldTuple::Full(tuple(vec![t("1"), t("b")])),
        })),
        C,
        B,
        Msg(PgOutputMessage::Truncate(Truncate {
            xid: None,
            options: TruncateOptions(TruncateOptions::RESTART_IDENTITY),
            relations: vec![items, full_t],
        })),
        C,
        B,
        Msg(PgOutputMessage::Truncate(Truncate {
            xid: None,
            options: TruncateOptions(TruncateOptions::CASCADE),
            relations: vec![full_t],
        })),
        C,
        B,
        Msg(PgOutputMessage::Message(LogicalMessage {
            xid: None,
            transactional: true,
            lsn: Lsn(0), // checked below
            prefix: "pgferry".into(),
            content: Bytes::from_static(b"in a transaction"),
        })),
        C,
        Msg(PgOutputMessage::Message(LogicalMessage {
            xid: None,
            transactional: false,
            lsn: Lsn(0),
            prefix: "pgferry".into(),
            content: Bytes::from_static(&[0x00, 0xff]),
        })),
        B,
        Msg(PgOutputMessage::Origin(Origin {
            commit_lsn: "0/ABCD".parse().unwrap(),
            name: origin.clone(),
        })),
        Msg(PgOutputMessage::Insert(Insert {
            xid: None,
            relation: full_t,
            new: tuple(vec![t("99"), t("from origin")]),
        })),
        C,
    ];
    let shown: Vec<&str> = data.iter().map(PgOutputMessage::kind).collect();
    assert_eq!(data.len(), expected.len(), "stream: {shown:?}");
    for (i, (got, want)) in data.iter().zip(&expected).enumerate() {
        match (got, want) {
            (PgOutputMessage::Begin(_), Expect::Begin)
            | (PgOutputMessage::Commit(_), Expect::Commit) => {}
            (PgOutputMessage::Message(g), Expect::Msg(PgOutputMessage::Message(w))) => {
                assert!(g.lsn > start, "message {i}: LSN {}", g.lsn);
                let g = LogicalMessage {
                    lsn: Lsn(0),
                    ..g.clone()
                };
                assert_eq!(&g, w, "message {i}");
            }
            (got, Expect::Msg(w)) => assert_eq!(got, w, "message {i} of {shown:?}"),
            (got, want) => panic!("message {i}: got {got:?}, want {want:?}; stream: {shown:?}"),
        }
    }

    // Confirming the last commit moves the slot.
    let last = data
        .iter()
        .rev()
        .find_map(|m| match m {
            PgOutputMessage::Commit(c) => Some(*c),
            _ => None,
        })
        .expect("a commit");
    assert!(confirmed_flush(src, &db, &slot) < last.end_lsn);
    client
        .send_status(last.end_lsn, last.end_lsn, last.end_lsn, false)
        .await
        .expect("status update");
    assert_confirmed(src, &db, &slot, last.end_lsn);

    // Commands are refused while streaming; stopping returns to command mode.
    assert!(client.simple_query("SELECT 1").await.is_err());
    client.stop_replication().await.expect("stop");
    assert!(!client.is_streaming());
    assert!(client.next_message().await.is_err());
    client.drop_slot(&slot, false).await.expect("drop slot");
    assert_eq!(
        src.psql(
            &db,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")
        ),
        "0"
    );
    client.close().await;
}

#[tokio::test]
async fn a_huge_transaction_streams_in_bounded_memory() {
    let p = pair();
    let src = &p.source;
    let db = src.fresh_database("rs_huge");
    src.psql(
        &db,
        "CREATE TABLE public.bulk (id int PRIMARY KEY, pad text);
         CREATE PUBLICATION bulk_pub FOR TABLE public.bulk;",
    );
    let mut client = connect(src, &db, None).await;
    let slot = format!("rs_huge_{}", std::process::id());
    let start = client
        .create_slot(&slot, false)
        .await
        .expect("slot")
        .consistent_point;
    // About 65 MB of row data in one transaction.
    const ROWS: usize = 100_000;
    const PAD: usize = 600;
    src.psql(
        &db,
        &format!(
            "INSERT INTO public.bulk SELECT g, repeat(chr(65 + g % 26), {PAD}) FROM generate_series(1, {ROWS}) g"
        ),
    );
    client
        .start_replication(&slot, start, "bulk_pub")
        .await
        .expect("START_REPLICATION");

    let mut begin = None;
    while begin.is_none() {
        match next_data(&mut client, start).await {
            PgOutputMessage::Begin(b) => begin = Some(b),
            PgOutputMessage::Relation(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let baseline = rss_kb();
    let mut peak = baseline;
    let mut rows = 0usize;
    let commit: Commit = loop {
        match next_data(&mut client, start).await {
            PgOutputMessage::Insert(ins) => {
                rows += 1;
                let id = ins.new.values[0].as_text().expect("id");
                assert_eq!(id, rows.to_string());
                let pad = ins.new.values[1].as_text().expect("pad");
                assert_eq!(pad.len(), PAD);
                if rows.is_multiple_of(1000) {
                    peak = peak.max(rss_kb());
                }
            }
            PgOutputMessage::Relation(r) => assert_eq!(r.name, "bulk"),
            PgOutputMessage::Commit(c) => break c,
            other => panic!("unexpected {other:?}"),
        }
    };
    peak = peak.max(rss_kb());
    assert_eq!(rows, ROWS);
    assert_eq!(commit.commit_lsn, begin.expect("begin").final_lsn);
    let growth_mb = (peak - baseline) as f64 / 1024.0;
    eprintln!("RSS {baseline} kB before the transaction, peak {peak} kB ({growth_mb:.1} MB more)");
    assert!(
        growth_mb < 50.0,
        "RSS grew by {growth_mb:.1} MB while streaming a ~65 MB transaction"
    );

    client
        .send_status(commit.end_lsn, commit.end_lsn, commit.end_lsn, false)
        .await
        .expect("status");
    assert_confirmed(src, &db, &slot, commit.end_lsn);
    client.stop_replication().await.expect("stop");
    client.drop_slot(&slot, false).await.expect("drop slot");
    client.close().await;
}

#[tokio::test]
async fn idle_streams_get_keepalives_and_answering_them_keeps_the_session() {
    let p = pair();
    let src = &p.source;
    let db = src.fresh_database("rs_keepalive");
    src.psql(
        &db,
        "CREATE TABLE public.k (id int PRIMARY KEY);
         CREATE PUBLICATION k_pub FOR TABLE public.k;",
    );
    // A short wal_sender_timeout for this session only (the clusters are shared between tests).
    let mut client = connect(src, &db, Some("-c wal_sender_timeout=5s")).await;
    let shown = client
        .simple_query("SHOW wal_sender_timeout")
        .await
        .expect("SHOW");
    assert_eq!(shown[0].values[0].as_deref(), Some("5s"));
    let slot = format!("rs_keepalive_{}", std::process::id());
    let start = client
        .create_slot(&slot, false)
        .await
        .expect("slot")
        .consistent_point;
    client
        .start_replication(&slot, start, "k_pub")
        .await
        .expect("START_REPLICATION");

    // Idle for 12 s (more than twice the timeout), answering every keepalive that asks.
    let began = Instant::now();
    let mut keepalives = 0;
    let mut answered = 0;
    while began.elapsed() < Duration::from_secs(12) {
        let left = Duration::from_secs(12).saturating_sub(began.elapsed());
        let Ok(m) = tokio::time::timeout(left, client.next_message()).await else {
            break;
        };
        match m.unwrap_or_else(|e| panic!("the idle stream failed: {e}")) {
            ReplicationMessage::Keepalive(k) => {
                keepalives += 1;
                assert!(k.wal_end >= start);
                if k.reply_requested {
                    answered += 1;
                    client
                        .send_status(start, start, start, false)
                        .await
                        .expect("status update");
                }
            }
            ReplicationMessage::XLogData(x) => panic!("unexpected data {:?}", x.data),
        }
    }
    eprintln!("{keepalives} keepalives in 12 s, {answered} answered");
    assert!(
        answered >= 2,
        "{keepalives} keepalives, {answered} asked for a reply"
    );

    // Still alive: a change arrives.
    src.psql(&db, "INSERT INTO public.k VALUES (1)");
    let mut commit = None;
    while commit.is_none() {
        match next_data(&mut client, start).await {
            PgOutputMessage::Commit(c) => commit = Some(c),
            PgOutputMessage::Insert(i) => assert_eq!(i.new, tuple(vec![t("1")])),
            _ => {}
        }
    }
    let commit = commit.expect("commit");
    client
        .send_status(commit.end_lsn, commit.end_lsn, commit.end_lsn, true)
        .await
        .expect("status update");
    assert_confirmed(src, &db, &slot, commit.end_lsn);

    // Not answering: the server gives up after wal_sender_timeout.
    let silent = Instant::now();
    let mut requests = 0;
    let failure = loop {
        match tokio::time::timeout(TIMEOUT, client.next_message())
            .await
            .expect("the server should end a silent session")
        {
            Ok(ReplicationMessage::Keepalive(k)) => requests += usize::from(k.reply_requested),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break e,
        }
    };
    eprintln!(
        "silent session ended after {:.1?}: {failure}",
        silent.elapsed()
    );
    assert!(requests >= 1);
    assert!(failure.is_transient(), "{failure}");
    assert!(silent.elapsed() >= Duration::from_secs(4));
    assert!(silent.elapsed() < Duration::from_secs(30));

    // The slot kept the confirmed position; drop it once the old session let go of it.
    assert_eq!(confirmed_flush(src, &db, &slot), commit.end_lsn);
    let mut other = connect(src, &db, None).await;
    other.drop_slot(&slot, true).await.expect("drop slot");
    other.close().await;
}
