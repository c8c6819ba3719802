//! The client's address, and the per-address limit on connection attempts.
//!
//! A forwarding header is believed only on connections from a configured proxy
//! (`ATLAS_TRUSTED_PROXIES`); from anywhere else the socket's peer address counts, whatever
//! the headers say. With `X-Forwarded-For` the client is the rightmost entry that is not a
//! trusted proxy (entries to its left were written by the client and prove nothing); other
//! headers (`Fly-Client-IP`, `X-Real-IP`) are single addresses that the proxy sets.
//!
//! IPv6 clients are limited per /64, the smallest block a network is usually given, so one
//! host cannot escape its limit by cycling through its own addresses. The limiter tracks at
//! most [`MAX_TRACKED`] blocks; when more are active at once than that (a distributed flood,
//! where a per-address limit protects nothing), new attempts pass unlimited rather than
//! locking everybody out, and `atlas_connect_limiter_full_total` counts them.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::config::{Config, ConfigError};

/// Addresses (IPv4) and /64 blocks (IPv6) the limiter tracks at most.
pub const MAX_TRACKED: usize = 100_000;

/// Finds the client's address of a request.
#[derive(Clone, Debug, Default)]
pub struct ClientAddr {
    header: Option<HeaderName>,
    trusted: Vec<IpNet>,
}

impl ClientAddr {
    /// From `ATLAS_CLIENT_IP_HEADER` and `ATLAS_TRUSTED_PROXIES`.
    pub fn from_config(config: &Config) -> Result<ClientAddr, ConfigError> {
        let header = match config.client_ip_header.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(h) => Some(HeaderName::try_from(h.to_ascii_lowercase()).map_err(|_| {
                ConfigError(format!(
                    "ATLAS_CLIENT_IP_HEADER is not a header name: {h:?}"
                ))
            })?),
        };
        let trusted = parse_proxies(config.trusted_proxies.as_deref().unwrap_or(""))?;
        if header.is_some() && trusted.is_empty() {
            return Err(ConfigError(
                "ATLAS_CLIENT_IP_HEADER is set but ATLAS_TRUSTED_PROXIES is not: name the \
                 addresses of the proxies that set the header (anyone else could forge it)"
                    .into(),
            ));
        }
        Ok(ClientAddr { header, trusted })
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: from the configured header when `peer` is a trusted proxy,
    /// else `peer`'s.
    pub fn resolve(&self, headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
        let peer = peer.ip().to_canonical();
        let Some(name) = &self.header else {
            return peer;
        };
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut values = headers.get_all(name).iter();
        if name == "x-forwarded-for" {
            // Every header line, in order, is one list; read it from the right.
            let mut entries = Vec::new();
            for v in headers.get_all(name) {
                let Ok(v) = v.to_str() else { return peer };
                entries.extend(v.split(','));
            }
            let mut found = None;
            for entry in entries.iter().rev() {
                let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                    // Unparseable: nothing to its left can be trusted either.
                    return found.unwrap_or(peer);
                };
                let ip = ip.to_canonical();
                found = Some(ip);
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
            return found.unwrap_or(peer);
        }
        // A single address set by the proxy; several copies are a forgery the proxy let
        // through, so only a lone one counts.
        match (values.next(), values.next()) {
            (Some(v), None) => v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical())
                .unwrap_or(peer),
            _ => peer,
        }
    }
}

fn parse_proxies(list: &str) -> Result<Vec<IpNet>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError(format!(
                        "ATLAS_TRUSTED_PROXIES: {s:?} is not an address or CIDR range"
                    ))
                })
        })
        .collect()
}

/// The key an address is limited under: IPv4 addresses alone, IPv6 per /64.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Connection attempts per client address (or IPv6 /64), with a bounded table.
pub struct ConnectLimiter {
    addr: ClientAddr,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    capacity: usize,
    /// When the full table was last pruned (pruning walks it, so at most once a second).
    last_prune: Mutex<Option<Instant>>,
}

impl ConnectLimiter {
    /// From the configuration (`ATLAS_CONNECT_RATE_PER_S`, `ATLAS_CONNECT_BURST`, and the
    /// client address settings).
    pub fn from_config(config: &Config) -> Result<ConnectLimiter, ConfigError> {
        Ok(Self::new(
            ClientAddr::from_config(config)?,
            config.connect_rate_per_s,
            config.connect_burst,
            MAX_TRACKED,
        ))
    }

    /// A limiter of `rate_per_s` attempts per second with bursts of `burst`, tracking at most
    /// `capacity` keys.
    pub fn new(addr: ClientAddr, rate_per_s: u32, burst: u32, capacity: usize) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(rate_per_s).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        ConnectLimiter {
            addr,
            limiter: RateLimiter::keyed(quota),
            capacity,
            last_prune: Mutex::new(None),
        }
    }

    /// Whether this request's client may make another connection attempt now.
    pub fn check(&self, headers: &HeaderMap, peer: SocketAddr) -> bool {
        let key = limit_key(self.addr.resolve(headers, peer));
        if self.limiter.len() >= self.capacity && !self.prune_when_full() {
            metrics::counter!("atlas_connect_limiter_full_total").increment(1);
            return true;
        }
        self.limiter.check_key(&key).is_ok()
    }

    /// Forgets the keys that are back to a full allowance.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Prunes the full table at most once a second; whether there is room afterwards.
    fn prune_when_full(&self) -> bool {
        {
            let mut last = self.last_prune.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return false;
            }
            *last = Some(Instant::now());
        }
        self.limiter.retain_recent();
        self.limiter.len() < self.capacity
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(address: &str) -> IpAddr {
        address.parse().unwrap()
    }

    fn peer(address: &str) -> SocketAddr {
        SocketAddr::new(ip(address), 40_000)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn resolver(header: &str, proxies: &str) -> ClientAddr {
        ClientAddr::from_config(&Config {
            client_ip_header: Some(header.into()),
            trusted_proxies: Some(proxies.into()),
            ..Config::default()
        })
        .unwrap()
    }

    #[test]
    fn a_header_needs_trusted_proxies() {
        let e = ClientAddr::from_config(&Config {
            client_ip_header: Some("fly-client-ip".into()),
            ..Config::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("ATLAS_TRUSTED_PROXIES"), "{e}");
        let e = ClientAddr::from_config(&Config {
            client_ip_header: Some("x-forwarded-for".into()),
            trusted_proxies: Some("10.0.0.0/8, not-an-address".into()),
            ..Config::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not-an-address"), "{e}");
    }

    #[test]
    fn headers_from_untrusted_peers_are_ignored() {
        let r = resolver("fly-client-ip", "172.16.0.0/12");
        let forged = headers(&[("fly-client-ip", "203.0.113.9")]);
        assert_eq!(r.resolve(&forged, peer("198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(r.resolve(&forged, peer("172.16.3.4")), ip("203.0.113.9"));
        // Without a header configured, only the peer counts.
        let plain = ClientAddr::default();
        assert_eq!(plain.resolve(&forged, peer("172.16.3.4")), ip("172.16.3.4"));
    }

    #[test]
    fn single_address_headers_must_be_single() {
        let r = resolver("fly-client-ip", "172.16.0.0/12");
        let twice = headers(&[
            ("fly-client-ip", "203.0.113.9"),
            ("fly-client-ip", "203.0.113.10"),
        ]);
        assert_eq!(r.resolve(&twice, peer("172.16.3.4")), ip("172.16.3.4"));
        let list = headers(&[("fly-client-ip", "203.0.113.9, 1.2.3.4")]);
        assert_eq!(r.resolve(&list, peer("172.16.3.4")), ip("172.16.3.4"));
    }

    #[test]
    fn x_forwarded_for_is_read_from_the_right() {
        let r = resolver("X-Forwarded-For", "10.0.0.0/8, 192.0.2.1");
        let cases: [(&[&str], &str); 3] = [
            // The client prepends a forged entry; the proxies appended the real one.
            (&["1.1.1.1, 203.0.113.9, 192.0.2.1"], "203.0.113.9"),
            // Split over several header lines, the order still holds.
            (&["1.1.1.1", "203.0.113.9"], "203.0.113.9"),
            // Garbage stops the walk at the last address known good.
            (&["1.1.1.1, junk, 192.0.2.1"], "192.0.2.1"),
        ];
        for (lines, client) in cases {
            let pairs: Vec<_> = lines.iter().map(|l| ("x-forwarded-for", *l)).collect();
            assert_eq!(
                r.resolve(&headers(&pairs), peer("10.1.2.3")),
                ip(client),
                "{lines:?}"
            );
        }
    }

    #[test]
    fn ipv6_is_limited_per_slash_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            limit_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap()),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            limit_key("::ffff:198.51.100.7".parse().unwrap()),
            ip("198.51.100.7")
        );
        let limiter = ConnectLimiter::new(ClientAddr::default(), 1, 3, 1000);
        let none = HeaderMap::new();
        let allowed = (0..10)
            .filter(|i| limiter.check(&none, peer(&format!("2001:db8:1:2::{i:x}"))))
            .count();
        assert_eq!(allowed, 3, "one /64 shares one burst");
        assert!(
            limiter.check(&none, peer("2001:db8:1:3::1")),
            "the next /64 is separate"
        );
    }

    #[test]
    fn forged_headers_do_not_multiply_the_allowance() {
        let limiter = ConnectLimiter::new(resolver("x-forwarded-for", "10.0.0.0/8"), 1, 3, 1000);
        let allowed = (0..20)
            .filter(|i| {
                let h = headers(&[("x-forwarded-for", &format!("203.0.113.{i}"))]);
                limiter.check(&h, peer("198.51.100.7"))
            })
            .count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn the_table_is_bounded() {
        let limiter = ConnectLimiter::new(ClientAddr::default(), 1, 2, 50);
        let none = HeaderMap::new();
        for i in 0..200u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
            limiter.check(&none, SocketAddr::new(ip, 1));
        }
        assert!(limiter.tracked() <= 50, "{}", limiter.tracked());
    }
}
