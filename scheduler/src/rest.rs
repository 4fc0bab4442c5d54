//! The JobManager's REST API, in Flink's shape, so that another process
//! (`strom savepoint`, `strom stop`, `strom cancel`, `strom list`, or curl)
//! can control running jobs.
//!
//! # Endpoints
//!
//! Bodies and answers are JSON. A refusal is `{"errors": ["message"]}` with a
//! 4xx or 5xx status, as Flink answers.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /jobs` | 200 `{"jobs": [{"id": "<32 hex>", "status": "RUNNING"}]}` |
//! | `GET /jobs/overview` | 200 `{"jobs": [{"jid": "<32 hex>", "name": "q5", "state": "RUNNING", "attempt": 0}]}` |
//! | `GET /jobs/:id` | 200 `{"jid": ..., "name": ..., "state": ..., "attempt": ...}` |
//! | `GET /jobs/:id/checkpoints` | 200 `{"counts": {"triggered": 3, "completed": 2, "failed": 1}, "latest": {"completed": {"external_path": "/dir/chk-2"}}}`; `"completed": null` before the first one |
//! | `POST /jobs/:id/savepoints` body `{"target-directory": "/dir", "cancel-job": false}` (both optional, the body too) | 200 `{"location": "/dir/savepoint-..."}` once the savepoint is complete |
//! | `POST /jobs/:id/stop` body `{"targetDirectory": "/dir", "drain": false}` (both optional) | 200 `{"location": ...}`: stop with a savepoint |
//! | `PATCH /jobs/:id?mode=cancel` (`mode` optional) | 202 `{}` |
//!
//! Deviation from Flink: Flink answers a savepoint or stop request at once
//! with a trigger id to poll (`GET /jobs/:id/savepoints/:triggerid`). Here
//! the request waits until the savepoint is complete (or failed) and answers
//! with its location, so a client needs one request and no polling. Each
//! request is served on its own thread, so a savepoint that takes seconds
//! never holds up `GET /jobs`. `"cancel-job": true` stops the job after the
//! savepoint, as `POST /jobs/:id/stop` does. `"drain": true` is refused.
//!
//! Refusals: an unknown job is 404; a malformed job id, malformed JSON, an
//! unknown body field (Flink's REST API is strict too) or a relative target
//! directory is 400; a body over [`BODY_SIZE_MAX`] is 413, answered from the
//! `Content-Length` header without reading the body; a chunked body is 411;
//! a wrong method is 405 with `Allow`; an unknown path is 404; a missing or
//! wrong bearer token (when the server has a secret) is 401; more than
//! [`CONNECTION_COUNT_MAX`] requests at once is 503.
//!
//! # HTTP
//!
//! HTTP/1.1 with one request per connection (`Connection: close`), parsed
//! by `httparse` (hyper's parser). We do not use `tiny_http` 0.12: when it
//! drops an unread request body it allocates the body's declared
//! `Content-Length` in one piece, so a single request claiming a terabyte
//! aborts the process (and with it every running job). Here every read is
//! bounded: the head by [`HEAD_SIZE_MAX`], the body by [`BODY_SIZE_MAX`], each
//! socket operation by a timeout, and the connections in flight by
//! [`CONNECTION_COUNT_MAX`].

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::local::JobManagerHandle;
use crate::messages::{JobId, JobStatus};

/// The largest request body accepted (Flink's JSON bodies are tiny).
pub const BODY_SIZE_MAX: usize = 64 * 1024;
/// The largest request line plus headers accepted.
pub const HEAD_SIZE_MAX: usize = 16 * 1024;
/// The most headers one request may carry.
const HEADER_COUNT_MAX: usize = 64;
/// The most requests served at once; more are answered 503 at once.
pub const CONNECTION_COUNT_MAX: usize = 32;
/// How long one read or write of a request or answer may wait, so a slow or
/// silent client cannot hold a connection thread.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// After refusing a request whose body was not read, how much of it we
/// swallow and for how long, so the client reads our answer rather than a
/// connection reset (closing a socket with unread bytes sends a reset).
const DISCARD_SIZE_MAX: usize = 256 * 1024;
const DISCARD_DURATION_MAX: Duration = Duration::from_millis(500);
/// How long the accept loop waits after a failed accept (out of file
/// descriptors, say) before trying again, so it does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);
/// How long `stop` tries to connect to the server to wake its accept loop.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the REST API asks of the JobManager: a seam, so the tests drive the
/// HTTP layer with a fake JobManager.
trait JobManagerApi: Send + Sync + 'static {
    fn list_jobs(&self) -> Result<Vec<JobStatus>, String>;
    fn trigger_savepoint(
        &self,
        job: JobId,
        target: Option<PathBuf>,
        stop: bool,
    ) -> Result<PathBuf, String>;
    fn cancel(&self, job: JobId) -> Result<(), String>;
}

impl JobManagerApi for JobManagerHandle {
    fn list_jobs(&self) -> Result<Vec<JobStatus>, String> {
        JobManagerHandle::list_jobs(self)
    }

    fn trigger_savepoint(
        &self,
        job: JobId,
        target: Option<PathBuf>,
        stop: bool,
    ) -> Result<PathBuf, String> {
        JobManagerHandle::trigger_savepoint(self, job, target, stop)
    }

    fn cancel(&self, job: JobId) -> Result<(), String> {
        JobManagerHandle::cancel(self, job)
    }
}

/// The REST server: an accept loop on its own thread, one short-lived
/// thread per request. Stops on [`RestServer::stop`] or when dropped;
/// requests already being served (a savepoint, say) finish on their own.
pub struct RestServer {
    address: SocketAddr,
    stopping: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl RestServer {
    /// Binds `bind` (port 0 takes any free port) and serves on its own
    /// threads. With a `secret`, every request must carry
    /// `Authorization: Bearer <secret>`.
    pub fn start(
        handle: JobManagerHandle,
        bind: SocketAddr,
        secret: Option<String>,
    ) -> Result<RestServer, String> {
        RestServer::start_with(Arc::new(handle), bind, secret)
    }

    fn start_with(
        api: Arc<dyn JobManagerApi>,
        bind: SocketAddr,
        secret: Option<String>,
    ) -> Result<RestServer, String> {
        if secret
            .as_deref()
            .is_some_and(|secret| secret.trim().is_empty())
        {
            return Err("the REST API secret is empty".to_string());
        }
        let listener = TcpListener::bind(bind)
            .map_err(|error| format!("cannot bind the REST API to {bind}: {error}"))?;
        let address = listener
            .local_addr()
            .map_err(|error| format!("cannot read the REST API's address: {error}"))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let context = AcceptContext {
            api,
            secret: secret.map(Arc::from),
            stopping: stopping.clone(),
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        let accept_thread = std::thread::Builder::new()
            .name("strom-rest".to_string())
            .spawn(move || accept_loop(listener, context))
            .map_err(|error| format!("cannot start the REST API's thread: {error}"))?;
        Ok(RestServer {
            address,
            stopping,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the server listens on (with the port it was given).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Stops accepting requests and closes the listening socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        // The accept loop blocks in accept(); a connection wakes it, it sees
        // `stopping` and returns, dropping the listener. If we cannot
        // connect, we leave the thread rather than wait for it forever.
        if TcpStream::connect_timeout(&wake_address(self.address), WAKE_TIMEOUT).is_ok() {
            let _ = accept_thread.join();
        }
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where to connect to reach a listener bound to `address` (a listener on
/// the unspecified address is reached on loopback).
fn wake_address(address: SocketAddr) -> SocketAddr {
    let ip = match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, address.port())
}

struct AcceptContext {
    api: Arc<dyn JobManagerApi>,
    secret: Option<Arc<str>>,
    stopping: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
}

/// Counts a connection in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: TcpListener, context: AcceptContext) {
    for incoming in listener.incoming() {
        if context.stopping.load(Ordering::Acquire) {
            return;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(_) => {
                std::thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        };
        let in_flight = InFlight(context.in_flight.clone());
        if context.in_flight.fetch_add(1, Ordering::AcqRel) >= CONNECTION_COUNT_MAX {
            drop(in_flight);
            refuse_busy(stream);
            continue;
        }
        let api = context.api.clone();
        let secret = context.secret.clone();
        // If the thread cannot start, the closure (stream and counter) is
        // dropped: the client sees the connection close.
        let _ = std::thread::Builder::new()
            .name("strom-rest-request".to_string())
            .spawn(move || {
                let _in_flight = in_flight;
                serve_connection(stream, &*api, secret.as_deref());
            });
    }
}

fn refuse_busy(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let failure = Failure::new(
        503,
        format!(
            "the JobManager is serving {CONNECTION_COUNT_MAX} requests already; try again shortly"
        ),
    );
    let _ = stream.write_all(&encode_reply(&failure.into_reply()));
}

/// A refusal: an HTTP status and the message for `{"errors": [...]}`.
#[derive(Debug, PartialEq)]
struct Failure {
    status: u16,
    message: String,
    /// `Allow` for 405.
    allow: Option<&'static str>,
}

impl Failure {
    fn new(status: u16, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            allow: None,
        }
    }

    fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Failure {
        Failure {
            status: 405,
            message: format!("{method} is not allowed on {path}; allowed: {allow}"),
            allow: Some(allow),
        }
    }

    fn into_reply(self) -> Reply {
        let mut headers = Vec::new();
        if let Some(allow) = self.allow {
            headers.push(("Allow", allow.to_string()));
        }
        if self.status == 401 {
            headers.push(("WWW-Authenticate", "Bearer".to_string()));
        }
        Reply {
            status: self.status,
            body: json!({ "errors": [self.message] }),
            headers,
        }
    }
}

/// An answer to send.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            headers: Vec::new(),
        }
    }
}

/// Maps a JobManager refusal to an HTTP status. The JobManager answers with
/// messages, not error kinds, so this matches its wording; keep the two in
/// step (the tests below name the messages).
fn job_manager_failure(message: String) -> Failure {
    let status = if message.starts_with("no running job") {
        404
    } else if message.starts_with("no savepoint directory") {
        400
    } else if message.starts_with("the JobManager stopped") {
        503
    } else {
        500
    };
    Failure::new(status, message)
}

fn unknown_job(job: JobId) -> Failure {
    Failure::new(404, format!("no running job {job}"))
}

/// What a request asks for, once its method and path are checked.
#[derive(Debug, PartialEq)]
enum Route {
    Jobs,
    JobsOverview,
    Job(JobId),
    Checkpoints(JobId),
    Savepoint(JobId),
    Stop(JobId),
    Cancel(JobId),
}

/// Routes a request line's method and target (path and query).
fn route(method: &str, target: &str) -> Result<Route, Failure> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let trimmed = path.strip_suffix('/').filter(|path| !path.is_empty());
    let path = trimmed.unwrap_or(path);
    let Some(relative) = path.strip_prefix('/') else {
        return Err(Failure::new(404, format!("no such endpoint: {path}")));
    };
    let segments: Vec<&str> = relative.split('/').collect();
    let job = |text: &str| JobId::from_str(text).map_err(|message| Failure::new(400, message));
    match (segments.as_slice(), method) {
        (["jobs"], "GET") => Ok(Route::Jobs),
        (["jobs"], _) => Err(Failure::method_not_allowed(method, path, "GET")),
        (["jobs", "overview"], "GET") => Ok(Route::JobsOverview),
        (["jobs", "overview"], _) => Err(Failure::method_not_allowed(method, path, "GET")),
        (["jobs", id], "GET") => Ok(Route::Job(job(id)?)),
        (["jobs", id], "PATCH") => {
            let id = job(id)?;
            match query_parameter(query, "mode") {
                None | Some("cancel") => Ok(Route::Cancel(id)),
                Some("stop") => Err(Failure::new(
                    400,
                    "mode=stop is not supported: stop with a savepoint by POST /jobs/:id/stop",
                )),
                Some(mode) => Err(Failure::new(
                    400,
                    format!("unknown mode '{mode}'; the one mode is 'cancel'"),
                )),
            }
        }
        (["jobs", _], _) => Err(Failure::method_not_allowed(method, path, "GET, PATCH")),
        (["jobs", id, "checkpoints"], "GET") => Ok(Route::Checkpoints(job(id)?)),
        (["jobs", _, "checkpoints"], _) => Err(Failure::method_not_allowed(method, path, "GET")),
        (["jobs", id, "savepoints"], "POST") => Ok(Route::Savepoint(job(id)?)),
        (["jobs", _, "savepoints"], _) => Err(Failure::method_not_allowed(method, path, "POST")),
        (["jobs", id, "stop"], "POST") => Ok(Route::Stop(job(id)?)),
        (["jobs", _, "stop"], _) => Err(Failure::method_not_allowed(method, path, "POST")),
        _ => Err(Failure::new(404, format!("no such endpoint: {path}"))),
    }
}

/// The first value of `name` in a query string (no percent-decoding: our
/// parameters are plain words).
fn query_parameter<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The body of `POST /jobs/:id/savepoints` (Flink's field names).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct SavepointBody {
    #[serde(rename = "target-directory", default)]
    target_directory: Option<String>,
    #[serde(rename = "cancel-job", default)]
    cancel_job: bool,
}

/// The body of `POST /jobs/:id/stop` (Flink's field names).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct StopBody {
    #[serde(rename = "targetDirectory", default)]
    target_directory: Option<String>,
    #[serde(default)]
    drain: bool,
}

/// Parses a JSON body; an empty body is the default (all fields absent).
fn parse_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|error| Failure::new(400, format!("malformed JSON body: {error}")))
}

/// Checks a target directory given to the JobManager: it runs in another
/// process, maybe on another machine, so a relative path would be read
/// against a working directory the client does not know.
fn target_directory(text: Option<String>) -> Result<Option<PathBuf>, Failure> {
    let Some(text) = text else {
        return Ok(None);
    };
    let path = text.strip_prefix("file://").unwrap_or(&text);
    if path.is_empty() {
        return Err(Failure::new(400, "the target directory is empty"));
    }
    if !Path::new(path).is_absolute() {
        return Err(Failure::new(
            400,
            format!("the target directory '{text}' is not an absolute path"),
        ));
    }
    Ok(Some(PathBuf::from(path)))
}

fn job_summary(job: &JobStatus) -> Value {
    json!({
        "jid": job.job_id.to_string(),
        "name": job.job_name,
        "state": job.state,
        "attempt": job.attempt,
    })
}

fn jobs_json(jobs: &[JobStatus]) -> Value {
    let jobs: Vec<Value> = jobs
        .iter()
        .map(|job| json!({ "id": job.job_id.to_string(), "status": job.state }))
        .collect();
    json!({ "jobs": jobs })
}

fn overview_json(jobs: &[JobStatus]) -> Value {
    let jobs: Vec<Value> = jobs.iter().map(job_summary).collect();
    json!({ "jobs": jobs })
}

fn checkpoints_json(job: &JobStatus) -> Value {
    let completed = job
        .latest_checkpoint
        .as_ref()
        .map(|path| json!({ "external_path": path.display().to_string() }));
    json!({
        "counts": {
            "triggered": job.checkpoints.triggered,
            "completed": job.checkpoints.completed,
            "failed": job.checkpoints.failed,
        },
        "latest": { "completed": completed },
    })
}

fn location_json(path: &Path) -> Value {
    json!({ "location": path.display().to_string() })
}

fn find_job(api: &dyn JobManagerApi, job: JobId) -> Result<JobStatus, Failure> {
    api.list_jobs()
        .map_err(job_manager_failure)?
        .into_iter()
        .find(|status| status.job_id == job)
        .ok_or_else(|| unknown_job(job))
}

/// Carries out a routed request. May block for as long as a savepoint takes.
fn dispatch(api: &dyn JobManagerApi, route: Route, body: &[u8]) -> Result<Reply, Failure> {
    match route {
        Route::Jobs => {
            let jobs = api.list_jobs().map_err(job_manager_failure)?;
            Ok(Reply::ok(200, jobs_json(&jobs)))
        }
        Route::JobsOverview => {
            let jobs = api.list_jobs().map_err(job_manager_failure)?;
            Ok(Reply::ok(200, overview_json(&jobs)))
        }
        Route::Job(job) => Ok(Reply::ok(200, job_summary(&find_job(api, job)?))),
        Route::Checkpoints(job) => Ok(Reply::ok(200, checkpoints_json(&find_job(api, job)?))),
        Route::Savepoint(job) => {
            let request: SavepointBody = parse_body(body)?;
            let target = target_directory(request.target_directory)?;
            find_job(api, job)?;
            let location = api
                .trigger_savepoint(job, target, request.cancel_job)
                .map_err(job_manager_failure)?;
            Ok(Reply::ok(200, location_json(&location)))
        }
        Route::Stop(job) => {
            let request: StopBody = parse_body(body)?;
            if request.drain {
                return Err(Failure::new(
                    400,
                    "\"drain\": true is not supported: stop takes a savepoint and ends the job without draining",
                ));
            }
            let target = target_directory(request.target_directory)?;
            find_job(api, job)?;
            let location = api
                .trigger_savepoint(job, target, true)
                .map_err(job_manager_failure)?;
            Ok(Reply::ok(200, location_json(&location)))
        }
        Route::Cancel(job) => {
            api.cancel(job).map_err(job_manager_failure)?;
            Ok(Reply::ok(202, json!({})))
        }
    }
}

/// The parts of a request head that we use.
#[derive(Debug, PartialEq)]
struct Head {
    method: String,
    target: String,
    authorization: Option<String>,
    content_length: Option<String>,
    /// A `Transfer-Encoding` header is present (a chunked body).
    transfer_encoding: bool,
    expect_continue: bool,
}

/// Parses a request head from the bytes read so far: `Ok(None)` if more
/// are needed, else the head and its length in bytes.
fn parse_head(bytes: &[u8]) -> Result<Option<(Head, usize)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; HEADER_COUNT_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let length = match request.parse(bytes) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::new(
                431,
                format!("more than {HEADER_COUNT_MAX} headers"),
            ))
        }
        Err(error) => {
            return Err(Failure::new(
                400,
                format!("malformed HTTP request: {error}"),
            ))
        }
    };
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|header| header.name.eq_ignore_ascii_case(name))
            .map(|header| String::from_utf8_lossy(header.value).trim().to_string())
    };
    let head = Head {
        method: request.method.unwrap_or_default().to_string(),
        target: request.path.unwrap_or_default().to_string(),
        authorization: header("Authorization"),
        content_length: header("Content-Length"),
        transfer_encoding: header("Transfer-Encoding").is_some(),
        expect_continue: header("Expect")
            .is_some_and(|value| value.eq_ignore_ascii_case("100-continue")),
    };
    Ok(Some((head, length)))
}

/// The body length a request declares, refused if over [`BODY_SIZE_MAX`].
fn body_length(head: &Head) -> Result<usize, Failure> {
    if head.transfer_encoding {
        return Err(Failure::new(
            411,
            "chunked request bodies are not supported: send Content-Length",
        ));
    }
    let Some(text) = &head.content_length else {
        return Ok(0);
    };
    let length: u64 = text
        .parse()
        .map_err(|_| Failure::new(400, format!("malformed Content-Length '{text}'")))?;
    if length > BODY_SIZE_MAX as u64 {
        return Err(Failure::new(
            413,
            format!("the request body is {length} bytes; the limit is {BODY_SIZE_MAX}"),
        ));
    }
    Ok(length as usize)
}

/// Whether an `Authorization` header carries `Bearer <secret>`.
fn authorized(authorization: Option<&str>, secret: &str) -> bool {
    let Some((scheme, token)) = authorization.and_then(|value| value.split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && equal_in_constant_time(token.trim(), secret)
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guessed secret was right.
fn equal_in_constant_time(left: &str, right: &str) -> bool {
    let (left, right) = (left.as_bytes(), right.as_bytes());
    let mut difference = u8::from(left.len() != right.len());
    for (index, byte) in left.iter().enumerate() {
        difference |= byte ^ right.get(index).copied().unwrap_or(!byte);
    }
    difference == 0
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn encode_reply(reply: &Reply) -> Vec<u8> {
    let body = reply.body.to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reason_phrase(reply.status),
        body.len()
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

fn read_failure(error: std::io::Error, what: &str) -> Failure {
    match error.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::new(
            408,
            format!("the {what} did not arrive within {SOCKET_TIMEOUT:?}"),
        ),
        _ => Failure::new(400, format!("cannot read the {what}: {error}")),
    }
}

/// Serves the one request of a connection and closes it.
fn serve_connection(mut stream: TcpStream, api: &dyn JobManagerApi, secret: Option<&str>) {
    let _ = stream.set_read_timeout(Some(SOCKET_TIMEOUT));
    let _ = stream.set_write_timeout(Some(SOCKET_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let mut body_unread = true;
    let reply = match serve_request(&mut stream, api, secret, &mut body_unread) {
        Ok(Some(reply)) => reply,
        Ok(None) => return,
        Err(failure) => failure.into_reply(),
    };
    if stream.write_all(&encode_reply(&reply)).is_err() {
        return;
    }
    let _ = stream.flush();
    if body_unread {
        discard_unread(&mut stream);
    }
}

/// Reads, checks and carries out one request. `Ok(None)`: the client left
/// before sending a whole head, there is no one to answer.
fn serve_request(
    stream: &mut TcpStream,
    api: &dyn JobManagerApi,
    secret: Option<&str>,
    body_unread: &mut bool,
) -> Result<Option<Reply>, Failure> {
    let mut bytes = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head, head_length) = loop {
        let room = HEAD_SIZE_MAX - bytes.len();
        let wanted = room.min(chunk.len());
        let read = match stream.read(&mut chunk[..wanted]) {
            Ok(0) => return Ok(None),
            Ok(read) => read,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(read_failure(error, "request head")),
        };
        bytes.extend_from_slice(&chunk[..read]);
        if let Some(parsed) = parse_head(&bytes)? {
            break parsed;
        }
        if bytes.len() == HEAD_SIZE_MAX {
            return Err(Failure::new(
                431,
                format!("the request head is over {HEAD_SIZE_MAX} bytes"),
            ));
        }
    };
    if let Some(secret) = secret {
        if !authorized(head.authorization.as_deref(), secret) {
            return Err(Failure::new(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <secret>'",
            ));
        }
    }
    let route = route(&head.method, &head.target)?;
    let length = body_length(&head)?;
    if head.expect_continue && length > 0 {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|error| Failure::new(400, format!("cannot answer 100 Continue: {error}")))?;
    }
    let mut body = bytes.split_off(head_length);
    body.truncate(length);
    if body.len() < length {
        let start = body.len();
        body.resize(length, 0);
        stream
            .read_exact(&mut body[start..])
            .map_err(|error| read_failure(error, "request body"))?;
    }
    *body_unread = false;
    dispatch(api, route, &body).map(Some)
}

/// Swallows what the client still sends, within bounds, after our answer.
fn discard_unread(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(DISCARD_DURATION_MAX));
    let deadline = Instant::now() + DISCARD_DURATION_MAX;
    let mut chunk = [0u8; 4096];
    let mut discarded = 0;
    while discarded < DISCARD_SIZE_MAX && Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(read) => discarded += read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::CheckpointCounts;
    use std::sync::Mutex;

    const JOB: &str = "0123456789abcdef0123456789abcdef";

    fn job_id() -> JobId {
        JOB.parse().unwrap()
    }

    fn status() -> JobStatus {
        JobStatus {
            job_id: job_id(),
            job_name: "nexmark-q5".to_string(),
            state: "RUNNING".to_string(),
            attempt: 1,
            checkpoints: CheckpointCounts {
                triggered: 3,
                completed: 2,
                failed: 1,
            },
            latest_checkpoint: Some(PathBuf::from("/checkpoints/chk-2")),
        }
    }

    #[test]
    fn routes_flink_paths() {
        assert_eq!(route("GET", "/jobs"), Ok(Route::Jobs));
        assert_eq!(route("GET", "/jobs/"), Ok(Route::Jobs));
        assert_eq!(route("GET", "/jobs/overview"), Ok(Route::JobsOverview));
        assert_eq!(
            route("GET", &format!("/jobs/{JOB}")),
            Ok(Route::Job(job_id()))
        );
        assert_eq!(
            route("GET", &format!("/jobs/{JOB}/checkpoints")),
            Ok(Route::Checkpoints(job_id()))
        );
        assert_eq!(
            route("POST", &format!("/jobs/{JOB}/savepoints")),
            Ok(Route::Savepoint(job_id()))
        );
        assert_eq!(
            route("POST", &format!("/jobs/{JOB}/stop")),
            Ok(Route::Stop(job_id()))
        );
        assert_eq!(
            route("PATCH", &format!("/jobs/{JOB}?mode=cancel")),
            Ok(Route::Cancel(job_id()))
        );
        assert_eq!(
            route("PATCH", &format!("/jobs/{JOB}")),
            Ok(Route::Cancel(job_id()))
        );
    }

    #[test]
    fn refuses_bad_routes_with_the_right_status() {
        let status = |method: &str, target: &str| route(method, target).unwrap_err().status;
        assert_eq!(status("GET", "/"), 404);
        assert_eq!(status("GET", "/taskmanagers"), 404);
        assert_eq!(status("GET", &format!("/jobs/{JOB}/vertices")), 404);
        assert_eq!(status("GET", "jobs"), 404);
        assert_eq!(status("DELETE", "/jobs"), 405);
        assert_eq!(status("GET", &format!("/jobs/{JOB}/savepoints")), 405);
        assert_eq!(status("POST", &format!("/jobs/{JOB}")), 405);
        assert_eq!(status("PATCH", &format!("/jobs/{JOB}?mode=stop")), 400);
        assert_eq!(status("PATCH", &format!("/jobs/{JOB}?mode=pause")), 400);
        let malformed = route("GET", "/jobs/not-a-job/checkpoints").unwrap_err();
        assert_eq!(malformed.status, 400);
        assert!(
            malformed.message.contains("not-a-job"),
            "{}",
            malformed.message
        );
        let wrong_method = route("PUT", "/jobs").unwrap_err();
        assert_eq!(wrong_method.allow, Some("GET"));
    }

    #[test]
    fn parses_savepoint_and_stop_bodies() {
        assert_eq!(
            parse_body::<SavepointBody>(b""),
            Ok(SavepointBody::default())
        );
        assert_eq!(
            parse_body::<SavepointBody>(b" \r\n"),
            Ok(SavepointBody::default())
        );
        assert_eq!(
            parse_body::<SavepointBody>(br#"{"target-directory": "/sp", "cancel-job": true}"#),
            Ok(SavepointBody {
                target_directory: Some("/sp".to_string()),
                cancel_job: true
            })
        );
        assert_eq!(
            parse_body::<StopBody>(br#"{"targetDirectory": null}"#),
            Ok(StopBody::default())
        );
        let malformed = parse_body::<StopBody>(b"{\"targetDirectory\": ").unwrap_err();
        assert_eq!(malformed.status, 400);
        assert!(
            malformed.message.starts_with("malformed JSON body"),
            "{}",
            malformed.message
        );
        // Flink's REST API is strict; a field of the other endpoint is a typo.
        let unknown = parse_body::<SavepointBody>(br#"{"targetDirectory": "/sp"}"#).unwrap_err();
        assert!(
            unknown.message.contains("targetDirectory"),
            "{}",
            unknown.message
        );
    }

    #[test]
    fn target_directories_must_be_absolute() {
        assert_eq!(target_directory(None), Ok(None));
        assert_eq!(
            target_directory(Some("/sp".to_string())),
            Ok(Some(PathBuf::from("/sp")))
        );
        assert_eq!(
            target_directory(Some("file:///sp".to_string())),
            Ok(Some(PathBuf::from("/sp")))
        );
        assert_eq!(
            target_directory(Some("sp".to_string())).unwrap_err().status,
            400
        );
        assert_eq!(
            target_directory(Some(String::new())).unwrap_err().status,
            400
        );
    }

    #[test]
    fn answers_in_flink_shapes() {
        let jobs = [status()];
        assert_eq!(
            jobs_json(&jobs),
            json!({ "jobs": [{ "id": JOB, "status": "RUNNING" }] })
        );
        assert_eq!(
            overview_json(&jobs),
            json!({ "jobs": [{ "jid": JOB, "name": "nexmark-q5", "state": "RUNNING", "attempt": 1 }] })
        );
        assert_eq!(
            checkpoints_json(&jobs[0]),
            json!({
                "counts": { "triggered": 3, "completed": 2, "failed": 1 },
                "latest": { "completed": { "external_path": "/checkpoints/chk-2" } },
            })
        );
        let first = JobStatus {
            latest_checkpoint: None,
            ..status()
        };
        assert_eq!(
            checkpoints_json(&first)["latest"],
            json!({ "completed": null })
        );
        let reply = Failure::new(404, "no running job x").into_reply();
        assert_eq!(reply.body, json!({ "errors": ["no running job x"] }));
    }

    #[test]
    fn maps_job_manager_messages_to_statuses() {
        let status = |message: &str| job_manager_failure(message.to_string()).status;
        assert_eq!(status(&format!("no running job {JOB}")), 404);
        assert_eq!(
            status("no savepoint directory: give one, or run the job with --checkpoint-dir"),
            400
        );
        assert_eq!(status("the JobManager stopped"), 503);
        assert_eq!(status("the JobManager stopped before it answered"), 503);
        assert_eq!(status("savepoint 7 aborted: a task failed"), 500);
    }

    #[test]
    fn parses_heads_and_bounds_bodies() {
        assert_eq!(parse_head(b"GET /jobs HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let raw = b"POST /jobs HTTP/1.1\r\nauthorization: Bearer s3\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n{}";
        let (head, length) = parse_head(raw).unwrap().unwrap();
        assert_eq!(length, raw.len() - 2);
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/jobs");
        assert_eq!(head.authorization.as_deref(), Some("Bearer s3"));
        assert!(head.expect_continue);
        assert_eq!(body_length(&head), Ok(2));
        assert_eq!(
            parse_head(b"GET /jobs HTTP/9\r\n\r\n").unwrap_err().status,
            400
        );
        let many: String = (0..=HEADER_COUNT_MAX)
            .map(|index| format!("h{index}: v\r\n"))
            .collect();
        let raw = format!("GET /jobs HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(raw.as_bytes()).unwrap_err().status, 431);

        let with = |content_length: Option<&str>, transfer_encoding: bool| Head {
            content_length: content_length.map(str::to_string),
            transfer_encoding,
            ..head_of("GET", "/jobs")
        };
        assert_eq!(body_length(&with(None, false)), Ok(0));
        assert_eq!(body_length(&with(Some("65536"), false)), Ok(BODY_SIZE_MAX));
        assert_eq!(
            body_length(&with(Some("65537"), false)).unwrap_err().status,
            413
        );
        assert_eq!(
            body_length(&with(Some("99999999999999999999999"), false))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            body_length(&with(Some("-1"), false)).unwrap_err().status,
            400
        );
        assert_eq!(body_length(&with(None, true)).unwrap_err().status, 411);
    }

    fn head_of(method: &str, target: &str) -> Head {
        Head {
            method: method.to_string(),
            target: target.to_string(),
            authorization: None,
            content_length: None,
            transfer_encoding: false,
            expect_continue: false,
        }
    }

    #[test]
    fn checks_bearer_tokens() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(authorized(Some("bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cretX"), "s3cret"));
        assert!(!authorized(Some("Basic s3cret"), "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }

    /// A JobManager with one running job whose savepoints wait until the
    /// test releases them.
    struct FakeJobManager {
        jobs: Mutex<Vec<JobStatus>>,
        savepoint_released: AtomicBool,
        savepoints: Mutex<Vec<(JobId, Option<PathBuf>, bool)>>,
    }

    impl FakeJobManager {
        fn new() -> Arc<FakeJobManager> {
            Arc::new(FakeJobManager {
                jobs: Mutex::new(vec![status()]),
                savepoint_released: AtomicBool::new(true),
                savepoints: Mutex::new(Vec::new()),
            })
        }
    }

    impl JobManagerApi for FakeJobManager {
        fn list_jobs(&self) -> Result<Vec<JobStatus>, String> {
            Ok(self.jobs.lock().unwrap().clone())
        }

        fn trigger_savepoint(
            &self,
            job: JobId,
            target: Option<PathBuf>,
            stop: bool,
        ) -> Result<PathBuf, String> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.savepoint_released.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.savepoints
                .lock()
                .unwrap()
                .push((job, target.clone(), stop));
            let Some(target) = target else {
                return Err(
                    "no savepoint directory: give one, or run the job with --checkpoint-dir"
                        .to_string(),
                );
            };
            Ok(target.join("savepoint-1"))
        }

        fn cancel(&self, job: JobId) -> Result<(), String> {
            let mut jobs = self.jobs.lock().unwrap();
            let before = jobs.len();
            jobs.retain(|status| status.job_id != job);
            if jobs.len() == before {
                return Err(format!("no running job {job}"));
            }
            Ok(())
        }
    }

    fn start(fake: &Arc<FakeJobManager>, secret: Option<&str>) -> RestServer {
        let api: Arc<dyn JobManagerApi> = fake.clone();
        RestServer::start_with(
            api,
            "127.0.0.1:0".parse().unwrap(),
            secret.map(str::to_string),
        )
        .unwrap()
    }

    /// Sends raw bytes, reads the whole answer; returns status, headers and JSON body.
    fn exchange(server: &RestServer, raw: &[u8]) -> (u16, String, Value) {
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(raw).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (
            status,
            head.to_string(),
            serde_json::from_str(body).unwrap(),
        )
    }

    fn request(method: &str, target: &str, body: &str) -> Vec<u8> {
        format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn serves_list_savepoint_stop_and_cancel_over_http() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let (status, _, body) = exchange(&server, &request("GET", "/jobs", ""));
        assert_eq!(
            (status, body),
            (200, json!({ "jobs": [{ "id": JOB, "status": "RUNNING" }] }))
        );

        let target = format!("/jobs/{JOB}/savepoints");
        let (status, _, body) = exchange(
            &server,
            &request("POST", &target, r#"{"target-directory": "/sp"}"#),
        );
        assert_eq!(
            (status, body),
            (200, json!({ "location": "/sp/savepoint-1" }))
        );
        let (status, _, body) = exchange(&server, &request("POST", &target, ""));
        assert_eq!(status, 400, "{body}");
        assert!(body["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("no savepoint directory"));

        let target = format!("/jobs/{JOB}/stop");
        let (status, _, body) = exchange(
            &server,
            &request("POST", &target, r#"{"targetDirectory": "/stop"}"#),
        );
        assert_eq!(
            (status, body),
            (200, json!({ "location": "/stop/savepoint-1" }))
        );
        assert_eq!(
            fake.savepoints.lock().unwrap().last(),
            Some(&(job_id(), Some(PathBuf::from("/stop")), true))
        );

        let target = format!("/jobs/{JOB}?mode=cancel");
        let (status, _, body) = exchange(&server, &request("PATCH", &target, ""));
        assert_eq!((status, body), (202, json!({})));
        let (status, _, body) = exchange(&server, &request("PATCH", &target, ""));
        assert_eq!(
            (status, body),
            (404, json!({ "errors": [format!("no running job {JOB}")] }))
        );
        let target = format!("/jobs/{JOB}/checkpoints");
        assert_eq!(exchange(&server, &request("GET", &target, "")).0, 404);
        server.stop();
    }

    #[test]
    fn refuses_a_huge_body_from_its_header_without_reading_it() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let target = format!("/jobs/{JOB}/savepoints");
        // A terabyte declared, a few bytes sent: answered at once.
        let raw = format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n{{\"a\":"
        );
        let (status, head, body) = exchange(&server, raw.as_bytes());
        assert_eq!(status, 413, "{body}");
        assert!(head.contains("Connection: close"));
        // And the server is still there.
        assert_eq!(exchange(&server, &request("GET", "/jobs", "")).0, 200);
    }

    #[test]
    fn refuses_requests_without_the_bearer_token() {
        let fake = FakeJobManager::new();
        let server = start(&fake, Some("s3cret"));
        let (status, head, _) = exchange(&server, &request("GET", "/jobs", ""));
        assert_eq!(status, 401);
        assert!(head.contains("WWW-Authenticate: Bearer"));
        let raw = b"GET /jobs HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n";
        assert_eq!(exchange(&server, raw).0, 401);
        let raw = b"GET /jobs HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n";
        assert_eq!(exchange(&server, raw).0, 200);
        let api: Arc<dyn JobManagerApi> = fake.clone();
        let empty = RestServer::start_with(api, "127.0.0.1:0".parse().unwrap(), Some(" ".into()));
        assert!(empty.is_err());
    }

    #[test]
    fn a_slow_savepoint_does_not_hold_up_other_requests() {
        let fake = FakeJobManager::new();
        fake.savepoint_released.store(false, Ordering::Release);
        let server = Arc::new(start(&fake, None));
        let waiting = {
            let server = server.clone();
            std::thread::spawn(move || {
                let target = format!("/jobs/{JOB}/savepoints");
                exchange(
                    &server,
                    &request("POST", &target, r#"{"target-directory": "/sp"}"#),
                )
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            exchange(&server, &request("GET", "/jobs/overview", "")).0,
            200
        );
        assert!(!waiting.is_finished());
        fake.savepoint_released.store(true, Ordering::Release);
        assert_eq!(waiting.join().unwrap().0, 200);
    }

    #[test]
    fn answers_malformed_requests_and_frees_the_port_on_stop() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let target = format!("/jobs/{JOB}/savepoints");
        let (status, _, body) = exchange(&server, &request("POST", &target, "{nope"));
        assert_eq!(status, 400);
        assert!(body["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON body"));
        assert_eq!(
            exchange(&server, &request("GET", "/jobs/123/checkpoints", "")).0,
            400
        );
        assert_eq!(exchange(&server, &request("DELETE", "/jobs", "")).0, 405);
        assert_eq!(exchange(&server, &request("GET", "/nothing", "")).0, 404);
        let raw = b"POST /jobs/x/stop HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        // The route is checked before the body: a malformed id wins.
        assert_eq!(exchange(&server, raw).0, 400);
        let raw = format!("POST {target} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(exchange(&server, raw.as_bytes()).0, 411);

        let address = server.local_addr();
        server.stop();
        assert!(TcpStream::connect(address).is_err());
        // Dropping stops too, and the port can be bound again.
        let again = RestServer::start_with(fake, address, None).unwrap();
        drop(again);
    }
}
