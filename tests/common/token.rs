//! A strict OAuth 2.0 token endpoint over TLS on 127.0.0.1, for the credential-service tests.
//!
//! It enforces each client's registered authentication method (and refuses any other),
//! verifies client assertions against the client certificate's public key, refuses a replayed
//! `jti`, requires the client certificate for `tls_client_auth`, counts requests, and can be
//! told to fail, stall, answer garbage, omit `expires_in`, or hold requests at a gate.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls_pki_types::CertificateDer;
use tokio::sync::Notify;

use super::{Leaf, Pki, install_provider, serve_tls};

pub const TOKEN_PATH: &str = "/oauth2/token";

#[derive(Clone)]
pub enum Method {
    SecretBasic(String),
    SecretPost(String),
    /// The client certificate whose key signs the assertions.
    Jwt(CertificateDer<'static>),
    Tls(CertificateDer<'static>),
    /// `client_secret_jwt`: an HS256, HS384 or HS512 assertion keyed by this secret.
    SecretJwt(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Normal,
    Fail500,
    Stall,
    Html,
    Garbage,
    OAuthError(String),
}

/// One request the endpoint answered (or refused), without secrets.
#[derive(Clone, Debug)]
pub struct Logged {
    pub client_id: String,
    pub grant_type: String,
    pub form: HashMap<String, String>,
    pub issued: Option<String>,
    pub at: Instant,
    /// The error code sent back, when refused.
    pub refused: Option<String>,
}

pub struct State {
    pub mode: Mode,
    pub clients: HashMap<String, Method>,
    /// Password-grant users.
    pub users: HashMap<String, String>,
    /// `expires_in` to send: a number, a string, or nothing.
    pub expires_in: Option<serde_json::Value>,
    pub log: Vec<Logged>,
    pub seen_jti: HashSet<String>,
    pub refresh_tokens: HashSet<String>,
    pub issued: u64,
    /// When set, requests after the first issued token wait here until notified.
    pub gate: Option<Arc<Notify>>,
    pub waiting_at_gate: u64,
    pub delay: Duration,
    /// Requests that reached the endpoint, answered or not (a client may give up first).
    pub arrived: u64,
    /// When each issued token lapses, from `exp` in whole seconds as oidc-provider computes it
    /// (issued at 12.9 s with `expires_in: 4`, it lapses at 16 s).
    pub lapses: HashMap<String, Instant>,
}

pub struct TokenServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    pub token_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const TOKEN_HOST: &str = "login.example.com";

impl TokenServer {
    /// Serves as `login.example.com` with a certificate from `pki`; client certificates from
    /// `pki` are accepted (and required only by `tls_client_auth` clients).
    pub async fn start(pki: &Pki) -> Self {
        install_provider();
        let leaf: Leaf = pki.leaf(&[TOKEN_HOST]);
        let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        use rustls_pki_types::pem::PemObject;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Normal,
            clients: HashMap::new(),
            users: HashMap::new(),
            expires_in: Some(serde_json::json!(3600)),
            log: Vec::new(),
            seen_jti: HashSet::new(),
            refresh_tokens: HashSet::new(),
            issued: 0,
            gate: None,
            waiting_at_gate: 0,
            delay: Duration::ZERO,
            arrived: 0,
            lapses: HashMap::new(),
        }));
        let token_url = format!("https://{TOKEN_HOST}{TOKEN_PATH}");
        let (shared, audience) = (state.clone(), token_url.clone());
        let (addr, task) = serve_tls(config, move |req, peer| {
            answer(req, shared.clone(), peer, audience.clone())
        })
        .await;
        Self {
            addr,
            state,
            token_url,
            task,
        }
    }

    pub fn register(&self, client_id: &str, method: Method) {
        self.state
            .lock()
            .unwrap()
            .clients
            .insert(client_id.to_owned(), method);
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    /// Tokens issued to `client_id`, in order.
    pub fn issued_to(&self, client_id: &str) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l.client_id == client_id)
            .filter_map(|l| l.issued)
            .collect()
    }
}

type Answer = Response<Full<Bytes>>;

fn json(status: u16, body: serde_json::Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn refuse(status: u16, error: &str, description: &str) -> Answer {
    json(
        status,
        serde_json::json!({ "error": error, "error_description": description }),
    )
}

async fn answer(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    peer: Option<CertificateDer<'static>>,
    audience: String,
) -> Result<Answer, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let (mode, delay, gate) = {
        let mut s = state.lock().unwrap();
        s.arrived += 1;
        (
            s.mode.clone(),
            s.delay,
            if s.issued > 0 { s.gate.clone() } else { None },
        )
    };
    if let Some(gate) = gate {
        state.lock().unwrap().waiting_at_gate += 1;
        gate.notified().await;
    }
    tokio::time::sleep(delay).await;
    let mut logged = Logged {
        client_id: String::new(),
        grant_type: form.get("grant_type").cloned().unwrap_or_default(),
        form: form.clone(),
        issued: None,
        at: Instant::now(),
        refused: None,
    };
    let response = match mode {
        Mode::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            refuse(500, "server_error", "stalled")
        }
        Mode::Fail500 => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"internal error")));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
        Mode::Html => Response::new(Full::new(Bytes::from_static(
            b"<html><body>Sign in</body></html>",
        ))),
        Mode::Garbage => json(200, serde_json::json!("x"))
            .map(|_| Full::new(Bytes::from_static(b"{\"access_tok"))),
        Mode::OAuthError(code) => refuse(400, &code, "told to refuse"),
        Mode::Normal => decide(&parts, &form, peer.as_ref(), &audience, &state, &mut logged),
    };
    if response.status() != StatusCode::OK {
        logged
            .refused
            .get_or_insert_with(|| format!("status {}", response.status()));
    }
    state.lock().unwrap().log.push(logged);
    Ok(response)
}

/// Authenticates the client by exactly its registered method, then applies the grant.
fn decide(
    parts: &http::request::Parts,
    form: &HashMap<String, String>,
    peer: Option<&CertificateDer<'static>>,
    audience: &str,
    state: &Arc<Mutex<State>>,
    logged: &mut Logged,
) -> Answer {
    if parts.uri.path() != TOKEN_PATH || parts.method != http::Method::POST {
        return refuse(404, "not_found", "no such endpoint");
    }
    let basic = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| {
            let (id, secret) = pair.split_once(':')?;
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((decode(id)?, decode(secret)?))
        });
    let client_id = basic
        .as_ref()
        .map(|(id, _)| id.clone())
        .or_else(|| form.get("client_id").cloned())
        .unwrap_or_default();
    logged.client_id = client_id.clone();
    let mut s = state.lock().unwrap();
    let Some(method) = s.clients.get(&client_id).cloned() else {
        logged.refused = Some("invalid_client".into());
        return refuse(401, "invalid_client", "unknown client");
    };
    let authenticated = match &method {
        Method::SecretBasic(secret) => {
            basic.as_ref().is_some_and(|(_, s)| s == secret)
                && !form.contains_key("client_secret")
                && !form.contains_key("client_assertion")
        }
        Method::SecretPost(secret) => basic.is_none() && form.get("client_secret") == Some(secret),
        Method::Jwt(cert) => {
            basic.is_none()
                && form.get("client_assertion_type").map(String::as_str)
                    == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && form.get("client_assertion").is_some_and(|jwt| {
                    match verify_assertion(jwt, cert, &client_id, audience) {
                        Ok(jti) => s.seen_jti.insert(jti),
                        Err(_) => false,
                    }
                })
        }
        Method::Tls(cert) => {
            basic.is_none() && !form.contains_key("client_secret") && peer == Some(cert)
        }
        Method::SecretJwt(secret) => {
            basic.is_none()
                && !form.contains_key("client_secret")
                && form.get("client_assertion_type").map(String::as_str)
                    == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && form.get("client_assertion").is_some_and(|jwt| {
                    match verify_hmac_assertion(jwt, secret, &client_id, audience) {
                        Ok(jti) => s.seen_jti.insert(jti),
                        Err(_) => false,
                    }
                })
        }
    };
    if !authenticated {
        logged.refused = Some("invalid_client".into());
        return refuse(401, "invalid_client", "client authentication failed");
    }
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some("password") => {
            let ok = match (form.get("username"), form.get("password")) {
                (Some(u), Some(p)) => s.users.get(u) == Some(p),
                _ => false,
            };
            if !ok {
                logged.refused = Some("invalid_grant".into());
                return refuse(400, "invalid_grant", "bad user credentials");
            }
        }
        Some("refresh_token") => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            if !s.refresh_tokens.remove(&presented) {
                logged.refused = Some("invalid_grant".into());
                return refuse(400, "invalid_grant", "refresh token unknown or revoked");
            }
        }
        _ => {
            logged.refused = Some("unsupported_grant_type".into());
            return refuse(400, "unsupported_grant_type", "grant not supported");
        }
    }
    s.issued += 1;
    let token = format!("at-5ecret-{}-{}", client_id, s.issued);
    logged.issued = Some(token.clone());
    let mut body = serde_json::json!({ "access_token": token, "token_type": "bearer" });
    if let Some(expires_in) = &s.expires_in {
        body["expires_in"] = expires_in.clone();
        if let Some(seconds) = expires_in.as_u64() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let exp = Duration::from_secs(now.as_secs() + seconds);
            s.lapses.insert(token.clone(), Instant::now() + (exp - now));
        }
    }
    if logged.grant_type != "client_credentials" {
        let refresh = format!("rt-5ecret-{}", s.issued);
        s.refresh_tokens.insert(refresh.clone());
        body["refresh_token"] = serde_json::json!(refresh);
    }
    json(200, body)
}

/// Checks an RFC 7523 assertion whose MAC is keyed by `secret` (`client_secret_jwt`); returns
/// its `jti`.
fn verify_hmac_assertion(
    jwt: &str,
    secret: &str,
    client_id: &str,
    audience: &str,
) -> Result<String, String> {
    let jwt = Jwt::read(jwt)?;
    let (header, claims) = (&jwt.header, &jwt.claims);
    let algorithm = match header["alg"].as_str() {
        Some("HS256") => ring::hmac::HMAC_SHA256,
        Some("HS384") => ring::hmac::HMAC_SHA384,
        Some("HS512") => ring::hmac::HMAC_SHA512,
        other => return Err(format!("alg {other:?}")),
    };
    let key = ring::hmac::Key::new(algorithm, secret.as_bytes());
    ring::hmac::verify(&key, jwt.signed.as_bytes(), &jwt.signature)
        .map_err(|_| "bad MAC".to_owned())?;
    check_claims(claims, client_id, audience)
}

/// A JWT's parts, decoded; its signature not checked yet.
struct Jwt {
    header: serde_json::Value,
    claims: serde_json::Value,
    /// `header.claims`, as the signature covers them.
    signed: String,
    signature: Vec<u8>,
}

impl Jwt {
    fn read(jwt: &str) -> Result<Self, String> {
        let mut parts = jwt.split('.');
        let (Some(h), Some(c), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not three parts".into());
        };
        let decode = |p: &str| B64URL.decode(p).map_err(|e| e.to_string());
        let json = |p: &str| -> Result<serde_json::Value, String> {
            serde_json::from_slice(&decode(p)?).map_err(|e| e.to_string())
        };
        Ok(Self {
            header: json(h)?,
            claims: json(c)?,
            signed: format!("{h}.{c}"),
            signature: decode(sig)?,
        })
    }
}

/// `iss` = `sub` = the client, `aud` the token endpoint, a short `exp`; returns the `jti`.
fn check_claims(
    claims: &serde_json::Value,
    client_id: &str,
    audience: &str,
) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().ok_or("no exp")?;
    if claims["iss"] != client_id
        || claims["sub"] != client_id
        || claims["aud"] != audience
        || exp < now
        || exp > now + 300
    {
        return Err(format!("bad claims {claims}"));
    }
    Ok(claims["jti"].as_str().ok_or("no jti")?.to_owned())
}

/// Checks an RFC 7523 assertion; returns its `jti`.
fn verify_assertion(
    jwt: &str,
    cert: &CertificateDer<'static>,
    client_id: &str,
    audience: &str,
) -> Result<String, String> {
    let jwt = Jwt::read(jwt)?;
    let (header, claims, signature) = (&jwt.header, &jwt.claims, &jwt.signature);
    let thumbprint = B64URL.encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()));
    if header["x5t#S256"] != thumbprint.as_str() || header["typ"] != "JWT" {
        return Err("wrong x5t#S256".into());
    }
    let sha1 = B64URL.encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        cert.as_ref(),
    ));
    if header["x5t"] != sha1.as_str() {
        return Err("wrong x5t".into());
    }
    let jti = check_claims(claims, client_id, audience)?;
    let end_entity = webpki::EndEntityCert::try_from(cert).map_err(|e| e.to_string())?;
    let input = &jwt.signed;
    let verified = match header["alg"].as_str() {
        Some("RS256") => end_entity.verify_signature(
            webpki::ring::RSA_PKCS1_2048_8192_SHA256,
            input.as_bytes(),
            signature,
        ),
        Some("PS256") => end_entity.verify_signature(
            webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            input.as_bytes(),
            signature,
        ),
        Some("ES256") => end_entity.verify_signature(
            webpki::ring::ECDSA_P256_SHA256,
            input.as_bytes(),
            &fixed_to_der(signature),
        ),
        other => return Err(format!("alg {other:?}")),
    };
    verified.map_err(|e| format!("signature: {e}"))?;
    Ok(jti)
}

/// JOSE `r || s` back to the DER that webpki verifies.
fn fixed_to_der(sig: &[u8]) -> Vec<u8> {
    let int = |half: &[u8]| {
        let trimmed = &half[half.iter().take_while(|b| **b == 0).count()..];
        let mut out = vec![0x02];
        let pad = trimmed.first().is_some_and(|b| *b & 0x80 != 0);
        out.push((trimmed.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(trimmed);
        out
    };
    let (r, s) = sig.split_at(sig.len() / 2);
    let body = [int(r), int(s)].concat();
    let mut der = vec![0x30, body.len() as u8];
    der.extend(body);
    der
}
