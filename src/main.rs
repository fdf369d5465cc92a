//! Thin: command line -> tracing -> Config::load -> server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use connector_proxy::app::App;
use connector_proxy::config::{self, AuthConfig, Config, EgressChoice, KeyPlacement};
use connector_proxy::server::{self, Server};
use connector_proxy::telemetry;

#[derive(Parser)]
#[command(
    version,
    about = "Authenticating HTTP egress proxy for custom connectors"
)]
struct Cli {
    /// Configuration file [default: $CONNECTOR_PROXY_CONFIG, then config/proxy.toml]
    #[arg(long, global = true, env = "CONNECTOR_PROXY_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Log line format
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and list its orgs and connectors (no secrets)
    Check {
        /// Also fetch each OAuth token once and call each validation URL
        #[arg(long)]
        online: bool,
    },
    /// Ask the running proxy's admin listener for /healthz (for container health checks)
    Health {
        /// Admin address to ask [default: server.admin_listen from the configuration]
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only ring is compiled in; installing it makes any `ClientConfig::builder()` use it too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Some(Command::Check { online }) => check(&cli.config, online),
        Some(Command::Health { admin }) => health(&cli.config, admin),
        None => run(&cli.config, cli.log_format),
    }
}

/// A plain HTTP/1.1 GET of `/healthz` on `server.admin_listen` (loopback when it listens on all
/// interfaces); exit 0 on 200.
fn health(path: &std::path::Path, admin: Option<std::net::SocketAddr>) -> ExitCode {
    use std::io::{Read, Write};
    let configured = match admin {
        Some(addr) => Ok(addr),
        None => Config::load(path).map(|c| c.server.admin_listen),
    };
    let mut addr = match configured {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = std::time::Duration::from_secs(3);
    let answer = std::net::TcpStream::connect_timeout(&addr, timeout).and_then(|mut stream| {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head)
    });
    match answer {
        Ok(head) if head.starts_with(b"HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(head) => {
            eprintln!(
                "{addr}/healthz answered {:?}",
                String::from_utf8_lossy(&head)
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{addr}/healthz: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path, online: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}: ok, {} org(s), {} connector(s)",
        path.display(),
        config.orgs.len(),
        config.connector_count()
    );
    let admin_token = if config.server.admin_token.is_some() {
        "admin token set"
    } else {
        "no admin token"
    };
    println!(
        "listen {}, admin {} ({admin_token})",
        config.server.listen, config.server.admin_listen
    );
    if let Some(proxy) = &config.upstream.egress_proxy {
        let auth = if proxy.auth.is_some() {
            "with credentials"
        } else {
            "without credentials"
        };
        println!(
            "egress proxy {} ({auth}), {} no_proxy entries",
            proxy.url,
            config.upstream.no_proxy.len()
        );
    }
    if let Some(t) = &config.telemetry {
        println!(
            "traces to {} (OTLP/HTTP), sampling_ratio {}, service_name {}",
            t.traces_url, t.sampling_ratio, t.service_name
        );
    }
    for org in config.orgs.values() {
        let inbound = if org.inbound_token.is_some() {
            "inbound token set"
        } else {
            "no inbound token"
        };
        println!("org {} ({inbound})", org.name);
        for c in org.connectors.values() {
            let how = match &c.auth {
                AuthConfig::Basic { username, .. } => format!("basic, username {username}"),
                AuthConfig::OAuth2(o) => format!(
                    "oauth2, grant {}, client_auth {}, token_url {}",
                    o.grant_kind().as_str(),
                    o.client_auth.kind().as_str(),
                    o.token_url
                ),
                AuthConfig::ApiKey(key) => match &key.placement {
                    KeyPlacement::Header { name, prefix } if prefix.is_empty() => {
                        format!("api_key, header {name}")
                    }
                    KeyPlacement::Header { name, prefix } => {
                        format!("api_key, header {name}, prefix {prefix:?}")
                    }
                    KeyPlacement::Query { param } => format!("api_key, query_param {param}"),
                },
            };
            let egress = match &c.egress {
                EgressChoice::Inherit => String::new(),
                EgressChoice::Direct => ", egress_proxy none".to_owned(),
                EgressChoice::Proxy(proxy) => format!(", egress_proxy {}", proxy.url),
            };
            let mut limits = String::new();
            if let Some(n) = c.limits.max_concurrent {
                limits.push_str(&format!(", max_concurrent {n}"));
            }
            if let Some(rate) = &c.limits.rate {
                limits.push_str(&format!(", rate_limit {rate}"));
            }
            println!(
                "  connector {:?}: {how}, resource_domain {}{egress}{limits}",
                c.name, c.resource_domain
            );
        }
    }
    if !online {
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    let rows = runtime.block_on(async {
        match App::new(&config) {
            Ok(app) => Ok(app.check_online().await),
            Err(e) => Err(e.to_string()),
        }
    });
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!();
    println!(
        "{:<16} {:<28} {:<7} {:<6} detail",
        "ORG", "CONNECTOR", "AUTH", "RESULT"
    );
    let mut failed = false;
    for (org, connector, auth, result) in rows {
        let (word, detail) = match result {
            Ok(detail) => ("ok", detail),
            Err(detail) => {
                failed = true;
                ("FAILED", detail)
            }
        };
        println!("{org:<16} {connector:<28} {auth:<7} {word:<6} {detail}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(path: &std::path::Path, format: LogFormat) -> ExitCode {
    // Held to the end of `run`: dropping it writes out the lines still queued.
    let _log = telemetry::init(match format {
        LogFormat::Text => telemetry::LogFormat::Text,
        LogFormat::Json => telemetry::LogFormat::Json,
    });
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    runtime.block_on(async {
        let server = match Server::bind(&config).await {
            Ok(server) => server,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = server.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let admin = server.admin_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(file = %path.display(), orgs = config.orgs.len(), connectors = config.connector_count(), "configuration loaded");
        for c in config.orgs.values().flat_map(|o| o.connectors.values()) {
            tracing::info!(org = %c.org, connector = %c.name, auth = c.auth.kind(), resource_domain = %c.resource_domain, "connector");
        }
        tracing::info!(addr = %admin, "admin listening");
        tracing::info!(addr = %addr, "proxy listening");
        server.run(server::shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}
