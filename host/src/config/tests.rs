//! Tests of `config.rs`.

use super::*;

const MINIMAL: &str =
    "[node]\nname = \"node-a\"\n[source]\nkind = \"files\"\npaths = [\"objects\"]\n";

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let config = Config::parse(MINIMAL, Path::new("/etc/weir")).unwrap();
    assert_eq!(config.source.paths, [PathBuf::from("/etc/weir/objects")]);
    assert_eq!(config.admin.address, "127.0.0.1:10256".parse().unwrap());
    assert_eq!(
        config.node_addresses(),
        Some(vec![IpAddr::from([127, 0, 0, 1])])
    );
    assert_eq!(config.proxy.connect_attempts, 3);
    assert_eq!(
        config.local_cidrs(),
        [Cidr::host("127.0.0.1".parse().unwrap())]
    );
}

#[test]
fn unknown_key_names_key_line_and_choices() {
    let text = format!("{MINIMAL}[admin]\nadress = \"127.0.0.1:1\"\n");
    let error = Config::parse(&text, Path::new("")).unwrap_err();
    assert!(error.contains("line 7"), "{error}");
    assert!(error.contains("unknown field `adress`"), "{error}");
    assert!(error.contains("`address`"), "{error}");
}

#[test]
fn kubernetes_mode() {
    let text = "[node]\nname = \"node-a\"\n[source]\nkind = \"kubernetes\"\nservice_proxy_name = \"weir\"\n[policies]\nselector = \"weir.dev/policies=true\"\n";
    let config = Config::parse(text, Path::new("/etc/weir")).unwrap();
    assert_eq!(config.node_addresses(), None, "from the Node object");
    assert_eq!(config.capture_interface().as_deref(), Some("weir0"));
    assert_eq!(config.source.service_proxy_name.as_deref(), Some("weir"));
    let text = format!("{text}configmap = \"weir-policies\"\n");
    let error = Config::parse(&text, Path::new("")).unwrap_err();
    assert!(error.contains("line 7: policies.selector"), "{error}");
    let error = Config::parse(
        &format!("{MINIMAL}[policies]\nconfigmap = \"weir-policies\"\n"),
        Path::new(""),
    )
    .unwrap_err();
    assert!(
        error.contains("policies.configmap: is for kind = \"kubernetes\""),
        "{error}"
    );
    let text = "[node]\nname = \"n\"\ncapture_interface = \"\"\n[source]\nkind = \"kubernetes\"\npaths = [\"x\"]\n";
    let error = Config::parse(text, Path::new("")).unwrap_err();
    assert!(
        error.contains("source.paths: is for kind = \"files\""),
        "{error}"
    );
    let config = Config::parse(&text.replace("paths = [\"x\"]\n", ""), Path::new("")).unwrap();
    assert_eq!(config.capture_interface(), None);
}

#[test]
fn bad_values_name_the_fix() {
    let text = format!("{MINIMAL}[proxy]\nconnect_timeout = \"2 parsecs\"\n");
    let error = Config::parse(&text, Path::new("")).unwrap_err();
    assert!(
        error.contains("line 7") && error.contains("\"250ms\""),
        "{error}"
    );
    let text = format!("{MINIMAL}[node]\n");
    assert!(Config::parse(&text, Path::new("")).is_err());
    let text = MINIMAL.replace("paths = [\"objects\"]", "paths = []");
    let error = Config::parse(&text, Path::new("")).unwrap_err();
    assert!(error.contains("line 5: source.paths: is empty"), "{error}");
    let text = format!("{MINIMAL}[proxy]\nworkers = 2\nconnect_attempts = 0\n");
    let error = Config::parse(&text, Path::new("")).unwrap_err();
    assert!(
        error.contains("line 8: proxy.connect_attempts: is 0"),
        "{error}"
    );
}

/// A timeout that multiplies past what a Duration holds used to pass here and panic the
/// control thread later; it is refused with the keys to fix.
#[test]
fn connect_timeout_times_attempts_is_range_checked() {
    let text = format!(
        "{MINIMAL}[proxy]\nconnect_timeout = \"5000000000000000h\"\nconnect_attempts = 10\n"
    );
    let error = Config::parse(&text, Path::new("")).unwrap_err();
    assert!(
        error.contains("proxy.connect_timeout: × proxy.connect_attempts (10) is over an hour"),
        "{error}"
    );
    let text = format!("{MINIMAL}[proxy]\nconnect_timeout = \"10m\"\nconnect_attempts = 7\n");
    assert!(
        Config::parse(&text, Path::new(""))
            .unwrap_err()
            .contains("over an hour")
    );
    let text = format!("{MINIMAL}[proxy]\nconnect_timeout = \"5s\"\nconnect_attempts = 10\n");
    assert!(Config::parse(&text, Path::new("")).is_ok());
}

/// Every duration is range-checked: past a year it is refused, naming the key.
#[test]
fn durations_past_a_year_are_refused() {
    for key in [
        "idle_timeout",
        "half_close_timeout",
        "udp_timeout",
        "drop_timeout",
    ] {
        let text = format!("{MINIMAL}[proxy]\n{key} = \"9000h\"\n");
        let error = Config::parse(&text, Path::new("")).unwrap_err();
        assert!(
            error.contains(&format!("proxy.{key}: is over a year")),
            "{error}"
        );
        let text = format!("{MINIMAL}[proxy]\n{key} = \"8000h\"\n");
        assert!(Config::parse(&text, Path::new("")).is_ok(), "{key}");
    }
}
