//! The report as ONE self-contained HTML page: no external URL, no script; the charts are inline SVG
//! drawn here. Sections: the stage DAG (columns by topological level), a Gantt timeline of the
//! stages, table copies and post-data builds, the cdc lag curve, the validation result, the copied
//! tables and, with several reports, the comparison. Every piece of text from the store or the plan
//! goes through [`escape`]: a table may be called `<script>`.

use std::fmt::Write as _;

use super::compare;
use super::model::RunReport;
use crate::plan::units::human_bytes;
use crate::state::Timestamp;

/// Gantt bar of a stage.
pub const STAGE_COLOUR: &str = "#1f77b4";
/// Gantt bar of a table copy.
pub const TABLE_COLOUR: &str = "#ff7f0e";
/// Gantt bar of a post-data build.
pub const BUILD_COLOUR: &str = "#9467bd";
/// The lag curve of the first database (the others cycle through [`SERIES_COLOURS`]).
pub const LAG_COLOUR: &str = "#d62728";
const SERIES_COLOURS: [&str; 4] = [LAG_COLOUR, "#2ca02c", "#17becf", "#8c564b"];

/// Text for HTML and SVG (element content and quoted attributes).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn state_colour(state: &str) -> &'static str {
    match state {
        "done" => "#c8e6c9",
        "ready" | "running" => "#bbdefb",
        "failed" => "#ffcdd2",
        "pending" => "#fff9c4",
        _ => "#eeeeee",
    }
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;background:#fff}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}\
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.meta{color:#555;font-size:14px}.clean{background:#e8f5e9;border:1px solid #66bb6a;padding:8px 12px}\
.dirty{background:#ffebee;border:1px solid #e57373;padding:8px 12px}pre{white-space:pre-wrap;margin:6px 0 0}\
svg text{font-family:system-ui,sans-serif}";

/// The whole page for `reports` (newest first; the first is shown in detail).
pub fn render(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let Some(r) = reports.first() else {
        return "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>pgferry report</title></head><body><p>No report.</p></body></html>\n".into();
    };
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"generator\" content=\"pgferry {}\"><title>pgferry report: {}</title><style>{STYLE}</style></head><body>\n",
        env!("CARGO_PKG_VERSION"),
        escape(&r.migration)
    );
    let _ = writeln!(
        out,
        "<h1>Migration {}: run {} ({})</h1><p class=\"meta\">{} &middot; {} &rarr; {} &middot; {}</p>",
        escape(&r.migration),
        r.run_id,
        escape(&r.mode),
        escape(r.outcome.as_deref().unwrap_or("running")),
        time(r.started_at),
        time(r.ended_at),
        r.seconds.map_or("-".into(), |s| format!("{s:.1} s"))
    );
    let _ = writeln!(out, "<h2>Stages</h2>\n{}", dag_svg(r));
    let _ = writeln!(out, "<h2>Timeline</h2>\n{}", gantt_svg(r));
    let _ = writeln!(out, "<h2>CDC lag</h2>\n{}", lag_svg(r));
    out.push_str(&validation(r));
    out.push_str(&cutover(r));
    out.push_str(&tables(r));
    if reports.len() > 1 {
        let oldest_first: Vec<RunReport> = reports.iter().rev().cloned().collect();
        out.push_str(&comparison(&oldest_first));
    }
    out.push_str("</body></html>\n");
    out
}

fn time(t: Option<f64>) -> String {
    t.map_or("-".into(), |t| escape(&Timestamp(t).rfc3339()))
}

/// The DAG: one column per topological level, nodes coloured by state, edges as arrows.
fn dag_svg(r: &RunReport) -> String {
    const W: f64 = 160.0;
    const H: f64 = 46.0;
    const GX: f64 = 40.0;
    const GY: f64 = 22.0;
    let levels = r.stages.iter().map(|s| s.level).max().map_or(0, |l| l + 1);
    let mut rows_in = vec![0usize; levels];
    let mut pos = Vec::with_capacity(r.stages.len());
    for s in &r.stages {
        let row = rows_in[s.level];
        rows_in[s.level] += 1;
        pos.push((
            10.0 + s.level as f64 * (W + GX),
            10.0 + row as f64 * (H + GY),
        ));
    }
    let width = 20.0 + levels as f64 * (W + GX) - GX;
    let height = 20.0 + rows_in.iter().copied().max().unwrap_or(0) as f64 * (H + GY) - GY;
    let mut svg = format!(
        "<svg class=\"dag\" viewBox=\"0 0 {w:.0} {h:.0}\" width=\"{w:.0}\" height=\"{h:.0}\" style=\"max-width:100%;height:auto\" role=\"img\" aria-label=\"stage graph\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#777\"/></marker></defs>\n",
        w = width.max(40.0),
        h = height.max(40.0)
    );
    let at = |id: &str| r.stages.iter().position(|s| s.id == id).map(|i| pos[i]);
    for [from, to] in &r.edges {
        if let (Some((x1, y1)), Some((x2, y2))) = (at(from), at(to)) {
            let _ = writeln!(
                svg,
                "<path d=\"M{:.1},{:.1} C{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}\" fill=\"none\" stroke=\"#777\" stroke-width=\"1.5\" marker-end=\"url(#arrow)\"/>",
                x1 + W,
                y1 + H / 2.0,
                x1 + W + GX / 2.0,
                y1 + H / 2.0,
                x2 - GX / 2.0,
                y2 + H / 2.0,
                x2,
                y2 + H / 2.0
            );
        }
    }
    for (s, (x, y)) in r.stages.iter().zip(&pos) {
        let _ = writeln!(
            svg,
            "<g><title>{id} ({kind}): {state}</title><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{W}\" height=\"{H}\" rx=\"6\" fill=\"{fill}\" stroke=\"#555\"/>\
             <text x=\"{tx:.1}\" y=\"{ty1:.1}\" font-size=\"13\" font-weight=\"600\">{id_short}</text>\
             <text x=\"{tx:.1}\" y=\"{ty2:.1}\" font-size=\"10\" fill=\"#444\">{kind} &middot; {state}{secs}</text></g>",
            id = escape(&s.id),
            id_short = escape(&truncate(&s.id, 22)),
            kind = escape(&s.kind),
            state = escape(&s.state),
            fill = state_colour(&s.state),
            tx = x + 8.0,
            ty1 = y + 19.0,
            ty2 = y + 36.0,
            secs = s
                .seconds
                .map_or(String::new(), |v| format!(" &middot; {v:.1} s")),
        );
    }
    svg.push_str("</svg>");
    svg
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// "Nice" tick steps for an axis spanning `span`.
fn tick_step(span: f64, ticks: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// The timeline: stages, then table copies, then (the longest) post-data builds, on one time axis
/// starting at the earliest start.
fn gantt_svg(r: &RunReport) -> String {
    struct Bar {
        label: String,
        start: f64,
        end: f64,
        colour: &'static str,
    }
    let mut bars: Vec<Bar> = Vec::new();
    let now = r.ended_at.unwrap_or_else(|| Timestamp::now().0);
    for s in &r.stages {
        if let Some(a) = s.started_at {
            bars.push(Bar {
                label: format!("stage {}", s.id),
                start: a,
                end: s.ended_at.unwrap_or(now).max(a),
                colour: STAGE_COLOUR,
            });
        }
    }
    for t in &r.tables {
        if let Some(a) = t.started_at {
            bars.push(Bar {
                label: format!("{}.{}", t.database, t.table),
                start: a,
                end: t.ended_at.unwrap_or(now).max(a),
                colour: TABLE_COLOUR,
            });
        }
    }
    let mut builds: Vec<_> = r.builds.iter().filter(|b| b.started_at.is_some()).collect();
    builds.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    builds.truncate(20);
    builds.sort_by(|a, b| {
        a.started_at
            .partial_cmp(&b.started_at)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for b in builds {
        let a = b.started_at.unwrap_or_default();
        bars.push(Bar {
            label: b.object.clone(),
            start: a,
            end: a + b.seconds,
            colour: BUILD_COLOUR,
        });
    }
    if bars.is_empty() {
        return "<p>No stage has started.</p>".into();
    }
    let t0 = bars.iter().map(|b| b.start).fold(f64::INFINITY, f64::min);
    let t1 = bars.iter().map(|b| b.end).fold(f64::NEG_INFINITY, f64::max);
    let span = (t1 - t0).max(1.0);
    const LABEL: f64 = 280.0;
    const PLOT: f64 = 780.0;
    const ROW: f64 = 20.0;
    let height = 40.0 + bars.len() as f64 * ROW;
    let x = |t: f64| LABEL + (t - t0) / span * PLOT;
    let mut svg = format!(
        "<svg class=\"gantt\" width=\"{:.0}\" height=\"{height:.0}\" role=\"img\" aria-label=\"timeline\">\n",
        LABEL + PLOT + 30.0
    );
    let step = tick_step(span, 8.0);
    let mut tick = 0.0;
    while tick <= span + 1e-9 {
        let tx = x(t0 + tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{tx:.1}\" y1=\"18\" x2=\"{tx:.1}\" y2=\"{:.0}\" stroke=\"#e3e3e3\"/><text x=\"{tx:.1}\" y=\"13\" font-size=\"10\" text-anchor=\"middle\" fill=\"#555\">{}s</text>",
            height - 10.0,
            fmt_num(tick)
        );
        tick += step;
    }
    for (i, b) in bars.iter().enumerate() {
        let y = 24.0 + i as f64 * ROW;
        // At least 4 px: a table copied in milliseconds still shows.
        let w = (x(b.end) - x(b.start)).max(4.0);
        let _ = writeln!(
            svg,
            "<g><title>{full}: {secs:.2} s</title><text x=\"{lx:.1}\" y=\"{ty:.1}\" font-size=\"11\" text-anchor=\"end\">{label}</text>\
             <rect x=\"{bx:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{c}\" shape-rendering=\"crispEdges\"/></g>",
            full = escape(&b.label),
            label = escape(&truncate(&b.label, 40)),
            secs = b.end - b.start,
            lx = LABEL - 8.0,
            ty = y + 11.0,
            bx = x(b.start),
            h = ROW - 6.0,
            c = b.colour,
        );
    }
    svg.push_str("</svg>");
    svg
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The lag curve: bytes behind the source over time, one polyline per database, with axes.
fn lag_svg(r: &RunReport) -> String {
    let Some(c) = &r.cdc else {
        return "<p>This plan has no cdc stage.</p>".into();
    };
    let points: Vec<(&str, f64, i64)> = c
        .samples
        .iter()
        .filter_map(|s| s.lag_bytes.map(|l| (s.database.as_str(), s.at, l)))
        .collect();
    if points.is_empty() {
        return "<p>No lag samples were recorded in this run.</p>".into();
    }
    const L: f64 = 90.0;
    const T: f64 = 16.0;
    const PW: f64 = 900.0;
    const PH: f64 = 260.0;
    let t0 = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let t1 = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = (t1 - t0).max(1.0);
    let top = points.iter().map(|p| p.2).max().unwrap_or(0).max(1) as f64;
    let ystep = tick_step(top, 5.0);
    let ymax = (top / ystep).ceil() * ystep;
    let x = |t: f64| L + (t - t0) / span * PW;
    let y = |v: f64| T + PH - v / ymax * PH;
    let mut svg = format!(
        "<svg class=\"lag\" width=\"{:.0}\" height=\"{:.0}\" role=\"img\" aria-label=\"cdc lag\">\n",
        L + PW + 30.0,
        T + PH + 50.0
    );
    // Grid, ticks and axes.
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let _ = writeln!(
            svg,
            "<line x1=\"{L}\" y1=\"{yy:.1}\" x2=\"{x2}\" y2=\"{yy:.1}\" stroke=\"#eee\"/><text x=\"{tx}\" y=\"{ty:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            escape(&human_bytes(v as u64)),
            yy = y(v),
            x2 = L + PW,
            tx = L - 6.0,
            ty = y(v) + 3.0,
        );
        v += ystep;
    }
    let xstep = tick_step(span, 10.0);
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let _ = writeln!(
            svg,
            "<line x1=\"{xx:.1}\" y1=\"{b}\" x2=\"{xx:.1}\" y2=\"{b2}\" stroke=\"#555\"/><text x=\"{xx:.1}\" y=\"{ty}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#555\">{}s</text>",
            fmt_num(t),
            xx = x(t0 + t),
            b = T + PH,
            b2 = T + PH + 5.0,
            ty = T + PH + 17.0,
        );
        t += xstep;
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{b}\" stroke=\"#333\"/><line x1=\"{L}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#333\"/>\
         <text x=\"{cx}\" y=\"{ly}\" font-size=\"11\" text-anchor=\"middle\">seconds since the first sample</text>\
         <text x=\"14\" y=\"{my}\" font-size=\"11\" text-anchor=\"middle\" transform=\"rotate(-90 14 {my})\">bytes behind the source</text>",
        b = T + PH,
        r = L + PW,
        cx = L + PW / 2.0,
        ly = T + PH + 36.0,
        my = T + PH / 2.0,
    );
    let mut dbs: Vec<&str> = points.iter().map(|p| p.0).collect();
    dbs.dedup();
    dbs.sort_unstable();
    dbs.dedup();
    for (i, db) in dbs.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let pts: Vec<String> = points
            .iter()
            .filter(|p| p.0 == *db)
            .map(|p| format!("{:.1},{:.1}", x(p.1), y(p.2 as f64)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline class=\"lag-curve\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"3\" stroke-linejoin=\"round\" points=\"{}\"><title>{}</title></polyline>\
             <rect x=\"{lx}\" y=\"{ly:.1}\" width=\"12\" height=\"4\" fill=\"{colour}\"/><text x=\"{tx}\" y=\"{ty:.1}\" font-size=\"11\">{}</text>",
            pts.join(" "),
            escape(db),
            escape(db),
            lx = L + PW - 200.0,
            ly = T + 6.0 + i as f64 * 15.0,
            tx = L + PW - 182.0,
            ty = T + 11.0 + i as f64 * 15.0,
        );
    }
    svg.push_str("</svg>");
    let _ = write!(
        svg,
        "<p class=\"meta\">{} sample(s); lag in seconds (age of the oldest source commit not yet applied) max {}, p95 {}; in bytes (source WAL insert position minus applied position, the curve) max {}, p95 {}; {} change(s) applied.</p>",
        c.samples.len(),
        c.max_latency_ms
            .map_or("-".into(), |v| format!("{:.1}s", v as f64 / 1000.0)),
        c.p95_latency_ms
            .map_or("-".into(), |v| format!("{:.1}s", v as f64 / 1000.0)),
        c.max_lag_bytes
            .map_or("-".into(), |v| escape(&human_bytes(v.max(0) as u64))),
        c.p95_lag_bytes
            .map_or("-".into(), |v| escape(&human_bytes(v.max(0) as u64))),
        c.applied_changes
    );
    for (db, list) in &c.ddl {
        let _ = writeln!(
            svg,
            "<h3>Schema changes replayed in {} ({})</h3><table><tr><th>LSN</th><th>commit</th><th>status</th><th>statement</th></tr>",
            escape(db),
            list.len()
        );
        for d in list {
            let _ = writeln!(
                svg,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                escape(&d.lsn),
                escape(&d.commit_lsn),
                escape(&d.status),
                escape(&d.statement)
            );
        }
        svg.push_str("</table>\n");
    }
    svg
}

fn validation(r: &RunReport) -> String {
    let Some(v) = &r.validation else {
        return "<h2>Validation</h2><p>No validation recorded.</p>\n".into();
    };
    format!(
        "<h2>Validation</h2><div class=\"{}\"><strong>{}</strong> &middot; stage {} &middot; {} mode &middot; {} table(s), {} source rows, {} target rows &middot; {:.1} s &middot; finished {}<pre>{}</pre></div>\n",
        if v.clean { "clean" } else { "dirty" },
        if v.clean {
            "No differences"
        } else {
            "Differences found"
        },
        escape(&v.stage),
        escape(&v.mode),
        v.tables,
        v.source_rows,
        v.target_rows,
        v.seconds,
        escape(&v.finished_at),
        escape(&v.summary)
    )
}

fn cutover(r: &RunReport) -> String {
    if r.cutover.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "<h2>Cutover</h2><table><tr><th>Stage</th><th>Database</th><th>Write downtime</th><th>Fenced</th><th>LSN</th><th>Unlogged tables copied again</th><th>Large objects made equal</th><th>Materialized views refreshed</th><th>Planner statistics (before the fence)</th></tr>\n",
    );
    for c in &r.cutover {
        let downtime = match (c.downtime_seconds, c.simulated_downtime_seconds) {
            (Some(d), _) => format!("{d:.2} s"),
            (None, Some(d)) => format!("{d:.2} s (simulated)"),
            _ => "-".into(),
        };
        let resync = c.resync_words();
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{downtime}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.stage),
            escape(&c.database),
            c.fenced.map_or("-", |f| if f { "yes" } else { "no" }),
            escape(&c.lsn.map_or("-".into(), |l| l.to_string())),
            escape(&resync.unlogged_tables),
            escape(&resync.large_objects),
            escape(&resync.materialized_views),
            escape(&c.statistics_words()),
        );
    }
    out.push_str("</table>\n");
    out
}

fn tables(r: &RunReport) -> String {
    if r.tables.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "<h2>Tables copied</h2><table><tr><th>Database</th><th>Table</th><th>State</th><th>Rows</th><th>Size</th><th>Seconds</th><th>Rows/s</th><th>MB/s</th></tr>\n",
    );
    for t in &r.tables {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&t.database),
            escape(&t.table),
            escape(&t.state),
            t.rows,
            escape(&human_bytes(t.bytes.max(0) as u64)),
            t.seconds.map_or("-".into(), |s| format!("{s:.2}")),
            t.rows_per_second.map_or("-".into(), |v| format!("{v:.0}")),
            t.mb_per_second.map_or("-".into(), |v| format!("{v:.1}")),
        );
    }
    out.push_str("</table>\n");
    out
}

fn comparison(oldest_first: &[RunReport]) -> String {
    let mut out =
        String::from("<h2>Comparison</h2><table class=\"comparison\"><tr><th>Measure</th>");
    for r in oldest_first {
        let _ = write!(out, "<th>Run {} ({})</th>", r.run_id, escape(&r.mode));
    }
    out.push_str("<th>Change</th></tr>\n");
    for row in compare::rows(oldest_first) {
        let _ = write!(out, "<tr><td>{}</td>", escape(&row.label));
        for v in &row.values {
            let _ = write!(
                out,
                "<td class=\"n\">{}</td>",
                escape(&compare::format(row.unit, *v))
            );
        }
        let _ = writeln!(
            out,
            "<td class=\"n\">{}</td></tr>",
            escape(&compare::format_delta(row.unit, row.delta()))
        );
    }
    out.push_str("</table>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::model::{CdcReport, Sample, StageReport, TableCopy};

    fn hostile() -> RunReport {
        RunReport {
            version: 1,
            migration: "m<b>".into(),
            run_id: 1,
            mode: "run".into(),
            started_at: Some(1000.0),
            ended_at: Some(1060.0),
            seconds: Some(60.0),
            outcome: Some("done".into()),
            stages: vec![StageReport {
                id: "load\"><script>alert(1)</script>".into(),
                kind: "full_load".into(),
                state: "done".into(),
                started_at: Some(1000.0),
                ended_at: Some(1030.0),
                seconds: Some(30.0),
                this_run: true,
                ..Default::default()
            }],
            tables: vec![TableCopy {
                stage: "load".into(),
                database: "db".into(),
                table: "public.<script>alert('x')</script>".into(),
                state: "copied".into(),
                rows: 10,
                started_at: Some(1001.0),
                ended_at: Some(1002.0),
                ..Default::default()
            }],
            cdc: Some(CdcReport {
                stage: "cdc".into(),
                samples: (0..5)
                    .map(|i| Sample {
                        database: "d&b".into(),
                        at: 1030.0 + i as f64 * 2.0,
                        lag_bytes: Some(i * 1000),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn hostile_names_render_as_text() {
        let page = render(&[hostile()]);
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("public.&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(page.contains("m&lt;b&gt;"));
        assert!(page.contains("d&amp;b"));
        assert!(!page.contains("http"), "no URL at all");
        assert_eq!(page.matches("<svg").count(), 3, "dag, gantt, lag");
        assert!(page.contains("class=\"lag-curve\""));
    }

    #[test]
    fn no_external_resources() {
        let page = render(&[hostile(), hostile()]);
        for needle in ["src=", "href=", "<script", "@import", "url(http"] {
            assert!(!page.contains(needle), "{needle} in the page");
        }
        assert!(page.contains("<h2>Comparison</h2>"));
    }

    #[test]
    fn nice_ticks() {
        assert_eq!(tick_step(100.0, 10.0), 10.0);
        assert_eq!(tick_step(7.0, 5.0), 2.0);
        assert_eq!(tick_step(0.0, 5.0), 1.0);
    }
}
