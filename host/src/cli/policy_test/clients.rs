//! The synthetic clients connections come from: addresses in the given networks, the
//! same for every run under one seed.

use super::*;

/// Deterministic synthetic clients.
pub(super) struct Clients {
    pub(super) spec: ClientSpec,
    pub(super) count: usize,
    pub(super) seed: u64,
}

impl Clients {
    pub(super) fn new(options: &Options) -> Self {
        Clients {
            spec: options.clients.clone(),
            count: options.connections,
            seed: options.seed,
        }
    }

    /// The same clients every time they are asked for.
    pub(super) fn for_family(&self, v6: bool) -> Vec<SocketAddr> {
        let mut state = self.seed ^ 0x5eed;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            weir_sdk::hash::finalize(state)
        };
        (0..self.count)
            .map(|i| {
                let port = 1024 + (next() % 60_000) as u16;
                let ip = match &self.spec {
                    ClientSpec::Fixed(ips) => ips[i % ips.len()],
                    ClientSpec::Cidr(base, bits) => random_in(*base, *bits, next()),
                    ClientSpec::Random if v6 => {
                        random_in("fd00::".parse().expect("literal"), 64, next())
                    }
                    ClientSpec::Random => {
                        random_in(Ipv4Addr::new(198, 18, 0, 0).into(), 15, next())
                    }
                };
                SocketAddr::new(ip, port)
            })
            .collect()
    }
}

pub(super) fn random_in(base: IpAddr, bits: u8, r: u64) -> IpAddr {
    match base {
        IpAddr::V4(v4) => {
            let host_bits = 32 - u32::from(bits);
            let mask = if host_bits == 0 {
                0
            } else {
                u32::MAX >> (32 - host_bits)
            };
            IpAddr::V4(Ipv4Addr::from((u32::from(v4) & !mask) | (r as u32 & mask)))
        }
        IpAddr::V6(v6) => {
            let host_bits = 128 - u32::from(bits);
            let mask = if host_bits == 0 {
                0
            } else {
                u128::MAX >> (128 - host_bits)
            };
            let r = u128::from(r) | (u128::from(weir_sdk::hash::finalize(r)) << 64);
            IpAddr::V6(Ipv6Addr::from((u128::from(v6) & !mask) | (r & mask)))
        }
    }
}
