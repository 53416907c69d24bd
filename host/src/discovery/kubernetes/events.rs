//! Events about weir's policies and Services, correlated as client-go's events library
//! does: the first occurrence of an (object, type, reason, note) is created; the same
//! again is a patch of that Event's series (count, last observed time), not a new
//! Event.

use std::collections::VecDeque;

use k8s_openapi::api::events::v1::EventSeries;
use kube::api::{Patch, PatchParams};

use super::*;

/// How long an Event is patched rather than created again: the API server keeps Events
/// an hour by default.
const CORRELATE_FOR: std::time::Duration = std::time::Duration::from_secs(50 * 60);
/// Distinct Events remembered for correlation.
const REMEMBERED: usize = 4096;

/// What makes two announcements the same Event.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
    warning: bool,
    reason: &'static str,
    note: String,
}

/// An Event created, and how often it happened.
#[derive(Debug)]
struct Posted {
    key: Key,
    namespace: String,
    name: String,
    count: i32,
    first: std::time::Instant,
}

/// The Events posted recently, oldest first.
#[derive(Debug, Default)]
pub(super) struct Correlator {
    posted: VecDeque<Posted>,
}

impl Correlator {
    /// The Event to patch for `key`, with its new count, if it was posted recently.
    fn repeat(&mut self, key: &Key) -> Option<(String, String, i32)> {
        let now = std::time::Instant::now();
        while self
            .posted
            .front()
            .is_some_and(|p| now.duration_since(p.first) > CORRELATE_FOR)
        {
            self.posted.pop_front();
        }
        let posted = self.posted.iter_mut().find(|p| p.key == *key)?;
        posted.count += 1;
        Some((posted.namespace.clone(), posted.name.clone(), posted.count))
    }

    fn remember(&mut self, key: Key, namespace: String, name: String) {
        if self.posted.len() == REMEMBERED {
            self.posted.pop_front();
        }
        self.posted.push_back(Posted {
            key,
            namespace,
            name,
            count: 1,
            first: std::time::Instant::now(),
        });
    }

    fn forget(&mut self, key: &Key) {
        self.posted.retain(|p| p.key != *key);
    }
}

/// Publishes Events as they come. Each new one is created with a name of its own (kube-rs's
/// Recorder would fold a second `PolicyLoaded` on the same ConfigMap into the first one's
/// series, keeping the first note, and the module and digest in the note are the point);
/// one that is the same as a recent one bumps that one's series.
pub(super) async fn publish(
    client: Client,
    mut announcements: tokio::sync::mpsc::UnboundedReceiver<Announcement>,
    instance: String,
) {
    let mut failing = false;
    let mut sequence = 0u64;
    let mut correlator = Correlator::default();
    while let Some(announcement) = announcements.recv().await {
        let regarding = announcement.subject.0;
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        // The API server refuses notes over 1 kB.
        let note = crate::units::shorten(&announcement.note, 1000);
        let key = Key {
            regarding: (
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
            warning: announcement.warning,
            reason: announcement.reason,
            note: note.clone(),
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        // A repeat patches its Event's series; `None`: create one.
        let patched = match correlator.repeat(&key) {
            Some((namespace, name, count)) => {
                let series = EventSeries {
                    count,
                    last_observed_time: MicroTime(now),
                };
                let patch = serde_json::json!({ "series": series });
                let events = Api::<K8sEvent>::namespaced(client.clone(), &namespace);
                match events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => Some(Ok(())),
                    // Expired (or deleted) meanwhile: a new Event starts a new series.
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        correlator.forget(&key);
                        None
                    }
                    Err(error) => Some(Err(error.to_string())),
                }
            }
            None => None,
        };
        let result = match patched {
            Some(result) => result,
            None => {
                sequence += 1;
                // As client-go names them: the object's name and a unique suffix.
                let name = format!(
                    "{}.{:x}{:x}",
                    regarding.name.as_deref().unwrap_or("weir"),
                    now.as_nanosecond(),
                    sequence
                );
                let event = K8sEvent {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    action: Some(announcement.action.to_string()),
                    reason: Some(announcement.reason.to_string()),
                    note: Some(note),
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
                    Ok(_) => {
                        correlator.remember(key, namespace, name);
                        Ok(())
                    }
                    Err(error) => Err(error.to_string()),
                }
            }
        };
        match result {
            Ok(()) => failing = false,
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
