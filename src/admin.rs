//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status` and `POST /reload`. It reads
//! shared state and serves no proxy traffic.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::app::App;
use crate::config::AuthConfig;
use crate::credentials::Credentials;
use crate::metrics::{Format, RequestCounts};
use crate::registry::{Connector, Validation};

pub async fn handle<B>(app: &App, request: Request<B>) -> Response<Full<Bytes>> {
    // Probes need no secret; everything else does where `server.admin_token` is set.
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz");
    if !probe && !app.admin_authorized(request.headers()) {
        let mut response = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({
                "error": "admin_auth_required",
                "message": "this admin listener needs Authorization: Bearer <server.admin_token>",
            }),
        );
        // The status page is opened in a browser, which prompts for Basic credentials: the
        // token goes in as the password (any user name), and the browser then sends it with
        // the page's own requests to /status.
        let challenge = if request.uri().path() == "/" {
            "Basic realm=\"connector-proxy admin: the password is server.admin_token\", charset=\"UTF-8\""
        } else {
            "Bearer"
        };
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        return response;
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            refresh_token_gauges(app);
            app.metrics
                .count_dropped_log_lines(crate::telemetry::dropped_lines());
            let accept = request.headers().get(ACCEPT).map(HeaderValue::as_bytes);
            let format = Format::negotiate(accept);
            text(
                StatusCode::OK,
                format.content_type(),
                app.metrics.encode(format),
            )
        }
        (&Method::GET, "/") => {
            let mut page = text(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE.into());
            // Everything the page needs is in it and its requests to /status.
            page.headers_mut().insert(
                http::header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                ),
            );
            page
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            if app.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting\n".into(),
                )
            }
        }
        (&Method::GET, "/status") => json_response(StatusCode::OK, &status(app)),
        (&Method::POST, "/reload") => match app.reload().await {
            Ok(()) => json_response(
                StatusCode::OK,
                &json!({ "reloaded": true, "file": app.config_path }),
            ),
            Err(errors) => json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "reloaded": false, "errors": errors }),
            ),
        },
        (_, "/" | "/metrics" | "/healthz" | "/readyz" | "/status" | "/reload") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try / (the status page), /metrics, /healthz, /readyz, /status or POST /reload\n".into(),
        ),
    }
}

/// `connector_proxy_token_expiry_seconds` is a reading, taken at scrape time.
fn refresh_token_gauges(app: &App) {
    for connector in app.proxy.routes().registry.connectors() {
        if let Credentials::OAuth(source) = &connector.credentials {
            let left = source.status().valid_for.map_or(0.0, |d| d.as_secs_f64());
            app.metrics
                .token_expiry
                .with(&connector.labels, |g| g.set(left));
        }
    }
}

fn unix(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64().floor())
}

/// Each org and connector with its state. Built from names, kinds and timings only: there is no
/// field through which a secret could pass.
fn status(app: &App) -> Value {
    let routes = app.proxy.routes();
    let mut totals = app.metrics.request_counts();
    let (window, mut recent) = app.metrics.recent_request_counts();
    let orgs: Vec<Value> = routes
        .registry
        .orgs()
        .into_iter()
        .map(|org| {
            json!({
                "org": &*org.name,
                "inbound_token": org.inbound_token.is_some(),
                "connectors": org.connectors().into_iter().map(|c| connector_status(c, &mut totals, &mut recent)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut out = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config": app.config_path,
        "loaded_at": unix(app.loaded_at()),
        "recent_seconds": window.as_secs(),
        "orgs": orgs,
    });
    if let Some(cluster) = &app.cluster {
        let health = cluster.health();
        out["cluster"] = json!({
            "state": if health.up { "up" } else { "down" },
            "since": unix(health.since),
            "last_error": health.last_error,
            "replica": cluster.replica(),
        });
    }
    out
}

/// The status page: one file, no external assets, refreshed from `/status`.
const STATUS_PAGE: &str = include_str!("admin/status.html");

fn connector_status(
    c: &Connector,
    totals: &mut RequestCounts,
    recent: &mut RequestCounts,
) -> Value {
    let mut out = json!({
        "connector": c.name,
        "auth": c.config.auth.kind(),
        "resource_domain": c.resource_domain.to_string(),
    });
    if let AuthConfig::OAuth2(client) = &c.config.auth {
        out["grant"] = json!(client.grant_kind().as_str());
        out["client_auth"] = json!(client.client_auth.kind().as_str());
        out["token_url"] = json!(client.token_url.to_string());
    }
    if let Credentials::OAuth(source) = &c.credentials {
        let status = source.status();
        out["token"] = json!({
            "state": if status.valid_for.is_some() { "valid" } else { "none" },
            "seconds_left": status.valid_for.map(|d| d.as_secs_f64().floor()),
        });
        if let Some(error) = status.last_error {
            out["last_error"] = json!({ "message": error, "at": status.last_error_at.map(unix) });
        }
    }
    let key = (c.labels.org.clone(), c.labels.connector.clone());
    out["requests"] = json!(totals.remove(&key).unwrap_or_default());
    out["recent_requests"] = json!(recent.remove(&key).unwrap_or_default());
    out["validation"] = match c.validation() {
        Validation::None => json!({ "state": "none" }),
        Validation::Pending => json!({ "state": "pending" }),
        Validation::Ok { at } => json!({ "state": "ok", "at": unix(at) }),
        Validation::Failed { at, error } => {
            json!({ "state": "failed", "at": unix(at), "error": error })
        }
    };
    out
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    text(status, "application/json", value.to_string())
}
