//! connector-proxy: an authenticating HTTP egress proxy.
//!
//! Imports run one way: `server` -> `app`, `admin`; `app` -> `proxy`, `registry`; `proxy` ->
//! `registry`, `target`, `credentials`, `forward`, `limits`; `registry` -> `config`,
//! `credentials`, `limits`; `limits` -> `cluster`; `target` is pure.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod error;
pub mod forward;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod secret;
pub mod server;
pub mod target;
pub mod telemetry;
