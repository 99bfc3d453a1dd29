//! Endpoint syntax: `unix:PATH`, `tcp:IP:PORT`, `tcp:[IPv6]:PORT`, `vsock:CID:PORT`, `vsock:PORT`.
//!
//! TCP endpoints take IP literals only: the relay dials exactly the pinned address and never
//! asks DNS at connect time. `vsock:PORT` means any local CID and is only valid for listening.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr};

/// `VMADDR_CID_ANY`: bind on every local CID.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// Longest path a `sockaddr_un` holds (108 bytes including the terminating NUL).
pub const UNIX_PATH_MAX_BYTES: usize = 107;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Vsock { cid: u32, port: u32 },
}

impl Endpoint {
    /// Parses the endpoint syntax; the error says what is wrong without naming the flag
    /// (the caller knows which flag it came from).
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let (kind, rest) = text.split_once(':').ok_or_else(|| {
            format!("'{text}' is not an endpoint (expected unix:PATH, tcp:IP:PORT or vsock:[CID:]PORT)")
        })?;
        match kind {
            "unix" => {
                if rest.is_empty() {
                    return Err("unix: endpoint needs a path".into());
                }
                // A relative path would be resolved against whatever the working directory is
                // (/ under systemd), differently by each process that uses it.
                if !Path::new(rest).is_absolute() {
                    return Err(format!("unix path '{rest}' is relative; give an absolute path"));
                }
                if rest.len() > UNIX_PATH_MAX_BYTES {
                    return Err(format!(
                        "unix path '{rest}' is {} bytes, longer than the {UNIX_PATH_MAX_BYTES} a UNIX socket address holds",
                        rest.len()
                    ));
                }
                if rest.ends_with('/') {
                    return Err(format!("unix path '{rest}' ends in '/': it names a directory, not a socket file"));
                }
                if rest.as_bytes().contains(&0) {
                    return Err("unix path contains a NUL byte".into());
                }
                Ok(Endpoint::Unix(PathBuf::from(rest)))
            }
            "tcp" => parse_tcp(rest).map(Endpoint::Tcp),
            "vsock" => parse_vsock(rest),
            other => Err(format!("unknown endpoint kind '{other}' in '{text}' (expected unix, tcp or vsock)")),
        }
    }

    /// The socket domain and address to bind or dial.
    pub fn sockaddr(&self) -> (Domain, SockAddr) {
        match self {
            Endpoint::Unix(p) => (Domain::UNIX, SockAddr::unix(p).expect("unix path fits (checked when parsed)")),
            Endpoint::Tcp(a) => (Domain::for_address(*a), SockAddr::from(*a)),
            Endpoint::Vsock { cid, port } => (Domain::VSOCK, SockAddr::vsock(*cid, *port)),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Endpoint::Unix(_) => "unix",
            Endpoint::Tcp(_) => "tcp",
            Endpoint::Vsock { .. } => "vsock",
        }
    }
}

fn parse_tcp(rest: &str) -> Result<SocketAddr, String> {
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let (host, tail) =
            after.split_once(']').ok_or_else(|| format!("tcp address '{rest}' opens '[' without closing it"))?;
        let port = tail
            .strip_prefix(':')
            .ok_or_else(|| format!("tcp address '{rest}' has no :PORT after the IPv6 address"))?;
        (host, port)
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("tcp address '{rest}' has no :PORT"))?;
        if host.contains(':') {
            return Err(format!("tcp address '{rest}': write IPv6 addresses in brackets, like tcp:[::1]:{port}"));
        }
        (host, port)
    };
    let ip: IpAddr = host.parse().map_err(|_| {
        format!("'{host}' is not an IP address (tcp endpoints take IP literals only: the relay never asks DNS)")
    })?;
    let port: u16 = port.parse().map_err(|_| format!("'{port}' is not a TCP port (0-65535)"))?;
    Ok(SocketAddr::new(ip, port))
}

fn parse_vsock(rest: &str) -> Result<Endpoint, String> {
    let num = |what: &str, s: &str| -> Result<u32, String> {
        s.parse::<u32>().map_err(|_| format!("'{s}' is not a vsock {what} (0-4294967295)"))
    };
    match rest.split_once(':') {
        Some((cid, port)) => Ok(Endpoint::Vsock { cid: num("CID", cid)?, port: num("port", port)? }),
        None => Ok(Endpoint::Vsock { cid: VSOCK_CID_ANY, port: num("port", rest)? }),
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Vsock { cid: VSOCK_CID_ANY, port } => write!(f, "vsock:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(
            Endpoint::parse("unix:/run/kvmi/one-7.sock").unwrap(),
            Endpoint::Unix("/run/kvmi/one-7.sock".into())
        );
        assert_eq!(Endpoint::parse("tcp:127.0.0.1:7").unwrap(), Endpoint::Tcp("127.0.0.1:7".parse().unwrap()));
        assert_eq!(Endpoint::parse("tcp:[::1]:7").unwrap(), Endpoint::Tcp("[::1]:7".parse().unwrap()));
        assert_eq!(Endpoint::parse("vsock:3:1").unwrap(), Endpoint::Vsock { cid: 3, port: 1 });
        assert_eq!(Endpoint::parse("vsock:9999").unwrap(), Endpoint::Vsock { cid: VSOCK_CID_ANY, port: 9999 });
    }

    #[test]
    fn display_round_trips() {
        for text in ["unix:/a/b", "tcp:10.0.0.1:80", "tcp:[::1]:7", "vsock:3:1", "vsock:5"] {
            assert_eq!(Endpoint::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn refuses_bad_input_with_a_reason() {
        for (text, needle) in [
            ("tcp:localhost:7", "never asks DNS"),
            ("tcp:127.0.0.1", "no :PORT"),
            ("tcp:127.0.0.1:70000", "not a TCP port"),
            ("tcp:::1:7", "brackets"),
            ("tcp:[::1:7", "without closing"),
            ("vsock:x:1", "not a vsock CID"),
            ("unix:", "needs a path"),
            ("unix:relay.sock", "unix path 'relay.sock' is relative"),
            ("unix:./run/r.sock", "is relative"),
            ("udp:1.2.3.4:5", "unknown endpoint kind"),
            ("/tmp/sock", "not an endpoint"),
        ] {
            let err = Endpoint::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let long = format!("unix:/{}", "x".repeat(200));
        assert!(Endpoint::parse(&long).unwrap_err().contains("longer than"));
    }
}
