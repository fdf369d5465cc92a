//! From raw serde structs to validated [`Config`], collecting every problem.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use toml::Spanned;

use super::raw::{
    AuthKind, ClientAuthKind, GrantKind, RawCluster, RawConfig, RawConnector, RawOrg, RawServer,
    RawUpstream,
};
use super::*;
use crate::secret::SecretSource;

/// Headers an API key may not go in: hop-by-hop and framing headers, the target's `Host`, and
/// those the proxy reads or sets itself.
const MANAGED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "x-request-id",
    "x-proxy-error",
];

/// Token request fields the proxy sets itself, which `extra_params` may not replace.
const PROXY_SET_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "username",
    "password",
    "refresh_token",
    "scope",
    "assertion",
];

struct Validator<'a> {
    text: &'a str,
    /// The parsed document, for the position of a key in its own table.
    root: toml::de::DeTable<'a>,
    dir: &'a Path,
    problems: Vec<Problem>,
    /// The connector being validated, where a problem about a missing key points.
    here: Option<Range<usize>>,
    /// Its table's path, `["orgs", org, "connectors", name]`, where its keys are looked up.
    here_path: Vec<String>,
    /// Files read besides the configuration itself.
    files: Vec<PathBuf>,
    /// `server.connector_header` and `server.org_header`, which no API key may go in.
    proxy_headers: Vec<HeaderName>,
}

pub(super) fn validate(text: &str, path: &Path) -> Result<Config, Vec<Problem>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut v = Validator {
        text,
        root: toml::de::DeTable::new(),
        dir,
        problems: Vec::new(),
        here: None,
        here_path: Vec::new(),
        files: Vec::new(),
        proxy_headers: Vec::new(),
    };
    let mut unknown = Vec::new();
    let parsed = toml::de::DeTable::parse(text).and_then(|document| {
        v.root = document.get_ref().clone();
        let de = toml::de::Deserializer::from(document);
        serde_ignored::deserialize(de, |path| unknown.push(segments(&path)))
    });
    let raw: RawConfig = match parsed {
        Ok(raw) => raw,
        Err(e) => {
            v.problem(e.span(), "", e.message().trim_end());
            return Err(v.problems);
        }
    };
    for path in &unknown {
        v.unknown_key(path);
    }
    let server = v.server(&raw.server);
    let upstream = v.upstream(&raw.upstream);
    v.nonzero(
        "oauth",
        &[
            ("token_timeout", raw.oauth.token_timeout.0, "10s"),
            ("default_expires_in", raw.oauth.default_expires_in.0, "300s"),
        ],
    );
    let oauth = OAuthSettings {
        refresh_before_expiry: raw.oauth.refresh_before_expiry.0,
        default_expires_in: raw.oauth.default_expires_in.0,
        token_timeout: raw.oauth.token_timeout.0,
        min_token_age: raw.oauth.min_token_age.0,
    };
    let cluster = raw.cluster.as_ref().and_then(|c| v.cluster(c));
    let telemetry = v.telemetry(&raw.telemetry);
    let mut orgs = BTreeMap::new();
    for (name, org) in &raw.orgs {
        if let Some(org) = v.org(name, org, &raw.server) {
            orgs.insert(name.clone(), org);
        }
    }
    // In file order; problems without a position (defaults) last. The sort is stable.
    v.problems
        .sort_by_key(|p| p.position.unwrap_or((usize::MAX, 0)));
    match (server, v.problems.is_empty()) {
        (Some(server), true) => Ok(Config {
            path: path.to_owned(),
            server,
            upstream,
            oauth,
            cluster,
            telemetry,
            orgs,
            files: v.files,
        }),
        _ => Err(v.problems),
    }
}

/// The keys leading to an ignored key, without serde's wrappers (such as `Spanned`'s).
fn segments(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path;
    match path {
        Path::Root => Vec::new(),
        Path::Map { parent, key } => {
            let mut out = segments(parent);
            if !key.starts_with("$__serde") {
                out.push(key.clone());
            }
            out
        }
        Path::Seq { parent, index } => {
            let mut out = segments(parent);
            out.push(index.to_string());
            out
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    }
}

/// Levenshtein distance, for "did you mean" hints on short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(current)
            };
            previous = current;
        }
    }
    row[b.len()]
}

/// A TOML key, quoted when it is not a bare key (connector names may hold spaces).
fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

impl Validator<'_> {
    fn problem(&mut self, span: Option<Range<usize>>, place: &str, message: impl Into<String>) {
        let position = span
            .filter(|s| s.end > 0)
            .map(|s| self.line_column(s.start));
        self.problems.push(Problem {
            position,
            place: place.to_owned(),
            message: message.into(),
        });
    }

    fn line_column(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }

    /// `path` leads to a key that no struct takes.
    fn unknown_key(&mut self, path: &[String]) {
        let Some((key_name, parents)) = path.split_last() else {
            return;
        };
        let place = parents.iter().map(|p| key(p)).collect::<Vec<_>>().join(".");
        let parents: Vec<&str> = parents.iter().map(String::as_str).collect();
        let known: &[&str] = match parents.as_slice() {
            [] => &[
                "server",
                "upstream",
                "oauth",
                "cluster",
                "telemetry",
                "orgs",
            ],
            ["server"] => &[
                "listen",
                "admin_listen",
                "admin_token",
                "connector_header",
                "org_header",
                "max_connectors_per_org",
                "max_concurrent_requests",
                "header_read_timeout",
                "max_header_bytes",
                "shutdown_grace",
                "reload_on_change",
            ],
            ["upstream"] => &[
                "connect_timeout",
                "request_timeout",
                "max_replay_body",
                "replay_memory",
                "max_connections_per_host",
                "extra_ca_file",
                "allow_networks",
                "resolve",
                "egress_proxy",
                "egress_proxy_auth",
                "no_proxy",
            ],
            ["oauth"] => &[
                "refresh_before_expiry",
                "default_expires_in",
                "token_timeout",
                "min_token_age",
            ],
            ["cluster"] => &[
                "redis_url",
                "key_prefix",
                "encryption_key",
                "lock_ttl",
                "redis_timeout",
            ],
            ["telemetry"] => &["otlp_endpoint", "sampling_ratio", "service_name"],
            ["orgs", _] => &["inbound_token", "connectors"],
            ["orgs", _, "connectors", ..] => raw::CONNECTOR_KEYS,
            _ => &[],
        };
        let hint = match known.iter().find(|k| edit_distance(k, key_name) <= 2) {
            Some(close) => format!("did you mean `{close}`?"),
            None if known.is_empty() => "remove it".to_owned(),
            None => format!("remove it; the keys here are {}", known.join(", ")),
        };
        let position = self.key_span(path);
        self.problem(
            position,
            &place,
            format!("unknown key `{key_name}`: {hint}"),
        );
    }

    /// Where the key at `path` (table names, then the key) is written in the file: in its own
    /// table, so that two connectors with the same key are told apart.
    fn key_span<S: AsRef<str>>(&self, path: &[S]) -> Option<Range<usize>> {
        use toml::de::DeValue;
        let (last, tables) = path.split_last()?;
        let mut table = &self.root;
        for name in tables {
            let (_, value) = table.iter().find(|(k, _)| k.get_ref() == name.as_ref())?;
            table = match value.get_ref() {
                DeValue::Table(inner) => inner,
                _ => return None,
            };
        }
        let (key, _) = table.iter().find(|(k, _)| k.get_ref() == last.as_ref())?;
        Some(key.span())
    }

    fn header_name(&mut self, value: &Spanned<String>, place: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(value.get_ref().to_ascii_lowercase().as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                self.problem(Some(value.span()), place, format!(
                    "{:?} is not a valid header name; write a token such as \"x-connector-name\"",
                    value.get_ref()
                ));
                None
            }
        }
    }

    /// A problem about the key at `path` (tables, then the key), placed where it is written.
    fn key_problem(&mut self, path: &[&str], message: impl Into<String>) {
        let span = self.key_span(path);
        let (_, tables) = path.split_last().unwrap_or((&"", &[]));
        let place = if tables.is_empty() {
            String::new()
        } else {
            path.iter().map(|p| key(p)).collect::<Vec<_>>().join(".")
        };
        self.problem(span, &place, message);
    }

    /// Durations that must not be zero: a zero timeout would fail every request at once, a
    /// zero grace would cut every request in flight at shutdown.
    fn nonzero(&mut self, table: &str, fields: &[(&str, Duration, &str)]) {
        for (field, value, example) in fields {
            if value.is_zero() {
                self.key_problem(
                    &[table, field],
                    format!("must be longer than zero; write a duration such as \"{example}\""),
                );
            }
        }
    }

    fn server(&mut self, raw: &RawServer) -> Option<ServerSettings> {
        let connector_header = self.header_name(&raw.connector_header, "server.connector_header");
        let org_header = self.header_name(&raw.org_header, "server.org_header");
        if connector_header.is_some() && connector_header == org_header {
            self.problem(Some(raw.org_header.span()), "server.org_header", format!(
                "is the same header as server.connector_header ({:?}): one header cannot name both \
                 the org and the connector; use the defaults \"x-org-id\" and \"x-connector-name\"",
                raw.org_header.get_ref()
            ));
        }
        if raw.max_concurrent_requests == 0 {
            self.key_problem(&["server", "max_concurrent_requests"], "must be at least 1");
        }
        if raw.max_connectors_per_org == 0 {
            self.key_problem(&["server", "max_connectors_per_org"], "must be at least 1");
        }
        let max_header_bytes = usize::try_from(raw.max_header_bytes.0).unwrap_or(usize::MAX);
        if max_header_bytes < 8192 {
            self.key_problem(
                &["server", "max_header_bytes"],
                "must be at least \"8KiB\" (8192 bytes)",
            );
        }
        self.nonzero(
            "server",
            &[
                ("header_read_timeout", raw.header_read_timeout.0, "10s"),
                ("shutdown_grace", raw.shutdown_grace.0, "30s"),
            ],
        );
        let admin_token = raw
            .admin_token
            .as_ref()
            .and_then(|t| self.secret(t, "server", "admin_token"));
        if raw.admin_token.is_none() && !raw.admin_listen.ip().is_loopback() {
            let span = self.key_span(&["server", "admin_listen"]);
            self.problem(span, "server.admin_listen", format!(
                "{} is not a loopback address, so the admin listener (/status, POST /reload) needs \
                 server.admin_token; add admin_token = {{ env = \"CONNECTOR_PROXY_ADMIN_TOKEN\" }} \
                 or listen on 127.0.0.1",
                raw.admin_listen
            ));
        }
        Some(ServerSettings {
            listen: raw.listen,
            admin_listen: raw.admin_listen,
            admin_token,
            connector_header: connector_header?,
            org_header: org_header?,
            max_connectors_per_org: raw.max_connectors_per_org,
            max_concurrent_requests: raw.max_concurrent_requests,
            header_read_timeout: raw.header_read_timeout.0,
            max_header_bytes,
            shutdown_grace: raw.shutdown_grace.0,
            reload_on_change: raw.reload_on_change,
        })
    }

    fn upstream(&mut self, raw: &RawUpstream) -> UpstreamSettings {
        let mut extra_roots = Vec::new();
        if let Some(file) = &raw.extra_ca_file {
            let path = self.dir.join(file.get_ref());
            self.files.push(path.clone());
            match std::fs::read(&path) {
                Ok(pem) => {
                    extra_roots = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
                    if extra_roots.is_empty() {
                        self.problem(Some(file.span()), "upstream.extra_ca_file", format!(
                            "{} holds no PEM certificate; point it at a file of \"-----BEGIN CERTIFICATE-----\" blocks",
                            path.display()
                        ));
                    }
                }
                Err(e) => self.problem(Some(file.span()), "upstream.extra_ca_file", format!(
                    "cannot read {}: {e}; fix the path (relative to the configuration file) or remove the key",
                    path.display()
                )),
            }
        }
        let mut allow_networks = Vec::new();
        for net in &raw.allow_networks {
            let text = net.get_ref().trim();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => allow_networks.push(n.trunc()),
                Err(_) => self.problem(Some(net.span()), "upstream.allow_networks", format!(
                    "{text:?} is not a network; write CIDR such as \"10.20.0.0/16\" or \"127.0.0.0/8\""
                )),
            }
        }
        let mut resolve = HashMap::new();
        for (pin, addr) in &raw.resolve {
            let host_port = pin.rsplit_once(':').and_then(|(h, p)| {
                let host = url::Host::parse(h).ok()?.to_string();
                Some((
                    host.trim_end_matches('.').to_owned(),
                    p.parse::<u16>().ok()?,
                ))
            });
            let Some(host_port) = host_port else {
                self.problem(Some(addr.span()), &format!("upstream.resolve.{}", key(pin)), format!(
                    "{pin:?} is not host:port; write \"crm.example.com:443\" = \"10.20.0.7:443\""
                ));
                continue;
            };
            match addr.get_ref().parse::<SocketAddr>() {
                Ok(a) => {
                    resolve.insert(host_port, a);
                }
                Err(_) => self.problem(Some(addr.span()), &format!("upstream.resolve.{}", key(pin)), format!(
                    "{:?} is not an IP address and port; write \"10.20.0.7:443\" or \"[::1]:8443\"",
                    addr.get_ref()
                )),
            }
        }
        if raw.max_connections_per_host == 0 {
            self.key_problem(
                &["upstream", "max_connections_per_host"],
                "must be at least 1; the default is 256",
            );
        }
        self.nonzero(
            "upstream",
            &[
                ("connect_timeout", raw.connect_timeout.0, "5s"),
                ("request_timeout", raw.request_timeout.0, "30s"),
            ],
        );
        let (egress_proxy, no_proxy) = self.upstream_egress(raw);
        UpstreamSettings {
            connect_timeout: raw.connect_timeout.0,
            request_timeout: raw.request_timeout.0,
            max_replay_body: usize::try_from(raw.max_replay_body.0).unwrap_or(usize::MAX),
            replay_memory: usize::try_from(raw.replay_memory.0).unwrap_or(usize::MAX),
            max_connections_per_host: raw.max_connections_per_host,
            extra_roots,
            allow_networks,
            resolve,
            egress_proxy,
            no_proxy,
        }
    }

    fn cluster(&mut self, raw: &Spanned<RawCluster>) -> Option<ClusterSettings> {
        let place = "cluster";
        let span = Some(raw.span());
        let raw = raw.get_ref();
        let redis_url = match &raw.redis_url {
            None => {
                self.problem(span.clone(), place, "redis_url is required with [cluster]: write redis_url = { env = \"CONNECTOR_PROXY_REDIS_URL\" } holding redis://host:6379/0 (or rediss:// for TLS)");
                None
            }
            Some(url) => self.secret(url, place, "redis_url").filter(|secret| {
                let ok = ["redis://", "rediss://"]
                    .iter()
                    .any(|s| secret.expose().starts_with(s));
                if !ok {
                    // The URL may carry a password: name the scheme rule, never the value.
                    self.problem(
                        Some(url.span()),
                        place,
                        "redis_url must start with redis:// or rediss:// (TLS)",
                    );
                }
                ok
            }),
        };
        let encryption_key = match &raw.encryption_key {
            None => {
                self.problem(span.clone(), place, "encryption_key is required with [cluster]: tokens are sealed before they reach Redis; make one with `openssl rand -base64 32` and write encryption_key = { env = \"CONNECTOR_PROXY_TOKEN_KEY\" }");
                None
            }
            Some(source) => self.secret(source, place, "encryption_key").and_then(|secret| {
                use base64::Engine as _;
                let decoded = base64::engine::general_purpose::STANDARD.decode(secret.expose().trim());
                match decoded.ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()) {
                    Some(bytes) => Some(EncryptionKey(bytes)),
                    None => {
                        self.problem(Some(source.span()), place, "encryption_key must be 32 bytes in base64 (44 characters); make one with `openssl rand -base64 32`");
                        None
                    }
                }
            }),
        };
        self.nonzero(
            "cluster",
            &[
                ("lock_ttl", raw.lock_ttl.0, "10s"),
                ("redis_timeout", raw.redis_timeout.0, "250ms"),
            ],
        );
        let key_prefix = raw.key_prefix.get_ref();
        if key_prefix.is_empty() {
            self.problem(
                Some(raw.key_prefix.span()),
                place,
                "key_prefix must not be empty; the default is \"connector-proxy\"",
            );
        }
        Some(ClusterSettings {
            redis_url: redis_url?,
            key_prefix: key_prefix.clone(),
            encryption_key: encryption_key?,
            lock_ttl: raw.lock_ttl.0,
            redis_timeout: raw.redis_timeout.0,
        })
    }

    fn secret(
        &mut self,
        source: &Spanned<SecretSource>,
        place: &str,
        field: &str,
    ) -> Option<Secret> {
        if let SecretSource::File(path) = source.get_ref() {
            self.files.push(self.dir.join(path));
        }
        match source.get_ref().load(self.dir) {
            Ok(secret) => Some(secret),
            Err(e) => {
                self.problem(Some(source.span()), place, format!("{field}: {e}"));
                None
            }
        }
    }

    fn org(&mut self, name: &str, raw: &Spanned<RawOrg>, server: &RawServer) -> Option<OrgConfig> {
        let place = format!("orgs.{}", key(name));
        let span = Some(raw.span());
        let raw = raw.get_ref();
        let inbound_token = raw
            .inbound_token
            .as_ref()
            .and_then(|t| self.secret(t, &place, "inbound_token"));
        if raw.inbound_token.is_none() && !server.listen.ip().is_loopback() {
            self.problem(
                span.clone(),
                &place,
                format!(
                    "server.listen {} is not a loopback address, so every org needs inbound_token; \
                 add inbound_token = {{ env = \"{}_INBOUND_TOKEN\" }} or listen on 127.0.0.1",
                    server.listen,
                    name.to_ascii_uppercase()
                        .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                ),
            );
        }
        if raw.connectors.len() > server.max_connectors_per_org {
            self.problem(span, &place, format!(
                "has {} connectors; an org may have at most {} (server.max_connectors_per_org): remove {}",
                raw.connectors.len(),
                server.max_connectors_per_org,
                raw.connectors.len() - server.max_connectors_per_org
            ));
        }
        self.proxy_headers = [&server.connector_header, &server.org_header]
            .into_iter()
            .filter_map(|h| {
                HeaderName::from_bytes(h.get_ref().to_ascii_lowercase().as_bytes()).ok()
            })
            .collect();
        let mut connectors = BTreeMap::new();
        for (connector_name, connector) in &raw.connectors {
            if let Some(c) = self.connector(name, connector_name, connector) {
                connectors.insert(connector_name.clone(), c);
            }
        }
        Some(OrgConfig {
            name: name.to_owned(),
            inbound_token,
            connectors,
        })
    }

    fn https_url(&mut self, value: &Spanned<String>, place: &str, field: &str) -> Option<Uri> {
        let parsed = url::Url::parse(value.get_ref()).ok().filter(|u| {
            u.scheme() == "https"
                && u.host().is_some()
                && u.username().is_empty()
                && u.password().is_none()
        });
        match parsed.and_then(|u| u.as_str().parse::<Uri>().ok()) {
            Some(uri) => Some(uri),
            None => {
                self.problem(Some(value.span()), place, format!(
                    "{field} {:?} is not an https URL; write one such as \"https://login.example.com/oauth2/token\"",
                    value.get_ref()
                ));
                None
            }
        }
    }

    fn identity(&mut self, c: &RawConnector, place: &str, method: &str) -> Option<ClientIdentity> {
        let mut missing = false;
        for (field, value) in [
            ("certificate", &c.certificate),
            ("private_key", &c.private_key),
        ] {
            if value.is_none() {
                missing = true;
                self.problem(self.here.clone(), place, format!(
                    "{field} is required for client_auth = \"{method}\"; add {field} = {{ file = \"certs/{}.pem\" }}",
                    if field == "certificate" { "client-certificate" } else { "client-key" }
                ));
            }
        }
        if missing {
            return None;
        }
        let (cert, key) = (c.certificate.as_ref()?, c.private_key.as_ref()?);
        let cert_pem = self.secret(cert, place, "certificate");
        let key_pem = self.secret(key, place, "private_key");
        let (cert_pem, key_pem) = (cert_pem?, key_pem?);
        let cert_chain = self.certificates(&cert_pem, cert, place);
        let key_der = self.private_key_der(&key_pem, key, place);
        Some(ClientIdentity {
            cert_chain: cert_chain?,
            key: key_der?,
        })
    }

    /// The certificates of `pem` (loaded from `source`); a problem where it holds none.
    fn certificates(
        &mut self,
        pem: &Secret,
        source: &Spanned<SecretSource>,
        place: &str,
    ) -> Option<Vec<CertificateDer<'static>>> {
        let chain: Vec<_> = CertificateDer::pem_slice_iter(pem.expose().as_bytes())
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            self.problem(
                Some(source.span()),
                place,
                "certificate holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
            );
            return None;
        }
        Some(chain)
    }

    /// The private key of `pem` (loaded from `source`); a problem where it holds none.
    fn private_key_der(
        &mut self,
        pem: &Secret,
        source: &Spanned<SecretSource>,
        place: &str,
    ) -> Option<PrivateKeyDer<'static>> {
        let key = PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()).ok();
        if key.is_none() {
            self.problem(
                Some(source.span()),
                place,
                "private_key holds no PEM private key (\"-----BEGIN PRIVATE KEY-----\", RSA or EC)",
            );
        }
        key
    }

    /// The JWS algorithm for `private_key_jwt`: the configured one if the key can sign with it,
    /// else the key's natural one.
    fn assertion_alg(
        &mut self,
        identity: &ClientIdentity,
        wanted: Option<AssertionAlg>,
        place: &str,
    ) -> Option<AssertionAlg> {
        let key = match rustls::crypto::ring::sign::any_supported_type(&identity.key) {
            Ok(key) => key,
            Err(_) => {
                self.problem(
                    self.connector_key("private_key"),
                    place,
                    "private_key is not an RSA or ECDSA key that can sign client assertions",
                );
                return None;
            }
        };
        let natural = match key.algorithm() {
            rustls::SignatureAlgorithm::RSA => AssertionAlg::RS256,
            _ => AssertionAlg::ES256,
        };
        let alg = wanted.unwrap_or(natural);
        if alg
            .scheme()
            .is_none_or(|scheme| key.choose_scheme(&[scheme]).is_none())
        {
            let span = self.connector_key(if wanted.is_some() {
                "client_assertion_alg"
            } else {
                "private_key"
            });
            self.problem(span, place, format!(
                "client_assertion_alg {} does not fit private_key; RS256 and PS256 need an RSA key, ES256 a P-256 key (HS256, HS384 and HS512 are for client_auth = \"client_secret_jwt\")",
                alg.name()
            ));
            return None;
        }
        Some(alg)
    }

    /// Reports each key that the chosen kind does not use.
    fn unused(&mut self, place: &str, context: &str, fields: &[(&str, bool)]) {
        for (field, present) in fields {
            if *present {
                let span = self.connector_key(field);
                self.problem(
                    span,
                    place,
                    format!("{field} does not apply to {context}; remove it"),
                );
            }
        }
    }

    /// Where the connector being validated writes `field`; its table where it does not.
    fn connector_key(&self, field: &str) -> Option<Range<usize>> {
        let mut path = self.here_path.clone();
        path.push(field.to_owned());
        self.key_span(&path).or_else(|| self.here.clone())
    }

    fn required<'r, T>(
        &mut self,
        value: &'r Option<Spanned<T>>,
        place: &str,
        field: &str,
        context: &str,
        example: &str,
    ) -> Option<&'r Spanned<T>> {
        if value.is_none() {
            self.problem(
                self.here.clone(),
                place,
                format!("{field} is required for {context}; add {field} = {example}"),
            );
        }
        value.as_ref()
    }

    fn connector(
        &mut self,
        org: &str,
        name: &str,
        raw: &Spanned<RawConnector>,
    ) -> Option<ConnectorConfig> {
        let place = format!("orgs.{}.connectors.{}", key(org), key(name));
        let span = raw.span();
        self.here = Some(span.clone());
        self.here_path = vec!["orgs".into(), org.into(), "connectors".into(), name.into()];
        let c = raw.get_ref();
        let before = self.problems.len();
        if c.auth.is_none() {
            self.problem(
                Some(span.clone()),
                &place,
                "auth is required; add auth = \"basic\", \"oauth2\" or \"api_key\"",
            );
            // Which keys apply is unknown, but the secrets this connector names can be loaded.
            for (field, value) in [
                ("client_secret", &c.client_secret),
                ("password", &c.password),
                ("certificate", &c.certificate),
                ("private_key", &c.private_key),
                ("value", &c.value),
            ] {
                if let Some(source) = value {
                    self.secret(source, &place, field);
                }
            }
        }
        let resource_domain = match &c.resource_domain {
            None => {
                self.problem(Some(span.clone()), &place,
                    "resource_domain is required; add resource_domain = \"https://api.example.com\"");
                None
            }
            Some(rd) => match ResourceDomain::parse(rd.get_ref()) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.problem(
                        Some(rd.span()),
                        &place,
                        format!("resource_domain {:?} {e}", rd.get_ref()),
                    );
                    None
                }
            },
        };
        let auth = match c.auth.as_ref().map(|a| *a.get_ref()) {
            Some(AuthKind::Basic) => self.basic(c, &place),
            Some(AuthKind::Oauth2) => self
                .oauth2(c, &place)
                .map(|o| AuthConfig::OAuth2(Box::new(o))),
            Some(AuthKind::ApiKey) => self.api_key(c, &place).map(AuthConfig::ApiKey),
            None => None,
        };
        let validation_url = match (&c.validation_url, &resource_domain) {
            (Some(v), Some(domain)) => {
                self.https_url(v, &place, "validation_url").and_then(|uri| {
                    match domain.resolve(&uri) {
                        Ok(target) => Some(target.uri),
                        Err(e) => {
                            self.problem(Some(v.span()), &place, format!(
                            "validation_url {:?} is outside resource_domain {domain} ({e}); \
                             the proxy sends credentials only inside the resource domain",
                            v.get_ref()
                        ));
                            None
                        }
                    }
                })
            }
            _ => None,
        };
        let egress = self.connector_egress(c, &place);
        let limits = self.limits(c, &place);
        if self.problems.len() > before {
            return None;
        }
        Some(ConnectorConfig {
            org: org.to_owned(),
            name: name.to_owned(),
            resource_domain: resource_domain?,
            validation_url,
            auth: auth?,
            egress,
            limits,
        })
    }

    fn basic(&mut self, c: &RawConnector, place: &str) -> Option<AuthConfig> {
        const CONTEXT: &str = "auth = \"basic\"";
        self.unused(place, CONTEXT, &c.oauth_keys());
        self.unused(place, CONTEXT, &c.api_key_keys());
        let username = self.required(&c.username, place, "username", CONTEXT, "\"svc-account\"");
        let password = self.required(
            &c.password,
            place,
            "password",
            CONTEXT,
            "{ env = \"CONNECTOR_PASSWORD\" }",
        );
        let username = username.map(|u| u.get_ref().clone());
        if username.as_deref().is_some_and(|u| u.contains(':')) {
            self.problem(
                self.connector_key("username"),
                place,
                "username must not contain ':' (HTTP Basic cannot carry it)",
            );
        }
        let password = password.and_then(|p| self.secret(p, place, "password"));
        Some(AuthConfig::Basic {
            username: username?,
            password: password?,
        })
    }

    fn api_key(&mut self, c: &RawConnector, place: &str) -> Option<ApiKey> {
        const CONTEXT: &str = "auth = \"api_key\"";
        self.unused(place, CONTEXT, &c.oauth_keys());
        self.unused(
            place,
            CONTEXT,
            &[
                ("username", c.username.is_some()),
                ("password", c.password.is_some()),
            ],
        );
        let value = self.required(&c.value, place, "value", CONTEXT, "{ env = \"API_KEY\" }");
        let value = value.and_then(|v| self.secret(v, place, "value"));
        let placement = match (&c.header, &c.query_param) {
            (Some(_), Some(_)) => {
                self.problem(
                    self.connector_key("query_param"),
                    place,
                    "header and query_param are both set; an API key goes in one place: remove one",
                );
                None
            }
            (None, None) => {
                self.problem(self.here.clone(), place,
                    "header or query_param is required for auth = \"api_key\"; add header = \"X-API-Key\" \
                     (or query_param = \"api_key\")");
                None
            }
            (Some(header), None) => self.key_header(header, c.prefix.as_ref(), place),
            (None, Some(param)) => {
                if c.prefix.is_some() {
                    self.problem(
                        self.connector_key("prefix"),
                        place,
                        "prefix applies to an API key in a header; remove it or use header",
                    );
                }
                let name = param.get_ref();
                if name.is_empty()
                    || name
                        .bytes()
                        .any(|b| !b.is_ascii_graphic() || b"&=#+%".contains(&b))
                {
                    self.problem(Some(param.span()), place, format!(
                        "query_param {name:?} is not a plain parameter name; write one such as \"api_key\""
                    ));
                    None
                } else {
                    Some(KeyPlacement::Query {
                        param: name.clone(),
                    })
                }
            }
        };
        // Sent as it is: in a header no control character may pass, in the query it is
        // percent-encoded when the connector is built.
        if let (Some(secret), Some(KeyPlacement::Header { prefix, .. })) = (&value, &placement)
            && HeaderValue::from_str(&format!("{prefix}{}", secret.expose())).is_err()
        {
            self.problem(c.value.as_ref().map(|v| v.span()), place,
                "value cannot be sent in a header (a control character or non-ASCII byte); fix the key");
            return None;
        }
        Some(ApiKey {
            placement: placement?,
            value: value?,
        })
    }

    /// The header of an API key: a valid name, and none of those the proxy itself manages.
    fn key_header(
        &mut self,
        header: &Spanned<String>,
        prefix: Option<&Spanned<String>>,
        place: &str,
    ) -> Option<KeyPlacement> {
        let name = self.header_name(header, place)?;
        if MANAGED_HEADERS.contains(&name.as_str()) || self.proxy_headers.contains(&name) {
            self.problem(Some(header.span()), place, format!(
                "header {:?} is one the proxy manages itself (hop-by-hop, framing, routing or its \
                 own); name the header the API wants the key in, such as \"X-API-Key\"",
                header.get_ref()
            ));
            return None;
        }
        let prefix = prefix.map(|p| p.get_ref().clone()).unwrap_or_default();
        Some(KeyPlacement::Header { name, prefix })
    }

    fn oauth2(&mut self, c: &RawConnector, place: &str) -> Option<OAuthClient> {
        const CONTEXT: &str = "auth = \"oauth2\"";
        self.unused(place, CONTEXT, &c.api_key_keys());
        if c.validation_url.is_some() {
            self.problem(
                self.connector_key("validation_url"),
                place,
                "validation_url applies to auth = \"basic\" and \"api_key\"; OAuth connectors are \
                checked by fetching a token (connector-proxy check --online): remove it",
            );
        }
        let grant = self.required(
            &c.grant,
            place,
            "grant",
            CONTEXT,
            "\"client_credentials\" (or \"password\", \"jwt_bearer\")",
        );
        let token_url = self.required(
            &c.token_url,
            place,
            "token_url",
            CONTEXT,
            "\"https://login.example.com/oauth2/token\"",
        );
        let client_id = self.required(&c.client_id, place, "client_id", CONTEXT, "\"flow-engine\"");
        let token_url = token_url.and_then(|t| self.https_url(t, place, "token_url"));
        let grant_kind = grant.map(|g| *g.get_ref());
        let grant = match grant_kind {
            Some(GrantKind::ClientCredentials) => {
                self.unused(
                    place,
                    "grant = \"client_credentials\"",
                    &[
                        ("username", c.username.is_some()),
                        ("password", c.password.is_some()),
                    ],
                );
                Some(Grant::ClientCredentials)
            }
            Some(GrantKind::Password) => {
                const G: &str = "grant = \"password\"";
                let username = self.required(&c.username, place, "username", G, "\"svc-account\"");
                let password = self.required(
                    &c.password,
                    place,
                    "password",
                    G,
                    "{ env = \"ACCOUNT_PASSWORD\" }",
                );
                let username = username.map(|u| u.get_ref().clone());
                let password = password.and_then(|p| self.secret(p, place, "password"));
                username
                    .zip(password)
                    .map(|(username, password)| Grant::Password { username, password })
            }
            Some(GrantKind::JwtBearer) => self.jwt_bearer(
                c,
                place,
                client_id.map(|id| id.get_ref().as_str()),
                token_url.as_ref(),
            ),
            None => None,
        };
        // With jwt_bearer, private_key (and certificate, client_assertion_alg) sign the grant:
        // they are not the client authentication's to refuse.
        let grant_signs = grant_kind == Some(GrantKind::JwtBearer);
        let signing_keys = |c: &RawConnector| {
            [
                ("certificate", c.certificate.is_some() && !grant_signs),
                ("private_key", c.private_key.is_some() && !grant_signs),
                (
                    "client_assertion_alg",
                    c.client_assertion_alg.is_some() && !grant_signs,
                ),
            ]
        };
        let method = c.client_auth.as_ref().map_or(
            if grant_signs && c.client_secret.is_none() {
                ClientAuthKind::None
            } else {
                ClientAuthKind::ClientSecretBasic
            },
            |m| *m.get_ref(),
        );
        if grant_signs
            && method != ClientAuthKind::ClientSecretJwt
            && let Some(alg) = c
                .client_assertion_alg
                .as_ref()
                .filter(|a| a.get_ref().hmac_key_bytes().is_some())
        {
            // It would otherwise be ignored, and client_secret sent as it is.
            self.problem(Some(alg.span()), place, format!(
                "client_assertion_alg {} is for client_auth = \"client_secret_jwt\", which is not set; set it, or remove client_assertion_alg (the grant signs with the key's own algorithm)",
                alg.get_ref().name()
            ));
        }
        let client_auth = match method {
            ClientAuthKind::None if grant_signs => {
                self.unused(
                    place,
                    "client_auth = \"none\"",
                    &[("client_secret", c.client_secret.is_some())],
                );
                Some(ClientAuth::None)
            }
            ClientAuthKind::None => {
                self.problem(
                    self.connector_key("client_auth"),
                    place,
                    "client_auth = \"none\" applies to grant = \"jwt_bearer\" only: this grant needs the client to authenticate; use client_secret_basic, client_secret_post, client_secret_jwt, private_key_jwt or tls_client_auth",
                );
                None
            }
            ClientAuthKind::ClientSecretBasic | ClientAuthKind::ClientSecretPost => {
                let ctx = if method == ClientAuthKind::ClientSecretPost {
                    "client_auth = \"client_secret_post\""
                } else {
                    "client_auth = \"client_secret_basic\""
                };
                self.unused(place, ctx, &signing_keys(c));
                let secret = self.required(
                    &c.client_secret,
                    place,
                    "client_secret",
                    ctx,
                    "{ env = \"CLIENT_SECRET\" }",
                );
                secret
                    .and_then(|s| self.secret(s, place, "client_secret"))
                    .map(|s| {
                        if method == ClientAuthKind::ClientSecretPost {
                            ClientAuth::SecretPost(s)
                        } else {
                            ClientAuth::SecretBasic(s)
                        }
                    })
            }
            ClientAuthKind::PrivateKeyJwt => {
                self.unused(
                    place,
                    "client_auth = \"private_key_jwt\"",
                    &[("client_secret", c.client_secret.is_some())],
                );
                let wanted = c.client_assertion_alg.as_ref().map(|a| *a.get_ref());
                let identity = self.identity(c, place, "private_key_jwt")?;
                let alg = self.assertion_alg(&identity, wanted, place)?;
                Some(ClientAuth::PrivateKeyJwt { identity, alg })
            }
            ClientAuthKind::ClientSecretJwt => self.secret_jwt(c, place, grant_signs),
            ClientAuthKind::TlsClientAuth => {
                self.unused(
                    place,
                    "client_auth = \"tls_client_auth\"",
                    &[
                        ("client_secret", c.client_secret.is_some()),
                        (
                            "client_assertion_alg",
                            c.client_assertion_alg.is_some() && !grant_signs,
                        ),
                    ],
                );
                self.identity(c, place, "tls_client_auth")
                    .map(ClientAuth::TlsClientAuth)
            }
        };
        if let Some(params) = &c.extra_params {
            for name in params.get_ref().keys() {
                if PROXY_SET_PARAMS.contains(&name.as_str()) {
                    let mut path = self.here_path.clone();
                    path.extend(["extra_params".to_owned(), name.clone()]);
                    let span = self.key_span(&path).or_else(|| Some(params.span()));
                    self.problem(span, place, format!(
                        "extra_params must not set {name:?}: the proxy sets it from the connector's \
                         own keys ({}); remove it from extra_params",
                        match name.as_str() {
                            "grant_type" => "grant",
                            "client_id" => "client_id",
                            "client_secret" | "client_assertion" | "client_assertion_type" => "client_auth",
                            "username" | "password" | "refresh_token" => "grant = \"password\"",
                            "assertion" => "grant = \"jwt_bearer\"",
                            _ => "scope",
                        }
                    ));
                }
            }
        }
        Some(OAuthClient {
            token_url: token_url?,
            client_id: client_id?.get_ref().clone(),
            grant: grant?,
            client_auth: client_auth?,
            scope: c.scope.as_ref().map(|s| s.get_ref().clone()),
            extra_params: c
                .extra_params
                .as_ref()
                .map(|p| p.get_ref().clone().into_iter().collect())
                .unwrap_or_default(),
        })
    }
}

mod egress;
mod jwt_bearer;
mod limits;
mod secret_jwt;
mod telemetry;
#[cfg(test)]
mod tests;
