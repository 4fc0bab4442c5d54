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
//! with its location, so a client needs one request and no polling. Every
//! call into the JobManager runs on tokio's blocking pool
//! (`spawn_blocking`), so a savepoint that takes seconds never holds up
//! `GET /jobs`. `"cancel-job": true` stops the job after the savepoint, as
//! `POST /jobs/:id/stop` does. `"drain": true` is refused.
//!
//! Refusals: an unknown job is 404; a malformed job id, malformed JSON, an
//! unknown body field (Flink's REST API is strict too), a relative target
//! directory or a malformed request (bad request line, bad `Content-Length`)
//! is 400; a body over [`BODY_SIZE_MAX`] is 413, answered from the
//! `Content-Length` header without reading the body (a chunked body is read
//! up to the limit and refused as soon as it passes it); a wrong method is
//! 405 with `Allow`; an unknown path is 404; a missing or wrong bearer token
//! (when the server has a secret) is 401 with `WWW-Authenticate: Bearer`; a
//! body that does not arrive within [`BODY_READ_TIMEOUT`] is 408; a request
//! head over [`HEAD_SIZE_MAX`] or with more than [`HEADER_COUNT_MAX`]
//! headers is 431; more than [`CONNECTION_COUNT_MAX`] connections at once
//! is 503.
//!
//! # HTTP
//!
//! Served by hyper 1.x (HTTP/1.1 only) on a tokio current-thread runtime
//! that runs on the server's own thread, `strom-rest`, apart from the
//! glommio executors that run tasks. Only the JobManager calls leave that
//! thread, for tokio's blocking pool. We do not parse HTTP ourselves, and we
//! do not use `tiny_http` 0.12: when it drops an unread request body it
//! allocates the body's declared `Content-Length` in one piece, so a single
//! request claiming a terabyte aborts the process (and with it every running
//! job). hyper never allocates from a declared length, and we look at the
//! declared length before reading a byte of the body.
//!
//! Every resource a client can make us hold is bounded, so no client can
//! take memory, threads or file descriptors from the jobs:
//! - one request per connection (`Connection: close`): the API is used by
//!   a CLI making a request or two, and without keep-alive an idle client
//!   cannot sit on one of the [`CONNECTION_COUNT_MAX`] connections;
//! - at most [`CONNECTION_COUNT_MAX`] connections are served at once (a
//!   semaphore), each with at most one JobManager call on the blocking pool,
//!   which is sized to match. Past that, up to [`BUSY_CONNECTION_COUNT_MAX`]
//!   more are answered 503 within [`BUSY_ANSWER_TIMEOUT`], and any more are
//!   closed at once;
//! - the request head must arrive within [`HEADER_READ_TIMEOUT`] and fit in
//!   [`HEAD_SIZE_MAX`] bytes and [`HEADER_COUNT_MAX`] headers; the body
//!   must arrive within [`BODY_READ_TIMEOUT`] and fit in [`BODY_SIZE_MAX`]
//!   (`http_body_util::Limited`), and hyper's read buffer is at most
//!   [`READ_BUFFER_SIZE_MAX`]; so a connection holds at most about 128 KiB;
//! - [`RestServer::stop`] closes the listening socket at once, then lets the
//!   requests in flight finish for up to [`SHUTDOWN_GRACE_DURATION`] (so
//!   the client of a `POST /jobs/:id/stop` that ended the job still gets
//!   its answer) before it drops them. A JobManager call still running then
//!   finishes on its own thread and its answer is dropped.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_lite::future;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming, SizeHint};
use hyper::header::{
    HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Semaphore};

use crate::local::JobManagerHandle;
use crate::messages::{JobId, JobStatus};

/// The largest request body accepted (Flink's JSON bodies are tiny).
pub const BODY_SIZE_MAX: usize = 64 * 1024;
/// The largest request line plus headers accepted.
pub const HEAD_SIZE_MAX: usize = 16 * 1024;
/// The most headers one request may carry.
pub const HEADER_COUNT_MAX: usize = 64;
/// The most connections served at once.
pub const CONNECTION_COUNT_MAX: usize = 32;
/// Past [`CONNECTION_COUNT_MAX`], how many more connections are answered
/// 503 at once; any more are closed without an answer.
pub const BUSY_CONNECTION_COUNT_MAX: usize = 32;
/// The most bytes hyper buffers from one connection (head, or a piece of
/// the body on its way to [`Limited`]). hyper's floor is 8 KiB.
pub const READ_BUFFER_SIZE_MAX: usize = 64 * 1024;
/// How long a client may take to send the request head, so a silent or
/// slow client cannot hold one of the [`CONNECTION_COUNT_MAX`] connections.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send the request body, for the same reason.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection refused with 503 may take in all.
pub const BUSY_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long [`RestServer::stop`] lets requests in flight finish.
pub const SHUTDOWN_GRACE_DURATION: Duration = Duration::from_secs(5);
/// How long the accept loop waits after a failed accept (out of file
/// descriptors, say) before trying again, so it does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

const _: () = assert!(READ_BUFFER_SIZE_MAX >= 8 * 1024, "hyper's floor");
const _: () = assert!(READ_BUFFER_SIZE_MAX >= HEAD_SIZE_MAX);

/// The limits that the tests shrink (a 10 second timeout or 32 idle
/// connections make slow tests); the server runs with [`Limits::DEFAULT`].
#[derive(Clone, Copy, Debug)]
struct Limits {
    connection_count_max: usize,
    header_read_timeout: Duration,
    body_read_timeout: Duration,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        connection_count_max: CONNECTION_COUNT_MAX,
        header_read_timeout: HEADER_READ_TIMEOUT,
        body_read_timeout: BODY_READ_TIMEOUT,
    };
}

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

/// The REST server: hyper on a tokio current-thread runtime on its own
/// thread. Stops on [`RestServer::stop`] or when dropped.
pub struct RestServer {
    address: SocketAddr,
    /// Dropped or sent to tell the accept loop to stop.
    stop_sender: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RestServer {
    /// Binds `bind` (port 0 takes any free port) and serves on its own
    /// thread. With a `secret`, every request must carry
    /// `Authorization: Bearer <secret>`.
    pub fn start(
        handle: JobManagerHandle,
        bind: SocketAddr,
        secret: Option<String>,
    ) -> Result<RestServer, String> {
        RestServer::start_with(Arc::new(handle), bind, secret, Limits::DEFAULT)
    }

    fn start_with(
        api: Arc<dyn JobManagerApi>,
        bind: SocketAddr,
        secret: Option<String>,
        limits: Limits,
    ) -> Result<RestServer, String> {
        if secret
            .as_deref()
            .is_some_and(|secret| secret.trim().is_empty())
        {
            return Err("the REST API secret is empty".to_string());
        }
        // Bound here rather than on the server's thread, so that a taken
        // port is an error of `start` (the caller may try another port).
        let listener = StdTcpListener::bind(bind)
            .map_err(|error| format!("cannot bind the REST API to {bind}: {error}"))?;
        let address = listener
            .local_addr()
            .map_err(|error| format!("cannot read the REST API's address: {error}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|error| format!("cannot set up the REST API's socket: {error}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            // Each connection makes at most one JobManager call at a time.
            .max_blocking_threads(limits.connection_count_max)
            .thread_name("strom-rest-blocking")
            .build()
            .map_err(|error| format!("cannot start the REST API's runtime: {error}"))?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)
                .map_err(|error| format!("cannot set up the REST API's socket: {error}"))?
        };
        let context = Arc::new(ServeContext {
            api,
            secret: secret.map(Arc::from),
            limits,
        });
        let (stop_sender, stop_receiver) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("strom-rest".to_string())
            .spawn(move || run(runtime, listener, context, stop_receiver))
            .map_err(|error| format!("cannot start the REST API's thread: {error}"))?;
        Ok(RestServer {
            address,
            stop_sender: Some(stop_sender),
            thread: Some(thread),
        })
    }

    /// The address the server listens on (with the port it was given).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Closes the listening socket (the port is free when this returns),
    /// lets requests in flight finish for up to [`SHUTDOWN_GRACE_DURATION`],
    /// and stops the server's thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop_sender) = self.stop_sender.take() {
            let _ = stop_sender.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The thread ends within the grace period: it does not wait for
            // JobManager calls past it.
            let _ = thread.join();
        }
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What every request of one server shares.
struct ServeContext {
    api: Arc<dyn JobManagerApi>,
    secret: Option<Arc<str>>,
    limits: Limits,
}

/// The server's thread: serves until told to stop, then drops the runtime
/// without waiting for JobManager calls still on the blocking pool.
fn run(
    runtime: Runtime,
    listener: TcpListener,
    context: Arc<ServeContext>,
    stop_receiver: oneshot::Receiver<()>,
) {
    runtime.block_on(serve(listener, context, stop_receiver));
    runtime.shutdown_background();
}

/// What woke the accept loop.
enum Event {
    Stop,
    Accepted(std::io::Result<TcpStream>),
}

async fn serve(
    listener: TcpListener,
    context: Arc<ServeContext>,
    mut stop_receiver: oneshot::Receiver<()>,
) {
    let connections = Arc::new(Semaphore::new(context.limits.connection_count_max));
    let busy_connections = Arc::new(Semaphore::new(BUSY_CONNECTION_COUNT_MAX));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(context.limits.header_read_timeout)
        .max_header_size(HEAD_SIZE_MAX)
        .max_headers(HEADER_COUNT_MAX)
        .max_buf_size(READ_BUFFER_SIZE_MAX);
    loop {
        let stopped = async {
            // A dropped sender means stop too.
            let _ = (&mut stop_receiver).await;
            Event::Stop
        };
        let accepted = async { Event::Accepted(listener.accept().await.map(|(stream, _)| stream)) };
        let stream = match future::or(stopped, accepted).await {
            Event::Stop => break,
            Event::Accepted(Ok(stream)) => stream,
            Event::Accepted(Err(_)) => {
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Ok(permit) = connections.clone().try_acquire_owned() {
            let context = context.clone();
            let service = service_fn(move |request| answer(context.clone(), request));
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                // Errors are the client's (it left, or sent garbage that
                // hyper answered already): there is no one to tell.
                let _ = connection.await;
                drop(permit);
            });
        } else if let Ok(permit) = busy_connections.clone().try_acquire_owned() {
            let limit = context.limits.connection_count_max;
            let service = service_fn(move |_request| async move {
                Ok::<_, Infallible>(busy_failure(limit).into_reply().into_response())
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(BUSY_ANSWER_TIMEOUT, connection).await;
                drop(permit);
            });
        }
        // Else the stream is dropped: the client sees the connection close.
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE_DURATION, graceful.shutdown()).await;
}

fn busy_failure(connection_count_max: usize) -> Failure {
    let mut failure = Failure::new(
        503,
        format!(
            "the JobManager is serving {connection_count_max} requests already; try again shortly"
        ),
    );
    failure.retry_after = true;
    failure
}

/// Serves one request: hyper's service function.
async fn answer(
    context: Arc<ServeContext>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = match serve_request(&context, request).await {
        Ok(reply) => reply,
        Err(failure) => failure.into_reply(),
    };
    Ok(reply.into_response())
}

/// Checks, reads and carries out one request.
async fn serve_request(
    context: &ServeContext,
    request: Request<Incoming>,
) -> Result<Reply, Failure> {
    if let Some(secret) = &context.secret {
        let authorization = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        if !authorized(authorization, secret) {
            return Err(Failure::new(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <secret>'",
            ));
        }
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |path_and_query| path_and_query.as_str());
    let route = route(request.method().as_str(), target)?;
    let body = read_body(request.into_body(), context.limits.body_read_timeout).await?;
    let api = context.api.clone();
    tokio::task::spawn_blocking(move || dispatch(&*api, route, &body))
        .await
        .unwrap_or_else(|error| {
            Err(Failure::new(
                500,
                format!("the request failed in the JobManager client: {error}"),
            ))
        })
}

/// Refuses a body whose declared size (`Content-Length`; hyper has
/// checked its syntax) is over [`BODY_SIZE_MAX`], before reading any of it.
fn check_declared_size(size: &SizeHint) -> Result<(), Failure> {
    if size.lower() > BODY_SIZE_MAX as u64 {
        return Err(Failure::new(
            413,
            format!(
                "the request body is {} bytes; the limit is {BODY_SIZE_MAX}",
                size.lower()
            ),
        ));
    }
    Ok(())
}

/// Reads a body of at most [`BODY_SIZE_MAX`] bytes within `timeout`.
async fn read_body(body: Incoming, timeout: Duration) -> Result<Bytes, Failure> {
    check_declared_size(&body.size_hint())?;
    let collected = tokio::time::timeout(timeout, Limited::new(body, BODY_SIZE_MAX).collect())
        .await
        .map_err(|_| {
            Failure::new(
                408,
                format!("the request body did not arrive within {timeout:?}"),
            )
        })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(Failure::new(
            413,
            format!("the request body is over the limit of {BODY_SIZE_MAX} bytes"),
        )),
        Err(error) => Err(Failure::new(
            400,
            format!("cannot read the request body: {error}"),
        )),
    }
}

/// A refusal: an HTTP status and the message for `{"errors": [...]}`.
#[derive(Debug, PartialEq)]
struct Failure {
    status: u16,
    message: String,
    /// `Allow` for 405.
    allow: Option<&'static str>,
    /// `Retry-After` for 503 when busy.
    retry_after: bool,
}

impl Failure {
    fn new(status: u16, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            allow: None,
            retry_after: false,
        }
    }

    fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Failure {
        Failure {
            allow: Some(allow),
            ..Failure::new(
                405,
                format!("{method} is not allowed on {path}; allowed: {allow}"),
            )
        }
    }

    fn into_reply(self) -> Reply {
        let mut headers = Vec::new();
        if let Some(allow) = self.allow {
            headers.push((ALLOW, HeaderValue::from_static(allow)));
        }
        if self.status == 401 {
            headers.push((WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if self.retry_after {
            headers.push((RETRY_AFTER, HeaderValue::from_static("1")));
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
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            headers: Vec::new(),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body.to_string())));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::CheckpointCounts;
    use crate::local::{LocalCluster, LocalClusterConfig};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;

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
            Limits::DEFAULT,
        )
        .unwrap()
    }

    fn start_limited(fake: &Arc<FakeJobManager>, limits: Limits) -> RestServer {
        let api: Arc<dyn JobManagerApi> = fake.clone();
        RestServer::start_with(api, "127.0.0.1:0".parse().unwrap(), None, limits).unwrap()
    }

    fn connect(server: &RestServer) -> TcpStream {
        let stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// Sends raw bytes, reads the whole answer (the server closes the
    /// connection after it); returns the status, the head in lower case
    /// and the JSON body.
    fn exchange(server: &RestServer, raw: &[u8]) -> (u16, String, Value) {
        let mut stream = connect(server);
        stream.write_all(raw).unwrap();
        read_answer(&mut stream)
    }

    fn read_answer(stream: &mut TcpStream) -> (u16, String, Value) {
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap()
        };
        (status, head.to_ascii_lowercase(), body)
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
        let (status, head, body) = exchange(&server, &request("GET", "/jobs", ""));
        assert_eq!(
            (status, body),
            (200, json!({ "jobs": [{ "id": JOB, "status": "RUNNING" }] }))
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("connection: close"), "{head}");

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
    fn refuses_declared_sizes_over_the_limit() {
        assert_eq!(check_declared_size(&SizeHint::with_exact(0)), Ok(()));
        assert_eq!(
            check_declared_size(&SizeHint::with_exact(BODY_SIZE_MAX as u64)),
            Ok(())
        );
        let over = check_declared_size(&SizeHint::with_exact(BODY_SIZE_MAX as u64 + 1));
        assert_eq!(over.unwrap_err().status, 413);
        // A chunked body declares nothing: it is bounded while read.
        assert_eq!(check_declared_size(&SizeHint::new()), Ok(()));
    }

    #[test]
    fn refuses_a_huge_body_from_its_header_without_reading_it() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let target = format!("/jobs/{JOB}/savepoints");
        // A terabyte declared, a few bytes sent: answered at once. Had the
        // server allocated the declared size, the allocation would fail on
        // this machine and abort the test process, as tiny_http did.
        let raw = format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n{{\"a\":"
        );
        let (status, head, body) = exchange(&server, raw.as_bytes());
        assert_eq!(status, 413, "{body}");
        assert!(
            body["errors"][0]
                .as_str()
                .unwrap()
                .contains("1099511627776 bytes"),
            "{body}"
        );
        assert!(head.contains("connection: close"), "{head}");
        // And the server is still there.
        assert_eq!(exchange(&server, &request("GET", "/jobs", "")).0, 200);
    }

    #[test]
    fn bounds_bodies_heads_and_headers() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let target = format!("/jobs/{JOB}/savepoints");
        // Exactly the limit is accepted.
        let mut body = r#"{"target-directory": "/sp"}"#.to_string();
        body.push_str(&" ".repeat(BODY_SIZE_MAX - body.len()));
        assert_eq!(exchange(&server, &request("POST", &target, &body)).0, 200);
        // One byte over is refused from the header.
        body.push(' ');
        assert_eq!(exchange(&server, &request("POST", &target, &body)).0, 413);

        // A chunked body is read, and refused once it passes the limit.
        let chunked = |body: &str| {
            format!(
                "POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
        };
        let raw = chunked(r#"{"target-directory": "/chunked"}"#);
        let (status, _, body) = exchange(&server, raw.as_bytes());
        assert_eq!(
            (status, body),
            (200, json!({ "location": "/chunked/savepoint-1" }))
        );
        let raw = chunked(&" ".repeat(BODY_SIZE_MAX + 1));
        let (status, _, body) = exchange(&server, raw.as_bytes());
        assert_eq!(status, 413, "{body}");

        // Malformed heads: hyper answers them.
        assert_eq!(exchange(&server, b"GET /jobs HTTP/9\r\n\r\n").0, 400);
        let raw = b"POST /jobs HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(exchange(&server, raw).0, 400);
        let many: String = (0..=HEADER_COUNT_MAX)
            .map(|index| format!("h{index}: v\r\n"))
            .collect();
        let raw = format!("GET /jobs HTTP/1.1\r\n{many}\r\n");
        assert_eq!(exchange(&server, raw.as_bytes()).0, 431);
        let long = "v".repeat(HEAD_SIZE_MAX);
        let raw = format!("GET /jobs HTTP/1.1\r\nh: {long}\r\n\r\n");
        assert_eq!(exchange(&server, raw.as_bytes()).0, 431);
        // Expect: 100-continue is answered before the body is sent.
        let mut stream = connect(&server);
        let body = r#"{"target-directory": "/continued"}"#;
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(body.as_bytes()).unwrap();
        assert_eq!(read_answer(&mut stream).0, 200);
    }

    #[test]
    fn refuses_requests_without_the_bearer_token() {
        let fake = FakeJobManager::new();
        let server = start(&fake, Some("s3cret"));
        let (status, head, _) = exchange(&server, &request("GET", "/jobs", ""));
        assert_eq!(status, 401);
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        let raw = b"GET /jobs HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n";
        assert_eq!(exchange(&server, raw).0, 401);
        // The token is checked before the route and the body.
        let raw = b"POST /nothing HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n";
        assert_eq!(exchange(&server, raw).0, 401);
        let raw = b"GET /jobs HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n";
        assert_eq!(exchange(&server, raw).0, 200);
        let api: Arc<dyn JobManagerApi> = fake.clone();
        let empty = RestServer::start_with(
            api,
            "127.0.0.1:0".parse().unwrap(),
            Some(" ".into()),
            Limits::DEFAULT,
        );
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
    fn closes_silent_connections_and_refuses_past_the_connection_limit() {
        let fake = FakeJobManager::new();
        let limits = Limits {
            connection_count_max: 2,
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(300),
        };
        let server = start_limited(&fake, limits);
        // Two clients that send half a head hold both connections.
        let mut silent: Vec<TcpStream> = (0..2).map(|_| connect(&server)).collect();
        for stream in &mut silent {
            stream.write_all(b"GET /jobs HTTP/1.1\r\n").unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let (status, head, body) = exchange(&server, &request("GET", "/jobs", ""));
        assert_eq!(status, 503, "{body}");
        assert!(head.contains("retry-after: 1"), "{head}");
        // The header read timeout closes them, which frees the connections.
        let started = Instant::now();
        for stream in &mut silent {
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while exchange(&server, &request("GET", "/jobs", "")).0 != 200 {
            assert!(Instant::now() < deadline, "the connections were not freed");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A body that stops coming is refused with 408.
        let mut stream = connect(&server);
        let target = format!("/jobs/{JOB}/savepoints");
        let head = format!("POST {target} HTTP/1.1\r\nContent-Length: 10\r\n\r\n{{");
        stream.write_all(head.as_bytes()).unwrap();
        assert_eq!(read_answer(&mut stream).0, 408);
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
        let (status, head, _) = exchange(&server, &request("DELETE", "/jobs", ""));
        assert_eq!(status, 405);
        assert!(head.contains("allow: get"), "{head}");
        assert_eq!(exchange(&server, &request("GET", "/nothing", "")).0, 404);
        // The route is checked before the body: a malformed id wins.
        let raw = format!("POST /jobs/x/stop HTTP/1.1\r\nContent-Length: {BODY_SIZE_MAX}0\r\n\r\n");
        assert_eq!(exchange(&server, raw.as_bytes()).0, 400);

        let address = server.local_addr();
        server.stop();
        assert!(TcpStream::connect(address).is_err());
        // Dropping stops too, and the port can be bound again.
        let again = RestServer::start_with(fake, address, None, Limits::DEFAULT).unwrap();
        drop(again);
    }

    #[test]
    fn stop_lets_a_request_in_flight_finish() {
        let fake = FakeJobManager::new();
        fake.savepoint_released.store(false, Ordering::Release);
        let server = start(&fake, None);
        let mut stream = connect(&server);
        let target = format!("/jobs/{JOB}/stop");
        stream
            .write_all(&request("POST", &target, r#"{"targetDirectory": "/sp"}"#))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let releaser = {
            let fake = fake.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                fake.savepoint_released.store(true, Ordering::Release);
            })
        };
        server.stop();
        let (status, _, body) = read_answer(&mut stream);
        assert_eq!(
            (status, body),
            (200, json!({ "location": "/sp/savepoint-1" }))
        );
        releaser.join().unwrap();
    }

    /// The public entry point with a real JobManager (a local cluster with
    /// no jobs), so the refusals are seen end to end.
    #[test]
    fn serves_a_real_job_manager() {
        let cluster = LocalCluster::start(Vec::new(), LocalClusterConfig::slots(1)).unwrap();
        let server = RestServer::start(
            cluster.job_manager(),
            "127.0.0.1:0".parse().unwrap(),
            Some("s3cret".to_string()),
        )
        .unwrap();
        let authorized = |method: &str, target: &str, body: &str| {
            format!(
                "{method} {target} HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        let (status, _, body) = exchange(&server, &authorized("GET", "/jobs", ""));
        assert_eq!((status, body), (200, json!({ "jobs": [] })));
        assert_eq!(exchange(&server, &request("GET", "/jobs", "")).0, 401);
        let target = format!("/jobs/{JOB}/savepoints");
        let (status, _, body) = exchange(
            &server,
            &authorized("POST", &target, r#"{"target-directory": "/sp"}"#),
        );
        assert_eq!(
            (status, body),
            (404, json!({ "errors": [format!("no running job {JOB}")] }))
        );
        let target = format!("/jobs/{JOB}?mode=cancel");
        assert_eq!(exchange(&server, &authorized("PATCH", &target, "")).0, 404);
        assert_eq!(exchange(&server, &authorized("PUT", "/jobs", "")).0, 405);
        assert_eq!(
            exchange(&server, &authorized("GET", "/jobs/nope", "")).0,
            400
        );
        let raw = "POST /jobs/0123456789abcdef0123456789abcdef/stop HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Length: 1099511627776\r\n\r\n{";
        assert_eq!(exchange(&server, raw.as_bytes()).0, 413);
        assert_eq!(exchange(&server, &authorized("GET", "/jobs", "")).0, 200);
        server.stop();
        cluster.shutdown();
    }
}
