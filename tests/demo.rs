//! `cargo run --example demo`, the command README shows a newcomer, run as they would run it:
//! it exits 0 and prints what the upstream received through each connector, masked.

use std::process::Command;

#[test]
fn the_offline_demo_runs_both_connectors_and_masks_their_credentials() {
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "demo"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("CONNECTOR_PROXY_CONFIG")
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    for line in [
        // The Basic connector: its resource domain's path joined, its username, a masked value.
        "path           /crm/contacts?page=1",
        "authorization  Basic ",
        "(username demo-user)",
        // The OAuth connector: a token the proxy obtained from the token endpoint.
        "path           /billing/invoices/42",
        "authorization  Bearer demo… (19 characters)",
        "connector Demo OAuth   oauth2  https://api.demo.test/billing  token valid",
        "token requests made by the proxy: 1",
        "demo ok",
    ] {
        assert!(stdout.contains(line), "{line:?} not in\n{stdout}");
    }
    // Masked: no credential is printed past its first four characters.
    for line in stdout.lines().filter(|l| l.contains("authorization")) {
        let credential = line.split_whitespace().nth(2).unwrap_or_default();
        assert!(credential.chars().count() <= 5, "unmasked: {line}");
    }
    assert!(!stdout.contains("demo-access-token-1"), "{stdout}");
}
