//! Live progress on a terminal: one bar per running stage and one per table being copied.
//!
//! Stages publish what they are working on in an in-process registry ([`begin`] returns an
//! [`Item`] whose byte counter the stage advances); the run command draws the registry and the
//! stages' states from the checkpoint store with indicatif ([`Bars`]). Neither the executor nor
//! this module knows anything of PostgreSQL. Without a terminal nothing is drawn and the plain log
//! lines stay as they are. While bars are drawn, log lines go through [`LogWriter`], which lifts the
//! bars out of the way for each line.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One thing being worked on (a table being copied).
#[derive(Debug)]
pub struct Item {
    pub stage: String,
    pub database: String,
    pub name: String,
    /// Expected bytes (0: unknown).
    pub total: u64,
    /// Bytes done so far; the stage advances it.
    pub bytes: AtomicU64,
    pub rows: AtomicU64,
    finished: AtomicBool,
    pub started: Instant,
}

impl Item {
    /// Marks it finished (with its row count); the registry forgets it.
    pub fn finish(&self, rows: u64) {
        self.rows.store(rows, Ordering::Relaxed);
        self.finished.store(true, Ordering::Relaxed);
        if let Ok(mut items) = registry().lock() {
            items.retain(|i| !i.finished.load(Ordering::Relaxed));
        }
    }
}

fn registry() -> &'static Mutex<Vec<Arc<Item>>> {
    static ITEMS: OnceLock<Mutex<Vec<Arc<Item>>>> = OnceLock::new();
    ITEMS.get_or_init(|| Mutex::new(Vec::new()))
}

/// An item in the registry; dropping it (done, failed or abandoned) takes it out.
pub struct Tracked(Arc<Item>);

impl std::ops::Deref for Tracked {
    type Target = Item;
    fn deref(&self) -> &Item {
        &self.0
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.finish(self.0.rows.load(Ordering::Relaxed));
    }
}

/// Registers an item being worked on, until the returned guard is dropped.
pub fn begin(stage: &str, database: &str, name: &str, total: u64) -> Tracked {
    let item = Arc::new(Item {
        stage: stage.to_string(),
        database: database.to_string(),
        name: name.to_string(),
        total,
        bytes: AtomicU64::new(0),
        rows: AtomicU64::new(0),
        finished: AtomicBool::new(false),
        started: Instant::now(),
    });
    if let Ok(mut items) = registry().lock() {
        items.push(item.clone());
    }
    Tracked(item)
}

/// The items being worked on now.
pub fn items() -> Vec<Arc<Item>> {
    registry().lock().map(|i| i.clone()).unwrap_or_default()
}

/// Bytes of the unfinished items of one stage and database.
pub fn in_flight_bytes(stage: &str, database: &str) -> u64 {
    items()
        .iter()
        .filter(|i| i.stage == stage && i.database == database)
        .map(|i| i.bytes.load(Ordering::Relaxed))
        .sum()
}

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// Turns bars on (call once, before logging starts, when stderr is a terminal).
pub fn enable() {
    let _ = MULTI.set(MultiProgress::with_draw_target(
        ProgressDrawTarget::stderr_with_hz(8),
    ));
}

/// Whether bars are drawn.
pub fn enabled() -> bool {
    MULTI.get().is_some()
}

/// A `tracing` writer that prints each log line above the bars.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match MULTI.get() {
            Some(m) => m.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

/// The state of one stage as the bars show it.
#[derive(Debug, Clone)]
pub struct StageView {
    pub id: String,
    pub kind: String,
    /// pending, running, ready, done, failed.
    pub state: String,
    /// Seconds it has been running, or took.
    pub seconds: Option<f64>,
}

/// The bars of one run.
pub struct Bars {
    multi: MultiProgress,
    stages: HashMap<String, ProgressBar>,
    tables: HashMap<usize, ProgressBar>,
}

impl Bars {
    /// `None` when bars are off (no terminal).
    pub fn new() -> Option<Bars> {
        Some(Bars {
            multi: MULTI.get()?.clone(),
            stages: HashMap::new(),
            tables: HashMap::new(),
        })
    }

    /// Redraws from the stages' states and the registry.
    pub fn update(&mut self, stages: &[StageView]) {
        let spinner = ProgressStyle::with_template("{spinner:.cyan} {prefix:<14} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        for s in stages {
            let active = matches!(s.state.as_str(), "running" | "ready");
            let bar = match self.stages.get(&s.id) {
                Some(b) => b.clone(),
                None if active => {
                    let b = self.multi.add(ProgressBar::new_spinner());
                    b.set_style(spinner.clone());
                    b.set_prefix(s.id.clone());
                    b.enable_steady_tick(Duration::from_millis(120));
                    self.stages.insert(s.id.clone(), b.clone());
                    b
                }
                None => continue,
            };
            if bar.is_finished() {
                continue;
            }
            let took = s.seconds.map(|x| format!(" {x:.1}s")).unwrap_or_default();
            match s.state.as_str() {
                "running" => bar.set_message(format!("{} running{took}", s.kind)),
                "ready" => bar.set_message(format!("{} caught up, streaming{took}", s.kind)),
                state => bar.finish_with_message(format!("{} {state}{took}", s.kind)),
            }
        }
        let style =
            ProgressStyle::with_template("  {prefix:<30} [{bar:24}] {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        let live = items();
        let mut seen = Vec::new();
        for item in &live {
            let key = Arc::as_ptr(item) as usize;
            seen.push(key);
            let bar = self.tables.entry(key).or_insert_with(|| {
                let b = self.multi.add(ProgressBar::new(item.total.max(1)));
                b.set_style(style.clone());
                b.set_prefix(format!("{} {}", item.stage, item.name));
                b
            });
            let done = item.bytes.load(Ordering::Relaxed);
            if done > bar.length().unwrap_or(0) {
                // The on-disk size underestimated the COPY stream.
                bar.set_length(done + done / 10);
            }
            bar.set_position(done);
            // Our own rate over the item's lifetime: indicatif's estimate needs steady small steps.
            let secs = item.started.elapsed().as_secs_f64();
            if secs >= 0.5 && done > 0 {
                let rate = done as f64 / secs;
                let left = bar.length().unwrap_or(done).saturating_sub(done) as f64 / rate;
                bar.set_message(format!(
                    "{}/s eta {}",
                    indicatif::HumanBytes(rate as u64),
                    indicatif::HumanDuration(Duration::from_secs_f64(left.ceil()))
                ));
            }
        }
        self.tables.retain(|key, bar| {
            let keep = seen.contains(key);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
    }

    /// Removes every bar (the run is over).
    pub fn clear(&mut self) {
        for b in self.tables.values().chain(self.stages.values()) {
            b.finish_and_clear();
        }
        self.tables.clear();
        self.stages.clear();
        let _ = self.multi.clear();
    }
}
