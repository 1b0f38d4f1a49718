//! `--filters FILE`: which schemas and tables a migration covers, in an INI-like file that
//! pgcopydb users already know:
//!
//! ```text
//! [include-only-schema]   # when present, only these schemas
//! app
//! [exclude-schema]
//! scratch
//! [include-only-table]    # when present, only these tables
//! app.orders
//! [exclude-table]
//! app.tmp_import
//! [exclude-table-data]    # schema and indexes are created, rows are not copied
//! app.audit_log
//! ```
//!
//! Names are `schema.table`; quote a part that contains a dot or capitals: `"My Schema"."T"`.
//! A table section may name a view or a materialized view too (excluded, or with
//! `[exclude-table-data]` a materialized view created but not populated). Lines starting with `;` (as pgcopydb writes them) or `#` are
//! comments, and so is a trailing `# …` or `; …` after a blank.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// A schema-qualified table name as written in the filters file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

/// The parsed filters; the empty value includes everything. Serializable so that a migration
/// records them once in state.db and every later stage reads them back (invariant 9).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filters {
    pub include_only_schemas: Vec<String>,
    pub exclude_schemas: Vec<String>,
    pub include_only_tables: Vec<TableName>,
    pub exclude_tables: Vec<TableName>,
    pub exclude_table_data: Vec<TableName>,
    /// Tables that joined the migration while it followed (`follow --add-table`): included
    /// whatever the sections above say. Never in a filters file; recorded in state.db only
    /// (absent from what an earlier pgtide recorded, hence the default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added_tables: Vec<TableName>,
}

impl Filters {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the filters file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the filters file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut filters = Filters::default();
        let mut section: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[') {
                let Some(name) = name.strip_suffix(']') else {
                    bail!("line {line_no}: section header \"{line}\" is missing its closing ]");
                };
                match name.trim() {
                    "include-only-schema"
                    | "exclude-schema"
                    | "include-only-table"
                    | "exclude-table"
                    | "exclude-table-data" => section = Some(name.trim().to_string()),
                    other => bail!(
                        "line {line_no}: unknown section [{other}]; known sections: [include-only-schema], [exclude-schema], [include-only-table], [exclude-table], [exclude-table-data]"
                    ),
                }
                continue;
            }
            let Some(section) = section.as_deref() else {
                bail!("line {line_no}: \"{line}\" comes before any [section] header");
            };
            match section {
                "include-only-schema" => filters
                    .include_only_schemas
                    .push(parse_identifier(line, line_no)?),
                "exclude-schema" => filters
                    .exclude_schemas
                    .push(parse_identifier(line, line_no)?),
                "include-only-table" => filters
                    .include_only_tables
                    .push(parse_table(line, line_no)?),
                "exclude-table" => filters.exclude_tables.push(parse_table(line, line_no)?),
                "exclude-table-data" => {
                    filters.exclude_table_data.push(parse_table(line, line_no)?)
                }
                _ => unreachable!("sections are validated above"),
            }
        }
        Ok(filters)
    }

    pub fn includes_schema(&self, schema: &str) -> bool {
        if schema == "pgtide" || self.exclude_schemas.iter().any(|s| s == schema) {
            return false;
        }
        self.include_only_schemas.is_empty()
            || self.include_only_schemas.iter().any(|s| s == schema)
    }

    pub fn includes_table(&self, schema: &str, name: &str) -> bool {
        let matches = |t: &TableName| t.schema == schema && t.name == name;
        if schema != "pgtide" && self.added_tables.iter().any(matches) {
            return true;
        }
        self.includes_schema(schema)
            && !self.exclude_tables.iter().any(matches)
            && (self.include_only_tables.is_empty() || self.include_only_tables.iter().any(matches))
    }

    pub fn copies_data(&self, schema: &str, name: &str) -> bool {
        !self
            .exclude_table_data
            .iter()
            .any(|t| t.schema == schema && t.name == name)
    }

    /// The filters once `table` joined the migration (`follow --add-table`): included, with
    /// its data, whatever the file said.
    pub fn with_table_added(&self, table: &TableName) -> Filters {
        let mut filters = self.clone();
        filters.exclude_tables.retain(|t| t != table);
        filters.exclude_table_data.retain(|t| t != table);
        if !filters.includes_table(&table.schema, &table.name) {
            filters.added_tables.push(table.clone());
        }
        filters
    }

    /// The filters once `table` left the migration (`follow --remove-table`): excluded.
    pub fn with_table_removed(&self, table: &TableName) -> Filters {
        let mut filters = self.clone();
        filters.added_tables.retain(|t| t != table);
        filters.include_only_tables.retain(|t| t != table);
        if filters.includes_table(&table.schema, &table.name) {
            filters.exclude_tables.push(table.clone());
        }
        filters
    }

    /// Every table named in the file, so that a typo is reported instead of silently ignored.
    pub fn named_tables(&self) -> impl Iterator<Item = &TableName> {
        self.include_only_tables
            .iter()
            .chain(&self.exclude_tables)
            .chain(&self.exclude_table_data)
    }

    pub fn named_schemas(&self) -> impl Iterator<Item = &String> {
        self.include_only_schemas
            .iter()
            .chain(&self.exclude_schemas)
    }

    /// The same selection as pg_dump switches, so the schema dump holds exactly the filtered
    /// objects (and their dependent indexes, constraints, triggers).
    pub fn pg_dump_args(&self) -> Vec<String> {
        let mut args = vec!["--exclude-schema=pgtide".to_string()];
        for s in &self.include_only_schemas {
            args.push(format!("--schema={}", dump_pattern(s)));
        }
        for s in &self.exclude_schemas {
            args.push(format!("--exclude-schema={}", dump_pattern(s)));
        }
        for t in &self.include_only_tables {
            args.push(format!(
                "--table={}.{}",
                dump_pattern(&t.schema),
                dump_pattern(&t.name)
            ));
        }
        for t in &self.exclude_tables {
            args.push(format!(
                "--exclude-table={}.{}",
                dump_pattern(&t.schema),
                dump_pattern(&t.name)
            ));
        }
        // Rows are pgtide's to copy, so this only matters to a materialized view: its data
        // (the REFRESH of post-data) is left out, the view is created unpopulated.
        for t in &self.exclude_table_data {
            args.push(format!(
                "--exclude-table-data={}.{}",
                dump_pattern(&t.schema),
                dump_pattern(&t.name)
            ));
        }
        args
    }
}

/// A line without its comment. A line whose first non-blank character is `;` (pgcopydb's
/// comment mark) or `#` is a comment; so is the rest of a line from a `;` or `#` that follows a
/// blank and is outside double quotes (`public.t   # why`), so `"odd#name"` is a name.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    let mut after_blank = true;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' | '#' if !quoted && after_blank => return &line[..i],
            _ => {}
        }
        after_blank = c.is_whitespace();
    }
    line
}

/// A pg_dump pattern that matches exactly this name (quoted, so no wildcard applies).
fn dump_pattern(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn parse_identifier(text: &str, line_no: usize) -> Result<String> {
    let parts = split_qualified(text).map_err(|e| anyhow!("line {line_no}: {e}"))?;
    if parts.len() != 1 {
        bail!("line {line_no}: expected a schema name, found \"{text}\"");
    }
    Ok(parts.into_iter().next().unwrap_or_default())
}

fn parse_table(text: &str, line_no: usize) -> Result<TableName> {
    let mut parts = split_qualified(text).map_err(|e| anyhow!("line {line_no}: {e}"))?;
    if parts.len() != 2 {
        bail!("line {line_no}: expected a table as schema.table, found \"{text}\"");
    }
    let name = parts.pop().unwrap_or_default();
    let schema = parts.pop().unwrap_or_default();
    Ok(TableName { schema, name })
}

/// A table name as SQL reads it (`public.t`, `public."Odd Name"`, or `t` for `public.t`), so
/// that a command-line option accepts a name exactly as pgtide prints it.
pub fn parse_table_name(text: &str) -> Result<TableName> {
    let mut parts = split_qualified(text.trim())?;
    let name = parts.pop().unwrap_or_default();
    let schema = match (parts.pop(), parts.is_empty()) {
        (None, _) => "public".to_string(),
        (Some(schema), true) => schema,
        (Some(_), false) => bail!("\"{text}\" has more than two parts: give schema.table"),
    };
    Ok(TableName { schema, name })
}

/// Splits `a.b` / `"a.x"."B"` into its parts; unquoted parts are folded to lower case as
/// PostgreSQL does.
fn split_qualified(text: &str) -> Result<Vec<String>> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if current.is_empty() && !quoted_part => {
                quoted_part = true;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            current.push('"');
                        }
                        Some('"') => break,
                        Some(other) => current.push(other),
                        None => bail!("unterminated quote in \"{text}\""),
                    }
                }
            }
            '.' => {
                if current.is_empty() {
                    bail!("empty name in \"{text}\"");
                }
                parts.push(std::mem::take(&mut current));
                quoted_part = false;
            }
            c if c.is_whitespace() => {
                bail!("unexpected space in \"{text}\"; quote names that contain spaces")
            }
            c => {
                if quoted_part {
                    bail!("unexpected text after a quoted name in \"{text}\"");
                }
                current.extend(c.to_lowercase());
            }
        }
    }
    if current.is_empty() {
        bail!("empty name in \"{text}\"");
    }
    parts.push(current);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_section() {
        let f = Filters::parse(
            "# comment\n[exclude-schema]\nscratch\n[exclude-table]\npublic.Tmp  # folded\n[exclude-table-data]\n\"Log Schema\".\"Big.Log\"\n[include-only-table]\npublic.a\n",
        )
        .unwrap();
        assert_eq!(f.exclude_schemas, vec!["scratch"]);
        assert_eq!(
            f.exclude_tables[0],
            TableName {
                schema: "public".into(),
                name: "tmp".into()
            }
        );
        assert_eq!(
            f.exclude_table_data[0],
            TableName {
                schema: "Log Schema".into(),
                name: "Big.Log".into()
            }
        );
        assert!(f.includes_table("public", "a"));
        assert!(!f.includes_table("public", "b"));
        assert!(!f.includes_table("scratch", "a"));
        assert!(!f.copies_data("Log Schema", "Big.Log"));
        assert!(!f.includes_schema("pgtide"));
        assert!(
            f.pg_dump_args()
                .contains(&"--exclude-table=\"public\".\"tmp\"".to_string())
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Filters::parse("[exclude-table]\nnodot\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = Filters::parse("[exclude-tables]\n").unwrap_err();
        assert!(err.to_string().contains("unknown section"), "{err}");
        let err = Filters::parse("public.t\n").unwrap_err();
        assert!(err.to_string().contains("before any [section]"), "{err}");
        let err = Filters::parse("[exclude-table]\n\"open.t\n").unwrap_err();
        assert!(err.to_string().contains("unterminated"), "{err}");
    }

    #[test]
    fn table_names_as_sql_reads_them() {
        let t = parse_table_name("public.\"Odd Name\"").unwrap();
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("public", "Odd Name"));
        let t = parse_table_name("Logs").unwrap();
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("public", "logs"));
        assert!(parse_table_name("a.b.c").is_err());
        assert!(parse_table_name("public.Odd Name").is_err());
    }

    #[test]
    fn added_and_removed_tables() {
        let f = Filters::parse("[exclude-schema]\nscratch\n[exclude-table]\npublic.x\n").unwrap();
        let x = parse_table_name("x").unwrap();
        let s = parse_table_name("scratch.s").unwrap();
        let added = f.with_table_added(&x).with_table_added(&s);
        assert!(added.includes_table("public", "x") && added.copies_data("public", "x"));
        assert!(added.includes_table("scratch", "s"));
        assert!(!added.includes_table("scratch", "other"));
        assert!(added.exclude_tables.is_empty());
        let removed = added.with_table_removed(&x).with_table_removed(&s);
        assert!(!removed.includes_table("public", "x"));
        assert!(!removed.includes_table("scratch", "s"));
        // What an earlier pgtide recorded (no added_tables) still reads.
        let old: Filters = serde_json::from_str(
            r#"{"include_only_schemas":[],"exclude_schemas":[],"include_only_tables":[],"exclude_tables":[],"exclude_table_data":[]}"#,
        )
        .unwrap();
        assert_eq!(old, Filters::default());
    }

    #[test]
    fn pgcopydb_comments() {
        let f = Filters::parse(
            "; pgcopydb comment\n# hash comment\n[exclude-table]\n   ; indented\npublic.a ; trailing\npublic.\"odd#name\"   # trailing\npublic.\"semi;colon\"\n",
        )
        .unwrap();
        let names: Vec<&str> = f.exclude_tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["a", "odd#name", "semi;colon"]);
    }
}
