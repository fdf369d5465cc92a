//! The request target and the resource-domain rule.
//!
//! Pure: no I/O, no request types beyond [`http::Uri`], so it can be property-tested and fuzzed
//! alone. The rule is checked on a canonical form of the target, and that same canonical form is
//! what gets forwarded: the proxy never sends a URL other than the one it checked.
//!
//! A path passes only when it lies under the resource domain's path under two readings:
//! literally (segments split on `/`, dot-segments removed, `%2e` counted as `.`), and as a
//! decoding server might read it (`%2f`, `%5c` and `\` also split segments, `;params` (also
//! written `%3b`) are ignored when spotting dot-segments, as Tomcat does). The forwarded path has its
//! dot-segments removed, so an upstream that normalises again cannot climb out either.

use std::borrow::Cow;
use std::fmt;

use http::uri::{Authority, Parts, PathAndQuery, Scheme, Uri};
use url::Host;

/// A connector's `resource_domain`, parsed and normalised once at configuration time.
#[derive(Clone, PartialEq, Eq)]
pub struct ResourceDomain {
    host: Host<String>,
    port: u16,
    /// Path segments that every target must start with; empty for a bare host.
    base: Vec<String>,
    /// `base` joined as a path without a trailing slash ("" or "/v2").
    base_path: String,
    /// Host, and port unless 443: what forwarded requests carry, made once.
    authority: Authority,
    /// The authority's host, made once: every request's log line names it.
    host_name: String,
}

/// Why a resource domain in the configuration is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("is not a URL ({0}); write an https URL such as \"https://api.example.com/v2\"")]
    NotUrl(String),
    #[error("must use https, not {0}")]
    NotHttps(String),
    #[error("has no host; write an https URL such as \"https://api.example.com\"")]
    NoHost,
    #[error("must not carry a user name or password")]
    Userinfo,
    #[error("must not carry a query or fragment; keep only scheme, host, port and path")]
    QueryOrFragment,
    #[error("path must not contain encoded '/' or '\\' or empty segments")]
    AmbiguousPath,
}

/// Why a request target is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// Not a target the proxy can interpret at all (400 `bad_target`).
    Malformed(&'static str),
    /// A well-formed target outside the resource domain (403 `target_outside_resource_domain`).
    Outside(&'static str),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) | Self::Outside(why) => f.write_str(why),
        }
    }
}

/// A target that passed the rule: the exact URI to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub uri: Uri,
}

impl ResourceDomain {
    pub fn parse(text: &str) -> Result<Self, DomainError> {
        let url = url::Url::parse(text).map_err(|e| DomainError::NotUrl(e.to_string()))?;
        if url.scheme() != "https" {
            return Err(DomainError::NotHttps(url.scheme().to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(DomainError::Userinfo);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(DomainError::QueryOrFragment);
        }
        let host = canonical_host(url.host().ok_or(DomainError::NoHost)?.to_owned());
        let port = url.port_or_known_default().unwrap_or(443);
        // The url crate has already removed dot-segments (including %2e forms).
        let path = url.path().trim_end_matches('/');
        let base: Vec<String> = path.split('/').skip(1).map(str::to_owned).collect();
        let ambiguous = |s: &String| {
            let lower = s.to_ascii_lowercase();
            s.is_empty() || s.contains('\\') || lower.contains("%2f") || lower.contains("%5c")
        };
        if base.iter().any(ambiguous) {
            return Err(DomainError::AmbiguousPath);
        }
        let host_name = host.to_string();
        let authority = if port == 443 {
            host_name.clone()
        } else {
            format!("{host_name}:{port}")
        };
        let authority =
            Authority::try_from(authority).map_err(|e| DomainError::NotUrl(e.to_string()))?;
        Ok(Self {
            host,
            port,
            base_path: path.to_owned(),
            base,
            authority,
            host_name,
        })
    }

    /// Applies the rule to a request target (absolute-form or origin-form).
    pub fn resolve(&self, target: &Uri) -> Result<Target, TargetError> {
        let path = if target.scheme().is_some() {
            self.check_authority(target)?;
            target.path()
        } else if target.authority().is_some() {
            return Err(TargetError::Malformed(
                "authority-form targets are only for CONNECT; send an absolute https URL or a path",
            ));
        } else if target.path().starts_with('/') {
            ""
        } else {
            return Err(TargetError::Malformed(
                "the target must be an absolute https URL or a path starting with '/'",
            ));
        };
        // One buffer for the path and the query, sized for both: the path is copied once.
        let query = target.query();
        let room = query.map_or(0, |q| q.len() + 1);
        let path = if path.is_empty() {
            let mut joined =
                String::with_capacity(self.base_path.len() + target.path().len() + room);
            joined.push_str(&self.base_path);
            joined.push_str(target.path());
            Cow::Owned(joined)
        } else {
            Cow::Borrowed(path)
        };
        let mut path_and_query = self.check_path(path, room)?;
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        // Built from parts: the authority is shared and the path is not copied again.
        const INVALID: TargetError = TargetError::Malformed("the target is not a valid URI");
        let mut parts = Parts::default();
        parts.scheme = Some(Scheme::HTTPS);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).map_err(|_| INVALID)?);
        let uri = Uri::from_parts(parts).map_err(|_| INVALID)?;
        Ok(Target { uri })
    }

    /// The host as requests must name it (an IPv6 address in brackets).
    pub fn host(&self) -> &str {
        &self.host_name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn check_authority(&self, target: &Uri) -> Result<(), TargetError> {
        if target.scheme() != Some(&Scheme::HTTPS) {
            return Err(TargetError::Outside("the target's scheme must be https"));
        }
        let authority = target.authority().ok_or(TargetError::Malformed(
            "absolute-form target without a host",
        ))?;
        if authority.as_str().contains('@') {
            return Err(TargetError::Outside(
                "user names and passwords in the target are refused",
            ));
        }
        let host = Host::parse(authority.host())
            .map_err(|_| TargetError::Malformed("the target's host is not a valid host name"))?;
        if canonical_host(host) != self.host {
            return Err(TargetError::Outside(
                "the target's host is not the resource domain's",
            ));
        }
        if explicit_port(authority.as_str())?.unwrap_or(443) != self.port {
            return Err(TargetError::Outside(
                "the target's port is not the resource domain's",
            ));
        }
        Ok(())
    }

    /// Returns the path to forward: dot-segments removed, otherwise byte for byte as sent, with
    /// `room` spare bytes for the query.
    fn check_path(&self, path: Cow<'_, str>, room: usize) -> Result<String, TargetError> {
        // Most paths have no dot-segment and nothing a decoding server reads another way: their
        // segments are the literal ones, and they go as sent (BENCHMARKS finding 39).
        if is_plain(&path) {
            if !starts_with_segments(path.split('/').skip(1), &self.base) {
                return Err(OUTSIDE_BASE);
            }
            return Ok(match path {
                Cow::Owned(path) => path,
                Cow::Borrowed(path) => {
                    let mut owned = String::with_capacity(path.len() + room);
                    owned.push_str(path);
                    owned
                }
            });
        }
        self.check_path_literally(&path, room)
    }

    /// [`check_path`](Self::check_path) for any path: the literal reading, and the decoding one
    /// where they may differ.
    fn check_path_literally(&self, path: &str, room: usize) -> Result<String, TargetError> {
        let literal = remove_dot_segments(path.split('/').skip(1), |s| s);
        if !starts_with_segments(literal.segments.iter().copied(), &self.base) {
            return Err(OUTSIDE_BASE);
        }
        let mut out = String::with_capacity(path.len() + room);
        for segment in &literal.segments {
            out.push('/');
            out.push_str(segment);
        }
        if literal.trailing_slash || out.is_empty() {
            out.push('/');
        }
        // Both what was asked and what is sent: removing dot-segments literally can change how
        // a decoding server reads the rest ("/v2/..%5c/..%2f../../x" becomes "/v2/..%5c/x").
        // Without '%', '\\' or ';' the decoding reading is the literal one, checked above.
        if !path.bytes().any(|b| matches!(b, b'%' | b'\\' | b';')) {
            return Ok(out);
        }
        for checked in [path, out.as_str()] {
            if !self.inside_when_decoded(checked) {
                return Err(TargetError::Outside(
                    "the target's path leaves the resource domain's path once decoded",
                ));
            }
        }
        Ok(out)
    }

    fn inside_when_decoded(&self, path: &str) -> bool {
        let decoded = decode_separators(path);
        let lenient = remove_dot_segments(decoded.split('/').skip(1), |s| {
            s.split(';').next().unwrap_or("")
        });
        starts_with_segments(lenient.segments.iter().copied(), &self.base)
    }
}

impl fmt::Debug for ResourceDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ResourceDomain(https://{}{})",
            self.authority, self.base_path
        )
    }
}

impl fmt::Display for ResourceDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.authority, self.base_path)
    }
}

/// The port written after the host, if any. `http` accepts any URI characters there and its
/// `port_u16` answers `None` for what is not a number, which would read as the default port.
fn explicit_port(authority: &str) -> Result<Option<u16>, TargetError> {
    // Userinfo is refused before this; an IPv6 host's colons are inside its brackets.
    let after_host = authority
        .rfind(']')
        .map_or(authority, |i| &authority[i + 1..]);
    let Some((_, digits)) = after_host.rsplit_once(':') else {
        return Ok(None);
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::Malformed("the target's port is not a number"));
    }
    digits
        .parse()
        .map(Some)
        .map_err(|_| TargetError::Malformed("the target's port is above 65535"))
}

/// Lower-cased, IDNA-mapped (done by `Host::parse`) and without a trailing dot.
fn canonical_host(host: Host<String>) -> Host<String> {
    match host {
        Host::Domain(d) => Host::Domain(d.strip_suffix('.').map(str::to_owned).unwrap_or(d)),
        ip => ip,
    }
}

struct Segments<'a> {
    segments: Vec<&'a str>,
    trailing_slash: bool,
}

/// RFC 3986 5.2.4 over segments, with `%2e` counted as `.`; `key` picks the part of a segment
/// that decides whether it is a dot-segment.
fn remove_dot_segments<'a>(
    parts: impl Iterator<Item = &'a str>,
    key: impl Fn(&'a str) -> &'a str,
) -> Segments<'a> {
    let mut segments = Vec::new();
    let mut trailing_slash = false;
    for part in parts {
        trailing_slash = false;
        match dot_kind(key(part)) {
            1 => trailing_slash = true,
            2 => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(part),
        }
    }
    if segments.last() == Some(&"") {
        segments.pop();
        trailing_slash = true;
    }
    Segments {
        segments,
        trailing_slash,
    }
}

/// 1 for `.`, 2 for `..` (either possibly written `%2e`), 0 otherwise.
fn dot_kind(segment: &str) -> u8 {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3
            && rest[0] == b'%'
            && rest[1] == b'2'
            && rest[2].eq_ignore_ascii_case(&b'e')
        {
            rest = &rest[3..];
        } else {
            return 0;
        }
        dots += 1;
        if dots > 2 {
            return 0;
        }
    }
    dots
}

/// The path as a server that decodes `%2f`, `%5c` and `%3b` and treats `\` as `/` would see it.
fn decode_separators(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find(['%', '\\']) {
        out.push_str(&rest[..i]);
        let tail = &rest.as_bytes()[i..];
        let code = tail.get(1..3).unwrap_or_default();
        let skip = if tail[0] == b'\\' {
            out.push('/');
            1
        } else if code.eq_ignore_ascii_case(b"2f") || code.eq_ignore_ascii_case(b"5c") {
            out.push('/');
            3
        } else if code.eq_ignore_ascii_case(b"3b") {
            // A decoded ';' starts path parameters, which the lenient reading ignores.
            out.push(';');
            3
        } else {
            out.push('%');
            1
        };
        rest = &rest[i + skip..];
    }
    out.push_str(rest);
    out
}

fn starts_with_segments<'a>(path: impl IntoIterator<Item = &'a str>, base: &[String]) -> bool {
    let mut path = path.into_iter();
    base.iter().all(|b| path.next() == Some(b.as_str()))
}

const OUTSIDE_BASE: TargetError =
    TargetError::Outside("the target's path is not under the resource domain's path");

/// A path whose segments are all literal: it starts with `/`, no segment is a dot-segment, and
/// it has none of the bytes (`%`, `\`, `;`) by which a decoding server could read other segments.
/// Removing dot-segments gives such a path back unchanged.
fn is_plain(path: &str) -> bool {
    path.starts_with('/')
        && !path.bytes().any(|b| matches!(b, b'%' | b'\\' | b';'))
        && path.split('/').all(|segment| dot_kind(segment) == 0)
}

#[cfg(test)]
mod tests;
