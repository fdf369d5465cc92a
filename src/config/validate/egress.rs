//! `upstream.egress_proxy`, `egress_proxy_auth` and `no_proxy`, and a connector's own
//! `egress_proxy`.

use super::*;

/// What a connector's `egress_proxy = "none"` is spelled as.
const DIRECT: &str = "none";

impl Validator<'_> {
    /// `upstream.egress_proxy` with its credentials, and `no_proxy`.
    pub(super) fn upstream_egress(
        &mut self,
        raw: &RawUpstream,
    ) -> (Option<EgressProxy>, Vec<NoProxy>) {
        let proxy = match &raw.egress_proxy {
            Some(url) => self.egress_proxy(url, raw.egress_proxy_auth.as_ref(), "upstream"),
            None => {
                if let Some(auth) = &raw.egress_proxy_auth {
                    self.problem(Some(auth.span()), "upstream", "egress_proxy_auth is set without egress_proxy; add egress_proxy = \"http://proxy.example:3128\" or remove it");
                }
                None
            }
        };
        let mut no_proxy = Vec::new();
        for entry in &raw.no_proxy {
            if let Some(parsed) = self.no_proxy_entry(entry) {
                no_proxy.push(parsed);
            }
        }
        if raw.egress_proxy.is_none() && !raw.no_proxy.is_empty() {
            self.key_problem(
                &["upstream", "no_proxy"],
                "no_proxy lists what bypasses upstream.egress_proxy, which is not set; set egress_proxy or remove no_proxy",
            );
        }
        (proxy, no_proxy)
    }

    /// A connector's `egress_proxy` (`"none"` or a URL) and `egress_proxy_auth`.
    pub(super) fn connector_egress(&mut self, c: &RawConnector, place: &str) -> EgressChoice {
        match &c.egress_proxy {
            None => {
                if let Some(auth) = &c.egress_proxy_auth {
                    self.problem(Some(auth.span()), place, "egress_proxy_auth goes with the connector's own egress_proxy URL, which is not set; remove it (upstream.egress_proxy_auth is for upstream.egress_proxy)");
                }
                EgressChoice::Inherit
            }
            Some(value) if value.get_ref().trim().eq_ignore_ascii_case(DIRECT) => {
                if let Some(auth) = &c.egress_proxy_auth {
                    self.problem(
                        Some(auth.span()),
                        place,
                        "egress_proxy_auth does not apply with egress_proxy = \"none\"; remove it",
                    );
                }
                EgressChoice::Direct
            }
            Some(url) => self
                .egress_proxy(url, c.egress_proxy_auth.as_ref(), place)
                .map_or(EgressChoice::Inherit, EgressChoice::Proxy),
        }
    }

    fn egress_proxy(
        &mut self,
        value: &Spanned<String>,
        auth: Option<&Spanned<SecretSource>>,
        place: &str,
    ) -> Option<EgressProxy> {
        // Messages show the URL without what may be credentials in it, which are refused
        // first whatever else is wrong.
        let written = value.get_ref().trim();
        let text = &*redact(written);
        let example =
            "write one such as \"http://proxy.corp.example:3128\" (https:// for TLS to the proxy)";
        if text != written {
            self.problem(
                Some(value.span()),
                place,
                "egress_proxy carries credentials in the URL; put \"user:password\" in egress_proxy_auth (a secret, e.g. { env = \"EGRESS_PROXY_AUTH\" }) and remove them from the URL",
            );
            return None;
        }
        let url = match url::Url::parse(text) {
            Ok(url) => url,
            Err(e) => {
                self.problem(
                    Some(value.span()),
                    place,
                    format!("egress_proxy {text:?} is not a URL ({e}); {example}"),
                );
                return None;
            }
        };
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => {
                self.problem(Some(value.span()), place, format!(
                    "egress_proxy {text:?}: the scheme {other:?} is not one the proxy speaks to an egress proxy; {example}"
                ));
                return None;
            }
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            self.problem(Some(value.span()), place, format!(
                "egress_proxy {text:?} has a path or query, which a CONNECT proxy does not use; write only the scheme, host and port"
            ));
            return None;
        }
        let (host, shown) = match url.host() {
            Some(url::Host::Domain(d)) => (d.to_ascii_lowercase(), d.to_ascii_lowercase()),
            Some(url::Host::Ipv4(ip)) => (ip.to_string(), ip.to_string()),
            Some(url::Host::Ipv6(ip)) => (ip.to_string(), format!("[{ip}]")),
            None => {
                self.problem(
                    Some(value.span()),
                    place,
                    format!("egress_proxy {text:?} names no host; {example}"),
                );
                return None;
            }
        };
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let auth = match auth {
            Some(source) => {
                let secret = self.secret(source, place, "egress_proxy_auth")?;
                if !secret.expose().contains(':') {
                    self.problem(
                        Some(source.span()),
                        place,
                        "egress_proxy_auth must be \"user:password\" (the user, a colon, the password)",
                    );
                    return None;
                }
                Some(secret)
            }
            None => None,
        };
        Some(EgressProxy {
            url: format!("{}://{shown}:{port}", url.scheme()),
            host,
            port,
            tls,
            auth,
        })
    }

    fn no_proxy_entry(&mut self, entry: &Spanned<String>) -> Option<NoProxy> {
        let text = entry.get_ref().trim();
        let refuse = |this: &mut Self, why: &str| {
            this.problem(Some(entry.span()), "upstream.no_proxy", format!(
                "{text:?} {why}; write a host (\"billing.example.com\"), a domain (\".example.com\"), an address or a network (\"10.20.0.0/16\"), or \"*\""
            ));
            None
        };
        if text == "*" {
            return Some(NoProxy::All);
        }
        if text.is_empty() {
            return refuse(self, "is empty");
        }
        if text.contains('/') {
            return match text.parse::<IpNet>() {
                Ok(net) => Some(NoProxy::Net(net.trunc())),
                Err(_) => refuse(self, "is not a network (a URL or path cannot be matched)"),
            };
        }
        let unbracketed = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = unbracketed.parse::<std::net::IpAddr>() {
            return Some(NoProxy::Net(IpNet::from(ip)));
        }
        if text.contains(':') {
            return refuse(
                self,
                "has a port or scheme; entries match hosts whatever the port",
            );
        }
        let domain = text
            .strip_prefix("*.")
            .or_else(|| text.strip_prefix('.'))
            .unwrap_or(text);
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.contains('*') {
            return refuse(
                self,
                "has a wildcard inside; only a leading \"*.\" or \".\" is understood",
            );
        }
        match url::Host::parse(domain) {
            Ok(url::Host::Domain(d)) => Some(NoProxy::Domain(d.to_ascii_lowercase())),
            Ok(url::Host::Ipv4(ip)) => Some(NoProxy::Net(IpNet::from(std::net::IpAddr::V4(ip)))),
            Ok(url::Host::Ipv6(ip)) => Some(NoProxy::Net(IpNet::from(std::net::IpAddr::V6(ip)))),
            Err(e) => refuse(self, &format!("is not a host name ({e})")),
        }
    }
}

/// `scheme://user:password@host` as `scheme://[credentials]@host`: what precedes the last `@` of
/// the authority may be a password.
fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, text),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    match authority.rfind('@') {
        Some(at) => {
            let scheme = scheme.map_or_else(String::new, |s| format!("{s}://"));
            std::borrow::Cow::Owned(format!("{scheme}[credentials]{}", &rest[at..]))
        }
        None => std::borrow::Cow::Borrowed(text),
    }
}
