//! A stable 64-bit hash for consistent hashing: the same on every node, every run and
//! every weir version, so every node sends a client to the same endpoint. (std's hashers
//! promise none of that.) FNV-1a over the bytes, then murmur3's finaliser for avalanche.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::request::Request;
use crate::types::Connection;

/// What consistent hashing keys on, as the hashing policies' `hash` setting says: `"ip"`
/// (every connection of a client together), `"ip-port"` (each connection on its own), or
/// `"header"` (on HTTP ports, each distinct value of the request header named by the
/// `header` setting together; see [`Key`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKey {
    #[default]
    Ip,
    IpPort,
    Header,
}

impl ClientKey {
    /// The connection's hash under this key (`Header`: the client's IP, as for a request
    /// without the header).
    pub fn of(self, connection: &Connection) -> u64 {
        match self {
            ClientKey::Ip | ClientKey::Header => ip(connection.client.ip()),
            ClientKey::IpPort => socket(connection.client),
        }
    }
}

/// What a hashing policy keys on, from its `hash` and `header` settings together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Client(ClientKey),
    /// A request header's value (its name in lowercase). A request without the header,
    /// and a connection on a port that is not HTTP, hash the client's IP instead.
    Header(String),
}

impl Default for Key {
    fn default() -> Self {
        Key::Client(ClientKey::Ip)
    }
}

impl Key {
    /// The key the settings `hash` and `header` describe, or what is wrong with them.
    pub fn new(hash: ClientKey, header: Option<&str>) -> Result<Key, String> {
        match (hash, header) {
            (ClientKey::Header, None) => Err(
                "`\"hash\": \"header\"` needs `\"header\"`: the name of the request header to hash"
                    .into(),
            ),
            (ClientKey::Header, Some(name)) if !is_header_name(name) => Err(format!(
                "`\"header\"`: {name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"
            )),
            (ClientKey::Header, Some(name)) => Ok(Key::Header(name.to_ascii_lowercase())),
            (key, None) => Ok(Key::Client(key)),
            (_, Some(_)) => Err("`\"header\"` is used only with `\"hash\": \"header\"`".into()),
        }
    }

    /// The key a Service's settings describe; when they are wrong, a warning naming the
    /// Service, and `last_good` (else the client's IP) meanwhile.
    pub fn for_service(
        hash: ClientKey,
        header: Option<&str>,
        service: &crate::Service,
        last_good: Option<&Key>,
    ) -> Key {
        Key::new(hash, header).unwrap_or_else(|error| {
            crate::log(
                crate::LogLevel::Warn,
                &format!(
                    "weir.dev/policy-config of {}: {error}; keeping the previous hash key",
                    service.display_name()
                ),
            );
            last_good.cloned().unwrap_or_default()
        })
    }

    /// A connection's hash (on ports that are not HTTP).
    pub fn of(&self, connection: &Connection) -> u64 {
        match self {
            Key::Client(key) => key.of(connection),
            Key::Header(_) => ip(connection.client.ip()),
        }
    }

    /// A request's hash: its header's value for a `Header` key (the client's IP when the
    /// request does not have it), the client otherwise.
    pub fn of_request(&self, connection: &Connection, request: &dyn Request) -> u64 {
        match self {
            Key::Header(name) => match request.header(name) {
                Some(value) => bytes(&value),
                None => ip(connection.client.ip()),
            },
            Key::Client(key) => key.of(connection),
        }
    }
}

/// RFC 9110's token: what a header name may be.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
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
    fn a_header_key_needs_a_valid_name_and_nothing_else_takes_one() {
        assert_eq!(
            Key::new(ClientKey::Header, Some("X-User")),
            Ok(Key::Header("x-user".into()))
        );
        assert!(
            Key::new(ClientKey::Header, None)
                .unwrap_err()
                .contains("needs")
        );
        assert!(Key::new(ClientKey::Header, Some("x user")).is_err());
        assert!(Key::new(ClientKey::Ip, Some("x-user")).is_err());
        assert_eq!(
            Key::new(ClientKey::IpPort, None),
            Ok(Key::Client(ClientKey::IpPort))
        );
    }

    #[test]
    fn requests_hash_their_header_or_else_their_client() {
        use crate::request::RequestParts;
        use crate::types::Scope;
        let connection = |client: &str| Connection {
            client: client.parse().unwrap(),
            destination: "198.18.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let key = Key::new(ClientKey::Header, Some("x-user")).unwrap();
        let alice = RequestParts::get("/").with_header("X-User", "alice");
        // The same value from two clients: the same hash.
        assert_eq!(
            key.of_request(&connection("198.18.0.7:1000"), &alice),
            key.of_request(&connection("198.18.0.8:2000"), &alice)
        );
        assert_eq!(
            key.of_request(&connection("198.18.0.7:1000"), &alice),
            bytes(b"alice")
        );
        // Without it: the client's IP, as before.
        let plain = RequestParts::get("/");
        assert_eq!(
            key.of_request(&connection("198.18.0.7:1000"), &plain),
            ip("198.18.0.7".parse().unwrap())
        );
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
