//! How a primary reaches a replica: a child process speaking the protocol on its stdio
//! (`exec:` any command, `ssh://` through ssh, which authenticates), or `tcp://` with mutual
//! TLS and pinned certificates ([`super::tls`]).

use std::io::{Read, Write};

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::ReplicaError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    /// `exec:COMMAND ARGS...`, split on whitespace.
    Exec(Vec<String>),
    /// `ssh://[user@]host[:port]/path`: runs `kvfs serve --stdio /path` there.
    Ssh {
        host: String,
        port: Option<u16>,
        path: String,
    },
    /// `tcp://host:port`.
    Tcp(String),
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, ReplicaError> {
        let bad = |reason: &str| ReplicaError::BadUrl {
            url: s.into(),
            reason: reason.into(),
        };
        if let Some(cmd) = s.strip_prefix("exec:") {
            let argv: Vec<String> = cmd.split_whitespace().map(String::from).collect();
            if argv.is_empty() {
                return Err(bad("exec: needs a command"));
            }
            return Ok(Url::Exec(argv));
        }
        if let Some(rest) = s.strip_prefix("ssh://") {
            let (hostport, path) = rest
                .split_once('/')
                .ok_or_else(|| bad("ssh://HOST/PATH needs a path"))?;
            if hostport.is_empty() || path.is_empty() {
                return Err(bad("ssh://HOST/PATH needs a host and a path"));
            }
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p.parse().map_err(|_| bad("bad port"))?)),
                None => (hostport.to_string(), None),
            };
            return Ok(Url::Ssh {
                host,
                port,
                path: format!("/{path}"),
            });
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            if !addr.contains(':') {
                return Err(bad("tcp://HOST:PORT needs a port"));
            }
            return Ok(Url::Tcp(addr.trim_end_matches('/').into()));
        }
        Err(bad("use exec:COMMAND, ssh://HOST/PATH or tcp://HOST:PORT"))
    }
}

/// Both directions of a connection.
pub trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// An open connection, and the child process behind it if any (killed when the connection is
/// dropped).
pub struct Conn {
    pub io: Box<dyn Duplex>,
    pub child: Option<Child>,
    pub peer: String,
    cancel: Canceller,
}

/// Cuts a connection from another thread (a blocked read then fails at once).
#[derive(Clone)]
pub struct Canceller(std::sync::Arc<dyn Fn() + Send + Sync>);

impl Canceller {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Canceller {
        Canceller(std::sync::Arc::new(f))
    }

    pub fn cancel(&self) {
        (self.0)()
    }

    pub fn tcp(sock: &std::net::TcpStream) -> Canceller {
        let s = sock.try_clone().ok();
        Canceller(std::sync::Arc::new(move || {
            if let Some(s) = &s {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }))
    }
}

impl Conn {
    pub fn duplex(io: Box<dyn Duplex>, peer: String, cancel: Canceller) -> Conn {
        Conn {
            io,
            child: None,
            peer,
            cancel,
        }
    }

    pub fn canceller(&self) -> Canceller {
        self.cancel.clone()
    }
}

/// A child's stdout and (buffered) stdin as one stream.
pub struct Pipes<R, W: Write> {
    pub out: R,
    pub inp: std::io::BufWriter<W>,
}

impl<R: Read, W: Write> Read for Pipes<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.out.read(buf)
    }
}

impl<R, W: Write> Write for Pipes<R, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inp.flush()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(argv: &[String], peer: String) -> Result<Conn, ReplicaError> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| ReplicaError::Io {
            what: format!("cannot start {:?}", argv[0]),
            source,
        })?;
    let io = Box::new(Pipes {
        out: child.stdout.take().expect("piped"),
        inp: std::io::BufWriter::with_capacity(256 << 10, child.stdin.take().expect("piped")),
    });
    let pid = child.id() as libc::pid_t;
    Ok(Conn {
        io,
        child: Some(child),
        peer,
        // SAFETY: kill(2) on the child's pid; until the Conn is dropped (and waits for it)
        // the pid cannot be reused.
        cancel: Canceller(std::sync::Arc::new(move || unsafe {
            libc::kill(pid, libc::SIGKILL);
        })),
    })
}

/// The ssh command line: `$KVFS_SSH` (default `ssh`, split on whitespace, so options such as
/// `-i KEY -o StrictHostKeyChecking=accept-new` fit) and the remote kvfs, `$KVFS_REMOTE_KVFS`
/// (default `kvfs`).
pub fn ssh_argv(host: &str, port: Option<u16>, path: &str) -> Vec<String> {
    let ssh = std::env::var("KVFS_SSH").unwrap_or_else(|_| "ssh".into());
    let remote = std::env::var("KVFS_REMOTE_KVFS").unwrap_or_else(|_| "kvfs".into());
    let mut argv: Vec<String> = ssh.split_whitespace().map(String::from).collect();
    if let Some(p) = port {
        argv.extend(["-p".into(), p.to_string()]);
    }
    argv.extend([
        "-o".into(),
        "BatchMode=yes".into(),
        host.into(),
        remote,
        "serve".into(),
        "--stdio".into(),
        path.into(),
    ]);
    argv
}

/// How long a TCP connection attempt may take (a host that drops packets would otherwise
/// hold the caller for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn connect_tcp(addr: &str) -> std::io::Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for a in addr.to_socket_addrs()? {
        match std::net::TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connect to `url`. `fingerprint` pins the replica's certificate over TCP.
pub fn connect(
    url: &str,
    fingerprint: Option<&str>,
    identity: &std::path::Path,
) -> Result<Conn, ReplicaError> {
    match Url::parse(url)? {
        Url::Exec(argv) => spawn(&argv, url.into()),
        Url::Ssh { host, port, path } => spawn(&ssh_argv(&host, port, &path), url.into()),
        Url::Tcp(addr) => {
            let fp = fingerprint.ok_or_else(|| ReplicaError::BadUrl {
                url: url.into(),
                reason: "tcp:// needs the replica's --fingerprint".into(),
            })?;
            let sock = connect_tcp(&addr).map_err(|source| ReplicaError::Io {
                what: format!("cannot connect to {addr}"),
                source,
            })?;
            let _ = sock.set_nodelay(true);
            let _ = sock.set_read_timeout(Some(Duration::from_secs(120)));
            let _ = sock.set_write_timeout(Some(Duration::from_secs(120)));
            super::tls::client(sock, &addr, fp, identity, url)
        }
    }
}
