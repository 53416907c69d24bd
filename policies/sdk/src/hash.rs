//! A stable 64-bit hash for consistent hashing: the same on every node, every run and
//! every weir version, so every node sends a client to the same endpoint. (std's hashers
//! promise none of that.) FNV-1a over the bytes, then murmur3's finaliser for avalanche.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::types::Connection;

/// What of a connection consistent hashing keys on: `"ip"` (every connection of a client
/// together) or `"ip-port"` (each connection on its own). A setting of the hashing policies.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKey {
    #[default]
    Ip,
    IpPort,
}

impl ClientKey {
    /// The connection's hash under this key.
    pub fn of(self, connection: &Connection) -> u64 {
        match self {
            ClientKey::Ip => ip(connection.client.ip()),
            ClientKey::IpPort => socket(connection.client),
        }
    }
}

pub fn bytes(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    finalize(h)
}

/// murmur3's fmix64.
pub fn finalize(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

pub fn ip(address: IpAddr) -> u64 {
    match address {
        IpAddr::V4(v4) => bytes(&v4.octets()),
        IpAddr::V6(v6) => bytes(&v6.octets()),
    }
}

pub fn socket(address: SocketAddr) -> u64 {
    finalize(ip(address.ip()) ^ u64::from(address.port()).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The hash of an endpoint's `ip:port` text with a salt (Maglev's offset/skip, ring
/// points): the text is what every node agrees on, unlike endpoint ids.
pub fn endpoint(address: SocketAddr, salt: u64) -> u64 {
    salted(endpoint_base(address), salt)
}

/// The unsalted part of [`endpoint`], to compute once per endpoint when many salts follow.
pub fn endpoint_base(address: SocketAddr) -> u64 {
    bytes(address.to_string().as_bytes())
}

/// [`endpoint`] from its [`endpoint_base`].
pub fn salted(base: u64, salt: u64) -> u64 {
    finalize(base ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXED: [u64; 4] = [
        0xefd01f60ba992926,
        0xee7ea9e30c6891af,
        0x129c81c9b50e78b4,
        0x4550875022d17e4e,
    ];

    #[test]
    fn values_are_fixed_forever() {
        // Changing these moves every consistently-hashed client on every node: never do it
        // silently. (Values computed once from the functions above.)
        assert_eq!(bytes(b""), FIXED[0]);
        assert_eq!(bytes(b"198.18.0.1:8080"), FIXED[1]);
        assert_eq!(ip("198.18.0.1".parse().unwrap()), FIXED[2]);
        assert_eq!(endpoint("198.18.0.1:8080".parse().unwrap(), 1), FIXED[3]);
    }

    #[test]
    fn low_bits_are_spread() {
        let mut buckets = [0u32; 16];
        for i in 0..16_000u32 {
            buckets[(ip(IpAddr::from(i.to_be_bytes())) % 16) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (800..1200).contains(&b)),
            "{buckets:?}"
        );
    }
}
