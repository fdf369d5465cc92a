//! A real forward proxy (Debian's `tinyproxy`) on a free loopback port, started and stopped by
//! the tests, with the CONNECT requests it logged.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Tinyproxy {
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tinyproxy {
    /// Listening on `ip`, with `extra` lines of configuration (`BasicAuth user password`,
    /// `ConnectPort 443`, ...).
    pub fn start(ip: &str, extra: &str) -> Self {
        let port = std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen {ip}\nTimeout 30\nMaxClients 64\nAllow 127.0.0.0/8\n\
                 LogFile \"{}\"\nLogLevel Info\n{extra}\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run tinyproxy ({e}): the egress proxy tests need Debian's tinyproxy; \
                     ./scripts/test installs it"
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { addr, child, dir }
    }

    /// The targets of the CONNECT requests it received, in order (`host:port`).
    pub fn connects(&self) -> Vec<String> {
        let log =
            std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default();
        log.lines()
            .filter_map(|line| line.split("Request (file descriptor ").nth(1))
            .filter_map(|rest| rest.split("): CONNECT ").nth(1))
            .filter_map(|target| target.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}
