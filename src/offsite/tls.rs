//! TLS of the offsite requests, under each request's deadline.
//!
//! ureq sets a socket's timeouts to the time a request has left only when it connects and once
//! per buffer it fills; rustls reads the socket in a loop inside one such call until the whole
//! handshake, or a whole TLS record (up to ~16 KiB), has arrived. A peer sending one byte a
//! second then kept one request alive for hours: each read only had to get one byte within the
//! unchanged timeout. Here the connection under rustls sets the time left before every read and
//! write, and fails once the deadline has passed.
//!
//! Owns: the TLS connector of the S3 agent (the same roots and protocol versions as ureq's own)
//! and the deadline of the request this thread sends ([`set_deadline`]). Must never: change what
//! is verified (ureq's default configuration, webpki roots), or let a read or write start after
//! the deadline.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use ureq::rustls;

thread_local! {
    /// The deadline of the request this thread is about to send (its connection takes it).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The deadline of the next request sent from this thread (each request makes its own
/// connection: none is kept for reuse).
pub(super) fn set_deadline(at: Instant) {
    DEADLINE.with(|d| d.set(Some(at)));
}

/// ureq's TLS, each connection under the deadline of the request that made it.
pub(super) fn connector() -> Arc<Deadlined> {
    let config = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .expect("the ring provider offers TLS 1.2 and 1.3 cipher suites")
        .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
        .with_no_client_auth();
    Arc::new(Deadlined(Arc::new(config)))
}

pub(super) struct Deadlined(Arc<rustls::ClientConfig>);

impl ureq::TlsConnector for Deadlined {
    fn connect(&self, dns_name: &str, io: Box<dyn ureq::ReadWrite>) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let deadline = DEADLINE.with(|d| d.get());
        ureq::TlsConnector::connect(&self.0, dns_name, Box::new(Guarded { inner: io, deadline }))
    }
}

/// The TCP connection under rustls: every read and write waits at most until the deadline.
#[derive(Debug)]
struct Guarded {
    inner: Box<dyn ureq::ReadWrite>,
    deadline: Option<Instant>,
}

impl Guarded {
    fn arm(&self) -> io::Result<()> {
        let (Some(at), Some(sock)) = (self.deadline, self.inner.socket()) else { return Ok(()) };
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the request's deadline has passed"));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))
    }
}

impl Read for Guarded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.inner.read(buf)
    }
}

impl Write for Guarded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl ureq::ReadWrite for Guarded {
    fn socket(&self) -> Option<&TcpStream> {
        self.inner.socket()
    }
}
