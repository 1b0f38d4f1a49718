//! Roles, copied from the source server to the target (`pgtide copy roles`): attributes,
//! password hashes, memberships, per-role settings and comments. The application must log in to
//! the target with its usual credentials after cutover, and nothing else carries roles: they
//! are global objects, outside pg_dump and logical replication.
//!
//! Two target roles are never touched: the one pgtide connects as (altering its password or
//! attributes would cut pgtide's own access in the middle of a migration) and the bootstrap
//! superuser (OID 10). Predefined `pg_*` roles are the server's own and are not copied, but
//! memberships in them are. Everything is done in one target transaction, after every check
//! that can refuse has passed: a refusal leaves the target as it was. A rerun converges:
//! existing roles are altered to match, and a membership that exists is not granted again
//! (from PostgreSQL 16 a second GRANT by another grantor would add a second row).

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::pg::{describe, quote_ident, quote_literal};

/// What the operator asked for.
#[derive(Clone, Debug, Default)]
pub struct RoleCopyOptions {
    /// Copy password hashes (needs superuser on the source to read pg_authid).
    pub passwords: bool,
    /// Source roles not to copy (a managed service's own administrators, say), nor any
    /// membership or setting of theirs.
    pub exclude: Vec<String>,
}

/// One source role as copied.
#[derive(Clone, Debug)]
struct SourceRole {
    name: String,
    superuser: bool,
    inherit: bool,
    create_role: bool,
    create_db: bool,
    login: bool,
    replication: bool,
    bypass_rls: bool,
    connection_limit: i32,
    /// The stored hash (SCRAM or md5), when read and set.
    password: Option<String>,
    valid_until: Option<String>,
    comment: Option<String>,
}

/// One membership: `member` is granted `role`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Membership {
    role: String,
    member: String,
    admin: bool,
    /// From 16: whether the member inherits the role's privileges, and may SET ROLE to it.
    /// None on older sources (the member's own INHERIT attribute decides, as it did there).
    inherit: Option<bool>,
    set: Option<bool>,
}

/// A per-role setting (`ALTER ROLE … [IN DATABASE d] SET name = value`).
#[derive(Clone, Debug)]
struct RoleSetting {
    role: String,
    database: Option<String>,
    name: String,
    value: String,
}

/// What a copy did, for the operator.
#[derive(Debug, Default)]
pub struct RoleCopyReport {
    pub created: Vec<String>,
    pub altered: Vec<String>,
    /// Roles left alone on the target, with why.
    pub skipped: Vec<(String, &'static str)>,
    pub passwords_set: usize,
    pub memberships_granted: usize,
    pub memberships_present: usize,
    pub settings_set: usize,
    /// Settings for a database the target does not have.
    pub settings_skipped: Vec<String>,
}

impl RoleCopyReport {
    /// The counts in one line, as `copy roles` prints and a whole-server run logs them.
    pub fn summary(&self) -> String {
        format!(
            "roles: {} created, {} altered to match the source, {} passwords set; memberships: {} granted, {} already there; {} role settings set",
            self.created.len(),
            self.altered.len(),
            self.passwords_set,
            self.memberships_granted,
            self.memberships_present,
            self.settings_set
        )
    }
}

/// Copies the source's roles onto the target (see the module doc).
pub async fn copy_roles(
    source: &Client,
    target: &Client,
    options: &RoleCopyOptions,
) -> Result<RoleCopyReport> {
    let roles = read_roles(source, options.passwords).await?;
    let memberships = read_memberships(source).await?;
    let settings = read_settings(source).await?;

    let (connected_as, bootstrap, target_super): (String, String, bool) = {
        let row = target
            .query_one(
                "SELECT current_user::text, (SELECT rolname::text FROM pg_roles WHERE oid = 10),
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
                &[],
            )
            .await
            .context("cannot read the target's roles")?;
        (row.get(0), row.get(1), row.get(2))
    };
    let untouchable = |name: &str| -> Option<&'static str> {
        if options.exclude.iter().any(|e| e == name) {
            Some("--exclude-role")
        } else if name == connected_as {
            Some("the role pgtide connects to the target as")
        } else if name == bootstrap {
            Some("the target's bootstrap superuser")
        } else {
            None
        }
    };
    let existing: HashSet<String> = target
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await
        .context("cannot read the target's roles")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let target_databases: HashSet<String> = target
        .query("SELECT datname::text FROM pg_database", &[])
        .await
        .context("cannot read the target's databases")?
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Every refusal before the first change.
    if !target_super {
        let needs_super: Vec<&str> = roles
            .iter()
            .filter(|r| untouchable(&r.name).is_none())
            .filter(|r| r.superuser || r.replication || r.bypass_rls)
            .map(|r| r.name.as_str())
            .collect();
        if !needs_super.is_empty() {
            bail!(
                "the source has roles with SUPERUSER, REPLICATION or BYPASSRLS ({}), which only a superuser can create or alter on the target, and pgtide connects to the target as {connected_as}, who is not one. Run `pgtide copy roles` with a superuser in --target, or create those roles on the target yourself first.",
                needs_super.join(", ")
            );
        }
    }

    let mut report = RoleCopyReport::default();
    let mut statements = Vec::new();
    for role in &roles {
        if let Some(why) = untouchable(&role.name) {
            report.skipped.push((role.name.clone(), why));
            continue;
        }
        let name = quote_ident(&role.name);
        if existing.contains(&role.name) {
            report.altered.push(role.name.clone());
        } else {
            statements.push(format!("CREATE ROLE {name}"));
            report.created.push(role.name.clone());
        }
        statements.push(format!(
            "ALTER ROLE {name} WITH {}",
            attributes(role, target_super)
        ));
        if let Some(hash) = &role.password {
            statements.push(format!(
                "ALTER ROLE {name} PASSWORD {}",
                quote_literal(hash)
            ));
            report.passwords_set += 1;
        }
        if let Some(comment) = &role.comment {
            statements.push(format!(
                "COMMENT ON ROLE {name} IS {}",
                quote_literal(comment)
            ));
        }
    }

    let present: HashSet<(String, String)> = target
        .query(
            "SELECT r.rolname::text, m.rolname::text FROM pg_auth_members a
               JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member",
            &[],
        )
        .await
        .context("cannot read the target's role memberships")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let target_has_options = target_major(target).await? >= 16;
    if !target_has_options {
        let narrower: Vec<String> = memberships
            .iter()
            .filter(|m| untouchable(&m.member).is_none() && !options.exclude.contains(&m.role))
            .filter(|m| m.inherit == Some(false) || m.set == Some(false))
            .map(|m| format!("{} in {}", m.member, m.role))
            .collect();
        if !narrower.is_empty() {
            bail!(
                "memberships granted WITH INHERIT FALSE or SET FALSE on the source ({}) cannot be expressed on a target older than PostgreSQL 16: granted there, the member would inherit the role's privileges and could SET ROLE to it. Nothing was changed. Revoke them on the source or --exclude-role those roles, and grant what fits by hand on the target.",
                narrower.join(", ")
            );
        }
    }
    for m in &memberships {
        // A membership of a role left alone is left alone too, and one in an excluded role
        // could not be granted (it is not created).
        if untouchable(&m.member).is_some() || options.exclude.contains(&m.role) {
            continue;
        }
        if present.contains(&(m.role.clone(), m.member.clone())) {
            report.memberships_present += 1;
            continue;
        }
        statements.push(grant(m, target_has_options));
        report.memberships_granted += 1;
    }

    for s in &settings {
        if untouchable(&s.role).is_some() {
            continue;
        }
        let scope = match &s.database {
            Some(db) if !target_databases.contains(db) => {
                report
                    .settings_skipped
                    .push(format!("{} in database {db}: {}", s.role, s.name));
                continue;
            }
            Some(db) => format!(" IN DATABASE {}", quote_ident(db)),
            None => String::new(),
        };
        statements.push(format!(
            "ALTER ROLE {}{scope} SET {} TO {}",
            quote_ident(&s.role),
            setting_name(&s.name),
            setting_value(&s.name, &s.value)
        ));
        report.settings_set += 1;
    }

    target
        .batch_execute("BEGIN")
        .await
        .context("cannot start the roles transaction on the target")?;
    for statement in &statements {
        if let Err(e) = target.batch_execute(statement).await {
            let _ = target.batch_execute("ROLLBACK").await;
            // The statement is not shown: it may hold a password hash.
            bail!(
                "copying the roles failed on the target ({}); nothing was changed. {}",
                describe(&e),
                hint_for(&e)
            );
        }
    }
    target
        .batch_execute("COMMIT")
        .await
        .context("cannot commit the roles on the target")?;
    Ok(report)
}

fn hint_for(e: &tokio_postgres::Error) -> &'static str {
    match e.code() {
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
            "The target role pgtide connects as lacks the privilege: use a superuser, or a role with CREATEROLE that is ADMIN of the roles granted."
        }
        Some(c) if *c == SqlState::UNDEFINED_OBJECT => {
            "A predefined role or a setting of the source does not exist on the target's version: remove it on the source, or create it on the target first."
        }
        _ => "Fix the cause above and rerun: the copy is idempotent.",
    }
}

/// The attribute list of `ALTER ROLE … WITH`. SUPERUSER, REPLICATION and BYPASSRLS may be
/// named (even as NOSUPERUSER …) only by a superuser: without one on the target they are left
/// out (a role that needs them was refused before anything changed; a new role is created
/// without them).
fn attributes(role: &SourceRole, target_super: bool) -> String {
    let flag = |on: bool, word: &str| {
        if on {
            word.to_string()
        } else {
            format!("NO{word}")
        }
    };
    let mut words = vec![
        flag(role.inherit, "INHERIT"),
        flag(role.create_role, "CREATEROLE"),
        flag(role.create_db, "CREATEDB"),
        flag(role.login, "LOGIN"),
        format!("CONNECTION LIMIT {}", role.connection_limit),
    ];
    if target_super {
        words.extend([
            flag(role.superuser, "SUPERUSER"),
            flag(role.replication, "REPLICATION"),
            flag(role.bypass_rls, "BYPASSRLS"),
        ]);
    }
    if let Some(until) = &role.valid_until {
        words.push(format!("VALID UNTIL {}", quote_literal(until)));
    }
    words.join(" ")
}

fn grant(m: &Membership, target_has_options: bool) -> String {
    let head = format!(
        "GRANT {} TO {}",
        quote_ident(&m.role),
        quote_ident(&m.member)
    );
    if target_has_options {
        let mut options = vec![format!("ADMIN {}", m.admin)];
        if let Some(inherit) = m.inherit {
            options.push(format!("INHERIT {inherit}"));
        }
        if let Some(set) = m.set {
            options.push(format!("SET {set}"));
        }
        format!("{head} WITH {}", options.join(", "))
    } else if m.admin {
        format!("{head} WITH ADMIN OPTION")
    } else {
        head
    }
}

/// Settings whose value is a list of names, each quoted when needed (GUC_LIST_QUOTE in
/// PostgreSQL's guc_tables.c): stored as `"$user", public`, they must be set element by
/// element, not as one string.
const LIST_SETTINGS: [&str; 4] = [
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "local_preload_libraries",
];

/// `name = value` for `ALTER ROLE … SET` / `ALTER DATABASE … SET`, from a stored
/// `pg_db_role_setting` entry: the name quoted, a list setting element by element.
pub(crate) fn set_clause(name: &str, value: &str) -> String {
    format!("{} = {}", setting_name(name), setting_value(name, value))
}

fn setting_name(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

fn setting_value(name: &str, value: &str) -> String {
    if LIST_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
        split_list(value)
            .iter()
            .map(|element| quote_literal(element))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        quote_literal(value)
    }
}

/// Splits a stored list setting (`"$user", public, "a ""b"""`) into its elements, unquoted.
fn split_list(value: &str) -> Vec<String> {
    let mut elements = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut element = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        element.push('"');
                    } else {
                        break;
                    }
                } else {
                    element.push(c);
                }
            }
            while chars.peek().is_some_and(|c| *c != ',') {
                chars.next();
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                element.push(*c);
                chars.next();
            }
            element = element.trim_end().to_string();
        }
        elements.push(element);
        if chars.next().is_none() {
            break;
        }
    }
    elements
}

/// What `verify` found comparing the roles of the two servers.
#[derive(Debug, Default, serde::Serialize)]
pub struct RoleComparison {
    /// Source roles compared (the left-alone ones are not).
    pub compared: usize,
    /// Password hashes were compared too (both logins can read pg_authid).
    pub passwords_compared: bool,
    /// Each difference, in words ("role x: missing on the target", …).
    pub differences: Vec<String>,
}

/// Compares the source's roles, memberships and role settings with the target's, as
/// `copy_roles` would leave them: the roles it leaves alone (`exclude`, the role pgtide
/// connects to the target as, the bootstrap superuser) are not compared, roles only the target
/// has are not differences, and `ignore` lists source settings (role, database, name) that
/// pgtide itself put there (the cutover fence).
pub async fn compare(
    source: &Client,
    target: &Client,
    exclude: &[String],
    ignore: &[(String, String, String)],
) -> Result<RoleComparison> {
    let read_both = |passwords| async move {
        let source_roles = read_roles(source, passwords).await?;
        let target_roles = read_roles(target, passwords).await?;
        anyhow::Ok((source_roles, target_roles))
    };
    let (passwords_compared, (source_roles, target_roles)) = match read_both(true).await {
        Ok(both) => (true, both),
        // Without superuser on a side, everything but the hashes.
        Err(_) => (false, read_both(false).await?),
    };
    let (connected_as, bootstrap): (String, String) = {
        let row = target
            .query_one(
                "SELECT current_user::text, (SELECT rolname::text FROM pg_roles WHERE oid = 10)",
                &[],
            )
            .await
            .context("cannot read the target's roles")?;
        (row.get(0), row.get(1))
    };
    let left_alone =
        |name: &str| exclude.iter().any(|e| e == name) || name == connected_as || name == bootstrap;
    let mut comparison = RoleComparison {
        passwords_compared,
        ..Default::default()
    };
    let by_name: BTreeMap<&str, &SourceRole> =
        target_roles.iter().map(|r| (r.name.as_str(), r)).collect();
    for role in source_roles.iter().filter(|r| !left_alone(&r.name)) {
        comparison.compared += 1;
        let Some(there) = by_name.get(role.name.as_str()) else {
            comparison
                .differences
                .push(format!("role {}: missing on the target", role.name));
            continue;
        };
        let shape = |r: &SourceRole| {
            format!(
                "superuser={} inherit={} createrole={} createdb={} login={} replication={} bypassrls={} connection limit={} valid until={} comment={}",
                r.superuser,
                r.inherit,
                r.create_role,
                r.create_db,
                r.login,
                r.replication,
                r.bypass_rls,
                r.connection_limit,
                r.valid_until.as_deref().unwrap_or("-"),
                r.comment.as_deref().unwrap_or("-")
            )
        };
        if shape(role) != shape(there) {
            comparison.differences.push(format!(
                "role {}: source has {}, target has {}",
                role.name,
                shape(role),
                shape(there)
            ));
        }
        if passwords_compared && role.password != there.password {
            comparison
                .differences
                .push(format!("role {}: the password differs", role.name));
        }
    }
    let target_memberships = read_memberships(target).await?;
    for m in read_memberships(source).await? {
        if left_alone(&m.member) || left_alone(&m.role) {
            continue;
        }
        match target_memberships
            .iter()
            .find(|t| t.role == m.role && t.member == m.member)
        {
            None => comparison.differences.push(format!(
                "membership of {} in {}: missing on the target",
                m.member, m.role
            )),
            // INHERIT and SET options exist from 16 on: compared where both sides have them.
            Some(t)
                if t.admin != m.admin
                    || !same_option(m.inherit, t.inherit)
                    || !same_option(m.set, t.set) =>
            {
                comparison.differences.push(format!(
                    "membership of {} in {}: source has admin={} inherit={} set={}, target has admin={} inherit={} set={}",
                    m.member,
                    m.role,
                    m.admin,
                    option_text(m.inherit),
                    option_text(m.set),
                    t.admin,
                    option_text(t.inherit),
                    option_text(t.set)
                ))
            }
            Some(_) => {}
        }
    }
    let key = |s: &RoleSetting| {
        (
            s.role.clone(),
            s.database.clone().unwrap_or_default(),
            s.name.clone(),
        )
    };
    let target_settings: BTreeMap<_, String> = read_settings(target)
        .await?
        .into_iter()
        .map(|s| (key(&s), s.value))
        .collect();
    for setting in read_settings(source).await? {
        let k = key(&setting);
        if left_alone(&setting.role) || ignore.contains(&k) {
            continue;
        }
        match target_settings.get(&k) {
            Some(value) if value == &setting.value => {}
            other => comparison.differences.push(format!(
                "setting {} of role {}{}: {} on the source, {} on the target",
                setting.name,
                setting.role,
                setting
                    .database
                    .as_deref()
                    .map_or(String::new(), |d| format!(" in database {d}")),
                setting.value,
                other.map_or("not set", |v| v.as_str())
            )),
        }
    }
    Ok(comparison)
}

fn same_option(a: Option<bool>, b: Option<bool>) -> bool {
    a.is_none() || b.is_none() || a == b
}

fn option_text(option: Option<bool>) -> &'static str {
    match option {
        Some(true) => "true",
        Some(false) => "false",
        None => "-",
    }
}

async fn target_major(client: &Client) -> Result<u32> {
    crate::pg::server_major(client).await
}

async fn read_roles(source: &Client, passwords: bool) -> Result<Vec<SourceRole>> {
    let columns = "rolname::text, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,
                   rolreplication, rolbypassrls, rolconnlimit, PASSWORD, rolvaliduntil::text,
                   shobj_description(oid, 'pg_authid')";
    let sql = |table: &str, password: &str| {
        format!(
            "SELECT {} FROM {table} WHERE rolname !~ '^pg_' ORDER BY rolname",
            columns.replace("PASSWORD", password)
        )
    };
    let rows = if passwords {
        match source.query(&sql("pg_authid", "rolpassword"), &[]).await {
            Ok(rows) => rows,
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => bail!(
                "reading the roles' password hashes needs a superuser on the source (they are in pg_authid, which only superusers can read). Connect --source as a superuser, or rerun with --no-role-passwords to copy the roles without passwords (set them on the target afterwards with ALTER ROLE … PASSWORD)."
            ),
            Err(e) => bail!("cannot read the source's roles: {}", describe(&e)),
        }
    } else {
        source
            .query(&sql("pg_roles", "NULL::text"), &[])
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the source's roles: {}", describe(&e)))?
    };
    Ok(rows
        .iter()
        .map(|r| SourceRole {
            name: r.get(0),
            superuser: r.get(1),
            inherit: r.get(2),
            create_role: r.get(3),
            create_db: r.get(4),
            login: r.get(5),
            replication: r.get(6),
            bypass_rls: r.get(7),
            connection_limit: r.get(8),
            password: r.get(9),
            valid_until: r.get(10),
            comment: r.get(11),
        })
        .collect())
}

async fn read_memberships(source: &Client) -> Result<Vec<Membership>> {
    let options = if crate::pg::server_major(source).await? >= 16 {
        "a.inherit_option, a.set_option"
    } else {
        "NULL::bool, NULL::bool"
    };
    let rows = source
        .query(
            &format!(
                "SELECT r.rolname::text, m.rolname::text, a.admin_option, {options}
                 FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid
                 JOIN pg_roles m ON m.oid = a.member
                 WHERE m.rolname !~ '^pg_'"
            ),
            &[],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the source's role memberships: {}",
                describe(&e)
            )
        })?;
    // From 16 one membership can have a row per grantor: one grant with the options of all.
    let mut merged: BTreeMap<(String, String), Membership> = BTreeMap::new();
    for r in &rows {
        let m = Membership {
            role: r.get(0),
            member: r.get(1),
            admin: r.get(2),
            inherit: r.get(3),
            set: r.get(4),
        };
        merged
            .entry((m.role.clone(), m.member.clone()))
            .and_modify(|e| {
                e.admin |= m.admin;
                e.inherit = match (e.inherit, m.inherit) {
                    (Some(a), Some(b)) => Some(a || b),
                    (a, b) => a.or(b),
                };
                e.set = match (e.set, m.set) {
                    (Some(a), Some(b)) => Some(a || b),
                    (a, b) => a.or(b),
                };
            })
            .or_insert(m);
    }
    Ok(merged.into_values().collect())
}

async fn read_settings(source: &Client) -> Result<Vec<RoleSetting>> {
    let rows = source
        .query(
            "SELECT r.rolname::text, d.datname::text, s.setconfig::text[]
             FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
             LEFT JOIN pg_database d ON d.oid = s.setdatabase
             WHERE s.setrole <> 0 AND r.rolname !~ '^pg_'
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the source's role settings: {}", describe(&e)))?;
    let mut settings = Vec::new();
    for r in &rows {
        let config: Vec<String> = r.get(2);
        for entry in config {
            let Some((name, value)) = entry.split_once('=') else {
                continue;
            };
            settings.push(RoleSetting {
                role: r.get(0),
                database: r.get(1),
                name: name.to_string(),
                value: value.to_string(),
            });
        }
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::{SourceRole, attributes, setting_value, split_list};

    /// Only a superuser may name SUPERUSER, REPLICATION or BYPASSRLS, even as NO…: a
    /// CREATEROLE administrator (a managed service's) must be able to copy the other roles.
    #[test]
    fn privileged_attributes_only_for_a_superuser_target() {
        let role = SourceRole {
            name: "app".into(),
            superuser: false,
            inherit: true,
            create_role: false,
            create_db: true,
            login: true,
            replication: false,
            bypass_rls: false,
            connection_limit: -1,
            password: None,
            valid_until: None,
            comment: None,
        };
        let words = attributes(&role, false);
        assert_eq!(
            words,
            "INHERIT NOCREATEROLE CREATEDB LOGIN CONNECTION LIMIT -1"
        );
        let words = attributes(&role, true);
        assert!(
            words.contains("NOSUPERUSER NOREPLICATION NOBYPASSRLS"),
            "{words}"
        );
    }

    #[test]
    fn list_settings_are_set_element_by_element() {
        assert_eq!(
            split_list(r#""$user", public, "My ""Schema""""#),
            vec!["$user", "public", r#"My "Schema""#]
        );
        assert_eq!(split_list("a"), vec!["a"]);
        assert_eq!(
            setting_value("search_path", r#""$user", public"#),
            "'$user', 'public'"
        );
        assert_eq!(setting_value("work_mem", "16MB"), "'16MB'");
        assert_eq!(setting_value("DateStyle", "ISO, DMY"), "'ISO, DMY'");
    }
}
