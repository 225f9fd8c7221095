//! Mutual TLS with pinned self-signed certificates (rustls with the ring provider; rcgen
//! makes the certificate). Each store keeps one key pair in `STORE/tls/` (created at first
//! use, the key 0600); a peer is known by its fingerprint, `SHA256:` and the hex SHA-256 of
//! its certificate. The primary pins the replica's fingerprint (`replica add --fingerprint`);
//! the replica accepts only primaries it was given (`serve --allow`, or the first one with
//! `--allow-first`, remembered in `STORE/tls/allowed`). No certificate authority, no names:
//! the fingerprint is the identity, as with ssh host keys.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use super::transport::Conn;
use super::ReplicaError;

/// A store's key pair and certificate.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Identity {
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

pub fn fingerprint(cert: &[u8]) -> String {
    let h = Sha256::digest(cert);
    format!("SHA256:{}", crate::keyspace::hex(&h))
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ReplicaError {
    move |source| ReplicaError::Io { what, source }
}

pub fn tls_dir(store: &Path) -> PathBuf {
    store.join("tls")
}

/// The store's identity, created at first use.
pub fn identity(store: &Path) -> Result<Identity, ReplicaError> {
    let dir = tls_dir(store);
    let (cp, kp) = (dir.join("cert.der"), dir.join("key.der"));
    if let (Ok(cert), Ok(key)) = (std::fs::read(&cp), std::fs::read(&kp)) {
        return Ok(Identity {
            cert: CertificateDer::from(cert),
            key,
        });
    }
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let made = rcgen::generate_simple_self_signed(vec!["kvfs".to_string()]).map_err(|e| {
        ReplicaError::Io {
            what: "cannot make a certificate".into(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    let key = made.key_pair.serialize_der();
    let cert = made.cert.der().to_vec();
    write_private(&kp, &key)?;
    std::fs::write(&cp, &cert).map_err(io(format!("cannot write {}", cp.display())))?;
    Ok(Identity {
        cert: CertificateDer::from(cert),
        key,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ReplicaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("cannot create {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(format!("cannot write {}", path.display())))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Io {
        what: "TLS".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Accepts exactly the certificates whose fingerprints are listed (the replica's, on the
/// primary; the allowed primaries', on the replica), then checks the handshake signatures
/// with them as rustls does.
#[derive(Debug)]
struct Pinned {
    allowed: Mutex<Vec<String>>,
    /// `--allow-first`: take the first certificate shown and remember it here.
    learn: Option<PathBuf>,
    /// Further peers accepted, kept current by the caller (a replica's satellites).
    also: Option<PeerList>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = fingerprint(cert);
        let mut allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        if allowed.iter().any(|a| a.eq_ignore_ascii_case(&fp)) {
            return Ok(());
        }
        if let Some(also) = &self.also {
            let also = also.lock().unwrap_or_else(|e| e.into_inner());
            if also.iter().any(|a| a.eq_ignore_ascii_case(&fp)) {
                return Ok(());
            }
        }
        if let (Some(path), true) = (&self.learn, allowed.is_empty()) {
            if std::fs::write(path, format!("{fp}\n")).is_ok() {
                tracing::info!(fingerprint = %fp, "allowed the first primary to connect");
                allowed.push(fp);
                return Ok(());
            }
        }
        tracing::warn!(fingerprint = %fp, "refused a peer whose certificate is not pinned");
        Err(rustls::Error::General(format!(
            "certificate {fp} is not the pinned one"
        )))
    }
}

/// The handshake-signature checks both verifier traits ask for: rustls's own, with the
/// provider's algorithms (the pin decides who, these that the peer holds the key).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }
    signature_checks!();
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }
    signature_checks!();
}

/// The primary's side: connect over `sock`, pinning the replica's `fingerprint`.
pub fn client(
    sock: TcpStream,
    addr: &str,
    fingerprint: &str,
    store: &Path,
    peer: &str,
) -> Result<Conn, ReplicaError> {
    let id = identity(store)?;
    let p = provider();
    let pin = Pinned {
        allowed: Mutex::new(vec![fingerprint.to_string()]),
        learn: None,
        also: None,
        provider: p.clone(),
    };
    let cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(pin))
        .with_client_auth_cert(vec![id.cert.clone()], id.key())
        .map_err(tls_err)?;
    let name = ServerName::try_from("kvfs").map_err(tls_err)?.to_owned();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(tls_err)?;
    let cancel = super::transport::Canceller::tcp(&sock);
    let mut stream = rustls::StreamOwned::new(conn, sock);
    // Finish the handshake now, so that a refused pin is reported as such.
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(io(format!("TLS handshake with {addr}")))?;
    }
    Ok(Conn::duplex(Box::new(stream), peer.into(), cancel))
}

/// Fingerprints a server accepts besides those it was configured with, changed while it runs.
pub type PeerList = Arc<Mutex<Vec<String>>>;

/// The replica's TLS settings: its identity, the primaries it accepts, and `also` (its
/// satellites, which `--allow-first` does not count: it learns only a first primary).
pub fn server_config(
    store: &Path,
    allow: &[String],
    allow_first: bool,
    also: Option<PeerList>,
) -> Result<Arc<rustls::ServerConfig>, ReplicaError> {
    let id = identity(store)?;
    let learned = tls_dir(store).join("allowed");
    let mut allowed: Vec<String> = allow.to_vec();
    if let Ok(s) = std::fs::read_to_string(&learned) {
        allowed.extend(s.split_whitespace().map(String::from));
    }
    let p = provider();
    let v = Pinned {
        allowed: Mutex::new(allowed),
        learn: allow_first.then_some(learned),
        also,
        provider: p.clone(),
    };
    let cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(v))
        .with_single_cert(vec![id.cert.clone()], id.key())
        .map_err(tls_err)?;
    Ok(Arc::new(cfg))
}

/// Whether `fp` is a primary the replica at `store` accepts (`allow`, or the one
/// `--allow-first` remembered), as opposed to a peer accepted as one of its satellites.
pub fn allows_primary(store: &Path, allow: &[String], fp: &str) -> bool {
    let learned = std::fs::read_to_string(tls_dir(store).join("allowed")).unwrap_or_default();
    allow
        .iter()
        .map(String::as_str)
        .chain(learned.split_whitespace())
        .any(|a| a.eq_ignore_ascii_case(fp))
}

/// The replica's side of one accepted connection.
pub fn accept(
    cfg: Arc<rustls::ServerConfig>,
    sock: TcpStream,
) -> Result<rustls::StreamOwned<rustls::ServerConnection, TcpStream>, ReplicaError> {
    let conn = rustls::ServerConnection::new(cfg).map_err(tls_err)?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(io("TLS handshake".into()))?;
    }
    Ok(stream)
}
