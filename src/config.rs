//! Configuration: read the TOML file, validate it whole, and build plain domain types in which
//! nothing "must be Some at run time". Every problem is reported at once, each naming the file,
//! the line and column where known, the org and connector, and what to write instead.

pub mod raw;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Uri};
use ipnet::IpNet;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use raw::{AssertionAlg, ClientAuthKind, GrantKind};

use crate::secret::Secret;
use crate::target::ResourceDomain;

/// A loaded, validated configuration.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub oauth: OAuthSettings,
    /// `[cluster]`, when replicas share their tokens through Redis.
    pub cluster: Option<ClusterSettings>,
    /// `[telemetry]` with an `otlp_endpoint`: traces exported over OTLP/HTTP.
    pub telemetry: Option<TelemetrySettings>,
    pub orgs: BTreeMap<String, OrgConfig>,
    /// The files it was read from besides itself (`{ file = .. }` secrets, `extra_ca_file`),
    /// which `server.reload_on_change` watches with it.
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// `redis://` or `rediss://`, with credentials where Redis wants them: a secret.
    pub redis_url: Secret,
    pub key_prefix: String,
    /// The AES-256-GCM key sealing shared tokens: 32 bytes.
    pub encryption_key: EncryptionKey,
    pub lock_ttl: Duration,
    pub redis_timeout: Duration,
}

/// Where and how traces go (`[telemetry]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// The URL spans are POSTed to: `otlp_endpoint` with `/v1/traces` appended, as the OTLP
    /// exporters read `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub traces_url: Uri,
    /// The share of new traces recorded, 0.0 to 1.0; a caller's `traceparent` decides for its
    /// own trace.
    pub sampling_ratio: f64,
    pub service_name: String,
}

/// 32 bytes that never reach a log or `Debug`.
#[derive(Clone, PartialEq)]
pub struct EncryptionKey(pub [u8; 32]);

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([redacted])")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `Authorization: Bearer` token every admin request but `/healthz` and `/readyz` needs.
    pub admin_token: Option<Secret>,
    pub connector_header: HeaderName,
    pub org_header: HeaderName,
    pub max_connectors_per_org: usize,
    pub max_concurrent_requests: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    /// Reload when the configuration file or a file it names changes, as on SIGHUP.
    pub reload_on_change: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_replay_body: usize,
    /// All bodies kept for a replay together; past it a body streams without a copy.
    pub replay_memory: usize,
    /// Upstream connections per authority at most; past it, requests wait for a free one.
    pub max_connections_per_host: usize,
    /// Certificates trusted besides the web roots (from `extra_ca_file`).
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub allow_networks: Vec<IpNet>,
    /// `upstream.resolve`: (canonical host, port) -> address to connect to instead of DNS.
    pub resolve: HashMap<(String, u16), SocketAddr>,
    /// `upstream.egress_proxy`, with `egress_proxy_auth`.
    pub egress_proxy: Option<EgressProxy>,
    /// `upstream.no_proxy`: targets reached directly although `egress_proxy` is set.
    pub no_proxy: Vec<NoProxy>,
}

impl UpstreamSettings {
    /// The settings a connector's connections are made with: its own egress proxy, or none,
    /// where it chose one. A connector's own proxy takes all of its connections (`no_proxy`
    /// belongs to `upstream.egress_proxy`).
    pub fn for_connector(&self, egress: &EgressChoice) -> std::borrow::Cow<'_, Self> {
        use std::borrow::Cow;
        match egress {
            EgressChoice::Inherit => Cow::Borrowed(self),
            EgressChoice::Direct => Cow::Owned(Self {
                egress_proxy: None,
                no_proxy: Vec::new(),
                ..self.clone()
            }),
            EgressChoice::Proxy(proxy) => Cow::Owned(Self {
                egress_proxy: Some(proxy.clone()),
                no_proxy: Vec::new(),
                ..self.clone()
            }),
        }
    }
}

/// An HTTP proxy that upstream connections go through, by CONNECT, with TLS to the target
/// inside the tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressProxy {
    /// `http://host:port` or `https://host:port`, for messages (never carries credentials).
    pub url: String,
    /// Without brackets for an IPv6 address.
    pub host: String,
    pub port: u16,
    /// `https://`: TLS to the egress proxy itself, verified like upstreams.
    pub tls: bool,
    /// `user:password`, sent as `Proxy-Authorization: Basic`.
    pub auth: Option<Secret>,
}

/// One `upstream.no_proxy` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum NoProxy {
    /// `"*"`: every target.
    All,
    /// A domain and every name below it (`example.com`, `.example.com` and `*.example.com`
    /// all mean that), lowercase, without a trailing dot.
    Domain(String),
    /// An address or a network (`10.20.0.7`, `10.20.0.0/16`).
    Net(IpNet),
}

/// A connector's `egress_proxy`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum EgressChoice {
    /// Not set: `upstream.egress_proxy`, if any.
    #[default]
    Inherit,
    /// `"none"`: connect directly.
    Direct,
    /// A URL of its own.
    Proxy(EgressProxy),
}

#[derive(Debug, Clone, PartialEq)]
pub struct OAuthSettings {
    pub refresh_before_expiry: Duration,
    pub default_expires_in: Duration,
    pub token_timeout: Duration,
    /// A 401 renews a token only when it is older than this.
    pub min_token_age: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrgConfig {
    pub name: String,
    pub inbound_token: Option<Secret>,
    pub connectors: BTreeMap<String, ConnectorConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnectorConfig {
    pub org: String,
    pub name: String,
    pub resource_domain: ResourceDomain,
    /// Basic and API-key connectors only; always inside the resource domain, so that validation never sends
    /// the credentials anywhere a request could not.
    pub validation_url: Option<Uri>,
    pub auth: AuthConfig,
    pub egress: EgressChoice,
    pub limits: LimitSettings,
}

/// A connector's `max_concurrent`, `rate_limit` and `burst`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LimitSettings {
    pub max_concurrent: Option<usize>,
    pub rate: Option<Rate>,
}

/// `count` requests per `per`, with up to `burst` at once after a quiet spell (a GCRA: one
/// request every `per / count`, `burst` of them ahead of time).
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

impl Rate {
    /// The time one request takes of the budget.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => write!(f, "{}/s", self.count)?,
            60 if self.per.subsec_nanos() == 0 => write!(f, "{}/min", self.count)?,
            3600 if self.per.subsec_nanos() == 0 => write!(f, "{}/h", self.count)?,
            _ => write!(f, "{}/{}", self.count, humantime::format_duration(self.per))?,
        }
        write!(f, ", burst {}", self.burst)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AuthConfig {
    Basic { username: String, password: Secret },
    OAuth2(Box<OAuthClient>),
    ApiKey(ApiKey),
}

/// `auth = "api_key"`: a fixed key, sent in a header or in the query.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub placement: KeyPlacement,
    pub value: Secret,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KeyPlacement {
    /// `prefix` goes before the key (`"Bearer "` for `Authorization`), empty by default.
    Header { name: HeaderName, prefix: String },
    /// The caller's own parameter of that name is taken out first.
    Query { param: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct OAuthClient {
    pub token_url: Uri,
    pub client_id: String,
    pub grant: Grant,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub extra_params: Vec<(String, String)>,
}

impl OAuthClient {
    pub fn grant_kind(&self) -> GrantKind {
        match self.grant {
            Grant::ClientCredentials => GrantKind::ClientCredentials,
            Grant::Password { .. } => GrantKind::Password,
            Grant::JwtBearer(_) => GrantKind::JwtBearer,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    ClientCredentials,
    Password { username: String, password: Secret },
    JwtBearer(Box<JwtBearer>),
}

/// `grant = "jwt_bearer"` (RFC 7523 2.1): the proxy signs an assertion with `key` and presents
/// it as the grant.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtBearer {
    /// `private_key`, with `certificate` where one is configured (its thumbprints then go in
    /// the assertion's header).
    pub key: ClientIdentity,
    pub alg: AssertionAlg,
    /// `iss`: `issuer`, else `client_id`.
    pub issuer: String,
    pub subject: String,
    /// `aud`: `audience`, else `token_url`.
    pub audience: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientAuth {
    SecretBasic(Secret),
    SecretPost(Secret),
    /// `alg` is resolved at load time: the configured one, checked against the key, or the
    /// key's natural one (RS256 for RSA, ES256 for P-256).
    PrivateKeyJwt {
        identity: ClientIdentity,
        alg: AssertionAlg,
    },
    TlsClientAuth(ClientIdentity),
    /// RFC 7523 client authentication with an HMAC of the client secret (`alg` is HS256,
    /// HS384 or HS512).
    SecretJwt {
        secret: Secret,
        alg: AssertionAlg,
    },
    /// None: `grant = "jwt_bearer"` without `client_auth` or `client_secret`.
    None,
}

impl ClientAuth {
    pub fn kind(&self) -> ClientAuthKind {
        match self {
            Self::SecretBasic(_) => ClientAuthKind::ClientSecretBasic,
            Self::SecretPost(_) => ClientAuthKind::ClientSecretPost,
            Self::PrivateKeyJwt { .. } => ClientAuthKind::PrivateKeyJwt,
            Self::TlsClientAuth(_) => ClientAuthKind::TlsClientAuth,
            Self::SecretJwt { .. } => ClientAuthKind::ClientSecretJwt,
            Self::None => ClientAuthKind::None,
        }
    }
}

/// A client certificate chain and its private key, parsed from PEM.
#[derive(PartialEq)]
pub struct ClientIdentity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl AssertionAlg {
    /// The rustls signature scheme of a signing algorithm; `None` for the HMACs.
    pub fn scheme(self) -> Option<rustls::SignatureScheme> {
        match self {
            Self::RS256 => Some(rustls::SignatureScheme::RSA_PKCS1_SHA256),
            Self::PS256 => Some(rustls::SignatureScheme::RSA_PSS_SHA256),
            Self::ES256 => Some(rustls::SignatureScheme::ECDSA_NISTP256_SHA256),
            Self::HS256 | Self::HS384 | Self::HS512 => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::PS256 => "PS256",
            Self::ES256 => "ES256",
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
        }
    }

    /// An HMAC's key size at least (RFC 7518 3.2: the hash's output), in bytes; `None` for the
    /// signatures.
    pub fn hmac_key_bytes(self) -> Option<usize> {
        match self {
            Self::HS256 => Some(32),
            Self::HS384 => Some(48),
            Self::HS512 => Some(64),
            Self::RS256 | Self::PS256 | Self::ES256 => None,
        }
    }
}

impl AuthConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Basic { .. } => "basic",
            Self::OAuth2(_) => "oauth2",
            Self::ApiKey(_) => "api_key",
        }
    }
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column, where the TOML parser knows them.
    pub position: Option<(usize, usize)>,
    /// The dotted key the problem belongs to, e.g. `orgs.acme.connectors.billing`.
    pub place: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "{} has {} problem{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.display_in(path));
    }
    out
}

impl Problem {
    pub fn display_in(&self, path: &Path) -> String {
        let mut out = path.display().to_string();
        if let Some((line, column)) = self.position {
            out.push_str(&format!(":{line}:{column}"));
        }
        if !self.place.is_empty() {
            out.push_str(": ");
            out.push_str(&self.place);
        }
        out.push_str(": ");
        out.push_str(&self.message);
        out
    }
}

impl Config {
    /// Reads and validates `path`. Relative `file` secrets and `extra_ca_file` are resolved
    /// against the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates `text` as if it had been read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        validate::validate(text, path).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    pub fn connector_count(&self) -> usize {
        self.orgs.values().map(|o| o.connectors.len()).sum()
    }
}

/// The path where the default configuration lives, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/proxy.toml";
