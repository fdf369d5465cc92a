//! The OAuth world most token tests share: a CA, the recording upstream as
//! `crm.example.com`, the strict token endpoint as `login.example.com`, and the proxy started
//! on a configuration pinning both.

use super::token::{Method, TokenServer};
use super::{Pki, Proxy, Upstream};

pub const TOKEN_URL: &str = "https://login.example.com/oauth2/token";
pub const BASIC_SECRET: &str = "s3cr:t ~+/ü";

pub struct World {
    pub pki: Pki,
    pub crm: Upstream,
    pub token: TokenServer,
}

impl World {
    pub async fn new() -> Self {
        let pki = Pki::new();
        let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
        let token = TokenServer::start(&pki).await;
        Self { pki, crm, token }
    }

    pub fn start(&self, oauth: &str, connectors: &str, files: &[(&str, &str)]) -> Proxy {
        self.start_with(oauth, "", "", connectors, files)
    }

    /// `pins` are more `"host:443" = "addr"` lines for `[upstream.resolve]`.
    pub fn start_with(
        &self,
        oauth: &str,
        upstream: &str,
        pins: &str,
        connectors: &str,
        files: &[(&str, &str)],
    ) -> Proxy {
        self.start_config(&self.config(oauth, upstream, pins, connectors), files)
    }

    pub fn config(&self, oauth: &str, upstream: &str, pins: &str, connectors: &str) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
{timeout}
{upstream}

[upstream.resolve]
"crm.example.com:443" = "{crm}"
"login.example.com:443" = "{token}"
{pins}

[oauth]
token_timeout = "1s"
{oauth}

{connectors}
"#,
            crm = self.crm.addr,
            token = self.token.addr,
            // 5 s unless the test sets its own.
            timeout = if upstream.contains("request_timeout") {
                ""
            } else {
                "request_timeout = \"5s\""
            },
        )
    }

    pub fn start_config(&self, config: &str, files: &[(&str, &str)]) -> Proxy {
        let ca = self.pki.ca_pem();
        let mut all = vec![("ca.pem", ca.as_str())];
        all.extend_from_slice(files);
        Proxy::start(config, &all, &[])
    }

    /// The `Authorization` of the upstream's last request.
    pub fn last_authorization(&self) -> String {
        let seen = self.crm.seen();
        seen.last().expect("the upstream saw a request").headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned()
    }
}

/// A client-credentials connector with the given client id and extra keys.
pub fn connector(name: &str, client_id: &str, extra: &str) -> String {
    format!(
        "[orgs.acme.connectors.{name}]\nauth = \"oauth2\"\ngrant = \"client_credentials\"\n\
         resource_domain = \"https://crm.example.com\"\ntoken_url = \"{TOKEN_URL}\"\nclient_id = \"{client_id}\"\n{extra}\n"
    )
}

/// Registers `name` as a `client_secret_post` client and returns its connector.
pub fn post_client(world: &World, name: &str) -> String {
    world
        .token
        .register(name, Method::SecretPost("post-secret".into()));
    connector(
        name,
        name,
        "client_auth = \"client_secret_post\"\nclient_secret = \"post-secret\"",
    )
}

pub fn assert_no_token_in_logs(proxy: &Proxy) {
    let logs = proxy.log_text();
    for secret in [
        "at-5ecret",
        "rt-5ecret",
        BASIC_SECRET,
        "post-secret",
        "user-pa55",
        "PRIVATE KEY",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret:?} in the proxy's log:\n{logs}"
        );
    }
}
