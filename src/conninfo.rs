//! Connection strings: the one place that parses libpq URIs and `key=value` strings, applies the
//! libpq environment fallbacks (`PGHOST`, `PGPASSWORD`, `~/.pgpass`…), builds the TLS
//! configuration for each `sslmode`, and redacts passwords for any output.
//!
//! Invariant 7 (passwords never appear in logs, errors, status output or child argv) is enforced
//! here: `ConnInfo` has no `Debug`/`Display` that shows the password, child processes get a
//! conninfo string without it (`libpq_conninfo_without_password`) and the password through
//! their environment only.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error as TlsError, SignatureScheme};

/// What `redacted()` writes where a password was.
const REDACTED: &str = "****";

/// libpq's sslmode values; verify-ca and verify-full are enforced by our rustls verifiers
/// because tokio-postgres only knows disable/prefer/require.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!(
                "invalid sslmode \"{other}\": use one of disable, allow, prefer, require, verify-ca, verify-full"
            ),
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A parsed, environment-completed connection target. The password is private so that it can
/// only leave this module through the two sanctioned paths (tokio-postgres config, child env).
#[derive(Clone)]
pub struct ConnInfo {
    /// Host name, IP address, or a Unix socket directory (starts with '/').
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    password: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
    pub options: Option<String>,
}

const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "application_name",
    "fallback_application_name",
    "options",
    "passfile",
];

impl ConnInfo {
    /// Parses a libpq URI (`postgres://…`) or `key=value` string and completes it from the
    /// environment the way libpq does, so that users can paste what psql accepts.
    pub fn parse(input: &str) -> Result<Self> {
        let input = input.trim();
        let params = if input.starts_with("postgres://") || input.starts_with("postgresql://") {
            parse_uri(input)?
        } else if input.is_empty() || input.contains('=') {
            parse_key_values(input)?
        } else {
            bail!(
                "cannot parse connection string \"{}\": expected a URI such as postgres://user@host:5432/dbname or key=value pairs such as \"host=… dbname=…\"",
                redact_free_text(input)
            )
        };
        for key in params.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                bail!(
                    "invalid connection option \"{key}\" in connection string; known options: {}",
                    KNOWN_KEYS.join(", ")
                );
            }
        }
        Self::from_params(params, &|name| std::env::var(name).ok())
    }

    fn from_params(
        mut params: BTreeMap<String, String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let mut take = |key: &str, env_name: &str| -> Option<String> {
            params
                .remove(key)
                .filter(|v| !v.is_empty())
                .or_else(|| env(env_name).filter(|v| !v.is_empty()))
        };
        let host = take("host", "PGHOST")
            .or_else(|| take("hostaddr", "PGHOSTADDR"))
            .unwrap_or_else(|| "/var/run/postgresql".to_string());
        let port = match take("port", "PGPORT") {
            Some(p) => p.parse::<u16>().map_err(|_| {
                anyhow!("invalid port \"{p}\" in connection string: expected a number such as 5432")
            })?,
            None => 5432,
        };
        let user = take("user", "PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".to_string());
        let dbname = take("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());
        let sslmode = match take("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        let sslrootcert = take("sslrootcert", "PGSSLROOTCERT").map(PathBuf::from);
        let sslcert = take("sslcert", "PGSSLCERT").map(PathBuf::from);
        let sslkey = take("sslkey", "PGSSLKEY").map(PathBuf::from);
        let connect_timeout = match take("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => {
                let secs: u64 = t.parse().map_err(|_| {
                    anyhow!("invalid connect_timeout \"{t}\": expected a number of seconds")
                })?;
                // libpq treats values below 2 as 2 seconds; 0 means wait forever.
                (secs > 0).then(|| Duration::from_secs(secs.max(2)))
            }
            None => None,
        };
        let options = take("options", "PGOPTIONS");
        let passfile = take("passfile", "PGPASSFILE");
        let explicit_password = params.remove("password").filter(|p| !p.is_empty());
        let mut info = ConnInfo {
            host,
            port,
            user,
            dbname,
            password: None,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            connect_timeout,
            options,
        };
        info.password = explicit_password
            .or_else(|| env("PGPASSWORD").filter(|p| !p.is_empty()))
            .or_else(|| {
                let path = passfile
                    .map(PathBuf::from)
                    .or_else(|| env("HOME").map(|home| Path::new(&home).join(".pgpass")))?;
                lookup_pgpass(&path, &info)
            });
        Ok(info)
    }

    fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// "host:port" or the socket path, for error messages.
    pub fn endpoint(&self) -> String {
        if self.is_unix_socket() {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A URI safe to print: the password, if any, is shown as `****`.
    /// Parses a connection string recorded with `redacted()`: the password placeholder is
    /// dropped, so the password comes from PGPASSWORD or ~/.pgpass as for any URI without one.
    pub fn parse_recorded(recorded: &str) -> Result<Self> {
        Self::parse(&recorded.replacen(&format!(":{REDACTED}@"), "@", 1))
    }

    pub fn redacted(&self) -> String {
        let password = if self.password.is_some() {
            format!(":{REDACTED}")
        } else {
            String::new()
        };
        let host = if self.is_unix_socket() {
            String::new()
        } else {
            self.host.clone()
        };
        let mut uri = format!(
            "postgres://{}{}@{}:{}/{}",
            self.user, password, host, self.port, self.dbname
        );
        let mut query = Vec::new();
        if self.is_unix_socket() {
            query.push(format!("host={}", self.host));
        }
        if self.sslmode != SslMode::Prefer {
            query.push(format!("sslmode={}", self.sslmode.as_str()));
        }
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(&query.join("&"));
        }
        uri
    }

    /// A libpq key=value conninfo for pg_dump / pg_restore, without the password: children get
    /// it through `child_env` so that it never shows in `ps`.
    pub fn libpq_conninfo_without_password(&self) -> String {
        let mut parts = vec![
            format!("host={}", quote_conninfo_value(&self.host)),
            format!("port={}", self.port),
            format!("user={}", quote_conninfo_value(&self.user)),
            format!("dbname={}", quote_conninfo_value(&self.dbname)),
            format!("sslmode={}", self.sslmode.as_str()),
            "application_name=pgtide".to_string(),
        ];
        for (key, value) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
        ] {
            if let Some(path) = value {
                parts.push(format!(
                    "{key}={}",
                    quote_conninfo_value(&path.to_string_lossy())
                ));
            }
        }
        if let Some(t) = self.connect_timeout {
            parts.push(format!("connect_timeout={}", t.as_secs()));
        }
        if let Some(o) = &self.options {
            parts.push(format!("options={}", quote_conninfo_value(o)));
        }
        parts.join(" ")
    }

    /// Environment for a child process that connects with `libpq_conninfo_without_password`.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        match &self.password {
            Some(p) => vec![("PGPASSWORD", p.clone())],
            None => Vec::new(),
        }
    }

    /// The tokio-postgres configuration; TLS is decided by `tls_connector`.
    pub fn tokio_config(&self, application_name: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        if self.is_unix_socket() {
            config.host_path(&self.host);
        } else {
            config.host(&self.host);
        }
        config
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(application_name)
            .ssl_mode(match self.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    tokio_postgres::config::SslMode::Require
                }
            });
        if let Some(p) = &self.password {
            config.password(p.as_bytes());
        }
        if let Some(t) = self.connect_timeout {
            config.connect_timeout(t);
        }
        if let Some(o) = &self.options {
            config.options(o);
        }
        config
    }

    /// The rustls connector for this sslmode: verify-full checks chain and host name,
    /// verify-ca the chain only, require/prefer accept any certificate unless a root
    /// certificate was given (libpq then verifies the chain, as with verify-ca).
    pub fn tls_connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.rustls_config()?,
        ))
    }

    /// Whether TLS is attempted at all (sslmode other than disable).
    pub fn wants_tls(&self) -> bool {
        self.sslmode != SslMode::Disable
    }

    /// Whether a server that refuses TLS must be refused too (require and stronger).
    pub fn requires_tls(&self) -> bool {
        matches!(
            self.sslmode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// Whether the host is a Unix socket directory (no TLS is negotiated there, as in libpq).
    pub fn uses_unix_socket(&self) -> bool {
        self.is_unix_socket()
    }

    /// The rustls client configuration for this sslmode, shared by the normal connections
    /// (tokio-postgres) and our replication client.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?;
        let default_root = std::env::var("HOME")
            .ok()
            .map(|h| Path::new(&h).join(".postgresql/root.crt"));
        let root_path = self.sslrootcert.clone().or_else(|| {
            default_root.filter(|p| {
                p.exists() && matches!(self.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            })
        });
        let verify = match self.sslmode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require | SslMode::Prefer | SslMode::Allow => self.sslrootcert.is_some(),
            SslMode::Disable => false,
        };
        let builder = if verify {
            let Some(root_path) = root_path else {
                bail!(
                    "sslmode={} needs a root certificate to verify the server: set sslrootcert=/path/to/root.crt in the connection string (or PGSSLROOTCERT), or put it at ~/.postgresql/root.crt",
                    self.sslmode.as_str()
                );
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(&root_path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("invalid certificate in {}", root_path.display()))?;
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .context("cannot build the TLS certificate verifier")?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainVerifier {
                    inner: webpki,
                    check_host_name: self.sslmode == SslMode::VerifyFull,
                }))
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
        };
        let config = match (&self.sslcert, &self.sslkey) {
            (Some(cert), Some(key)) => {
                let certs = read_certs(cert)?;
                let key = read_key(key)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .context("invalid client certificate or key (sslcert / sslkey)")?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => bail!("sslcert and sslkey must be given together"),
        };
        Ok(config)
    }

    /// The password for the replication client's own authentication exchange.
    pub(crate) fn password_bytes(&self) -> Option<&[u8]> {
        self.password.as_deref().map(str::as_bytes)
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces anything that looks like a password in a string we failed to parse, so that even
/// the parse error cannot leak one.
pub fn redact_free_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // URI form: scheme://user:secret@host
    if let Some(scheme_end) = text.find("://") {
        let rest = &text[scheme_end + 3..];
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                out.push_str(&text[..scheme_end + 3]);
                out.push_str(&userinfo[..colon]);
                out.push_str(":****");
                out.push_str(&rest[at..]);
                return redact_free_text_keyvalue(&out);
            }
        }
    }
    out.push_str(text);
    redact_free_text_keyvalue(&out)
}

fn redact_free_text_keyvalue(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find("password=") {
        out.push_str(&rest[..pos + "password=".len()]);
        out.push_str("****");
        let after = &rest[pos + "password=".len()..];
        let end = after
            .find(|c: char| c.is_whitespace() || c == '&')
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn quote_conninfo_value(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{escaped}'")
}

fn parse_uri(input: &str) -> Result<BTreeMap<String, String>> {
    let bad = |why: &str| {
        anyhow!(
            "invalid connection URI \"{}\": {why}; expected postgres://user:password@host:port/dbname?sslmode=…",
            redact_free_text(input)
        )
    };
    let mut params = BTreeMap::new();
    let rest = input.split_once("://").map(|x| x.1).unwrap_or_default();
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let decode = |s: &str| -> Result<String> {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| bad("percent-encoding does not decode to UTF-8"))
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            params.insert("user".into(), decode(user)?);
        }
        if let Some(p) = password {
            params.insert("password".into(), decode(p)?);
        }
    }
    if hostport.contains(',') {
        return Err(bad("multiple hosts are not supported"));
    }
    let (host, port) = if let Some(stripped) = hostport.strip_prefix('[') {
        let end = stripped
            .find(']')
            .ok_or_else(|| bad("unterminated [ in IPv6 host"))?;
        let host = &stripped[..end];
        let after = &stripped[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected text after ]")),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if !host.is_empty() {
        params.insert("host".into(), decode(host)?);
    }
    if let Some(port) = port {
        if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad(&format!("invalid port \"{port}\"")));
        }
        params.insert("port".into(), port.to_string());
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        params.insert("dbname".into(), decode(path)?);
    }
    if let Some(query) = query {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                bad(&format!(
                    "parameter \"{}\" has no value",
                    redact_free_text(pair)
                ))
            })?;
            params.insert(decode(k)?, decode(v)?);
        }
    }
    Ok(params)
}

fn parse_key_values(input: &str) -> Result<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            bail!(
                "invalid connection string: \"{key}\" is missing \"=value\"; expected key=value pairs such as \"host=localhost dbname=app\""
            );
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                bail!("invalid connection string: unterminated quoted value for \"{key}\"");
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key, value);
    }
    Ok(params)
}

/// Reads `~/.pgpass` (or PGPASSFILE) the way libpq does: `host:port:db:user:password` lines,
/// `*` wildcards, `\:` escapes, and the file ignored when group/world readable.
fn lookup_pgpass(path: &Path, info: &ConnInfo) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).ok()?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "password file {} has group or world access; ignoring it (chmod 0600 it)",
                path.display()
            );
            return None;
        }
    }
    let text = std::fs::read_to_string(path).ok()?;
    let host_for_match = if info.is_unix_socket() {
        "localhost".to_string()
    } else {
        info.host.clone()
    };
    let port = info.port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if matches(&fields[0], &host_for_match)
            && matches(&fields[1], &port)
            && matches(&fields[2], &info.dbname)
            && matches(&fields[3], &info.user)
        {
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(n), Some(field)) = (chars.next(), fields.last_mut()) {
                    field.push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            other => {
                if let Some(field) = fields.last_mut() {
                    field.push(other);
                }
            }
        }
    }
    fields
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot parse PEM certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no PEM certificate found in {}", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("cannot parse PEM key in {}", path.display()))?
        .ok_or_else(|| anyhow!("no private key found in {}", path.display()))
}

/// verify-ca / verify-full: the chain must lead to sslrootcert; the host name is checked only
/// for verify-full (libpq semantics).
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_host_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(TlsError::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(TlsError::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// sslmode=require/prefer without a root certificate: encryption without authentication, as
/// libpq does. Handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with_env(input: &str, env: &[(&str, &str)]) -> ConnInfo {
        let params = if input.starts_with("postgres") {
            parse_uri(input).unwrap()
        } else {
            parse_key_values(input).unwrap()
        };
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConnInfo::from_params(params, &|name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .unwrap()
    }

    #[test]
    fn a_recorded_uri_comes_back_without_its_placeholder() {
        let original = parse_with_env(
            "postgres://al:secret@db.example.com:6543/app?sslmode=require",
            &[],
        );
        let recorded = original.redacted();
        assert!(!recorded.contains("secret"), "{recorded}");
        let back = ConnInfo::parse_recorded(&recorded).unwrap();
        assert_eq!(
            (
                back.user.as_str(),
                back.host.as_str(),
                back.port,
                back.dbname.as_str()
            ),
            ("al", "db.example.com", 6543, "app")
        );
        assert_eq!(back.sslmode, SslMode::Require);
        assert_ne!(back.password.as_deref(), Some(REDACTED));
    }

    #[test]
    fn uri_with_everything() {
        let c = parse_with_env(
            "postgresql://al%40ice:s3cr%3Aet@db.example.com:6543/my%20db?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=1",
            &[],
        );
        assert_eq!(c.user, "al@ice");
        assert_eq!(c.password.as_deref(), Some("s3cr:et"));
        assert_eq!(c.host, "db.example.com");
        assert_eq!(c.port, 6543);
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(2)));
        assert!(!c.redacted().contains("s3cr"));
        assert!(!format!("{c:?}").contains("s3cr"));
    }

    #[test]
    fn ipv6_and_socket_hosts() {
        let c = parse_with_env("postgres://u@[::1]:5433/d", &[]);
        assert_eq!(c.host, "::1");
        assert_eq!(c.port, 5433);
        let c = parse_with_env("postgres:///d?host=/tmp/sock&port=7000", &[("USER", "bob")]);
        assert_eq!(c.host, "/tmp/sock");
        assert_eq!(c.port, 7000);
        assert_eq!(c.user, "bob");
        assert_eq!(c.endpoint(), "/tmp/sock/.s.PGSQL.7000");
    }

    #[test]
    fn key_values_with_quotes_and_env_fallbacks() {
        let c = parse_with_env(
            "host=h dbname='a b\\'c' password = 'p w'",
            &[
                ("PGPORT", "5999"),
                ("PGUSER", "envuser"),
                ("PGPASSWORD", "ignored"),
            ],
        );
        assert_eq!(c.dbname, "a b'c");
        assert_eq!(c.port, 5999);
        assert_eq!(c.user, "envuser");
        assert_eq!(c.password.as_deref(), Some("p w"));
        let c = parse_with_env("host=h", &[("PGPASSWORD", "fromenv"), ("USER", "u")]);
        assert_eq!(c.password.as_deref(), Some("fromenv"));
        assert_eq!(c.dbname, "u");
    }

    #[test]
    fn pgpass_lookup_with_wildcards_and_escapes() {
        let dir = std::env::temp_dir().join(format!("pgtide-pgpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:*:*:*:nope\nh:5432:*:bob:pa\\:ss:word\n",
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let c = parse_with_env(
            "host=h user=bob dbname=x",
            &[("PGPASSFILE", file.to_str().unwrap())],
        );
        assert_eq!(c.password.as_deref(), Some("pa:ss:word"));
        let c = parse_with_env(
            "host=h user=alice dbname=x",
            &[("PGPASSFILE", file.to_str().unwrap())],
        );
        assert_eq!(c.password, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_inputs_are_clear_and_redacted() {
        let err = ConnInfo::parse("postgres://u:topsecret@h:notaport/d").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("invalid port"), "{msg}");
        assert!(!msg.contains("topsecret"), "{msg}");
        let err = ConnInfo::parse("host=h sslmode=sometimes").unwrap_err();
        assert!(format!("{err:#}").contains("invalid sslmode"));
        let err = ConnInfo::parse("host=h bogus=1 password=topsecret").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("bogus") && !msg.contains("topsecret"), "{msg}");
        let err = ConnInfo::parse("just-a-word").unwrap_err();
        assert!(format!("{err:#}").contains("expected a URI"));
    }

    #[test]
    fn child_conninfo_never_holds_the_password() {
        let c = parse_with_env("postgres://u:topsecret@h/d?sslmode=require", &[]);
        let s = c.libpq_conninfo_without_password();
        assert!(!s.contains("topsecret"));
        assert!(s.contains("sslmode=require"));
        assert_eq!(c.child_env(), vec![("PGPASSWORD", "topsecret".to_string())]);
        assert_eq!(
            redact_free_text("postgres://u:topsecret@h/d password=x2"),
            "postgres://u:****@h/d password=****"
        );
    }
}
