//! connector-proxy: an authenticating HTTP egress proxy.
//!
//! Imports run one way: `server` -> `proxy` -> `registry`, `target`, `credentials`, `forward`;
//! `registry` -> `config`, `credentials`; `target` is pure.
#![forbid(unsafe_code)]

pub mod config;
pub mod credentials;
pub mod error;
pub mod forward;
pub mod proxy;
pub mod registry;
pub mod secret;
pub mod server;
pub mod target;
