//! verify across a server: every database of a whole-server migration compared as `verify`
//! compares one (counts, or counts and checksums), and the roles, memberships and role settings
//! compared too (`roles::compare`), so that one command says whether the whole server arrived.

use std::path::PathBuf;

use anyhow::Result;

use crate::conninfo::ConnInfo;
use crate::pg::{self, Side};
use crate::roles::RoleComparison;
use crate::state::StateDb;
use crate::verify;

/// One database to compare, with its migration's work dir when there is one (its recorded
/// filters, sequence offset and fence are used).
pub struct Database {
    pub name: String,
    pub dir: Option<PathBuf>,
}

/// The whole server's comparison.
#[derive(serde::Serialize)]
pub struct ServerVerifyReport {
    pub databases: Vec<DatabaseReport>,
    pub roles: RoleComparison,
    pub all_match: bool,
}

/// One database's comparison.
#[derive(serde::Serialize)]
pub struct DatabaseReport {
    pub database: String,
    #[serde(flatten)]
    pub report: verify::Report,
}

/// Compares every database and the roles; `excluded_roles` are those the migration left out.
pub async fn run(
    source: &ConnInfo,
    target: &ConnInfo,
    databases: &[Database],
    counts_only: bool,
    excluded_roles: &[String],
) -> Result<ServerVerifyReport> {
    let mut reports = Vec::new();
    let mut fence_settings = Vec::new();
    for db in databases {
        let state = db.dir.as_deref().map(StateDb::open_in_dir).transpose()?;
        let (filters, sequence_offset) = match &state {
            Some(state) => (
                state.recorded_filters()?.unwrap_or_default(),
                state.sequence_offset()?,
            ),
            None => (Default::default(), 0),
        };
        if let Some(fenced) = state.as_ref().map(|s| s.fence()).transpose()?.flatten() {
            for f in fenced {
                fence_settings.push((
                    f.role,
                    db.name.clone(),
                    "default_transaction_read_only".to_string(),
                ));
            }
        }
        let opts = verify::Options {
            filters,
            counts_only,
            sequence_offset,
        };
        let report = verify::run(
            &crate::server::in_database(source, &db.name),
            &crate::server::in_database(target, &db.name),
            &opts,
        )
        .await
        .map_err(|e| e.context(format!("verifying database {}", db.name)))?;
        reports.push(DatabaseReport {
            database: db.name.clone(),
            report,
        });
    }
    let src = pg::connect(source, Side::Source, "verify").await?;
    let dst = pg::connect(target, Side::Target, "verify").await?;
    let roles = crate::roles::compare(&src, &dst, excluded_roles, &fence_settings).await?;
    let all_match = roles.differences.is_empty() && reports.iter().all(|d| d.report.all_match);
    Ok(ServerVerifyReport {
        databases: reports,
        roles,
        all_match,
    })
}

/// Prints the comparison: each database's report under its name, then the roles.
pub fn print(report: &ServerVerifyReport) {
    for db in &report.databases {
        println!("== database {} ==", db.database);
        verify::print_report(&db.report);
        println!();
    }
    println!(
        "== roles: {} compared{} ==",
        report.roles.compared,
        if report.roles.passwords_compared {
            ", password hashes included"
        } else {
            " (password hashes not compared: both logins need superuser to read them)"
        }
    );
    if report.roles.differences.is_empty() {
        println!("roles, memberships and role settings identical");
    }
    for difference in &report.roles.differences {
        println!("DIFFERENT: {difference}");
    }
    println!();
    if report.all_match {
        println!(
            "the server's {} databases and its roles are identical on source and target",
            report.databases.len()
        );
    }
}
