//! Several reports side by side (repeated rehearsals, or a rehearsal and the real run): one row per
//! measure, one column per run, oldest first, and the change of the newest against the one before.

use super::model::RunReport;

/// How a row's numbers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Count,
    Bytes,
    MbPerSecond,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub label: String,
    pub unit: Unit,
    /// One per report, in the order given.
    pub values: Vec<Option<f64>>,
}

impl Row {
    /// The newest value minus the one before, when both exist.
    pub fn delta(&self) -> Option<f64> {
        match self.values.as_slice() {
            [.., Some(a), Some(b)] => Some(b - a),
            _ => None,
        }
    }
}

/// The comparison rows of `reports` (oldest first): every stage's duration (stages of the newest
/// plan first), the run, the downtime, the copy, the lag and the validation.
pub fn rows(reports: &[RunReport]) -> Vec<Row> {
    let mut out = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for r in reports.iter().rev() {
        for s in &r.stages {
            if !ids.contains(&s.id) {
                ids.push(s.id.clone());
            }
        }
    }
    let row = |label: String, unit: Unit, f: &dyn Fn(&RunReport) -> Option<f64>| Row {
        label,
        unit,
        values: reports.iter().map(f).collect(),
    };
    for id in &ids {
        out.push(row(format!("stage {id}"), Unit::Seconds, &|r| {
            // Only what the run itself did: a stage done by an earlier run took no time in this one.
            r.stages
                .iter()
                .find(|s| &s.id == id && s.this_run)
                .and_then(|s| s.seconds)
        }));
    }
    out.push(row("whole run".into(), Unit::Seconds, &|r| r.seconds));
    out.push(row("write downtime".into(), Unit::Seconds, &|r| {
        r.downtime()
    }));
    out.push(row("rows copied".into(), Unit::Count, &|r| {
        (!r.tables.is_empty()).then(|| r.copy_totals().0 as f64)
    }));
    out.push(row("copy throughput".into(), Unit::MbPerSecond, &|r| {
        r.copy_totals().2
    }));
    out.push(row("max cdc lag".into(), Unit::Bytes, &|r| {
        r.cdc
            .as_ref()
            .and_then(|c| c.max_lag_bytes)
            .map(|v| v as f64)
    }));
    out.push(row("p95 cdc lag".into(), Unit::Bytes, &|r| {
        r.cdc
            .as_ref()
            .and_then(|c| c.p95_lag_bytes)
            .map(|v| v as f64)
    }));
    out.push(row("validation differences".into(), Unit::Count, &|r| {
        r.validation.as_ref().map(|v| v.mismatch_count as f64)
    }));
    out
}

/// A value for people, in the row's unit.
pub fn format(unit: Unit, v: Option<f64>) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    match unit {
        Unit::Seconds => format!("{v:.1} s"),
        Unit::Count => format!("{v:.0}"),
        Unit::Bytes => crate::plan::units::human_bytes(v.max(0.0) as u64),
        Unit::MbPerSecond => format!("{v:.1} MB/s"),
    }
}

/// A change for people, signed.
pub fn format_delta(unit: Unit, d: Option<f64>) -> String {
    let Some(d) = d else {
        return "-".into();
    };
    let sign = if d > 0.0 {
        "+"
    } else if d < 0.0 {
        "-"
    } else {
        "±"
    };
    let body = match unit {
        Unit::Bytes => crate::plan::units::human_bytes(d.abs() as u64),
        _ => format(unit, Some(d.abs())),
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::model::{CutoverReport, StageReport};

    fn report(id: i64, load: f64, downtime: f64) -> RunReport {
        RunReport {
            run_id: id,
            mode: "rehearsal".into(),
            stages: vec![StageReport {
                id: "load".into(),
                kind: "full_load".into(),
                state: "done".into(),
                seconds: Some(load),
                this_run: true,
                ..Default::default()
            }],
            cutover: vec![CutoverReport {
                simulated_downtime_seconds: Some(downtime),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn deltas_compare_the_newest_with_the_one_before() {
        let rows = rows(&[report(1, 10.0, 2.0), report(2, 7.5, 3.0)]);
        let load = rows.iter().find(|r| r.label == "stage load").expect("row");
        assert_eq!(load.values, vec![Some(10.0), Some(7.5)]);
        assert_eq!(load.delta(), Some(-2.5));
        assert_eq!(format_delta(load.unit, load.delta()), "-2.5 s");
        let down = rows
            .iter()
            .find(|r| r.label == "write downtime")
            .expect("row");
        assert_eq!(format_delta(down.unit, down.delta()), "+1.0 s");
        let lag = rows.iter().find(|r| r.label == "max cdc lag").expect("row");
        assert_eq!(lag.delta(), None);
    }
}
