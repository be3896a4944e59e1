//! A misbehaving HTTP server in front of the test's RADOS Gateway (a misconfigured load balancer
//! or proxy, or an attacker on the path to the bucket): each request is handed to the test's
//! rule, which answers it itself or forwards it, unchanged, to the gateway (and may change the
//! gateway's answer), or trickles an answer that never ends ([`Response::trickle`]). The signature of a request affa signed for the front's address still
//! holds at the gateway: the request goes on byte for byte, its Host header included.
//!
//! Owns: one thread per connection, one request per connection (every answer says `Connection:
//! close`), the requests it saw. Must never: outlive the test process (its threads end with it),
//! or change a request it forwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A request as the front received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target: path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// An answer: the gateway's (forwarded) or the rule's own.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Sent one byte a second and never ended: `HTTP/1.1 200 OK`, then a header line without
    /// end (a broken or hostile proxy that keeps the request alive for ever).
    pub trickle: bool,
}

impl Response {
    pub fn new(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Response {
        Response {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.to_vec(),
            trickle: false,
        }
    }

    /// An answer sent one byte a second that never ends (until the client goes).
    pub fn trickle() -> Response {
        Response { trickle: true, ..Response::new(200, &[], b"") }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// The rule: the request and a way to forward it to the gateway; the answer to send back.
pub type Rule = dyn Fn(&Request, &dyn Fn(&Request) -> Response) -> Response + Send + Sync;

pub struct Front {
    /// `http://127.0.0.1:PORT`: the offsiteEndpoint that goes through the front.
    pub endpoint: String,
    /// Every request seen, in order.
    pub seen: Arc<Mutex<Vec<Request>>>,
}

impl Front {
    /// A front on a free port before `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(
        upstream: &str,
        rule: impl Fn(&Request, &dyn Fn(&Request) -> Response) -> Response + Send + Sync + 'static,
    ) -> Front {
        let up = upstream.strip_prefix("http://").expect("an http:// upstream").trim_end_matches('/').to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rule: Arc<Rule> = Arc::new(rule);
        let s = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (rule, up, s) = (rule.clone(), up.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &*rule, &up, &s);
                });
            }
        });
        Front { endpoint, seen }
    }

    /// The requests seen so far with this method.
    pub fn count(&self, method: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|r| r.method == method).count()
    }
}

fn serve(conn: TcpStream, rule: &Rule, up: &str, seen: &Mutex<Vec<Request>>) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let headers = read_headers(&mut r)?;
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let req = Request { method, target, headers, body };
    seen.lock().unwrap().push(req.clone());
    let forward = |q: &Request| forward(up, q).unwrap_or_else(|e| Response::new(502, &[], e.to_string().as_bytes()));
    let ans = rule(&req, &forward);
    if ans.trickle {
        let mut w = &conn;
        for b in b"HTTP/1.1 200 OK\r\nX-Trickle: ".iter().chain(std::iter::repeat(&b'a')) {
            // Ends when the client has gone (the write fails).
            w.write_all(&[*b])?;
            w.flush()?;
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    let mut out = format!("HTTP/1.1 {} X\r\n", ans.status).into_bytes();
    for (k, v) in &ans.headers {
        if !["content-length", "transfer-encoding", "connection"].contains(&k.to_ascii_lowercase().as_str()) {
            out.extend(format!("{k}: {v}\r\n").as_bytes());
        }
    }
    if req.method == "HEAD" {
        // The length of the object, no body.
        if let Some(l) = ans.header("content-length") {
            out.extend(format!("Content-Length: {l}\r\n").as_bytes());
        }
        out.extend(b"Connection: close\r\n\r\n");
    } else {
        out.extend(format!("Content-Length: {}\r\nConnection: close\r\n\r\n", ans.body.len()).as_bytes());
        out.extend(&ans.body);
    }
    let mut w = conn;
    w.write_all(&out)?;
    w.flush()
}

fn read_headers(r: &mut impl BufRead) -> std::io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(headers)
}

/// The request sent on to the gateway as it came (but `Connection: close`): its answer.
fn forward(up: &str, q: &Request) -> std::io::Result<Response> {
    let mut c = TcpStream::connect(up)?;
    let mut out = format!("{} {} HTTP/1.1\r\n", q.method, q.target).into_bytes();
    for (k, v) in &q.headers {
        if !k.eq_ignore_ascii_case("connection") {
            out.extend(format!("{k}: {v}\r\n").as_bytes());
        }
    }
    out.extend(b"Connection: close\r\n\r\n");
    out.extend(&q.body);
    c.write_all(&out)?;
    let mut r = BufReader::new(c);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(502);
    let headers = read_headers(&mut r)?;
    let mut raw = Vec::new();
    if q.method != "HEAD" {
        r.read_to_end(&mut raw)?;
    }
    let chunked =
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(&raw) } else { raw };
    Ok(Response { status, headers, body, trickle: false })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol]).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let Some(n) = size.filter(|&n| n > 0) else { break };
        let start = eol + 2;
        out.extend(&raw[start..(start + n).min(raw.len())]);
        raw = &raw[(start + n + 2).min(raw.len())..];
    }
    out
}
