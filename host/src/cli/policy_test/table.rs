//! The report as a table for people.

use super::*;

/// The report for people.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {} ({}, contract {}) on node {}, {} {} per port and scope",
        report.policy,
        report.module,
        report.contract,
        report.node,
        report.connections,
        if report.requests {
            "requests"
        } else {
            "connections"
        }
    );
    for port in &report.services {
        let name = if port.port.is_empty() {
            port.service.clone()
        } else {
            format!("{}:{}", port.service, port.port)
        };
        let _ = writeln!(out, "\n{name} {} {}", port.protocol, port.ip_family);
        if let Some(failure) = &port.policy_failure {
            let _ = writeln!(out, "  policy failed: {failure}");
        }
        let scopes = [
            ("internal", Some(&port.internal)),
            ("external", port.external.as_ref()),
        ];
        for (scope, report) in scopes {
            let Some(r) = report else { continue };
            let _ = writeln!(
                out,
                "  {scope}: {} ({} eligible), {} forwarded, {} rejected, {} dropped, select p50 {:.1} µs p99 {:.1} µs",
                r.action,
                r.eligible.len(),
                r.forwarded,
                r.rejected,
                r.dropped,
                r.latency_nanos.p50 as f64 / 1000.0,
                r.latency_nanos.p99 as f64 / 1000.0,
            );
            if r.failures > 0 {
                let _ = writeln!(
                    out,
                    "    {} policy calls failed here: these answers are the failure mode's, not the policy's",
                    r.failures
                );
            }
            if let Some(keys) = &r.header_values {
                let _ = writeln!(
                    out,
                    "    header values: {} of {} distinct went to one endpoint every time",
                    keys.on_one_endpoint, keys.distinct
                );
            }
            for e in &r.endpoints {
                let _ = writeln!(
                    out,
                    "    {:<28} {:>7} {:>6.1}%",
                    e.endpoint,
                    e.connections,
                    e.share * 100.0
                );
            }
        }
    }
    for step in &report.steps {
        let _ = writeln!(
            out,
            "\nstep {}: {}: {} of {} clients moved",
            step.step, step.change, step.moved, step.clients
        );
        for p in step.ports.iter().filter(|p| p.moved > 0) {
            let _ = writeln!(
                out,
                "  {}:{} {}: {} of {}",
                p.service, p.port, p.scope, p.moved, p.clients
            );
        }
    }
    let failures: Vec<String> = report
        .failures
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if failures.is_empty() {
        let _ = writeln!(out, "\nok: no traps, timeouts or invalid answers");
    } else {
        let _ = writeln!(out, "\nFAILED: {}", failures.join(", "));
    }
    out
}
