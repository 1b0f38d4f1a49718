//! The server features that depend on its major version (invariant 11: sources 12–18 all
//! work, each lacking feature has its fallback). Every version test in pgtide asks one of these
//! methods, so the reason for a version split is written once, here.

use anyhow::{Context, Result, anyhow};
use tokio_postgres::Client;

/// A server's version, from `server_version_num` (e.g. 120022 for 12.22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    num: i32,
}

impl ServerVersion {
    /// From `server_version_num`.
    pub fn from_num(num: i32) -> Self {
        ServerVersion { num }
    }

    /// From the `server_version` text a server reports at login ("12.22", "18beta1",
    /// "13.4 (Debian 13.4-1)"): its leading major number.
    pub fn parse(text: &str) -> Result<Self> {
        let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
        let major: i32 = digits
            .parse()
            .map_err(|_| anyhow!("cannot read the server version \"{text}\""))?;
        Ok(ServerVersion {
            num: major * 10_000,
        })
    }

    /// Asks the server over a normal connection.
    pub async fn of(client: &Client) -> Result<Self> {
        let num: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .context("cannot read the server version")?
            .get(0);
        Ok(Self::from_num(num))
    }

    /// The major version (12, 13, …).
    pub fn major(self) -> u32 {
        (self.num / 10_000).max(0) as u32
    }

    /// A publication can name a partitioned table (13+); before, only its leaf partitions.
    pub fn can_publish_partitioned(self) -> bool {
        self.major() >= 13
    }

    /// pgoutput sends logical messages (its `messages` option, 14+).
    pub fn has_pgoutput_messages(self) -> bool {
        self.major() >= 14
    }

    /// pgoutput streams large transactions before their commit (protocol 2, `streaming`
    /// option, 14+).
    pub fn has_pgoutput_streaming(self) -> bool {
        self.major() >= 14
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_by_major() {
        let v12 = ServerVersion::parse("12.22").unwrap();
        let v13 = ServerVersion::parse("13.4 (Debian 13.4-1)").unwrap();
        let v14 = ServerVersion::from_num(140_011);
        let v18 = ServerVersion::parse("18beta1").unwrap();
        assert_eq!((v12.major(), v13.major(), v18.major()), (12, 13, 18));
        assert!(!v12.can_publish_partitioned() && v13.can_publish_partitioned());
        assert!(!v13.has_pgoutput_messages() && v14.has_pgoutput_messages());
        assert!(v18.has_pgoutput_messages() && v18.can_publish_partitioned());
        assert!(ServerVersion::parse("x").is_err());
    }
}
