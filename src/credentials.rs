//! What the proxy adds to a request: a connector's `Authorization` value, or its API key in a
//! header or the query.
//!
//! Kept apart from the request path (as Envoy keeps its credential injector apart from the
//! credential sources): the handler asks for a header value and knows nothing of how it is made.

pub mod oauth;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Uri, header};

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
    /// The key as it is sent, made once at load time: the header value (prefix included), or
    /// the percent-encoded query value.
    ApiKey {
        placement: Placement,
        value: HeaderValue,
    },
}

/// Where a connector's credential goes on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// In this header, replacing any the caller sent.
    Header(HeaderName),
    /// As this query parameter, after the caller's own parameters of that name are taken out.
    Query(String),
}

static AUTHORIZATION: Placement = Placement::Header(header::AUTHORIZATION);

impl Placement {
    /// Puts `value` on a request with target `uri` and `headers`.
    pub fn apply(&self, uri: &mut Uri, headers: &mut HeaderMap, value: &HeaderValue) {
        match self {
            Self::Header(name) => {
                headers.insert(name.clone(), value.clone());
            }
            Self::Query(param) => {
                // Percent-encoded ASCII by construction (see `api_key`).
                let value = value.to_str().unwrap_or_default();
                *uri = with_query_param(uri, param, value);
            }
        }
    }
}

/// `uri` with `param=value` as its last query parameter and no other `param`: the caller's own
/// are dropped whatever their spelling (`api%5Fkey` is `api_key` to the upstream too).
fn with_query_param(uri: &Uri, param: &str, value: &str) -> Uri {
    let (path, query) = uri
        .path_and_query()
        .map_or(("/", None), |pq| (pq.path(), pq.query()));
    let mut target = String::with_capacity(
        path.len() + query.map_or(0, str::len) + param.len() + value.len() + 2,
    );
    target.push_str(path);
    target.push('?');
    for pair in query.unwrap_or_default().split('&') {
        let theirs = url::form_urlencoded::parse(pair.as_bytes())
            .next()
            .is_some_and(|(name, _)| name == param);
        if !pair.is_empty() && !theirs {
            target.push_str(pair);
            target.push('&');
        }
    }
    target.push_str(param);
    target.push('=');
    target.push_str(value);
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(target).expect("made of a valid path and query"));
    Uri::from_parts(parts).expect("only the query changed")
}

/// An API key's credentials: its header value with `prefix`, or its query value encoded.
pub fn api_key(placement: Placement, prefix: &str, key: &str) -> Credentials {
    let text = match &placement {
        Placement::Header(_) => format!("{prefix}{key}"),
        Placement::Query(_) => url::form_urlencoded::byte_serialize(key.as_bytes()).collect(),
    };
    // Validation refused keys that are no header value.
    let mut value = HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    Credentials::ApiKey { placement, value }
}

impl Credentials {
    /// The credential's value to send (where: [`Self::placement`]), marked sensitive so hyper's HPACK never indexes it,
    /// and for tokens how it was had.
    pub async fn authorization(&self) -> Result<(HeaderValue, Option<Lookup>), CredentialError> {
        match self {
            Self::Basic(value) | Self::ApiKey { value, .. } => Ok((value.clone(), None)),
            Self::OAuth(source) => source.authorization().await.map(|(v, l)| (v, Some(l))),
        }
    }

    /// Where the credential goes: `Authorization`, or an API key's header or parameter.
    pub fn placement(&self) -> &Placement {
        match self {
            Self::ApiKey { placement, .. } => placement,
            Self::Basic(_) | Self::OAuth(_) => &AUTHORIZATION,
        }
    }

    /// After an upstream 401 to `sent`: whether another credential may help (a replay is worth
    /// it). An OAuth token old enough is dropped, and one already replaced leaves the new one to
    /// try; a token younger than `oauth.min_token_age` is kept and the 401 stands. Basic
    /// credentials and API keys cannot change.
    pub fn reject(&self, sent: &HeaderValue) -> bool {
        match self {
            Self::Basic(_) | Self::ApiKey { .. } => false,
            Self::OAuth(source) => source.reject(sent) != Rejection::Kept,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic(_) => f.write_str("Credentials::Basic([redacted])"),
            Self::OAuth(_) => f.write_str("Credentials::OAuth([redacted])"),
            Self::ApiKey { placement, .. } => {
                write!(f, "Credentials::ApiKey({placement:?}, [redacted])")
            }
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

    fn uri_with_key(target: &str) -> String {
        let mut uri: Uri = target.parse().unwrap();
        let key = api_key(Placement::Query("api_key".into()), "", "k&y=1 +");
        let (Credentials::ApiKey { placement, value }, mut headers) = (key, HeaderMap::new())
        else {
            unreachable!()
        };
        placement.apply(&mut uri, &mut headers, &value);
        assert!(headers.is_empty());
        uri.to_string()
    }

    #[test]
    fn a_query_key_replaces_every_spelling_of_the_callers_own() {
        let key = "api_key=k%26y%3D1+%2B";
        for (sent, expected) in [
            ("https://a.example/p", format!("https://a.example/p?{key}")),
            ("https://a.example/p?", format!("https://a.example/p?{key}")),
            (
                "https://a.example/p?q=1&api_key=mine",
                format!("https://a.example/p?q=1&{key}"),
            ),
            (
                "https://a.example/p?api%5Fkey=mine&q=1&",
                format!("https://a.example/p?q=1&{key}"),
            ),
            (
                "https://a.example/p?api_key&api_key=2&x=api_key",
                format!("https://a.example/p?x=api_key&{key}"),
            ),
            (
                "https://a.example/p?api_keys=1",
                format!("https://a.example/p?api_keys=1&{key}"),
            ),
        ] {
            assert_eq!(uri_with_key(sent), expected, "{sent}");
        }
    }

    #[test]
    fn a_header_key_replaces_the_callers_and_hides_in_debug() {
        let key = api_key(
            Placement::Header(HeaderName::from_static("x-api-key")),
            "Key ",
            "s3cr3t",
        );
        let mut headers = HeaderMap::new();
        headers.append("x-api-key", HeaderValue::from_static("mine"));
        headers.append("x-api-key", HeaderValue::from_static("mine too"));
        let mut uri: Uri = "https://a.example/p?x=1".parse().unwrap();
        let Credentials::ApiKey { placement, value } = &key else {
            unreachable!()
        };
        placement.apply(&mut uri, &mut headers, value);
        let sent: Vec<_> = headers.get_all("x-api-key").iter().collect();
        assert_eq!(sent, ["Key s3cr3t"]);
        assert!(sent[0].is_sensitive());
        assert_eq!(uri, "https://a.example/p?x=1");
        assert!(!format!("{key:?}").contains("s3cr3t"));
    }
}
