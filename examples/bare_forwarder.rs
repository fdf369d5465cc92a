//! The stack's floor, for `benches/load.sh`: the bare hyper-util forwarder of
//! `benches/bare/mod.rs` on a port of its own.
//!
//!   bare_forwarder LISTEN UPSTREAM_ADDR HOST CA_PEM AUTHORIZATION

#[path = "../benches/bare/mod.rs"]
mod bare;

use http::HeaderValue;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), bare::Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, host, ca, authorization] = args.as_slice() else {
        return Err("usage: bare_forwarder LISTEN UPSTREAM_ADDR HOST CA_PEM AUTHORIZATION".into());
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let listener = TcpListener::bind(listen.as_str()).await?;
    bare::serve(
        listener,
        upstream.parse()?,
        host,
        roots,
        HeaderValue::from_str(authorization)?,
    )
    .await
}
