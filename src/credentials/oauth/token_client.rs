//! One token request: an RFC 6749 form post over the proxy's own upstream client (so token
//! endpoints obey the same TLS, `resolve` and address rules as upstreams), and a lenient read of
//! the answer (`expires_in` as a number or a numeric string, `token_type` in any case).

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Either, Full, Limited};
use serde::Deserialize;
use url::form_urlencoded;

use super::assertion::AssertionSigner;
use crate::config::{ClientAuth, Grant, OAuthClient};
use crate::forward::{ForwardError, Upstream, UpstreamBody};
use crate::secret::Secret;

/// Token responses are small; anything larger is not one.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// RFC 7523 2.1's `grant_type`.
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// What a token endpoint gave.
pub struct Issued {
    pub access_token: Secret,
    pub expires_in: Option<Duration>,
    pub refresh_token: Option<Secret>,
}

/// Why no token was issued. Messages name the endpoint's answer, never a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("the token endpoint refused the request ({status}): {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
    },
    #[error("the token endpoint answered {status} without an OAuth token: {detail}")]
    BadResponse { status: u16, detail: String },
    #[error("the token endpoint is unreachable: {0}")]
    Unreachable(String),
    #[error("the token endpoint did not answer within {0:?} (oauth.token_timeout)")]
    Timeout(Duration),
}

impl TokenError {
    pub fn oauth_error(&self) -> Option<&str> {
        match self {
            Self::OAuth { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Which grant to ask for.
pub enum GrantRequest<'a> {
    /// The connector's configured grant.
    Configured,
    /// RFC 6749 6, with a refresh token from an earlier password-grant response.
    Refresh(&'a Secret),
}

pub struct TokenEndpoint {
    client: OAuthClient,
    upstream: Upstream,
    /// Client assertions (`private_key_jwt`, `client_secret_jwt`).
    signer: Option<AssertionSigner>,
    /// The JWT bearer grant's assertions.
    grant_signer: Option<AssertionSigner>,
    timeout: Duration,
}

#[derive(Deserialize)]
struct RawResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl TokenEndpoint {
    /// `upstream` must carry the TLS client identity for `tls_client_auth`; `signer` signs
    /// client assertions, `grant_signer` a JWT bearer grant's.
    pub fn new(
        client: OAuthClient,
        upstream: Upstream,
        signer: Option<AssertionSigner>,
        grant_signer: Option<AssertionSigner>,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            upstream,
            signer,
            grant_signer,
            timeout,
        }
    }

    pub async fn request(&self, grant: GrantRequest<'_>) -> Result<Issued, TokenError> {
        let request = self.build(&grant)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let exchange = async {
            // Sent again when the endpoint turned it away unprocessed: a token
            // server behind HTTP/2 closing connections (nginx's keepalive_requests) would
            // otherwise fail every caller for the whole back-off.
            let again = || self.build(&grant).ok();
            let response = self
                .upstream
                .send_resending(request, deadline, again)
                .await
                .map_err(|e| match e {
                    ForwardError::Timeout(_) => TokenError::Timeout(self.timeout),
                    other => TokenError::Unreachable(other.to_string()),
                })?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| TokenError::BadResponse {
                    status,
                    detail: format!("reading the body failed: {e}"),
                })?
                .to_bytes();
            parse(status, &body)
        };
        // The deadline covers the body too: a server that sends headers and then stalls must
        // not hold callers longer than token_timeout.
        tokio::time::timeout_at(deadline, exchange)
            .await
            .unwrap_or(Err(TokenError::Timeout(self.timeout)))
    }

    fn build(&self, grant: &GrantRequest<'_>) -> Result<Request<UpstreamBody>, TokenError> {
        let c = &self.client;
        let mut form = form_urlencoded::Serializer::new(String::new());
        match (&grant, &c.grant) {
            (GrantRequest::Refresh(token), _) => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("refresh_token", token.expose());
            }
            (GrantRequest::Configured, Grant::ClientCredentials) => {
                form.append_pair("grant_type", "client_credentials");
            }
            (GrantRequest::Configured, Grant::Password { username, password }) => {
                form.append_pair("grant_type", "password");
                form.append_pair("username", username);
                form.append_pair("password", password.expose());
            }
            (GrantRequest::Configured, Grant::JwtBearer(grant)) => {
                let signer = self
                    .grant_signer
                    .as_ref()
                    .expect("jwt_bearer endpoints are built with a grant signer");
                let assertion = signer
                    .sign_claims(
                        &grant.issuer,
                        &grant.subject,
                        &grant.audience,
                        c.scope.as_deref(),
                    )
                    .map_err(|e| TokenError::Unreachable(e.to_string()))?;
                form.append_pair("grant_type", JWT_BEARER_GRANT);
                form.append_pair("assertion", &assertion);
            }
        }
        if let Some(scope) = &c.scope {
            form.append_pair("scope", scope);
        }
        for (name, value) in &c.extra_params {
            form.append_pair(name, value);
        }
        let mut basic = None;
        match &c.client_auth {
            ClientAuth::SecretBasic(secret) => {
                // RFC 6749 2.3.1: id and secret are form-encoded before base64.
                let pair = format!(
                    "{}:{}",
                    form_encode(&c.client_id),
                    form_encode(secret.expose())
                );
                let mut value = HeaderValue::try_from(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
                .map_err(|_| {
                    TokenError::Unreachable("client credentials are not a valid header".into())
                })?;
                value.set_sensitive(true);
                basic = Some(value);
            }
            ClientAuth::SecretPost(secret) => {
                form.append_pair("client_id", &c.client_id);
                form.append_pair("client_secret", secret.expose());
            }
            ClientAuth::PrivateKeyJwt { .. } | ClientAuth::SecretJwt { .. } => {
                let signer = self.signer.as_ref().expect(
                    "private_key_jwt and client_secret_jwt endpoints are built with a signer",
                );
                let assertion = signer
                    .sign(&c.client_id, &c.token_url.to_string())
                    .map_err(|e| TokenError::Unreachable(e.to_string()))?;
                form.append_pair("client_id", &c.client_id);
                form.append_pair("client_assertion_type", JWT_BEARER);
                form.append_pair("client_assertion", &assertion);
            }
            ClientAuth::TlsClientAuth(_) => {
                form.append_pair("client_id", &c.client_id);
            }
            // The grant's assertion names the client.
            ClientAuth::None => {}
        }
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(c.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(Either::Right(Full::new(Bytes::from(form.finish()))))
            .expect("token request parts are valid");
        if let Some(value) = basic {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        Ok(request)
    }
}

fn form_encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Reads a token endpoint's answer.
fn parse(status: u16, body: &[u8]) -> Result<Issued, TokenError> {
    let raw: RawResponse = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(_) => {
            let detail = if body.is_empty() {
                "an empty body".to_owned()
            } else {
                "a body that is not JSON".to_owned()
            };
            return Err(TokenError::BadResponse { status, detail });
        }
    };
    if let Some(error) = raw.error {
        return Err(TokenError::OAuth {
            status,
            error: printable(&error),
            description: raw.error_description.map(|d| printable(&d)),
        });
    }
    if !(200..300).contains(&status) {
        return Err(TokenError::BadResponse {
            status,
            detail: "no OAuth error code in the body".into(),
        });
    }
    let access_token = raw
        .access_token
        .filter(|t| !t.is_empty() && HeaderValue::try_from(format!("Bearer {t}")).is_ok())
        .ok_or_else(|| TokenError::BadResponse {
            status,
            detail: "no usable access_token".into(),
        })?;
    if let Some(kind) = raw.token_type.filter(|t| !t.eq_ignore_ascii_case("bearer")) {
        return Err(TokenError::BadResponse {
            status,
            detail: format!("token_type {:?} is not Bearer", printable(&kind)),
        });
    }
    let expires_in = match raw.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    }
    .filter(|secs| secs.is_finite() && *secs > 0.0)
    .map(|secs| Duration::from_secs_f64(secs.min(1e9)));
    Ok(Issued {
        access_token: Secret::new(access_token),
        expires_in,
        refresh_token: raw.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
    })
}

/// A server's text for our messages: printable ASCII, at most 200 characters.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_may_be_a_number_or_a_numeric_string() {
        let n = parse(
            200,
            br#"{"access_token":"a","token_type":"Bearer","expires_in":3599}"#,
        )
        .unwrap();
        assert_eq!(n.expires_in, Some(Duration::from_secs(3599)));
        let s = parse(
            200,
            br#"{"access_token":"a","token_type":"bearer","expires_in":"3599"}"#,
        )
        .unwrap();
        assert_eq!(s.expires_in, Some(Duration::from_secs(3599)));
        let none = parse(200, br#"{"access_token":"a","token_type":"BEARER"}"#).unwrap();
        assert_eq!(none.expires_in, None);
    }

    #[test]
    fn oauth_errors_keep_the_servers_code() {
        let e = parse(
            400,
            br#"{"error":"invalid_client","error_description":"bad secret"}"#,
        )
        .err()
        .unwrap();
        assert_eq!(e.oauth_error(), Some("invalid_client"));
        assert!(e.to_string().contains("bad secret"));
    }

    #[test]
    fn non_bearer_garbage_and_html_are_refused() {
        assert!(parse(200, br#"{"access_token":"a","token_type":"mac"}"#).is_err());
        assert!(parse(200, b"<html>login</html>").is_err());
        assert!(parse(200, br#"{"access_token":"a\nb"}"#).is_err());
        assert!(parse(500, br#"{"message":"oops"}"#).is_err());
    }

    #[test]
    fn client_credentials_are_form_encoded_before_base64() {
        assert_eq!(form_encode("id:with space~"), "id%3Awith+space%7E");
    }
}
