//! `pgtide copy sequences` and `pgtide copy roles`: what logical replication does not carry,
//! set on the target from the source (sequences with an optional safety offset) before traffic
//! switches over.

use anyhow::Result;

use crate::cli::{CopyRolesArgs, CopySequencesArgs};
use crate::clone::sequences;
use crate::pg::{self, Side, catalog};

pub async fn sequences(args: CopySequencesArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    // With the migration's work dir: the filters it recorded (invariant 9).
    let state = args
        .dir
        .as_deref()
        .map(crate::state::StateDb::open_in_dir)
        .transpose()?;
    let filters = match &state {
        Some(state) => super::migration_filters(state, args.filters.as_deref())?,
        None => super::load_filters(args.filters.as_deref())?,
    };
    let source_client = pg::connect(&source, Side::Source, "sequences").await?;
    let target_client = pg::connect(&target, Side::Target, "sequences").await?;
    let seqs = catalog::read_sequences(&source_client, &filters).await?;
    sequences::set_on_target(&target_client, &seqs, args.offset).await?;
    if let Some(state) = &state {
        state.record_sequence_offset(args.offset)?;
    }
    println!(
        "set {} sequences on the target (offset {})",
        seqs.len(),
        args.offset
    );
    Ok(())
}

pub async fn roles(args: CopyRolesArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let source_client = pg::connect(&source, Side::Source, "roles").await?;
    let target_client = pg::connect(&target, Side::Target, "roles").await?;
    let options = crate::roles::RoleCopyOptions {
        passwords: !args.no_role_passwords,
        exclude: args.exclude_roles,
    };
    let report = crate::roles::copy_roles(&source_client, &target_client, &options).await?;
    println!("{}", report.summary());
    for (role, why) in &report.skipped {
        println!("left alone: {role} ({why})");
    }
    for setting in &report.settings_skipped {
        println!("not set (the target has no such database): {setting}");
    }
    if args.no_role_passwords {
        println!(
            "passwords were not copied (--no-role-passwords): set them with ALTER ROLE … PASSWORD on the target"
        );
    }
    Ok(())
}
