//! Tests of `weir policy test`'s parts.

use super::*;

#[test]
fn client_specs_parse() {
    assert_eq!("random".parse::<ClientSpec>(), Ok(ClientSpec::Random));
    assert_eq!(
        "198.19.0.0/24".parse::<ClientSpec>(),
        Ok(ClientSpec::Cidr("198.19.0.0".parse().unwrap(), 24))
    );
    assert_eq!(
        "fixed:198.19.0.1,198.19.0.2".parse::<ClientSpec>(),
        Ok(ClientSpec::Fixed(vec![
            "198.19.0.1".parse().unwrap(),
            "198.19.0.2".parse().unwrap()
        ]))
    );
    assert!("198.19.0.0/33".parse::<ClientSpec>().is_err());
    assert!(
        "nonsense"
            .parse::<ClientSpec>()
            .unwrap_err()
            .contains("random")
    );
}

#[test]
fn random_clients_stay_in_their_network() {
    for r in [0, u64::MAX, 12345] {
        let ip = random_in("198.19.7.0".parse().unwrap(), 24, r);
        assert!(ip.to_string().starts_with("198.19.7."), "{ip}");
    }
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("30").is_err());
}
