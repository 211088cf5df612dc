//! The two small SQL lexers the post-data script parser ([`crate::pg::post_data_script`]) needs:
//! [`lex`] splits a whole script into top-level statements, `--` comment lines and psql
//! meta-command lines, knowing single-quoted strings (and `E''` strings, and backslash escapes when
//! `standard_conforming_strings` is off), quoted identifiers, dollar quotes and nested `/* */`
//! comments, so nothing inside a string is misread; [`tokens`] splits one statement into words,
//! string literals and symbols, enough to recognise the statements pg_dump writes, and [`Parser`]
//! walks them.

use crate::error::{Error, Result};
use crate::pg::ident::QualifiedName;
use crate::pg::post_data_script::setting_key;

/// A top-level piece of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// A `--` comment line between statements (without its newline).
    Comment { text: String, line: usize },
    /// A psql meta-command line (`\restrict KEY`).
    Meta { text: String, line: usize },
    /// A statement, up to and including its `;` (or the end of the text).
    Statement { text: String, line: usize },
}

/// Splits SQL text (a client's query string, for the DDL replay of
/// [`crate::stages::cdc::ddl`]) into its statements, each up to and including its `;`, with the
/// comments between statements left out: a `;` inside a string, a dollar-quoted function body or a
/// comment does not end a statement.
pub fn split_statements(text: &str) -> Result<Vec<String>> {
    Ok(lex(text)?
        .into_iter()
        .filter_map(|s| match s {
            Segment::Statement { text, .. } => Some(text),
            _ => None,
        })
        .collect())
}

/// Splits a script into comment lines, meta-command lines and statements.
pub(crate) fn lex(text: &str) -> Result<Vec<Segment>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    // With standard_conforming_strings off, backslashes escape in every string literal.
    let mut backslash_strings = false;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let at_line_start = i == 0
            || text[..i]
                .rsplit('\n')
                .next()
                .is_some_and(|p| p.trim().is_empty());
        if b[i..].starts_with(b"--") {
            let end = text[i..].find('\n').map_or(b.len(), |e| i + e);
            out.push(Segment::Comment {
                text: text[i..end].trim_end().to_string(),
                line,
            });
            i = end;
            continue;
        }
        if c == b'\\' && at_line_start {
            let end = text[i..].find('\n').map_or(b.len(), |e| i + e);
            out.push(Segment::Meta {
                text: text[i..end].trim_end().to_string(),
                line,
            });
            i = end;
            continue;
        }
        let (end, lines) = statement_end(b, i, backslash_strings).map_err(|what| {
            Error::permanent(format!(
                "the post-data script has {what} in the statement at line {line}"
            ))
        })?;
        let stmt = text[i..end].trim_end().to_string();
        if setting_key(&stmt).as_deref() == Some("standard_conforming_strings") {
            let lower = stmt.to_ascii_lowercase();
            backslash_strings = lower.contains("off") || lower.contains("false");
        }
        out.push(Segment::Statement { text: stmt, line });
        line += lines;
        i = end;
    }
    Ok(out)
}

pub(crate) fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The end (exclusive, after the `;`) of the statement starting at `start`, and how many newlines
/// it spans.
fn statement_end(
    b: &[u8],
    start: usize,
    backslash_strings: bool,
) -> std::result::Result<(usize, usize), &'static str> {
    let mut i = start;
    let mut lines = 0;
    let count = |from: usize, to: usize| b[from..to].iter().filter(|&&c| c == b'\n').count();
    while i < b.len() {
        let c = b[i];
        match c {
            b';' => return Ok((i + 1, lines)),
            b'\n' => {
                lines += 1;
                i += 1;
            }
            b'\'' => {
                let escapes = backslash_strings
                    || (i > start
                        && matches!(b[i - 1], b'E' | b'e')
                        && (i - 1 == start || !is_ident_byte(b[i - 2])));
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return Err("an unterminated string"),
                        Some(b'\\') if escapes => j += 2,
                        Some(b'\'') => break,
                        Some(_) => j += 1,
                    }
                }
                lines += count(i, j.min(b.len()));
                i = j + 1;
            }
            b'"' => {
                let end = b[i + 1..]
                    .iter()
                    .position(|&c| c == b'"')
                    .ok_or("an unterminated quoted identifier")?;
                let j = i + 1 + end;
                lines += count(i, j);
                i = j + 1;
            }
            b'$' if i == start || !is_ident_byte(b[i - 1]) => {
                // $tag$ ... $tag$ (tag: an identifier without `$`, or empty).
                let tag_len = b[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
                    .unwrap_or(b.len() - i - 1);
                let close = i + 1 + tag_len;
                let tag_ok = b.get(close) == Some(&b'$')
                    && !b.get(i + 1).is_some_and(|c| c.is_ascii_digit());
                if !tag_ok {
                    i += 1;
                    continue;
                }
                let tag = &b[i..=close];
                let body = close + 1;
                let end = b[body..]
                    .windows(tag.len())
                    .position(|w| w == tag)
                    .ok_or("an unterminated dollar-quoted string")?;
                let j = body + end + tag.len();
                lines += count(i, j);
                i = j;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |e| i + e);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    if j + 1 >= b.len() {
                        return Err("an unterminated comment");
                    }
                    if b[j] == b'/' && b[j + 1] == b'*' {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b[j + 1] == b'/' {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        j += 1;
                    }
                }
                lines += count(i, j);
                i = j;
            }
            _ => i += 1,
        }
    }
    Ok((b.len(), lines))
}

/// A token of one statement, enough to recognise the statements pg_dump writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    /// An identifier or keyword: `text` is the identifier's value (unquoted words folded to lower
    /// case, quoted ones as written); `upper` is the upper-cased word for keyword comparison (empty
    /// for quoted identifiers, which are never keywords).
    Word {
        text: String,
        upper: String,
    },
    /// A string literal's value.
    Str(String),
    Sym(char),
    Other,
}

pub(crate) fn tokens(stmt: &str) -> Vec<Tok> {
    let b = stmt.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"--") {
            i = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |e| i + e);
        } else if b[i..].starts_with(b"/*") {
            // Statements pg_dump writes have no comments inside; skip to the end of this one.
            i = stmt[i..].find("*/").map_or(b.len(), |e| i + e + 2);
            out.push(Tok::Other);
        } else if c == b'"' {
            let (value, j) = quoted(stmt, i);
            out.push(Tok::Word {
                text: value,
                upper: String::new(),
            });
            i = j;
        } else if c == b'\'' {
            let (value, j) = quoted(stmt, i);
            out.push(Tok::Str(value));
            i = j;
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let end = b[i..]
                .iter()
                .position(|&c| !is_ident_byte(c))
                .map_or(b.len(), |e| i + e);
            let word = &stmt[i..end];
            out.push(Tok::Word {
                text: word.to_ascii_lowercase(),
                upper: word.to_ascii_uppercase(),
            });
            i = end;
        } else if let Some(tag_len) = dollar_tag(&b[i..]) {
            // A dollar-quoted string: its body up to the same tag.
            let tag = &stmt[i..i + tag_len];
            let body = i + tag_len;
            let close = stmt[body..].find(tag).map_or(b.len(), |e| body + e);
            out.push(Tok::Str(stmt[body..close].to_string()));
            i = (close + tag_len).min(b.len());
        } else if c.is_ascii_digit() {
            let end = b[i..]
                .iter()
                .position(|&c| !(c.is_ascii_alphanumeric() || c == b'.' || c == b'_'))
                .map_or(b.len(), |e| i + e);
            out.push(Tok::Other);
            i = end;
        } else {
            // One character (UTF-8 safe: multi-byte characters were taken as words above).
            out.push(Tok::Sym(c as char));
            i += 1;
        }
    }
    out
}

/// The value of the quoted identifier or string literal starting at `i` (its quote character
/// doubled inside stands for itself), and the position after its closing quote.
fn quoted(stmt: &str, i: usize) -> (String, usize) {
    let q = &stmt[i..i + 1];
    let mut j = i + 1;
    let mut value = String::new();
    loop {
        match stmt[j..].find(q) {
            None => {
                value.push_str(&stmt[j..]);
                return (value, stmt.len());
            }
            Some(e) => {
                value.push_str(&stmt[j..j + e]);
                j += e + 1;
                if stmt[j..].starts_with(q) {
                    value.push_str(q);
                    j += 1;
                } else {
                    return (value, j);
                }
            }
        }
    }
}

/// The length of the dollar-quote tag (`$$`, `$body$`) `b` starts with; `None` for anything else
/// (a parameter such as `$1`: a tag does not start with a digit).
fn dollar_tag(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'$') {
        return None;
    }
    let name = b[1..]
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
        .unwrap_or(b.len() - 1);
    (b.get(1 + name) == Some(&b'$') && !b.get(1).is_some_and(u8::is_ascii_digit))
        .then_some(name + 2)
}

/// Recursive-descent helpers over [`Tok`]s.
pub(crate) struct Parser<'a> {
    pub(crate) toks: &'a [Tok],
    pub(crate) pos: usize,
    pub(crate) default_schema: Option<&'a str>,
}

impl Parser<'_> {
    pub(crate) fn peek_keyword(&self, kw: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word { upper, .. }) if upper == kw)
    }

    pub(crate) fn keyword(&mut self, kw: &str) -> Option<()> {
        if self.peek_keyword(kw) {
            self.pos += 1;
            Some(())
        } else {
            None
        }
    }

    pub(crate) fn optional(&mut self, kw: &str) -> bool {
        self.keyword(kw).is_some()
    }

    pub(crate) fn if_not_exists(&mut self) {
        let save = self.pos;
        if !(self.optional("IF") && self.optional("NOT") && self.optional("EXISTS")) {
            self.pos = save;
        }
    }

    pub(crate) fn or_replace(&mut self) {
        let save = self.pos;
        if !(self.optional("OR") && self.optional("REPLACE")) {
            self.pos = save;
        }
    }

    /// `ALTER TABLE [IF EXISTS] [ONLY] name`.
    pub(crate) fn alter_table(&mut self) -> Option<QualifiedName> {
        self.keyword("ALTER")?;
        self.keyword("TABLE")?;
        let save = self.pos;
        if !(self.optional("IF") && self.optional("EXISTS")) {
            self.pos = save;
        }
        self.optional("ONLY");
        self.qualified()
    }

    pub(crate) fn ident(&mut self) -> Option<String> {
        match self.toks.get(self.pos) {
            Some(Tok::Word { text, .. }) => {
                self.pos += 1;
                Some(text.clone())
            }
            _ => None,
        }
    }

    /// `[schema.]name` (a leading database name is ignored).
    pub(crate) fn qualified(&mut self) -> Option<QualifiedName> {
        let mut parts = vec![self.ident()?];
        while self.toks.get(self.pos) == Some(&Tok::Sym('.')) {
            self.pos += 1;
            parts.push(self.ident()?);
        }
        let name = parts.pop()?;
        let schema = match parts.pop() {
            Some(s) => s,
            None => self.default_schema?.to_string(),
        };
        Some(QualifiedName::new(schema, name))
    }

    /// Moves just past the next occurrence of keyword `kw` (unquoted).
    pub(crate) fn skip_to_keyword(&mut self, kw: &str) -> Option<()> {
        while self.pos < self.toks.len() {
            if self.peek_keyword(kw) {
                self.pos += 1;
                return Some(());
            }
            self.pos += 1;
        }
        None
    }
}
