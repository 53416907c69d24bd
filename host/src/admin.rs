//! HTTP answers: the admin port (`/healthz`, `/livez`, `/readyz`, `/metrics`) and each
//! Service's healthCheckNodePort, with kube-proxy's statuses, headers and bodies.
//!
//! Headers go out in Go's net/http order and case (the handler's, then `Date` and
//! `Content-Length`), so probes and tools written against kube-proxy see the same bytes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::{ProxyHealth, http_date, service_health_body};
use crate::locks::lock;
use crate::metrics::{CodeLabels, Metrics};

/// The liveness path (kube-proxy's): the DaemonSet's livenessProbe asks it.
pub const LIVEZ_PATH: &str = "/livez";
/// The readiness path: the DaemonSet's readinessProbe asks it.
pub const READYZ_PATH: &str = "/readyz";

/// What `/readyz` waits for: the first full sync of objects and policies, a capture
/// interface that holds the Service addresses, and not shutting down. Each has its own
/// slot, so the control plane clearing its own never hides a shutdown.
#[derive(Debug)]
pub struct Readiness {
    pending: Mutex<ReadinessState>,
}

#[derive(Debug, Default)]
struct ReadinessState {
    sync: Vec<String>,
    capture: Option<String>,
    shutdown: Option<String>,
}

impl Readiness {
    pub fn new(pending: Vec<String>) -> Self {
        Readiness {
            pending: Mutex::new(ReadinessState {
                sync: pending,
                ..ReadinessState::default()
            }),
        }
    }

    /// What the first sync still waits for (empty once it is done).
    pub fn set_pending(&self, pending: Vec<String>) {
        lock(&self.pending).sync = pending;
    }

    /// Why Service addresses are not on the capture interface, if they are not.
    pub fn set_capture(&self, problem: Option<String>) {
        lock(&self.pending).capture = problem;
    }

    /// Not ready from now on, whatever else is set.
    pub fn set_shutting_down(&self, reason: String) {
        lock(&self.pending).shutdown = Some(reason);
    }

    pub fn pending(&self) -> Vec<String> {
        let state = lock(&self.pending);
        state
            .shutdown
            .iter()
            .chain(&state.sync)
            .chain(&state.capture)
            .cloned()
            .collect()
    }
}

/// Local endpoint counts of the Services with a healthCheckNodePort, by
/// `(namespace, name)`.
pub type HealthChecks = ArcSwap<HashMap<(String, String), usize>>;

/// Everything the HTTP answers read.
pub struct AdminState {
    pub health: Arc<ProxyHealth>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub health_checks: Arc<HealthChecks>,
}

type Body = Full<Bytes>;

/// How long a client of the admin or a health check port may take to send its request
/// headers (and, between requests, to start the next).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Connections open at once on one admin or health check port.
pub const ADMIN_CONNECTIONS: usize = 256;
/// Connections kept for when those are taken: one request each, headers within a second,
/// so that a probe finds room while slow clients hold the rest.
pub const ADMIN_RESERVE: usize = 16;
const RESERVE_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long one keep-alive connection is served before it is asked to go (after its
/// request in flight): a client cannot keep a slot for good by asking often.
pub const ADMIN_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves HTTP/1 on `listener` with `answer` until `stop` is cancelled.
pub async fn serve<F>(listener: TcpListener, stop: CancellationToken, answer: F)
where
    F: Fn(&Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    // Slow or idle clients cannot hold the port: headers must arrive within the timeout,
    // connections age out, and past the cap a few reserved slots serve one quick request
    // each (a probe), before a new connection is closed at once.
    let open = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
    let reserve = Arc::new(tokio::sync::Semaphore::new(ADMIN_RESERVE));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (permit, reserved) = match open.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(permit) => (permit, true),
                Err(_) => {
                    drop(stream);
                    continue;
                }
            },
        };
        let answer = answer.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = answer(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .title_case_headers(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive(!reserved)
                .header_read_timeout(if reserved {
                    RESERVE_HEADER_TIMEOUT
                } else {
                    HEADER_READ_TIMEOUT
                })
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = tokio::time::sleep(ADMIN_CONNECTION_AGE) => {}
                () = stop.cancelled() => return,
            }
            // Old enough: finish the request in flight, then close.
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// An admin port's answer. `metrics_elsewhere` names the port that serves `/metrics`
/// when it is not this one.
pub fn admin(
    state: &AdminState,
    request: &Request<Incoming>,
    metrics_elsewhere: Option<SocketAddr>,
) -> Response<Body> {
    match request.uri().path() {
        "/metrics" if let Some(elsewhere) = metrics_elsewhere => text(
            404,
            format!("metrics are served on {elsewhere} (admin.metrics_address)\n"),
        ),
        "/healthz" => {
            let answer = state.health.healthz();
            count(&state.metrics.proxy.healthz, answer.status);
            json(answer.status, answer.body, None)
        }
        LIVEZ_PATH => {
            let answer = state.health.livez();
            count(&state.metrics.proxy.livez, answer.status);
            json(answer.status, answer.body, None)
        }
        READYZ_PATH => {
            let pending = state.readiness.pending();
            if pending.is_empty() {
                text(200, "ok\n".to_string())
            } else {
                let mut body = String::from("not ready; waiting for:\n");
                for item in pending {
                    body.push_str(&format!("- {item}\n"));
                }
                text(503, body)
            }
        }
        "/metrics" => {
            let mut response = text(200, state.metrics.encode());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
                    .parse()
                    .expect("valid header"),
            );
            response
        }
        _ => text(404, "404 page not found\n".to_string()),
    }
}

/// A healthCheckNodePort's answer, for any path and method (as kube-proxy).
pub fn health_check(state: &AdminState, namespace: &str, name: &str) -> Response<Body> {
    let key = (namespace.to_string(), name.to_string());
    let Some(&count) = state.health_checks.load().get(&key) else {
        // kube-proxy writes nothing for a Service it no longer serves: an empty 200.
        return respond(200, Vec::new(), Bytes::new());
    };
    let healthy = state.health.is_healthy();
    let status = if count != 0 && healthy { 200 } else { 503 };
    json(
        status,
        service_health_body(namespace, name, count, healthy),
        Some(count),
    )
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        CodeLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    code: u16,
) {
    family.get_or_create(&CodeLabels { code }).inc();
}

fn json(status: u16, body: String, weight: Option<usize>) -> Response<Body> {
    let mut headers = vec![
        ("Content-Type", "application/json".to_string()),
        ("X-Content-Type-Options", "nosniff".to_string()),
    ];
    if let Some(weight) = weight {
        headers.push(("X-Load-Balancing-Endpoint-Weight", weight.to_string()));
    }
    respond(status, headers, Bytes::from(body))
}

fn text(status: u16, body: String) -> Response<Body> {
    respond(
        status,
        vec![
            ("Content-Type", "text/plain; charset=utf-8".to_string()),
            ("X-Content-Type-Options", "nosniff".to_string()),
        ],
        Bytes::from(body),
    )
}

fn respond(status: u16, headers: Vec<(&'static str, String)>, body: Bytes) -> Response<Body> {
    let mut builder = Response::builder().status(StatusCode::from_u16(status).expect("valid"));
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
        .header("Date", http_date(SystemTime::now()))
        .header("Content-Length", body.len().to_string())
        .body(Full::new(body))
        .expect("valid response")
}

/// The admin address, bound before anything else so a taken port fails start-up.
pub fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_the_control_plane_clears_hides_a_shutdown() {
        let readiness = Readiness::new(vec!["objects: first read".into()]);
        readiness.set_capture(Some("capture interface: no ip".into()));
        assert_eq!(readiness.pending().len(), 2);
        readiness.set_shutting_down("shutting down".into());
        // A first sync that ends, or a capture interface that recovers, during the drain.
        readiness.set_pending(Vec::new());
        readiness.set_capture(None);
        assert_eq!(readiness.pending(), ["shutting down"]);
    }
}
