//! A walsender connection (`replication=database`) spoken directly with postgres-protocol's
//! message codecs: TCP or Unix socket, TLS negotiated by sslmode with the same rustls
//! configuration as the normal connections, cleartext / MD5 / SCRAM-SHA-256 authentication,
//! simple queries, and the CopyBoth sub-protocol of START_REPLICATION.
//!
//! tokio-postgres has no replication mode, hence this small client.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::conninfo::ConnInfo;
use crate::errors::Disconnected;
pub use crate::errors::ServerError;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What one backend message is, for the few that matter here (CopyBothResponse is not in
/// postgres-protocol's enum, so framing is done here and the rest delegated).
enum Incoming {
    CopyBoth,
    Message(backend::Message),
}

/// How long a paced read waits for a full [`PACED_LOWAT`] before taking what has come.
const PACE: std::time::Duration = std::time::Duration::from_millis(2);
/// The bytes a paced read waits for (`SO_RCVLOWAT`).
const PACED_LOWAT: libc::c_int = 64 * 1024;

/// One open walsender session.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// The TCP socket under `io` (none for a Unix socket): streamed reads are paced on it.
    tcp_fd: Option<std::os::fd::RawFd>,
    /// Streaming has started: reads are paced (see `read`).
    paced: bool,
    /// The socket's `SO_RCVLOWAT` is [`PACED_LOWAT`] (else 1, the default).
    lowat_raised: bool,
    /// The server's `server_version` text ("12.22"), from ParameterStatus; read with
    /// [`crate::pg::ServerVersion::parse`].
    pub server_version: String,
}

/// Rows of a simple query, every value as text.
pub type TextRows = Vec<Vec<Option<String>>>;

/// Output settings and timeouts pinned on the walsender session (invariant 5). Sent in the
/// startup packet, which overrides what `ALTER DATABASE` / `ALTER ROLE … SET` give the
/// session: the decoded values are produced in these styles, and apply parses them in the
/// same ones (`pg::connect` pins the normal sessions alike). The timeouts keep the
/// snapshot-holding session alive through a long copy.
const PINNED_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "3"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
];

impl ReplicationConnection {
    /// Connects and authenticates with `replication=database`.
    pub async fn connect(info: &ConnInfo) -> Result<Self> {
        let connecting = Self::connect_inner(info);
        match info.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, connecting).await.map_err(|_| {
                anyhow::Error::new(Disconnected(format!(
                    "cannot open a replication connection to the source at {}: no answer within connect_timeout ({} s)",
                    info.endpoint(),
                    limit.as_secs()
                )))
            })?,
            None => connecting.await,
        }
    }

    async fn connect_inner(info: &ConnInfo) -> Result<Self> {
        let endpoint = info.endpoint();
        let mut tcp_fd = None;
        let mut io: Box<dyn Io> = if info.uses_unix_socket() {
            // A failed connect may be a restarting server: Disconnected lets a receiver that
            // was streaming retry it (one that never streamed stops at once).
            Box::new(tokio::net::UnixStream::connect(&endpoint).await.map_err(|e| {
                Disconnected(format!("cannot open a replication connection to the source at {endpoint}: {e}. Is PostgreSQL running there?"))
            })?)
        } else {
            let tcp = tokio::net::TcpStream::connect((info.host.as_str(), info.port))
                .await
                .map_err(|e| {
                    Disconnected(format!("cannot open a replication connection to the source at {endpoint}: {e}. Is PostgreSQL running there and listening on that address?"))
                })?;
            tcp.set_nodelay(true)?;
            tcp_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&tcp));
            if info.wants_tls() {
                negotiate_tls(tcp, info).await?
            } else {
                Box::new(tcp)
            }
        };
        let mut write_buf = BytesMut::new();
        let params = [
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("replication", "database"),
            ("application_name", "pgtide"),
            ("client_encoding", "UTF8"),
        ]
        .into_iter()
        .chain(PINNED_SETTINGS.iter().copied());
        frontend::startup_message(params, &mut write_buf)?;
        io.write_all(&write_buf).await?;
        write_buf.clear();
        let mut conn = ReplicationConnection {
            io,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf,
            tcp_fd,
            paced: false,
            lowat_raised: false,
            server_version: String::new(),
        };
        conn.authenticate(info).await?;
        // Not a startup parameter: servers before 14 would refuse the unknown name.
        conn.simple_query(
            "SELECT set_config('idle_session_timeout', '0', false) WHERE current_setting('server_version_num')::int >= 140000",
        )
        .await
        .context("cannot set up the replication session on the source")?;
        Ok(conn)
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<()> {
        let password = || {
            info.password_bytes().ok_or_else(|| {
                anyhow!(
                    "cannot log in to the source server at {} as user \"{}\": the server asks for a password and none was found. Put it in the connection string, PGPASSWORD or ~/.pgpass (mode 0600).",
                    info.endpoint(),
                    info.user
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read().await? {
                Incoming::Message(backend::Message::AuthenticationOk) => {}
                Incoming::Message(backend::Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(password()?, &mut self.write_buf)?;
                    self.flush().await?;
                }
                Incoming::Message(backend::Message::AuthenticationMd5Password(body)) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        info.user.as_bytes(),
                        password()?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Incoming::Message(backend::Message::AuthenticationSasl(body)) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        bail!(
                            "the source offers no SASL mechanism pgtide supports (SCRAM-SHA-256)"
                        );
                    }
                    let client = ScramSha256::new(password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        client.message(),
                        &mut self.write_buf,
                    )?;
                    self.flush().await?;
                    scram = Some(client);
                }
                Incoming::Message(backend::Message::AuthenticationSaslContinue(body)) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("unexpected SASL continue from the source"))?;
                    client
                        .update(body.data())
                        .context("SCRAM exchange with the source failed")?;
                    frontend::sasl_response(client.message(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Incoming::Message(backend::Message::AuthenticationSaslFinal(body)) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("unexpected SASL final from the source"))?;
                    client.finish(body.data()).context(
                        "the source's SCRAM signature is invalid: is this the server you meant?",
                    )?;
                }
                Incoming::Message(backend::Message::ParameterStatus(body)) => {
                    if body.name()? == "server_version" {
                        self.server_version = body.value()?.to_string();
                    }
                }
                Incoming::Message(backend::Message::BackendKeyData(_)) => {}
                Incoming::Message(backend::Message::NoticeResponse(_)) => {}
                Incoming::Message(backend::Message::ReadyForQuery(_)) => return Ok(()),
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    let err = server_error(&body)?;
                    return Err(explain_login_error(info, err));
                }
                Incoming::Message(_) | Incoming::CopyBoth => {
                    bail!("unexpected message from the source during authentication")
                }
            }
        }
    }

    async fn flush(&mut self) -> Result<()> {
        self.io.write_all(&self.write_buf).await?;
        self.io.flush().await?;
        self.write_buf.clear();
        Ok(())
    }

    /// Reads one backend message.
    async fn read(&mut self) -> Result<Incoming> {
        loop {
            if self.read_buf.len() >= 5 {
                let tag = self.read_buf[0];
                let len = u32::from_be_bytes([
                    self.read_buf[1],
                    self.read_buf[2],
                    self.read_buf[3],
                    self.read_buf[4],
                ]) as usize;
                if self.read_buf.len() > len {
                    if tag == b'W' {
                        self.read_buf.advance(len + 1);
                        return Ok(Incoming::CopyBoth);
                    }
                    let message = backend::Message::parse(&mut self.read_buf)?
                        .ok_or_else(|| anyhow!("incomplete message from the source"))?;
                    return Ok(Incoming::Message(message));
                }
                self.read_buf.reserve(len + 1 - self.read_buf.len());
            } else {
                self.read_buf.reserve(4096);
            }
            let n = self
                .read_some()
                .await
                .context("the replication connection to the source failed")?;
            if n == 0 {
                return Err(
                    Disconnected("the source closed the replication connection".into()).into(),
                );
            }
        }
    }

    /// Reads what the socket has into `read_buf`. While streaming over TCP, the read is
    /// paced: the kernel wakes it only once [`PACED_LOWAT`] bytes are queued (`SO_RCVLOWAT`),
    /// or after [`PACE`], when it takes whatever has come. Woken for every message instead,
    /// the reader made the source's walsender pay a wake-up per message sent: 1.7× the
    /// walsender CPU of a native subscription in the 4-client apply benchmark (issue 14).
    /// Lowering the mark makes the kernel report the socket readable at once when data is
    /// queued, so a quiet stream waits at most `PACE` more.
    async fn read_some(&mut self) -> std::io::Result<usize> {
        let Some(fd) = self.tcp_fd.filter(|_| self.paced) else {
            return self.io.read_buf(&mut self.read_buf).await;
        };
        if !self.lowat_raised {
            set_rcvlowat(fd, PACED_LOWAT)?;
            self.lowat_raised = true;
        }
        let read = self.io.read_buf(&mut self.read_buf);
        tokio::pin!(read);
        tokio::select! {
            biased;
            n = &mut read => n,
            _ = tokio::time::sleep(PACE) => {
                set_rcvlowat(fd, 1)?;
                self.lowat_raised = false;
                read.await
            }
        }
    }

    /// Runs a simple query (replication commands are simple queries) and returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<TextRows> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read().await? {
                Incoming::Message(backend::Message::DataRow(body)) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = ranges.next()? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    error = Some(server_error(&body)?)
                }
                Incoming::Message(backend::Message::ReadyForQuery(_)) => break,
                Incoming::CopyBoth => bail!("unexpected CopyBothResponse to \"{sql}\""),
                Incoming::Message(_) => {}
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(rows),
        }
    }

    /// Sends START_REPLICATION (or any command answered by CopyBothResponse).
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<()> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            match self.read().await? {
                Incoming::CopyBoth => {
                    self.paced = kernel_wakes_on_lowered_lowat();
                    return Ok(());
                }
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    let err = server_error(&body)?;
                    // Drain to ReadyForQuery so the connection stays usable.
                    while !matches!(
                        self.read().await?,
                        Incoming::Message(backend::Message::ReadyForQuery(_))
                    ) {}
                    return Err(err.into());
                }
                Incoming::Message(backend::Message::NoticeResponse(_)) => {}
                Incoming::Message(_) => {}
            }
        }
    }

    /// The next CopyData payload of the stream; None when the server ended the copy.
    pub async fn recv_copy_data(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.read().await? {
                Incoming::Message(backend::Message::CopyData(body)) => {
                    return Ok(Some(body.into_bytes()));
                }
                Incoming::Message(backend::Message::CopyDone) => return Ok(None),
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    return Err(server_error(&body)?.into());
                }
                Incoming::Message(backend::Message::NoticeResponse(_)) => {}
                Incoming::Message(backend::Message::ParameterStatus(_)) => {}
                Incoming::Message(_) | Incoming::CopyBoth => {
                    bail!("unexpected message in the replication stream")
                }
            }
        }
    }

    /// Sends one CopyData message (a standby status update).
    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<()> {
        frontend::CopyData::new(payload)?.write(&mut self.write_buf);
        self.flush().await
    }

    /// Ends the CopyBoth exchange from our side and waits for the server to finish it.
    pub async fn finish_copy(&mut self) -> Result<()> {
        frontend::copy_done(&mut self.write_buf);
        self.flush().await?;
        loop {
            match self.read().await? {
                Incoming::Message(backend::Message::ReadyForQuery(_)) => return Ok(()),
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    return Err(server_error(&body)?.into());
                }
                _ => {}
            }
        }
    }

    /// Says goodbye; errors are irrelevant at that point.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
    }
}

async fn negotiate_tls(mut tcp: tokio::net::TcpStream, info: &ConnInfo) -> Result<Box<dyn Io>> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        if info.requires_tls() {
            bail!(
                "the source at {} does not accept TLS but sslmode requires it: enable ssl on the server or lower sslmode",
                info.endpoint()
            );
        }
        return Ok(Box::new(tcp));
    }
    let config = Arc::new(info.rustls_config()?);
    let name = rustls::pki_types::ServerName::try_from(info.host.clone())
        .map_err(|_| anyhow!("\"{}\" is not a valid TLS server name", info.host))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            anyhow!(
                "TLS failed on the replication connection to the source at {}: {e}. Check sslmode and sslrootcert (the CA that signed the server certificate, and for verify-full the host name it names).",
                info.endpoint()
            )
        })?;
    Ok(Box::new(stream))
}

fn server_error(body: &backend::ErrorResponseBody) -> Result<ServerError> {
    let mut fields = body.fields();
    let mut err = ServerError {
        code: String::new(),
        message: String::new(),
        detail: None,
    };
    while let Some(f) = fields.next()? {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => err.code = value,
            b'M' => err.message = value,
            b'D' => err.detail = Some(value),
            _ => {}
        }
    }
    Ok(err)
}

fn explain_login_error(info: &ConnInfo, err: ServerError) -> anyhow::Error {
    let endpoint = info.endpoint();
    match err.code.as_str() {
        "28P01" | "28000" if err.message.contains("replication") => anyhow!(
            "the source at {endpoint} refuses replication connections for user \"{}\": {}. Grant it with ALTER ROLE {} REPLICATION and allow it in pg_hba.conf.",
            info.user,
            err.message,
            info.user
        ),
        "28P01" | "28000" => anyhow!(
            "cannot log in to the source server at {endpoint} as user \"{}\": {}. Check the password (in the connection string, PGPASSWORD or ~/.pgpass) and the server's pg_hba.conf.",
            info.user,
            err.message
        ),
        "3D000" => anyhow!(
            "the source database \"{}\" does not exist on {endpoint}: {}. Fix the database name in the connection string.",
            info.dbname,
            err.message
        ),
        "53300" => anyhow!(
            "the source at {endpoint} has no free connection or WAL sender: {}. Raise max_wal_senders / max_connections or stop another consumer.",
            err.message
        ),
        // Kept in the chain: its SQLSTATE (57P03 cannot connect now…) is what the retry loop
        // classifies.
        _ => anyhow::Error::new(err).context(format!(
            "cannot open a replication connection to the source at {endpoint}"
        )),
    }
}

/// Sets a socket's `SO_RCVLOWAT`: the bytes that must be queued before it reads as readable.
fn set_rcvlowat(fd: std::os::fd::RawFd, bytes: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `fd` is the open socket owned by this connection's stream, and the option
    // value is a c_int that lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the kernel reports a socket readable as soon as its `SO_RCVLOWAT` is lowered below
/// what is queued (Linux 4.18 and later): on an older one, a paced read could wait for the
/// next packet, seconds on a quiet stream, so reads are not paced there.
fn kernel_wakes_on_lowered_lowat() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|release| linux_release(&release))
        .is_some_and(|version| version >= (4, 18))
}

/// The major and minor version of a Linux release string ("6.1.0-18-amd64" → (6, 1)).
fn linux_release(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.trim().split(['.', '-']);
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::linux_release;

    #[test]
    fn linux_releases_are_read() {
        assert_eq!(linux_release("6.18.44-fc-v782\n"), Some((6, 18)));
        assert_eq!(linux_release("4.15.0-213-generic"), Some((4, 15)));
        assert_eq!(linux_release("3.10.0-1160.el7.x86_64"), Some((3, 10)));
        assert_eq!(linux_release("garbage"), None);
    }
}
