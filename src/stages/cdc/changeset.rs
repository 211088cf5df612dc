//! The changes of one target transaction, gathered per table before they are sent, so that many
//! source changes become a few set-based statements.
//!
//! Why reordering is safe: the apply session runs with `session_replication_role = replica`, so
//! no ordinary trigger, rule or foreign-key check fires; what one table's statements do cannot
//! depend on another table's rows, and the statements of one target transaction are invisible to
//! everyone until it commits. So only the order *within* a table matters, and a [`TableQueue`]
//! keeps it: a sequence of [`Run`]s of one kind each, sent in order. Inside a run:
//!
//! - inserts stay in order (one multi-row INSERT per chunk);
//! - updates that keep the row's key are merged per key: the row ends with the last value of each
//!   column (an unchanged-TOAST column keeps the value an earlier update of the same row set, or
//!   is left alone), which is the state the sequence leaves behind;
//! - deletes are a set of keys;
//! - a delete that follows an insert run none of whose rows has its key joins the delete run
//!   before that insert run (it finds a different row by a unique key, so the two commute): the
//!   common "delete a row and put it back" (or a row replaced by key) stays two statements per
//!   batch, `DELETE` of every key then `INSERT` of every row, instead of two per source
//!   transaction.
//!
//! What is *not* equivalent is a transient conflict: set-based statements do not change rows in
//! source order, so a unique constraint on other columns (two rows swapping a unique value) or an
//! exclusion constraint can fail where the source's order would not. The applier treats any failure
//! of a grouped statement as "re-apply this stretch in source order" (see `cdc::mod`), so a
//! conflict costs a retry, never a wrong row. Tables the grouping must not touch (REPLICA IDENTITY
//! FULL, key changes, triggers that fire in replica mode) are applied change by change, in order.

use std::collections::{HashMap, HashSet};

/// One column value of a queued update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// Not changed by the update (pgoutput's unchanged-TOAST marker): left alone.
    Unset,
    Null,
    Text(String),
}

impl Val {
    fn len(&self) -> usize {
        match self {
            Val::Text(s) => s.len(),
            _ => 0,
        }
    }
}

/// A row as text values in the relation's column order (`None` is NULL).
pub type Row = Vec<Option<String>>;

/// Updates of distinct keys; a second update of a key is merged into the first's slot.
#[derive(Debug, Default)]
pub struct UpdateRun {
    pub rows: Vec<Vec<Val>>,
    index: HashMap<String, usize>,
}

/// Inserts in source order, with the keys of their rows when every row has one (see
/// [`ChangeSet::delete`]).
#[derive(Debug, Default)]
pub struct InsertRun {
    pub rows: Vec<Row>,
    /// The rows' keys; `None` once a row without a known key joined the run.
    keys: Option<HashSet<String>>,
}

/// Deletes of distinct keys (key column values only, in the relation's key order).
#[derive(Debug, Default)]
pub struct DeleteRun {
    pub keys: Vec<Row>,
    index: HashSet<String>,
}

#[derive(Debug)]
pub enum Run {
    Insert(InsertRun),
    Update(UpdateRun),
    Delete(DeleteRun),
}

/// The queued changes of one table, in source order of their runs.
#[derive(Debug)]
pub struct TableQueue {
    pub oid: u32,
    pub runs: Vec<Run>,
}

/// The queued changes of one target transaction.
#[derive(Debug, Default)]
pub struct ChangeSet {
    tables: Vec<TableQueue>,
    by_oid: HashMap<u32, usize>,
    rows: usize,
    bytes: usize,
}

/// A key as one string: each value length-prefixed, so no two keys collide.
pub fn encode_key<'a>(values: impl Iterator<Item = Option<&'a str>>) -> String {
    let mut k = String::new();
    for v in values {
        match v {
            None => k.push_str("n;"),
            Some(s) => {
                k.push_str(&s.len().to_string());
                k.push(':');
                k.push_str(s);
            }
        }
    }
    k
}

fn row_bytes(r: &Row) -> usize {
    r.iter()
        .map(|v| v.as_ref().map_or(0, String::len) + 8)
        .sum()
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Rows held (a merged update counts once).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Approximate bytes of the values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn has(&self, oid: u32) -> bool {
        self.by_oid.contains_key(&oid)
    }

    fn queue(&mut self, oid: u32) -> &mut TableQueue {
        let i = match self.by_oid.get(&oid) {
            Some(i) => *i,
            None => {
                self.tables.push(TableQueue {
                    oid,
                    runs: Vec::new(),
                });
                self.by_oid.insert(oid, self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        &mut self.tables[i]
    }

    /// Queues an insert of a row with key `key` (see [`encode_key`]; `None` when it has no
    /// usable key); returns the number of rows of the table's last run.
    pub fn insert(&mut self, oid: u32, key: Option<String>, row: Row) -> usize {
        self.rows += 1;
        self.bytes += row_bytes(&row);
        let q = self.queue(oid);
        if !matches!(q.runs.last(), Some(Run::Insert(_))) {
            q.runs.push(Run::Insert(InsertRun {
                rows: Vec::new(),
                keys: Some(HashSet::new()),
            }));
        }
        let Some(Run::Insert(run)) = q.runs.last_mut() else {
            return 0;
        };
        match (key, &mut run.keys) {
            (Some(k), Some(keys)) => {
                keys.insert(k);
            }
            _ => run.keys = None,
        }
        run.rows.push(row);
        run.rows.len()
    }

    /// Queues an update that keeps the row's key `key` (see [`encode_key`]); returns the number
    /// of rows of the table's last run.
    pub fn update(&mut self, oid: u32, key: String, row: Vec<Val>) -> usize {
        let added: usize = row.iter().map(|v| v.len() + 8).sum();
        let q = self.queue(oid);
        if !matches!(q.runs.last(), Some(Run::Update(_))) {
            q.runs.push(Run::Update(UpdateRun::default()));
        }
        let Some(Run::Update(run)) = q.runs.last_mut() else {
            return 0;
        };
        let before = run.rows.len();
        match run.index.get(&key) {
            Some(&i) => {
                // The later value of each column wins; an unset column keeps the earlier one.
                for (old, new) in run.rows[i].iter_mut().zip(row) {
                    if new != Val::Unset {
                        *old = new;
                    }
                }
            }
            None => {
                run.index.insert(key, run.rows.len());
                run.rows.push(row);
            }
        }
        let n = run.rows.len();
        self.rows += n - before;
        self.bytes += added;
        n
    }

    /// Queues a delete of the row with key `key` (`values`: its key columns); returns the number
    /// of rows of the table's last run.
    pub fn delete(&mut self, oid: u32, key: String, values: Row) -> usize {
        let added = row_bytes(&values);
        let q = self.queue(oid);
        let n = q.runs.len();
        // After `Delete, Insert` runs: the delete joins the first when no row of the insert run
        // has its key (then neither statement can touch the other's row) and the first does not
        // hold it already (a key deleted twice in one run would be deleted once).
        let hoist = n >= 2
            && matches!(&q.runs[n - 1], Run::Insert(i) if i.keys.as_ref().is_some_and(|k| !k.contains(&key)))
            && matches!(&q.runs[n - 2], Run::Delete(d) if !d.index.contains(&key));
        if !hoist && !matches!(q.runs.last(), Some(Run::Delete(_))) {
            q.runs.push(Run::Delete(DeleteRun::default()));
        }
        let at = if hoist { n - 2 } else { q.runs.len() - 1 };
        let Some(Run::Delete(run)) = q.runs.get_mut(at) else {
            return 0;
        };
        let fresh = run.index.insert(key);
        if fresh {
            run.keys.push(values);
        }
        let n = run.keys.len();
        if fresh {
            self.rows += 1;
            self.bytes += added;
        }
        n
    }

    /// Everything queued, tables in order of their first change.
    pub fn take(&mut self) -> Vec<TableQueue> {
        self.by_oid.clear();
        self.rows = 0;
        self.bytes = 0;
        std::mem::take(&mut self.tables)
    }

    /// The queue of one table, leaving the others.
    pub fn take_table(&mut self, oid: u32) -> Option<TableQueue> {
        let i = self.by_oid.remove(&oid)?;
        let q = self.tables.remove(i);
        for v in self.by_oid.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        for run in &q.runs {
            match run {
                Run::Insert(run) => {
                    self.rows -= run.rows.len();
                    let held: usize = run.rows.iter().map(row_bytes).sum();
                    self.bytes = self.bytes.saturating_sub(held);
                }
                Run::Update(u) => {
                    self.rows -= u.rows.len();
                    let held: usize = u.rows.iter().flatten().map(|v| v.len() + 8).sum();
                    self.bytes = self.bytes.saturating_sub(held);
                }
                Run::Delete(d) => {
                    self.rows -= d.keys.len();
                    let held: usize = d.keys.iter().map(row_bytes).sum();
                    self.bytes = self.bytes.saturating_sub(held);
                }
            }
        }
        if self.tables.is_empty() {
            self.bytes = 0;
        }
        Some(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Val {
        Val::Text(s.into())
    }

    fn key(k: &str) -> String {
        encode_key([Some(k)].into_iter())
    }

    #[test]
    fn keys_do_not_collide() {
        assert_ne!(
            encode_key([Some("a:1"), Some("b")].into_iter()),
            encode_key([Some("a"), Some("1:b")].into_iter())
        );
        assert_ne!(
            encode_key([None].into_iter()),
            encode_key([Some("")].into_iter())
        );
    }

    #[test]
    fn updates_of_one_key_merge_and_keep_unset_columns() {
        let mut c = ChangeSet::default();
        c.update(1, key("1"), vec![t("1"), t("a"), t("x")]);
        c.update(1, key("2"), vec![t("2"), t("b"), Val::Unset]);
        c.update(1, key("1"), vec![t("1"), t("c"), Val::Unset]);
        c.update(1, key("1"), vec![t("1"), Val::Null, Val::Unset]);
        assert_eq!(c.rows(), 2);
        let q = c.take();
        assert_eq!(q.len(), 1);
        let Run::Update(u) = &q[0].runs[0] else {
            panic!("not an update run: {:?}", q[0].runs[0]);
        };
        assert_eq!(u.rows[0], vec![t("1"), Val::Null, t("x")]);
        assert_eq!(u.rows[1], vec![t("2"), t("b"), Val::Unset]);
        assert!(c.is_empty());
        assert_eq!(c.rows(), 0);
    }

    #[test]
    fn runs_keep_the_order_within_a_table() {
        let mut c = ChangeSet::default();
        c.insert(1, Some(key("1")), vec![Some("1".into())]);
        c.insert(2, Some(key("9")), vec![Some("9".into())]);
        c.insert(1, Some(key("2")), vec![Some("2".into())]);
        c.delete(1, key("1"), vec![Some("1".into())]);
        c.delete(1, key("1"), vec![Some("1".into())]);
        c.insert(1, Some(key("1")), vec![Some("1".into())]);
        c.update(1, key("1"), vec![t("1")]);
        let q = c.take();
        assert_eq!(q.iter().map(|t| t.oid).collect::<Vec<_>>(), vec![1, 2]);
        let kinds: Vec<String> = q[0]
            .runs
            .iter()
            .map(|r| match r {
                Run::Insert(i) => format!("I{}", i.rows.len()),
                Run::Update(u) => format!("U{}", u.rows.len()),
                Run::Delete(d) => format!("D{}", d.keys.len()),
            })
            .collect();
        assert_eq!(kinds, vec!["I2", "D1", "I1", "U1"]);
    }

    fn kinds(q: &TableQueue) -> Vec<String> {
        q.runs
            .iter()
            .map(|r| match r {
                Run::Insert(i) => format!("I{}", i.rows.len()),
                Run::Update(u) => format!("U{}", u.rows.len()),
                Run::Delete(d) => format!("D{}", d.keys.len()),
            })
            .collect()
    }

    #[test]
    fn rows_deleted_and_put_back_become_one_delete_and_one_insert() {
        let mut c = ChangeSet::default();
        for k in ["1", "2", "3"] {
            c.delete(1, key(k), vec![Some(k.into())]);
            c.insert(1, Some(key(k)), vec![Some(k.into())]);
        }
        let q = c.take();
        assert_eq!(kinds(&q[0]), vec!["D3", "I3"]);
        let Run::Delete(d) = &q[0].runs[0] else {
            panic!("not a delete run");
        };
        assert_eq!(
            d.keys,
            vec![
                vec![Some("1".to_string())],
                vec![Some("2".into())],
                vec![Some("3".into())]
            ]
        );

        // A key the insert run holds, or one the delete run holds, starts a new run: the row
        // put back must be deleted after it was inserted.
        let mut c = ChangeSet::default();
        c.delete(1, key("1"), vec![Some("1".into())]);
        c.insert(1, Some(key("1")), vec![Some("1".into())]);
        c.delete(1, key("1"), vec![Some("1".into())]);
        c.insert(1, Some(key("1")), vec![Some("1".into())]);
        assert_eq!(kinds(&c.take()[0]), vec!["D1", "I1", "D1", "I1"]);

        // An insert whose key is not known blocks the move.
        let mut c = ChangeSet::default();
        c.delete(1, key("1"), vec![Some("1".into())]);
        c.insert(1, None, vec![Some("1".into())]);
        c.delete(1, key("2"), vec![Some("2".into())]);
        assert_eq!(kinds(&c.take()[0]), vec!["D1", "I1", "D1"]);

        // Not across an update run either.
        let mut c = ChangeSet::default();
        c.delete(1, key("1"), vec![Some("1".into())]);
        c.update(1, key("5"), vec![t("5")]);
        c.delete(1, key("2"), vec![Some("2".into())]);
        assert_eq!(kinds(&c.take()[0]), vec!["D1", "U1", "D1"]);
        assert_eq!(c.rows(), 0);
    }

    #[test]
    fn taking_one_table_leaves_the_others() {
        let mut c = ChangeSet::default();
        c.insert(1, Some(key("1")), vec![Some("1".into())]);
        c.insert(2, Some(key("2")), vec![Some("2".into())]);
        c.insert(3, Some(key("3")), vec![Some("3".into())]);
        let q = c.take_table(2).map(|q| q.oid);
        assert_eq!(q, Some(2));
        assert_eq!(c.rows(), 2);
        assert!(c.has(3) && c.has(1) && !c.has(2));
        assert!(c.take_table(2).is_none());
        c.insert(3, None, vec![Some("4".into())]);
        let rest = c.take();
        assert_eq!(rest.iter().map(|t| t.oid).collect::<Vec<_>>(), vec![1, 3]);
        let Run::Insert(i) = &rest[1].runs[0] else {
            panic!("not an insert run");
        };
        assert_eq!(i.rows.len(), 2);
    }
}
