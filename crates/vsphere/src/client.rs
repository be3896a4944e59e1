//! The vSphere API calls affa makes on an ESXi host: connect (with the pinned certificate),
//! login/logout with the session cookie, finding a VM, reading its layout, snapshot create and
//! remove, task waiting, and RegisterVM for restores.
//!
//! Owns: the HTTP exchange with `https://HOST/sdk`, the session cookie (and logging in again,
//! once per call, when the host dropped an idle session), mapping of HTTP and
//! transport failures to one-line errors naming the host. Must never: send anything before the
//! host's certificate matched the pin, follow redirects, put a password or a request body into
//! an error or Debug output, wait on a task without a deadline, or take answers without a bound
//! (one answer: soap::MAX_RESPONSE_BYTES, soap::MAX_NODES; one retrieval: MAX_RETRIEVE_PAGES,
//! MAX_RETRIEVE_BYTES, and soap::MAX_NODES elements kept in all).

use super::model::{
    decode_entity_name, parse_disks, parse_layout_disks, parse_layout_files, parse_layout_snapshots, parse_moref_array,
    parse_retrieve_result, parse_snapshot_info, parse_task_info, parse_vm_files, url_to_host_path, Datastore, MoRef,
    ObjectContent, PowerState, ServiceContent, TaskInfo, TaskState, VmLayout,
};
use super::soap::{self, elem, envelope, moref_elem, one_line, Fault, Node, Reply};
use super::tls::{client_config, Seen, Thumbprint};
use crate::error::{Error, ErrorKind, Result};
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most pages one property retrieval may take (RetrievePropertiesEx and its continuations).
pub const MAX_RETRIEVE_PAGES: usize = 1000;
/// Most bytes of answers one property retrieval may take in all (what affa reads of one ESXi
/// host is a few MiB at most).
pub const MAX_RETRIEVE_BYTES: usize = 128 << 20;

/// A password: its Debug and Display print `***`, so it cannot leak through logs or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Password {
        Password(s.into())
    }
    /// The clear text, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Password {
    fn from(s: String) -> Password {
        Password(s)
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Password {
        Password(s.to_string())
    }
}

/// How to reach an ESXi host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    pub host: String,
    /// 443 unless the job says otherwise.
    pub port: u16,
    /// SHA-256 fingerprint of the host's certificate, `AB:CD:…` (job key ESXiThumbprint).
    pub thumbprint: Option<String>,
    /// Talk plain HTTP (only when a job explicitly says so; no certificate then).
    pub plain_http: bool,
    /// Connect / per-request timeout.
    pub timeout: Duration,
    /// Longest wait for one task (snapshot create/remove, register).
    pub task_timeout: Duration,
    /// The affa job name, only used to say `affa --send-key JOB` in messages.
    pub job: Option<String>,
}

impl ConnectOptions {
    /// Port 443, no thumbprint, HTTPS, 60 s request timeout, 1 h task timeout.
    pub fn new(host: impl Into<String>) -> ConnectOptions {
        ConnectOptions {
            host: host.into(),
            port: 443,
            thumbprint: None,
            plain_http: false,
            timeout: Duration::from_secs(60),
            task_timeout: Duration::from_secs(3600),
            job: None,
        }
    }
}

/// How a task ended, as `Client::poll_task` saw it.
enum Polled {
    Done(TaskInfo),
    /// The task's own failure (its fault the error's source).
    Failed(Error),
    /// Still queued or running at the time limit.
    Running(TaskState),
}

/// A connection (and, after `login`, a session) to one ESXi host's vSphere API.
pub struct Client {
    /// The host as shown in messages (`host` or `host:port`).
    host: String,
    url: String,
    agent: ureq::Agent,
    timeout: Duration,
    task_timeout: Duration,
    pin: Option<(Thumbprint, Seen)>,
    soap_action: String,
    cookie: Mutex<Option<String>>,
    /// The user and password of the last [`Client::login`]: a call refused with
    /// NotAuthenticated (the host dropped a session idle longer than its timeout, 30 minutes by
    /// default on ESXi: a long disk copy makes no API call) logs in again with them, once.
    credentials: Mutex<Option<(String, Password)>>,
    /// How many times a call logged in again.
    relogins: std::sync::atomic::AtomicU32,
    sc: ServiceContent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("host", &self.host)
            .field("url", &self.url)
            .field("logged_in", &self.is_logged_in())
            .finish_non_exhaustive()
    }
}

/// What to tell the user when no thumbprint is configured.
fn no_thumbprint(host: &str, job: Option<&str>) -> Error {
    let job = job.filter(|j| !j.is_empty()).unwrap_or("JOB");
    Error::config(format!(
        "no certificate fingerprint pinned for ESXi host {host} (job config key ESXiThumbprint): \
         run `affa --send-key {job}` to show and pin it"
    ))
}

fn io_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

/// The kind of the first io error in a chain of sources.
fn io_kind_of(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = x.source();
    }
    None
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    one_line(&cur.to_string())
}

fn read_body(resp: ureq::Response) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    resp.into_reader().take(soap::MAX_RESPONSE_BYTES as u64 + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

impl Client {
    /// Connect to the host's `/sdk`, checking its certificate against the pinned thumbprint,
    /// and read the ServiceContent (no credentials are sent). Fails when no thumbprint is
    /// configured (unless `plain_http`), and on a mismatch before anything is sent.
    pub fn connect(opts: ConnectOptions) -> Result<Client> {
        let h = opts.host.trim();
        if h.is_empty() || h.chars().any(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#')) {
            return Err(Error::new(format!("{:?} is not a valid ESXi host name", one_line(h))));
        }
        let host = if opts.port == 443 || (opts.plain_http && opts.port == 80) {
            h.to_string()
        } else {
            format!("{h}:{}", opts.port)
        };
        let url_host = if h.contains(':') && !h.starts_with('[') { format!("[{h}]") } else { h.to_string() };
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(opts.timeout)
            .timeout(opts.timeout)
            .redirects(0)
            .user_agent(concat!("affa/", env!("CARGO_PKG_VERSION")));
        let mut pin = None;
        let scheme = if opts.plain_http {
            "http"
        } else {
            let tp = match opts.thumbprint.as_deref().map(str::trim) {
                Some(t) if !t.is_empty() => t,
                _ => return Err(no_thumbprint(&host, opts.job.as_deref())),
            };
            let tp = Thumbprint::parse(tp).map_err(|e| e.context(format!("ESXi host {host}")))?;
            let (cfg, seen) = client_config(Some(tp))?;
            super::tls::server_name(h)?; // reject names rustls cannot use, with a clear message
            builder = builder.tls_config(cfg);
            pin = Some((tp, seen));
            "https"
        };
        let mut c = Client {
            url: format!("{scheme}://{url_host}:{}/sdk", opts.port),
            host,
            agent: builder.build(),
            timeout: opts.timeout,
            task_timeout: opts.task_timeout,
            pin,
            soap_action: "urn:vim25/6.0".to_string(),
            cookie: Mutex::new(None),
            credentials: Mutex::new(None),
            relogins: Default::default(),
            sc: ServiceContent {
                root_folder: MoRef::new("Folder", "ha-folder-root"),
                property_collector: MoRef::new("PropertyCollector", "ha-property-collector"),
                view_manager: MoRef::new("ViewManager", "ViewManager"),
                session_manager: MoRef::new("SessionManager", "ha-sessionmgr"),
                about: Default::default(),
            },
        };
        let resp = c.call("RetrieveServiceContent", &moref_elem("_this", "ServiceInstance", "ServiceInstance"))?;
        let rv = resp
            .child("returnval")
            .ok_or_else(|| c.err("RetrieveServiceContent answered without a service content"))?;
        c.sc = ServiceContent::from_node(rv).map_err(|e| c.at_host(e))?;
        let v = &c.sc.about.api_version;
        if !v.is_empty() && v.len() <= 16 && v.chars().all(|ch| ch.is_ascii_digit() || ch == '.') {
            c.soap_action = format!("urn:vim25/{v}");
        }
        Ok(c)
    }

    /// The host as it appears in messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// What the host says it is (`VMware ESXi 7.0.3 build-…`, API version).
    pub fn about(&self) -> &super::model::About {
        &self.sc.about
    }

    /// The service content read at connect.
    pub fn service_content(&self) -> &ServiceContent {
        &self.sc
    }

    /// The longest wait for one task.
    pub fn task_timeout(&self) -> Duration {
        self.task_timeout
    }

    /// Change the longest wait for one task.
    pub fn set_task_timeout(&mut self, t: Duration) {
        self.task_timeout = t;
    }

    pub fn is_logged_in(&self) -> bool {
        self.cookie.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// A failure of the ESXi host ([`ErrorKind::Remote`]): "ESXi host H: msg".
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::remote(format!("ESXi host {}: {}", self.host, msg))
    }

    /// A failure to talk to the host at all (no answer, a broken connection, an HTTP status
    /// without a SOAP answer): kind [`ErrorKind::Io`] with `kind`, never [`ErrorKind::Remote`],
    /// so that callers tell it from a host's fault by kind. "ESXi host H: msg".
    fn net_err(&self, kind: std::io::ErrorKind, msg: impl std::fmt::Display) -> Error {
        self.err(msg).with_kind(ErrorKind::Io(kind))
    }

    /// `e` (about something the host sent) as a failure of the host: "ESXi host H: e".
    fn at_host(&self, e: Error) -> Error {
        e.context(format!("ESXi host {}", self.host)).with_kind(ErrorKind::Remote)
    }

    /// A SOAP fault as an error: kind [`ErrorKind::Remote`], the fault its source
    /// ([`soap::fault_of`]).
    fn fault_error(&self, method: &str, f: &Fault) -> Error {
        self.fault_message(method, f).with_source(f.clone())
    }

    fn fault_message(&self, method: &str, f: &Fault) -> Error {
        let msg = if f.message.is_empty() { String::new() } else { format!(": {}", f.message) };
        match f.kind.as_str() {
            "InvalidLogin" => Error::remote(format!("wrong user or password for ESXi host {}", self.host)),
            "NotAuthenticated" => {
                self.err(format!("{method} refused: not logged in (session expired?): NotAuthenticated{msg}"))
            }
            "NoPermission" => self.err(format!("{method} refused: the ESXi user lacks a privilege: NoPermission{msg}")),
            "RestrictedVersion" => self.err(format!(
                "{method} refused: RestrictedVersion{msg} (a free vSphere Hypervisor licence makes \
                 the API read-only)"
            )),
            k => self.err(format!("{method} failed: {k}{msg}")),
        }
    }

    fn mismatch(&self) -> Option<Error> {
        let (want, seen) = self.pin.as_ref()?;
        let got = seen.lock().ok().and_then(|s| *s)?;
        if got == *want {
            return None;
        }
        Some(Error::remote(format!(
            "certificate of ESXi host {} has fingerprint {got}, expected {want} (job config key ESXiThumbprint)",
            self.host
        )))
    }

    /// One SOAP call; returns the `<Method>Response` element.
    pub fn call(&self, method: &str, inner: &str) -> Result<Node> {
        self.call_sized(method, inner).map(|(n, _)| n)
    }

    /// How many calls found the session gone (NotAuthenticated) and logged in again.
    pub fn relogins(&self) -> u32 {
        self.relogins.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`call`](Self::call), also returning the size of the answer in bytes. A call the host
    /// refuses with NotAuthenticated after a login (the session expired) logs in again and is
    /// sent once more: a refused call did nothing on the host, so sending it again is safe.
    fn call_sized(&self, method: &str, inner: &str) -> Result<(Node, usize)> {
        let r = self.call_once(method, inner);
        let expired = matches!(&r, Err(e) if soap::fault_of(e).is_some_and(|f| f.kind == "NotAuthenticated"));
        if !expired || method == "Login" || method == "Logout" {
            return r;
        }
        let Some((user, password)) = self.credentials.lock().ok().and_then(|c| c.clone()) else { return r };
        self.login_once(&user, &password).map_err(|e| {
            e.context(format!("{method} found the session expired (NotAuthenticated) and logging in again failed"))
        })?;
        self.relogins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.call_once(method, inner)
    }

    fn call_once(&self, method: &str, inner: &str) -> Result<(Node, usize)> {
        let body = envelope(method, inner);
        let mut req = self
            .agent
            .post(&self.url)
            .set("Content-Type", "text/xml; charset=utf-8")
            .set("SOAPAction", &self.soap_action);
        let cookie = self.cookie.lock().ok().and_then(|c| c.clone());
        if let Some(c) = &cookie {
            req = req.set("Cookie", c);
        }
        let resp = match req.send_string(&body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text = r.status_text().to_string();
                if let Ok(b) = read_body(r) {
                    if let Ok(Reply::Fault(f)) = soap::parse_reply(&b) {
                        return Err(self.fault_error(method, &f));
                    }
                }
                return Err(self.net_err(
                    std::io::ErrorKind::Other,
                    format!("answered HTTP {code} {} to {method}", one_line(&text)),
                ));
            }
            Err(ureq::Error::Transport(t)) => {
                if let Some(e) = self.mismatch() {
                    return Err(e);
                }
                return Err(self.transport_error(method, &t));
            }
        };
        for sc in resp.all("set-cookie") {
            if let Some(v) = sc.trim().strip_prefix("vmware_soap_session=") {
                let v = v.split(';').next().unwrap_or("").trim();
                if !v.is_empty() && v.len() < 4096 && !v.chars().any(|c| c.is_control()) {
                    if let Ok(mut c) = self.cookie.lock() {
                        *c = Some(format!("vmware_soap_session={v}"));
                    }
                }
            }
        }
        let b = read_body(resp).map_err(|e| {
            if io_timed_out(&e) {
                self.net_err(
                    std::io::ErrorKind::TimedOut,
                    format!("no complete answer to {method} within {} s", self.timeout.as_secs()),
                )
            } else {
                self.net_err(e.kind(), format!("reading the answer to {method}: {}", one_line(&e.to_string())))
            }
        })?;
        if b.len() > soap::MAX_RESPONSE_BYTES {
            return Err(self.err(format!("answer to {method} is larger than {} MiB", soap::MAX_RESPONSE_BYTES >> 20)));
        }
        match soap::parse_reply(&b) {
            Ok(Reply::Ok(n)) => Ok((n, b.len())),
            Ok(Reply::Fault(f)) => Err(self.fault_error(method, &f)),
            Err(e) => Err(self.err(format!("unreadable answer to {method}: {}", e.message()))),
        }
    }

    fn transport_error(&self, method: &str, t: &ureq::Transport) -> Error {
        use ureq::ErrorKind as K;
        let cause = match std::error::Error::source(t) {
            Some(s) => innermost(s),
            None => one_line(t.message().unwrap_or_default()),
        };
        let io_kind = std::error::Error::source(t).and_then(io_kind_of).unwrap_or(std::io::ErrorKind::Other);
        if let Some(s) = std::error::Error::source(t) {
            if io_timed_out(s) {
                return self.net_err(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer to {method} within {} s (timeout)", self.timeout.as_secs()),
                );
            }
        }
        let kind = ErrorKind::Io(io_kind);
        match t.kind() {
            K::Dns => Error::of(kind, format!("cannot resolve ESXi host {}: {cause}", self.host)),
            K::ConnectionFailed => Error::of(kind, format!("cannot connect to ESXi host {}: {cause}", self.host)),
            _ => self.net_err(io_kind, format!("{method}: {}: {cause}", t.kind())),
        }
    }

    /// Log in (SessionManager.Login); keeps the `vmware_soap_session` cookie for later calls.
    /// A wrong user or password gives "wrong user or password for ESXi host H".
    pub fn login(&mut self, user: &str, password: &Password) -> Result<()> {
        self.login_once(user, password)?;
        if let Ok(mut c) = self.credentials.lock() {
            *c = Some((user.to_string(), password.clone()));
        }
        Ok(())
    }

    fn login_once(&self, user: &str, password: &Password) -> Result<()> {
        if let Ok(mut c) = self.cookie.lock() {
            *c = None;
        }
        let inner = format!(
            "{}{}{}",
            moref_elem("_this", &self.sc.session_manager.kind, &self.sc.session_manager.value),
            elem("userName", user),
            elem("password", password.expose())
        );
        self.call("Login", &inner)?;
        if !self.is_logged_in() {
            return Err(self.err("accepted the login but set no session cookie"));
        }
        Ok(())
    }

    /// Log out (SessionManager.Logout) and forget the cookie.
    pub fn logout(&mut self) -> Result<()> {
        if !self.is_logged_in() {
            return Ok(());
        }
        let r =
            self.call("Logout", &moref_elem("_this", &self.sc.session_manager.kind, &self.sc.session_manager.value));
        if let Ok(mut c) = self.cookie.lock() {
            *c = None;
        }
        if let Ok(mut c) = self.credentials.lock() {
            *c = None;
        }
        r.map(|_| ())
    }

    fn this_pc(&self) -> String {
        moref_elem("_this", &self.sc.property_collector.kind, &self.sc.property_collector.value)
    }

    /// RetrievePropertiesEx with the given `<specSet>` content, following continuation tokens
    /// with ContinueRetrievePropertiesEx.
    /// A host that keeps sending pages is stopped at [`MAX_RETRIEVE_PAGES`] pages,
    /// [`MAX_RETRIEVE_BYTES`] bytes or [`soap::MAX_NODES`] elements kept in all, whichever
    /// comes first (the elements bound the memory: a byte of XML can cost a hundred in a tree).
    pub fn retrieve(&self, spec: &str) -> Result<Vec<ObjectContent>> {
        let inner = format!("{}<specSet>{spec}</specSet><options/>", self.this_pc());
        let (resp, mut total) = self.call_sized("RetrievePropertiesEx", &inner)?;
        let (mut objs, mut token) = parse_retrieve_result(resp).map_err(|e| self.at_host(e))?;
        let kept = |objs: &[ObjectContent]| -> usize {
            objs.iter().map(|o| o.props.iter().map(|(_, v)| v.count()).sum::<usize>()).sum()
        };
        let mut nodes = kept(&objs);
        let mut pages = 1;
        while let Some(t) = token {
            if pages >= MAX_RETRIEVE_PAGES {
                return Err(
                    self.err(format!("property retrieval did not end after {MAX_RETRIEVE_PAGES} pages; refusing more"))
                );
            }
            pages += 1;
            let inner = format!("{}{}", self.this_pc(), elem("token", &t));
            let (resp, n) = self.call_sized("ContinueRetrievePropertiesEx", &inner)?;
            total += n;
            if total > MAX_RETRIEVE_BYTES {
                return Err(self.err(format!(
                    "property retrieval sent more than {} MiB in {pages} pages; refusing more",
                    MAX_RETRIEVE_BYTES >> 20
                )));
            }
            let (more, next) = parse_retrieve_result(resp).map_err(|e| self.at_host(e))?;
            nodes += kept(&more);
            if nodes > soap::MAX_NODES {
                return Err(self.err(format!(
                    "property retrieval sent more than {} elements in {pages} pages; refusing more",
                    soap::MAX_NODES
                )));
            }
            objs.extend(more);
            token = next;
        }
        Ok(objs)
    }

    fn prop_spec(kind: &str, paths: &[&str]) -> String {
        let mut s = format!("<propSet>{}", elem("type", kind));
        for p in paths {
            s.push_str(&elem("pathSet", p));
        }
        s.push_str("</propSet>");
        s
    }

    /// Properties of some objects of one type.
    pub fn objects_props(&self, objs: &[MoRef], paths: &[&str]) -> Result<Vec<ObjectContent>> {
        let Some(first) = objs.first() else {
            return Ok(Vec::new());
        };
        let mut spec = Self::prop_spec(&first.kind, paths);
        for o in objs {
            spec.push_str(&format!(
                "<objectSet>{}<skip>false</skip></objectSet>",
                moref_elem("obj", &o.kind, &o.value)
            ));
        }
        self.retrieve(&spec)
    }

    /// Properties of one object; an error if the host does not know it.
    pub fn object_props(&self, obj: &MoRef, paths: &[&str]) -> Result<ObjectContent> {
        self.objects_props(std::slice::from_ref(obj), paths)?
            .into_iter()
            .find(|o| &o.obj == obj)
            .ok_or_else(|| self.err(format!("object {obj} not found")))
    }

    /// All objects of a type under the root folder (ContainerView, recursive) with the given
    /// properties.
    pub fn all_of_type(&self, kind: &str, paths: &[&str]) -> Result<Vec<ObjectContent>> {
        let vm = &self.sc.view_manager;
        let root = &self.sc.root_folder;
        let inner = format!(
            "{}{}{}<recursive>true</recursive>",
            moref_elem("_this", &vm.kind, &vm.value),
            moref_elem("container", &root.kind, &root.value),
            elem("type", kind)
        );
        let resp = self.call("CreateContainerView", &inner)?;
        let view = resp
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| self.err("CreateContainerView answered without a view"))?;
        let spec = format!(
            "{}<objectSet>{}<skip>true</skip><selectSet xsi:type=\"TraversalSpec\">\
             <name>traverseView</name><type>ContainerView</type><path>view</path>\
             <skip>false</skip></selectSet></objectSet>",
            Self::prop_spec(kind, paths),
            moref_elem("obj", &view.kind, &view.value)
        );
        let r = self.retrieve(&spec);
        // Tidy up; a failure here does not matter for the result.
        let _ = self.call("DestroyView", &moref_elem("_this", &view.kind, &view.value));
        r
    }

    /// Names of all VMs on the host (decoded, sorted).
    pub fn list_vm_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .all_of_type("VirtualMachine", &["name"])?
            .iter()
            .filter_map(|o| o.prop_text("name").map(decode_entity_name))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The VM with exactly this name. 0 matches → "no VM named X on ESXi host H; VMs there: …";
    /// 2 or more → an error saying so.
    pub fn find_vm(&self, name: &str) -> Result<MoRef> {
        let all = self.all_of_type("VirtualMachine", &["name"])?;
        let mut names = Vec::new();
        let mut hits = Vec::new();
        for o in &all {
            let raw = o.prop_text("name").unwrap_or("");
            let dec = decode_entity_name(raw);
            if raw == name || dec == name {
                hits.push(o.obj.clone());
            }
            names.push(dec);
        }
        match hits.len() {
            1 => Ok(hits.remove(0)),
            0 => {
                names.sort();
                let list = if names.is_empty() { "(none)".to_string() } else { names.join(", ") };
                Err(Error::new(format!(
                    "no VM named {name} on ESXi host {}; VMs there: {}",
                    self.host,
                    one_line(&list)
                )))
            }
            n => Err(Error::new(format!(
                "{n} VMs are named {name} on ESXi host {} (ids {}); affa needs a unique VM name",
                self.host,
                hits.iter().map(|m| m.value.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// A VM's power state.
    pub fn power_state(&self, vm: &MoRef) -> Result<PowerState> {
        let o = self.object_props(vm, &["runtime.powerState"])?;
        Ok(PowerState::parse(o.prop_text("runtime.powerState").unwrap_or("")))
    }

    /// Everything about a VM's files: vmx path, config files, power state, disks with their
    /// backing chains, snapshot tree, layoutEx files and datastores (with host paths).
    pub fn vm_layout(&self, vm: &MoRef) -> Result<VmLayout> {
        let o = self.object_props(
            vm,
            &[
                "name",
                "config.files",
                "config.hardware.device",
                "runtime.powerState",
                "snapshot",
                "layoutEx.file",
                "layoutEx.disk",
                "layoutEx.snapshot",
                "datastore",
            ],
        )?;
        let name = decode_entity_name(o.prop_text("name").unwrap_or(""));
        let ctx = |e: Error| {
            e.context(format!("VM {} on ESXi host {}", crate::untrusted::shown(&name), self.host))
                .with_kind(ErrorKind::Remote)
        };
        let files = o.prop("config.files").map(parse_vm_files).unwrap_or_default();
        if files.vm_path_name.is_empty() {
            return Err(ctx(Error::new("no configuration file known (VM inaccessible?)")));
        }
        let disks = match o.prop("config.hardware.device") {
            Some(d) => parse_disks(d).map_err(ctx)?,
            None => Vec::new(),
        };
        let (current_snapshot, snapshots) = match o.prop("snapshot") {
            Some(s) => parse_snapshot_info(s).map_err(ctx)?,
            None => (None, Vec::new()),
        };
        let layout_files = o.prop("layoutEx.file").map(parse_layout_files).unwrap_or_default();
        let layout_disks = o.prop("layoutEx.disk").map(parse_layout_disks).unwrap_or_default();
        let layout_snapshots = o.prop("layoutEx.snapshot").map(parse_layout_snapshots).unwrap_or_default();
        let mut ds_refs: Vec<MoRef> = o.prop("datastore").map(parse_moref_array).unwrap_or_default();
        for d in &disks {
            for b in &d.chain {
                if let Some(r) = &b.datastore {
                    if !ds_refs.contains(r) {
                        ds_refs.push(r.clone());
                    }
                }
            }
        }
        let mut datastores = Vec::new();
        for ds in self.objects_props(&ds_refs, &["name", "info.url"])? {
            let ds_name = decode_entity_name(ds.prop_text("name").unwrap_or(""));
            let url = ds.prop_text("info.url").unwrap_or("").to_string();
            let host_path = url_to_host_path(&url).map_err(|e| ctx(e.context(format!("datastore {ds_name}"))))?;
            datastores.push(Datastore { name: ds_name, moref: ds.obj.clone(), url, host_path });
        }
        let layout = VmLayout {
            moref: o.obj.clone(),
            name,
            files,
            power_state: PowerState::parse(o.prop_text("runtime.powerState").unwrap_or("")),
            disks,
            current_snapshot,
            snapshots,
            layout_files,
            layout_disks,
            layout_snapshots,
            datastores,
        };
        layout.check_names().map_err(|e| self.at_host(e))?;
        Ok(layout)
    }

    /// Poll a task's `info` until it succeeds (→ its info), fails (→ one-line error with the
    /// fault type and message) or `timeout` passes (→ error naming the task and the seconds).
    pub fn wait_for_task(&self, task: &MoRef, what: &str, timeout: Duration) -> Result<TaskInfo> {
        match self.poll_task(task, what, timeout)? {
            Polled::Done(info) => Ok(info),
            Polled::Failed(e) => Err(e),
            Polled::Running(state) => Err(self.task_timed_out(task, what, timeout, state)),
        }
    }

    fn task_timed_out(&self, task: &MoRef, what: &str, timeout: Duration, state: TaskState) -> Error {
        let state = if state == TaskState::Queued { "queued" } else { "running" };
        self.err(format!(
            "task {what} ({}) did not finish within {} s (still {state}; the limit is the job key ESXiTaskTimeout)",
            task.value,
            timeout.as_secs()
        ))
    }

    /// [`wait_for_task`](Self::wait_for_task), telling the task's own end from a failure to
    /// read its state (`Err`).
    fn poll_task(&self, task: &MoRef, what: &str, timeout: Duration) -> Result<Polled> {
        let start = Instant::now();
        // From a few ms, doubling up to 2 s: a task of half a second (a snapshot of a small VM)
        // is seen done within ~30% of its time; a long one costs one poll per 2 s.
        let mut delay = Duration::from_millis(4);
        loop {
            let o = self.object_props(task, &["info"])?;
            let info = o
                .prop("info")
                .ok_or_else(|| self.err(format!("task {what} ({}) has no info", task.value)))
                .and_then(|i| parse_task_info(i).map_err(|e| self.at_host(e)))?;
            match info.state {
                TaskState::Success => return Ok(Polled::Done(info)),
                TaskState::Error => {
                    let (kind, msg) = info.error.clone().unwrap_or_else(|| ("fault".into(), String::new()));
                    let fault = Fault { kind: kind.clone(), message: msg.clone() };
                    let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
                    return Ok(Polled::Failed(self.err(format!("task {what} failed: {kind}{msg}")).with_source(fault)));
                }
                TaskState::Queued | TaskState::Running => {}
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Ok(Polled::Running(info.state));
            }
            std::thread::sleep(delay.min(timeout - waited));
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    fn task_ref(&self, method: &str, resp: &Node) -> Result<MoRef> {
        resp.child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| self.err(format!("{method} answered without a task")))
    }

    /// CreateSnapshot_Task; waits for the task and returns the new snapshot's moref.
    pub fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        memory: bool,
        quiesce: bool,
    ) -> Result<MoRef> {
        let inner = format!(
            "{}{}{}{}{}",
            moref_elem("_this", &vm.kind, &vm.value),
            elem("name", name),
            elem("description", description),
            elem("memory", if memory { "true" } else { "false" }),
            elem("quiesce", if quiesce { "true" } else { "false" }),
        );
        let resp = self.call("CreateSnapshot_Task", &inner)?;
        let task = self.task_ref("CreateSnapshot_Task", &resp)?;
        let what = format!("CreateSnapshot_Task {name}");
        let info = match self.poll_task(&task, &what, self.task_timeout)? {
            Polled::Done(info) => info,
            Polled::Failed(e) => return Err(e),
            Polled::Running(state) => {
                // Past the limit. Left alone, the task may still make the snapshot after affa
                // gave up: the VM would run on it until the next run. Cancel it (a host may not
                // allow that), then wait as long again for it to end, so that the caller finds
                // a snapshot it made and removes it.
                let e = self.task_timed_out(&task, &what, self.task_timeout, state);
                let _ = self.call("CancelTask", &moref_elem("_this", &task.kind, &task.value));
                let then = match self.poll_task(&task, &what, self.task_timeout) {
                    Ok(Polled::Done(_)) => "it ended later, after a cancel was asked".to_string(),
                    Ok(Polled::Failed(_)) => "it ended later, cancelled or failed".to_string(),
                    Ok(Polled::Running(_)) => format!(
                        "it was still running {} s after a cancel was asked: a snapshot it makes later is removed by the next run",
                        self.task_timeout.as_secs()
                    ),
                    Err(f) => format!(
                        "its state could not be read after a cancel was asked ({f}): a snapshot it makes later is removed by the next run"
                    ),
                };
                return Err(Error::of(e.kind(), format!("{e}; {then}")));
            }
        };
        if let Some(r) = info.result.filter(|r| r.kind == "VirtualMachineSnapshot") {
            return Ok(r);
        }
        // No result in the task info: find the snapshot by name in the VM's tree.
        let o = self.object_props(vm, &["snapshot"])?;
        let (_, roots) = match o.prop("snapshot") {
            Some(s) => parse_snapshot_info(s)?,
            None => (None, Vec::new()),
        };
        let mut stack: Vec<&super::model::SnapshotTree> = roots.iter().collect();
        while let Some(s) = stack.pop() {
            if s.name == name {
                return Ok(s.snapshot.clone());
            }
            stack.extend(s.children.iter());
        }
        Err(self.err(format!("snapshot {name} was created but cannot be found")))
    }

    /// RemoveSnapshot_Task(removeChildren=false, consolidate=true); waits for the task.
    pub fn remove_snapshot(&self, snapshot: &MoRef) -> Result<()> {
        let inner = format!(
            "{}<removeChildren>false</removeChildren><consolidate>true</consolidate>",
            moref_elem("_this", &snapshot.kind, &snapshot.value)
        );
        let resp = self.call("RemoveSnapshot_Task", &inner)?;
        let task = self.task_ref("RemoveSnapshot_Task", &resp)?;
        let what = format!("RemoveSnapshot_Task {}", snapshot.value);
        self.wait_for_task(&task, &what, self.task_timeout)?;
        Ok(())
    }

    /// UnregisterVM: remove a VM from the inventory, leaving its files on the datastore.
    pub fn unregister_vm(&self, vm: &MoRef) -> Result<()> {
        self.call("UnregisterVM", &moref_elem("_this", &vm.kind, &vm.value)).map(|_| ())
    }

    /// Where new VMs go: (datacenter's vmFolder, the host's root resource pool, the host).
    pub fn placement(&self) -> Result<(MoRef, MoRef, MoRef)> {
        let dcs = self.all_of_type("Datacenter", &["vmFolder"])?;
        let folder = dcs
            .iter()
            .find_map(|d| d.prop("vmFolder").and_then(MoRef::from_node))
            .ok_or_else(|| self.err("no datacenter with a VM folder"))?;
        let crs = self.all_of_type("ComputeResource", &["resourcePool", "host"])?;
        for c in &crs {
            let pool = c.prop("resourcePool").and_then(MoRef::from_node);
            let host = c.prop("host").map(parse_moref_array).unwrap_or_default();
            if let (Some(pool), Some(host)) = (pool, host.into_iter().next()) {
                return Ok((folder, pool, host));
            }
        }
        Err(self.err("no compute resource with a host and a resource pool"))
    }

    /// RegisterVM_Task(vmFolder, path `[ds] dir/name.vmx`, name, asTemplate=false, pool, host);
    /// waits for the task and returns the new VM's moref.
    pub fn register_vm(&self, vmx_path: &str, name: Option<&str>) -> Result<MoRef> {
        let (folder, pool, host) = self.placement()?;
        let inner = format!(
            "{}{}{}<asTemplate>false</asTemplate>{}{}",
            moref_elem("_this", &folder.kind, &folder.value),
            elem("path", vmx_path),
            name.map(|n| elem("name", n)).unwrap_or_default(),
            moref_elem("pool", &pool.kind, &pool.value),
            moref_elem("host", &host.kind, &host.value),
        );
        let resp = self.call("RegisterVM_Task", &inner)?;
        let task = self.task_ref("RegisterVM_Task", &resp)?;
        let what = format!("RegisterVM_Task {vmx_path}");
        let info = self.wait_for_task(&task, &what, self.task_timeout)?;
        info.result
            .filter(|r| r.kind == "VirtualMachine")
            .ok_or_else(|| self.err(format!("task {what} succeeded without naming the new VM")))
    }
}

impl Drop for Client {
    /// Best effort: do not leave a session open on the host when a caller forgot to log out
    /// (sessions on ESXi are a limited resource).
    fn drop(&mut self) {
        if self.is_logged_in() {
            let _ = self.logout();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    #[test]
    fn password_never_printed() {
        let p = Password::new("hunter2");
        assert_eq!(format!("{p:?} {p}"), "*** ***");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Job {
            pw: Password,
        }
        assert!(!format!("{:?}", Job { pw: p.clone() }).contains("hunter2"));
        assert_eq!(p.expose(), "hunter2");
    }

    #[test]
    fn connect_without_thumbprint_says_send_key() {
        let e = Client::connect(ConnectOptions::new("esx1")).unwrap_err();
        assert!(e.message().contains("affa --send-key JOB"), "{e}");
        assert!(e.message().contains("esx1"), "{e}");
        let mut o = ConnectOptions::new("esx1");
        o.job = Some("esxi-myvm".into());
        assert!(Client::connect(o).unwrap_err().message().contains("affa --send-key esxi-myvm"));
        let mut o = ConnectOptions::new("esx1");
        o.thumbprint = Some("12:34".into());
        assert!(Client::connect(o).unwrap_err().message().contains("SHA-256"));
    }

    /// A tiny scripted HTTP server: answers each request with the next canned (status, body),
    /// records requests.
    fn fake_server(answers: Vec<(u16, String)>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter();
            'outer: for s in l.incoming() {
                let mut s = s.unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            continue 'outer;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    seen.push(format!("{head}{}", String::from_utf8_lossy(&body)));
                    let Some((code, ans)) = answers.next() else {
                        return seen;
                    };
                    let cookie = if ans.contains("LoginResponse") {
                        "Set-Cookie: vmware_soap_session=\"abc\"; Path=/; HttpOnly\r\n"
                    } else {
                        ""
                    };
                    write!(
                        s,
                        "HTTP/1.1 {code} X\r\nContent-Type: text/xml\r\n{cookie}Content-Length: {}\r\n\r\n{ans}",
                        ans.len()
                    )
                    .unwrap();
                    if answers.len() == 0 {
                        return seen;
                    }
                }
            }
            seen
        });
        (port, h)
    }

    fn env(body: &str) -> String {
        format!(
            r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#
        )
    }

    const SC: &str = r#"<RetrieveServiceContentResponse xmlns="urn:vim25"><returnval><rootFolder type="Folder">ha-folder-root</rootFolder><propertyCollector type="PropertyCollector">ha-property-collector</propertyCollector><viewManager type="ViewManager">ViewManager</viewManager><about><fullName>VMware ESXi 7.0.3</fullName><apiVersion>7.0.3.0</apiVersion></about><sessionManager type="SessionManager">ha-sessionmgr</sessionManager></returnval></RetrieveServiceContentResponse>"#;

    #[test]
    fn continuation_tokens_cookie_and_faults_over_plain_http() {
        let page = |tok: &str, ids: &[(&str, &str)]| {
            let mut s = String::from("<R xmlns=\"urn:vim25\"><returnval>");
            if !tok.is_empty() {
                s.push_str(&format!("<token>{tok}</token>"));
            }
            for (id, n) in ids {
                s.push_str(&format!("<objects><obj type=\"VirtualMachine\">{id}</obj><propSet><name>name</name><val xsi:type=\"xsd:string\">{n}</val></propSet></objects>"));
            }
            s.push_str("</returnval></R>");
            env(&s)
        };
        let answers = vec![
            (200, env(SC)),
            (
                500,
                env(
                    r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Cannot complete login due to an incorrect user name or password.</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault>"#,
                ),
            ),
            (200, env(r#"<LoginResponse xmlns="urn:vim25"><returnval><key>k</key></returnval></LoginResponse>"#)),
            (
                200,
                env(
                    r#"<CreateContainerViewResponse xmlns="urn:vim25"><returnval type="ContainerView">session[1]v</returnval></CreateContainerViewResponse>"#,
                ),
            ),
            (200, page("t1", &[("1", "a")])),
            (200, page("t2", &[("2", "b%2fc")])),
            (200, page("", &[("3", "d")])),
            (200, env("<DestroyViewResponse xmlns=\"urn:vim25\"></DestroyViewResponse>")),
            (503, "Service Unavailable".to_string()),
            (200, "<html>garbage".to_string()),
        ];
        let (port, h) = fake_server(answers);
        let mut o = ConnectOptions::new("127.0.0.1");
        o.port = port;
        o.plain_http = true;
        o.timeout = Duration::from_secs(5);
        let mut c = Client::connect(o).unwrap();
        assert_eq!(c.about().api_version, "7.0.3.0");
        let e = c.login("root", &Password::new("wrong")).unwrap_err();
        assert_eq!(e.message(), format!("wrong user or password for ESXi host 127.0.0.1:{port}"));
        assert_eq!(e.kind(), ErrorKind::Remote);
        assert_eq!(soap::fault_of(&e).map(|f| f.kind.as_str()), Some("InvalidLogin"));
        c.login("root", &Password::new("s3cr<t")).unwrap();
        assert_eq!(c.list_vm_names().unwrap(), vec!["a", "b/c", "d"]);
        let e = c.power_state(&MoRef::new("VirtualMachine", "1")).unwrap_err();
        assert!(e.message().contains("HTTP 503") && e.message().contains("127.0.0.1"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Io(std::io::ErrorKind::Other), "{e}");
        assert!(soap::fault_of(&e).is_none());
        let e = c.power_state(&MoRef::new("VirtualMachine", "1")).unwrap_err();
        assert!(e.message().contains("unreadable answer"), "{e}");
        assert!(!e.message().contains('\n'));
        std::mem::forget(c); // no logout: the fake server has no more answers
        let reqs = h.join().unwrap();
        assert!(reqs[0].contains("SOAPAction: urn:vim25/6.0"));
        assert!(reqs[1].contains("SOAPAction: urn:vim25/7.0.3.0"));
        assert!(reqs[2].contains("<password>s3cr&lt;t</password>"));
        assert!(!reqs[2].contains("Cookie:"));
        assert!(reqs[3].contains("Cookie: vmware_soap_session=\"abc\""));
        assert!(reqs[5].contains("<ContinueRetrievePropertiesEx") && reqs[5].contains("<token>t1</token>"));
        assert!(reqs[6].contains("<token>t2</token>"));
    }

    /// A host whose pages are each within the limits of one answer, but which together would
    /// be trees of many GB, is stopped at MAX_NODES elements kept.
    #[test]
    fn a_retrieval_keeps_at_most_max_nodes_elements() {
        let big = "<a/>".repeat(soap::MAX_NODES * 3 / 5);
        let page = |tok: &str, id: &str| {
            env(&format!(
                "<R xmlns=\"urn:vim25\"><returnval><token>{tok}</token><objects><obj type=\"VirtualMachine\">{id}</obj><propSet><name>name</name><val>{big}</val></propSet></objects></returnval></R>"
            ))
        };
        let answers = vec![
            (200, env(SC)),
            (200, env(r#"<LoginResponse xmlns="urn:vim25"><returnval><key>k</key></returnval></LoginResponse>"#)),
            (
                200,
                env(
                    r#"<CreateContainerViewResponse xmlns="urn:vim25"><returnval type="ContainerView">session[1]v</returnval></CreateContainerViewResponse>"#,
                ),
            ),
            (200, page("t1", "1")),
            (200, page("t2", "2")),
            (200, env("<DestroyViewResponse xmlns=\"urn:vim25\"></DestroyViewResponse>")),
        ];
        let (port, h) = fake_server(answers);
        let mut o = ConnectOptions::new("127.0.0.1");
        o.port = port;
        o.plain_http = true;
        o.timeout = Duration::from_secs(20);
        let mut c = Client::connect(o).unwrap();
        c.login("root", &Password::new("pw")).unwrap();
        let e = c.list_vm_names().unwrap_err();
        assert!(
            e.message().contains(&format!("property retrieval sent more than {} elements in 2 pages", soap::MAX_NODES)),
            "{e}"
        );
        std::mem::forget(c);
        let reqs = h.join().unwrap();
        assert!(reqs[4].contains("<token>t1</token>"), "{}", reqs[4]);
    }

    #[test]
    fn connection_refused_and_timeout_name_the_host() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut o = ConnectOptions::new("127.0.0.1");
        o.port = port;
        o.plain_http = true;
        o.timeout = Duration::from_millis(500);
        // Listener accepts (kernel backlog) but never answers → timeout.
        let e = Client::connect(o.clone()).unwrap_err();
        assert!(e.message().contains("127.0.0.1") && e.message().contains("within"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Io(std::io::ErrorKind::TimedOut), "{e}");
        drop(l);
        let e = Client::connect(o).unwrap_err();
        assert!(e.message().starts_with("cannot connect to ESXi host 127.0.0.1"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Io(std::io::ErrorKind::ConnectionRefused), "{e}");
        assert!(!e.message().contains('\n'));
    }
}
