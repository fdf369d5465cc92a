//! The running application: the proxy's routes, the metrics, and reloading.
//!
//! A reload reads the file again, validates it whole and, only if it is good, swaps in new
//! routes at once; requests in flight finish on the routes they started with. Connectors whose
//! configuration did not change are carried over with their cached tokens, provided the
//! upstream and OAuth settings they were built with did not change either.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http::header::AUTHORIZATION;
use http::{Method, Request};
use http_body_util::{Either, Full};

use crate::cluster::Cluster;
use crate::config::{
    ClusterSettings, Config, OAuthSettings, ServerSettings, TelemetrySettings, UpstreamSettings,
};
use crate::credentials::Credentials;
use crate::forward::{self, Upstream};
use crate::metrics::{Metrics, ReloadLabels};
use crate::proxy::{Proxy, Routes};
use crate::registry::{Connector, Registry, RegistryError, Validation};
use crate::telemetry::trace::Tracer;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cluster.redis_url is not a Redis URL the client takes: {0}")]
    Cluster(String),
}

pub struct App {
    pub proxy: Proxy,
    pub metrics: Arc<Metrics>,
    pub config_path: PathBuf,
    /// Set once the listeners are up.
    pub ready: AtomicBool,
    /// With `[cluster]`: the Redis the replicas share tokens through (for the process's life;
    /// a reload that changes `[cluster]` takes effect at the next start).
    pub cluster: Option<Arc<Cluster>>,
    loaded: Mutex<Loaded>,
    reloading: tokio::sync::Mutex<()>,
}

/// What the current routes were built from.
struct Loaded {
    upstream: UpstreamSettings,
    oauth: OAuthSettings,
    server: ServerSettings,
    cluster: Option<ClusterSettings>,
    telemetry: Option<TelemetrySettings>,
    /// The configuration file and the files it names.
    files: Vec<PathBuf>,
    at: SystemTime,
}

impl App {
    pub fn new(config: &Config) -> Result<Arc<Self>, BuildError> {
        let metrics = Arc::new(match &config.cluster {
            Some(_) => Metrics::with_cluster(),
            None => Metrics::new(),
        });
        let cluster = match &config.cluster {
            Some(settings) => Some(
                Cluster::start(settings, &config.upstream.extra_roots, metrics.clone())
                    // The URL may hold a password: the error kind only.
                    .map_err(|e| BuildError::Cluster(format!("{:?}", e.kind())))?,
            ),
            None => None,
        };
        let routes = build_routes(config, None, &metrics, cluster.as_ref())?;
        let tracer = match &config.telemetry {
            Some(settings) => {
                // An https:// collector is verified as upstreams are; the exporter speaks
                // HTTP/1.1 only.
                let mut tls = (*forward::tls_config(&config.upstream, None)?).clone();
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Tracer::start(
                    settings,
                    Arc::new(tls),
                    metrics.spans.clone(),
                ))
            }
            None => None,
        };
        let app = Arc::new(Self {
            proxy: Proxy::new(config, routes, metrics.clone(), tracer),
            metrics,
            config_path: config.path.clone(),
            ready: AtomicBool::new(false),
            cluster,
            loaded: Mutex::new(Loaded::of(config)),
            reloading: tokio::sync::Mutex::new(()),
        });
        Ok(app)
    }

    /// Whether an admin request may be served: always without `server.admin_token`, else only
    /// with exactly one `Authorization` carrying it, as `Bearer <admin_token>` or as the
    /// password of `Basic` (how a browser sends it for the status page). Read from the running
    /// configuration, so that a reload rotates the token.
    pub fn admin_authorized(&self, headers: &http::HeaderMap) -> bool {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let Some(expected) = &loaded.server.admin_token else {
            return true;
        };
        let mut values = headers.get_all(AUTHORIZATION).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => crate::secret::bearer_token(value.as_bytes())
                .or_else(|| crate::secret::basic_password(value.as_bytes()))
                .is_some_and(|token| expected.matches(&token)),
            _ => false,
        }
    }

    /// With `server.reload_on_change`, the files whose change reloads the configuration: the
    /// file itself and the secret and CA files it names. `None` when it is off.
    pub fn watched_files(&self) -> Option<Vec<PathBuf>> {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loaded.server.reload_on_change.then(|| loaded.files.clone())
    }

    pub fn loaded_at(&self) -> SystemTime {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).at
    }

    /// Reads the configuration file again and, if it is valid, serves from it. On error the
    /// running configuration stays and the problems are returned, one per line.
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.try_reload().await;
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels { outcome })
            .inc();
        match &result {
            Ok(()) => tracing::info!(file = %self.config_path.display(), "configuration reloaded"),
            Err(problems) => {
                for problem in problems {
                    tracing::error!(file = %self.config_path.display(), problem = %problem, "reload refused; the running configuration stays");
                }
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<(), Vec<String>> {
        let path = self.config_path.clone();
        let config = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| vec![format!("reload task failed: {e}")])?
            .map_err(|e| match e {
                crate::config::ConfigError::Invalid { path, problems } => {
                    problems.iter().map(|p| p.display_in(&path)).collect()
                }
                other => vec![other.to_string()],
            })?;
        let current = self.proxy.routes();
        let (reuse, restart_only) = {
            let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            let same = loaded.upstream == config.upstream && loaded.oauth == config.oauth;
            (same, restart_only_changes(&loaded.server, &config.server))
        };
        let (replay_memory_changed, cluster_changed, telemetry_changed) = {
            let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            (
                loaded.upstream.replay_memory != config.upstream.replay_memory,
                loaded.cluster != config.cluster,
                loaded.telemetry != config.telemetry,
            )
        };
        let restart_only = restart_only
            .into_iter()
            .chain(replay_memory_changed.then_some("upstream.replay_memory"))
            .chain(cluster_changed.then_some("cluster"))
            .chain(telemetry_changed.then_some("telemetry"));
        for key in restart_only {
            tracing::warn!(
                key,
                "changed in the file, but takes effect only after a restart"
            );
        }
        let previous = reuse.then_some(&*current);
        let routes = build_routes(&config, previous, &self.metrics, self.cluster.as_ref())
            .map_err(|e| vec![e.to_string()])?;
        self.proxy.swap(routes);
        self.forget_removed_series();
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = Loaded::of(&config);
        self.validate_connectors();
        Ok(())
    }

    /// Drops the metric series of connectors the running configuration no longer has, and the
    /// token gauge of connectors no longer OAuth and the validation gauge of those no longer
    /// validated. Done at every reload, so that a request still in flight on a removed
    /// connector, which brings its series back, is cleaned up by the next one.
    fn forget_removed_series(&self) {
        let routes = self.proxy.routes();
        let find = |org: &str, name: &str| routes.registry.org(org).and_then(|o| o.connector(name));
        self.metrics
            .retain_connectors(&|org, name| find(org, name).is_some());
        self.metrics.token_expiry.retain(&|org, name| {
            find(org, name).is_some_and(|c| matches!(c.credentials, Credentials::OAuth(_)))
        });
        self.metrics.validation_ok.retain(&|org, name| {
            find(org, name).is_some_and(|c| c.config.validation_url.is_some())
        });
    }

    /// `check --online`: fetches each OAuth connector's token once and calls each Basic
    /// connector's validation URL, in parallel. One row per connector: org, name, auth, and
    /// `Ok(what was checked)` or `Err(why not)`.
    pub async fn check_online(
        &self,
    ) -> Vec<(String, String, &'static str, Result<String, String>)> {
        let routes = self.proxy.routes();
        let checks = routes.registry.connectors().into_iter().map(|connector| {
            let connector = connector.clone();
            tokio::spawn(async move {
                let result = match (
                    &connector.credentials,
                    connector.config.validation_url.clone(),
                ) {
                    (Credentials::OAuth(source), _) => match source.authorization().await {
                        Ok(_) => Ok("token obtained".to_owned()),
                        Err(e) => Err(e.to_string()),
                    },
                    (Credentials::Basic(_) | Credentials::ApiKey { .. }, Some(url)) => {
                        match validate(&connector, url).await {
                            Validation::Ok { .. } => Ok("validation URL answered 2xx".to_owned()),
                            Validation::Failed { error, .. } => Err(error),
                            Validation::None | Validation::Pending => Err("not checked".to_owned()),
                        }
                    }
                    (Credentials::Basic(_) | Credentials::ApiKey { .. }, None) => {
                        Ok("no validation_url to call".to_owned())
                    }
                };
                (
                    connector.org.clone(),
                    connector.name.clone(),
                    connector.config.auth.kind(),
                    result,
                )
            })
        });
        let mut rows = Vec::new();
        for check in checks.collect::<Vec<_>>() {
            if let Ok(row) = check.await {
                rows.push(row);
            }
        }
        rows
    }

    /// Checks every Basic and API-key connector's `validation_url` in the background (GET with its
    /// credentials; 2xx is valid). Reported, not enforced: requests flow either way.
    pub fn validate_connectors(&self) {
        let routes = self.proxy.routes();
        for connector in routes.registry.connectors() {
            let Some(url) = connector.config.validation_url.clone() else {
                continue;
            };
            let connector = connector.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                let validation = validate(&connector, url).await;
                let ok = i64::from(matches!(validation, Validation::Ok { .. }));
                metrics.validation_ok.with(&connector.labels, |g| g.set(ok));
                if let Validation::Failed { error, .. } = &validation {
                    tracing::warn!(org = %connector.org, connector = %connector.name, %error, "connector validation failed");
                }
                connector.set_validation(validation);
            });
        }
    }
}

impl Loaded {
    fn of(config: &Config) -> Self {
        Self {
            upstream: config.upstream.clone(),
            oauth: config.oauth.clone(),
            server: config.server.clone(),
            cluster: config.cluster.clone(),
            telemetry: config.telemetry.clone(),
            files: std::iter::once(config.path.clone())
                .chain(config.files.iter().cloned())
                .collect(),
            at: SystemTime::now(),
        }
    }
}

/// Server settings a reload cannot apply to listeners and limits already running.
fn restart_only_changes(old: &ServerSettings, new: &ServerSettings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("server.listen");
    }
    if old.admin_listen != new.admin_listen {
        changed.push("server.admin_listen");
    }
    if old.max_concurrent_requests != new.max_concurrent_requests {
        changed.push("server.max_concurrent_requests");
    }
    if old.header_read_timeout != new.header_read_timeout
        || old.max_header_bytes != new.max_header_bytes
    {
        changed.push("server.header_read_timeout / max_header_bytes");
    }
    if old.shutdown_grace != new.shutdown_grace {
        changed.push("server.shutdown_grace");
    }
    changed
}

/// New routes for `config`; with `previous`, its upstream client and unchanged connectors are
/// kept.
fn build_routes(
    config: &Config,
    previous: Option<&Routes>,
    metrics: &Arc<Metrics>,
    cluster: Option<&Arc<Cluster>>,
) -> Result<Routes, BuildError> {
    let upstream = match previous {
        Some(routes) => routes.upstream.clone(),
        None => Upstream::new(
            &config.upstream,
            forward::tls_config(&config.upstream, None)?,
            metrics.handshakes(),
        )?,
    };
    let previous = previous.map(|r| &r.registry);
    let registry = Registry::new(config, &upstream, metrics, previous, cluster)?;
    Ok(Routes::new(registry, upstream, config))
}

/// Calls `url` with the connector's credentials, through the connector's client.
async fn validate(connector: &Connector, url: http::Uri) -> Validation {
    let upstream = &connector.upstream;
    let at = SystemTime::now();
    let value = match &connector.credentials {
        Credentials::Basic(value) | Credentials::ApiKey { value, .. } => value,
        Credentials::OAuth(_) => return Validation::None,
    };
    let mut request = Request::new(Either::Right(Full::default()));
    *request.method_mut() = Method::GET;
    let mut uri = url;
    let placement = connector.credentials.placement();
    placement.apply(&mut uri, request.headers_mut(), value);
    *request.uri_mut() = uri;
    let deadline = tokio::time::Instant::now() + upstream.request_timeout();
    match upstream.send(request, deadline).await {
        Ok(response) if response.status().is_success() => Validation::Ok { at },
        Ok(response) => Validation::Failed {
            at,
            error: format!("the validation URL answered {}", response.status()),
        },
        Err(e) => Validation::Failed {
            at,
            error: e.to_string(),
        },
    }
}
