//! The one error classification that every retry loop asks (DESIGN.md: "One error
//! classification"): the receiver's reconnect loop, apply's reconnect loop in follow, and
//! apply's origin setup. Only what is known to be transient is retried: a lost connection or
//! network I/O error, a server shutting down or starting up (57P01/57P02/57P03), connection
//! exceptions (class 08), an object still held by a session that is exiting (55006), and, where
//! the caller re-runs the statements, serialization failures and deadlocks (40001/40P01).
//! Everything else (decode errors, schema drift, bad input, permission denied, an unknown
//! SQLSTATE, an unknown error) stops with the reason and the fix.
//!
//! Errors are classified by their types and SQLSTATEs along the anyhow chain, never by their
//! message text.

/// A server error with its SQLSTATE, so callers can branch on it (slot busy, missing…).
#[derive(Debug, thiserror::Error)]
#[error("{message} (SQLSTATE {code}){}", detail.as_ref().map(|d| format!("; detail: {d}")).unwrap_or_default())]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

/// The target connection was lost (a restart, the network, a terminated session): follow
/// reconnects and resumes from the origin, which says exactly where the target is.
#[derive(Debug, thiserror::Error)]
#[error("lost the connection to the target: {0}")]
pub struct TargetLost(pub String);

/// What a retry loop may do with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The connection is gone or the server is restarting: reconnect (with backoff) and resume
    /// from the last durable position.
    Transient,
    /// The object (a replication slot or origin) is still held by a session that is exiting,
    /// such as our own previous connection: wait a bounded time for the server to release it.
    Busy,
    /// A serialization failure or deadlock: re-running the same statements may succeed, so a
    /// caller that re-runs them may retry; any other caller stops.
    Conflict,
    /// Retrying cannot help: stop and say why.
    Stop,
}

/// The connection to a server was lost or could not be opened (EOF, reset, refused, timeout):
/// a reconnect may succeed. Callers whose I/O error would otherwise lose its type wrap it in
/// this.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Disconnected(pub String);

/// An error that no retry can fix (bad input, a decode error, the wrong server): it stops even
/// if an error further down its chain looks transient.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// An error already classified where its original type was at hand (a tokio-postgres error
/// turned into text with its context): the class travels with the text.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Classified {
    pub class: ErrorClass,
    /// The server's SQLSTATE, when it sent one.
    pub sqlstate: Option<String>,
    pub message: String,
}

impl Classified {
    /// A tokio-postgres error told as `message`, keeping its class and SQLSTATE.
    pub fn pg(e: &tokio_postgres::Error, class: ErrorClass, message: String) -> Self {
        Classified {
            class,
            sqlstate: e.code().map(|c| c.code().to_string()),
            message,
        }
    }
}

/// Classifies a SQLSTATE. An unknown one stops.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        // admin_shutdown, crash_shutdown, cannot_connect_now
        "57P01" | "57P02" | "57P03" => ErrorClass::Transient,
        // protocol_violation (a message over the server's limit, say) happens again on every
        // retry: not a lost connection.
        "08P01" => ErrorClass::Stop,
        c if c.starts_with("08") => ErrorClass::Transient,
        // object_in_use: "replication slot … is active for PID …", "replication origin … is
        // already active for PID …" while the previous session is still exiting.
        "55006" => ErrorClass::Busy,
        // serialization_failure, deadlock_detected
        "40001" | "40P01" => ErrorClass::Conflict,
        _ => ErrorClass::Stop,
    }
}

/// Classifies an I/O error by its kind: the network's failures are transient, the local
/// disk's (full, permission denied) and malformed data are not.
pub fn classify_io(e: &std::io::Error) -> ErrorClass {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
        | UnexpectedEof | TimedOut | Interrupted | HostUnreachable | NetworkUnreachable
        | NetworkDown | AddrNotAvailable => ErrorClass::Transient,
        _ => ErrorClass::Stop,
    }
}

/// Classifies a tokio-postgres error: by SQLSTATE when the server sent one, otherwise a closed
/// connection or a network I/O error is transient and anything else (a conversion error…)
/// stops.
pub fn classify_pg(e: &tokio_postgres::Error) -> ErrorClass {
    if let Some(db) = e.as_db_error() {
        return classify_sqlstate(db.code().code());
    }
    if e.is_closed() {
        return ErrorClass::Transient;
    }
    match std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>()) {
        Some(io) => classify_io(io),
        None => ErrorClass::Stop,
    }
}

/// Classifies a failure to open a connection: as [`classify_pg`], and a missing Unix socket
/// (removed while its server restarts) is transient too.
pub fn classify_connect(e: &tokio_postgres::Error) -> ErrorClass {
    let missing_socket = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound);
    if missing_socket {
        ErrorClass::Transient
    } else {
        classify_pg(e)
    }
}

/// Classifies one error of a chain; None when its type says nothing.
fn classify_one(e: &(dyn std::error::Error + 'static)) -> Option<ErrorClass> {
    if e.is::<Fatal>() {
        Some(ErrorClass::Stop)
    } else if e.is::<Disconnected>() || e.is::<TargetLost>() {
        Some(ErrorClass::Transient)
    } else if let Some(c) = e.downcast_ref::<Classified>() {
        Some(c.class)
    } else if let Some(s) = e.downcast_ref::<ServerError>() {
        Some(classify_sqlstate(&s.code))
    } else if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
        Some(classify_pg(pg))
    } else {
        e.downcast_ref::<std::io::Error>().map(classify_io)
    }
}

/// Classifies an error by the types along its chain: the outermost error whose type says
/// something decides, except that a `Fatal` anywhere stops. An error no type speaks for stops.
pub fn classify(e: &anyhow::Error) -> ErrorClass {
    // `downcast_ref` also finds a `Fatal` attached as context.
    if e.downcast_ref::<Fatal>().is_some() || e.chain().any(|c| c.is::<Fatal>()) {
        return ErrorClass::Stop;
    }
    e.chain().find_map(classify_one).unwrap_or(ErrorClass::Stop)
}

/// The SQLSTATE along an error's chain, if a server sent one.
pub fn sqlstate(e: &anyhow::Error) -> Option<String> {
    e.chain().find_map(|c| {
        c.downcast_ref::<ServerError>()
            .map(|s| s.code.clone())
            .or_else(|| {
                c.downcast_ref::<Classified>()
                    .and_then(|k| k.sqlstate.clone())
            })
            .or_else(|| {
                c.downcast_ref::<tokio_postgres::Error>()
                    .and_then(|p| p.code())
                    .map(|code| code.code().to_string())
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context, anyhow};
    use std::io;

    fn server(code: &str) -> anyhow::Error {
        anyhow::Error::new(ServerError {
            code: code.into(),
            message: "whatever the server says".into(),
            detail: None,
        })
    }

    #[test]
    fn known_transient_sqlstates_are_retried() {
        for code in [
            "57P01", "57P02", "57P03", "08006", "08001", "08003", "08000",
        ] {
            assert_eq!(classify(&server(code)), ErrorClass::Transient, "{code}");
        }
    }

    #[test]
    fn everything_else_stops() {
        // protocol violation, undefined object, auth, missing database, permission denied,
        // bad parameter, syntax, not-null, unique, undefined column, an unknown code
        for code in [
            "08P01", "42704", "28P01", "28000", "3D000", "42501", "22023", "42601", "23502",
            "23505", "42703", "53300", "XX000", "ZZ999", "",
        ] {
            assert_eq!(classify(&server(code)), ErrorClass::Stop, "{code}");
        }
    }

    #[test]
    fn busy_and_conflicts_are_their_own_classes() {
        assert_eq!(classify(&server("55006")), ErrorClass::Busy);
        assert_eq!(classify(&server("40001")), ErrorClass::Conflict);
        assert_eq!(classify(&server("40P01")), ErrorClass::Conflict);
    }

    #[test]
    fn the_message_text_is_never_read() {
        let e = anyhow::Error::new(ServerError {
            code: "XX000".into(),
            message: "terminating connection due to administrator command: already active, cannot connect now".into(),
            detail: None,
        });
        assert_eq!(classify(&e), ErrorClass::Stop);
        assert_eq!(
            classify(&anyhow!("the connection was lost: reconnect")),
            ErrorClass::Stop
        );
    }

    #[test]
    fn network_io_is_transient_and_local_io_is_not() {
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::TimedOut,
        ] {
            let e = anyhow::Error::new(io::Error::from(kind)).context("reading the stream");
            assert_eq!(classify(&e), ErrorClass::Transient, "{kind:?}");
        }
        for kind in [
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidData,
            io::ErrorKind::InvalidInput,
            io::ErrorKind::StorageFull,
            io::ErrorKind::NotFound,
        ] {
            let e = anyhow::Error::new(io::Error::from(kind));
            assert_eq!(classify(&e), ErrorClass::Stop, "{kind:?}");
        }
    }

    #[test]
    fn typed_markers_decide() {
        let lost: Result<(), _> = Err(Disconnected("the source closed the connection".into()));
        let e = lost.context("streaming").unwrap_err();
        assert_eq!(classify(&e), ErrorClass::Transient);
        assert_eq!(
            classify(&anyhow::Error::new(TargetLost("x".into()))),
            ErrorClass::Transient
        );
        // A fatal error stops even when an I/O error lies under it, as context or as source.
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::ConnectionReset))
            .context(Fatal("decoding the stream".into()))
            .context("receiving");
        assert_eq!(classify(&e), ErrorClass::Stop);
        let e = anyhow::Error::new(Fatal("bad input".into())).context("receiving");
        assert_eq!(classify(&e), ErrorClass::Stop);
    }

    #[test]
    fn untyped_errors_stop() {
        assert_eq!(
            classify(&anyhow!("pgoutput message truncated")),
            ErrorClass::Stop
        );
    }

    #[test]
    fn the_sqlstate_is_found_along_the_chain() {
        let e = server("55006").context("starting the stream");
        assert_eq!(sqlstate(&e).as_deref(), Some("55006"));
        assert_eq!(sqlstate(&anyhow!("no server")), None);
        let told = anyhow::Error::new(Classified {
            class: ErrorClass::Stop,
            sqlstate: Some("23502".into()),
            message: "cannot apply an insert".into(),
        })
        .context("apply");
        assert_eq!(sqlstate(&told).as_deref(), Some("23502"));
        assert_eq!(classify(&told), ErrorClass::Stop);
        let lost = anyhow::Error::new(Classified {
            class: ErrorClass::Transient,
            sqlstate: None,
            message: "cannot connect".into(),
        });
        assert_eq!(classify(&lost), ErrorClass::Transient);
    }
}
