//! Addresses and address ranges, read one way everywhere: weir.toml, Kubernetes objects
//! and the data plane's source-range checks.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;

/// An address range, `198.18.0.0/15`, or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The range of exactly one address.
    pub fn host(address: IpAddr) -> Self {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        Cidr { address, prefix }
    }

    /// `address/prefix`, or a bare address (a host range). The address is read as
    /// Kubernetes reads it ([`parse_ip_sloppy`]); `None` for anything else, or a prefix
    /// longer than the family's.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (parse_ip_sloppy(a)?, Some(p.parse::<u8>().ok()?)),
            None => (parse_ip_sloppy(text)?, None),
        };
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { address, prefix })
    }

    /// As [`Cidr::parse`], but a prefix is required (Kubernetes' `ParseCIDRSloppy`, for
    /// `loadBalancerSourceRanges` and `podCIDRs`).
    pub fn parse_range(text: &str) -> Option<Cidr> {
        text.contains('/').then(|| Cidr::parse(text)).flatten()
    }

    /// Whether `ip` is in the range (families must match).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix.min(32)))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix.min(128)))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Cidr::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid address range `{text}`: write an address with an optional prefix length, e.g. \"127.0.0.0/8\" or \"fd00::/64\""
            ))
        })
    }
}

/// Go's `netutils.ParseIPSloppy(...)` followed by `String()`: IPv4 octets may carry
/// leading zeros (read as decimal), and IPv4-mapped IPv6 addresses are IPv4.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    let ip = match text.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            let parts: Vec<&str> = text.split('.').collect();
            if parts.len() != 4 {
                return None;
            }
            let mut octets = [0u8; 4];
            for (octet, part) in octets.iter_mut().zip(&parts) {
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // Any number of leading zeros, value at most 255, as Go's parser reads it.
                let digits = part.trim_start_matches('0');
                if digits.len() > 3 {
                    return None;
                }
                *octet = if digits.is_empty() {
                    0
                } else {
                    digits.parse().ok()?
                };
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
    };
    Some(canonical(ip))
}

/// IPv4-mapped IPv6 addresses as IPv4, so ranges and hashing see one form.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_hosts() {
        let cidr = Cidr::parse("198.18.0.0/15").unwrap();
        assert!(cidr.contains("198.19.255.1".parse().unwrap()));
        assert!(!cidr.contains("198.20.0.1".parse().unwrap()));
        assert!(
            !cidr.contains("fd00::1".parse().unwrap()),
            "families must match"
        );
        assert_eq!(
            Cidr::parse("127.0.0.1"),
            Some(Cidr::host("127.0.0.1".parse().unwrap()))
        );
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("fd00::/129").is_none());
        assert_eq!(Cidr::parse("fd00::/64").unwrap().to_string(), "fd00::/64");
        assert_eq!(
            Cidr::parse("198.018.0.0/16").unwrap().to_string(),
            "198.18.0.0/16",
            "addresses read as Kubernetes reads them"
        );
        assert!(
            Cidr::parse_range("198.18.0.5").is_none(),
            "a range needs a prefix"
        );
        assert!(Cidr::parse("/8").is_none() && Cidr::parse("").is_none());
    }

    #[test]
    fn sloppy_addresses_as_go_reads_them() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(parse_ip_sloppy("198.018.000.005"), ip("198.18.0.5"));
        assert_eq!(parse_ip_sloppy("::ffff:198.18.0.5"), ip("198.18.0.5"));
        assert_eq!(parse_ip_sloppy("2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(parse_ip_sloppy("0000198.18.0.5"), ip("198.18.0.5"));
        assert_eq!(parse_ip_sloppy("198.18.0.256"), None);
        assert_eq!(parse_ip_sloppy("198.18.0"), None);
        assert_eq!(parse_ip_sloppy("web"), None);
    }
}
