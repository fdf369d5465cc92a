//! A real `redis-server` (Debian's package) on a free loopback port, started and stopped by the
//! tests, and a few raw RESP calls to look at what it holds.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Serving TLS only (`rediss://`), with these files in `dir`.
    tls: bool,
    /// `--requirepass`.
    password: Option<String>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Redis {
    pub fn start() -> Self {
        let mut redis = Self::start_unstarted();
        redis.restart();
        redis
    }

    /// A server speaking TLS only, presenting `cert_pem` (for 127.0.0.1) and `key_pem`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        let mut redis = Self::start_unstarted();
        std::fs::write(redis.dir.path().join("cert.pem"), cert_pem).unwrap();
        std::fs::write(redis.dir.path().join("key.pem"), key_pem).unwrap();
        redis.tls = true;
        redis.restart();
        redis
    }

    fn start_unstarted() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            tls: false,
            password: None,
        }
    }

    /// A server that wants `password` (AUTH) from every client.
    pub fn start_with_password(password: &str) -> Self {
        let mut redis = Self::start_unstarted();
        redis.password = Some(password.to_owned());
        redis.restart();
        redis
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server again on the same port (after [`Redis::kill`]).
    pub fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        if self.tls {
            let dir = self.dir.path();
            command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(dir.join("cert.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("key.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            command.args(["--port", &self.port.to_string()]);
        }
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): the cluster tests need Debian's redis-server; \
                     ./scripts/test installs it"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // A TLS server is taken as up once it accepts connections.
            let up = if self.tls {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                self.command(&["PING"]).is_some()
            };
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// SIGKILLs the server: nothing it holds survives (`--save ''`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every value stored under a key of `pattern`.
    pub fn values(&self, pattern: &str) -> Vec<Vec<u8>> {
        let Some(Reply::Array(keys)) = self.command(&["KEYS", pattern]) else {
            return Vec::new();
        };
        keys.into_iter()
            .filter_map(|key| match key {
                Reply::Bulk(Some(key)) => {
                    let key = String::from_utf8(key).unwrap();
                    match self.command(&["GET", &key]) {
                        Some(Reply::Bulk(Some(value))) => Some(value),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect()
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self.command(&["KEYS", pattern]) {
            Some(Reply::Array(keys)) => keys
                .into_iter()
                .filter_map(|k| match k {
                    Reply::Bulk(Some(k)) => String::from_utf8(k).ok(),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Option<Reply> {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut out = format!("*{}\r\n", args.len());
        for arg in args {
            out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        tcp.write_all(out.as_bytes()).ok()?;
        read_reply(&mut BufReader::new(tcp))
    }
}

#[derive(Debug)]
pub enum Reply {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
    Integer(i64),
    Error(String),
}

fn read_reply(reader: &mut impl BufRead) -> Option<Reply> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let line = line.trim_end();
    let (kind, rest) = line.split_at_checked(1)?;
    Some(match kind {
        "+" => Reply::Simple(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Integer(rest.parse().ok()?),
        "$" => {
            let len: i64 = rest.parse().ok()?;
            if len < 0 {
                Reply::Bulk(None)
            } else {
                let mut buf = vec![0u8; len as usize + 2];
                reader.read_exact(&mut buf).ok()?;
                buf.truncate(len as usize);
                Reply::Bulk(Some(buf))
            }
        }
        "*" => {
            let len: i64 = rest.parse().ok()?;
            let mut items = Vec::new();
            for _ in 0..len.max(0) {
                items.push(read_reply(reader)?);
            }
            Reply::Array(items)
        }
        _ => return None,
    })
}
