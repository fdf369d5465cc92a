//! Which resolved addresses the proxy may connect to.
//!
//! Checked on every address the connector is about to dial, after pins and DNS, so a DNS answer
//! that changes between a check and the connect cannot slip past it.
//!
//! Internal means: in the IANA IPv4 or IPv6 special-purpose address registry (loopback,
//! private, shared, link-local, documentation, benchmarking, reserved, ...), or multicast. An
//! IPv6 address that carries an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64 and 6to4) is
//! judged as the IPv4 address it reaches.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// `upstream.allow_networks`: special-use ranges an operator has opened on purpose.
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// An address is allowed when it is public, or when `allow_networks` holds it as written or
    /// the IPv4 address it carries.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let reached = carried_ipv4(ip).map_or(ip, IpAddr::V4);
        !is_internal(reached)
            || self
                .allow
                .iter()
                .any(|net| net.contains(&reached) || net.contains(&ip))
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(segments: [u16; 8], len: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), len)
}

/// The IANA IPv4 special-purpose address registry, every entry (those marked globally
/// reachable too: no public API lives in an anycast relay or an AS112 sink), plus multicast.
const INTERNAL_V4: &[Ipv4Net] = &[
    v4(0, 0, 0, 0, 8),       // "this network", the unspecified address
    v4(10, 0, 0, 0, 8),      // private
    v4(100, 64, 0, 0, 10),   // shared address space (RFC 6598), some cloud metadata
    v4(127, 0, 0, 0, 8),     // loopback
    v4(169, 254, 0, 0, 16),  // link-local, cloud metadata
    v4(172, 16, 0, 0, 12),   // private
    v4(192, 0, 0, 0, 24),    // IETF protocol assignments
    v4(192, 0, 2, 0, 24),    // documentation (TEST-NET-1)
    v4(192, 31, 196, 0, 24), // AS112-v4
    v4(192, 52, 193, 0, 24), // AMT
    v4(192, 88, 99, 0, 24),  // deprecated 6to4 relay anycast
    v4(192, 168, 0, 0, 16),  // private
    v4(192, 175, 48, 0, 24), // AS112 direct delegation
    v4(198, 18, 0, 0, 15),   // benchmarking
    v4(198, 51, 100, 0, 24), // documentation (TEST-NET-2)
    v4(203, 0, 113, 0, 24),  // documentation (TEST-NET-3)
    v4(224, 0, 0, 0, 4),     // multicast
    v4(240, 0, 0, 0, 4),     // reserved, and the limited broadcast address
];

/// The IANA IPv6 special-purpose address registry, every entry whose addresses do not carry an
/// IPv4 address judged on its own, plus multicast and the deprecated site-local range.
const INTERNAL_V6: &[Ipv6Net] = &[
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128),             // unspecified
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128),             // loopback
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),          // discard-only
    v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64),          // dummy prefix
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),         // IETF protocol assignments, Teredo included
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),     // documentation
    v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0], 48), // AS112 direct delegation
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),         // documentation
    v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16),         // segment routing SIDs
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),          // unique local
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),         // link-local
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),         // deprecated site-local
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),          // multicast
];

/// The IPv4 address an IPv6 address carries: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
/// `::a.b.c.d` (not `::` and `::1`, which are addresses of their own), NAT64 `64:ff9b::/96`
/// and the local-use `64:ff9b:1::/48` (in its /96 layout, the last 32 bits), and 6to4
/// `2002:AABB:CCDD::/48`.
fn carried_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let from = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match s {
        [0, 0, 0, 0, 0, 0xffff, h, l] => Some(from(h, l)),
        [0, 0, 0, 0, 0, 0, h, l] if !(h == 0 && l <= 1) => Some(from(h, l)),
        [0x64, 0xff9b, 0, 0, 0, 0, h, l] => Some(from(h, l)),
        [0x64, 0xff9b, 1, _, _, _, h, l] => Some(from(h, l)),
        [0x2002, h, l, ..] => Some(from(h, l)),
        _ => None,
    }
}

fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => INTERNAL_V4.iter().any(|net| net.contains(&ip)),
        IpAddr::V6(ip) => INTERNAL_V6.iter().any(|net| net.contains(&ip)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(ip: &str) -> bool {
        !AddressPolicy::default().allows(ip.parse().unwrap())
    }

    #[test]
    fn internal_ranges_are_denied_by_default() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "100.100.100.200",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::7f00:1",
            "::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "64:ff9b:1:2:3:4:7f00:1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.2.1",
            "203.0.113.5",
            "100.64.0.1",
            "2001:db8::1",
            "2001::1",
            "100::1",
            "fec0::1",
        ] {
            assert!(denied(ip), "{ip} should be denied");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "172.32.0.1",
            "198.20.0.1",
            "::808:808",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:4860::8888",
        ] {
            assert!(!denied(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn allow_networks_opens_exactly_its_range() {
        let policy = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(policy.allows("127.0.0.1".parse().unwrap()));
        assert!(policy.allows("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!policy.allows("10.0.0.1".parse().unwrap()));
        assert!(!policy.allows("::1".parse().unwrap()));
        assert!(policy.allows("2002:7f00:1::".parse().unwrap()));
        let v6 = AddressPolicy::new(vec!["fd00::/8".parse().unwrap()]);
        assert!(v6.allows("fd00::7".parse().unwrap()));
        assert!(!v6.allows("fe80::1".parse().unwrap()));
    }
}
