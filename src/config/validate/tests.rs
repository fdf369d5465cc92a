use super::*;

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, Path::new("/etc/cp/proxy.toml")) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid { problems, path }) => {
            problems.iter().map(|p| p.display_in(&path)).collect()
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn every_missing_oauth_field_is_reported_at_once() {
    let found = problems(
        "[orgs.acme.connectors.billing]\nauth = \"oauth2\"\nresource_domain = \"https://b.example\"\n",
    );
    for field in [
        "grant is required",
        "token_url is required",
        "client_id is required",
        "client_secret is required",
    ] {
        assert!(
            found.iter().any(|p| p.contains(field)),
            "{field} missing from {found:#?}"
        );
    }
    assert!(
        found
            .iter()
            .all(|p| p.contains("orgs.acme.connectors.billing")),
        "{found:#?}"
    );
}

#[test]
fn parse_errors_carry_file_line_and_column() {
    let found = problems("[server]\nlisten = \"127.0.0.1:8080\"\nlisen = 1\n");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("/etc/cp/proxy.toml:3:1: "),
        "{}",
        found[0]
    );
    assert!(found[0].contains("lisen"), "{}", found[0]);
}

#[test]
fn names_with_spaces_are_quoted_in_places() {
    let found = problems(
        "[orgs.acme.connectors.\"Contact Center\"]\nauth = \"basic\"\nresource_domain = \"https://c.example\"\nusername = \"u\"\n",
    );
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].contains("orgs.acme.connectors.\"Contact Center\": password is required"),
        "{}",
        found[0]
    );
}

#[test]
fn a_valid_basic_connector_loads_with_defaults() {
    let text = "[orgs.acme.connectors.crm]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com/api\"\n\
                username = \"svc\"\npassword = \"pw\"\nvalidation_url = \"https://crm.example.com/api/whoami\"\n";
    let config = Config::parse(text, Path::new("proxy.toml")).unwrap();
    let crm = &config.orgs["acme"].connectors["crm"];
    assert_eq!(
        crm.validation_url.as_ref().unwrap().to_string(),
        "https://crm.example.com/api/whoami"
    );
    assert_eq!(config.server.max_concurrent_requests, 10_000);
    assert!(!format!("{config:?}").contains("\"pw\""));
}

#[test]
fn no_proxy_spellings_are_normalised_and_egress_proxies_parsed() {
    let text = "[upstream]\negress_proxy = \"http://Proxy.Corp.Example:3128\"\n\
                egress_proxy_auth = \"relay:pw\"\n\
                no_proxy = [\".Billing.Example.COM\", \"*.corp.example\", \"crm.example.com.\", \
                \"bücher.example\", \"10.20.0.7\", \"[::1]\", \"10.20.0.0/16\", \"*\"]\n\
                [orgs.acme.connectors.crm]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com\"\n\
                username = \"u\"\npassword = \"p\"\negress_proxy = \"https://[fd00::7]\"\n\
                [orgs.acme.connectors.direct]\nauth = \"basic\"\nresource_domain = \"https://d.example.com\"\n\
                username = \"u\"\npassword = \"p\"\negress_proxy = \"None\"\n";
    let config = Config::parse(text, Path::new("proxy.toml")).unwrap();
    let proxy = config.upstream.egress_proxy.as_ref().unwrap();
    assert_eq!(
        (
            proxy.url.as_str(),
            proxy.host.as_str(),
            proxy.port,
            proxy.tls
        ),
        (
            "http://proxy.corp.example:3128",
            "proxy.corp.example",
            3128,
            false
        )
    );
    assert_eq!(proxy.auth.as_ref().unwrap().expose(), "relay:pw");
    let net = |s: &str| NoProxy::Net(s.parse().unwrap());
    assert_eq!(
        config.upstream.no_proxy,
        vec![
            NoProxy::Domain("billing.example.com".into()),
            NoProxy::Domain("corp.example".into()),
            NoProxy::Domain("crm.example.com".into()),
            NoProxy::Domain("xn--bcher-kva.example".into()),
            net("10.20.0.7/32"),
            net("::1/128"),
            net("10.20.0.0/16"),
            NoProxy::All,
        ]
    );
    let connectors = &config.orgs["acme"].connectors;
    let EgressChoice::Proxy(own) = &connectors["crm"].egress else {
        panic!("{:?}", connectors["crm"].egress);
    };
    assert_eq!(
        (
            own.url.as_str(),
            own.host.as_str(),
            own.port,
            own.tls,
            own.auth.is_none()
        ),
        ("https://[fd00::7]:443", "fd00::7", 443, true, true)
    );
    assert_eq!(connectors["direct"].egress, EgressChoice::Direct);
    assert!(!format!("{config:?}").contains("relay:pw"));
}

#[test]
fn no_proxy_and_egress_proxy_auth_without_an_egress_proxy_are_refused() {
    let found = problems("[upstream]\nno_proxy = [\"a.example\"]\negress_proxy_auth = \"u:p\"\n");
    assert_eq!(found.len(), 2, "{found:#?}");
    // In the order they are written.
    assert!(
        found[0].contains(":2:1: upstream.no_proxy: no_proxy lists what bypasses"),
        "{}",
        found[0]
    );
    assert!(
        found[1].contains(":3:21: upstream: egress_proxy_auth is set without egress_proxy"),
        "{}",
        found[1]
    );
    assert!(found.iter().all(|f| !f.contains("u:p")));
}

#[test]
fn rate_limits_are_read_in_every_spelling() {
    let connector = |name: &str, limits: &str| {
        format!(
            "[orgs.acme.connectors.{name}]\nauth = \"basic\"\nresource_domain = \"https://{name}.example\"\n\
             username = \"u\"\npassword = \"p\"\n{limits}\n"
        )
    };
    let text = [
        connector(
            "a",
            "rate_limit = \"50/s\"\nburst = 100\nmax_concurrent = 8",
        ),
        connector("b", "rate_limit = \"600/min\""),
        connector("c", "rate_limit = \" 1000 / h \""),
        connector("d", "rate_limit = \"10/15s\"\nburst = 1"),
        connector("e", ""),
    ]
    .concat();
    let config = Config::parse(&text, Path::new("proxy.toml")).unwrap();
    let limits = |name: &str| config.orgs["acme"].connectors[name].limits.clone();
    let rate = |name: &str| limits(name).rate.unwrap();
    assert_eq!(limits("a").max_concurrent, Some(8));
    assert_eq!(
        rate("a"),
        Rate {
            count: 50,
            per: Duration::from_secs(1),
            burst: 100
        }
    );
    assert_eq!(rate("a").interval(), Duration::from_millis(20));
    assert_eq!(
        rate("b"),
        Rate {
            count: 600,
            per: Duration::from_secs(60),
            burst: 600
        }
    );
    assert_eq!(rate("b").interval(), Duration::from_millis(100));
    assert_eq!(rate("c").per, Duration::from_secs(3600));
    assert_eq!(
        rate("d"),
        Rate {
            count: 10,
            per: Duration::from_secs(15),
            burst: 1
        }
    );
    assert_eq!(limits("e"), LimitSettings::default());
    let shown: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| rate(n).to_string())
        .collect();
    assert_eq!(
        shown,
        [
            "50/s, burst 100",
            "600/min, burst 600",
            "1000/h, burst 1000",
            "10/15s, burst 1"
        ]
    );
}

#[test]
fn a_jwt_bearer_grant_defaults_its_issuer_audience_and_client_auth() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    let base = "auth = \"oauth2\"\ngrant = \"jwt_bearer\"\nresource_domain = \"https://a.example.com\"\n\
                token_url = \"https://login.example.com/token\"\nclient_id = \"svc-client\"\n";
    let text = format!(
        "[orgs.acme.connectors.plain]\n{base}subject = \"svc@example.com\"\nprivate_key = {{ file = \"key.pem\" }}\n\
         [orgs.acme.connectors.named]\n{base}subject = \"svc@example.com\"\nprivate_key = {{ file = \"key.pem\" }}\n\
         issuer = \"svc@project.example\"\naudience = \"https://oauth2.example.com/token\"\n\
         client_secret = \"box-secret\"\nclient_auth = \"client_secret_post\"\n"
    );
    let config = Config::parse(&text, &dir.path().join("proxy.toml")).unwrap();
    let client = |name: &str| match &config.orgs["acme"].connectors[name].auth {
        AuthConfig::OAuth2(client) => client.clone(),
        other => panic!("{other:?}"),
    };
    let grant = |name: &str| match client(name).grant {
        Grant::JwtBearer(grant) => grant,
        other => panic!("{other:?}"),
    };
    let plain = grant("plain");
    assert_eq!(
        (
            plain.issuer.as_str(),
            plain.subject.as_str(),
            plain.audience.as_str(),
            plain.alg
        ),
        (
            "svc-client",
            "svc@example.com",
            "https://login.example.com/token",
            AssertionAlg::ES256
        )
    );
    assert!(plain.key.cert_chain.is_empty());
    assert_eq!(client("plain").client_auth, ClientAuth::None);
    let named = grant("named");
    assert_eq!(
        (named.issuer.as_str(), named.audience.as_str()),
        ("svc@project.example", "https://oauth2.example.com/token")
    );
    assert!(matches!(
        client("named").client_auth,
        ClientAuth::SecretPost(_)
    ));

    // The grant's own keys are required; "none" is for this grant only.
    let found = problems(&format!(
        "[orgs.acme.connectors.bare]\n{base}\n\
         [orgs.acme.connectors.cc]\nauth = \"oauth2\"\ngrant = \"client_credentials\"\nclient_auth = \"none\"\n\
         resource_domain = \"https://a.example.com\"\ntoken_url = \"https://login.example.com/token\"\nclient_id = \"c\"\n"
    ));
    let joined = found.join("\n");
    assert!(
        joined
            .contains("orgs.acme.connectors.bare: subject is required for grant = \"jwt_bearer\""),
        "{joined}"
    );
    assert!(
        joined.contains(
            "orgs.acme.connectors.bare: private_key is required for grant = \"jwt_bearer\""
        ),
        "{joined}"
    );
    assert!(
        joined.contains(
            "orgs.acme.connectors.cc: client_auth = \"none\" applies to grant = \"jwt_bearer\" only"
        ),
        "{joined}"
    );
    assert_eq!(found.len(), 3, "{joined}");
}

#[test]
fn credentials_in_an_egress_proxy_url_are_refused_first_and_never_repeated() {
    for url in [
        "socks5://svc:hunter2@proxy.corp:1080",
        "http://svc:hunter2@proxy.corp:99999",
        "http://svc:hunter2@proxy.corp:3128/path",
        "svc:hunter2@proxy.corp",
    ] {
        let found = problems(&format!("[upstream]\negress_proxy = \"{url}\"\n"));
        assert_eq!(found.len(), 1, "{url}: {found:#?}");
        assert!(
            found[0].contains("carries credentials in the URL"),
            "{url}: {}",
            found[0]
        );
        assert!(!found[0].contains("hunter2"), "{url}: {}", found[0]);
    }
}

#[test]
fn a_day_is_a_rate_period_and_more_than_a_year_is_refused() {
    let connector = |limit: &str| {
        format!(
            "[orgs.acme.connectors.c]\nauth = \"basic\"\nresource_domain = \"https://c.example\"\n\
             username = \"u\"\npassword = \"p\"\nrate_limit = \"{limit}\"\n"
        )
    };
    let config = Config::parse(&connector("10000/day"), Path::new("proxy.toml")).unwrap();
    let rate = config.orgs["acme"].connectors["c"]
        .limits
        .rate
        .clone()
        .unwrap();
    assert_eq!(
        (rate.count, rate.per),
        (10_000, Duration::from_secs(86_400))
    );
    let found = problems(&connector("1/400days"));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].contains("has a time longer than 366 days"),
        "{}",
        found[0]
    );
}

#[test]
fn a_jwt_bearer_grant_refuses_what_it_would_otherwise_ignore() {
    let base = "auth = \"oauth2\"\ngrant = \"jwt_bearer\"\nresource_domain = \"https://a.example.com\"\n\
                token_url = \"https://login.example.com/token\"\nclient_id = \"c\"\nsubject = \"s\"\n\
                private_key = \"not read: the problems below come first\"\n";
    let found = problems(&format!(
        "[orgs.acme.connectors.hmac]\n{base}client_secret = \"0123456789abcdef0123456789abcdef\"\n\
         client_assertion_alg = \"HS256\"\n\
         [orgs.acme.connectors.twice]\n{base}extra_params = {{ assertion = \"mine\" }}\n"
    ));
    let joined = found.join("\n");
    assert!(
        joined.contains("orgs.acme.connectors.hmac: client_assertion_alg HS256 is for client_auth = \"client_secret_jwt\", which is not set"),
        "{joined}"
    );
    assert!(
        joined.contains("orgs.acme.connectors.twice: extra_params must not set \"assertion\""),
        "{joined}"
    );
}

#[test]
fn telemetry_endpoints_get_the_traces_path_and_defaults() {
    let load = |section: &str| {
        Config::parse(section, Path::new("/etc/cp/proxy.toml"))
            .unwrap()
            .telemetry
    };
    assert_eq!(load(""), None, "off without [telemetry]");
    assert_eq!(load("[telemetry]\n"), None, "off without otlp_endpoint");
    let on = load("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n").unwrap();
    assert_eq!(on.traces_url, "http://127.0.0.1:4318/v1/traces");
    assert_eq!(on.sampling_ratio, 1.0);
    assert_eq!(on.service_name, "connector-proxy");
    for (endpoint, url) in [
        ("http://otel:4318/", "http://otel:4318/v1/traces"),
        (
            "https://otel.example/base",
            "https://otel.example/base/v1/traces",
        ),
        ("http://otel:4318/v1/traces", "http://otel:4318/v1/traces"),
    ] {
        let section = format!(
            "[telemetry]\notlp_endpoint = \"{endpoint}\"\nsampling_ratio = 0.25\nservice_name = \"edge\"\n"
        );
        let on = load(&section).unwrap();
        assert_eq!(on.traces_url, url, "{endpoint}");
        assert_eq!(on.sampling_ratio, 0.25);
        assert_eq!(on.service_name, "edge");
    }
}

#[test]
fn telemetry_mistakes_are_named_and_credentials_never_repeated() {
    let one = |section: &str| {
        let found = problems(section);
        assert_eq!(found.len(), 1, "{section}: {found:?}");
        found[0].clone()
    };
    let found = one("[telemetry]\notlp_endpoint = \"http://otel:pa55w0rd@collector:4318\"\n");
    assert!(
        found.contains(":2:17: telemetry: otlp_endpoint must not carry credentials"),
        "{found}"
    );
    assert!(!found.contains("pa55w0rd"), "{found}");
    let found = one("[telemetry]\notlp_endpoint = \"grpc://collector:4317\"\n");
    assert!(
        found.contains("must be an http:// or https:// URL"),
        "{found}"
    );
    let found = one("[telemetry]\notlp_endpoint = \"collector:4318\"\n");
    assert!(
        found.contains("must be an http:// or https:// URL"),
        "{found}"
    );
    let found = one("[telemetry]\notlp_endpoint = \"http://c:4318/?x=1\"\n");
    assert!(found.contains("must not have a query"), "{found}");
    let found = one("[telemetry]\notlp_endpoint = \"http://c:4318\"\nsampling_ratio = 1.5\n");
    assert!(
        found.contains(":3:18: telemetry: sampling_ratio must be between 0.0"),
        "{found}"
    );
    let found = one("[telemetry]\notlp_endpoint = \"http://c:4318\"\nservice_name = \" \"\n");
    assert!(found.contains("service_name must not be empty"), "{found}");
    let found = one("[telemetry]\nsampling_ratio = 0.5\n");
    assert!(
        found.contains(":2:18: telemetry: sampling_ratio is set without otlp_endpoint"),
        "{found}"
    );
    let found = one("[telemetry]\notlp_endpoint = \"http://c:4318\"\nsamping_ratio = 0.5\n");
    assert!(found.contains("did you mean `sampling_ratio`?"), "{found}");
}
