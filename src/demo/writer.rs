//! The demo's application: keeps writing to the source while the migration runs, in small
//! transactions — a new rental with its payment, a returned rental, a refunded (deleted) payment,
//! a customer's preferences — until told to stop or until the source refuses writes (the cutover's
//! read-only fence, or the fence terminating its session), which it takes as "stop".

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;

/// Pause between two transactions.
const PAUSE: Duration = Duration::from_millis(10);

/// What the writer did.
#[derive(Debug, Clone, Default)]
pub struct WriterReport {
    pub transactions: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    /// Why it stopped.
    pub stopped: String,
    /// When the source first refused a write (the fence), if it did.
    pub refused_at: Option<Instant>,
}

/// Starts the writer on the source database `conn` of a demo generated at `scale`.
pub fn spawn(conn: ConnInfo, scale: u32, stop: CancellationToken) -> JoinHandle<WriterReport> {
    tokio::spawn(async move {
        let mut report = WriterReport::default();
        match write(&conn, scale.max(1), &stop, &mut report).await {
            Ok(()) => {
                if report.stopped.is_empty() {
                    report.stopped = "stopped by the demo".into();
                }
            }
            Err(e) => report.stopped = format!("failed: {e}"),
        }
        report
    })
}

/// Whether an error means the source no longer takes writes (fenced, or our session ended).
fn is_fence(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    matches!(
        e.code().map(|c| c.code()),
        // read_only_sql_transaction, admin_shutdown (terminated by the fence), crash/cannot connect
        Some("25006" | "57P01" | "57P02" | "57P03")
    )
}

async fn write(
    conn: &ConnInfo,
    scale: u32,
    stop: &CancellationToken,
    report: &mut WriterReport,
) -> Result<()> {
    let mut client = conn.connect("demo writer").await?;
    let s = i64::from(scale);
    let (inventory, customers, rentals, payments) = (4500 * s, 600 * s, 160_000 * s, 160_000 * s);
    let mut i: i64 = 0;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        i += 1;
        let result: std::result::Result<(u64, u64, u64), tokio_postgres::Error> = async {
            let tx = client.transaction().await?;
            let mut n = (0, 0, 0);
            match i % 4 {
                0 | 1 => {
                    tx.execute(
                        "WITH r AS (
                             INSERT INTO public.rental (rental_date, inventory_id, customer_id, last_update)
                             VALUES (timestamptz '2025-12-01 00:00:00+00' + $1 * interval '1 second', $2, $3, now())
                             RETURNING rental_id, customer_id, rental_date)
                         INSERT INTO public.payment (customer_id, rental_id, amount, payment_date)
                         SELECT customer_id, rental_id, 3.99, rental_date FROM r",
                        &[
                            &(i as f64),
                            &((1 + (i * 7919) % inventory) as i32),
                            &((1 + (i * 104_729) % customers) as i32),
                        ],
                    )
                    .await?;
                    n.0 += 2;
                }
                2 => {
                    n.1 += tx
                        .execute(
                            "UPDATE public.rental SET return_date = rental_date + interval '2 days' WHERE rental_id = $1",
                            &[&(1 + (i * 7919) % rentals)],
                        )
                        .await?;
                    n.1 += tx
                        .execute(
                            "UPDATE public.customer SET preferences = coalesce(preferences, '{}') || jsonb_build_object('visits', $1::int8) WHERE customer_id = $2",
                            &[&i, &((1 + (i * 31) % customers) as i32)],
                        )
                        .await?;
                }
                _ => {
                    n.2 += tx
                        .execute(
                            "DELETE FROM public.payment WHERE payment_id = $1",
                            &[&(1 + (i * 15_485_863) % payments)],
                        )
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(n)
        }
        .await;
        match result {
            Ok((ins, upd, del)) => {
                report.transactions += 1;
                report.inserts += ins;
                report.updates += upd;
                report.deletes += del;
            }
            Err(e) if is_fence(&e) => {
                report.refused_at = Some(Instant::now());
                report.stopped = "the source refused writes (the cutover fence)".into();
                return Ok(());
            }
            Err(e) => {
                // A failed transaction rolled back; anything else is a real problem.
                return Err(Error::pg(&e, "writing to the demo source"));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(PAUSE) => {}
        }
        // A lost connection that is not the fence: try once to reconnect.
        if client.is_closed() {
            client = conn.connect("demo writer").await?;
        }
    }
}
