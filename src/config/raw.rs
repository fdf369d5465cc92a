//! Serde structs that mirror the TOML file one to one. Everything a connector may carry is
//! optional here, so that validation can report every missing field at once instead of serde
//! stopping at the first. Unknown keys are not refused here (`deny_unknown_fields` would stop
//! at the first one) but collected by `serde_ignored` in validation, all of them.

/// The keys a connector table may hold, for "did you mean" hints.
pub const CONNECTOR_KEYS: &[&str] = &[
    "auth",
    "grant",
    "client_auth",
    "resource_domain",
    "validation_url",
    "token_url",
    "client_id",
    "client_secret",
    "username",
    "password",
    "certificate",
    "private_key",
    "client_assertion_alg",
    "scope",
    "extra_params",
    "header",
    "query_param",
    "prefix",
    "value",
    "egress_proxy",
    "egress_proxy_auth",
    "max_concurrent",
    "rate_limit",
    "burst",
    "subject",
    "issuer",
    "audience",
];

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use crate::secret::SecretSource;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub server: RawServer,
    pub upstream: RawUpstream,
    pub oauth: RawOAuth,
    pub cluster: Option<Spanned<RawCluster>>,
    pub telemetry: RawTelemetry,
    pub orgs: BTreeMap<String, Spanned<RawOrg>>,
}

/// `[telemetry]`: OpenTelemetry traces, off without `otlp_endpoint`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<Spanned<String>>,
    pub sampling_ratio: Spanned<f64>,
    pub service_name: Spanned<String>,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_ratio: Spanned::new(0..0, 1.0),
            service_name: Spanned::new(0..0, "connector-proxy".into()),
        }
    }
}

/// `[cluster]`: tokens shared by replicas through Redis.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawCluster {
    pub redis_url: Option<Spanned<SecretSource>>,
    pub key_prefix: Spanned<String>,
    pub encryption_key: Option<Spanned<SecretSource>>,
    pub lock_ttl: HumanDuration,
    pub redis_timeout: HumanDuration,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: Spanned::new(0..0, "connector-proxy".into()),
            encryption_key: None,
            lock_ttl: HumanDuration(Duration::from_secs(10)),
            redis_timeout: HumanDuration(Duration::from_millis(250)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawServer {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Spanned<SecretSource>>,
    pub connector_header: Spanned<String>,
    pub org_header: Spanned<String>,
    pub max_connectors_per_org: usize,
    pub max_concurrent_requests: usize,
    pub header_read_timeout: HumanDuration,
    pub max_header_bytes: ByteSize,
    pub shutdown_grace: HumanDuration,
    pub reload_on_change: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token: None,
            connector_header: Spanned::new(0..0, "x-connector-name".into()),
            org_header: Spanned::new(0..0, "x-org-id".into()),
            max_connectors_per_org: 10,
            max_concurrent_requests: 10_000,
            header_read_timeout: HumanDuration(Duration::from_secs(10)),
            max_header_bytes: ByteSize(64 * 1024),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
            reload_on_change: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawUpstream {
    pub connect_timeout: HumanDuration,
    pub request_timeout: HumanDuration,
    pub max_replay_body: ByteSize,
    pub replay_memory: ByteSize,
    pub max_connections_per_host: usize,
    pub extra_ca_file: Option<Spanned<String>>,
    pub allow_networks: Vec<Spanned<String>>,
    pub resolve: BTreeMap<String, Spanned<String>>,
    /// `http://host:port` or `https://host:port`: upstream connections go through it.
    pub egress_proxy: Option<Spanned<String>>,
    /// `user:password` for the egress proxy: a secret.
    pub egress_proxy_auth: Option<Spanned<SecretSource>>,
    /// Hosts, domains and networks reached directly although `egress_proxy` is set.
    pub no_proxy: Vec<Spanned<String>>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            request_timeout: HumanDuration(Duration::from_secs(30)),
            max_replay_body: ByteSize(1024 * 1024),
            replay_memory: ByteSize(64 * 1024 * 1024),
            max_connections_per_host: 256,
            extra_ca_file: None,
            allow_networks: Vec::new(),
            resolve: BTreeMap::new(),
            egress_proxy: None,
            egress_proxy_auth: None,
            no_proxy: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawOAuth {
    pub refresh_before_expiry: HumanDuration,
    pub default_expires_in: HumanDuration,
    pub token_timeout: HumanDuration,
    pub min_token_age: HumanDuration,
}

impl Default for RawOAuth {
    fn default() -> Self {
        Self {
            refresh_before_expiry: HumanDuration(Duration::from_secs(60)),
            default_expires_in: HumanDuration(Duration::from_secs(300)),
            token_timeout: HumanDuration(Duration::from_secs(10)),
            min_token_age: HumanDuration(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawOrg {
    pub inbound_token: Option<Spanned<SecretSource>>,
    pub connectors: BTreeMap<String, Spanned<RawConnector>>,
}

/// Every key any connector kind may carry; which ones apply is checked in validation.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConnector {
    pub auth: Option<Spanned<AuthKind>>,
    pub grant: Option<Spanned<GrantKind>>,
    pub client_auth: Option<Spanned<ClientAuthKind>>,
    pub resource_domain: Option<Spanned<String>>,
    pub validation_url: Option<Spanned<String>>,
    pub token_url: Option<Spanned<String>>,
    pub client_id: Option<Spanned<String>>,
    pub client_secret: Option<Spanned<SecretSource>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<SecretSource>>,
    pub certificate: Option<Spanned<SecretSource>>,
    pub private_key: Option<Spanned<SecretSource>>,
    pub client_assertion_alg: Option<Spanned<AssertionAlg>>,
    pub scope: Option<Spanned<String>>,
    pub extra_params: Option<Spanned<BTreeMap<String, String>>>,
    /// `auth = "api_key"`: the header that carries the key, or the query parameter.
    pub header: Option<Spanned<String>>,
    pub query_param: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub value: Option<Spanned<SecretSource>>,
    /// `"none"`, or a URL of its own instead of `upstream.egress_proxy`.
    pub egress_proxy: Option<Spanned<String>>,
    pub egress_proxy_auth: Option<Spanned<SecretSource>>,
    /// Requests in flight at most; beyond, 503 `connector_busy`.
    pub max_concurrent: Option<Spanned<i64>>,
    /// `"50/s"`, `"600/min"`, `"1000/h"`, `"10/15s"`; beyond, 429 `connector_rate_limited`.
    pub rate_limit: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
    /// `grant = "jwt_bearer"`: the assertion's `sub`, and its `iss` and `aud` where they are
    /// not `client_id` and `token_url`.
    pub subject: Option<Spanned<String>>,
    pub issuer: Option<Spanned<String>>,
    pub audience: Option<Spanned<String>>,
}

impl RawConnector {
    /// The keys only OAuth connectors take, and whether each is present.
    pub fn oauth_keys(&self) -> [(&'static str, bool); 13] {
        [
            ("subject", self.subject.is_some()),
            ("issuer", self.issuer.is_some()),
            ("audience", self.audience.is_some()),
            ("grant", self.grant.is_some()),
            ("client_auth", self.client_auth.is_some()),
            ("token_url", self.token_url.is_some()),
            ("client_id", self.client_id.is_some()),
            ("client_secret", self.client_secret.is_some()),
            ("certificate", self.certificate.is_some()),
            ("private_key", self.private_key.is_some()),
            ("client_assertion_alg", self.client_assertion_alg.is_some()),
            ("scope", self.scope.is_some()),
            ("extra_params", self.extra_params.is_some()),
        ]
    }

    /// The keys only API-key connectors take, and whether each is present.
    pub fn api_key_keys(&self) -> [(&'static str, bool); 4] {
        [
            ("header", self.header.is_some()),
            ("query_param", self.query_param.is_some()),
            ("prefix", self.prefix.is_some()),
            ("value", self.value.is_some()),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    Basic,
    Oauth2,
    ApiKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    ClientCredentials,
    Password,
    /// RFC 7523 2.1: an assertion signed with `private_key` is the grant.
    JwtBearer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthKind {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    TlsClientAuth,
    ClientSecretJwt,
    /// No client authentication: only with `grant = "jwt_bearer"`, whose assertion names the
    /// client.
    None,
}

impl GrantKind {
    /// As written in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::Password => "password",
            Self::JwtBearer => "jwt_bearer",
        }
    }
}

impl ClientAuthKind {
    /// As written in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::TlsClientAuth => "tls_client_auth",
            Self::ClientSecretJwt => "client_secret_jwt",
            Self::None => "none",
        }
    }
}

/// JWS algorithms for client assertions: signatures for `private_key_jwt`, HMACs with the
/// client secret for `client_secret_jwt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AssertionAlg {
    RS256,
    PS256,
    ES256,
    HS256,
    HS384,
    HS512,
}

/// A humantime duration ("5s", "2m", "1h 30m").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(HumanDuration).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {text:?}: {e}; write a duration such as \"500ms\", \"5s\" or \"2m\""
            ))
        })
    }
}

/// A size in bytes: a whole number, or a string such as "64KiB", "1MiB", "512B".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Option<u64> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        number.checked_mul(factor)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a byte count or a size such as "64KiB" or "1MiB""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map(ByteSize).ok_or_else(|| {
                    E::custom(format!(
                        "invalid size {v:?}: write a byte count or a size such as \"64KiB\" or \"1MiB\""
                    ))
                })
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_units_and_plain_counts() {
        assert_eq!(ByteSize::parse("64KiB"), Some(65_536));
        assert_eq!(ByteSize::parse("1MiB"), Some(1_048_576));
        assert_eq!(ByteSize::parse("4096"), Some(4096));
        assert_eq!(ByteSize::parse("1 MiB"), Some(1_048_576));
        assert_eq!(ByteSize::parse("1 MiBs"), None);
        assert_eq!(ByteSize::parse("-1"), None);
    }

    #[test]
    fn empty_file_takes_every_default() {
        let raw: RawConfig = toml::from_str("").unwrap();
        assert_eq!(raw.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(raw.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(raw.upstream.max_replay_body, ByteSize(1 << 20));
        assert_eq!(raw.oauth.default_expires_in.0, Duration::from_secs(300));
    }
}
