//! Table selection: `tables` and `exclude` globs on `schema.table` (`*` any run of characters, `?` one
//! character, `\` escapes the next). A table is selected when it matches some `tables` pattern (or the
//! list is empty) and no `exclude` pattern.

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
}

impl Glob {
    pub fn parse(text: &str) -> Result<Glob, String> {
        if text.trim().is_empty() {
            return Err("empty pattern".into());
        }
        let mut tokens = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => Tok::Any,
                '?' => Tok::One,
                '\\' => Tok::Lit(chars.next().ok_or("pattern ends with `\\`")?),
                c => Tok::Lit(c),
            });
        }
        // A pattern must name a schema and a table: it needs an unescaped-or-escaped dot, or a wildcard
        // that can cover one.
        if !tokens.iter().any(|t| matches!(t, Tok::Lit('.') | Tok::Any)) {
            return Err("a pattern is `schema.table`".into());
        }
        Ok(Glob {
            text: text.to_string(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Does `schema.table` match?
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        let name: Vec<char> = format!("{schema}.{table}").chars().collect();
        matches_from(&self.tokens, &name)
    }
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
            Some(Tok::One) => {
                pi += 1;
                si += 1;
            }
            Some(Tok::Lit(c)) if *c == s[si] => {
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
