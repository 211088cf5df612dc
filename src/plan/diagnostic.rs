//! Diagnostics: one problem in a plan, located by a byte span in its source, rendered like a compiler
//! error (`file:line:col`, the offending line, a caret under the problem, and a hint).

use std::fmt::Write as _;
use std::ops::Range;

/// A plan file as read from disk: its display path and text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> SourceFile {
        SourceFile {
            path: path.into(),
            text: text.into(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// The text of the line that holds `offset`, and the byte offset where that line starts.
    fn line_at(&self, offset: usize) -> (&str, usize) {
        let offset = floor_char_boundary(&self.text, offset.min(self.text.len()));
        let start = self.text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let end = self.text[offset..]
            .find('\n')
            .map(|i| offset + i)
            .unwrap_or(self.text.len());
        (self.text[start..end].trim_end_matches('\r'), start)
    }
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One problem found while compiling a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub message: String,
    pub span: Option<Range<usize>>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            span: None,
            hint: None,
        }
    }

    pub fn at(mut self, span: Option<Range<usize>>) -> Diagnostic {
        self.span = span;
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    /// Renders the diagnostic against its source:
    ///
    /// ```text
    /// error: unknown stage kind `ful_load`
    ///   --> plan.toml:12:8
    ///    |
    /// 12 | kind = "ful_load"
    ///    |        ^^^^^^^^^^
    ///    = hint: did you mean `full_load`?
    /// ```
    pub fn render(&self, source: &SourceFile) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "error: {}", self.message);
        match &self.span {
            Some(span) => {
                // Whole characters, within the text.
                let len = source.text.len();
                let start = floor_char_boundary(&source.text, span.start.min(len));
                let end = ceil_char_boundary(&source.text, span.end.clamp(start, len));
                let span = start..end;
                let (line_no, col) = source.line_col(span.start);
                let (line, line_start) = source.line_at(span.start);
                let gutter = line_no.to_string().len();
                let pad = " ".repeat(gutter);
                let _ = writeln!(out, "{pad}--> {}:{line_no}:{col}", source.path);
                let _ = writeln!(out, "{pad} |");
                let _ = writeln!(out, "{line_no} | {line}");
                // The caret covers the span's part on this line, at least one character.
                let start_in_line = span.start - line_start;
                let end_in_line = span.end.min(line_start + line.len()).max(span.start);
                let lead: String = line[..floor_char_boundary(line, start_in_line.min(line.len()))]
                    .chars()
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                let width = source.text
                    [span.start.min(source.text.len())..end_in_line.min(source.text.len())]
                    .chars()
                    .count()
                    .max(1);
                let _ = writeln!(out, "{pad} | {lead}{}", "^".repeat(width));
                if let Some(hint) = &self.hint {
                    let _ = writeln!(out, "{pad} = hint: {hint}");
                }
            }
            None => {
                let _ = writeln!(out, "  --> {}", source.path);
                if let Some(hint) = &self.hint {
                    let _ = writeln!(out, "   = hint: {hint}");
                }
            }
        }
        out
    }
}

/// Renders all diagnostics, separated by blank lines, with a closing count.
pub fn render_all(diagnostics: &[Diagnostic], source: &SourceFile) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&d.render(source));
        out.push('\n');
    }
    let n = diagnostics.len();
    let _ = writeln!(
        out,
        "{}: {n} error{} in plan",
        source.path,
        if n == 1 { "" } else { "s" }
    );
    out
}

/// The closest candidate by edit distance, if it is close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = levenshtein(word, c);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let (d, c) = best?;
    let limit = (word.chars().count().max(c.chars().count()) / 3).max(1) + 1;
    (d <= limit).then_some(c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_caret_under_span() {
        let src = SourceFile::new("p.toml", "a = 1\nkind = \"ful_load\"\n");
        let start = src.text.find("\"ful").unwrap();
        let d = Diagnostic::error("unknown stage kind `ful_load`")
            .at(Some(start..start + 10))
            .hint("did you mean `full_load`?");
        assert_eq!(
            d.render(&src),
            "error: unknown stage kind `ful_load`\n --> p.toml:2:8\n  |\n2 | kind = \"ful_load\"\n  |        ^^^^^^^^^^\n  = hint: did you mean `full_load`?\n"
        );
    }

    #[test]
    fn spans_inside_a_character_are_widened() {
        let src = SourceFile::new("p.toml", "a = \"é\"\n");
        let e = src.text.find('é').unwrap();
        let d = Diagnostic::error("x").at(Some(e + 1..e + 1));
        assert!(d.render(&src).contains("1 | a = \"é\"\n  |      ^\n"));
        let d = Diagnostic::error("x").at(Some(e + 1..usize::MAX));
        assert!(d.render(&src).contains("  |      ^^\n"));
    }

    #[test]
    fn closest_finds_typos_only() {
        let kinds = ["preflight", "full_load", "cdc", "sql"];
        assert_eq!(closest("ful_load", kinds), Some("full_load"));
        assert_eq!(closest("preflite", kinds), Some("preflight"));
        assert_eq!(closest("zzzzzzzz", kinds), None);
    }

    #[test]
    fn line_col_counts_characters() {
        let src = SourceFile::new("p", "é = 1\nx = 2");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(src.text.find('x').unwrap()), (2, 1));
        assert_eq!(src.line_col(src.text.find('=').unwrap()), (1, 3));
    }
}
