//! NBD URIs in QEMU's forms: `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default) and
//! `nbd+unix:///EXPORT?socket=PATH` (a unix socket). An empty export is the server's default.

use pvkit_protocol::nbd::DEFAULT_PORT;
use std::path::PathBuf;

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// Not one of the two forms.
    #[error("'{0}' is not nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")]
    Form(String),
    /// A port that is not a number from 1 to 65535.
    #[error("'{0}': the port is not a number from 1 to 65535")]
    Port(String),
    /// An export name longer than the protocol allows (4096 bytes).
    #[error("'{0}': the export name is longer than 4096 bytes")]
    ExportName(String),
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP: host and port.
    Tcp(String, u16),
    /// A unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: Address,
    /// The export's name.
    pub export: String,
}

/// The longest export name the protocol allows.
const MAX_EXPORT_NAME: usize = 4096;

impl std::str::FromStr for NbdUri {
    type Err = UriError;

    fn from_str(text: &str) -> Result<NbdUri, UriError> {
        let form = || UriError::Form(text.to_string());
        let uri = if let Some(rest) = text.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(form)?;
            let export = path.strip_prefix('/').ok_or_else(form)?;
            let socket =
                query.strip_prefix("socket=").filter(|s| !s.is_empty() && !s.contains('&')).ok_or_else(form)?;
            NbdUri { address: Address::Unix(PathBuf::from(socket)), export: export.to_string() }
        } else if let Some(rest) = text.strip_prefix("nbd://") {
            let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                    let port =
                        port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| UriError::Port(text.into()))?;
                    (host, port)
                }
                _ => (authority, DEFAULT_PORT),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || export.contains('?') {
                return Err(form());
            }
            NbdUri { address: Address::Tcp(host.to_string(), port), export: export.to_string() }
        } else {
            return Err(form());
        };
        if uri.export.len() > MAX_EXPORT_NAME {
            return Err(UriError::ExportName(text.to_string()));
        }
        Ok(uri)
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.address {
            Address::Tcp(host, port) => write!(f, "nbd://{host}:{port}/{}", self.export),
            Address::Unix(path) => write!(f, "nbd+unix:///{}?socket={}", self.export, path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NbdUri, UriError> {
        text.parse()
    }

    #[test]
    fn both_forms_parse() {
        let tcp = parse("nbd://127.0.0.1:10900/disk").unwrap();
        assert_eq!(tcp, NbdUri { address: Address::Tcp("127.0.0.1".into(), 10900), export: "disk".into() });
        let default_port = parse("nbd://storage.example").unwrap();
        assert_eq!(default_port.address, Address::Tcp("storage.example".into(), DEFAULT_PORT));
        assert_eq!(default_port.export, "");
        assert_eq!(parse("nbd://[::1]:99/x").unwrap().address, Address::Tcp("::1".into(), 99));
        let unix = parse("nbd+unix:///vm1?socket=/run/nbd.sock").unwrap();
        assert_eq!(unix, NbdUri { address: Address::Unix("/run/nbd.sock".into()), export: "vm1".into() });
        assert_eq!(parse("nbd+unix:///?socket=/s").unwrap().export, "");
    }

    #[test]
    fn other_forms_are_refused() {
        for bad in ["http://x/y", "nbd:///x", "nbd+unix:///x", "nbd+unix:///x?sock=/s", "nbd://h/x?y=1"] {
            assert!(matches!(parse(bad), Err(UriError::Form(_))), "{bad}");
        }
        assert!(matches!(parse("nbd://h:0/x"), Err(UriError::Port(_))));
        assert!(matches!(parse("nbd://h:99999/x"), Err(UriError::Port(_))));
        let long = format!("nbd://h/{}", "e".repeat(5000));
        assert!(matches!(parse(&long), Err(UriError::ExportName(_))));
    }
}
