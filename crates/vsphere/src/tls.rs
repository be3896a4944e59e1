//! TLS to an ESXi host by certificate pinning: the host's self-signed certificate is trusted
//! exactly when the SHA-256 of its DER matches the thumbprint in the job config (trust on first
//! use, like ssh known_hosts).
//!
//! Owns: thumbprint parsing/formatting, the pinning `ServerCertVerifier` (which still checks the
//! handshake signatures with the crypto provider's algorithms), and `fetch_thumbprint` for
//! `affa --send-key`. Must never: accept a certificate that does not match the pin, turn
//! verification off for a connection that carries requests, or send any application data while
//! fetching a thumbprint.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Thumbprint(pub [u8; 32]);

impl Thumbprint {
    /// SHA-256 of a DER certificate.
    pub fn of_der(der: &[u8]) -> Thumbprint {
        Thumbprint(Sha256::digest(der).into())
    }

    /// Parse `AB:CD:…` (32 bytes, case-insensitive; colons, spaces or dashes between bytes
    /// optional).
    pub fn parse(s: &str) -> Result<Thumbprint> {
        let hex: String = s.chars().filter(|c| !matches!(c, ':' | ' ' | '-')).collect();
        if hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::config(
                "ESXiThumbprint looks like a SHA-1 fingerprint; affa pins the SHA-256 fingerprint \
                 (32 bytes): run `affa --send-key JOB` to show it",
            ));
        }
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::config(format!(
                "ESXiThumbprint {:?} is not a SHA-256 fingerprint (32 hex bytes separated by colons)",
                super::soap::one_line(s)
            )));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            // The string is checked ASCII hex above, so slicing by bytes is safe.
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::config("bad hex in ESXiThumbprint"))?;
        }
        Ok(Thumbprint(out))
    }
}

impl std::fmt::Display for Thumbprint {
    /// Upper-case colon-separated hex, as ESXi and browsers show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Thumbprint({self})")
    }
}

/// The certificate fingerprint seen during the last handshake (set by the verifier).
pub type Seen = Arc<Mutex<Option<Thumbprint>>>;

/// Accepts exactly the certificate whose SHA-256 matches `expected`; with `expected` = None it
/// accepts any certificate (only used by `fetch_thumbprint`, which sends nothing). Records the
/// fingerprint it saw either way.
#[derive(Debug)]
pub struct PinnedVerifier {
    expected: Option<Thumbprint>,
    seen: Seen,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = Thumbprint::of_der(end_entity.as_ref());
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(got);
        }
        match self.expected {
            None => Ok(ServerCertVerified::assertion()),
            Some(want) if want == got => Ok(ServerCertVerified::assertion()),
            Some(_) => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A rustls client config pinned to `expected` (or accepting anything when None), plus the slot
/// where the verifier records the fingerprint it saw.
pub fn client_config(expected: Option<Thumbprint>) -> Result<(Arc<ClientConfig>, Seen)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen: Seen = Arc::new(Mutex::new(None));
    let verifier = PinnedVerifier { expected, seen: seen.clone(), provider: provider.clone() };
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((Arc::new(cfg), seen))
}

pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_string()).map_err(|_| Error::new(format!("{host:?} is not a valid host name")))
}

/// Connect to `host:port`, do a TLS handshake accepting any certificate, and return the SHA-256
/// fingerprint of the certificate the host presented (`AB:CD:…`). Sends no request and no
/// credentials; meant for `affa --send-key` to show the user what to pin.
pub fn fetch_thumbprint(host: &str, port: u16, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let fail = |what: String| Error::remote(format!("cannot read the certificate of ESXi host {host}:{port}: {what}"));
    let (cfg, seen) = client_config(None)?;
    let addrs: Vec<_> = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .collect();
    let mut last = String::from("no address");
    let mut sock = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut sock = sock.ok_or_else(|| fail(last))?;
    let mut conn = rustls::ClientConnection::new(cfg, server_name(host)?).map_err(|e| fail(e.to_string()))?;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(format!("no TLS handshake within {} s", timeout.as_secs())));
        }
        sock.set_read_timeout(Some(left)).ok();
        sock.set_write_timeout(Some(left)).ok();
        let r = conn.complete_io(&mut sock);
        if seen.lock().ok().and_then(|s| *s).is_some() {
            break; // the certificate arrived: that is all we wanted
        }
        if let Err(e) = r {
            return Err(fail(e.to_string()));
        }
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    let got = seen.lock().ok().and_then(|s| *s);
    got.map(|t| t.to_string()).ok_or_else(|| fail("the host presented no certificate".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let s = "ab:CD:01:23:45:67:89:ab:cd:ef:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:10:20:30:40:50:60";
        let t = Thumbprint::parse(s).unwrap();
        assert_eq!(t.to_string(), s.to_uppercase());
        assert_eq!(Thumbprint::parse(&s.replace(':', "")).unwrap(), t);
        assert!(Thumbprint::parse("ab:cd").is_err());
        assert!(Thumbprint::parse(&"zz:".repeat(32)).is_err());
        let sha1 = "AB:CD:01:23:45:67:89:AB:CD:EF:00:11:22:33:44:55:66:77:88:99";
        assert!(Thumbprint::parse(sha1).unwrap_err().message().contains("SHA-1"));
        // multibyte garbage must not panic
        assert!(Thumbprint::parse(&"é".repeat(32)).is_err());
    }

    #[test]
    fn of_der() {
        // SHA-256("") is well known.
        assert_eq!(
            Thumbprint::of_der(b"").to_string(),
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
    }
}
