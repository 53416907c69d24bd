//! Tests of `discovery/kubernetes.rs`.

use super::*;

fn service(name: &str, version: &str) -> Service {
    let mut service = Service::default();
    service.metadata.name = Some(name.into());
    service.metadata.namespace = Some("default".into());
    service.metadata.resource_version = Some(version.into());
    service
}

fn names(pairs: &[Pair<Service>]) -> Vec<(Option<String>, Option<String>)> {
    let mut names: Vec<_> = pairs
        .iter()
        .map(|(before, after)| {
            let id = |s: &Option<Arc<Service>>| {
                s.as_ref().map(|s| {
                    format!(
                        "{}@{}",
                        s.name_any(),
                        s.metadata.resource_version.as_deref().unwrap_or("")
                    )
                })
            };
            (id(before), id(after))
        })
        .collect();
    names.sort();
    names
}

#[test]
fn a_relist_is_swapped_in_whole_and_reports_only_differences() {
    let mut table = Table::<Service>::default();
    assert!(table.apply(watcher::Event::Init).is_empty());
    table.apply(watcher::Event::InitApply(service("a", "1")));
    table.apply(watcher::Event::InitApply(service("b", "2")));
    assert!(
        !table.synced && table.objects.is_empty(),
        "nothing before InitDone"
    );
    let pairs = table.apply(watcher::Event::InitDone);
    assert!(table.synced);
    assert_eq!(
        names(&pairs),
        [(None, Some("a@1".into())), (None, Some("b@2".into()))]
    );

    // A relist (after 410 Gone, say) keeps serving the old objects until it is
    // complete, then reports what differs: b changed, a deleted, c added.
    table.apply(watcher::Event::Init);
    table.apply(watcher::Event::InitApply(service("b", "5")));
    assert_eq!(
        table.objects.len(),
        2,
        "the old objects serve during a relist"
    );
    table.apply(watcher::Event::InitApply(service("c", "6")));
    let pairs = table.apply(watcher::Event::InitDone);
    assert_eq!(
        names(&pairs),
        [
            (None, Some("c@6".into())),
            (Some("a@1".into()), None),
            (Some("b@2".into()), Some("b@5".into())),
        ]
    );

    // Watch events; an unchanged resourceVersion is no change.
    assert!(
        table
            .apply(watcher::Event::Apply(service("c", "6")))
            .is_empty()
    );
    assert_eq!(
        table.apply(watcher::Event::Apply(service("c", "7"))).len(),
        1
    );
    assert_eq!(
        table.apply(watcher::Event::Delete(service("c", "8"))).len(),
        1
    );
    assert!(
        table
            .apply(watcher::Event::Delete(service("c", "8")))
            .is_empty()
    );
}

#[test]
fn selector_matches_kube_proxy() {
    let mut settings = Settings {
        kubeconfig: None,
        namespace: "weir".into(),
        node: "node-a".into(),
        service_proxy_name: None,
        policies: PolicySource::Named("weir-policies".into()),
        instance: "weir-abcde".into(),
    };
    assert_eq!(
        settings.service_selector(),
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    );
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert!(settings.owns(&labels(&[("app", "web")])));
    assert!(!settings.owns(&labels(&[(SERVICE_PROXY_NAME_LABEL, "weir")])));
    assert!(!settings.owns(&labels(&[(HEADLESS_LABEL, "")])));
    settings.service_proxy_name = Some("weir".into());
    assert_eq!(
        settings.service_selector(),
        "service.kubernetes.io/service-proxy-name=weir,!service.kubernetes.io/headless"
    );
    assert!(settings.owns(&labels(&[(SERVICE_PROXY_NAME_LABEL, "weir")])));
    assert!(!settings.owns(&labels(&[(SERVICE_PROXY_NAME_LABEL, "cilium")])));
    assert!(!settings.owns(&labels(&[])));
}

#[test]
fn the_backoff_is_capped_and_an_expiry_relists_at_once() {
    use watch::Backoff;
    let mut backoff = Backoff::default();
    let waits: Vec<_> = (0..12).map(|_| backoff.next(false)).collect();
    assert!(
        waits[0] <= Backoff::FIRST && waits[0] >= Backoff::FIRST / 2,
        "{waits:?}"
    );
    assert!(waits.iter().all(|w| *w <= Backoff::CAP), "{waits:?}");
    assert!(waits[11] >= Backoff::CAP / 2, "{waits:?}");
    // A 410 is a relist now, not a step of backoff; two in a row wait as errors do.
    assert_eq!(backoff.next(true), std::time::Duration::ZERO);
    assert!(backoff.next(true) > std::time::Duration::ZERO);
    backoff.reset();
    assert!(backoff.next(false) <= Backoff::FIRST);
}

#[test]
fn an_outage_is_one_line_when_it_starts_and_one_when_it_ends() {
    let mut outage = watch::Outage::default();
    let kinds = [
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Node,
        Kind::ConfigMaps,
    ];
    let mut lines = Vec::new();
    for _ in 0..5 {
        for kind in kinds {
            lines.extend(outage.failed(kind, "connection refused"));
        }
    }
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("connection refused"), "{lines:?}");
    for kind in kinds {
        lines.extend(outage.recovered(kind));
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("back after"), "{lines:?}");
    assert_eq!(outage.recovered(Kind::Services), None, "no outage, no line");
}
