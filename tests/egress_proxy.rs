//! `upstream.egress_proxy` end to end: the built proxy reaches upstreams and token endpoints
//! through a real forward proxy (Debian's tinyproxy) by CONNECT, with TLS to the target inside
//! the tunnel; `no_proxy` and a connector's `egress_proxy = "none"` go direct; a refused
//! CONNECT, a proxy wanting credentials and a proxy that is down are `upstream_unreachable`
//! naming the egress proxy; the address policy applies to the egress proxy's address and to
//! the target's.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::oauth::World;
use common::tinyproxy::Tinyproxy;
use common::token::Method;
use common::{Proxy, Upstream, get};

const EGRESS_PASSWORD: &str = "eg-pa55-w0rd";

fn basic(name: &str, domain: &str, extra: &str) -> String {
    format!(
        "[orgs.acme.connectors.{name}]\nauth = \"basic\"\nresource_domain = \"{domain}\"\n\
         username = \"u\"\npassword = \"p\"\n{extra}\n"
    )
}

fn config(upstream: &str, pins: &str, connectors: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
extra_ca_file = "ca.pem"
request_timeout = "5s"
connect_timeout = "3s"
{upstream}

[upstream.resolve]
{pins}

[oauth]
token_timeout = "3s"

{connectors}
"#
    )
}

async fn error_of(proxy: &Proxy, connector: &str) -> (u16, String, String) {
    let answer = get(proxy.addr, "/x", &[("x-connector-name", connector)]).await;
    let code = answer.proxy_error().unwrap_or_default();
    let message = answer.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (answer.status.as_u16(), code, message)
}

#[tokio::test]
async fn basic_and_oauth_connectors_go_through_the_egress_proxy_and_no_proxy_goes_direct() {
    let world = World::new().await;
    world
        .token
        .register("billing", Method::SecretPost("post-secret".into()));
    let egress = Tinyproxy::start("127.0.0.1", &format!("BasicAuth relay {EGRESS_PASSWORD}"));
    let direct = Upstream::start(
        &world.pki.leaf(&["direct.example.com", "other.example.com"]),
        &[b"h2", b"http/1.1"],
    )
    .await;
    let local = Upstream::start(&world.pki.leaf(&["localhost"]), &[b"http/1.1"]).await;
    let local_port = local.addr.port();
    let connectors = [
        common::oauth::connector(
            "billing",
            "billing",
            "client_auth = \"client_secret_post\"\nclient_secret = \"post-secret\"",
        ),
        basic("crm", "https://crm.example.com", ""),
        // Not pinned: the CONNECT names the host, which the egress proxy resolves.
        basic("local", &format!("https://localhost:{local_port}"), ""),
        basic("bypass", "https://direct.example.com", ""),
        basic(
            "own",
            "https://other.example.com",
            "egress_proxy = \"none\"",
        ),
    ]
    .concat();
    let config = config(
        &format!(
            "allow_networks = [\"127.0.0.0/8\", \"::1/128\"]\n\
             egress_proxy = \"http://{}\"\negress_proxy_auth = {{ file = \"egress-auth\" }}\n\
             no_proxy = [\".Direct.Example.COM\"]",
            egress.addr
        ),
        &format!(
            "\"crm.example.com:443\" = \"{crm}\"\n\"login.example.com:443\" = \"{token}\"\n\
             \"direct.example.com:443\" = \"{direct}\"\n\"other.example.com:443\" = \"{direct}\"",
            crm = world.crm.addr,
            token = world.token.addr,
            direct = direct.addr,
        ),
        &connectors,
    );
    let auth = format!("relay:{EGRESS_PASSWORD}");
    let proxy = Proxy::start(
        &config,
        &[("ca.pem", &world.pki.ca_pem()), ("egress-auth", &auth)],
        &[],
    );

    for connector in ["billing", "crm", "local", "bypass", "own"] {
        let answer = get(proxy.addr, "/through", &[("x-connector-name", connector)]).await;
        assert_eq!(answer.status, 200, "{connector}: {answer:?}");
    }
    // The token request and both crm connectors' requests reached their servers (one h2
    // connection for the two crm connectors), the local one by name.
    let crm_seen = world.crm.seen();
    assert_eq!(crm_seen.len(), 2, "{crm_seen:?}");
    assert!(
        crm_seen[0].headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer ")
    );
    assert_eq!(crm_seen[1].headers["authorization"], "Basic dTpw");
    assert_eq!(local.seen().len(), 1);
    assert_eq!(direct.seen().len(), 2);

    let tunnels: BTreeSet<String> = egress.connects().into_iter().collect();
    let expected: BTreeSet<String> = [
        world.token.addr.to_string(),
        world.crm.addr.to_string(),
        format!("localhost:{local_port}"),
    ]
    .into_iter()
    .collect();
    assert_eq!(tunnels, expected, "CONNECTs the egress proxy saw");

    let logs = proxy.log_text();
    for secret in [EGRESS_PASSWORD, "cmVsYXk6ZWctcGE1NS13MHJk", "post-secret"] {
        assert!(!logs.contains(secret), "{secret} in the log");
    }
    let status = admin_text(&proxy).await;
    assert!(!status.contains(EGRESS_PASSWORD));
}

/// `/status` and `/metrics` as text.
async fn admin_text(proxy: &Proxy) -> String {
    let mut text = String::new();
    for path in ["/status", "/metrics"] {
        let answer = get(proxy.admin, path, &[]).await;
        text.push_str(&String::from_utf8_lossy(&answer.body));
    }
    text
}

#[tokio::test]
async fn a_refused_connect_and_a_proxy_wanting_credentials_are_upstream_unreachable_naming_it() {
    let world = World::new().await;
    // Tunnels to port 1 only: every other CONNECT is refused with a 403.
    let strict = Tinyproxy::start("127.0.0.1", "ConnectPort 1");
    let guarded = Tinyproxy::start("127.0.0.1", &format!("BasicAuth relay {EGRESS_PASSWORD}"));
    let connectors = [
        basic("crm", "https://crm.example.com", ""),
        // Its own proxy, without credentials for it.
        basic(
            "guarded",
            "https://crm.example.com/guarded",
            &format!("egress_proxy = \"http://{}\"", guarded.addr),
        ),
    ]
    .concat();
    let config = config(
        &format!(
            "allow_networks = [\"127.0.0.0/8\"]\negress_proxy = \"http://{}\"",
            strict.addr
        ),
        &format!("\"crm.example.com:443\" = \"{}\"", world.crm.addr),
        &connectors,
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &world.pki.ca_pem())], &[]);

    let (status, code, message) = error_of(&proxy, "crm").await;
    assert_eq!(
        (status, code.as_str()),
        (502, "upstream_unreachable"),
        "{message}"
    );
    let named = format!("egress proxy http://{}", strict.addr);
    assert!(message.contains(&named), "{message}");
    assert!(message.contains("refused CONNECT"), "{message}");
    assert!(message.contains("403"), "{message}");

    let (status, code, message) = error_of(&proxy, "guarded").await;
    assert_eq!(
        (status, code.as_str()),
        (502, "upstream_unreachable"),
        "{message}"
    );
    assert!(
        message.contains(&format!("egress proxy http://{}", guarded.addr)),
        "{message}"
    );
    assert!(message.contains("407"), "{message}");
    assert!(message.contains("egress_proxy_auth"), "{message}");
    assert!(world.crm.seen().is_empty(), "nothing got through");
    assert_eq!(strict.connects(), vec![world.crm.addr.to_string()]);
}

#[tokio::test]
async fn an_egress_proxy_that_is_down_is_upstream_unreachable_naming_it() {
    let world = World::new().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = closed.local_addr().unwrap();
    drop(closed);
    let message = unreachable_through(&world, down).await;
    assert!(
        message.contains(&format!("cannot reach the egress proxy http://{down}")),
        "{message}"
    );
    assert!(world.crm.seen().is_empty());
}

/// A Basic connector for crm behind the egress proxy at `egress`, whose one request must be
/// `upstream_unreachable`; its message.
async fn unreachable_through(world: &World, egress: std::net::SocketAddr) -> String {
    let config = config(
        &format!("allow_networks = [\"127.0.0.0/8\"]\negress_proxy = \"http://{egress}\""),
        &format!("\"crm.example.com:443\" = \"{}\"", world.crm.addr),
        &basic("crm", "https://crm.example.com", ""),
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &world.pki.ca_pem())], &[]);
    let (status, code, message) = error_of(&proxy, "crm").await;
    assert_eq!(
        (status, code.as_str()),
        (502, "upstream_unreachable"),
        "{message}"
    );
    message
}

#[tokio::test]
async fn an_egress_proxy_that_never_answers_times_out_naming_it() {
    let world = World::new().await;
    // Connections are accepted (the kernel's backlog) and never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let message = unreachable_through(&world, addr).await;
    assert!(
        message.contains(&format!(
            "no connection to crm.example.com through the egress proxy http://{addr} within 3s"
        )),
        "{message}"
    );
    drop(silent);
}

#[tokio::test]
async fn the_address_policy_applies_to_the_egress_proxy_and_to_the_target() {
    let world = World::new().await;
    // The egress proxy on 127.0.0.2, the only network allowed; crm is pinned to 127.0.0.1.
    let egress = Tinyproxy::start("127.0.0.2", "");
    let connectors = [
        basic("crm", "https://crm.example.com", ""),
        // Its target is allowed (127.0.0.2), its egress proxy is not.
        basic(
            "elsewhere",
            "https://far.example.com",
            "egress_proxy = \"http://127.0.0.3:3128\"",
        ),
    ]
    .concat();
    let config = config(
        &format!(
            "allow_networks = [\"127.0.0.2/32\"]\negress_proxy = \"http://{}\"",
            egress.addr
        ),
        &format!(
            "\"crm.example.com:443\" = \"{}\"\n\"far.example.com:443\" = \"127.0.0.2:9\"",
            world.crm.addr
        ),
        &connectors,
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &world.pki.ca_pem())], &[]);

    // The target's own address is checked before any tunnel is asked for.
    let (status, code, message) = error_of(&proxy, "crm").await;
    assert_eq!(
        (status, code.as_str()),
        (403, "target_address_denied"),
        "{message}"
    );
    assert!(message.contains("crm.example.com"), "{message}");
    assert!(egress.connects().is_empty(), "{:?}", egress.connects());

    // A connector's own egress proxy on a network not allowed is not dialled.
    let (status, code, message) = error_of(&proxy, "elsewhere").await;
    assert_eq!(
        (status, code.as_str()),
        (403, "target_address_denied"),
        "{message}"
    );
    assert!(
        message.contains("egress proxy http://127.0.0.3:3128"),
        "{message}"
    );
    assert!(world.crm.seen().is_empty());
}

#[tokio::test]
async fn an_https_egress_proxy_is_reached_over_tls_of_its_own() {
    let world = World::new().await;
    let egress = Tinyproxy::start("127.0.0.1", "");
    // TLS in front of tinyproxy: an egress proxy at an https:// URL, its certificate for its
    // address, from the CA the proxy trusts.
    let leaf = world.pki.leaf(&["127.0.0.1"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(common::server_config(&leaf, &[])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    let backend = egress.addr;
    let relay = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut plain = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    let config = config(
        &format!("allow_networks = [\"127.0.0.0/8\"]\negress_proxy = \"https://{front}\""),
        &format!("\"crm.example.com:443\" = \"{}\"", world.crm.addr),
        &basic("crm", "https://crm.example.com", ""),
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &world.pki.ca_pem())], &[]);
    let answer = get(
        proxy.addr,
        "/tls-inside-tls",
        &[("x-connector-name", "crm")],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(world.crm.seen().len(), 1);
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(egress.connects(), vec![world.crm.addr.to_string()]);
    relay.abort();
}
