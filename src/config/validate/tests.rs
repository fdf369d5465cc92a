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
