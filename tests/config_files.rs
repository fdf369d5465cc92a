//! `connector-proxy check` over the fixtures in tests/config: every invalid file fails with a
//! message naming its key (each `# expect:` line of the file), every valid one passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn check(path: &Path) -> (bool, String, String) {
    let out = Command::new(common::binary())
        .args(["check", "--config"])
        .arg(path)
        .env_remove("CONNECTOR_PROXY_CONFIG")
        .env("CONNECTOR_PROXY_DEMO_TOKEN", "container-inbound")
        .env("CONNECTOR_PROXY_ADMIN_TOKEN", "container-admin")
        .env_remove("CONNECTOR_PROXY_TEST_UNSET_PASSWORD")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn every_invalid_config_fails_naming_its_key() {
    let files = fixtures("invalid");
    assert!(
        files.len() >= 20,
        "expected the invalid fixtures, found {}",
        files.len()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no # expect: line",
            file.display()
        );
        let (ok, _, stderr) = check(&file);
        assert!(!ok, "{} was accepted", file.display());
        assert!(
            stderr.contains(&file.display().to_string()),
            "{}: file not named in\n{stderr}",
            file.display()
        );
        for needle in expected {
            assert!(
                stderr.contains(needle),
                "{}: {needle:?} not in\n{stderr}",
                file.display()
            );
        }
    }
}

#[test]
fn problems_carry_line_and_column_where_the_parser_knows_them() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/invalid/unknown_key.toml");
    let (_, _, stderr) = check(&file);
    assert!(
        stderr.contains(&format!("{}:4:1: ", file.display())),
        "{stderr}"
    );
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config/invalid/http_resource_domain.toml");
    let (_, _, stderr) = check(&file);
    assert!(
        stderr.contains(&format!(
            "{}:4:19: orgs.acme.connectors.crm: ",
            file.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_password_in_an_egress_proxy_url_is_not_repeated() {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/invalid/egress_problems.toml");
    let (ok, _, stderr) = check(&file);
    assert!(!ok);
    assert!(
        stderr.contains("egress_proxy carries credentials in the URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn valid_configs_pass_and_list_connectors_without_secrets() {
    let mut files = fixtures("valid");
    assert!(files.len() >= 2);
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/proxy.toml"));
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/container.toml"));
    for file in files {
        let (ok, stdout, stderr) = check(&file);
        assert!(ok, "{} refused:\n{stderr}", file.display());
        assert!(stdout.contains("connector "), "{stdout}");
        for secret in [
            "literal-is-allowed",
            "crm-secret",
            "billing-secret",
            "legacy-password",
            "acme-inbound",
            "container-inbound",
            "container-admin",
            "weather-key",
            "maps-key",
            "egress-secret",
        ] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{secret} printed by check"
            );
        }
    }
    let (_, stdout, _) =
        check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid/every_kind.toml"));
    for line in [
        "\"Contact Center Connector\": basic",
        "\"billing\": oauth2",
        "\"legacy\": oauth2",
        "\"weather\": api_key",
        "\"maps\": api_key",
        "egress proxy http://proxy.corp.example:3128 (with credentials), 2 no_proxy entries",
        "resource_domain https://crm.example.com, egress_proxy none",
        "traces to http://otel-collector:4318/v1/traces (OTLP/HTTP), sampling_ratio 0.1, service_name connector-proxy",
        "resource_domain https://billing.example.com/v2, max_concurrent 50, rate_limit 50/s, burst 100",
    ] {
        assert!(stdout.contains(line), "{line} not in\n{stdout}");
    }
}

#[test]
fn version_and_check_are_what_people_try_first() {
    let out = Command::new(common::binary())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("connector-proxy {}", env!("CARGO_PKG_VERSION"))
    );

    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid/every_kind.toml");
    let (ok, stdout, stderr) = check(&file);
    assert!(ok, "{stderr}");
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some(format!("{}: ok, 1 org(s), 5 connector(s)", file.display()).as_str()),
        "{stdout}"
    );
    // One line per connector: auth, grant, client auth, resource domain.
    let connectors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("connector "))
        .collect();
    assert_eq!(connectors.len(), 5, "{stdout}");
    for expected in [
        "connector \"billing\": oauth2, grant client_credentials, client_auth client_secret_post, token_url https://login.example.com/oauth2/token, resource_domain https://billing.example.com/v2",
        "connector \"legacy\": oauth2, grant password, client_auth client_secret_basic, token_url https://legacy.example.com/oauth/token",
        "connector \"Contact Center Connector\": basic, username svc-flow, resource_domain https://crm.example.com",
        "connector \"weather\": api_key, header authorization, prefix \"Bearer \", resource_domain https://api.weather.example",
        "connector \"maps\": api_key, query_param key, resource_domain https://maps.example.com",
    ] {
        assert!(
            connectors.iter().any(|l| l.contains(expected)),
            "{expected:?} not in\n{stdout}"
        );
    }
}
