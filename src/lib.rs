//! connector-proxy: an authenticating HTTP egress proxy.
#![forbid(unsafe_code)]

pub mod config;
pub mod secret;
pub mod target;
