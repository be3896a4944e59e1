//! The attacker's model of a compromised ESXi host: a TLS endpoint with its own certificate (the
//! one `--send-key` pins, as a compromised host holds its own key) that answers affa's SOAP calls
//! by forwarding them to the simulator (started with plain http behind it) and rewriting the
//! answers, or by answering itself. Not a mock of ESXi: the snapshots really happen on the
//! simulator; only what the host *says* is hostile.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// Answers a call itself: (method, request body) -> Some(response body).
pub type Answer = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;
/// Rewrites a forwarded answer: (method, request body, response body) -> response body.
pub type Rewrite = Arc<dyn Fn(&str, &str, String) -> String + Send + Sync>;

pub struct Hostile {
    pub port: u16,
    /// SHA-256 of its certificate, as affa pins it.
    pub thumbprint: String,
    /// Every SOAP method called, in order.
    pub calls: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl").args(args).current_dir(dir).status().expect("openssl");
    assert!(st.success(), "openssl {args:?}");
}

/// The SOAP method of a request body: the first element inside the Body.
pub fn method_of(body: &str) -> String {
    let Some(i) = body.find("Body>") else { return String::new() };
    let rest = &body[i + 5..];
    let Some(j) = rest.find('<') else { return String::new() };
    let name: String = rest[j + 1..].chars().take_while(|c| !c.is_whitespace() && *c != '>' && *c != '/').collect();
    name.rsplit(':').next().unwrap_or("").to_string()
}

/// Text for an XML answer: `&`, `<`, `>` escaped, control characters sent raw (as a hostile
/// host would).
pub fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A SOAP envelope around a response body.
pub fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
    )
}

impl Hostile {
    /// Listen on 127.0.0.1 with a fresh self-signed certificate; forward to the simulator's
    /// plain-http SOAP port `upstream`.
    pub fn start(upstream: u16, answer: Answer, rewrite: Rewrite) -> Hostile {
        let dir = tempfile::Builder::new().prefix("affa-hostile-tls").tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
        );
        openssl(d, &["x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der"]);
        openssl(d, &["pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.der"]);
        let cert = std::fs::read(d.join("cert.der")).unwrap();
        let key = std::fs::read(d.join("key.der")).unwrap();
        let thumbprint = Sha256::digest(&cert).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(cert)],
                rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap();
        let cfg = Arc::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c2 = calls.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_nodelay(true);
                let (cfg, answer, rewrite, calls) = (cfg.clone(), answer.clone(), rewrite.clone(), c2.clone());
                std::thread::spawn(move || {
                    let Ok(server) = rustls::ServerConnection::new(cfg) else { return };
                    let tls = rustls::StreamOwned::new(server, conn);
                    let _ = serve(tls, upstream, &answer, &rewrite, &calls);
                });
            }
        });
        Hostile { port, thumbprint, calls, _dir: dir }
    }

    /// How many times `method` was called.
    pub fn count(&self, method: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|m| *m == method).count()
    }
}

/// Serve one keep-alive connection.
fn serve(
    tls: rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    upstream: u16,
    answer: &Answer,
    rewrite: &Rewrite,
    calls: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(tls);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let header = |name: &str| {
            head.iter().find_map(|h| {
                h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string())
            })
        };
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        let method = method_of(&body);
        calls.lock().unwrap().push(method.clone());
        let (status, cookies, resp) = match answer(&method, &body) {
            Some(a) => (200, Vec::new(), a),
            None => {
                let (status, cookies, resp) = forward(upstream, &head, &body)?;
                (status, cookies, rewrite(&method, &body, resp))
            }
        };
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\n",
            if status == 200 { "OK" } else { "Internal Server Error" },
            resp.len()
        );
        for c in cookies {
            out.push_str(&format!("Set-Cookie: {c}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&resp);
        let w = r.get_mut();
        w.write_all(out.as_bytes())?;
        w.flush()?;
    }
}

/// One request to the simulator (HTTP/1.0: the whole answer, then the connection closes).
fn forward(upstream: u16, head: &[String], body: &str) -> std::io::Result<(u16, Vec<String>, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut req = String::from("POST /sdk HTTP/1.0\r\n");
    for h in head.iter().skip(1) {
        let k = h.split(':').next().unwrap_or("").to_ascii_lowercase();
        if matches!(k.as_str(), "content-type" | "soapaction" | "cookie") {
            req.push_str(h);
            req.push_str("\r\n");
        }
    }
    req.push_str(&format!("Host: 127.0.0.1:{upstream}\r\nContent-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let text = String::from_utf8_lossy(&all).into_owned();
    let (h, b) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = h.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(500);
    let cookies = h
        .lines()
        .filter_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie")).map(|(_, v)| v.trim().to_string())
        })
        .collect();
    Ok((status, cookies, b.to_string()))
}
