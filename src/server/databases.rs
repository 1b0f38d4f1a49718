//! The databases of a whole-server migration: which source databases it moves (largest first,
//! as `--all-databases`, `--database` and `--exclude-database` select them), and each one
//! created on the target with the source's properties (encoding, locale, owner, connection
//! limit, privileges, settings, comment) before its own pipeline restores the schema into it.
//! pg_dump of one database carries none of these: they belong to the server's catalog.

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;

use crate::pg::{describe, quote_ident, quote_literal};

/// Which databases to move.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// `--database`: only these (empty: every database, `--all-databases`).
    pub only: Vec<String>,
    /// `--exclude-database`.
    pub exclude: Vec<String>,
}

/// A source database chosen for the migration.
#[derive(Clone, Debug)]
pub struct SourceDatabase {
    pub oid: u32,
    pub name: String,
    pub bytes: i64,
}

/// The selected source databases, largest first. Templates and databases that refuse
/// connections are never moved; a named one that is missing or unusable is an error.
pub async fn select(source: &Client, selection: &Selection) -> Result<Vec<SourceDatabase>> {
    let rows = source
        .query(
            "SELECT d.oid, d.datname::text, d.datallowconn AND NOT d.datistemplate,
                    CASE WHEN has_database_privilege(d.oid, 'CONNECT') THEN pg_database_size(d.oid) ELSE 0 END
             FROM pg_database d ORDER BY 4 DESC, 2",
            &[],
        )
        .await
        .context("cannot list the source's databases")?;
    let all: Vec<(SourceDatabase, bool)> = rows
        .iter()
        .map(|r| {
            (
                SourceDatabase {
                    oid: r.get(0),
                    name: r.get(1),
                    bytes: r.get(3),
                },
                r.get(2),
            )
        })
        .collect();
    for name in selection.only.iter().chain(&selection.exclude) {
        match all.iter().find(|(d, _)| &d.name == name) {
            None => bail!(
                "the source has no database \"{name}\" (it has: {}); fix --database / --exclude-database",
                all.iter()
                    .filter(|(_, usable)| *usable)
                    .map(|(d, _)| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some((_, false)) if selection.only.contains(name) => bail!(
                "--database {name}: a template or a database that refuses connections cannot be migrated"
            ),
            Some(_) => {}
        }
    }
    let chosen: Vec<SourceDatabase> = all
        .into_iter()
        .filter(|(_, usable)| *usable)
        .map(|(d, _)| d)
        .filter(|d| selection.only.is_empty() || selection.only.contains(&d.name))
        .filter(|d| !selection.exclude.contains(&d.name))
        .collect();
    if chosen.is_empty() {
        bail!("no source database is left to migrate: check --database / --exclude-database");
    }
    Ok(chosen)
}

/// The properties of one source database that `CREATE DATABASE` and `ALTER DATABASE` carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// `icu` or `builtin` with its locale (and ICU rules, 16+); None: libc.
    pub provider: Option<(String, String, Option<String>)>,
    pub owner: String,
    pub connection_limit: i32,
    /// `aclexplode(datacl)`: (grantee or None for PUBLIC, privilege, grantable); None: the
    /// default privileges (datacl NULL).
    pub grants: Option<Vec<(Option<String>, String, bool)>>,
    /// `ALTER DATABASE … SET` entries, as stored (`name=value`).
    pub settings: Vec<String>,
    pub comment: Option<String>,
    /// A default tablespace other than pg_default (not moved: see `create`).
    pub tablespace: Option<String>,
}

/// Reads a database's properties from the source's catalog (versions 12 to 18).
pub async fn properties(source: &Client, oid: u32) -> Result<Properties> {
    let major = crate::pg::server_major(source).await?;
    let provider = match major {
        0..=14 => "NULL::text, NULL::text, NULL::text",
        15 => "d.datlocprovider::text, d.daticulocale, NULL::text",
        16 => "d.datlocprovider::text, d.daticulocale, d.daticurules",
        _ => "d.datlocprovider::text, d.datlocale, d.daticurules",
    };
    let row = source
        .query_one(
            &format!(
                "SELECT pg_encoding_to_char(d.encoding)::text, d.datcollate::text, d.datctype::text,
                        {provider}, pg_get_userbyid(d.datdba)::text, d.datconnlimit,
                        d.datacl IS NULL,
                        ARRAY(SELECT unnest(s.setconfig) FROM pg_db_role_setting s WHERE s.setdatabase = d.oid AND s.setrole = 0)::text[],
                        shobj_description(d.oid, 'pg_database'),
                        NULLIF((SELECT spcname::text FROM pg_tablespace WHERE oid = d.dattablespace), 'pg_default')
                 FROM pg_database d WHERE d.oid = $1"
            ),
            &[&oid],
        )
        .await
        .context("cannot read the source database's properties")?;
    let provider = match (row.get::<_, Option<String>>(3).as_deref(), row.get(4)) {
        (Some("i"), Some(locale)) => Some(("icu".to_string(), locale, row.get(5))),
        (Some("b"), Some(locale)) => Some(("builtin".to_string(), locale, None)),
        _ => None,
    };
    let default_acl: bool = row.get(8);
    let grants = if default_acl {
        None
    } else {
        let rows = source
            .query(
                "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee)::text END,
                        a.privilege_type::text, a.is_grantable
                 FROM pg_database d, aclexplode(d.datacl) a WHERE d.oid = $1 ORDER BY 1 NULLS FIRST, 2",
                &[&oid],
            )
            .await
            .context("cannot read the source database's privileges")?;
        Some(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        )
    };
    let settings: Vec<String> = row.get(9);
    Ok(Properties {
        encoding: row.get(0),
        collate: row.get(1),
        ctype: row.get(2),
        provider,
        owner: row.get(6),
        connection_limit: row.get(7),
        grants,
        settings,
        comment: row.get(10),
        tablespace: row.get(11),
    })
}

/// The statements that create `name` on the target with `props`: `CREATE DATABASE` first
/// (alone: it cannot run in a transaction), then one batch of ALTER / GRANT / COMMENT.
pub fn create_statements(name: &str, props: &Properties) -> (String, String) {
    let db = quote_ident(name);
    let mut create = format!(
        "CREATE DATABASE {db} WITH TEMPLATE template0 OWNER {} ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        quote_ident(&props.owner),
        quote_literal(&props.encoding),
        quote_literal(&props.collate),
        quote_literal(&props.ctype),
    );
    match &props.provider {
        Some((provider, locale, rules)) if provider == "icu" => {
            create.push_str(&format!(
                " LOCALE_PROVIDER icu ICU_LOCALE {}",
                quote_literal(locale)
            ));
            if let Some(rules) = rules {
                create.push_str(&format!(" ICU_RULES {}", quote_literal(rules)));
            }
        }
        Some((_, locale, _)) => create.push_str(&format!(
            " LOCALE_PROVIDER builtin BUILTIN_LOCALE {}",
            quote_literal(locale)
        )),
        None => {}
    }
    create.push_str(&format!(" CONNECTION LIMIT {}", props.connection_limit));
    let mut then = Vec::new();
    for setting in &props.settings {
        if let Some((setting, value)) = setting.split_once('=') {
            then.push(format!(
                "ALTER DATABASE {db} SET {}",
                crate::roles::set_clause(setting, value)
            ));
        }
    }
    if let Some(grants) = &props.grants {
        // The source changed the defaults: start from none and grant exactly its entries.
        then.push(format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"));
        then.push(format!(
            "REVOKE ALL ON DATABASE {db} FROM {}",
            quote_ident(&props.owner)
        ));
        for (grantee, privilege, grantable) in grants {
            then.push(format!(
                "GRANT {privilege} ON DATABASE {db} TO {}{}",
                grantee.as_deref().map_or("PUBLIC".to_string(), quote_ident),
                if *grantable { " WITH GRANT OPTION" } else { "" }
            ));
        }
    }
    if let Some(comment) = &props.comment {
        then.push(format!(
            "COMMENT ON DATABASE {db} IS {}",
            quote_literal(comment)
        ));
    }
    (create, then.join(";\n"))
}

/// Whether the target already has database `name`.
pub async fn exists(target: &Client, name: &str) -> Result<bool> {
    Ok(target
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .context("cannot list the target's databases")?
        .is_some())
}

/// Creates `name` on the target: with the source's properties, or (`--skip-db-properties`)
/// with the target's defaults, owned by the role pgtide connects as.
pub async fn create(target: &Client, name: &str, props: Option<&Properties>) -> Result<()> {
    let Some(props) = props else {
        return target
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot create database {name} on the target: {}",
                    describe(&e)
                )
            });
    };
    if let Some(tablespace) = &props.tablespace {
        tracing::warn!(
            "database {name} has the default tablespace {tablespace} on the source; it is created in the target's default tablespace (tablespaces are not moved: create {tablespace} on the target and run ALTER DATABASE … SET TABLESPACE after the migration if you need it)"
        );
    }
    let (create, then) = create_statements(name, props);
    target.batch_execute(&create).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot create database {name} on the target as on the source ({}): {}. If the target lacks the source's locale or owner, install the locale or run `pgtide copy roles` first, or give --skip-db-properties to create it with the target's defaults",
            props_summary(props),
            describe(&e)
        )
    })?;
    if !then.is_empty() {
        target.batch_execute(&then).await.map_err(|e| {
            anyhow::anyhow!(
                "database {name} was created on the target, but setting its properties failed: {}. Fix the cause, drop the database on the target and rerun, or give --skip-db-properties",
                describe(&e)
            )
        })?;
    }
    Ok(())
}

fn props_summary(props: &Properties) -> String {
    format!(
        "owner {}, encoding {}, LC_COLLATE {}, LC_CTYPE {}{}",
        props.owner,
        props.encoding,
        props.collate,
        props.ctype,
        props
            .provider
            .as_ref()
            .map(|(p, l, _)| format!(", {p} locale {l}"))
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_become_one_create_and_its_alters() {
        let props = Properties {
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C".into(),
            provider: Some(("icu".into(), "und-x-icu".into(), None)),
            owner: "app owner".into(),
            connection_limit: 20,
            grants: Some(vec![
                (None, "CONNECT".into(), false),
                (Some("reader".into()), "TEMPORARY".into(), true),
            ]),
            settings: vec![
                "search_path=\"$user\", public".into(),
                "work_mem=8MB".into(),
            ],
            comment: Some("it's ours".into()),
            tablespace: None,
        };
        let (create, then) = create_statements("My Db", &props);
        assert_eq!(
            create,
            "CREATE DATABASE \"My Db\" WITH TEMPLATE template0 OWNER \"app owner\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'und-x-icu' CONNECTION LIMIT 20"
        );
        let then: Vec<&str> = then.split(";\n").collect();
        assert_eq!(
            then,
            [
                "ALTER DATABASE \"My Db\" SET \"search_path\" = '$user', 'public'",
                "ALTER DATABASE \"My Db\" SET \"work_mem\" = '8MB'",
                "REVOKE ALL ON DATABASE \"My Db\" FROM PUBLIC",
                "REVOKE ALL ON DATABASE \"My Db\" FROM \"app owner\"",
                "GRANT CONNECT ON DATABASE \"My Db\" TO PUBLIC",
                "GRANT TEMPORARY ON DATABASE \"My Db\" TO \"reader\" WITH GRANT OPTION",
                "COMMENT ON DATABASE \"My Db\" IS 'it''s ours'",
            ]
        );
    }
}
