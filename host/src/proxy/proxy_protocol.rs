//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a proxy puts before a
//! connection's bytes to say who the client was. weir writes it towards endpoints of
//! Services annotated `weir.dev/proxy-protocol`, and reads it from a load balancer in
//! front on Services that say theirs sends it. The reader is strict and bounded: it
//! reads exactly the header, never past it, and refuses what does not parse.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Which version of the header to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The annotation's value: `v1` or `v2`.
    pub fn parse(text: &str) -> Option<Version> {
        match text.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Some(Version::V1),
            "v2" | "2" => Some(Version::V2),
            _ => None,
        }
    }
}

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included.
const V1_MAX: usize = 107;
/// The most address and TLV bytes accepted after a v2 header's first 16.
const V2_MAX_BODY: usize = 4096;
/// How long a client may take to send its header.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the connection is a stream (TCP) or datagrams (UDP): v2 says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}

/// The header for a connection from `client` to `destination`. Mixed families (an IPv4
/// client reaching an IPv6 address) are written with both mapped to IPv6.
pub fn encode(
    version: Version,
    transport: Transport,
    client: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    let (client, destination) = same_family(client, destination);
    match version {
        Version::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                destination.ip(),
                client.port(),
                destination.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut header = SIGNATURE.to_vec();
            header.push(0x21); // version 2, PROXY
            let transport = match transport {
                Transport::Stream => 0x1,
                Transport::Datagram => 0x2,
            };
            match (client.ip(), destination.ip()) {
                (IpAddr::V4(source), IpAddr::V4(target)) => {
                    header.push(0x10 | transport);
                    header.extend_from_slice(&12u16.to_be_bytes());
                    header.extend_from_slice(&source.octets());
                    header.extend_from_slice(&target.octets());
                }
                (source, target) => {
                    header.push(0x20 | transport);
                    header.extend_from_slice(&36u16.to_be_bytes());
                    header.extend_from_slice(&v6(source).octets());
                    header.extend_from_slice(&v6(target).octets());
                }
            }
            header.extend_from_slice(&client.port().to_be_bytes());
            header.extend_from_slice(&destination.port().to_be_bytes());
            header
        }
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn same_family(client: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    if client.is_ipv4() == destination.is_ipv4() {
        (client, destination)
    } else {
        (
            SocketAddr::new(IpAddr::V6(v6(client.ip())), client.port()),
            SocketAddr::new(IpAddr::V6(v6(destination.ip())), destination.port()),
        )
    }
}

/// What a header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The client and the address it connected to.
    Proxied {
        client: SocketAddr,
        destination: SocketAddr,
    },
    /// `UNKNOWN` (v1) or `LOCAL` (v2): the load balancer's own connection (a health
    /// check); the peer's address stands.
    Local,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("no PROXY protocol header (the connection began with other bytes)")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("the connection closed before its PROXY protocol header ended")]
    Truncated,
    #[error("no PROXY protocol header within {0:?}")]
    TimedOut(Duration),
}

/// Reads one header (v1 or v2) from the start of `stream`, reading no byte past it.
pub async fn read<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Header, HeaderError> {
    tokio::time::timeout(READ_TIMEOUT, read_header(stream))
        .await
        .map_err(|_| HeaderError::TimedOut(READ_TIMEOUT))?
}

async fn read_header<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Header, HeaderError> {
    let mut start = [0u8; 16];
    // Both versions' shortest headers are at least 16 bytes long ("PROXY UNKNOWN\r\n"
    // is 15: read it one byte at a time once "PROXY " is seen).
    read_exact(stream, &mut start[..6]).await?;
    if &start[..6] == b"PROXY " {
        let mut line = start[..6].to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(HeaderError::Malformed("a v1 header longer than 107 bytes"));
            }
            let mut byte = [0u8; 1];
            read_exact(stream, &mut byte).await?;
            line.push(byte[0]);
        }
        return parse_v1(&line);
    }
    if start[..6] != SIGNATURE[..6] {
        return Err(HeaderError::Missing);
    }
    read_exact(stream, &mut start[6..]).await?;
    if start[..12] != SIGNATURE {
        return Err(HeaderError::Missing);
    }
    let length = usize::from(u16::from_be_bytes([start[14], start[15]]));
    if length > V2_MAX_BODY {
        return Err(HeaderError::Malformed("a v2 header longer than 4 KiB"));
    }
    let mut body = vec![0u8; length];
    read_exact(stream, &mut body).await?;
    parse_v2(start[12], start[13], &body)
}

async fn read_exact<R: AsyncRead + Unpin>(
    stream: &mut R,
    buffer: &mut [u8],
) -> Result<(), HeaderError> {
    stream.read_exact(buffer).await.map(|_| ()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HeaderError::Truncated
        } else {
            HeaderError::Malformed("the connection failed while its header was read")
        }
    })
}

/// A whole v1 line, `\r\n` included.
pub fn parse_v1(line: &[u8]) -> Result<Header, HeaderError> {
    let text = std::str::from_utf8(line)
        .ok()
        .and_then(|t| t.strip_suffix("\r\n"))
        .ok_or(HeaderError::Malformed(
            "a v1 header that is not one text line",
        ))?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Header::Local),
        [
            "PROXY",
            family @ ("TCP4" | "TCP6"),
            source,
            target,
            source_port,
            target_port,
        ] => {
            let ip = |text: &str| -> Result<IpAddr, HeaderError> {
                let ip: IpAddr = text
                    .parse()
                    .map_err(|_| HeaderError::Malformed("a v1 address that does not parse"))?;
                if ip.is_ipv4() != (*family == "TCP4") {
                    return Err(HeaderError::Malformed("a v1 address of the other family"));
                }
                Ok(ip)
            };
            let port = |text: &str| -> Result<u16, HeaderError> {
                // Decimal, no sign, no leading zeros (as the specification writes them).
                if text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
                    return Err(HeaderError::Malformed("a v1 port that does not parse"));
                }
                text.parse()
                    .map_err(|_| HeaderError::Malformed("a v1 port that does not parse"))
            };
            Ok(Header::Proxied {
                client: SocketAddr::new(ip(source)?, port(source_port)?),
                destination: SocketAddr::new(ip(target)?, port(target_port)?),
            })
        }
        _ => Err(HeaderError::Malformed(
            "a v1 header that is not `PROXY TCP4|TCP6|UNKNOWN ...`",
        )),
    }
}

/// A v2 header's version and command byte, family and transport byte, and body.
pub fn parse_v2(command: u8, family: u8, body: &[u8]) -> Result<Header, HeaderError> {
    if command >> 4 != 2 {
        return Err(HeaderError::Malformed("a v2 header whose version is not 2"));
    }
    match command & 0x0f {
        0x0 => return Ok(Header::Local),
        0x1 => {}
        _ => {
            return Err(HeaderError::Malformed(
                "a v2 command that is not LOCAL or PROXY",
            ));
        }
    }
    let at = |from: usize, to: usize| {
        body.get(from..to).ok_or(HeaderError::Malformed(
            "a v2 header too short for its addresses",
        ))
    };
    let port = |bytes: &[u8]| u16::from_be_bytes([bytes[0], bytes[1]]);
    match family >> 4 {
        0x1 => {
            let source: [u8; 4] = at(0, 4)?.try_into().expect("4 bytes");
            let target: [u8; 4] = at(4, 8)?.try_into().expect("4 bytes");
            Ok(Header::Proxied {
                client: SocketAddr::new(IpAddr::from(source), port(at(8, 10)?)),
                destination: SocketAddr::new(IpAddr::from(target), port(at(10, 12)?)),
            })
        }
        0x2 => {
            let source: [u8; 16] = at(0, 16)?.try_into().expect("16 bytes");
            let target: [u8; 16] = at(16, 32)?.try_into().expect("16 bytes");
            Ok(Header::Proxied {
                client: SocketAddr::new(IpAddr::from(source), port(at(32, 34)?)),
                destination: SocketAddr::new(IpAddr::from(target), port(at(34, 36)?)),
            })
        }
        // AF_UNSPEC with PROXY: the receiver must ignore the addresses.
        0x0 => Ok(Header::Local),
        _ => Err(HeaderError::Malformed(
            "a v2 address family weir does not take (UNIX)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_bytes(bytes: &[u8]) -> (Result<Header, HeaderError>, Vec<u8>) {
        let mut reader = bytes;
        let header = read(&mut reader).await;
        (header, reader.to_vec())
    }

    #[tokio::test]
    async fn both_versions_round_trip_and_nothing_past_the_header_is_read() {
        let cases = [
            ("198.18.0.7:51000", "198.18.0.20:443"),
            ("[2001:db8::7]:51000", "[2001:db8::20]:443"),
        ];
        for (client, destination) in cases {
            let (client, destination): (SocketAddr, SocketAddr) =
                (client.parse().unwrap(), destination.parse().unwrap());
            for version in [Version::V1, Version::V2] {
                let mut bytes = encode(version, Transport::Stream, client, destination);
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
                let (header, rest) = read_bytes(&bytes).await;
                assert_eq!(
                    header,
                    Ok(Header::Proxied {
                        client,
                        destination
                    }),
                    "{version:?}"
                );
                assert_eq!(rest, b"GET / HTTP/1.1\r\n", "{version:?}");
            }
        }
    }

    #[tokio::test]
    async fn the_specifications_examples_parse() {
        let (header, _) = read_bytes(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n").await;
        assert_eq!(
            header,
            Ok(Header::Proxied {
                client: "192.0.2.1:56324".parse().unwrap(),
                destination: "198.51.100.1:443".parse().unwrap(),
            })
        );
        assert_eq!(read_bytes(b"PROXY UNKNOWN\r\n").await.0, Ok(Header::Local));
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(read_bytes(&local).await.0, Ok(Header::Local));
    }

    #[tokio::test]
    async fn bad_headers_are_refused_with_a_reason() {
        assert_eq!(
            read_bytes(b"GET / HTTP/1.1\r\n").await.0,
            Err(HeaderError::Missing)
        );
        assert_eq!(
            read_bytes(b"PROXY TCP4 1.2.3.4").await.0,
            Err(HeaderError::Truncated)
        );
        assert!(matches!(
            read_bytes(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n")
                .await
                .0,
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            read_bytes(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 80\r\n").await.0,
            Err(HeaderError::Malformed(_))
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read_bytes(long.as_bytes()).await.0,
            Err(HeaderError::Malformed(_))
        ));
        let mut huge = SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            read_bytes(&huge).await.0,
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let header = encode(
            Version::V1,
            Transport::Stream,
            "198.18.0.7:1".parse().unwrap(),
            "[2001:db8::1]:80".parse().unwrap(),
        );
        assert_eq!(
            String::from_utf8(header).unwrap(),
            "PROXY TCP6 ::ffff:198.18.0.7 2001:db8::1 1 80\r\n"
        );
    }
}
