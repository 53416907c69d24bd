//! Events about weir's policies and Services, posted as they come.

use super::*;

/// Publishes Events as they come. Each is created with a name of its own: kube-rs's
/// Recorder would fold a second `PolicyLoaded` on the same ConfigMap into the first one's
/// series, keeping the first note, and the module and digest in the note are the point.
/// weir announces only changes, so there is nothing to aggregate.
pub(super) async fn publish(
    client: Client,
    mut announcements: tokio::sync::mpsc::UnboundedReceiver<Announcement>,
    instance: String,
) {
    let mut failing = false;
    let mut sequence = 0u64;
    while let Some(announcement) = announcements.recv().await {
        let regarding = announcement.subject.0;
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let now = k8s_openapi::jiff::Timestamp::now();
        sequence += 1;
        let event = K8sEvent {
            metadata: ObjectMeta {
                // As client-go names them: the object's name and a unique suffix.
                name: Some(format!(
                    "{}.{:x}{:x}",
                    regarding.name.as_deref().unwrap_or("weir"),
                    now.as_nanosecond(),
                    sequence
                )),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            action: Some(announcement.action.to_string()),
            reason: Some(announcement.reason.to_string()),
            // The API server refuses notes over 1 kB.
            note: Some(crate::units::shorten(&announcement.note, 1000)),
            type_: Some(
                if announcement.warning {
                    "Warning"
                } else {
                    "Normal"
                }
                .to_string(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding),
            reporting_controller: Some(REPORTER.to_string()),
            reporting_instance: Some(instance.clone()),
            ..K8sEvent::default()
        };
        let events = Api::<K8sEvent>::namespaced(client.clone(), &namespace);
        match events.create(&PostParams::default(), &event).await {
            Ok(_) => failing = false,
            Err(error) => {
                if !failing {
                    tracing::warn!(
                        reason = announcement.reason,
                        "cannot publish an Event: {error}"
                    );
                }
                failing = true;
            }
        }
    }
}
