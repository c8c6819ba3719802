//! `atlas-voice healthcheck`: asks a server on this machine for `/healthz`, for container
//! health checks (the image has no shell tools for it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Arguments of `healthcheck`.
#[derive(Args)]
pub struct HealthcheckArgs {
    /// The URL to ask; by default `/healthz` on the port of ATLAS_LISTEN, on this machine.
    #[arg(long)]
    url: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 2)]
    timeout_s: u64,
    /// Configuration file (for the listen address); the environment overrides it.
    #[arg(long, env = "ATLAS_CONFIG")]
    config: Option<PathBuf>,
}

/// Where a server listening on `listen` answers on this machine: an unspecified address
/// (`0.0.0.0`, `::`) is reached through loopback.
pub fn health_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/healthz", SocketAddr::new(ip, listen.port()))
}

/// Runs the check; returns the exit code (0 healthy, 1 not).
pub async fn run(args: HealthcheckArgs) -> anyhow::Result<i32> {
    let url = match args.url {
        Some(url) => url,
        None => {
            let config = atlas_server::Config::load_unvalidated(args.config.as_deref())?;
            health_url(config.listen)
        }
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s.max(1)))
        .build()?;
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => Ok(0),
        Ok(r) => {
            eprintln!("{url}: HTTP {}", r.status());
            Ok(1)
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_asked_through_loopback() {
        for (listen, url) in [
            ("0.0.0.0:8080", "http://127.0.0.1:8080/healthz"),
            ("[::]:9000", "http://[::1]:9000/healthz"),
            ("127.0.0.1:7", "http://127.0.0.1:7/healthz"),
            ("10.1.2.3:80", "http://10.1.2.3:80/healthz"),
        ] {
            assert_eq!(health_url(listen.parse().unwrap()), url);
        }
    }
}
