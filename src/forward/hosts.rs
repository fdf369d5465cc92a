//! The pools' map from a target authority to what they keep for it.
//!
//! `Authority`'s own `Hash` feeds the hasher one lowercased byte at a time: with std's SipHash a
//! lookup took about 900 instructions, and a request looks up its authority in both pools
//! (BENCHMARKS finding 35). Here the key is the authority's text lowercased, which is how
//! `Authority`'s `Eq` compares (ASCII case ignored), hashed in one write. Authorities come from
//! the configuration and are nearly always lowercase already, so a lookup copies nothing.
//!
//! The hasher is FNV, not SipHash: the authorities are the resource domains' own
//! (`ResourceDomain::resolve` puts the domain's authority in every target) or those of the
//! configured token and validation URLs, so no caller can choose keys that collide, which is
//! what SipHash's keyed hashing is for (finding 57).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use fnv::FnvHashMap;
use http::uri::Authority;

pub struct Hosts<T> {
    map: Mutex<FnvHashMap<Box<str>, Arc<T>>>,
}

impl<T> Default for Hosts<T> {
    fn default() -> Self {
        Self {
            map: Mutex::default(),
        }
    }
}

impl<T> Hosts<T> {
    /// What is kept for `authority`, made by `make` (under the map's lock) the first time.
    pub fn get_or_insert_with(&self, authority: &Authority, make: impl FnOnce() -> T) -> Arc<T> {
        let key = key(authority);
        let mut map = self.map.lock().expect("hosts lock");
        if let Some(kept) = map.get(&*key) {
            return kept.clone();
        }
        let kept = Arc::new(make());
        map.insert(key.into(), kept.clone());
        kept
    }
}

fn key(authority: &Authority) -> Cow<'_, str> {
    let text = authority.as_str();
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(text.to_ascii_lowercase())
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_that_differ_in_case_only_share_an_entry_and_others_do_not() {
        let hosts = Hosts::default();
        let made =
            |text: &'static str| hosts.get_or_insert_with(&Authority::from_static(text), || text);
        let first = made("crm.example.com:8443");
        assert!(Arc::ptr_eq(&first, &made("CRM.Example.com:8443")));
        assert!(Arc::ptr_eq(&first, &made("crm.example.com:8443")));
        assert_eq!(*first, "crm.example.com:8443");
        for other in [
            "crm.example.com",
            "crm.example.com:443",
            "crm.example.co:8443",
        ] {
            assert!(!Arc::ptr_eq(&first, &made(other)), "{other}");
        }
    }
}
