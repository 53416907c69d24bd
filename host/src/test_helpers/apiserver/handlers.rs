//! The HTTP side: routing a request to list, watch, get, create or patch, and answering
//! errors as v1 Status objects.

use super::*;

/// A refused request, answered as a v1 Status.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) code: StatusCode,
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(
        code: StatusCode,
        reason: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(super) fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        })
    }
}

pub(super) fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
}

pub(super) fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NotFound", message)
}

pub(super) async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    route(shared, request)
        .await
        .unwrap_or_else(|error| json_response(error.code, &error.status()))
}

pub(super) async fn route(
    shared: &Shared,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let expected = format!("Bearer {TOKEN}");
    let authorization = request.headers().get(AUTHORIZATION);
    if authorization.is_none_or(|value| value.as_bytes() != expected.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    let path = request.uri().path().trim_end_matches('/').to_string();
    if path == "/version" {
        return Ok(json_response(StatusCode::OK, &version()));
    }
    let target = Target::parse(&path)?;
    let query = Query::parse(request.uri().query().unwrap_or(""));
    let method = request.method().clone();
    match (method, &target.name) {
        (Method::GET, Some(name)) => {
            let key = target.resource.key(target.namespace.as_deref(), name);
            let object = lock(&shared.store)
                .get(target.resource, &key)
                .ok_or_else(|| {
                    not_found(format!("{} \"{name}\" not found", target.resource.plural))
                })?;
            Ok(json_response(StatusCode::OK, &object))
        }
        (Method::GET, None) if query.flag("watch") => watch(shared, &target, &query),
        (Method::GET, None) => list(shared, &target, &query),
        (Method::POST, None) => {
            let body = read_body(request).await?;
            create(shared, &target, body)
        }
        (Method::PATCH, Some(name)) => {
            let content_type = request
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = read_body(request).await?;
            patch(shared, &target, name, &content_type, body)
        }
        (method, _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the fake API server does not support {method} {path}"),
        )),
    }
}

pub(super) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// What a URL names: a resource, maybe within a namespace, maybe one object.
pub(super) struct Target {
    pub(super) resource: &'static ResourceType,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
}

impl Target {
    /// `/api/v1/...` or `/apis/{group}/{version}/...`, then `{plural}[/{name}]` or
    /// `namespaces/{ns}/{plural}[/{name}]`.
    pub(super) fn parse(path: &str) -> Result<Target, ApiError> {
        let unknown = || {
            not_found(format!(
                "the server could not find the requested resource ({path})"
            ))
        };
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (api_version, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return Err(unknown()),
        };
        let (namespace, plural, name) = match rest {
            [plural] => (None, plural, None),
            [plural, name] => (None, plural, Some(name)),
            ["namespaces", namespace, plural] => (Some(namespace), plural, None),
            ["namespaces", namespace, plural, name] => (Some(namespace), plural, Some(name)),
            _ => return Err(unknown()),
        };
        let resource = ResourceType::by_plural(&api_version, plural).ok_or_else(unknown)?;
        // A namespaced object is named within its namespace; nothing else has one.
        let misplaced = if resource.namespaced {
            namespace.is_none() && name.is_some()
        } else {
            namespace.is_some()
        };
        if misplaced {
            return Err(unknown());
        }
        Ok(Target {
            resource,
            namespace: namespace.map(|n| n.to_string()),
            name: name.map(|n| n.to_string()),
        })
    }
}

/// The decoded query parameters; unknown ones are ignored.
pub(super) struct Query(HashMap<String, String>);

impl Query {
    pub(super) fn parse(query: &str) -> Query {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            });
        Query(pairs.collect())
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub(super) fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    pub(super) fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.get(key)
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| bad_request(format!("{key}: invalid value {value:?}")))
            })
            .transpose()
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
pub(super) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (b'+', None) => {
                decoded.push(b' ');
                i += 1;
            }
            (byte, None) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

pub(super) fn list(
    shared: &Shared,
    target: &Target,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let resource = target.resource;
    lock(&shared.store).count(resource, false);
    let selector = Selector::parse(
        target.namespace.as_deref(),
        query.get("labelSelector"),
        query.get("fieldSelector"),
    )?;
    let limit = query.number::<usize>("limit")?.filter(|&limit| limit > 0);
    let store = lock(&shared.store);
    let (revision, after) = match query.get("continue") {
        Some(token) => {
            let (revision, after) = decode_continue(token)?;
            if revision < store.compacted {
                return Err(ApiError::new(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (revision, Some(after))
        }
        None => (store.revision, None),
    };
    let (items, more) = store.page(resource, &selector, after, limit);
    drop(store);
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if let (true, Some(last)) = (more, items.last()) {
        let namespace = last["metadata"]["namespace"].as_str().unwrap_or("");
        let name = last["metadata"]["name"].as_str().unwrap_or("");
        metadata["continue"] = json!(format!("{revision}/{namespace}/{name}"));
    }
    let items: Vec<&Value> = items.iter().map(|item| item.as_ref()).collect();
    let list = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version,
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

/// A continue token is `{list resourceVersion}/{namespace}/{name of the last item}`:
/// opaque to clients, and the next page starts after that key whatever changed since.
pub(super) fn decode_continue(token: &str) -> Result<(u64, ObjectKey), ApiError> {
    let invalid = || bad_request(format!("continue: invalid token {token:?}"));
    let mut parts = token.splitn(3, '/');
    let revision = parts
        .next()
        .and_then(|r| r.parse().ok())
        .ok_or_else(invalid)?;
    match (parts.next(), parts.next()) {
        (Some(namespace), Some(name)) => Ok((revision, (namespace.to_string(), name.to_string()))),
        _ => Err(invalid()),
    }
}

pub(super) fn watch(
    shared: &Shared,
    target: &Target,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    lock(&shared.store).count(target.resource, true);
    let selector = Selector::parse(
        target.namespace.as_deref(),
        query.get("labelSelector"),
        query.get("fieldSelector"),
    )?;
    // A streaming list (`sendInitialEvents`) starts from the current state, as does a
    // watch from "0" or from nothing.
    let initial_events = query.flag("sendInitialEvents");
    let from = match query.get("resourceVersion") {
        _ if initial_events => None,
        None | Some("" | "0") => None,
        Some(_) => query.number::<u64>("resourceVersion")?,
    };
    let timeout = query
        .number::<u64>("timeoutSeconds")?
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let bookmarks = query.flag("allowWatchBookmarks");
    let lines = {
        let mut store = lock(&shared.store);
        store.watch(target.resource, selector, bookmarks, from, initial_events)
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold(lines, move |mut lines| async move {
        tokio::select! {
            line = lines.recv() => line.map(|line| (Ok(Frame::data(line)), lines)),
            () = tokio::time::sleep_until(deadline) => None,
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("a valid response"))
}

pub(super) fn create(
    shared: &Shared,
    target: &Target,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let resource = target.resource;
    if resource.namespaced && target.namespace.is_none() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("create {} within a namespace", resource.plural),
        ));
    }
    let mut object: Value = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the request body is not JSON: {e}")))?;
    let key = identify(resource, &mut object, target.namespace.as_deref())
        .map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message))?;
    let mut store = lock(&shared.store);
    if store.get(resource, &key).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{}\" already exists", resource.plural, key.1),
        ));
    }
    let stored = store.put(resource, key, object);
    note_client_write(shared, &mut store, resource, &stored);
    Ok(json_response(StatusCode::CREATED, &stored))
}

/// Merge, strategic-merge and apply patches are all applied as a JSON merge patch, which
/// is what they amount to for the flat objects tests patch.
pub(super) fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    content_type: &str,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let resource = target.resource;
    let supported = [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ];
    if !supported.contains(&content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the fake API server does not support {content_type:?} patches"),
        ));
    }
    let patch: Value = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the patch is not JSON: {e}")))?;
    let key = resource.key(target.namespace.as_deref(), name);
    let mut store = lock(&shared.store);
    let current = store
        .get(resource, &key)
        .ok_or_else(|| not_found(format!("{} \"{name}\" not found", resource.plural)))?;
    let mut object = (*current).clone();
    merge_patch(&mut object, &patch);
    let invalid =
        |message: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
    if !object["metadata"].is_object() {
        return Err(invalid("metadata: a patch cannot remove or replace it"));
    }
    // A patch cannot move or rename the object.
    object["metadata"]["name"] = json!(name);
    identify(resource, &mut object, target.namespace.as_deref()).map_err(|m| invalid(&m))?;
    let stored = store.put(resource, key, object);
    note_client_write(shared, &mut store, resource, &stored);
    Ok(json_response(StatusCode::OK, &stored))
}

/// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

pub(super) fn note_client_write(
    shared: &Shared,
    store: &mut Store,
    resource: &ResourceType,
    stored: &Value,
) {
    if resource.kind == "Event" {
        store.client_events.push(stored.clone());
        shared.event_written.notify_all();
    }
}

pub(super) async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let collected = request
        .into_body()
        .collect()
        .await
        .map_err(|e| bad_request(format!("reading the request body: {e}")))?;
    Ok(collected.to_bytes())
}

pub(super) fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON serializes");
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a valid response")
}

/// Now, to the second, as Kubernetes writes creationTimestamp.
pub(super) fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .expect("now is a valid timestamp")
        .to_string()
}
