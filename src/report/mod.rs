//! Run reports: what one run of a plan did, snapshotted into the store's `reports` table at the end
//! of every `run` and shown by `pgferry report` as text, JSON or one self-contained HTML page.
//! [`model`] is the persisted shape (versioned), [`collect`] assembles it from the store,
//! [`compare`] lines several up (rehearsals), [`text`] and [`html`] render it.

pub mod collect;
pub mod compare;
pub mod html;
pub mod model;
pub mod text;

pub use model::RunReport;
