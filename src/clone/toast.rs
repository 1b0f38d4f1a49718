//! How the copy compresses TOASTed values on the target (`--toast-compression`). Measured on
//! TOAST-heavy data (issue 14), the target's compression dominated the copy of a wide table:
//! pglz, PostgreSQL's default, compresses several times slower than lz4. The method is a
//! property of each stored value, invisible to SQL (every reader decompresses either), so the
//! copy writes lz4 where the target has it (14+, built with lz4), and the target's own default
//! otherwise. Only the copy's sessions are changed: no column's attribute, nothing in the
//! schema, and values written later (by apply or the application) follow the target's setting.

use anyhow::{Result, bail};
use tokio_postgres::Client;

/// The operator's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToastCompression {
    /// lz4 (the default where the target supports it).
    Lz4,
    /// pglz, PostgreSQL's historical method.
    Pglz,
    /// The target's `default_toast_compression`, untouched.
    Keep,
}

impl ToastCompression {
    pub fn name(self) -> &'static str {
        match self {
            ToastCompression::Lz4 => "lz4",
            ToastCompression::Pglz => "pglz",
            ToastCompression::Keep => "keep",
        }
    }
}

/// The `SET` the copy sessions run on the target, if any. `None` asked means the default:
/// lz4 when the target offers it, else the target's own default (said in the log). An
/// explicit method the target lacks is refused with the fix.
pub async fn copy_session_setting(
    target: &Client,
    asked: Option<ToastCompression>,
) -> Result<Option<String>> {
    let choice = asked.unwrap_or(ToastCompression::Lz4);
    if choice == ToastCompression::Keep {
        return Ok(None);
    }
    // default_toast_compression exists from 14 on; its enum values list lz4 only when the
    // server was built with it.
    let offered: Option<Vec<String>> = target
        .query_opt(
            "SELECT enumvals::text[] FROM pg_catalog.pg_settings WHERE name = 'default_toast_compression'",
            &[],
        )
        .await?
        .map(|row| row.get(0));
    let available = offered
        .as_deref()
        .is_some_and(|v| v.iter().any(|m| m == choice.name()));
    match (available, asked) {
        (true, _) => Ok(Some(format!(
            "SET default_toast_compression = {}",
            choice.name()
        ))),
        (false, None) => {
            tracing::info!(
                "the target offers no lz4 TOAST compression (before 14, or built without lz4): the copy uses its default"
            );
            Ok(None)
        }
        (false, Some(_)) => bail!(
            "--toast-compression {} is not available on the target ({}): use --toast-compression keep",
            choice.name(),
            match offered {
                None => "default_toast_compression exists from PostgreSQL 14 on".to_string(),
                Some(v) => format!("it offers {}", v.join(", ")),
            }
        ),
    }
}
