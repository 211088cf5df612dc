//! `pgferry report` on a real online run: a plan with full load, post_data, cdc with a writer, an
//! automatic cutover, sequences, validation and cleanup. The kept report's row counts, cdc counters
//! and lag samples are checked against the databases and the store; the HTML page is checked for its
//! charts and escaping, and rendered in headless Chromium, whose screenshot must show the colours the
//! charts are drawn in.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::{self, TestPlan, pair, row_digest, show};

const HOSTILE: &str = "<script>alert(1)</script>";

const STAGES: &str = "[stages.schema]\nkind = \"schema_dump\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
    [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\nbatch_delay = \"20ms\"\n\n\
    [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nmax_lag = \"1s\"\nquiet_for = \"5s\"\nfence = \"read_only\"\n\n\
    [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
    [stages.validate]\nkind = \"validate\"\nafter = [\"sequences\"]\nmode = \"checksum\"\n\n\
    [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"validate\"]\n";

const STAGE_IDS: [&str; 9] = [
    "schema",
    "provision",
    "load",
    "indexes",
    "cdc",
    "cutover",
    "sequences",
    "validate",
    "cleanup",
];

/// One online run shared by the tests of this binary.
struct Fixture {
    plan: TestPlan,
    /// Rows of each table on the target after the run: `(table as the report names it, count)`.
    counts: Vec<(String, i64)>,
    /// Transactions the writer committed.
    writes: u64,
    /// The run (later tests add runs of their own).
    run_id: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(run_online)
}

fn run_online() -> Fixture {
    let p = pair();
    let s = p.source.fresh_database("report_src");
    p.source.psql(
        &s,
        &format!(
            "CREATE TABLE public.items (id bigint PRIMARY KEY, name text NOT NULL, n int);
             INSERT INTO public.items SELECT g, 'item ' || g, g % 97 FROM generate_series(1, 30000) g;
             CREATE INDEX items_name ON public.items (name);
             CREATE TABLE public.events (id bigserial PRIMARY KEY, v text);
             INSERT INTO public.events (v) SELECT md5(g::text) FROM generate_series(1, 5000) g;
             CREATE TABLE public.\"{HOSTILE}\" (id int PRIMARY KEY, v text);
             INSERT INTO public.\"{HOSTILE}\" SELECT g, 'x' FROM generate_series(1, 7) g;
             CREATE UNLOGGED TABLE public.scratch (k int PRIMARY KEY, v text);
             INSERT INTO public.scratch SELECT g, 'scratch' FROM generate_series(1, 3) g;
             CREATE MATERIALIZED VIEW public.items_by_n AS SELECT n, count(*) AS c FROM public.items GROUP BY n;"
        ),
    );
    let t = p.target.fresh_database("report_tgt");
    let plan = TestPlan::new(p, "report_online", &s, &t, STAGES);

    // A writer on public.events from before the run until the fence stops it.
    let mut writer = support::Writer::start(
        support::WriterSpec {
            name: "the writer",
            port: p.source.port,
            db: s.clone(),
            user: None,
            every: Duration::from_millis(15),
            fenced_by: support::FENCE_CODES,
        },
        |i| match i % 4 {
            0 => format!(
                "UPDATE public.events SET v = 'updated {i}' WHERE id = {}",
                i % 5000 + 1
            ),
            1 => "DELETE FROM public.events WHERE id = (SELECT min(id) FROM public.events)"
                .to_string(),
            _ => format!(
                "INSERT INTO public.events (v) SELECT 'w{i}-' || g FROM generate_series(1, 20) g"
            ),
        },
    );
    // The writer is under way before the run starts (however long the run then takes).
    let started = Instant::now();
    while writer.transactions() <= 20 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the writer did not get going"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = plan.run(&["run"]);
    let writes = writer.stop();
    assert!(out.status.success(), "{}", show(&out));
    assert!(writes > 20, "the writer wrote only {writes} transactions");

    // Both sides equal, table by table.
    let mut counts = Vec::new();
    for (name, quoted) in [
        ("public.items", "public.items".to_string()),
        ("public.events", "public.events".to_string()),
        (
            &*format!("public.{HOSTILE}"),
            format!("public.\"{HOSTILE}\""),
        ),
        ("public.scratch", "public.scratch".to_string()),
    ] {
        assert_eq!(
            row_digest(&p.source, &s, &quoted),
            row_digest(&p.target, &t, &quoted),
            "{quoted} differs"
        );
        let n: i64 = p
            .target
            .psql(&t, &format!("SELECT count(*) FROM {quoted}"))
            .parse()
            .expect("count");
        counts.push((name.to_string(), n));
    }
    assert_eq!(
        row_digest(&p.source, &s, "public.items_by_n"),
        row_digest(&p.target, &t, "public.items_by_n"),
        "the materialized view was refreshed at the cutover"
    );
    let run_id = p.target.psql(
        &t,
        "SELECT max(id) FROM pgferry.runs WHERE migration = 'report_online'",
    );
    Fixture {
        plan,
        counts,
        writes,
        run_id,
    }
}

/// `pgferry report PLAN --run <the fixture's run> args...`
fn copied_rows(tables: &[serde_json::Value], name: &str) -> i64 {
    tables
        .iter()
        .find(|t| t["table"] == name)
        .and_then(|t| t["rows"].as_i64())
        .unwrap_or_else(|| panic!("no copy of {name} in {tables:#?}"))
}

fn report(f: &Fixture, args: &[&str]) -> String {
    let mut all = vec!["report", "--run", &f.run_id];
    all.extend_from_slice(args);
    let out = f.plan.run(&all);
    assert!(out.status.success(), "{}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(f: &Fixture) -> serde_json::Value {
    serde_json::from_str(&report(f, &["--json"])).expect("report --json is JSON")
}

fn count(f: &Fixture, table: &str) -> i64 {
    f.counts
        .iter()
        .find(|(t, _)| t == table)
        .map(|c| c.1)
        .expect("a counted table")
}

#[test]
fn json_report_matches_the_databases_and_the_store() {
    let f = fixture();
    let p = pair();
    let r = json(f);
    assert_eq!(r["version"], 1, "{r:#}");
    assert_eq!(r["mode"], "run");
    assert_eq!(r["outcome"], "done");
    let run_id = r["run_id"].as_i64().expect("run id");

    // Every stage, done by this run, with times.
    let stages = r["stages"].as_array().expect("stages");
    let ids: Vec<&str> = stages.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, STAGE_IDS, "topological order");
    for s in stages {
        assert_eq!(s["state"], "done", "{s:#}");
        assert_eq!(s["this_run"], true, "{s:#}");
        assert!(s["seconds"].as_f64().is_some_and(|x| x >= 0.0), "{s:#}");
    }
    assert_eq!(stages[0]["level"], 0);
    assert_eq!(stages[8]["level"], 8);

    // Table copies: the untouched tables copied exactly their rows; events copied its rows as of
    // the snapshot, and cdc's inserts and deletes make up the rest.
    let tables = r["tables"].as_array().expect("tables");
    assert_eq!(tables.len(), 4, "{tables:#?}");
    assert_eq!(
        copied_rows(tables, "public.scratch"),
        3,
        "the unlogged table"
    );
    let copied = |name: &str| {
        tables
            .iter()
            .find(|t| t["table"] == name)
            .unwrap_or_else(|| panic!("no copy of {name} in {tables:#?}"))
    };
    assert_eq!(copied("public.items")["rows"], count(f, "public.items"));
    assert_eq!(copied("public.items")["rows"], 30000);
    let hostile = format!("public.{HOSTILE}");
    assert_eq!(copied(&hostile)["rows"], count(f, &hostile));
    assert_eq!(copied(&hostile)["rows"], 7);
    assert!(copied("public.items")["bytes"].as_i64().unwrap_or(0) > 100_000);
    assert!(
        copied("public.items")["rows_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );

    let cdc = &r["cdc"];
    let db = &f.plan.source_db;
    let counter = |name: &str| cdc["counters"][db.as_str()][name].as_i64().unwrap_or(0);
    let events_copied = copied("public.events")["rows"].as_i64().expect("rows");
    assert_eq!(
        events_copied + counter("cdcInsertCounter") - counter("cdcDeleteCounter"),
        count(f, "public.events"),
        "copied rows + cdc inserts - cdc deletes = the rows on the target ({cdc:#})"
    );
    assert!(counter("cdcUpdateCounter") > 0, "{cdc:#}");
    assert_eq!(
        cdc["applied_changes"].as_i64(),
        Some(counter("totalChangesApplied"))
    );

    // The lag profile: samples written during cdc, the same as in the store.
    let samples = cdc["samples"].as_array().expect("samples");
    let stored: i64 = p
        .target
        .psql(
            &f.plan.target_db,
            &format!(
                "SELECT count(*) FROM pgferry.samples WHERE migration = 'report_online' AND run_id = {run_id}"
            ),
        )
        .parse()
        .expect("count");
    assert!(samples.len() >= 2, "lag samples: {cdc:#}");
    assert_eq!(samples.len() as i64, stored);
    // Before the fence every sample has a lag; the fence ends the sampler's source session, so a
    // sample taken after it may have none. The fence comes at least `quiet_for` (5 s in STAGES)
    // after the cutover's start: the lag must stay small that long, counted from then. (Not the
    // cutover's start itself: cdc is ready and the cutover starts within milliseconds of a small
    // backlog, and on a loaded machine the sampler's first sample, which connects to the source
    // first, was written after it.)
    let cutover_start = stages
        .iter()
        .find(|s| s["id"] == "cutover")
        .and_then(|s| s["started_at"].as_f64())
        .expect("the cutover's start");
    let before: Vec<&serde_json::Value> = samples
        .iter()
        .filter(|s| s["at"].as_f64().is_some_and(|at| at < cutover_start + 5.0))
        .collect();
    assert!(
        !before.is_empty(),
        "no sample before the fence: {samples:#?}"
    );
    assert!(
        before
            .iter()
            .all(|s| s["lag_bytes"].as_i64().is_some_and(|l| l >= 0)),
        "every sample before the fence has a lag: {samples:#?}"
    );
    let max = samples
        .iter()
        .filter_map(|s| s["lag_bytes"].as_i64())
        .max()
        .expect("a lag");
    // The writer's backlog is a few MB at most; a sample counted from no position at all (before
    // cdc's first answered commit) read the source's whole WAL as lag.
    assert!(max < 64 << 20, "a lag sample of {max} bytes: {samples:#?}");
    assert_eq!(cdc["max_lag_bytes"].as_i64(), Some(max));
    assert!(cdc["p95_lag_bytes"].as_i64().is_some_and(|p| p <= max));
    // The changes applied grow over the samples.
    let applied: Vec<i64> = samples
        .iter()
        .filter_map(|s| s["applied"].as_i64())
        .collect();
    assert!(applied.windows(2).all(|w| w[0] <= w[1]), "{applied:?}");

    // post_data: the index and the primary keys, with their times.
    let builds = r["builds"].as_array().expect("builds");
    assert!(
        builds.iter().any(|b| b["object"]
            .as_str()
            .is_some_and(|o| o.contains("items_name"))),
        "{builds:#?}"
    );
    assert!(builds.iter().all(|b| b["started_at"].as_f64().is_some()));

    // The cutover's downtime and the validation.
    let cut = &r["cutover"][0];
    assert_eq!(cut["fenced"], true, "{cut:#}");
    assert!(
        cut["downtime_seconds"]
            .as_f64()
            .is_some_and(|d| d > 0.0 && d < 60.0)
    );
    let v = &r["validation"];
    assert_eq!(v["clean"], true, "{v:#}");
    assert_eq!(v["tables"], 4, "the unlogged table too");
    let total: i64 = f.counts.iter().map(|c| c.1).sum();
    assert_eq!(v["target_rows"], total, "{v:#}");

    // The kept report is what `report --json` shows.
    let kept = p.target.psql(
        &f.plan.target_db,
        &format!("SELECT count(*) FROM pgferry.reports WHERE migration = 'report_online' AND run_id = {run_id} AND report->>'version' = '1'"),
    );
    assert_eq!(kept, "1");
    assert!(f.writes > 0);
}

#[test]
fn text_report_names_the_stages_and_the_rows() {
    let f = fixture();
    let text = report(f, &[]);
    eprintln!("{text}");
    assert!(
        text.starts_with(&format!("run {} (run) of migration", f.run_id)),
        "{text}"
    );
    assert!(
        text.contains("(run) of migration `report_online`: done"),
        "{text}"
    );
    for id in STAGE_IDS {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains(" done")),
            "stage {id} in:\n{text}"
        );
    }
    for (table, n) in &f.counts {
        if table == "public.events" {
            continue; // copied as of the snapshot, then changed by cdc
        }
        let line = text
            .lines()
            .find(|l| l.contains(table.as_str()) && l.contains("copied"))
            .unwrap_or_else(|| panic!("no line for {table} in:\n{text}"));
        assert!(
            line.split_whitespace().any(|w| w == n.to_string()),
            "{n} rows of {table} in `{line}`"
        );
    }
    assert!(text.contains("lag profile:"), "{text}");
    assert!(text.contains("write downtime"), "{text}");
    assert!(text.contains("CLEAN"), "{text}");

    // A second report of another run is compared with the first: run the plan again (nothing to
    // do) and the comparison appears.
    let again = f.plan.run(&["run"]);
    assert!(again.status.success(), "{}", show(&again));
    let out = f.plan.run(&["report"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("comparison of the last 2 runs"), "{text}");
    assert!(text.contains("rows copied"), "{text}");
    assert!(text.contains("write downtime"), "{text}");
}

fn write_html(f: &Fixture, name: &str) -> (PathBuf, String) {
    let path = f.plan.dir.path().join(name);
    let out = f.plan.run(&[
        "report",
        "--run",
        &f.run_id,
        "--html",
        path.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let page = std::fs::read_to_string(&path).expect("the HTML file");
    (path, page)
}

#[test]
fn html_report_is_self_contained_and_escapes_names() {
    let f = fixture();
    let (_, page) = write_html(f, "static.html");
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert_eq!(page.matches("<svg").count(), 3, "DAG, timeline and lag");
    assert!(page.contains("class=\"dag\""));
    assert!(page.contains("class=\"gantt\""));
    assert!(page.contains("class=\"lag-curve\""));
    assert!(page.contains("<polyline"));
    assert!(page.contains("No differences"));
    // The hostile table name is text, never markup; nothing is fetched from anywhere.
    assert!(!page.contains("<script"), "a <script> element in the page");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    for needle in ["http:", "https:", "src=", "href="] {
        assert!(!page.contains(needle), "`{needle}` in the page");
    }
    // Every stage is a node of the DAG.
    for id in STAGE_IDS {
        assert!(page.contains(&format!("<title>{id} (")), "node {id}");
    }
    // The cutover table says in words what was copied again after the fence, one column each.
    let cutover = page
        .split("<h2>Cutover</h2>")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .expect("a cutover table");
    for heading in [
        "<th>Unlogged tables copied again</th>",
        "<th>Large objects made equal</th>",
        "<th>Materialized views refreshed</th>",
    ] {
        assert!(cutover.contains(heading), "{heading} in {cutover}");
    }
    assert!(
        cutover.contains("<td>1 (3 rows): public.scratch</td>"),
        "{cutover}"
    );
    assert!(
        cutover.contains("<td>1: public.items_by_n</td>"),
        "{cutover}"
    );
    assert!(
        !cutover.contains('{') && !cutover.contains("&quot;"),
        "raw JSON in the cutover table: {cutover}"
    );
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Pixels of `img` (RGB or RGBA rows) within a small distance of `hex` (`#rrggbb`).
fn pixels_of(img: &[u8], channels: usize, hex: &str) -> usize {
    let c = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex colour");
    let (r, g, b) = (c(1), c(3), c(5));
    img.chunks_exact(channels)
        .filter(|p| p[0].abs_diff(r) <= 8 && p[1].abs_diff(g) <= 8 && p[2].abs_diff(b) <= 8)
        .count()
}

fn decode_png(path: &Path) -> (u32, u32, usize, Vec<u8>) {
    let file = std::fs::File::open(path).expect("the screenshot");
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    buf.truncate(info.line_size * info.height as usize);
    (info.width, info.height, channels, buf)
}

#[test]
fn html_report_renders_its_charts_in_headless_chromium() {
    let f = fixture();
    let Some(browser) = chromium() else {
        support::missing(
            "no chromium on PATH",
            "apt-get install --no-install-recommends chromium (.ci/run does it)",
        );
        return;
    };
    let (html, _) = write_html(f, "page.html");
    let shot = f.plan.dir.path().join("shot.png");
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1200,2000")
        .arg(format!("file://{}", html.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("chromium status").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish its screenshot within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("chromium output");
    assert!(
        shot.is_file(),
        "chromium wrote no screenshot ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // For looking at by hand: PGFERRY_TEST_ARTIFACTS=DIR keeps the page and the screenshot.
    if let Some(dir) = std::env::var_os("PGFERRY_TEST_ARTIFACTS") {
        let dir = PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(&html, dir.join("report.html"));
        let _ = std::fs::copy(&shot, dir.join("report.png"));
    }
    let (w, h, channels, img) = decode_png(&shot);
    assert_eq!((w, h), (1200, 2000), "the window size");
    // Non-trivial: not one colour, and the charts' own colours are there in quantity.
    let white = pixels_of(&img, channels, "#ffffff");
    assert!(white < (w * h) as usize, "a blank page");
    let stage_bars = pixels_of(&img, channels, pgferry::report::html::STAGE_COLOUR);
    let table_bars = pixels_of(&img, channels, pgferry::report::html::TABLE_COLOUR);
    let lag = pixels_of(&img, channels, pgferry::report::html::LAG_COLOUR);
    eprintln!(
        "screenshot {w}x{h}: {stage_bars} stage-bar pixels, {table_bars} table-bar pixels, {lag} lag-curve pixels, {white} white"
    );
    assert!(stage_bars > 2000, "Gantt stage bars: {stage_bars} pixels");
    assert!(table_bars > 100, "Gantt table bars: {table_bars} pixels");
    assert!(lag > 500, "lag curve: {lag} pixels");
}
