//! An S3 bucket prefix as affa uses it: PUT, GET, HEAD, DELETE and LIST of objects below
//! `offsiteTarget`'s prefix, signed by `rusty-s3` (presigned URLs, AWS Signature V4) and sent
//! with the ureq client affa already uses; transport errors, HTTP 5xx and 429 are retried with a
//! backoff. Every request has a deadline (`offsiteTimeout` plus the bytes it moves at
//! `transport::LEAST_RATE`), whatever the pauses between its bytes: ureq's overall timeout
//! bounds the connection and every read of the answer, the body goes out in pieces none of
//! which starts after it, and each request has a connection of its own (ureq clears the
//! socket's timeouts of a connection it keeps for reuse, and writes the next request on it
//! without any). Only a 2xx answer is a success (a HEAD: 200 exists, 404 absent); no redirect is
//! followed (a PUT answered 307 stored nothing). An object larger than [`PART`] goes up as a
//! multipart upload (parts of [`PART`] bytes, each retried on its own; a failed one aborts the
//! upload so no part is left behind).
//!
//! Owns: the credentials file (read with its checks), the endpoint and bucket of a job, object
//! keys (prefix + name), and one request per call. Must never: send the credentials' secret
//! (only signatures leave the box), follow a redirect, take an answer that is not 2xx for done,
//! make a URL of a name with an empty, `.` or `..` part, send a request without a deadline, read
//! an answer body without a bound or past its request's deadline, list without end (a
//! continuation token that is empty or repeats one is refused, the names and pages of a listing
//! are bounded: [`MAX_LISTED`], [`MAX_PAGES`]), return a listed name twice, or print.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use crate::config::typed::Offsite;
use crate::error::{Error, Result};

/// How long a signed request stays valid (it is sent right away).
const SIGN_FOR: Duration = Duration::from_secs(3600);
/// The largest object affa reads back (an index of a very big archive).
pub const MAX_OBJECT: u64 = 1 << 32;
/// The most bytes of one page of a listing read (S3 sends at most 1000 names a page, about
/// 300 KB with affa's names; keys of 1024 bytes would make about 1.3 MB).
const MAX_LIST_PAGE: u64 = 8 << 20;
/// A request body goes to the connection in pieces of at most this many bytes, none started
/// after the request's deadline (ureq writes each piece whole, each write waiting at most the
/// time the deadline had left when the connection was made).
const PIECE: usize = 4096;
/// Objects larger than this are uploaded in parts of this size (S3 allows parts of 5 MiB to
/// 5 GiB, at most 10000 of them; only the last may be smaller): in practice the index of a very
/// large archive, or the chunk objects of `chunkSize=16M` with compression that did not help.
const PART: usize = 16 << 20;
/// The most parts S3 takes for one object (a larger object gets larger parts).
const MAX_PARTS: usize = 10_000;
/// The most names one listing takes and the most answers (pages) it asks for: a gateway that
/// lists without end, a new continuation token each time, is refused past them. 20 million
/// objects are 20 TiB of chunk objects at the default chunkSize=1M (about 3 GB of memory for the
/// listing); 100 000 pages are the 20 million names in pages of 200 (S3 and RADOS Gateway send
/// 1000 a page).
const MAX_LISTED: usize = 20_000_000;
const MAX_PAGES: usize = 100_000;
/// Attempts of a request that failed in a way worth retrying (1, 2, 4, 8 and 16 s apart: a
/// gateway restarted within about half a minute loses no upload).
const ATTEMPTS: u32 = 6;

/// The credentials file (`offsiteCredentialsFile`): `accessKey=...` and `secretKey=...` lines,
/// `#` comments and blank lines allowed.
pub fn read_credentials(path: &Path, job: &str) -> Result<Credentials> {
    let what = format!("offsiteCredentialsFile of job {job}");
    let Some(text) = super::crypt::read_private(path, &what)? else {
        bail!(
            Config,
            "{what} {} does not exist; expected a file (mode 0600) with the lines accessKey=... and secretKey=...",
            path.display()
        );
    };
    let (mut access, mut secret) = (None, None);
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match l.split_once('=') {
            Some(("accessKey", v)) if access.is_none() && !v.trim().is_empty() => access = Some(v.trim().to_string()),
            Some(("secretKey", v)) if secret.is_none() && !v.trim().is_empty() => secret = Some(v.trim().to_string()),
            _ => bail!(
                Config,
                "{what} {} has the line '{}'; expected only accessKey=... and secretKey=..., each once",
                path.display(),
                l.split('=').next().unwrap_or("").chars().take(40).collect::<String>()
            ),
        }
    }
    match (access, secret) {
        (Some(a), Some(s)) => Ok(Credentials::new(a, s)),
        _ => bail!(Config, "{what} {} lacks accessKey=... or secretKey=...; expected both lines", path.display()),
    }
}

/// A job's bucket prefix (a clone shares its offsiteBwLimit count: the heartbeat of an upload's
/// marker writes through one).
#[derive(Clone)]
pub struct Store {
    bucket: Bucket,
    creds: Credentials,
    prefix: String,
    agent: ureq::Agent,
    /// offsiteTimeout: the floor of each request's deadline.
    timeout: Duration,
    /// offsiteBwLimit: bytes per second and (when the first PUT started, bytes sent since).
    pace: Option<(u64, Arc<Mutex<Option<Paced>>>)>,
    /// `s3://BUCKET/PREFIX` for messages.
    pub shown: String,
    /// The endpoint's URL (scheme, host, port) for messages.
    endpoint: String,
}

/// offsiteBwLimit's count: when the first PUT started, the bytes PUT since.
type Paced = (Instant, u64);

/// A request's body as ureq reads it: pieces of at most [`PIECE`] bytes, and an error (TimedOut)
/// instead of the next piece once the request's deadline `until` has passed.
struct Body<'a> {
    data: &'a [u8],
    until: Instant,
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.data.is_empty() {
            return Ok(0);
        }
        if Instant::now() >= self.until {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the request's deadline passed"));
        }
        let n = buf.len().min(PIECE).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// An object of a listing.
pub struct Listed {
    /// Its name below the prefix.
    pub name: String,
    /// Its LastModified (None when the bucket sent something that is no RFC 3339 time).
    pub modified: Option<DateTime<Utc>>,
    /// Its size in bytes.
    pub size: u64,
}

/// How a request ended.
enum Outcome {
    Done(Box<ureq::Response>),
    NotFound,
}

impl Store {
    pub fn open(off: &Offsite, job: &str) -> Result<Store> {
        let creds = read_credentials(&off.credentials_file, job)?;
        let (endpoint, style) = if off.endpoint.is_empty() {
            (format!("https://s3.{}.amazonaws.com", off.region), UrlStyle::VirtualHost)
        } else {
            (off.endpoint.clone(), UrlStyle::Path)
        };
        let bad = |e: &dyn std::fmt::Display| {
            Error::config(format!("offsiteEndpoint of job {job} is '{endpoint}': {e}; expected http(s)://HOST[:PORT]"))
        };
        let url = url::Url::parse(&endpoint).map_err(|e| bad(&e))?;
        let shown_endpoint = url.origin().ascii_serialization();
        let bucket = Bucket::new(url, style, off.bucket.clone(), off.region.clone()).map_err(|e| bad(&e))?;
        // No idle timeouts: each request sets its overall one (`Store::request`), which ureq
        // applies to the connection and every read and write of it. No connection is kept for
        // another request: ureq clears the timeouts of a kept one, and would send the next
        // request on it with none (a gateway that stops reading would hold it for ever).
        let agent = ureq::AgentBuilder::new()
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            // A redirect is an answer like any other (an error below): followed, a PUT answered
            // 307/308 would come back as done with nothing stored, a 301 would turn into a GET.
            .redirects(0)
            // Every read and write of a TLS connection under the request's deadline (ureq's own
            // bounds only the reads it makes itself: crate::offsite::tls).
            .tls_connector(super::tls::connector())
            .build();
        let pace = (off.bw_limit_kib > 0).then(|| (off.bw_limit_kib * 1024, Arc::new(Mutex::new(None))));
        Ok(Store {
            bucket,
            creds,
            prefix: off.prefix.clone(),
            agent,
            timeout: off.timeout,
            pace,
            shown: off.target.clone(),
            endpoint: shown_endpoint,
        })
    }

    /// The key of the object `name`, which becomes the path of a URL: refused unless each of
    /// its `/`-separated parts is a non-empty run of letters, digits, `-`, `_` and `.` other than
    /// `.` and `..` (the URL would lose a dot segment, and with it the directory the name seems
    /// to be in: `c/../i/...` names an index, `../../BUCKET/...` another bucket).
    fn key(&self, name: &str) -> Result<String> {
        let part_ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        };
        if !name.split('/').all(part_ok) {
            return Err(Error::remote(format!(
                "{}: refusing the object name '{}'; expected parts of letters, digits, '-', '_' and '.' (no empty, '.' or '..' part)",
                self.shown,
                super::shown_name(name)
            )));
        }
        Ok(self.list_prefix(name))
    }

    /// The prefix of a listing of the names that start with `under` (a query parameter: never
    /// a URL path).
    fn list_prefix(&self, under: &str) -> String {
        if self.prefix.is_empty() {
            under.to_string()
        } else {
            format!("{}/{under}", self.prefix)
        }
    }

    /// The deadline of a request that moves `bytes` (sent or received): offsiteTimeout plus
    /// their time at [`crate::transport::LEAST_RATE`].
    fn limit(&self, bytes: u64) -> Duration {
        crate::transport::deadline(self.timeout, bytes)
    }

    /// A request of `method` to the signed `url` that must end within `limit` (ureq's overall
    /// timeout: the connection, the request, every read of the answer).
    fn request(&self, method: &str, url: &url::Url, limit: Duration) -> ureq::Request {
        super::tls::set_deadline(Instant::now() + limit);
        self.agent.request(method, url.as_str()).timeout(limit)
    }

    /// Send `req` with `body` (Content-Length set), fed in pieces none of which starts after
    /// `limit` from now.
    fn send_body(
        req: ureq::Request,
        body: &[u8],
        limit: Duration,
    ) -> std::result::Result<ureq::Response, Box<ureq::Error>> {
        let until = Instant::now() + limit;
        req.set("Content-Length", &body.len().to_string()).send(Body { data: body, until }).map_err(Box::new)
    }

    /// What a request that ran past its deadline `limit` says.
    fn late(&self, limit: Duration) -> String {
        format!(
            "endpoint {}: timed out: the request did not finish within its deadline of {} s (offsiteTimeout={} s plus 1 s per 256 KiB it moves)",
            self.endpoint,
            limit.as_secs(),
            self.timeout.as_secs()
        )
    }

    /// An answer's body that could not be read: past the request's deadline ureq says TimedOut
    /// (the deadline is the only timeout a request has).
    fn read_failed(&self, what: &str, e: &std::io::Error, limit: Duration) -> Error {
        if e.kind() == std::io::ErrorKind::TimedOut {
            Error::remote(format!("{}: {what}: {}", self.shown, self.late(limit)))
        } else {
            Error::remote(format!("{}: {what}: {e}", self.shown))
        }
    }

    /// Send a request (signed anew for each attempt by `send`) that must end within `limit`,
    /// retrying transport errors (a request past its deadline too), 5xx and 429; a 2xx answer is
    /// [`Outcome::Done`], 404 [`Outcome::NotFound`], any other status (a redirect too: none is
    /// followed) an error naming it.
    fn call(
        &self,
        what: &str,
        limit: Duration,
        send: impl Fn() -> std::result::Result<ureq::Response, Box<ureq::Error>>,
    ) -> Result<Outcome> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let retry = match send().map_err(|e| *e) {
                Ok(r) if (200..300).contains(&r.status()) => return Ok(Outcome::Done(Box::new(r))),
                Ok(r) => return Err(Error::remote(format!("{}: {what}: {}", self.shown, not_done(r.status())))),
                Err(ureq::Error::Status(404, _)) => return Ok(Outcome::NotFound),
                Err(ureq::Error::Status(code, r)) => {
                    let mut body = String::new();
                    let _ = r.into_reader().take(4096).read_to_string(&mut body);
                    let s3code = body
                        .split("<Code>")
                        .nth(1)
                        .and_then(|t| t.split('<').next())
                        .map(|c| format!(" {c}"))
                        .unwrap_or_default();
                    let msg = format!("{}: {what}: HTTP {code}{s3code}", self.shown);
                    if code >= 500 || code == 429 {
                        msg
                    } else {
                        return Err(Error::remote(msg));
                    }
                }
                Err(ureq::Error::Transport(_)) if started.elapsed() >= limit => {
                    format!("{}: {what}: {}", self.shown, self.late(limit))
                }
                Err(ureq::Error::Transport(t)) => format!("{}: {what}: {}", self.shown, self.transport(&t)),
            };
            if attempt >= ATTEMPTS {
                return Err(Error::remote(format!("{retry} (after {ATTEMPTS} attempts)")));
            }
            std::thread::sleep(Duration::from_secs(1 << (attempt - 1)));
        }
    }

    /// A transport error (no answer) naming the endpoint, never the request's URL (a signed URL
    /// would let whoever reads the message repeat the request while it is valid).
    fn transport(&self, t: &ureq::Transport) -> String {
        let mut m = format!("endpoint {}: {}", self.endpoint, t.kind());
        if let Some(msg) = t.message() {
            m.push_str(&format!(": {msg}"));
        }
        if let Some(src) = std::error::Error::source(t) {
            m.push_str(&format!(": {src}"));
        }
        m
    }

    /// offsiteBwLimit: wait until the bytes PUT so far, `n` more included, fit the limit
    /// (averaged since the first PUT; shared by the parallel senders).
    fn pace(&self, n: u64) {
        let Some((rate, state)) = &self.pace else { return };
        let due = {
            let Ok(mut s) = state.lock() else { return };
            let (start, sent) = s.get_or_insert((Instant::now(), 0));
            *sent += n;
            *start + Duration::from_secs_f64(*sent as f64 / *rate as f64)
        };
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }

    /// Write the object `name` (below the prefix): one PUT, or a multipart upload for an object
    /// larger than [`PART`].
    pub fn put(&self, name: &str, body: &[u8]) -> Result<()> {
        self.pace(body.len() as u64);
        let key = self.key(name)?;
        #[cfg(feature = "test-hooks")]
        let hooked = test_hooks::refuse(name);
        #[cfg(not(feature = "test-hooks"))]
        let hooked = None::<String>;
        let part = part_size();
        if body.len() > part {
            return self.put_parts(name, &key, body, part.max(body.len().div_ceil(MAX_PARTS)));
        }
        let url = || self.bucket.put_object(Some(&self.creds), &key).sign(SIGN_FOR);
        let limit = self.limit(body.len() as u64);
        let req = || {
            let r = self.request("PUT", &url(), limit);
            // The test hook: a Content-MD5 that does not match, which the gateway refuses.
            match &hooked {
                Some(md5) => r.set("Content-MD5", md5),
                None => r,
            }
        };
        match self.call(&format!("PUT {name}"), limit, || Self::send_body(req(), body, limit))? {
            Outcome::Done(_) => Ok(()),
            Outcome::NotFound => {
                Err(Error::remote(format!("{}: PUT {name}: HTTP 404 (does the bucket exist?)", self.shown)))
            }
        }
    }

    /// A multipart upload of `body` to `key` in parts of `part` bytes; aborted when a part (after
    /// its retries) or the completion fails.
    fn put_parts(&self, name: &str, key: &str, body: &[u8], part: usize) -> Result<()> {
        let count = body.len().div_ceil(part);
        let what = format!("POST {name} (a multipart upload of {count} parts)");
        let create = || self.bucket.create_multipart_upload(Some(&self.creds), key).sign(SIGN_FOR);
        let limit = self.limit(0);
        let r = match self.call(&what, limit, || self.request("POST", &create(), limit).call().map_err(Box::new))? {
            Outcome::Done(r) => r,
            Outcome::NotFound => {
                return Err(Error::remote(format!("{}: {what}: HTTP 404 (does the bucket exist?)", self.shown)))
            }
        };
        let answer = self.small_body(*r, &what, limit)?;
        let created = CreateMultipartUpload::parse_response(&answer).map_err(|e| {
            Error::remote(format!("{}: {what}: an answer that is no CreateMultipartUpload result: {e}", self.shown))
        })?;
        let id = created.upload_id();
        let sent = self
            .send_parts(name, key, id, body, part)
            .and_then(|etags| self.complete(name, key, id, &etags, body.len() as u64));
        if sent.is_err() {
            // Best effort (one attempt): a gateway that is gone keeps the parts until its own
            // expiry of incomplete uploads (docs/OPERATIONS.md).
            let url = self.bucket.abort_multipart_upload(Some(&self.creds), key, id).sign(SIGN_FOR);
            let _ = self.request("DELETE", &url, self.limit(0)).call();
        }
        sent
    }

    /// The parts of a multipart upload, each retried on its own: their ETags in order.
    fn send_parts(&self, name: &str, key: &str, id: &str, body: &[u8], part: usize) -> Result<Vec<String>> {
        let count = body.len().div_ceil(part);
        let mut etags = Vec::with_capacity(count);
        for (i, piece) in body.chunks(part).enumerate() {
            let n = u16::try_from(i + 1).map_err(|_| Error::new(format!("{name}: more than {MAX_PARTS} parts")))?;
            let what = format!("PUT {name} (part {n} of {count})");
            let url = || self.bucket.upload_part(Some(&self.creds), key, n, id).sign(SIGN_FOR);
            #[cfg(feature = "test-hooks")]
            let hooked = test_hooks::refuse_part(n);
            #[cfg(not(feature = "test-hooks"))]
            let hooked = None::<String>;
            let limit = self.limit(piece.len() as u64);
            let req = || {
                let r = self.request("PUT", &url(), limit);
                match &hooked {
                    Some(md5) => r.set("Content-MD5", md5),
                    None => r,
                }
            };
            let r = match self.call(&what, limit, || Self::send_body(req(), piece, limit))? {
                Outcome::Done(r) => r,
                Outcome::NotFound => {
                    return Err(Error::remote(format!("{}: {what}: HTTP 404 (the upload is gone)", self.shown)))
                }
            };
            let etag = r.header("ETag").filter(|e| !e.is_empty() && e.len() <= 200).ok_or_else(|| {
                Error::remote(format!("{}: {what}: the answer has no ETag; expected one per part", self.shown))
            })?;
            etags.push(etag.to_string());
            crate::interrupt::crash_point("offsite-part-uploaded");
        }
        Ok(etags)
    }

    /// CompleteMultipartUpload of an object of `size` bytes; an error the gateway sends in a
    /// `200 OK` answer is an error too. Its deadline counts the whole object's bytes: the
    /// gateway puts them together before it answers (S3 may take minutes, sending spaces).
    fn complete(&self, name: &str, key: &str, id: &str, etags: &[String], size: u64) -> Result<()> {
        let what = format!("POST {name} (completing a multipart upload of {} parts)", etags.len());
        let action =
            || self.bucket.complete_multipart_upload(Some(&self.creds), key, id, etags.iter().map(String::as_str));
        let xml = action().body();
        let limit = self.limit(size + xml.len() as u64);
        let r = match self.call(&what, limit, || {
            let req = self.request("POST", &action().sign(SIGN_FOR), limit).set("Content-Type", "application/xml");
            Self::send_body(req, xml.as_bytes(), limit)
        })? {
            Outcome::Done(r) => r,
            Outcome::NotFound => {
                return Err(Error::remote(format!("{}: {what}: HTTP 404 (the upload is gone)", self.shown)))
            }
        };
        let answer = self.small_body(*r, &what, limit)?;
        if answer.contains("<Error>") {
            let code = answer.split("<Code>").nth(1).and_then(|t| t.split('<').next()).unwrap_or("unknown");
            return Err(Error::remote(format!(
                "{}: {what}: the gateway answered error {}",
                self.shown,
                code.chars().take(60).collect::<String>()
            )));
        }
        Ok(())
    }

    /// An answer's body, at most 1 MiB, read within its request's deadline `limit`.
    fn small_body(&self, r: ureq::Response, what: &str, limit: Duration) -> Result<String> {
        let mut s = String::new();
        r.into_reader().take(1 << 20).read_to_string(&mut s).map_err(|e| self.read_failed(what, &e, limit))?;
        Ok(s)
    }

    /// The object `name` if it is at most `max` bytes (a larger one is an error), None when it
    /// does not exist. The request's deadline counts `max` bytes: give the object's size where
    /// it is known (a listing says it), a bound of its kind where not.
    pub fn get_at_most(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let key = self.key(name)?;
        let url = || self.bucket.get_object(Some(&self.creds), &key).sign(SIGN_FOR);
        let what = format!("GET {name}");
        let limit = self.limit(max);
        match self.call(&what, limit, || self.request("GET", &url(), limit).call().map_err(Box::new))? {
            Outcome::NotFound => Ok(None),
            Outcome::Done(r) => {
                let mut v = Vec::new();
                r.into_reader().take(max + 1).read_to_end(&mut v).map_err(|e| self.read_failed(&what, &e, limit))?;
                if v.len() as u64 > max {
                    // Not an object of the kind asked for (or not the size the listing said).
                    return Err(Error::damaged(format!("{}: {what}: larger than {max} bytes", self.shown)));
                }
                Ok(Some(v))
            }
        }
    }

    /// Whether the object `name` exists (HEAD: 200 it does, 404 it does not, anything else is
    /// an error).
    pub fn exists(&self, name: &str) -> Result<bool> {
        let key = self.key(name)?;
        let url = || self.bucket.head_object(Some(&self.creds), &key).sign(SIGN_FOR);
        let what = format!("HEAD {name}");
        let limit = self.limit(0);
        match self.call(&what, limit, || self.request("HEAD", &url(), limit).call().map_err(Box::new))? {
            Outcome::NotFound => Ok(false),
            Outcome::Done(r) if r.status() == 200 => Ok(true),
            Outcome::Done(r) => Err(Error::remote(format!(
                "{}: {what}: HTTP {}; expected 200 (the object exists) or 404 (it does not)",
                self.shown,
                r.status()
            ))),
        }
    }

    /// The names (below the prefix) of the objects whose names start with `under`, each once,
    /// sorted; at most `max` when given (one page of up to 1000 names per request).
    pub fn list(&self, under: &str, max: Option<usize>) -> Result<Vec<String>> {
        Ok(self.list_full(under, max)?.0.into_iter().map(|o| o.name).collect())
    }

    /// The objects whose names start with `under`, each once, sorted, with their sizes.
    pub fn list_objects(&self, under: &str) -> Result<Vec<Listed>> {
        Ok(self.list_full(under, None)?.0)
    }

    /// The objects whose names start with `under`, with their LastModified, and the bucket's
    /// own time (the `Date` of its first answer): ages are measured on the bucket's clock, so
    /// a wrong clock on the backup server cannot make a young object look old.
    pub fn list_dated(&self, under: &str) -> Result<(Vec<Listed>, DateTime<Utc>)> {
        let (objs, date) = self.list_full(under, None)?;
        let what = format!("LIST {under}");
        let now = date
            .as_deref()
            .and_then(|d| DateTime::parse_from_rfc2822(d).ok())
            .ok_or_else(|| {
                Error::remote(format!(
                    "{}: {what}: the answer's Date header is '{}'; expected an HTTP date (the bucket's clock)",
                    self.shown,
                    date.as_deref().unwrap_or("").chars().take(60).collect::<String>()
                ))
            })?
            .with_timezone(&Utc);
        Ok((objs, now))
    }

    /// Remove the object `name` (one that is already gone is fine).
    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name)?;
        let url = || self.bucket.delete_object(Some(&self.creds), &key).sign(SIGN_FOR);
        let limit = self.limit(0);
        self.call(&format!("DELETE {name}"), limit, || self.request("DELETE", &url(), limit).call().map_err(Box::new))?;
        Ok(())
    }

    /// Remove the object `name` with one attempt (the best effort of a run that ends anyway).
    pub fn delete_once(&self, name: &str) -> Result<()> {
        let url = self.bucket.delete_object(Some(&self.creds), &self.key(name)?).sign(SIGN_FOR);
        let (limit, started) = (self.limit(0), Instant::now());
        match self.request("DELETE", &url, limit).call() {
            Ok(r) if (200..300).contains(&r.status()) => Ok(()),
            Ok(r) => Err(Error::remote(format!("{}: DELETE {name}: {}", self.shown, not_done(r.status())))),
            Err(ureq::Error::Status(404, _)) => Ok(()),
            Err(ureq::Error::Status(code, _)) => {
                Err(Error::remote(format!("{}: DELETE {name}: HTTP {code}", self.shown)))
            }
            Err(ureq::Error::Transport(_)) if started.elapsed() >= limit => {
                Err(Error::remote(format!("{}: DELETE {name}: {}", self.shown, self.late(limit))))
            }
            Err(ureq::Error::Transport(t)) => {
                Err(Error::remote(format!("{}: DELETE {name}: {}", self.shown, self.transport(&t))))
            }
        }
    }

    fn list_full(&self, under: &str, max: Option<usize>) -> Result<(Vec<Listed>, Option<String>)> {
        let full = self.list_prefix(under);
        let strip = self.list_prefix("");
        let mut out = Vec::new();
        let mut date = None;
        let mut token: Option<String> = None;
        let mut tokens = std::collections::HashSet::new();
        let mut pages = 0;
        let done = |mut out: Vec<Listed>, date| {
            // A gateway that lists a name twice (S3 never does) does not make it count twice.
            out.sort_by(|a: &Listed, b: &Listed| a.name.cmp(&b.name));
            out.dedup_by(|a, b| a.name == b.name);
            Ok((out, date))
        };
        loop {
            let url = || {
                let mut a: ListObjectsV2<'_> = self.bucket.list_objects_v2(Some(&self.creds));
                a.with_prefix(full.as_str());
                a.with_max_keys(max.unwrap_or(1000).min(1000));
                if let Some(t) = &token {
                    a.with_continuation_token(t.as_str());
                }
                a.sign(SIGN_FOR)
            };
            let what = format!("LIST {under}");
            let limit = self.limit(MAX_LIST_PAGE);
            let body = match self.call(&what, limit, || self.request("GET", &url(), limit).call().map_err(Box::new))? {
                Outcome::NotFound => {
                    return Err(Error::remote(format!("{}: {what}: HTTP 404 (does the bucket exist?)", self.shown)))
                }
                Outcome::Done(r) => {
                    if date.is_none() {
                        date = r.header("Date").map(str::to_string);
                    }
                    let mut s = String::new();
                    r.into_reader()
                        .take(MAX_LIST_PAGE)
                        .read_to_string(&mut s)
                        .map_err(|e| self.read_failed(&what, &e, limit))?;
                    s
                }
            };
            let page = ListObjectsV2::parse_response(&body)
                .map_err(|e| Error::remote(format!("{}: {what}: an answer that is no S3 listing: {e}", self.shown)))?;
            // rusty-s3 asks for `encoding-type=url`: each key comes percent-encoded.
            for c in page.contents {
                let key = percent_encoding::percent_decode_str(&c.key).decode_utf8_lossy();
                if let Some(name) = key.strip_prefix(&strip) {
                    let modified = DateTime::parse_from_rfc3339(&c.last_modified).ok().map(|t| t.with_timezone(&Utc));
                    out.push(Listed { name: name.to_string(), modified, size: c.size });
                }
            }
            pages += 1;
            if out.len() > MAX_LISTED {
                return Err(Error::remote(format!(
                    "{}: {what}: more than {MAX_LISTED} names; expected at most that many in one listing",
                    self.shown
                )));
            }
            token = page.next_continuation_token;
            let Some(t) = &token else { return done(out, date) };
            if max.is_some_and(|m| out.len() >= m) {
                return done(out, date);
            }
            let why = if t.is_empty() {
                "an empty continuation token"
            } else if !tokens.insert(t.clone()) {
                "a continuation token it sent before (a listing that would not end)"
            } else if pages >= MAX_PAGES {
                "a continuation token (one page too many)"
            } else {
                continue;
            };
            return Err(Error::remote(format!(
                "{}: {what}: page {pages} ends with {why}; expected a new token or none, at most {MAX_PAGES} pages",
                self.shown
            )));
        }
    }
}

/// The error text of an answer below 400 that is not 2xx (ureq gives those as answers): a
/// redirect is not followed (it would leave a PUT undone or make another request of it).
fn not_done(status: u16) -> String {
    if (300..400).contains(&status) {
        format!(
            "HTTP {status} (a redirect; affa follows none); expected a 2xx answer from the gateway itself (offsiteEndpoint)"
        )
    } else {
        format!("HTTP {status}; expected a 2xx answer")
    }
}

/// Objects larger than this many bytes are multipart uploads ([`PART`]; a test build may lower
/// it with `AFFA_TEST_OFFSITE_PART`, never below S3's 5 MiB).
fn part_size() -> usize {
    #[cfg(feature = "test-hooks")]
    if let Some(n) = std::env::var("AFFA_TEST_OFFSITE_PART").ok().and_then(|v| v.parse::<usize>().ok()) {
        return n.max(5 << 20);
    }
    PART
}

/// Faults for the tests (feature `test-hooks` only).
#[cfg(feature = "test-hooks")]
mod test_hooks {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// `AFFA_TEST_OFFSITE_REFUSE=N`: the Nth PUT of a chunk object (`c/...`) is sent with a
    /// Content-MD5 that does not match its body (the gateway refuses it: HTTP 400 BadDigest).
    /// Some(the header's value) for that PUT.
    pub fn refuse(name: &str) -> Option<String> {
        static HITS: AtomicU64 = AtomicU64::new(0);
        let n: u64 = std::env::var("AFFA_TEST_OFFSITE_REFUSE").ok()?.parse().ok()?;
        if !name.starts_with("c/") || HITS.fetch_add(1, Ordering::SeqCst) + 1 != n {
            return None;
        }
        // The MD5 of nothing: no chunk object is empty.
        Some("1B2M2Y8AsgTpgAmY7PHvCQ==".to_string())
    }

    /// `AFFA_TEST_OFFSITE_REFUSE_PART=N`: part N of a multipart upload is refused the same way.
    pub fn refuse_part(n: u16) -> Option<String> {
        let want: u16 = std::env::var("AFFA_TEST_OFFSITE_REFUSE_PART").ok()?.parse().ok()?;
        (want == n).then(|| "1B2M2Y8AsgTpgAmY7PHvCQ==".to_string())
    }
}
