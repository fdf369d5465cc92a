//! Shared tokens sealed at rest: AES-256-GCM (ring) under `cluster.encryption_key`, a random
//! nonce for every write, and the entry's Redis key as associated data, so that an entry copied
//! under another key does not open. Reading Redis yields nothing usable without the key.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::config::EncryptionKey;
use crate::secret::Secret;

pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

/// What a shared entry holds, in the clear only inside a replica.
#[derive(Clone, PartialEq)]
pub struct Entry {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    /// The token's lifetime as the proxy counts it (`expires_in` less a second), in ms.
    pub lifetime_ms: u64,
    /// When it lapses, wall clock, ms since the Unix epoch: the same instant on every replica.
    pub expires_at_ms: u64,
    /// The replica that fetched it, for operators.
    pub fetched_by: String,
}

/// The entry as it is sealed.
#[derive(Serialize, Deserialize)]
struct Wire {
    access_token: String,
    refresh_token: Option<String>,
    lifetime_ms: u64,
    expires_at_ms: u64,
    fetched_by: String,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("fetched_by", &self.fetched_by)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the entry does not open under this encryption_key (another key, or tampered with)")]
    Sealed,
    #[error("the entry opened but is not a token entry")]
    Malformed,
}

impl Sealer {
    pub fn new(key: &EncryptionKey) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, &key.0).expect("a 32-byte key for AES-256-GCM");
        Self {
            key: LessSafeKey::new(key),
            random: SystemRandom::new(),
        }
    }

    /// `nonce || ciphertext || tag`, bound to `name`.
    pub fn seal(&self, name: &str, entry: &Entry) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system random source works");
        let wire = Wire {
            access_token: entry.access_token.expose().to_owned(),
            refresh_token: entry.refresh_token.as_ref().map(|t| t.expose().to_owned()),
            lifetime_ms: entry.lifetime_ms,
            expires_at_ms: entry.expires_at_ms,
            fetched_by: entry.fetched_by.clone(),
        };
        let mut sealed = serde_json::to_vec(&wire).expect("an entry serialises");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .expect("sealing a small entry cannot fail");
        let mut out = nonce.to_vec();
        out.append(&mut sealed);
        out
    }

    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Entry, OpenError> {
        if sealed.len() < NONCE_LEN {
            return Err(OpenError::Sealed);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Sealed)?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| OpenError::Sealed)?;
        let wire: Wire = serde_json::from_slice(plain).map_err(|_| OpenError::Malformed)?;
        Ok(Entry {
            access_token: Secret::new(wire.access_token),
            refresh_token: wire.refresh_token.map(Secret::new),
            lifetime_ms: wire.lifetime_ms,
            expires_at_ms: wire.expires_at_ms,
            fetched_by: wire.fetched_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            access_token: Secret::new("at-5ecret"),
            refresh_token: Some(Secret::new("rt-5ecret")),
            lifetime_ms: 3_599_000,
            expires_at_ms: 1_800_000_000_000,
            fetched_by: "replica-a".into(),
        }
    }

    #[test]
    fn an_entry_opens_under_its_key_and_name_only_and_shows_no_token() {
        let sealer = Sealer::new(&EncryptionKey([7; 32]));
        let sealed = sealer.seal("cp:token:abc", &entry());
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("5ecret"), "{text}");
        assert_eq!(sealer.open("cp:token:abc", &sealed).unwrap(), entry());
        // Another name (an entry copied under another key) or another key does not open.
        assert!(sealer.open("cp:token:other", &sealed).is_err());
        let other = Sealer::new(&EncryptionKey([8; 32]));
        assert!(other.open("cp:token:abc", &sealed).is_err());
        // A fresh nonce every time.
        assert_ne!(sealed, sealer.seal("cp:token:abc", &entry()));
        assert!(!format!("{:?}", entry()).contains("5ecret"));
    }
}
