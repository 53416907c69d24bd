//! Tests of the fake API server with the real kube client.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Service};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

use super::*;

const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// A kube client configured from the kubeconfig the server writes.
async fn client(server: &ApiServer) -> kube::Client {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig(dir.path()))
        .expect("the written kubeconfig parses");
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .expect("a client config from the kubeconfig");
    kube::Client::try_from(config).expect("a kube client")
}

fn service(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"ports": [{"port": 80}]},
    })
}

/// A reflector over every Service, fed by `watcher` with its default backoff; `errors`
/// counts the errors the watcher reported.
fn reflect(
    client: kube::Client,
    config: watcher::Config,
    errors: Arc<AtomicUsize>,
) -> reflector::Store<Service> {
    let (reader, writer) = reflector::store();
    let stream = watcher(Api::<Service>::all(client), config)
        .default_backoff()
        .inspect_err(move |_| {
            errors.fetch_add(1, Ordering::SeqCst);
        })
        .reflect(writer);
    tokio::spawn(stream.for_each(|_| std::future::ready(())));
    reader
}

fn names(reader: &reflector::Store<Service>) -> BTreeSet<String> {
    reader
        .state()
        .iter()
        .map(|service| service.name_any())
        .collect()
}

fn set<const N: usize>(names: [&str; N]) -> BTreeSet<String> {
    names.into_iter().map(String::from).collect()
}

/// Waits until `condition` holds, failing the test after a deadline.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn list_pages_through_more_objects_than_a_page() {
    let server = ApiServer::start();
    for i in 0..1234 {
        server.apply(service(&format!("svc-{i:04}"), json!({})));
    }
    let api = Api::<Service>::namespaced(client(&server).await, "default");
    let mut params = ListParams::default().limit(500);
    let (mut names, mut pages) = (BTreeSet::new(), 0);
    loop {
        let page = api.list(&params).await.expect("a page of Services");
        pages += 1;
        names.extend(page.items.iter().map(|service| service.name_any()));
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!((pages, names.len()), (3, 1234));
    assert_eq!(server.requests("services", false), 3);
}

#[tokio::test]
async fn set_based_label_selectors_are_rejected() {
    let server = ApiServer::start();
    let api = Api::<Service>::all(client(&server).await);
    let error = api
        .list(&ListParams::default().labels("tier in (web)"))
        .await
        .expect_err("`in` is not supported");
    assert!(
        matches!(&error, kube::Error::Api(status) if status.code == 400),
        "{error:?}"
    );
}

#[tokio::test]
async fn watcher_follows_changes_and_label_selector_transitions() {
    let server = ApiServer::start();
    server.apply(service("plain", json!({})));
    server.apply(service("foreign", json!({PROXY_NAME: "other"})));
    let config = watcher::Config::default().labels(&format!("!{PROXY_NAME}"));
    let reader = reflect(client(&server).await, config, Arc::default());
    eventually("the initial list is reflected", || {
        names(&reader) == set(["plain"])
    })
    .await;

    server.apply(service("added", json!({})));
    eventually("ADDED arrives", || {
        names(&reader) == set(["added", "plain"])
    })
    .await;

    server.apply(service("plain", json!({"version": "2"})));
    let plain = ObjectRef::new("plain").within("default");
    eventually("MODIFIED arrives", || {
        reader
            .get(&plain)
            .is_some_and(|service| service.labels().get("version").is_some_and(|v| v == "2"))
    })
    .await;

    server.apply(service("added", json!({PROXY_NAME: "other"})));
    eventually("relabelled out: DELETED", || {
        names(&reader) == set(["plain"])
    })
    .await;

    server.apply(service("foreign", json!({})));
    eventually("relabelled in: ADDED", || {
        names(&reader) == set(["foreign", "plain"])
    })
    .await;

    assert!(server.delete("Service", Some("default"), "plain"));
    eventually("DELETED arrives", || names(&reader) == set(["foreign"])).await;
    assert_eq!(
        server.requests("services", false),
        1,
        "no relist was needed"
    );
}

#[tokio::test]
async fn expired_history_makes_the_watcher_relist() {
    let server = ApiServer::start();
    server.apply(service("before", json!({})));
    let reader = reflect(
        client(&server).await,
        watcher::Config::default(),
        Arc::default(),
    );
    eventually("the list is reflected", || {
        names(&reader) == set(["before"])
    })
    .await;
    eventually("the watch is open", || server.open_watches() == 1).await;

    server.expire();
    server.delete("Service", None, "before");
    server.apply(service("after", json!({})));
    eventually("a relist shows the current state", || {
        server.requests("services", false) == 2 && names(&reader) == set(["after"])
    })
    .await;
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410_expired() {
    let server = ApiServer::start();
    server.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
    );
    let version = |name| {
        let object = server.get("Service", None, name).expect("stored");
        object["metadata"]["resourceVersion"]
            .as_str()
            .expect("a version")
            .to_string()
    };
    let (old, newest) = (version("a"), version("b"));
    server.expire();
    let api = Api::<Service>::namespaced(client(&server).await, "default");
    let events: Vec<_> = api
        .watch(&WatchParams::default(), &old)
        .await
        .expect("the watch starts")
        .collect()
        .await;
    match events.as_slice() {
        [Ok(WatchEvent::Error(status))] => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(
                status.message,
                format!("too old resource version: {old} ({newest})")
            );
        }
        other => panic!("expected one 410 ERROR, got {other:?}"),
    }
}

#[tokio::test]
async fn dropped_connections_make_the_watcher_watch_again() {
    let server = ApiServer::start();
    let reader = reflect(
        client(&server).await,
        watcher::Config::default(),
        Arc::default(),
    );
    eventually("the watch is open", || server.open_watches() == 1).await;

    server.drop_connections();
    eventually("a new watch", || server.requests("services", true) == 2).await;
    server.apply(service("late", json!({})));
    eventually("the new watch delivers", || names(&reader) == set(["late"])).await;
    assert_eq!(
        server.requests("services", false),
        1,
        "resumed without a relist"
    );
}

#[tokio::test]
async fn streaming_list_watcher_gets_the_initial_state() {
    let server = ApiServer::start();
    server.apply(service("existing", json!({})));
    let config = watcher::Config::default().streaming_lists();
    let reader = reflect(client(&server).await, config, Arc::default());
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("the initial events end in time")
        .expect("the reflector is ready");
    assert_eq!(names(&reader), set(["existing"]));
    server.apply(service("later", json!({})));
    eventually("a live event", || {
        names(&reader) == set(["existing", "later"])
    })
    .await;
    assert_eq!(server.requests("services", false), 0, "no LIST at all");
}

#[tokio::test]
async fn watcher_recovers_after_a_restart() {
    let server = ApiServer::start();
    server.apply(service("kept", json!({})));
    server.apply(service("removed", json!({})));
    let errors = Arc::new(AtomicUsize::new(0));
    let reader = reflect(
        client(&server).await,
        watcher::Config::default(),
        errors.clone(),
    );
    eventually("the list is reflected", || {
        names(&reader) == set(["kept", "removed"])
    })
    .await;
    eventually("the watch is open", || server.open_watches() == 1).await;

    server.stop();
    assert!(server.delete("Service", None, "removed"));
    server.apply(service("added-while-down", json!({})));
    eventually("the watcher fails to reach the server", || {
        errors.load(Ordering::SeqCst) >= 1
    })
    .await;

    server.restart();
    eventually("changes made while down arrive", || {
        names(&reader) == set(["added-while-down", "kept"])
    })
    .await;
    assert_eq!(
        server.requests("services", false),
        1,
        "resumed from its resourceVersion"
    );
}

#[tokio::test]
async fn recorder_events_are_created_then_patched() {
    let server = ApiServer::start();
    server.apply(service("web", json!({})));
    let client = client(&server).await;
    let web = Api::<Service>::namespaced(client.clone(), "default")
        .get("web")
        .await
        .expect("GET one Service");
    let recorder = Recorder::new(client, "weir".into());
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidPolicy".into(),
        note: Some("policy web: bad config".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    for _ in 0..2 {
        recorder
            .publish(&event, &web.object_ref(&()))
            .await
            .expect("the event is written");
    }

    let events = server.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(events[0]["reason"], "InvalidPolicy");
    assert_eq!(events[0]["note"], "policy web: bad config");
    assert_eq!(events[0]["regarding"]["name"], "web");
    assert_eq!(events[1]["metadata"]["name"], events[0]["metadata"]["name"]);
    assert_eq!(
        events[1]["series"]["count"], 2,
        "the repeat is a patch with a series"
    );
    let found = server.wait_for_event(
        |event| event["note"] == "policy web: bad config",
        Duration::from_secs(1),
    );
    assert!(found.is_some());
}

#[tokio::test]
async fn core_v1_events_are_recorded_too() {
    let server = ApiServer::start();
    let client = client(&server).await;
    let event: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "web.1"},
        "reason": "Started",
        "message": "hello",
        "involvedObject": {"kind": "Service", "namespace": "default", "name": "web"},
    }))
    .expect("a core v1 Event");
    let created = Api::<CoreEvent>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &event)
        .await
        .expect("the Event is created");
    assert!(created.metadata.uid.is_some());
    let recorded = server.wait_for_event(
        |event| event["apiVersion"] == "v1" && event["reason"] == "Started",
        Duration::from_secs(1),
    );
    assert_eq!(recorded.expect("recorded")["message"], "hello");
    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(version.minor, "34");
}
