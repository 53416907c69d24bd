//! Tests of `metrics.rs`.

use super::*;

fn has(metrics: &ProxyMetrics, endpoint: &str) -> bool {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.contains(endpoint)
}

fn open(metrics: &ProxyMetrics, endpoint: &str) {
    let labels = EndpointLabels {
        service: "default/web:http".into(),
        endpoint: endpoint.into(),
    };
    metrics.opened.get_or_create(&labels).inc();
}

/// A departed endpoint's series stay for the linger, then go; one that comes back
/// meanwhile keeps them.
#[test]
fn departed_series_linger_then_leave_unless_they_return() {
    let metrics = ProxyMetrics::default();
    metrics.set_linger(std::time::Duration::from_millis(30));
    open(&metrics, "198.18.0.1:80");
    open(&metrics, "198.18.0.2:80");
    metrics.forget_endpoint("default/web:http", "198.18.0.1:80", Vec::new());
    metrics.forget_endpoint("default/web:http", "198.18.0.2:80", Vec::new());
    metrics.arrived_endpoint("default/web:http", "198.18.0.2:80");
    metrics.sweep();
    assert!(has(&metrics, "198.18.0.1:80"), "still lingering");
    std::thread::sleep(std::time::Duration::from_millis(40));
    metrics.sweep();
    assert!(!has(&metrics, "198.18.0.1:80"), "gone after the linger");
    assert!(has(&metrics, "198.18.0.2:80"), "came back: kept");
}
