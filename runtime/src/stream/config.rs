//! The `[streaming]` table of podvisord's configuration: where the CRI streaming server
//! listens and how long an idle session may stay open.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The streaming server's default address: only this host (kubelet dials it locally).
pub const DEFAULT_ADDRESS: &str = "127.0.0.1";
/// How long a session may pass no data before it is closed (containerd's
/// `stream_idle_timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// The streaming server's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamingSettings {
    /// The address to listen on.
    pub address: IpAddr,
    /// The port; 0 takes any free port.
    pub port: u16,
    /// A PEM certificate chain and key: serve HTTPS.
    pub tls: Option<TlsFiles>,
    /// A session passing no data for this long is closed.
    pub idle_timeout: Duration,
}

/// A certificate chain and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

impl Default for StreamingSettings {
    fn default() -> Self {
        Self {
            address: DEFAULT_ADDRESS
                .parse()
                .unwrap_or(IpAddr::from([127, 0, 0, 1])),
            port: 0,
            tls: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStreaming {
    address: Option<String>,
    port: Option<u16>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    /// `"4h"`, `"30m"`, `"90s"`.
    idle_timeout: Option<String>,
}

/// Why `[streaming]` is refused: the key and the reason.
pub(crate) type Invalid = (&'static str, String);

impl RawStreaming {
    /// The settings, the missing keys at their defaults.
    pub(crate) fn resolve(self) -> Result<StreamingSettings, Invalid> {
        let defaults = StreamingSettings::default();
        let address = match self.address {
            None => defaults.address,
            Some(a) => a
                .parse()
                .map_err(|_| ("streaming.address", format!("{a:?} is not an IP address")))?,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                for (k, p) in [("streaming.tls_cert", &cert), ("streaming.tls_key", &key)] {
                    if !p.is_absolute() {
                        return Err((k, format!("{} is not an absolute path", p.display())));
                    }
                }
                Some(TlsFiles { cert, key })
            }
            (Some(_), None) => return Err(("streaming.tls_key", "tls_cert needs it".into())),
            (None, Some(_)) => return Err(("streaming.tls_cert", "tls_key needs it".into())),
        };
        let idle_timeout = match self.idle_timeout {
            None => defaults.idle_timeout,
            Some(t) => humantime::parse_duration(&t)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    (
                        "streaming.idle_timeout",
                        format!("{t:?} is not a duration such as \"4h\" or \"90s\""),
                    )
                })?,
        };
        Ok(StreamingSettings {
            address,
            port: self.port.unwrap_or(defaults.port),
            tls,
            idle_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StreamingSettings, Invalid> {
        toml::from_str::<RawStreaming>(text)
            .expect("toml")
            .resolve()
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(parse("").unwrap(), StreamingSettings::default());
        let s = parse("address = \"0.0.0.0\"\nport = 10010\nidle_timeout = \"90s\"").unwrap();
        assert_eq!(s.address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(s.port, 10010);
        assert_eq!(s.idle_timeout, Duration::from_secs(90));
        assert_eq!(
            parse("idle_timeout = \"4h\"").unwrap().idle_timeout,
            DEFAULT_IDLE_TIMEOUT
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(
            parse("address = \"here\"").unwrap_err().0,
            "streaming.address"
        );
        assert_eq!(
            parse("idle_timeout = \"soon\"").unwrap_err().0,
            "streaming.idle_timeout"
        );
        assert_eq!(
            parse("idle_timeout = \"0s\"").unwrap_err().0,
            "streaming.idle_timeout"
        );
        assert_eq!(
            parse("tls_cert = \"/c.pem\"").unwrap_err().0,
            "streaming.tls_key"
        );
        assert_eq!(
            parse("tls_cert = \"c.pem\"\ntls_key = \"/k.pem\"")
                .unwrap_err()
                .0,
            "streaming.tls_cert"
        );
        assert!(toml::from_str::<RawStreaming>("prot = 1").is_err());
    }
}
