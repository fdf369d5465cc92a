//! Bodies stream both ways: 100 MiB up and 100 MiB down pass through the proxy while its peak
//! resident memory stays far below the size of either body, over an HTTP/2 upstream and over an
//! HTTP/1.1 one.

mod common;

use bytes::Bytes;
use common::{Download, Pki, Proxy, Upstream};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

const SIZE: u64 = 100 * 1024 * 1024;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn hundred_mebibytes_stream_up_and_down_in_constant_memory() {
    stream_up_and_down(&[b"h2", b"http/1.1"], http::Version::HTTP_2).await;
}

#[tokio::test]
async fn hundred_mebibytes_stream_up_and_down_an_http1_upstream_in_constant_memory() {
    stream_up_and_down(&[b"http/1.1"], http::Version::HTTP_11).await;
}

async fn stream_up_and_down(alpn: &[&[u8]], version: http::Version) {
    let pki = Pki::new();
    let crm = Upstream::start(&pki.leaf(&["crm.example.com"]), alpn).await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nextra_ca_file = \"ca.pem\"\nallow_networks = [\"127.0.0.0/8\"]\n\
         request_timeout = \"120s\"\nresolve = {{ \"crm.example.com:443\" = \"{}\" }}\n\
         [orgs.acme.connectors.crm]\nauth = \"basic\"\nresource_domain = \"https://crm.example.com\"\nusername = \"u\"\npassword = \"p\"\n",
        crm.addr
    );
    let proxy = Proxy::start(&config, &[("ca.pem", &pki.ca_pem())], &[]);

    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);

    let upload = Request::post("/upload")
        .header("x-connector-name", "crm")
        .body(Download::new(SIZE))
        .unwrap();
    let response = sender.send_request(upload).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        Bytes::from(format!("ok {SIZE}")),
        "the upstream counted every byte"
    );
    assert_eq!(crm.seen()[0].body_len, SIZE);
    assert_eq!(crm.seen()[0].version, version);

    sender.ready().await.unwrap();
    let download = Request::get(format!("/download/{SIZE}"))
        .header("x-connector-name", "crm")
        .body(Download::new(0))
        .unwrap();
    let mut body = sender.send_request(download).await.unwrap().into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, SIZE);

    let peak = peak_rss_kib(proxy.pid());
    eprintln!("proxy peak RSS after 2 x {SIZE} bytes: {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "proxy peak RSS {peak} KiB for {SIZE}-byte bodies: bodies are being buffered"
    );
}
