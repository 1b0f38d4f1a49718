//! Just enough of PostgreSQL's lexical rules to cut a query string into statements and read
//! their leading keywords, for DDL replay: a captured query string can hold several
//! statements (`psql -c "ALTER …; INSERT …"`), and only its DDL statements may be replayed
//! (the others arrive as row changes). Quotes (`'…'`, `E'…'`, `"…"`), dollar quotes
//! (`$tag$…$tag$`) and comments (`-- …`, nested `/* … */`) are skipped whole, so a `;` inside
//! them never cuts a statement.

/// One statement of a query string: its text (without the `;`) and its leading words,
/// upper-cased (quoted identifiers and literals end the word list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub text: String,
    pub words: Vec<String>,
}

impl Statement {
    /// Whether the statement starts with these words (upper case).
    pub fn starts_with(&self, words: &[&str]) -> bool {
        self.words.len() >= words.len() && self.words.iter().zip(words).all(|(a, b)| a == b)
    }
}

/// How many leading words each statement keeps.
const LEADING_WORDS: usize = 8;

/// Splits a query string into its non-empty statements.
pub fn split_statements(query: &str) -> Vec<Statement> {
    let bytes = query.as_bytes();
    let mut statements = Vec::new();
    let mut start = 0;
    let mut words: Vec<String> = Vec::new();
    // Leading words end at the first token that is not a bare word.
    let mut words_open = true;
    let mut i = 0;
    // Whether the statement so far holds anything but blanks and comments.
    let mut content = false;
    let mut push = |start: usize, end: usize, words: &mut Vec<String>, content: bool| {
        let text = query[start..end].trim();
        if content {
            statements.push(Statement {
                text: text.to_string(),
                words: std::mem::take(words),
            });
        }
        words.clear();
    };
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b';' => {
                push(start, i, &mut words, content);
                content = false;
                words_open = true;
                i += 1;
                start = i;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                // E'…' allows backslash escapes; the E was read as a word: look back.
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E') && {
                    let before = &query[..i - 1];
                    before
                        .chars()
                        .last()
                        .is_none_or(|p| !(p.is_alphanumeric() || p == '_'))
                };
                words_open = false;
                content = true;
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' if escapes => i += 2,
                        b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'"' => {
                words_open = false;
                content = true;
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'"' {
                        if bytes.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
            }
            b'$' if dollar_tag(&bytes[i..]).is_some() && !after_word(bytes, i) => {
                let tag_len = dollar_tag(&bytes[i..]).unwrap_or(1);
                let tag = &bytes[i..i + tag_len];
                words_open = false;
                content = true;
                i += tag_len;
                while i < bytes.len() && !bytes[i..].starts_with(tag) {
                    i += 1;
                }
                i = (i + tag_len).min(bytes.len());
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let begin = i;
                content = true;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric()
                        || bytes[i] == b'_'
                        || bytes[i] == b'$'
                        || bytes[i] >= 0x80)
                {
                    i += 1;
                }
                if words_open && words.len() < LEADING_WORDS {
                    words.push(query[begin..i].to_ascii_uppercase());
                }
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                words_open = false;
                content = true;
                i += 1;
            }
        }
    }
    push(start, bytes.len(), &mut words, content);
    statements
}

/// The length of a dollar-quote opening tag (`$$` or `$tag$`) at the start of `bytes`.
fn dollar_tag(bytes: &[u8]) -> Option<usize> {
    let rest = bytes.get(1..)?;
    let end = rest
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b >= 0x80))?;
    (rest[end] == b'$' && rest.first().is_none_or(|b| !b.is_ascii_digit())).then_some(end + 2)
}

/// A `$` right after an identifier character belongs to it (`a$b`) or is a parameter (`$1`).
fn after_word(bytes: &[u8], i: usize) -> bool {
    i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')
}

/// The statement without the `CONCURRENTLY` of `CREATE [UNIQUE] INDEX CONCURRENTLY`, `DROP
/// INDEX CONCURRENTLY` and `ALTER TABLE … DETACH PARTITION … CONCURRENTLY`: those cannot run
/// inside the transaction that replays them, and on a target that no application uses yet
/// the plain form is the same and faster.
pub fn without_concurrently(statement: &Statement) -> String {
    let concurrent = statement.starts_with(&["CREATE", "INDEX", "CONCURRENTLY"])
        || statement.starts_with(&["CREATE", "UNIQUE", "INDEX", "CONCURRENTLY"])
        || statement.starts_with(&["DROP", "INDEX", "CONCURRENTLY"])
        || (statement.starts_with(&["ALTER", "TABLE"])
            && statement.words.iter().any(|w| w == "DETACH"));
    if !concurrent {
        return statement.text.clone();
    }
    // Remove the first bare word CONCURRENTLY outside quotes: the statements above have it
    // among their leading words (DETACH … CONCURRENTLY at the end, after the names).
    let lower = statement.text.to_ascii_lowercase();
    let mut search = 0;
    while let Some(at) = lower[search..].find("concurrently") {
        let at = search + at;
        let end = at + "concurrently".len();
        let bytes = lower.as_bytes();
        let bounded = (at == 0
            || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_'))
            && (end == bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_'));
        let quoted = statement.text[..at].matches('"').count() % 2 == 1
            || statement.text[..at].matches('\'').count() % 2 == 1;
        if bounded && !quoted {
            return format!("{}{}", &statement.text[..at], &statement.text[end..])
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
        }
        search = end;
    }
    statement.text.clone()
}

/// A captured statement as logs, errors and status may show it: one that can carry a
/// password (`CREATE USER MAPPING … OPTIONS (password …)`, a subscription's connection string,
/// anything naming a password) is replaced by a note (invariant 7); the work dir's private
/// spool keeps it whole.
pub fn shown(statement: &str) -> std::borrow::Cow<'_, str> {
    let lower = statement.to_ascii_lowercase();
    if ["password", "user mapping", "subscription", "connection"]
        .iter()
        .any(|w| lower.contains(w))
    {
        "[statement not shown: it may hold a password; `pgtide spool show` has it]".into()
    } else {
        statement.trim().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(query: &str) -> Vec<Vec<String>> {
        split_statements(query)
            .into_iter()
            .map(|s| s.words)
            .collect()
    }

    #[test]
    fn splits_on_semicolons_outside_quotes_and_comments() {
        let q = "ALTER TABLE t ADD c text DEFAULT 'a;b'; -- x; y\nINSERT INTO \"we;ird\" VALUES (1) /* ; /* ; */ */ ; CREATE FUNCTION f() RETURNS int AS $f$ SELECT 1; $f$ LANGUAGE sql;";
        let s = split_statements(q);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].text, "ALTER TABLE t ADD c text DEFAULT 'a;b'");
        assert_eq!(s[1].words, vec!["INSERT", "INTO"]);
        assert!(s[2].text.ends_with("LANGUAGE sql"));
        assert!(s[2].starts_with(&["CREATE", "FUNCTION", "F"]));
    }

    #[test]
    fn escape_strings_and_doubled_quotes() {
        let q = r"COMMENT ON TABLE t IS E'it\'s; fine'; COMMENT ON TABLE u IS 'it''s; fine'";
        assert_eq!(words(q).len(), 2);
        let q = "SELECT 'a' ; SELECT $1; SELECT a$b$c";
        assert_eq!(words(q).len(), 3);
    }

    #[test]
    fn statements_that_may_hold_a_password_are_not_shown() {
        assert_eq!(
            shown(" CREATE INDEX i ON t (a) "),
            "CREATE INDEX i ON t (a)"
        );
        for s in [
            "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password 'hunter2')",
            "ALTER SERVER s OPTIONS (SET Password 'x')",
            "CREATE SUBSCRIPTION s CONNECTION 'host=h password=x' PUBLICATION p",
        ] {
            assert!(!shown(s).contains('x') || !shown(s).contains("hunter2"));
            assert!(shown(s).starts_with("[statement not shown"), "{s}");
        }
    }

    #[test]
    fn empty_statements_are_dropped() {
        assert!(split_statements(" ; ;\n -- only a comment\n").is_empty());
    }

    #[test]
    fn concurrently_is_removed_where_a_transaction_refuses_it() {
        let one = |q: &str| without_concurrently(&split_statements(q)[0]);
        assert_eq!(
            one("CREATE INDEX CONCURRENTLY i ON t (a)"),
            "CREATE INDEX i ON t (a)"
        );
        assert_eq!(
            one("create unique index concurrently if not exists \"concurrently\" on t (a)"),
            "create unique index if not exists \"concurrently\" on t (a)"
        );
        assert_eq!(one("DROP INDEX CONCURRENTLY i"), "DROP INDEX i");
        assert_eq!(
            one("ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY"),
            "ALTER TABLE p DETACH PARTITION p1"
        );
        assert_eq!(
            one("COMMENT ON TABLE t IS 'concurrently'"),
            "COMMENT ON TABLE t IS 'concurrently'"
        );
    }
}
