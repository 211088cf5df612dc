//! Parsing the post-data section of a schema dump: the plain SQL that `pg_restore --section=post-data
//! -f FILE` (or `pg_dump --section=post-data`) writes. Such a script is a preamble of session settings
//! followed by objects, each introduced by a comment header:
//!
//! ```text
//! --
//! -- Name: film film_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
//! --
//!
//! ALTER TABLE ONLY public.film
//!     ADD CONSTRAINT film_pkey PRIMARY KEY (film_id);
//! ```
//!
//! Rules:
//! - The text is split into top-level statements with a small SQL lexer ([`crate::pg::sql_lexer`]) that knows single-quoted
//!   strings (and `E''` strings), quoted identifiers, dollar quotes, `--` and nested `/* */`
//!   comments, so nothing inside a string (a `COMMENT ... IS '...'` that contains a fake header or a
//!   `;`) is misread.
//! - Between statements, runs of `--` comment lines are comment blocks; a block with a line
//!   `-- [...]Name: N; Type: T; Schema: S[; Owner: O][; Tablespace: X]` starts an object. The fields
//!   are taken from the right, so a name containing `; Type: ` is read correctly.
//! - psql's `\restrict KEY` and `\unrestrict KEY` lines (PostgreSQL 15.14+, 16.10+, ...) are dropped;
//!   any other psql meta-command is an error (it cannot be honoured over a plain connection).
//! - Session settings (`SET name = value`, `SET name TO value`, `SET SESSION AUTHORIZATION`,
//!   `SET ROLE`, `SELECT pg_catalog.set_config(...)`) form a running session state, as they would in
//!   the single session pg_restore uses. pg_dump writes a setting such as `SET default_tablespace =
//!   ts;` *before* the header of the object it applies to, so settings after an object's last
//!   statement belong to the objects that follow; each object carries the complete state in effect
//!   at its header, and can therefore run on any session, in any order.
//! - Statements before the first header must be settings (the preamble).
//! - Objects without any statement are left out.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::pg::ident::QualifiedName;
use crate::pg::sql_lexer::{Parser, Segment, Tok, lex, tokens};

/// A parsed post-data script.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// The session settings before the first object, in order.
    pub preamble: Vec<String>,
    /// The objects, in file order.
    pub items: Vec<Item>,
}

/// When an object is built: indexes and constraints first (several at a time), then the index
/// attachments of partitions, then foreign keys (several at a time), then everything else in file
/// order, and materialized views are refreshed last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Indexes,
    Attach,
    ForeignKeys,
    Other,
    Refresh,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Indexes,
        Phase::Attach,
        Phase::ForeignKeys,
        Phase::Other,
        Phase::Refresh,
    ];

    /// Whether objects of this phase may be built several at a time.
    pub fn parallel(self) -> bool {
        matches!(self, Phase::Indexes | Phase::ForeignKeys)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Phase::Indexes => "indexes and constraints",
            Phase::Attach => "partition index attachments",
            Phase::ForeignKeys => "foreign keys",
            Phase::Other => "triggers, rules, policies, comments, privileges and the rest",
            Phase::Refresh => "materialized view refreshes",
        }
    }
}

/// How an object's statement locks a table, for scheduling objects side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// `CREATE INDEX`: other index builds on the same table can run at the same time.
    Shared,
    /// Constraints (ACCESS EXCLUSIVE), foreign keys (SHARE ROW EXCLUSIVE, on both tables), or
    /// anything that also alters the table: nothing else on the table at the same time.
    Exclusive,
}

/// The kind of an object whose existence can be checked in the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Index,
    Constraint,
    Trigger,
    Rule,
    Policy,
}

/// An object that lives on a table, as named by its creating statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableObject {
    pub kind: ObjectKind,
    pub table: QualifiedName,
    pub name: String,
}

/// One object of the script.
#[derive(Debug, Clone)]
pub struct Item {
    /// Position among the script's objects (0-based).
    pub ordinal: usize,
    /// The header's `Name:` (for objects on tables, `table object`).
    pub name: String,
    /// The header's `Type:` (`INDEX`, `FK CONSTRAINT`, `MATERIALIZED VIEW DATA`, ...).
    pub kind: String,
    /// The header's `Schema:`, `None` for `-`.
    pub schema: Option<String>,
    pub owner: Option<String>,
    /// Line of the header's `Name:` line (1-based), for messages.
    pub line: usize,
    /// The session settings in effect for this object (the preamble plus later changes), in order.
    pub settings: Vec<String>,
    /// The object's statements, each with its terminating `;`.
    pub statements: Vec<String>,
}

impl Item {
    /// For people: `INDEX public.idx_title`, `CONSTRAINT film_pkey ON public.film`,
    /// `COMMENT INDEX idx_title (schema public)`, `EVENT TRIGGER et`.
    pub fn label(&self) -> String {
        if let Some(obj) = self.table_object()
            && obj.kind != ObjectKind::Index
        {
            return format!("{} {} ON {}", self.kind, obj.name, obj.table);
        }
        match &self.schema {
            Some(s) if self.name.contains(' ') => {
                format!("{} {} (schema {s})", self.kind, self.name)
            }
            Some(s) => format!("{} {}.{}", self.kind, s, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }

    /// The statements as one script.
    pub fn sql(&self) -> String {
        self.statements.join("\n")
    }

    /// The first line of the first statement, for messages.
    pub fn first_line(&self) -> &str {
        self.statements
            .first()
            .and_then(|s| s.lines().map(str::trim).find(|l| !l.is_empty()))
            .unwrap_or("")
    }

    pub fn phase(&self) -> Phase {
        match self.kind.as_str() {
            "INDEX" | "CONSTRAINT" => Phase::Indexes,
            "INDEX ATTACH" => Phase::Attach,
            "FK CONSTRAINT" => Phase::ForeignKeys,
            "MATERIALIZED VIEW DATA" => Phase::Refresh,
            _ => Phase::Other,
        }
    }

    /// Whether "already exists" on a rerun means this object was built by an earlier run (or by
    /// hand): its creating statement is CREATE INDEX, ADD CONSTRAINT, CREATE TRIGGER, CREATE RULE or
    /// CREATE POLICY.
    pub fn tolerates_existing(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "INDEX" | "CONSTRAINT" | "FK CONSTRAINT" | "TRIGGER" | "RULE" | "POLICY"
        )
    }

    /// The object the first statement creates on a table, when it is one we know how to read:
    /// `CREATE [UNIQUE] INDEX n ON [ONLY] t`, `ALTER TABLE [ONLY] t ADD CONSTRAINT n`,
    /// `CREATE [CONSTRAINT] TRIGGER n ... ON t`, `CREATE RULE n AS ON e TO t`, `CREATE POLICY n ON t`.
    pub fn table_object(&self) -> Option<TableObject> {
        let toks = tokens(self.statements.first()?);
        let mut p = Parser {
            toks: &toks,
            pos: 0,
            default_schema: self.schema.as_deref(),
        };
        match self.kind.as_str() {
            "INDEX" => {
                p.keyword("CREATE")?;
                p.optional("UNIQUE");
                p.keyword("INDEX")?;
                p.optional("CONCURRENTLY");
                p.if_not_exists();
                let name = p.ident()?;
                p.keyword("ON")?;
                p.optional("ONLY");
                let table = p.qualified()?;
                Some(TableObject {
                    kind: ObjectKind::Index,
                    table,
                    name,
                })
            }
            "CONSTRAINT" | "FK CONSTRAINT" => {
                let table = p.alter_table()?;
                p.keyword("ADD")?;
                p.keyword("CONSTRAINT")?;
                let name = p.ident()?;
                Some(TableObject {
                    kind: ObjectKind::Constraint,
                    table,
                    name,
                })
            }
            "TRIGGER" => {
                p.keyword("CREATE")?;
                p.or_replace();
                p.optional("CONSTRAINT");
                p.keyword("TRIGGER")?;
                let name = p.ident()?;
                p.skip_to_keyword("ON")?;
                let table = p.qualified()?;
                Some(TableObject {
                    kind: ObjectKind::Trigger,
                    table,
                    name,
                })
            }
            "RULE" => {
                p.keyword("CREATE")?;
                p.or_replace();
                p.keyword("RULE")?;
                let name = p.ident()?;
                p.keyword("AS")?;
                p.keyword("ON")?;
                p.skip_to_keyword("TO")?;
                let table = p.qualified()?;
                Some(TableObject {
                    kind: ObjectKind::Rule,
                    table,
                    name,
                })
            }
            "POLICY" => {
                p.keyword("CREATE")?;
                p.keyword("POLICY")?;
                let name = p.ident()?;
                p.keyword("ON")?;
                let table = p.qualified()?;
                Some(TableObject {
                    kind: ObjectKind::Policy,
                    table,
                    name,
                })
            }
            _ => None,
        }
    }

    /// The tables this object locks while it is built, for the phases that build several objects
    /// at a time; `None` when they cannot be told (the object then runs alone).
    pub fn locks(&self) -> Option<Vec<(QualifiedName, LockMode)>> {
        match self.kind.as_str() {
            "INDEX" => {
                let obj = self.table_object()?;
                // Extra statements (CLUSTER ON, REPLICA IDENTITY, SET STATISTICS) alter the table.
                let mode = if self.statements.len() == 1 {
                    LockMode::Shared
                } else {
                    LockMode::Exclusive
                };
                Some(vec![(obj.table, mode)])
            }
            "CONSTRAINT" => {
                if self.statements.len() != 1 {
                    return None;
                }
                let obj = self.table_object()?;
                Some(vec![(obj.table, LockMode::Exclusive)])
            }
            "FK CONSTRAINT" => {
                if self.statements.len() != 1 {
                    return None;
                }
                let obj = self.table_object()?;
                let toks = tokens(&self.statements[0]);
                let mut p = Parser {
                    toks: &toks,
                    pos: 0,
                    default_schema: self.schema.as_deref(),
                };
                p.skip_to_keyword("REFERENCES")?;
                let referenced = p.qualified()?;
                let mut locks = vec![(obj.table, LockMode::Exclusive)];
                if referenced != locks[0].0 {
                    locks.push((referenced, LockMode::Exclusive));
                }
                Some(locks)
            }
            _ => None,
        }
    }
}

/// Whether two objects may be built at the same time (on different sessions) without waiting on
/// each other's locks or deadlocking.
pub fn compatible(
    a: &Option<Vec<(QualifiedName, LockMode)>>,
    b: &Option<Vec<(QualifiedName, LockMode)>>,
) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return false;
    };
    a.iter().all(|(ta, ma)| {
        b.iter()
            .all(|(tb, mb)| ta != tb || (*ma == LockMode::Shared && *mb == LockMode::Shared))
    })
}

/// Parses a post-data script.
pub fn parse(text: &str) -> Result<Script> {
    let segments = lex(text)?;
    let mut script = Script::default();
    let mut state = Settings::default();
    let mut current: Option<Item> = None;
    // Statements of the current object, with whether each is a setting, until the next header.
    let mut pending: Vec<(String, bool)> = Vec::new();
    let mut preamble: Option<Vec<String>> = None;
    let mut i = 0;
    while i < segments.len() {
        match &segments[i] {
            Segment::Comment { .. } => {
                // A run of comment lines: a header if one of its lines names an object.
                let start = i;
                while i < segments.len() && matches!(segments[i], Segment::Comment { .. }) {
                    i += 1;
                }
                // Each header line starts an object (one without statements is dropped later).
                for seg in &segments[start..i] {
                    let Segment::Comment { text, line } = seg else {
                        continue;
                    };
                    let Some(h) = parse_header(text) else {
                        continue;
                    };
                    if preamble.is_none() {
                        preamble = Some(state.statements());
                    }
                    finish(&mut script, current.take(), &mut pending, &mut state);
                    current = Some(Item {
                        ordinal: 0,
                        name: h.name,
                        kind: h.kind,
                        schema: h.schema,
                        owner: h.owner,
                        line: *line,
                        settings: state.statements(),
                        statements: Vec::new(),
                    });
                }
                continue;
            }
            Segment::Statement { text, line } => {
                let is_setting = setting_key(text).is_some();
                if current.is_none() {
                    if !is_setting {
                        return Err(Error::permanent(format!(
                            "unexpected statement before the first object, at line {line}: {}",
                            first_line(text)
                        ))
                        .hint("the post-data script should be what `pg_restore --section=post-data -f FILE` writes"));
                    }
                    state.apply(text);
                } else {
                    pending.push((text.clone(), is_setting));
                }
            }
            Segment::Meta { text, line } => {
                let word = text.split_whitespace().next().unwrap_or("");
                if word != "\\restrict" && word != "\\unrestrict" {
                    return Err(Error::permanent(format!(
                        "unsupported psql meta-command at line {line}: {}",
                        first_line(text)
                    ))
                    .hint("the post-data script is run over a database connection, not by psql; dump it without options that add meta-commands (such as --create)"));
                }
            }
        }
        i += 1;
    }
    finish(&mut script, current.take(), &mut pending, &mut state);
    script.preamble = preamble.unwrap_or_else(|| state.statements());
    for (n, item) in script.items.iter_mut().enumerate() {
        item.ordinal = n;
    }
    Ok(script)
}

/// Closes the current object: its statements up to the last one that is not a setting are its
/// body (settings among them stay in place); settings after that belong to the objects that follow.
fn finish(
    script: &mut Script,
    item: Option<Item>,
    pending: &mut Vec<(String, bool)>,
    state: &mut Settings,
) {
    let Some(mut item) = item else {
        pending.clear();
        return;
    };
    let last_body = pending.iter().rposition(|(_, setting)| !setting);
    for (n, (text, setting)) in pending.drain(..).enumerate() {
        if setting {
            state.apply(&text);
        }
        if last_body.is_some_and(|l| n <= l) {
            item.statements.push(text);
        }
    }
    if !item.statements.is_empty() {
        script.items.push(item);
    }
}

/// The running session state: settings by name, in the order first set.
#[derive(Debug, Default)]
struct Settings {
    order: Vec<String>,
    by_key: HashMap<String, String>,
}

impl Settings {
    fn apply(&mut self, stmt: &str) {
        if let Some(key) = setting_key(stmt) {
            if !self.by_key.contains_key(&key) {
                self.order.push(key.clone());
            }
            self.by_key.insert(key, stmt.trim().to_string());
        }
    }

    fn statements(&self) -> Vec<String> {
        self.order.iter().map(|k| self.by_key[k].clone()).collect()
    }
}

/// The name a session-setting statement sets (`search_path`, `default_tablespace`, `role`,
/// `session authorization`), or `None` for any other statement.
pub fn setting_key(stmt: &str) -> Option<String> {
    let toks = tokens(stmt);
    let word = |i: usize| match toks.get(i) {
        Some(Tok::Word { upper, .. }) => Some(upper.as_str()),
        _ => None,
    };
    match word(0)? {
        "SET" => {
            let mut i = 1;
            match word(1) {
                Some("LOCAL" | "TRANSACTION" | "CONSTRAINTS") | None => return None,
                Some("SESSION") => match word(2) {
                    Some("AUTHORIZATION") => return Some("session authorization".into()),
                    Some("CHARACTERISTICS") => return None,
                    _ => i = 2,
                },
                _ => {}
            }
            // The (possibly dotted) parameter name; a few have a syntax of their own.
            let special = match (word(i), word(i + 1)) {
                (Some("TIME"), Some("ZONE")) => Some("timezone"),
                (Some("XML"), Some("OPTION")) => Some("xmloption"),
                (Some("NAMES"), _) => Some("client_encoding"),
                (Some("SCHEMA"), _) => Some("search_path"),
                _ => None,
            };
            if let Some(k) = special {
                return Some(k.into());
            }
            let Some(Tok::Word { text, .. }) = toks.get(i) else {
                return None;
            };
            let mut key = text.clone();
            i += 1;
            while toks.get(i) == Some(&Tok::Sym('.')) {
                match toks.get(i + 1) {
                    Some(Tok::Word { text, .. }) => key.push_str(&format!(".{text}")),
                    _ => return None,
                }
                i += 2;
            }
            Some(key)
        }
        "SELECT" => {
            // SELECT pg_catalog.set_config('name', 'value', false);
            let mut i = 1;
            if word(1) == Some("PG_CATALOG") && toks.get(2) == Some(&Tok::Sym('.')) {
                i = 3;
            }
            if word(i) != Some("SET_CONFIG") || toks.get(i + 1) != Some(&Tok::Sym('(')) {
                return None;
            }
            match toks.get(i + 2) {
                Some(Tok::Str(s)) => Some(s.to_ascii_lowercase()),
                _ => None,
            }
        }
        _ => None,
    }
}

struct Header {
    name: String,
    kind: String,
    schema: Option<String>,
    owner: Option<String>,
}

/// `-- Name: X; Type: Y; Schema: Z[; Owner: W][; Tablespace: T]` (also `-- Data for Name: ...`).
fn parse_header(line: &str) -> Option<Header> {
    let rest = line.strip_prefix("--")?.trim_start();
    let at = rest.find("Name: ")?;
    // Only a short prefix such as `Data for ` may precede `Name: `.
    if at > 20 || rest[..at].contains(';') {
        return None;
    }
    let mut rest = &rest[at + "Name: ".len()..];
    fn take(marker: &str, rest: &mut &str) -> Option<String> {
        let r: &str = rest;
        let pos = r.rfind(marker)?;
        *rest = &r[..pos];
        Some(r[pos + marker.len()..].to_string())
    }
    // Optional trailing fields, from the right, in the order pg_dump writes them.
    let tablespace_pos = rest.rfind("; Tablespace: ");
    let owner_pos = rest.rfind("; Owner: ");
    let schema_pos = rest.rfind("; Schema: ")?;
    if tablespace_pos.is_some_and(|t| t > schema_pos) {
        take("; Tablespace: ", &mut rest);
    }
    let owner = if owner_pos.is_some_and(|o| o > schema_pos) {
        take("; Owner: ", &mut rest)
    } else {
        None
    };
    let schema = take("; Schema: ", &mut rest)?;
    let kind = take("; Type: ", &mut rest)?;
    if kind.is_empty() {
        return None;
    }
    Some(Header {
        name: rest.to_string(),
        kind: kind.trim().to_string(),
        schema: if schema == "-" { None } else { Some(schema) },
        owner: owner.filter(|o| !o.is_empty() && o != "-"),
    })
}

fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"--
-- PostgreSQL database dump
--

\restrict TjZ8rQy3uUE4dOIASzab88Hj3W4r5pO1NR9EyJH9hVKp7LkplXxetgSa3JrRzHz

-- Dumped from database version 15.18
-- Dumped by pg_dump version 15.18

SET statement_timeout = 0;
SET lock_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;

SET default_tablespace = '';

--
-- Name: Tab le Tab le_pkey; Type: CONSTRAINT; Schema: My Schema; Owner: postgres
--

ALTER TABLE ONLY "My Schema"."Tab le"
    ADD CONSTRAINT "Tab le_pkey" PRIMARY KEY (id);


--
-- Name: Weird; Type: X; Type: INDEX; Schema: public; Owner: postgres
--

CREATE INDEX "Weird; Type: X" ON public.t USING btree (((a + b)));
ALTER INDEX public."Weird; Type: X" ALTER COLUMN 1 SET STATISTICS 500;


SET default_tablespace = ts1;

--
-- Name: ti; Type: INDEX; Schema: public; Owner: postgres; Tablespace: ts1
--

CREATE INDEX ti ON public.t USING btree (a);


--
-- Name: INDEX ti; Type: COMMENT; Schema: public; Owner: postgres
--

COMMENT ON INDEX public.ti IS 'multi
--
-- Name: fake; Type: INDEX; Schema: public; Owner: x
--
line;';


SET default_tablespace = '';

--
-- Name: tu; Type: INDEX; Schema: public
--

CREATE UNIQUE INDEX tu ON ONLY public.t USING btree (a);

ALTER TABLE public.t CLUSTER ON tu;


--
-- Name: payment_p1_pkey; Type: INDEX ATTACH; Schema: public; Owner: postgres
--

ALTER INDEX public.payment_pkey ATTACH PARTITION public.payment_p1_pkey;


--
-- Name: Tab le r1; Type: RULE; Schema: My Schema; Owner: postgres
--

CREATE RULE r1 AS
    ON INSERT TO "My Schema"."Tab le" DO
 NOTIFY x;


--
-- Name: film last_updated; Type: TRIGGER; Schema: public; Owner: postgres
--

CREATE TRIGGER last_updated BEFORE UPDATE OF title, description ON public.film FOR EACH ROW EXECUTE FUNCTION public.last_updated();


--
-- Name: t p1; Type: POLICY; Schema: public; Owner: postgres
--

CREATE POLICY p1 ON public.t USING ((a > 0));


--
-- Name: Tab le Tab le_ref_fkey; Type: FK CONSTRAINT; Schema: My Schema; Owner: postgres
--

ALTER TABLE ONLY "My Schema"."Tab le"
    ADD CONSTRAINT "Tab le_ref_fkey" FOREIGN KEY (ref) REFERENCES public.t(a);


--
-- Name: et; Type: EVENT TRIGGER; Schema: -; Owner: postgres
--

CREATE EVENT TRIGGER et ON ddl_command_start
   EXECUTE FUNCTION public.f();


ALTER EVENT TRIGGER et OWNER TO postgres;

--
-- Name: f(text); Type: COMMENT; Schema: public; Owner: postgres
--

COMMENT ON FUNCTION public.f IS $q$a ; 'quoted' $$ -- not a comment$q$;

--
-- Name: mv; Type: MATERIALIZED VIEW DATA; Schema: public; Owner: postgres
--

REFRESH MATERIALIZED VIEW public.mv;


--
-- PostgreSQL database dump complete
--

\unrestrict TjZ8rQy3uUE4dOIASzab88Hj3W4r5pO1NR9EyJH9hVKp7LkplXxetgSa3JrRzHz

"#;

    #[test]
    fn parses_headers_bodies_and_settings() {
        let s = parse(SAMPLE).unwrap();
        let kinds: Vec<&str> = s.items.iter().map(|i| i.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "CONSTRAINT",
                "INDEX",
                "INDEX",
                "COMMENT",
                "INDEX",
                "INDEX ATTACH",
                "RULE",
                "TRIGGER",
                "POLICY",
                "FK CONSTRAINT",
                "EVENT TRIGGER",
                "COMMENT",
                "MATERIALIZED VIEW DATA"
            ]
        );
        let c = &s.items[0];
        assert_eq!(c.name, "Tab le Tab le_pkey");
        assert_eq!(c.schema.as_deref(), Some("My Schema"));
        assert_eq!(c.owner.as_deref(), Some("postgres"));
        assert_eq!(c.label(), "CONSTRAINT Tab le_pkey ON My Schema.Tab le");
        assert_eq!(s.items[2].label(), "INDEX public.ti");
        assert_eq!(s.items[3].label(), "COMMENT INDEX ti (schema public)");
        assert_eq!(s.items[7].label(), "TRIGGER last_updated ON public.film");
        assert_eq!(c.first_line(), "ALTER TABLE ONLY \"My Schema\".\"Tab le\"");
        assert_eq!(c.statements.len(), 1);
        assert_eq!(s.preamble.len(), 7);
        assert!(
            s.preamble
                .iter()
                .any(|p| p.contains("set_config('search_path'"))
        );
        assert!(
            s.preamble
                .last()
                .unwrap()
                .contains("default_tablespace = ''")
        );

        // A name containing `; Type: `; two statements.
        let w = &s.items[1];
        assert_eq!(w.name, "Weird; Type: X");
        assert_eq!(w.statements.len(), 2);
        // The SET before ti's header belongs to ti, not to the item before it.
        assert!(
            w.settings
                .iter()
                .any(|x| x == "SET default_tablespace = '';")
        );
        let ti = &s.items[2];
        assert_eq!(ti.name, "ti");
        assert_eq!(
            ti.statements,
            ["CREATE INDEX ti ON public.t USING btree (a);"]
        );
        assert!(
            ti.settings
                .iter()
                .any(|x| x == "SET default_tablespace = ts1;")
        );
        assert!(
            !ti.settings
                .iter()
                .any(|x| x == "SET default_tablespace = '';")
        );
        // The fake header inside the string stays in the comment.
        let comment = &s.items[3];
        assert_eq!(comment.statements.len(), 1);
        assert!(comment.statements[0].contains("-- Name: fake; Type: INDEX"));
        assert!(comment.statements[0].ends_with("line;';"));
        // The tablespace is back to the default for tu; no Owner in its header.
        let tu = &s.items[4];
        assert_eq!(tu.owner, None);
        assert_eq!(
            tu.settings
                .iter()
                .filter(|x| x.contains("default_tablespace"))
                .count(),
            1
        );
        assert!(
            tu.settings
                .iter()
                .any(|x| x == "SET default_tablespace = '';")
        );
        // Schema `-`.
        let et = &s.items[10];
        assert_eq!(et.schema, None);
        assert_eq!(et.label(), "EVENT TRIGGER et");
        assert_eq!(et.statements.len(), 2);
        let dq = &s.items[11];
        assert_eq!(dq.statements.len(), 1);
        assert!(dq.statements[0].ends_with("not a comment$q$;"));
        assert_eq!(s.items[12].phase(), Phase::Refresh);
        for (n, item) in s.items.iter().enumerate() {
            assert_eq!(item.ordinal, n);
            assert!(!item.sql().contains("\\restrict"));
        }
    }

    #[test]
    fn phases() {
        let s = parse(SAMPLE).unwrap();
        let phases: Vec<Phase> = s.items.iter().map(Item::phase).collect();
        use Phase::*;
        assert_eq!(
            phases,
            [
                Indexes,
                Indexes,
                Indexes,
                Other,
                Indexes,
                Attach,
                Other,
                Other,
                Other,
                ForeignKeys,
                Other,
                Other,
                Refresh
            ]
        );
    }

    #[test]
    fn table_objects_and_locks() {
        let s = parse(SAMPLE).unwrap();
        let q = |s: &str, n: &str| QualifiedName::new(s, n);
        let obj = |i: usize| s.items[i].table_object();
        assert_eq!(
            obj(0),
            Some(TableObject {
                kind: ObjectKind::Constraint,
                table: q("My Schema", "Tab le"),
                name: "Tab le_pkey".into()
            })
        );
        assert_eq!(obj(1).unwrap().name, "Weird; Type: X");
        assert_eq!(obj(4).unwrap().table, q("public", "t"));
        assert_eq!(
            obj(6).unwrap(),
            TableObject {
                kind: ObjectKind::Rule,
                table: q("My Schema", "Tab le"),
                name: "r1".into()
            }
        );
        assert_eq!(
            obj(7).unwrap(),
            TableObject {
                kind: ObjectKind::Trigger,
                table: q("public", "film"),
                name: "last_updated".into()
            }
        );
        assert_eq!(
            obj(8).unwrap(),
            TableObject {
                kind: ObjectKind::Policy,
                table: q("public", "t"),
                name: "p1".into()
            }
        );
        assert_eq!(obj(9).unwrap().name, "Tab le_ref_fkey");
        assert_eq!(obj(3), None);

        let ti = s.items[2].locks();
        assert_eq!(ti, Some(vec![(q("public", "t"), LockMode::Shared)]));
        let weird = s.items[1].locks();
        assert_eq!(weird, Some(vec![(q("public", "t"), LockMode::Exclusive)]));
        let fk = s.items[9].locks();
        assert_eq!(
            fk,
            Some(vec![
                (q("My Schema", "Tab le"), LockMode::Exclusive),
                (q("public", "t"), LockMode::Exclusive)
            ])
        );
        let pk = s.items[0].locks();
        assert!(compatible(&ti, &ti.clone()));
        assert!(!compatible(&ti, &weird));
        assert!(!compatible(&pk, &fk));
        assert!(compatible(&pk, &ti));
        assert!(!compatible(&None, &ti));
    }

    #[test]
    fn setting_keys() {
        assert_eq!(
            setting_key("SET default_tablespace = '';").as_deref(),
            Some("default_tablespace")
        );
        assert_eq!(
            setting_key("set search_path to public;").as_deref(),
            Some("search_path")
        );
        assert_eq!(
            setting_key("SET SESSION AUTHORIZATION 'bob';").as_deref(),
            Some("session authorization")
        );
        assert_eq!(setting_key("SET ROLE bob;").as_deref(), Some("role"));
        assert_eq!(
            setting_key("SET myext.opt = 1;").as_deref(),
            Some("myext.opt")
        );
        assert_eq!(
            setting_key("SELECT pg_catalog.set_config('search_path', '', false);").as_deref(),
            Some("search_path")
        );
        assert_eq!(setting_key("SET LOCAL work_mem = '1MB';"), None);
        assert_eq!(
            setting_key("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE;"),
            None
        );
        assert_eq!(setting_key("SELECT 1;"), None);
        assert_eq!(setting_key("CREATE INDEX i ON t (a);"), None);
    }

    #[test]
    fn rejects_other_meta_commands_and_statements_before_the_first_object() {
        let e = parse("SET a = 1;\n\\connect other\n").unwrap_err();
        assert!(e.message.contains("meta-command at line 2"), "{e}");
        let e = parse("SET a = 1;\nCREATE TABLE x ();\n").unwrap_err();
        assert!(
            e.message.contains("before the first object, at line 2"),
            "{e}"
        );
        let e = parse(
            "--\n-- Name: x; Type: COMMENT; Schema: -; Owner: -\n--\nCOMMENT ON x IS 'oops\n",
        )
        .unwrap_err();
        assert!(e.message.contains("unterminated string"), "{e}");
    }

    #[test]
    fn escape_strings_and_empty_items() {
        let text = "--\n-- Name: a; Type: COMMENT; Schema: -; Owner: -\n--\n\nCOMMENT ON SCHEMA a IS E'it\\'s; fine';\n\n--\n-- Name: b; Type: ACL; Schema: -; Owner: -\n--\n\n--\n-- Name: c; Type: ACL; Schema: -; Owner: -\n--\n\nGRANT ALL ON SCHEMA c TO PUBLIC;\n";
        let s = parse(text).unwrap();
        assert_eq!(s.items.len(), 2, "{:?}", s.items);
        assert_eq!(
            s.items[0].statements,
            ["COMMENT ON SCHEMA a IS E'it\\'s; fine';"]
        );
        assert_eq!(s.items[1].name, "c");
        assert_eq!(s.items[1].line, 12);
        assert!(s.preamble.is_empty());
    }
}
