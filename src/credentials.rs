//! What the proxy adds to a request: a connector's `Authorization` value.
//!
//! Kept apart from the request path (as Envoy keeps its credential injector apart from the
//! credential sources): the handler asks for a header value and knows nothing of how it is made.

pub mod oauth;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;

use oauth::{Lookup, Rejection, TokenSource};

/// Why no credential could be had (502 `token_unavailable` / 504 `token_timeout`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error("{message}")]
    Unavailable {
        message: String,
        /// The token endpoint's OAuth `error` code, when it sent one.
        oauth_error: Option<String>,
    },
    #[error("the token endpoint did not answer within {0:?} (oauth.token_timeout)")]
    Timeout(std::time::Duration),
}

pub enum Credentials {
    /// The whole header value, computed once at load time.
    Basic(HeaderValue),
    OAuth(Arc<TokenSource>),
}

impl Credentials {
    /// The `Authorization` value to send, marked sensitive so hyper's HPACK never indexes it,
    /// and for tokens how it was had.
    pub async fn authorization(&self) -> Result<(HeaderValue, Option<Lookup>), CredentialError> {
        match self {
            Self::Basic(value) => Ok((value.clone(), None)),
            Self::OAuth(source) => source.authorization().await.map(|(v, l)| (v, Some(l))),
        }
    }

    /// After an upstream 401 to `sent`: whether another credential may help (a replay is worth
    /// it). An OAuth token old enough is dropped, and one already replaced leaves the new one to
    /// try; a token younger than `oauth.min_token_age` is kept and the 401 stands. Basic
    /// credentials cannot change.
    pub fn reject(&self, sent: &HeaderValue) -> bool {
        match self {
            Self::Basic(_) => false,
            Self::OAuth(source) => source.reject(sent) != Rejection::Kept,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic(_) => f.write_str("Credentials::Basic([redacted])"),
            Self::OAuth(_) => f.write_str("Credentials::OAuth([redacted])"),
        }
    }
}

pub fn basic_header(username: &str, password: &str) -> HeaderValue {
    let encoded = STANDARD.encode(format!("{username}:{password}"));
    let mut value =
        HeaderValue::try_from(format!("Basic {encoded}")).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_is_rfc7617_and_sensitive() {
        // RFC 7617 section 2's own example.
        let value = basic_header("Aladdin", "open sesame");
        assert_eq!(
            value.to_str().unwrap(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert!(value.is_sensitive());
        assert!(!format!("{:?}", Credentials::Basic(value)).contains("QWxh"));
    }
}
