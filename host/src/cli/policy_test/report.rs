//! A port's runs as its report: where the connections (or requests) went, per scope.

use super::*;

impl Port {
    pub(super) fn report(&self, runs: &Runs) -> PortReport {
        PortReport {
            service: format!("{}/{}", self.key.namespace, self.key.name),
            port: self.key.port_name.clone(),
            protocol: self.key.protocol.as_str(),
            ip_family: self.key.family.as_str(),
            internal: self.scope_report(
                &self.eligibility.internal,
                &runs.internal,
                &runs.internal_latency,
                runs.internal_failures,
                runs.keys.as_deref(),
            ),
            external: runs.external.as_ref().map(|external| {
                self.scope_report(
                    &self.eligibility.external,
                    external,
                    &runs.external_latency,
                    runs.external_failures,
                    runs.keys.as_deref(),
                )
            }),
            policy_failure: self.failure.clone(),
        }
    }

    fn scope_report(
        &self,
        set: &EndpointSet,
        runs: &[Result<SocketAddr, HostDecision>],
        latency: &[u64],
        failures: u64,
        keys: Option<&[String]>,
    ) -> ScopeReport {
        let eligible = self.input.addresses(set);
        let mut counts: BTreeMap<String, usize> = eligible.iter().map(|e| (e.clone(), 0)).collect();
        let (mut rejected, mut dropped) = (0, 0);
        for run in runs {
            match run {
                Ok(address) => *counts.entry(address.to_string()).or_default() += 1,
                Err(HostDecision::Drop) => dropped += 1,
                Err(_) => rejected += 1,
            }
        }
        let forwarded = runs.len() - rejected - dropped;
        ScopeReport {
            action: crate::cli::explain::action(set),
            eligible,
            forwarded,
            rejected,
            dropped,
            endpoints: counts
                .into_iter()
                .map(|(endpoint, connections)| EndpointShare {
                    share: if forwarded == 0 {
                        0.0
                    } else {
                        round4(connections as f64 / forwarded as f64)
                    },
                    endpoint,
                    connections,
                })
                .collect(),
            latency_nanos: percentiles(latency),
            failures,
            header_values: keys.map(|keys| key_report(keys, runs)),
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn percentiles(samples: &[u64]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
    }
}
