//! What the admin-side tests (the monitoring stack, the status page) look at: a proxy with the
//! admin token set, a Basic connector validated at `/whoami` and an OAuth connector `billing`,
//! both to one TLS upstream, the OAuth one with a token endpoint of its own.

use super::token::{Method, TokenServer};
use super::{Pki, Proxy, Upstream};

pub const CLIENT_SECRET: &str = "client-5ecret";

pub struct AdminWorld {
    pub pki: Pki,
    pub crm: Upstream,
    pub token: TokenServer,
}

impl AdminWorld {
    pub async fn new() -> Self {
        let pki = Pki::new();
        let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), &[b"h2", b"http/1.1"]).await;
        let token = TokenServer::start(&pki).await;
        token.register("flow-engine", Method::SecretBasic(CLIENT_SECRET.into()));
        Self { pki, crm, token }
    }

    /// The proxy with `admin_token` and the Basic connector named `basic`.
    pub fn start(&self, admin_token: &str, basic: &str) -> Proxy {
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "{admin_token}"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = {{ "crm.example.com:443" = "{crm}", "login.example.com:443" = "{token}" }}

[orgs.acme.connectors.{basic:?}]
auth = "basic"
resource_domain = "https://crm.example.com"
username = "svc"
password = "p"
validation_url = "https://crm.example.com/whoami"

[orgs.acme.connectors.billing]
auth = "oauth2"
grant = "client_credentials"
resource_domain = "https://crm.example.com"
token_url = "https://login.example.com/oauth2/token"
client_id = "flow-engine"
client_secret = "{CLIENT_SECRET}"
"#,
            crm = self.crm.addr,
            token = self.token.addr,
        );
        Proxy::start(&config, &[("ca.pem", &self.pki.ca_pem())], &[])
    }
}
