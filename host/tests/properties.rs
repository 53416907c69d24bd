//! Property tests of what weir reads from people and from the cluster: object files,
//! `weir.toml`, `policies.toml` and the annotations. Whatever the input, the readers
//! answer (objects or an error that says where) and never panic; what is refused is
//! refused for a reason the message names. Case counts are bounded so that CI stays
//! fast; `PROPTEST_CASES` raises them for a longer hunt.

use std::path::Path;

use proptest::prelude::*;
use weir::discovery::files::{Diagnostic, Objects, load_str};

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  annotations:
    weir.dev/policy: maglev
    weir.dev/policy-config: '{\"hash\": \"client\"}'
spec:
  clusterIP: 198.18.0.10
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 30100
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: TCP
    nodePort: 30080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [198.18.1.1]
  nodeName: node-a
  conditions: {ready: true}
";

const CONFIG: &str = "[node]
name = \"node-a\"
addresses = [\"127.0.0.1\"]
[source]
kind = \"files\"
paths = [\".\"]
[admin]
address = \"127.0.0.1:0\"
[proxy]
connect_timeout = \"2s\"
connect_attempts = 3
idle_timeout = \"15m\"
half_close_timeout = \"60s\"
max_connections = 1000
";

const SETTINGS: &str = "[default]
policy = \"maglev\"
config = '{\"hash\": \"client\"}'

[maglev]
failure_mode = \"closed\"
memory_mib = 8
sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"
";

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn load(text: &str) -> (Objects, Vec<Diagnostic>) {
    let mut objects = Objects::default();
    let mut diagnostics = Vec::new();
    load_str(
        Path::new("objects.yaml"),
        text,
        &mut objects,
        &mut diagnostics,
    );
    (objects, diagnostics)
}

/// One edit of a text: cut at a byte, a byte replaced, a line doubled or dropped, or a
/// stretch of another text pasted in.
#[derive(Clone, Debug)]
enum Edit {
    Cut(usize),
    Replace(usize, u8),
    DoubleLine(usize),
    DropLine(usize),
    Insert(usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::Cut),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Replace(at, byte)),
        any::<usize>().prop_map(Edit::DoubleLine),
        any::<usize>().prop_map(Edit::DropLine),
        (
            any::<usize>(),
            prop_oneof![
                Just("&a ".to_string()),
                Just("*a".to_string()),
                Just("[".to_string()),
                Just("{".to_string()),
                Just(": ".to_string()),
                Just("\n  - ".to_string()),
                Just("\t".to_string()),
                Just("'".to_string()),
                Just("!!binary ".to_string()),
                "[ -~]{0,12}",
            ]
        )
            .prop_map(|(at, text)| Edit::Insert(at, text)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for edit in edits {
        let len = bytes.len().max(1);
        match edit {
            Edit::Cut(at) => bytes.truncate(at % len),
            Edit::Replace(at, byte) => {
                if !bytes.is_empty() {
                    bytes[at % len] = *byte;
                }
            }
            Edit::DoubleLine(n) | Edit::DropLine(n) => {
                let mut lines: Vec<Vec<u8>> =
                    bytes.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
                let at = n % lines.len();
                if matches!(edit, Edit::DoubleLine(_)) {
                    lines.insert(at, lines[at].clone());
                } else {
                    lines.remove(at);
                }
                bytes = lines.join(&b'\n');
            }
            Edit::Insert(at, text) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, text.bytes());
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(cases())]

    /// Any text: objects or diagnostics, never a panic; every error names the file.
    #[test]
    fn the_object_reader_answers_any_text(text in "\\PC{0,400}") {
        let (_, diagnostics) = load(&text);
        for diagnostic in diagnostics.iter().filter(|d| d.is_error()) {
            prop_assert!(diagnostic.to_string().contains("objects.yaml"), "{diagnostic}");
        }
    }

    /// A good file, damaged: still an answer; what loads has names; malformed text
    /// says where.
    #[test]
    fn the_object_reader_answers_damaged_files(edits in proptest::collection::vec(edit(), 1..4)) {
        let text = apply(SERVICE, &edits);
        let (objects, diagnostics) = load(&text);
        for service in &objects.services {
            prop_assert!(service.object.metadata.name.as_deref().is_some_and(|n| !n.is_empty()));
        }
        for diagnostic in diagnostics.iter().filter(|d| d.message.starts_with("malformed")) {
            prop_assert!(diagnostic.message.contains("line"), "{diagnostic}");
        }
        // And whatever loaded, the model takes it.
        let _ = weir::model::build(&objects, "node-a");
    }

    /// A key written twice in one mapping is an error naming it, wherever it is.
    #[test]
    fn a_key_written_twice_is_named(line in 0usize..46) {
        let lines: Vec<&str> = SERVICE.lines().collect();
        let chosen = lines[line % lines.len()];
        let Some((key, _)) = chosen.trim_start().trim_start_matches("- ").split_once(": ") else {
            return Ok(());
        };
        if chosen.trim_start().starts_with("- ") || chosen.trim_end().ends_with(':') {
            return Ok(());
        }
        let mut doubled = lines.clone();
        doubled.insert(line % lines.len() + 1, chosen);
        let (_, diagnostics) = load(&(doubled.join("\n") + "\n"));
        let error = diagnostics.iter().find(|d| d.is_error());
        prop_assert!(error.is_some(), "{key} twice was accepted");
        let error = error.unwrap().to_string();
        prop_assert!(error.contains("duplicate") && error.contains(key.trim()), "{error}");
    }

    /// Any annotation values: the Service is built (with warnings), never a panic, and
    /// the timeouts it takes are within a year.
    #[test]
    fn annotations_never_break_the_model(
        policy in "\\PC{0,20}",
        config in "\\PC{0,40}",
        udp in "[0-9.eE+-]{0,12}(us|ms|s|m|h|x)?",
        idle in "[0-9.eE+-]{0,24}(us|ms|s|m|h)?",
        memory in "\\PC{0,8}",
        failure in "\\PC{0,8}",
    ) {
        let quote = |s: &str| serde_json::to_string(s).unwrap();
        let text = SERVICE
            .replace(
                "    weir.dev/policy: maglev\n",
                &format!(
                    "    weir.dev/policy: {}\n    weir.dev/udp-timeout: {}\n    weir.dev/idle-timeout: {}\n    weir.dev/policy-memory-mib: {}\n    weir.dev/failure-mode: {}\n",
                    quote(&policy), quote(&udp), quote(&idle), quote(&memory), quote(&failure)
                ),
            )
            .replace("'{\"hash\": \"client\"}'", &quote(&config));
        let (objects, diagnostics) = load(&text);
        prop_assert!(!diagnostics.iter().any(Diagnostic::is_error), "{diagnostics:?}");
        let model = weir::model::build(&objects, "node-a");
        for port in &model.ports {
            for timeout in [port.udp_timeout, port.idle_timeout].into_iter().flatten() {
                prop_assert!(timeout <= weir::units::MAX_DURATION);
            }
        }
    }

    /// `weir.toml`, damaged: a config or an error, never a panic; any config accepted
    /// has durations a clock can add and a connect budget within an hour.
    #[test]
    fn the_config_reader_answers_damaged_configs(edits in proptest::collection::vec(edit(), 1..4)) {
        let text = apply(CONFIG, &edits);
        if let Ok(config) = weir::config::Config::parse(&text, Path::new(".")) {
            let budget = config.proxy.connect_timeout.0.checked_mul(config.proxy.connect_attempts);
            prop_assert!(budget.is_some_and(|b| b <= std::time::Duration::from_secs(3600)));
            prop_assert!(config.proxy.half_close_timeout.0 <= weir::units::MAX_DURATION);
        }
    }

    /// Any durations and counts in `weir.toml`: refused or safe.
    #[test]
    fn config_values_are_range_checked(
        number in "[0-9]{1,22}(\\.[0-9]{1,3})?",
        unit in prop_oneof![Just("us"), Just("ms"), Just("s"), Just("m"), Just("h")],
        attempts in any::<u32>(),
        key in prop_oneof![Just("connect_timeout"), Just("idle_timeout"), Just("half_close_timeout"), Just("drop_timeout"), Just("udp_timeout")],
    ) {
        let text = CONFIG
            .replace("connect_attempts = 3", &format!("connect_attempts = {attempts}"))
            .replace(&format!("{key} = "), "replaced = ")
            .lines()
            .filter(|l| !l.starts_with("replaced = "))
            .collect::<Vec<_>>()
            .join("\n")
            + &format!("\n{key} = \"{number}{unit}\"\n");
        if let Ok(config) = weir::config::Config::parse(&text, Path::new(".")) {
            let budget = config.proxy.connect_timeout.0.checked_mul(config.proxy.connect_attempts);
            prop_assert!(budget.is_some_and(|b| b <= std::time::Duration::from_secs(3600)));
            for duration in [Some(config.proxy.half_close_timeout), config.proxy.idle_timeout, Some(config.proxy.drop_timeout), Some(config.proxy.udp_timeout)].into_iter().flatten() {
                prop_assert!(duration.0 <= weir::units::MAX_DURATION);
                prop_assert!(std::time::Instant::now().checked_add(duration.0).is_some());
            }
        }
    }

    /// `policies.toml`, any text or damaged: settings or an error, never a panic.
    #[test]
    fn the_settings_reader_answers_any_text(text in "\\PC{0,200}", edits in proptest::collection::vec(edit(), 1..4)) {
        let _ = weir::policy::settings::parse(&text);
        let _ = weir::policy::settings::parse(&apply(SETTINGS, &edits));
    }
}

proptest! {
    #![proptest_config(cases())]

    /// Any bytes where a PROXY protocol header should be: a header or a refusal, never a
    /// panic, and never a byte read past the header.
    #[test]
    fn the_proxy_protocol_reader_answers_any_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        prefix in prop_oneof![Just(b"PROXY ".to_vec()), Just(b"\r\n\r\n\0\r\nQUIT\n".to_vec()), Just(Vec::new())],
    ) {
        let mut input = prefix;
        input.extend_from_slice(&bytes);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let mut reader = input.as_slice();
        let _ = runtime.block_on(weir::proxy::proxy_protocol::read(&mut reader));
    }

    /// Whatever the addresses, what is written reads back the same, and the bytes after
    /// the header are left for the connection.
    #[test]
    fn proxy_protocol_headers_round_trip(
        client in any::<std::net::SocketAddr>(),
        destination in any::<std::net::SocketAddr>(),
        v2 in any::<bool>(),
    ) {
        use weir::proxy::proxy_protocol::{Header, Transport, Version, encode, read};
        let version = if v2 { Version::V2 } else { Version::V1 };
        let mut bytes = encode(version, Transport::Stream, client, destination);
        bytes.extend_from_slice(b"payload");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let mut reader = bytes.as_slice();
        let header = runtime.block_on(read(&mut reader)).unwrap();
        let Header::Proxied { client: read_client, destination: read_destination } = header else {
            panic!("{header:?}");
        };
        prop_assert_eq!(read_client.port(), client.port());
        prop_assert_eq!(read_destination.port(), destination.port());
        let same = |a: std::net::IpAddr, b: std::net::IpAddr| weir::net::canonical(a) == weir::net::canonical(b);
        prop_assert!(same(read_client.ip(), client.ip()), "{read_client} {client}");
        prop_assert!(same(read_destination.ip(), destination.ip()));
        prop_assert_eq!(reader, b"payload");
    }
}

#[test]
fn the_samples_are_good() {
    let (objects, diagnostics) = load(SERVICE);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    assert_eq!(objects.services.len(), 1);
    assert_eq!(objects.endpoint_slices.len(), 1);
    weir::config::Config::parse(CONFIG, Path::new(".")).expect("the sample config");
    weir::policy::settings::parse(SETTINGS).expect("the sample settings");
}
