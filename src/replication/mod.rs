//! The change stream's source side: our walsender client (`conn`), what is published and the
//! setup of the publication and slot (`setup`, over `slot`'s catalog and DDL), the endpos marker's one rule (`marker`), the receive loop that spools the stream and sends feedback (`stream`), and what
//! wal2json cannot carry exactly (`wal2json`).

pub mod conn;
pub mod ddl_capture;
pub mod marker;
pub mod setup;
pub mod slot;
pub mod stream;
mod streamed;
pub mod wal2json;

/// The logical decoding output plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugin {
    Pgoutput,
    Wal2json,
}

impl Plugin {
    pub fn name(self) -> &'static str {
        match self {
            Plugin::Pgoutput => "pgoutput",
            Plugin::Wal2json => "wal2json",
        }
    }

    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "pgoutput" => Ok(Plugin::Pgoutput),
            "wal2json" => Ok(Plugin::Wal2json),
            other => anyhow::bail!("unknown plugin \"{other}\": use pgoutput or wal2json"),
        }
    }
}
