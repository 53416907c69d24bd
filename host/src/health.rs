//! kube-proxy's health answers, byte for byte: the proxier health behind `/healthz` and
//! `/livez` (proxy_health.go) and the healthCheckNodePort body (service_health.go).
//!
//! Times are printed as Go's `time.Time.String()` prints `time.Now()`, monotonic reading
//! included (`2020-06-03 23:59:53.688063083 +0000 UTC m=+202.631797660`), in UTC.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A moment as kube-proxy's clock gives it: wall time and a monotonic reading.
#[derive(Clone, Copy, Debug)]
pub struct Moment {
    wall: SystemTime,
    monotonic: Instant,
}

impl Moment {
    pub fn now() -> Self {
        Moment {
            wall: SystemTime::now(),
            monotonic: Instant::now(),
        }
    }
}

/// Whether weir applies changes in time, as kube-proxy's `ProxyHealthServer` tracks it:
/// a change seen but not applied within `timeout` makes the proxy unhealthy.
#[derive(Debug)]
pub struct ProxyHealth {
    started: Instant,
    timeout: Duration,
    state: Mutex<HealthState>,
    node_eligible: AtomicBool,
}

#[derive(Debug)]
struct HealthState {
    /// The oldest change seen and not yet applied.
    oldest_pending: Option<Moment>,
    /// When changes were last applied (`None` before the first sync).
    last_updated: Option<Moment>,
}

/// One answer of `/healthz` or `/livez`.
#[derive(Debug)]
pub struct HealthAnswer {
    pub status: u16,
    pub body: String,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        ProxyHealth {
            started: Instant::now(),
            timeout,
            state: Mutex::new(HealthState {
                oldest_pending: None,
                last_updated: None,
            }),
            node_eligible: AtomicBool::new(true),
        }
    }

    /// A change was seen (kube-proxy's `QueuedUpdate`): keeps the oldest.
    pub fn queued(&self) {
        let mut state = self.lock();
        state.oldest_pending.get_or_insert_with(Moment::now);
    }

    /// Changes were applied (kube-proxy's `Updated`).
    pub fn updated(&self) {
        let mut state = self.lock();
        state.oldest_pending = None;
        state.last_updated = Some(Moment::now());
    }

    /// Node eligibility for `/healthz` (a Node being deleted or drained by the cluster
    /// autoscaler is not eligible). Eligible until told otherwise.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// Healthy unless a change has waited `timeout` or longer; healthy before the first
    /// sync. Returns the health and the last update time to report.
    fn proxier(&self, now: Moment) -> (bool, Option<Moment>) {
        let state = self.lock();
        let Some(last) = state.last_updated else {
            return (true, None);
        };
        let stale = state
            .oldest_pending
            .is_some_and(|p| now.monotonic.saturating_duration_since(p.monotonic) >= self.timeout);
        (!stale, Some(last))
    }

    pub fn is_healthy(&self) -> bool {
        self.proxier(Moment::now()).0
    }

    /// `/healthz`: 200 iff healthy and the node is eligible.
    pub fn healthz(&self) -> HealthAnswer {
        let now = Moment::now();
        let (healthy, last) = self.proxier(now);
        let eligible = self.node_eligible.load(Ordering::Relaxed);
        let ok = healthy && eligible;
        let last = if ok { Some(now) } else { last };
        HealthAnswer {
            status: if ok { 200 } else { 503 },
            body: format!(
                "{{\"lastUpdated\": {},\"currentTime\": {}, \"nodeEligible\": {eligible}}}",
                quote(&self.go_string(last)),
                quote(&self.go_string(Some(now)))
            ),
        }
    }

    /// `/livez`: as `/healthz`, without node eligibility.
    pub fn livez(&self) -> HealthAnswer {
        let now = Moment::now();
        let (healthy, last) = self.proxier(now);
        let last = if healthy { Some(now) } else { last };
        HealthAnswer {
            status: if healthy { 200 } else { 503 },
            body: format!(
                "{{\"lastUpdated\": {},\"currentTime\": {}}}",
                quote(&self.go_string(last)),
                quote(&self.go_string(Some(now)))
            ),
        }
    }

    /// Go's `Time.String()`; `None` is Go's zero time.
    fn go_string(&self, moment: Option<Moment>) -> String {
        match moment {
            None => "0001-01-01 00:00:00 +0000 UTC".to_string(),
            Some(m) => {
                let since = m.monotonic.saturating_duration_since(self.started);
                format!(
                    "{} m=+{}.{:09}",
                    go_wall(m.wall),
                    since.as_secs(),
                    since.subsec_nanos()
                )
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        crate::locks::lock(&self.state)
    }
}

/// The healthCheckNodePort body: Go's dedented template, tabs, no trailing newline.
pub fn service_health_body(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    healthy: bool,
) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quote(namespace),
        quote(name)
    )
}

/// Go's `%q` for the strings these bodies carry (names and times: printable ASCII).
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c => out.push_str(&format!("\\u{:04x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// `2006-01-02 15:04:05.999999999 -0700 MST` in UTC: trailing zeros of the fraction
/// trimmed, and the dot with them when the fraction is zero.
fn go_wall(wall: SystemTime) -> String {
    let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (date, time) = civil(since.as_secs());
    let mut fraction = String::new();
    if since.subsec_nanos() != 0 {
        fraction = format!(".{:09}", since.subsec_nanos());
        while fraction.ends_with('0') {
            fraction.pop();
        }
    }
    format!("{date} {time}{fraction} +0000 UTC")
}

/// An HTTP date (IMF-fixdate), as Go's net/http writes `Date`.
pub fn http_date(wall: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = wall
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (y, m, d) = ymd(secs / 86_400);
    let weekday = DAYS[(secs / 86_400 % 7) as usize];
    let s = secs % 86_400;
    format!(
        "{weekday}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        MONTHS[m as usize - 1],
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

fn civil(secs: u64) -> (String, String) {
    let (y, m, d) = ymd(secs / 86_400);
    let s = secs % 86_400;
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60),
    )
}

/// Year, month, day of a count of days since 1970-01-01 (proleptic Gregorian).
fn ymd(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_strings() {
        let t = UNIX_EPOCH + Duration::new(1_591_228_793, 688_063_083);
        assert_eq!(go_wall(t), "2020-06-03 23:59:53.688063083 +0000 UTC");
        let t = UNIX_EPOCH + Duration::new(1_591_228_793, 500_000_000);
        assert_eq!(go_wall(t), "2020-06-03 23:59:53.5 +0000 UTC");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 0);
        assert_eq!(go_wall(t), "2024-02-29 23:59:59 +0000 UTC");
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(1_762_023_805)),
            "Sat, 01 Nov 2025 19:03:25 GMT"
        );
    }

    #[test]
    fn service_body_matches_kube_proxy() {
        let body = service_health_body("default", "wp-nginx-service", 1, true);
        assert_eq!(body.len(), 127);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"wp-nginx-service\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[test]
    fn stale_pending_change_is_unhealthy() {
        let health = ProxyHealth::new(Duration::ZERO);
        assert!(health.is_healthy(), "healthy before the first sync");
        health.updated();
        assert!(health.is_healthy());
        health.queued();
        assert!(!health.is_healthy(), "a change pending for >= the timeout");
        let answer = health.livez();
        assert_eq!(answer.status, 503);
        health.updated();
        assert_eq!(health.livez().status, 200);
        health.set_node_eligible(false);
        let answer = health.healthz();
        assert_eq!(answer.status, 503);
        assert!(
            answer.body.ends_with(", \"nodeEligible\": false}"),
            "{}",
            answer.body
        );
        assert_eq!(health.livez().status, 200);
    }

    #[test]
    fn healthy_answer_repeats_the_current_time() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let answer = health.healthz();
        let body = answer.body;
        let times: Vec<&str> = body.split('"').filter(|s| s.contains(" UTC")).collect();
        assert_eq!(times.len(), 2, "{body}");
        assert_eq!(times[0], times[1]);
        assert!(times[0].contains(" +0000 UTC m=+"), "{body}");
    }
}
