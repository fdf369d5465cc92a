//! The error contract: every error the proxy itself makes, and the one function that turns it
//! into a response (JSON body, `X-Proxy-Error` header), so that a flow can tell the proxy's
//! answers from the upstream's.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, PROXY_AUTHENTICATE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::credentials::CredentialError;
use crate::forward::ForwardError;
use crate::limits::Limited;
use crate::target::TargetError;

pub const X_PROXY_ERROR: &str = "x-proxy-error";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("the request has no {0} header; name the custom connector to use in it")]
    MissingConnectorHeader(String),
    #[error("send exactly one {0} header, with one connector name")]
    DuplicateConnectorHeader(String),
    #[error(
        "the request has no {0} header, and more than one org is configured; name the org in it"
    )]
    MissingOrgHeader(String),
    #[error("send exactly one {0} header, with one org id")]
    DuplicateOrgHeader(String),
    #[error("{0}")]
    BadTarget(String),
    #[error("the request body could not be read: {0}")]
    BadRequestBody(String),
    #[error("{0}; only targets inside the connector's resource domain {1} are forwarded")]
    TargetOutside(String, String),
    #[error("{0}")]
    AddressDenied(String),
    #[error("no connector of this name in this org; check the connector name (matching is exact)")]
    UnknownConnector,
    #[error("no org of this id is configured; check the org header")]
    UnknownOrg,
    #[error(
        "CONNECT is not supported: credentials cannot be added inside a tunnel; send the request itself to the proxy"
    )]
    ConnectNotSupported,
    #[error("this org requires Proxy-Authorization: Bearer <inbound token>")]
    ProxyAuthRequired,
    #[error("{0}")]
    TokenUnavailable(String, Option<String>),
    #[error("{0}")]
    UpstreamUnreachable(String),
    #[error(
        "{0}; the upstream's certificate must be valid for its name and trusted (web roots or upstream.extra_ca_file)"
    )]
    UpstreamTls(String),
    #[error(
        "the proxy is at its limit of concurrent requests (server.max_concurrent_requests); retry shortly"
    )]
    Overloaded,
    #[error(
        "this connector already has its max_concurrent = {0} requests in flight; retry when one has finished"
    )]
    ConnectorBusy(usize),
    #[error(
        "this connector's rate_limit ({rate}) is spent; retry after {retry_after} s (Retry-After)"
    )]
    ConnectorRateLimited { retry_after: u64, rate: String },
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("{0}")]
    TokenTimeout(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            MissingConnectorHeader(_)
            | DuplicateConnectorHeader(_)
            | MissingOrgHeader(_)
            | DuplicateOrgHeader(_)
            | BadTarget(_)
            | BadRequestBody(_) => StatusCode::BAD_REQUEST,
            TargetOutside(..) | AddressDenied(_) => StatusCode::FORBIDDEN,
            UnknownConnector | UnknownOrg => StatusCode::NOT_FOUND,
            ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            TokenUnavailable(..) | UpstreamUnreachable(_) | UpstreamTls(_) => {
                StatusCode::BAD_GATEWAY
            }
            Overloaded | ConnectorBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ConnectorRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            UpstreamTimeout(_) | TokenTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The contract's code; a duplicated header is reported under its "missing" code, as the
    /// request does not name one connector (or org).
    pub fn code(&self) -> &'static str {
        use ProxyError::*;
        match self {
            MissingConnectorHeader(_) | DuplicateConnectorHeader(_) => "missing_connector_header",
            MissingOrgHeader(_) | DuplicateOrgHeader(_) => "missing_org_header",
            BadTarget(_) | BadRequestBody(_) => "bad_target",
            TargetOutside(..) => "target_outside_resource_domain",
            AddressDenied(_) => "target_address_denied",
            UnknownConnector => "unknown_connector",
            UnknownOrg => "unknown_org",
            ConnectNotSupported => "connect_not_supported",
            ProxyAuthRequired => "proxy_auth_required",
            TokenUnavailable(..) => "token_unavailable",
            UpstreamUnreachable(_) => "upstream_unreachable",
            UpstreamTls(_) => "upstream_tls_error",
            Overloaded => "overloaded",
            ConnectorBusy(_) => "connector_busy",
            ConnectorRateLimited { .. } => "connector_rate_limited",
            UpstreamTimeout(_) => "upstream_timeout",
            TokenTimeout(_) => "token_timeout",
        }
    }

    /// `busy` or `rate` for a request a connector's limit turned away.
    pub fn limited(&self) -> Option<&'static str> {
        match self {
            Self::ConnectorBusy(_) => Some("busy"),
            Self::ConnectorRateLimited { .. } => Some("rate"),
            _ => None,
        }
    }

    pub fn target(error: TargetError, domain: &impl std::fmt::Display) -> Self {
        match error {
            TargetError::Malformed(why) => Self::BadTarget(why.to_owned()),
            TargetError::Outside(why) => Self::TargetOutside(why.to_owned(), domain.to_string()),
        }
    }
}

impl From<ForwardError> for ProxyError {
    fn from(error: ForwardError) -> Self {
        let message = error.to_string();
        match error {
            ForwardError::AddressDenied(_) => Self::AddressDenied(message),
            ForwardError::Unreachable(_) | ForwardError::NotProcessed(_) => {
                Self::UpstreamUnreachable(message)
            }
            ForwardError::Tls(_) => Self::UpstreamTls(message),
            ForwardError::Timeout(_) => {
                Self::UpstreamTimeout(format!("{message} (upstream.request_timeout)"))
            }
        }
    }
}

impl From<Limited> for ProxyError {
    fn from(limited: Limited) -> Self {
        match limited {
            Limited::Busy(n) => Self::ConnectorBusy(n),
            // Whole seconds, rounded up: a caller that waits that long is admitted.
            Limited::Rate { retry_after, rate } => Self::ConnectorRateLimited {
                retry_after: retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
                rate,
            },
        }
    }
}

impl From<CredentialError> for ProxyError {
    fn from(error: CredentialError) -> Self {
        let message = error.to_string();
        match error {
            CredentialError::Unavailable { oauth_error, .. } => {
                Self::TokenUnavailable(message, oauth_error)
            }
            CredentialError::Timeout(_) => Self::TokenTimeout(message),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    message: String,
    org: Option<&'a str>,
    connector: Option<&'a str>,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    oauth_error: Option<&'a str>,
}

/// The response for `error`. `org` and `connector` are what the request named, when it named
/// them, so that a flow author sees which of the two was wrong.
pub fn response(
    error: &ProxyError,
    org: Option<&str>,
    connector: Option<&str>,
    request_id: &str,
) -> Response<Full<Bytes>> {
    let oauth_error = match error {
        ProxyError::TokenUnavailable(_, code) => code.as_deref(),
        _ => None,
    };
    let body = Body {
        error: error.code(),
        message: error.to_string(),
        org,
        connector,
        request_id,
        oauth_error,
    };
    let json = serde_json::to_vec(&body).expect("error body serialises");
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_PROXY_ERROR, HeaderValue::from_static(error.code()));
    match error {
        ProxyError::ProxyAuthRequired => {
            headers.insert(PROXY_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        ProxyError::ConnectorRateLimited { retry_after, .. } => {
            headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        _ => {}
    }
    response
}
