//! Orgs and their connectors as the request path sees them, built from a validated config.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fnv::FnvHashMap;

use crate::cluster::Cluster;
use crate::config::{
    AuthConfig, ClientAuth, Config, ConnectorConfig, EgressChoice, Grant, KeyPlacement, OAuthClient,
};
use crate::credentials::oauth::assertion::{AssertionError, AssertionSigner};
use crate::credentials::oauth::token_client::TokenEndpoint;
use crate::credentials::oauth::{Shared, TokenSource};
use crate::credentials::{Credentials, Placement, api_key, basic_header};
use crate::forward::{self, Upstream};
use crate::limits::Limits;
use crate::metrics::{ConnectorLabels, ConnectorSeries, Metrics, connector_labels};
use crate::secret::Secret;
use crate::target::ResourceDomain;

/// A connector whose credentials could not be set up although its configuration validated
/// (a client certificate rustls refuses, say).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "orgs.{org}.connectors.{connector:?}: the client certificate cannot be used for TLS: {source}"
    )]
    ClientTls {
        org: String,
        connector: String,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "orgs.{org}.connectors.{connector:?}: cannot build the TLS configuration for its egress_proxy: {source}"
    )]
    EgressTls {
        org: String,
        connector: String,
        #[source]
        source: rustls::Error,
    },
    #[error("orgs.{org}.connectors.{connector:?}: {source}")]
    Assertion {
        org: String,
        connector: String,
        #[source]
        source: AssertionError,
    },
}

/// Orgs and connectors are looked up by the names a request sends, hashed with FNV: the maps
/// are built from the configuration and never grow from a request, so a caller's names cannot
/// pile up in one bucket, and SipHash took 160 instructions a lookup (BENCHMARKS finding 57).
#[derive(Debug)]
pub struct Registry {
    orgs: FnvHashMap<String, Org>,
}

#[derive(Debug)]
pub struct Org {
    pub name: Arc<str>,
    pub inbound_token: Option<Secret>,
    connectors: FnvHashMap<String, Arc<Connector>>,
}

#[derive(Debug)]
pub struct Connector {
    pub org: String,
    pub name: String,
    /// Its org and name as metric labels, made once.
    pub labels: ConnectorLabels,
    /// Its request series, counted without a lookup by `labels`.
    pub series: ConnectorSeries,
    pub resource_domain: ResourceDomain,
    /// The resource domain's host without an IPv6 address's brackets, as spans name the
    /// target (`server.address`), made once.
    pub address: Arc<str>,
    pub credentials: Credentials,
    /// The client its requests, token requests and validation calls go through: the shared
    /// one, or one of its own where it chose its own `egress_proxy` (or `"none"`).
    pub upstream: Upstream,
    /// `max_concurrent` and `rate_limit`.
    pub limits: Limits,
    /// What it was built from: a reload keeps a connector (and its token) whose
    /// configuration is unchanged.
    pub config: ConnectorConfig,
    pub validation: Mutex<Validation>,
}

/// The last check of a Basic or API-key connector's `validation_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// No validation URL configured.
    None,
    Pending,
    Ok {
        at: SystemTime,
    },
    Failed {
        at: SystemTime,
        error: String,
    },
}

impl Connector {
    pub fn validation(&self) -> Validation {
        self.validation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_validation(&self, validation: Validation) {
        *self.validation.lock().unwrap_or_else(|p| p.into_inner()) = validation;
    }
}

impl Registry {
    /// Builds every connector's credentials. Token requests go through `upstream`, or through
    /// a client of their own where the connector authenticates with a TLS client certificate.
    /// Connectors of `previous` whose configuration is unchanged are kept as they are, cached
    /// token included, when `previous` was built with the same upstream and OAuth settings.
    pub fn new(
        config: &Config,
        upstream: &Upstream,
        metrics: &Arc<Metrics>,
        previous: Option<&Registry>,
        cluster: Option<&Arc<Cluster>>,
    ) -> Result<Self, RegistryError> {
        let mut orgs = FnvHashMap::default();
        // One client per egress choice other than the shared one, for the connectors that
        // made it.
        let mut own: Vec<(&EgressChoice, Upstream)> = Vec::new();
        for org in config.orgs.values() {
            let mut connectors = FnvHashMap::default();
            for c in org.connectors.values() {
                let kept = previous
                    .and_then(|p| p.org(&c.org))
                    .and_then(|o| o.connector(&c.name))
                    .filter(|old| old.config == *c);
                let connector = match kept {
                    Some(old) => old.clone(),
                    None => {
                        let labels = connector_labels(&c.org, &c.name);
                        let upstream = match (&c.egress, own.iter().find(|(e, _)| **e == c.egress))
                        {
                            (EgressChoice::Inherit, _) => upstream.clone(),
                            (_, Some((_, made))) => made.clone(),
                            (choice, None) => {
                                let made = own_upstream(c, config, metrics)?;
                                own.push((choice, made.clone()));
                                made
                            }
                        };
                        Arc::new(Connector {
                            org: c.org.clone(),
                            name: c.name.clone(),
                            credentials: credentials(
                                c, &labels, config, &upstream, metrics, cluster,
                            )?,
                            upstream,
                            limits: Limits::new(
                                &c.limits,
                                cluster.map(|cluster| {
                                    (cluster.clone(), cluster.rate_name(&rate_identity(c)))
                                }),
                            ),
                            labels,
                            series: ConnectorSeries::default(),
                            resource_domain: c.resource_domain.clone(),
                            address: unbracketed(c.resource_domain.host()).into(),
                            config: c.clone(),
                            validation: Mutex::new(if c.validation_url.is_some() {
                                Validation::Pending
                            } else {
                                Validation::None
                            }),
                        })
                    }
                };
                connectors.insert(c.name.clone(), connector);
            }
            let inbound_token = org.inbound_token.clone();
            orgs.insert(
                org.name.clone(),
                Org {
                    name: org.name.as_str().into(),
                    inbound_token,
                    connectors,
                },
            );
        }
        Ok(Self { orgs })
    }

    pub fn org(&self, name: &str) -> Option<&Org> {
        self.orgs.get(name)
    }

    /// The org to use when a request names none: only when there is exactly one.
    pub fn only_org(&self) -> Option<&Org> {
        if self.orgs.len() == 1 {
            self.orgs.values().next()
        } else {
            None
        }
    }

    /// Every connector, ordered by org and name.
    pub fn connectors(&self) -> Vec<&Arc<Connector>> {
        self.orgs().into_iter().flat_map(Org::connectors).collect()
    }

    /// Every org, ordered by name.
    pub fn orgs(&self) -> Vec<&Org> {
        let mut orgs: Vec<_> = self.orgs.values().collect();
        orgs.sort_by(|a, b| a.name.cmp(&b.name));
        orgs
    }
}

impl Org {
    pub fn connector(&self, name: &str) -> Option<&Arc<Connector>> {
        self.connectors.get(name)
    }

    /// This org's connectors, ordered by name.
    pub fn connectors(&self) -> Vec<&Arc<Connector>> {
        let mut connectors: Vec<_> = self.connectors.values().collect();
        connectors.sort_by(|a, b| a.name.cmp(&b.name));
        connectors
    }
}

/// A client for a connector that chose its own `egress_proxy` (or none).
fn own_upstream(
    c: &ConnectorConfig,
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Upstream, RegistryError> {
    let settings = config.upstream.for_connector(&c.egress);
    forward::tls_config(&settings, None)
        .and_then(|tls| Upstream::new(&settings, tls, metrics.handshakes()))
        .map_err(|source| RegistryError::EgressTls {
            org: c.org.clone(),
            connector: c.name.clone(),
            source,
        })
}

fn credentials(
    c: &ConnectorConfig,
    labels: &ConnectorLabels,
    config: &Config,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    cluster: Option<&Arc<Cluster>>,
) -> Result<Credentials, RegistryError> {
    let client = match &c.auth {
        AuthConfig::Basic { username, password } => {
            return Ok(Credentials::Basic(basic_header(
                username,
                password.expose(),
            )));
        }
        AuthConfig::ApiKey(key) => {
            let (placement, prefix) = match &key.placement {
                KeyPlacement::Header { name, prefix } => {
                    (Placement::Header(name.clone()), &**prefix)
                }
                KeyPlacement::Query { param } => (Placement::Query(param.clone()), ""),
            };
            return Ok(api_key(placement, prefix, key.value.expose()));
        }
        AuthConfig::OAuth2(client) => client,
    };
    let (token_upstream, signer) = match &client.client_auth {
        ClientAuth::TlsClientAuth(identity) => {
            let settings = config.upstream.for_connector(&c.egress);
            let client = forward::tls_config(&settings, Some(identity))
                .and_then(|tls| Upstream::new(&settings, tls, metrics.handshakes()))
                .map_err(|source| RegistryError::ClientTls {
                    org: c.org.clone(),
                    connector: c.name.clone(),
                    source,
                })?;
            (client, None)
        }
        ClientAuth::PrivateKeyJwt { identity, alg } => {
            let signer = AssertionSigner::new(identity, *alg).map_err(|source| {
                RegistryError::Assertion {
                    org: c.org.clone(),
                    connector: c.name.clone(),
                    source,
                }
            })?;
            (upstream.clone(), Some(signer))
        }
        ClientAuth::SecretJwt { secret, alg } => {
            let signer =
                AssertionSigner::hmac(secret, *alg).map_err(|source| RegistryError::Assertion {
                    org: c.org.clone(),
                    connector: c.name.clone(),
                    source,
                })?;
            (upstream.clone(), Some(signer))
        }
        ClientAuth::SecretBasic(_) | ClientAuth::SecretPost(_) | ClientAuth::None => {
            (upstream.clone(), None)
        }
    };
    let grant_signer = match &client.grant {
        Grant::JwtBearer(grant) => Some(AssertionSigner::new(&grant.key, grant.alg).map_err(
            |source| RegistryError::Assertion {
                org: c.org.clone(),
                connector: c.name.clone(),
                source,
            },
        )?),
        Grant::ClientCredentials | Grant::Password { .. } => None,
    };
    let endpoint = TokenEndpoint::new(
        (**client).clone(),
        token_upstream,
        signer,
        grant_signer,
        config.oauth.token_timeout,
    );
    let shared = cluster.map(|cluster| Shared {
        name: cluster.entry_name(&token_identity(c, client)),
        cluster: cluster.clone(),
    });
    Ok(Credentials::OAuth(TokenSource::new(
        labels.clone(),
        endpoint,
        config.oauth.clone(),
        metrics.clone(),
        shared,
    )))
}

/// Everything that decides a connector's shared rate limit: a change starts a fresh budget.
fn rate_identity(c: &ConnectorConfig) -> Vec<String> {
    let rate = c.limits.rate.as_ref().map(ToString::to_string);
    vec![c.org.clone(), c.name.clone(), rate.unwrap_or_default()]
}

/// Everything that decides a connector's token: a change to any of it starts a new shared entry.
fn token_identity(c: &ConnectorConfig, client: &OAuthClient) -> Vec<String> {
    let username = match &client.grant {
        Grant::Password { username, .. } => username.clone(),
        Grant::ClientCredentials => String::new(),
        // Its three parts follow, each a part of its own.
        Grant::JwtBearer(_) => String::new(),
    };
    let mut identity = vec![
        c.org.clone(),
        c.name.clone(),
        client.token_url.to_string(),
        format!("{:?}", client.grant_kind()),
        format!("{:?}", client.client_auth.kind()),
        client.client_id.clone(),
        client.scope.clone().unwrap_or_default(),
        username,
    ];
    if let Grant::JwtBearer(grant) = &client.grant {
        identity.extend([
            grant.issuer.clone(),
            grant.subject.clone(),
            grant.audience.clone(),
        ]);
    }
    for (key, value) in &client.extra_params {
        identity.push(format!("{key}={value}"));
    }
    identity
}

/// A host as spans name it: an IPv6 address without its URI brackets.
fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}
