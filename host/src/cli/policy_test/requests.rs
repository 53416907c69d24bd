//! `--requests`: each connection decided as an HTTP request instead, as on a port whose
//! `appProtocol` is `http`, `kubernetes.io/h2c` or `grpc` (the policy's `select-request`),
//! with the headers `--header` gives; and whether each distinct set of header values
//! stuck to one endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use super::*;
use crate::policy::RequestHead;

/// One `--header NAME: VALUE`; `{n}` in the value becomes a number below `--values`.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderSpec {
    pub name: hyper::header::HeaderName,
    pub value: String,
}

impl FromStr for HeaderSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = "use `NAME: VALUE`, for example `x-user: user-{n}`";
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| format!("--header `{text}`: no `:`; {usage}"))?;
        let name = hyper::header::HeaderName::from_str(name.trim()).map_err(|_| {
            format!(
                "--header `{text}`: `{}` is not a header name; {usage}",
                name.trim()
            )
        })?;
        let value = value.trim().to_string();
        hyper::header::HeaderValue::from_str(&value.replace("{n}", "0")).map_err(|_| {
            format!("--header `{text}`: the value has characters a header cannot carry")
        })?;
        Ok(HeaderSpec { name, value })
    }
}

/// The requests sent, the same for every run under one seed.
pub(super) struct Requests {
    headers: Vec<HeaderSpec>,
    values: u64,
    seed: u64,
}

impl Requests {
    /// `None` without `--requests`: connections, as before.
    pub(super) fn new(options: &Options) -> Option<Self> {
        options.requests.then(|| Requests {
            headers: options.headers.clone(),
            values: u64::from(options.values.max(1)),
            seed: options.seed,
        })
    }

    /// Request `i`: `GET /` with the headers, each `{n}` its number for this request;
    /// and its key, the header values it carries.
    pub(super) fn head(&self, i: usize) -> (Arc<RequestHead>, String) {
        let n = weir_sdk::hash::finalize(self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9))
            % self.values;
        let mut builder = hyper::Request::get("/");
        let mut key = Vec::new();
        for header in &self.headers {
            let value = header.value.replace("{n}", &n.to_string());
            key.push(format!("{}: {value}", header.name));
            builder = builder.header(&header.name, value);
        }
        let (head, ()) = builder
            .body(())
            .expect("checked when the options were read")
            .into_parts();
        (Arc::new(head), key.join(", "))
    }
}

/// How the header values sent were spread over endpoints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyReport {
    /// Distinct sets of header values among the forwarded requests.
    pub distinct: usize,
    /// Of those, how many went to one endpoint every time.
    pub on_one_endpoint: usize,
}

/// Whether each key (request `i`'s is `keys[i]`) reached one endpoint only.
pub(super) fn key_report(keys: &[String], runs: &[Result<SocketAddr, HostDecision>]) -> KeyReport {
    let mut reached: BTreeMap<&str, BTreeSet<SocketAddr>> = BTreeMap::new();
    for (key, run) in keys.iter().zip(runs) {
        if let Ok(address) = run {
            reached.entry(key).or_default().insert(*address);
        }
    }
    KeyReport {
        distinct: reached.len(),
        on_one_endpoint: reached.values().filter(|e| e.len() == 1).count(),
    }
}
