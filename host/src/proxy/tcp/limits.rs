//! Caps on TCP connections, per node (`proxy.max_connections`) and per service port
//! (`proxy.max_connections_per_service`): past one, a listener stops accepting, so clients
//! wait in the kernel's backlog as with a full accept queue, until a connection closes.
//! It never spins. Accept errors are logged at a bounded rate.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::super::{RouteMetrics, Shared};

/// How often a listener waiting for room on its service port looks again at its route
/// (which a change may have replaced) without being woken.
const RECHECK: Duration = Duration::from_millis(250);

/// One connection's room under the caps, given back when it is dropped.
pub(crate) struct Slot {
    _node: OwnedSemaphorePermit,
    service: Option<Arc<RouteMetrics>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(metrics) = &self.service {
            metrics.tcp_connections.fetch_sub(1, Ordering::AcqRel);
            metrics.tcp_room.notify_waiters();
        }
    }
}

/// Waits until one more connection may be accepted on `address`. `None` once `stop`
/// is cancelled first.
pub(super) async fn room(
    shared: &Shared,
    address: SocketAddr,
    stop: &CancellationToken,
) -> Option<Slot> {
    let node = match shared.tcp_slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            if let Some(route) = shared.tcp_route(address) {
                route.metrics.node_limit.inc();
            }
            tracing::debug!(%address, "proxy.max_connections reached: accepting paused");
            tokio::select! {
                permit = shared.tcp_slots.clone().acquire_owned() => permit.ok()?,
                () = stop.cancelled() => return None,
            }
        }
    };
    let cap = shared.settings.tcp.max_per_service;
    if cap == 0 {
        return Some(Slot {
            _node: node,
            service: None,
        });
    }
    let mut counted = false;
    loop {
        let Some(route) = shared.tcp_route(address) else {
            return Some(Slot {
                _node: node,
                service: None,
            });
        };
        let metrics = &route.metrics;
        // Room now: no waiting set up (the common case, once per accepted connection).
        if take(metrics, cap) {
            return Some(Slot {
                _node: node,
                service: Some(metrics.clone()),
            });
        }
        // At the cap: interest first, then the check again, so that a close in between
        // is not missed.
        let notified = metrics.tcp_room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if take(metrics, cap) {
            return Some(Slot {
                _node: node,
                service: Some(metrics.clone()),
            });
        }
        if !counted {
            metrics.service_limit.inc();
            counted = true;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(RECHECK) => {}
            () = stop.cancelled() => return None,
        }
    }
}

/// Takes room for one more connection on a service port, if it is under `cap`.
fn take(metrics: &RouteMetrics, cap: usize) -> bool {
    let mut open = metrics.tcp_connections.load(Ordering::Acquire);
    while open < cap {
        match metrics.tcp_connections.compare_exchange_weak(
            open,
            open + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return true,
            Err(now) => open = now,
        }
    }
    false
}

/// Accept errors (out of descriptors, out of memory) seen by every listener: one line a
/// second at most, saying how many were not logged.
static ACCEPT_ERRORS: Mutex<Option<(Instant, u64)>> = Mutex::new(None);

pub(super) fn accept_failed(address: SocketAddr, error: &std::io::Error) {
    let mut state = ACCEPT_ERRORS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    match &mut *state {
        Some((last, suppressed)) if now.duration_since(*last) < Duration::from_secs(1) => {
            *suppressed += 1;
        }
        _ => {
            let suppressed = state.map_or(0, |(_, n)| n);
            tracing::warn!(
                %address,
                "accept failed: {error} ({suppressed} more since the last such line); retrying"
            );
            *state = Some((now, 0));
        }
    }
}
