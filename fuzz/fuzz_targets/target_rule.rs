//! Any bytes as a request target against a few resource domains: the rule must not panic, and
//! whatever it accepts must be https on the domain's own authority and pass the rule again
//! unchanged (the same invariants tests/target_properties.rs checks on generated targets).
#![no_main]

use connector_proxy::target::ResourceDomain;
use libfuzzer_sys::fuzz_target;

const DOMAINS: [(&str, &str); 3] = [
    ("https://api.example.com/v2", "api.example.com"),
    ("https://api.example.com", "api.example.com"),
    ("https://[::1]:8443/a/b", "[::1]:8443"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, target)) = data.split_first() else {
        return;
    };
    let (text, authority) = DOMAINS[usize::from(which) % DOMAINS.len()];
    let domain = ResourceDomain::parse(text).unwrap();
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    if let Ok(forwarded) = domain.resolve(&uri) {
        assert_eq!(forwarded.uri.scheme_str(), Some("https"));
        assert_eq!(forwarded.uri.authority().unwrap().as_str(), authority);
        let again = domain.resolve(&forwarded.uri).expect("forwarded URI passes again");
        assert_eq!(again.uri, forwarded.uri);
    }
});
