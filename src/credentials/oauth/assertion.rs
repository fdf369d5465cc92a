//! RFC 7523 client assertions: for `private_key_jwt` a JWT signed with the connector's key,
//! carrying the certificate's thumbprints so that the authorization server can find the key;
//! for `client_secret_jwt` a JWT with an HMAC keyed by the client secret.
//!
//! Signing goes through the rustls crypto provider already compiled in (ring), and the HMACs
//! through ring itself, so no JWT crate is needed; ES256 wants the raw `r || s` form, not the
//! DER that the provider returns.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::sign::SigningKey;

use crate::config::{AssertionAlg, ClientIdentity};
use crate::secret::Secret;

/// How long an assertion is valid: short, as RFC 7523 3 advises; long enough for clock skew.
const LIFETIME_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("private_key cannot sign client assertions: {0}")]
    Key(String),
    #[error("signing the client assertion failed: {0}")]
    Sign(String),
}

pub struct AssertionSigner {
    key: Key,
    alg: AssertionAlg,
    /// The JOSE header, base64url-encoded once.
    header: String,
    random: SystemRandom,
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("alg", &self.alg.name())
            .finish_non_exhaustive()
    }
}

enum Key {
    Private(Arc<dyn SigningKey>),
    /// Keyed by the client secret; ring's key never prints it.
    Hmac(ring::hmac::Key),
}

impl AssertionSigner {
    /// For `client_secret_jwt`: `alg` is HS256, HS384 or HS512.
    pub fn hmac(secret: &Secret, alg: AssertionAlg) -> Result<Self, AssertionError> {
        let algorithm = match alg {
            AssertionAlg::HS256 => ring::hmac::HMAC_SHA256,
            AssertionAlg::HS384 => ring::hmac::HMAC_SHA384,
            AssertionAlg::HS512 => ring::hmac::HMAC_SHA512,
            other => {
                return Err(AssertionError::Key(format!(
                    "{} is not an HMAC",
                    other.name()
                )));
            }
        };
        let header = serde_json::json!({ "alg": alg.name(), "typ": "JWT" });
        Ok(Self {
            key: Key::Hmac(ring::hmac::Key::new(algorithm, secret.expose().as_bytes())),
            alg,
            header: B64URL.encode(header.to_string()),
            random: SystemRandom::new(),
        })
    }

    /// For `private_key_jwt`.
    pub fn new(identity: &ClientIdentity, alg: AssertionAlg) -> Result<Self, AssertionError> {
        let key = rustls::crypto::ring::sign::any_supported_type(&identity.key)
            .map_err(|e| AssertionError::Key(e.to_string()))?;
        if alg
            .scheme()
            .is_none_or(|scheme| key.choose_scheme(&[scheme]).is_none())
        {
            return Err(AssertionError::Key(format!(
                "{} does not fit this key",
                alg.name()
            )));
        }
        let mut header = serde_json::json!({ "alg": alg.name(), "typ": "JWT" });
        // Both thumbprints: Microsoft's identity platform documents x5t#S256 with PS256 and,
        // on older pages, x5t with RS256. Without a certificate (a JWT bearer grant's bare
        // key), none.
        if let Some(cert) = identity.cert_chain.first() {
            let sha256 = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
            let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
            header["x5t#S256"] = B64URL.encode(sha256.as_ref()).into();
            header["x5t"] = B64URL.encode(sha1.as_ref()).into();
        }
        Ok(Self {
            key: Key::Private(key),
            alg,
            header: B64URL.encode(header.to_string()),
            random: SystemRandom::new(),
        })
    }

    /// A fresh client assertion: `iss` = `sub` = client id, `aud` = token endpoint, unique
    /// `jti`.
    pub fn sign(&self, client_id: &str, audience: &str) -> Result<String, AssertionError> {
        self.sign_claims(client_id, client_id, audience, None)
    }

    /// A fresh assertion with these claims (and `scope` where given: the JWT bearer grant
    /// carries it for servers that read it there, as Google's do), a unique `jti`, 60 seconds
    /// of life.
    pub fn sign_claims(
        &self,
        issuer: &str,
        subject: &str,
        audience: &str,
        scope: Option<&str>,
    ) -> Result<String, AssertionError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut jti = [0u8; 16];
        self.random
            .fill(&mut jti)
            .map_err(|_| AssertionError::Sign("no randomness".into()))?;
        let mut claims = serde_json::json!({
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "jti": B64URL.encode(jti),
            "iat": now,
            "nbf": now,
            "exp": now + LIFETIME_SECS,
        });
        if let Some(scope) = scope {
            claims["scope"] = serde_json::Value::from(scope);
        }
        let signing_input = format!("{}.{}", self.header, B64URL.encode(claims.to_string()));
        let signature = match &self.key {
            Key::Hmac(key) => ring::hmac::sign(key, signing_input.as_bytes())
                .as_ref()
                .to_vec(),
            Key::Private(key) => {
                let signer = self
                    .alg
                    .scheme()
                    .and_then(|scheme| key.choose_scheme(&[scheme]))
                    .ok_or_else(|| AssertionError::Sign("scheme unavailable".into()))?;
                let signature = signer
                    .sign(signing_input.as_bytes())
                    .map_err(|e| AssertionError::Sign(e.to_string()))?;
                match self.alg {
                    AssertionAlg::ES256 => der_to_fixed(&signature, 32)
                        .ok_or_else(|| AssertionError::Sign("bad ECDSA signature".into()))?,
                    _ => signature,
                }
            }
        };
        Ok(format!("{signing_input}.{}", B64URL.encode(signature)))
    }
}

/// An ECDSA signature from DER `SEQUENCE { INTEGER r, INTEGER s }` to JOSE's fixed-width
/// `r || s` (RFC 7518 3.4).
fn der_to_fixed(der: &[u8], width: usize) -> Option<Vec<u8>> {
    let (tag, body, _) = der_item(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag_r, r, rest) = der_item(body)?;
    let (tag_s, s, _) = der_item(rest)?;
    if tag_r != 0x02 || tag_s != 0x02 {
        return None;
    }
    let mut out = vec![0u8; width * 2];
    for (half, int) in [r, s].into_iter().enumerate() {
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        if int.len() > width {
            return None;
        }
        let end = (half + 1) * width;
        out[end - int.len()..end].copy_from_slice(int);
    }
    Some(out)
}

/// One DER item with a short or one-byte long length: (tag, contents, rest).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = match len {
        0..=0x7f => (usize::from(len), rest),
        0x81 => {
            let (&len, rest) = rest.split_first()?;
            (usize::from(len), rest)
        }
        _ => return None,
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hmac_assertion_verifies_with_the_secret_and_carries_the_claims() {
        let secret = Secret::new("0123456789abcdef0123456789abcdef-and-some-more");
        for (alg, verify) in [
            (AssertionAlg::HS256, ring::hmac::HMAC_SHA256),
            (AssertionAlg::HS384, ring::hmac::HMAC_SHA384),
            (AssertionAlg::HS512, ring::hmac::HMAC_SHA512),
        ] {
            let signer = AssertionSigner::hmac(&secret, alg).unwrap();
            let jwt = signer
                .sign("flow-engine", "https://login.example.com/token")
                .unwrap();
            let parts: Vec<&str> = jwt.split('.').collect();
            assert_eq!(parts.len(), 3);
            let header: serde_json::Value =
                serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
            assert_eq!(
                header,
                serde_json::json!({ "alg": alg.name(), "typ": "JWT" })
            );
            let claims: serde_json::Value =
                serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
            assert_eq!(claims["iss"], "flow-engine");
            assert_eq!(claims["sub"], "flow-engine");
            assert_eq!(claims["aud"], "https://login.example.com/token");
            let key = ring::hmac::Key::new(verify, secret.expose().as_bytes());
            let signed = format!("{}.{}", parts[0], parts[1]);
            let tag = B64URL.decode(parts[2]).unwrap();
            ring::hmac::verify(&key, signed.as_bytes(), &tag).expect("the HMAC verifies");
            let wrong = ring::hmac::Key::new(verify, b"another secret of a sufficient length!!");
            assert!(ring::hmac::verify(&wrong, signed.as_bytes(), &tag).is_err());
            assert!(!format!("{signer:?}").contains("0123456789"));
        }
    }

    #[test]
    fn der_signature_becomes_fixed_width_r_and_s() {
        // r has a leading zero (high bit set), s is short and must be left-padded.
        let mut r = vec![0x00];
        r.extend([0x80; 32]);
        let s = [0x01, 0x02];
        let mut der = vec![0x30, (2 + r.len() + 2 + s.len()) as u8, 0x02, r.len() as u8];
        der.extend(&r);
        der.extend([0x02, s.len() as u8]);
        der.extend(s);
        let fixed = der_to_fixed(&der, 32).unwrap();
        assert_eq!(&fixed[..32], &[0x80; 32]);
        assert_eq!(&fixed[32..62], &[0u8; 30]);
        assert_eq!(&fixed[62..], &[0x01, 0x02]);
        assert!(der_to_fixed(&der[..10], 32).is_none());
    }
}
