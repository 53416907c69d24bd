//! HTTP requests, as a policy sees them on an HTTP Service port (contract 0.2.0): the
//! request to decide, read through getters that copy only what is asked, and what
//! happened to each request forwarded.

use crate::types::{EndpointId, Outcome, OutcomeKind};

/// One request's head. In a component, each call copies one value out of the host (a
/// policy that reads one header pays for that header only); natively, a [`RequestParts`].
pub trait Request {
    /// The method, as sent (`GET`, `POST`...).
    fn method(&self) -> String;
    /// HTTP/2's `:authority` or HTTP/1.1's `Host`, when the request has one.
    fn authority(&self) -> Option<String>;
    /// The path and query; `/` when the request has none.
    fn path(&self) -> String;
    /// The first value of header `name` (any case), as bytes.
    fn header(&self, name: &str) -> Option<Vec<u8>>;
}

/// A request built in memory: for native tests of a policy, and for `weir policy test`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestParts {
    pub method: String,
    pub authority: Option<String>,
    pub path: String,
    /// Headers in order; names compare without case.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RequestParts {
    /// `GET path`, no headers.
    pub fn get(path: &str) -> Self {
        RequestParts {
            method: "GET".into(),
            authority: None,
            path: path.into(),
            headers: Vec::new(),
        }
    }

    /// The same request with one more header.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

impl Request for RequestParts {
    fn method(&self) -> String {
        self.method.clone()
    }

    fn authority(&self) -> Option<String> {
        self.authority.clone()
    }

    fn path(&self) -> String {
        if self.path.is_empty() {
            "/".into()
        } else {
            self.path.clone()
        }
    }

    fn header(&self, name: &str) -> Option<Vec<u8>> {
        (self.headers.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// What happened to a forwarded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestEvent {
    /// The endpoint answered with this status; `micros` is the time to the response's
    /// head.
    Response(u16),
    /// The endpoint could not be reached; `micros` is the time spent trying.
    ConnectFailed,
    /// The endpoint was reached but failed before answering; `micros` since the request
    /// was sent.
    Failed,
    /// The response ended (or its client went away); `micros` is the whole request.
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    pub endpoint: EndpointId,
    pub event: RequestEvent,
    pub micros: u64,
}

impl RequestOutcome {
    /// The same event as a connection's outcome, as a policy that knows only connections
    /// (and a 0.1.0 component) is told it: the response's head is `Connected`, its end
    /// `Closed`, and a request that got no answer `ConnectFailed`. So a policy counting
    /// connections in flight counts requests in flight, and one learning connect latency
    /// learns the time to the first byte.
    pub fn as_connection_outcome(&self) -> Outcome {
        Outcome {
            endpoint: self.endpoint,
            kind: match self.event {
                RequestEvent::Response(_) => OutcomeKind::Connected,
                RequestEvent::ConnectFailed | RequestEvent::Failed => OutcomeKind::ConnectFailed,
                RequestEvent::Finished => OutcomeKind::Closed,
            },
            micros: self.micros,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_without_case() {
        let request = RequestParts::get("").with_header("X-User", "alice");
        assert_eq!(request.header("x-user").as_deref(), Some(&b"alice"[..]));
        assert_eq!(request.header("x-other"), None);
        assert_eq!(request.path(), "/");
    }

    #[test]
    fn request_events_map_to_connection_outcomes() {
        let kind = |event| {
            RequestOutcome {
                endpoint: 1,
                event,
                micros: 5,
            }
            .as_connection_outcome()
            .kind
        };
        assert_eq!(kind(RequestEvent::Response(500)), OutcomeKind::Connected);
        assert_eq!(kind(RequestEvent::Finished), OutcomeKind::Closed);
        assert_eq!(kind(RequestEvent::Failed), OutcomeKind::ConnectFailed);
        assert_eq!(
            kind(RequestEvent::ConnectFailed),
            OutcomeKind::ConnectFailed
        );
    }
}
