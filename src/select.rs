//! Table selection: `tables` and `exclude` globs on `schema.table`: `*` any run of characters, `?` one
//! character, `[abc]` / `[a-z]` / `[!x]` one character in (or, with `!` or `^`, not in) a set, `\`
//! escapes the next character (`\[` for a literal `[`). A table is selected when it matches some
//! `tables` pattern (or the list is empty) and no `exclude` pattern.

/// Why a pattern is not one. Displays as the words that follow "is not a table pattern: ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobError {
    Empty,
    TrailingBackslash,
    /// A `[` without its `]`.
    UnclosedClass,
    /// `[z-a]`.
    BackwardsRange(char, char),
    /// Nothing in it can match the `.` between schema and table.
    NoDot,
}

impl std::fmt::Display for GlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GlobError::Empty => write!(f, "it is empty"),
            GlobError::TrailingBackslash => write!(f, "it ends with `\\`, which escapes nothing"),
            GlobError::UnclosedClass => {
                write!(
                    f,
                    "a `[` starts a character class that is never closed by `]`"
                )
            }
            GlobError::BackwardsRange(lo, hi) => {
                write!(
                    f,
                    "the range `{lo}-{hi}` in `[...]` is backwards (write `{hi}-{lo}`)"
                )
            }
            GlobError::NoDot => write!(f, "it has no `.` between the schema and the table"),
        }
    }
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    tokens: Vec<Tok>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    Any,
    One,
    /// One character in one of the inclusive ranges (or in none, when negated).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Tok {
    /// Does this token, which stands for exactly one character, match `c`?
    fn matches_char(&self, c: char) -> bool {
        match self {
            Tok::Lit(l) => *l == c,
            Tok::One => true,
            Tok::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
            Tok::Any => false,
        }
    }
}

impl Glob {
    pub fn parse(text: &str) -> Result<Glob, GlobError> {
        if text.trim().is_empty() {
            return Err(GlobError::Empty);
        }
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => Tok::Any,
                '?' => Tok::One,
                '\\' => Tok::Lit(chars.next().ok_or(GlobError::TrailingBackslash)?),
                '[' => parse_class(&mut chars)?,
                c => Tok::Lit(c),
            });
        }
        // A pattern must name a schema and a table: it needs a dot, or something that can match one.
        if !tokens
            .iter()
            .any(|t| matches!(t, Tok::Any) || (!matches!(t, Tok::One) && t.matches_char('.')))
        {
            return Err(GlobError::NoDot);
        }
        Ok(Glob {
            text: text.to_string(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The same pattern as a PostgreSQL (ARE) regular expression anchored at both ends, for
    /// matching `schema || '.' || table` on the server (the DDL capture's event trigger).
    pub fn to_regex(&self) -> String {
        fn push_escaped(out: &mut String, c: char) {
            if !c.is_alphanumeric() && c != '_' && c.is_ascii() {
                out.push('\\');
            }
            out.push(c);
        }
        let mut out = String::from("^");
        for t in &self.tokens {
            match t {
                Tok::Lit(c) => push_escaped(&mut out, *c),
                Tok::Any => out.push_str(".*"),
                Tok::One => out.push('.'),
                Tok::Class { negated, ranges } => {
                    out.push('[');
                    if *negated {
                        out.push('^');
                    }
                    for &(lo, hi) in ranges {
                        push_escaped(&mut out, lo);
                        if hi != lo {
                            out.push('-');
                            push_escaped(&mut out, hi);
                        }
                    }
                    out.push(']');
                }
            }
        }
        out.push('$');
        out
    }

    /// Does `schema.table` match?
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        let name: Vec<char> = format!("{schema}.{table}").chars().collect();
        matches_from(&self.tokens, &name)
    }
}

/// Parses a character class after its `[`: `[abc]`, `[a-z0-9_]`, `[!x]` or `[^x]`; a `]` right after
/// the opening (or after `!`) is a member, and so is a `-` first or last; `\` escapes inside too.
fn parse_class(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<Tok, GlobError> {
    let negated = matches!(chars.peek(), Some('!' | '^'));
    if negated {
        chars.next();
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = match chars.next() {
            None => return Err(GlobError::UnclosedClass),
            Some(']') if !first => break,
            Some('\\') => chars.next().ok_or(GlobError::UnclosedClass)?,
            Some(c) => c,
        };
        first = false;
        // A range `c-d`, unless the `-` is the last member.
        let mut lookahead = chars.clone();
        if lookahead.next() == Some('-') && !matches!(lookahead.peek(), Some(']') | None) {
            chars.next();
            let hi = match chars.next() {
                Some('\\') => chars.next().ok_or(GlobError::UnclosedClass)?,
                Some(h) => h,
                None => return Err(GlobError::UnclosedClass),
            };
            if hi < c {
                return Err(GlobError::BackwardsRange(c, hi));
            }
            ranges.push((c, hi));
        } else {
            ranges.push((c, c));
        }
    }
    Ok(Tok::Class { negated, ranges })
}

fn matches_from(p: &[Tok], s: &[char]) -> bool {
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(Tok::Any) => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(t) if t.matches_char(s[si]) => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|t| *t == Tok::Any)
}

/// The selection of one database entry.
#[derive(Debug, Clone)]
pub struct Selection {
    pub include: Vec<Glob>,
    pub exclude: Vec<Glob>,
}

impl Selection {
    /// Builds a selection; patterns were validated when the plan was compiled.
    pub fn new(include: &[String], exclude: &[String]) -> Selection {
        let parse = |v: &[String]| v.iter().filter_map(|g| Glob::parse(g).ok()).collect();
        Selection {
            include: parse(include),
            exclude: parse(exclude),
        }
    }

    pub fn selects(&self, schema: &str, table: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|g| g.matches(schema, table)))
            && !self.exclude.iter().any(|g| g.matches(schema, table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_as_regexes() {
        let re = |g: &str| Glob::parse(g).unwrap().to_regex();
        assert_eq!(re("public.audit_*"), "^public\\.audit_.*$");
        assert_eq!(re("p?blic.[a-c!]x"), "^p.blic\\.[a-c\\!]x$");
        assert_eq!(re("s.[!a]"), "^s\\.[^a]$");
        assert_eq!(re("s.a\\*"), "^s\\.a\\*$");
    }

    #[test]
    fn globs() {
        let g = Glob::parse("public.audit_*").unwrap();
        assert!(g.matches("public", "audit_log"));
        assert!(!g.matches("public", "film"));
        assert!(!g.matches("sales", "audit_x"));
        assert!(Glob::parse("*").unwrap().matches("a", "b"));
        assert!(Glob::parse("p?blic.f*m").unwrap().matches("public", "film"));
        assert!(Glob::parse("public.a\\*").unwrap().matches("public", "a*"));
        assert!(!Glob::parse("public.a\\*").unwrap().matches("public", "ab"));
        assert!(Glob::parse("film").is_err());
        assert!(Glob::parse("").is_err());
        assert!(Glob::parse("public.x\\").is_err());
    }

    #[test]
    fn character_classes() {
        let g = Glob::parse("public.audit[0-9]").unwrap();
        assert!(g.matches("public", "audit7"));
        assert!(!g.matches("public", "auditx"));
        assert!(!g.matches("public", "audit10"));
        assert!(!g.matches("public", "audit"));

        let g = Glob::parse("public.[abc]*").unwrap();
        assert!(g.matches("public", "actor"));
        assert!(g.matches("public", "city"));
        assert!(!g.matches("public", "film"));

        let g = Glob::parse("public.[!_]*").unwrap();
        assert!(g.matches("public", "film"));
        assert!(!g.matches("public", "_tmp"));
        assert_eq!(Glob::parse("public.[^_]*").unwrap().tokens, g.tokens);

        // Several ranges and single characters; `-` first or last is a member.
        let g = Glob::parse("s.t[a-cx-z_-]").unwrap();
        for ok in ["ta", "tb", "tc", "tx", "tz", "t_", "t-"] {
            assert!(g.matches("s", ok), "{ok}");
        }
        for no in ["td", "tw", "t.", "t"] {
            assert!(!g.matches("s", no), "{no}");
        }
        assert!(Glob::parse("s.[-a]").unwrap().matches("s", "-"));

        // `]` right after `[` (or `[!`) is a member; escapes work inside.
        let g = Glob::parse("s.[]x]").unwrap();
        assert!(g.matches("s", "]") && g.matches("s", "x") && !g.matches("s", "y"));
        let g = Glob::parse("s.[!]]").unwrap();
        assert!(g.matches("s", "y") && !g.matches("s", "]"));
        assert!(Glob::parse("s.[\\]]").unwrap().matches("s", "]"));

        // Escaped brackets are literal; a stray `]` is literal.
        let g = Glob::parse("public.a\\[1]").unwrap();
        assert!(g.matches("public", "a[1]"));
        assert!(!g.matches("public", "a1"));
        assert!(Glob::parse("public.a]").unwrap().matches("public", "a]"));

        // A class can stand for the dot; `?` cannot make a pattern `schema.table` on its own.
        assert!(
            Glob::parse("public[.]film")
                .unwrap()
                .matches("public", "film")
        );
        assert!(Glob::parse("public?film").is_err());

        // Classes combine with `*` backtracking.
        let g = Glob::parse("*.[a-z]*_[0-9]").unwrap();
        assert!(g.matches("sales", "order_line_2"));
        assert!(!g.matches("sales", "order_line_x"));
    }

    #[test]
    fn bad_patterns_say_why() {
        assert_eq!(Glob::parse("  ").unwrap_err(), GlobError::Empty);
        assert_eq!(Glob::parse("film").unwrap_err(), GlobError::NoDot);
        assert_eq!(
            Glob::parse("public.x\\").unwrap_err(),
            GlobError::TrailingBackslash
        );
        for unclosed in [
            "public.audit[0-9",
            "public.[",
            "public.[]",
            "public.[!",
            "public.[a\\",
        ] {
            assert_eq!(
                Glob::parse(unclosed).unwrap_err(),
                GlobError::UnclosedClass,
                "{unclosed}"
            );
        }
        let e = Glob::parse("public.t[z-a]").unwrap_err();
        assert_eq!(e, GlobError::BackwardsRange('z', 'a'));
        assert_eq!(
            e.to_string(),
            "the range `z-a` in `[...]` is backwards (write `a-z`)"
        );
    }

    #[test]
    fn selection() {
        let s = Selection::new(&["public.*".into()], &["public.audit_*".into()]);
        assert!(s.selects("public", "film"));
        assert!(!s.selects("public", "audit_2024"));
        assert!(!s.selects("other", "film"));
        assert!(Selection::new(&[], &[]).selects("x", "y"));
    }
}
