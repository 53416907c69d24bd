//! What left (endpoints of a service port, service ports) and when its series are
//! removed: after a linger, so that a scrape sees their last values, unless it comes
//! back meanwhile.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long series of what left stay by default: a scrape or two at the usual intervals.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(super) enum Departure {
    Endpoint {
        service: String,
        endpoint: String,
        /// HTTP status codes with request series.
        codes: Vec<u16>,
    },
    Service(String),
}

/// The departures waiting for their linger to end, oldest first.
#[derive(Debug)]
pub(super) struct Departed(Mutex<Queue>);

#[derive(Debug)]
struct Queue {
    linger: Duration,
    due: VecDeque<(Instant, Departure)>,
}

impl Default for Departed {
    fn default() -> Self {
        Departed(Mutex::new(Queue {
            linger: DEFAULT_LINGER,
            due: VecDeque::new(),
        }))
    }
}

impl Departed {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn set_linger(&self, linger: Duration) {
        self.queue().linger = linger;
    }

    /// Queues `departure`; gives it back when there is no linger (remove it now).
    pub(super) fn push(&self, departure: Departure) -> Option<Departure> {
        let mut queue = self.queue();
        if queue.linger.is_zero() {
            return Some(departure);
        }
        let due = Instant::now() + queue.linger;
        queue.due.push_back((due, departure));
        None
    }

    /// The oldest departure whose linger is over at `now`, taken off the queue.
    pub(super) fn next_due(&self, now: Instant) -> Option<Departure> {
        let mut queue = self.queue();
        match queue.due.front() {
            Some((due, _)) if *due <= now => queue.due.pop_front().map(|(_, d)| d),
            _ => None,
        }
    }

    pub(super) fn arrived_endpoint(&self, service: &str, endpoint: &str) {
        self.queue().due.retain(|(_, d)| {
            !matches!(d, Departure::Endpoint { service: s, endpoint: e, .. } if s == service && e == endpoint)
        });
    }

    pub(super) fn arrived_service(&self, service: &str) {
        (self.queue().due).retain(|(_, d)| !matches!(d, Departure::Service(s) if s == service));
    }
}
