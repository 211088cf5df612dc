//! An application writing to a database from a thread of its own while a test runs: one session,
//! one statement (or `BEGIN; ...; COMMIT`) per step at a steady pace, until the test stops it or a
//! fence refuses it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::cluster::{SUPERUSER, connect_as};

/// What a [`Writer`] connects to and how it behaves.
pub struct WriterSpec {
    /// Named in its panics.
    pub name: &'static str,
    /// The cluster's port (on 127.0.0.1).
    pub port: u16,
    pub db: String,
    /// A role to write as (the test password); the cluster's superuser when `None`.
    pub user: Option<&'static str>,
    /// One step starts every `every` (later when a step takes longer).
    pub every: Duration,
    /// SQLSTATEs that mean the fence stopped the application (as a closed session does): the
    /// writer records it and ends. Any other error fails the test. Empty: every error does.
    pub fenced_by: &'static [&'static str],
}

/// The SQLSTATEs of a fence: a read-only transaction (25006) and a session it ended (57P01).
pub const FENCE_CODES: &[&str] = &["25006", "57P01"];

/// What the writer did, readable while it runs.
#[derive(Default)]
pub struct Written {
    /// Steps committed.
    pub transactions: AtomicU64,
    /// A write was refused by the fence (or the session ended).
    pub fenced: AtomicBool,
}

pub struct Writer {
    stop: Arc<AtomicBool>,
    pub written: Arc<Written>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts writing `statement(i)` for i = 1, 2, ...
    pub fn start(
        spec: WriterSpec,
        mut statement: impl FnMut(u64) -> String + Send + 'static,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Written::default());
        let (s, w) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let user = spec.user.unwrap_or(SUPERUSER);
                let client = connect_as(spec.name, spec.port, user, &spec.db).await;
                let mut due = tokio::time::Instant::now();
                let mut i: u64 = 0;
                while !s.load(Ordering::SeqCst) {
                    i += 1;
                    let sql = statement(i);
                    match client.batch_execute(&sql).await {
                        Ok(()) => {
                            w.transactions.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            let code = e.code().map(|c| c.code().to_string());
                            let fenced = !spec.fenced_by.is_empty()
                                && (client.is_closed()
                                    || code
                                        .as_deref()
                                        .is_some_and(|c| spec.fenced_by.contains(&c)));
                            if fenced {
                                w.fenced.store(true, Ordering::SeqCst);
                                return;
                            }
                            panic!("{} failed on `{sql}`: {e:?}", spec.name);
                        }
                    }
                    due = (due + spec.every).max(tokio::time::Instant::now());
                    tokio::time::sleep_until(due).await;
                }
            });
        });
        Writer {
            stop,
            written,
            thread: Some(thread),
        }
    }

    /// Steps committed so far.
    pub fn transactions(&self) -> u64 {
        self.written.transactions.load(Ordering::SeqCst)
    }

    pub fn fenced(&self) -> bool {
        self.written.fenced.load(Ordering::SeqCst)
    }

    /// Whether the writer has ended by itself (fenced out, or failed).
    pub fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the writer and waits for it; its failure fails the test here. Returns the steps
    /// committed.
    pub fn stop(&mut self) -> u64 {
        self.halt();
        self.transactions()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && let Err(panic) = t.join()
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.halt();
    }
}
