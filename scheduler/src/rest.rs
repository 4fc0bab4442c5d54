//! The JobManager's REST API, in Flink's shape, so that another process
//! (`strom run`, `strom savepoint`, `strom stop`, `strom cancel`,
//! `strom list`, curl, or Prometheus) can submit, watch and control jobs.
//!
//! # Endpoints
//!
//! Bodies and answers are JSON, except `GET /metrics`. A refusal is
//! `{"errors": ["message"]}` with a 4xx or 5xx status, as Flink answers.
//! Times are milliseconds since the Unix epoch, durations milliseconds.
//! The JobManager keeps the last few ended jobs (Flink's job history), so
//! the job endpoints answer for `FINISHED`, `FAILED` and `CANCELED` jobs
//! too.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /overview` | 200 `{"taskmanagers": 2, "slots-total": 8, "slots-available": 6, "jobs-running": 1, "jobs-finished": 3, "jobs-cancelled": 0, "jobs-failed": 1, "strom-version": "0.1.0"}`; running is every state but the three ended ones |
//! | `GET /jobs` | 200 `{"jobs": [{"id": "<32 hex>", "status": "RUNNING"}]}` |
//! | `POST /jobs` body `{"program": "nexmark", "programArgs": ["--query", "q5"], "parallelism": 2, "savepointPath": "/dir/savepoint-1", "allowNonRestoredState": false}` (only `program` required; `programArgsList` is an alias of `programArgs`) | 200 `{"jobid": "<32 hex>"}` once the JobManager has accepted the job (it runs on; it has not ended) |
//! | `GET /jobs/overview` | 200 `{"jobs": [{"jid": "<32 hex>", "name": "q5", "state": "RUNNING", "start-time": 1700000000000, "end-time": -1, "duration": 5000, "attempt": 0, "restarts": 0}]}`, with `"reason": "..."` in an entry when its state has one |
//! | `GET /jobs/:id` | 200 `{"jid", "name", "program", "state", "reason": null, "attempt", "restarts", "parallelism", "start-time", "end-time": -1, "duration", "vertices": [{"id": "0", "name": "Source -> Map", "parallelism": 2, "metrics": {"read-records": 10, "write-records": 10}, "watermark": 1700000000000, "subtasks": [{"subtask": 0, "taskmanager-id": "<16 hex>", "read-records": 5, "write-records": 5, "watermark": 1700000000000}]}], "accumulators": {"name": 1} or null, "savepoint": "/dir" or null}` |
//! | `GET /jobs/:id/checkpoints` | 200 `{"counts": {"triggered": 3, "completed": 2, "failed": 1}, "latest": {"completed": {"external_path": "/dir/chk-2"}}}`; `"completed": null` before the first one |
//! | `POST /jobs/:id/savepoints` body `{"target-directory": "/dir", "cancel-job": false}` (both optional, the body too) | 200 `{"location": "/dir/savepoint-..."}` once the savepoint is complete |
//! | `POST /jobs/:id/stop` body `{"targetDirectory": "/dir", "drain": false}` (both optional) | 200 `{"location": ...}`: stop with a savepoint |
//! | `PATCH /jobs/:id?mode=cancel` (`mode` optional) | 202 `{}`; also for a job cancelled already, as Flink |
//! | `GET /taskmanagers` | 200 `{"taskmanagers": [{"id": "<16 hex>", "path": "host:port" or null, "dataPort": "host:port" or null, "slotsNumber": 4, "freeSlots": 3, "timeSinceLastHeartbeat": 120, "network": {"elementsSent", "bytesSent", "elementsReceived", "bytesReceived"}}]}` |
//! | `GET /metrics` | 200 Prometheus text, below |
//!
//! A job's figures are those of its current attempt, as its TaskManagers
//! last reported them (about once a second). A vertex's `watermark` is the
//! lowest of its subtasks', and `null` while any subtask has none yet (as
//! Flink's lowest watermark). `path` is where the TaskManager's control
//! connection comes from (`null` in a local cluster), `dataPort` where
//! other TaskManagers reach its data port; `timeSinceLastHeartbeat` is
//! milliseconds since it was last heard from.
//!
//! `GET /metrics` answers in Prometheus' text format (`text/plain;
//! version=0.0.4`), or in OpenMetrics (`application/openmetrics-text;
//! version=1.0.0`) when the `Accept` header asks for it, as Prometheus'
//! scraper does. Both are written by the `prometheus-client` crate, which
//! writes OpenMetrics: a counter's samples carry `_total`
//! (`strom_task_records_in_total`), and `# HELP` and `# TYPE` name the
//! family without it; in Prometheus' format they name the samples, as
//! Prometheus' own client writes them, and there is no `# EOF`.
//!
//! Metrics: `strom_taskmanagers`, `strom_slots_total`,
//! `strom_slots_available`, `strom_jobs{state}` (gauges); per job not ended, `strom_job_restarts_total`,
//! `strom_job_checkpoints_triggered_total`,
//! `strom_job_checkpoints_completed_total`,
//! `strom_job_checkpoints_failed_total` `{job_id, job_name}`; per subtask of
//! such a job, `strom_task_records_in_total`, `strom_task_records_out_total`
//! (counters of the current attempt: a restart resets them, which
//! Prometheus' `rate` allows for) and `strom_task_watermark` (a gauge, while
//! the subtask has one) `{job_id, job_name, vertex, vertex_name, subtask}`;
//! per TaskManager, `strom_taskmanager_network_elements_sent_total`,
//! `..._elements_received_total`, `..._bytes_sent_total`,
//! `..._bytes_received_total` `{taskmanager_id}`. As in Flink, an ended
//! job's series go away; `strom_jobs` counts it.
//!
//! Submission: `programArgs` are the program's arguments, job options
//! among them (`--checkpoint-dir`, ...), as `strom run` takes them;
//! `parallelism` overrides `--parallelism`; `savepointPath` is the
//! savepoint (or retained checkpoint) to start from. The JobManager builds
//! and checks the job before it answers, so an unknown program, bad
//! arguments, a relative or `..` path among the job options, or a damaged
//! or unmatched savepoint is refused with 400 and its message, and nothing
//! runs. A job the free slots cannot hold yet is accepted and waits for
//! them (state `WAITING_FOR_SLOTS`), failing after the JobManager's slot
//! wait timeout.
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
//! Other deviations: programs are built into the cluster's binary, so there
//! is no jar to upload: `POST /jobs` takes the program's name where Flink's
//! `POST /jars/:jarid/run` takes a jar, and `programArgs` is a list (Flink's
//! `programArgsList`; Flink's `programArgs` is one string to split). A
//! vertex's `id` is its index in the JobGraph, not a 32 hex digit
//! JobVertexID, and its `metrics` have only the record counts.
//! `/taskmanagers` gives addresses as `host:port` strings (Flink's `path`
//! is an actor path, its `dataPort` a number), and `timeSinceLastHeartbeat`
//! is what its name says (Flink's is the time of the last heartbeat).
//! `GET /metrics` is Prometheus' own path, not Flink's `/jobs/metrics`;
//! Flink serves Prometheus from a reporter on another port.
//!
//! Refusals: an unknown job is 404; a savepoint, stop or cancel of a job
//! that has ended is 409 (Flink's answer to cancelling a finished job); a
//! malformed job id, malformed JSON, an unknown body field (Flink's REST
//! API is strict too), a body of `POST /jobs` without `program`, a
//! `parallelism` out of 1 to [`MAX_PARALLELISM_UPPER_BOUND`], more than
//! [`ARGUMENT_COUNT_MAX`] program arguments or one over
//! [`ARGUMENT_LENGTH_MAX`] bytes (the control plane's limits), a target
//! directory or savepoint path that is relative, has a `..` component or
//! is over [`PATH_LENGTH_MAX`] bytes, a submission the JobManager refuses,
//! or a malformed request (bad request line, bad `Content-Length`) is 400;
//! the JobManager gone is 503; a body over [`BODY_SIZE_MAX`] is 413,
//! answered from the `Content-Length` header without reading the body (a
//! chunked body is read up to the limit and refused as soon as it passes
//! it); a wrong method is 405 with `Allow`; an unknown path is 404; a missing or wrong bearer token
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
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_lite::future;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming, SizeHint};
use hyper::header::{
    HeaderName, HeaderValue, ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Semaphore};

use strom_core::key::MAX_PARALLELISM_UPPER_BOUND;
use strom_net::control::{
    ARGUMENT_COUNT_MAX, ARGUMENT_LENGTH_MAX, PATH_LENGTH_MAX, PROGRAM_NAME_LENGTH_MAX,
};

use crate::local::JobManagerHandle;
use crate::messages::{
    JobId, JobStatus, JobSubmission, SubtaskStatus, TaskManagerStatus, VertexStatus,
};

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
    /// Builds, checks and starts a job without waiting for its end.
    fn submit(&self, submission: JobSubmission) -> Result<JobId, String>;
    fn task_managers(&self) -> Result<Vec<TaskManagerStatus>, String>;
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

    fn submit(&self, submission: JobSubmission) -> Result<JobId, String> {
        JobManagerHandle::submit(self, submission)
    }

    fn task_managers(&self) -> Result<Vec<TaskManagerStatus>, String> {
        JobManagerHandle::task_managers(self)
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
    let mut route = route(request.method().as_str(), target)?;
    if let Route::Metrics(format) = &mut route {
        let accept = request
            .headers()
            .get(ACCEPT)
            .and_then(|value| value.to_str().ok());
        *format = MetricsFormat::negotiate(accept);
    }
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
            body: ReplyBody::Json(json!({ "errors": [self.message] })),
            headers,
        }
    }
}

/// An answer to send.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: ReplyBody,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// What an answer carries: JSON, as every endpoint but one answers, or
/// text of its own content type (`GET /metrics`).
#[derive(Debug, PartialEq)]
enum ReplyBody {
    Json(Value),
    Text {
        content_type: &'static str,
        text: String,
    },
}

impl Reply {
    fn ok(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body: ReplyBody::Json(body),
            headers: Vec::new(),
        }
    }

    fn text(status: u16, content_type: &'static str, text: String) -> Reply {
        Reply {
            status,
            body: ReplyBody::Text { content_type, text },
            headers: Vec::new(),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let (content_type, body) = match self.body {
            ReplyBody::Json(value) => ("application/json", value.to_string()),
            ReplyBody::Text { content_type, text } => (content_type, text),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
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

/// Maps the JobManager's refusal of a submission: it checks the program,
/// its arguments and the savepoint before it answers, so every refusal but
/// its absence is the client's to fix.
fn submission_failure(message: String) -> Failure {
    let status = if message.starts_with("the JobManager stopped") {
        503
    } else {
        400
    };
    Failure::new(status, message)
}

fn unknown_job(job: JobId) -> Failure {
    Failure::new(
        404,
        format!("no job {job}: it is neither running nor among the ended jobs kept"),
    )
}

/// How `GET /metrics` answers, chosen by the request's `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetricsFormat {
    /// `text/plain; version=0.0.4`: what curl and older scrapers get.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`: what Prometheus asks
    /// for first. The text is the same; the content type tells Prometheus
    /// to read `# TYPE x counter` as the type of the samples `x_total`.
    OpenMetrics,
}

impl MetricsFormat {
    /// OpenMetrics when `Accept` lists it with a quality above 0.
    fn negotiate(accept: Option<&str>) -> MetricsFormat {
        let wanted = |range: &str| {
            let mut parts = range.split(';').map(str::trim);
            let media_type = parts.next().unwrap_or_default();
            let refused = parts.any(|parameter| {
                parameter.split_once('=').is_some_and(|(name, value)| {
                    name.trim().eq_ignore_ascii_case("q")
                        && value
                            .trim()
                            .parse::<f32>()
                            .is_ok_and(|quality| quality <= 0.0)
                })
            });
            media_type.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        };
        if accept.is_some_and(|accept| accept.split(',').any(wanted)) {
            MetricsFormat::OpenMetrics
        } else {
            MetricsFormat::Prometheus
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            MetricsFormat::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            MetricsFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
        }
    }

    /// The text of `open_metrics` (as `prometheus-client` writes it) in
    /// this format. OpenMetrics names a counter family `x` in `# HELP` and
    /// `# TYPE` and its samples `x_total`; Prometheus' format names the
    /// samples in both (as Prometheus' Go client writes them), or a parser
    /// of that format takes the samples as untyped. So a counter's two
    /// descriptor lines get `_total`, and `# EOF` goes. Only the lines
    /// that start with `#` change (samples and their labels stay as the
    /// crate wrote them), and the crate writes `# HELP` just before
    /// `# TYPE`.
    fn convert(self, open_metrics: String) -> String {
        if self == MetricsFormat::OpenMetrics {
            return open_metrics;
        }
        let mut lines: Vec<String> = Vec::new();
        for line in open_metrics.lines() {
            if line == "# EOF" {
                continue;
            }
            let counter = line
                .strip_prefix("# TYPE ")
                .and_then(|rest| rest.strip_suffix(" counter"));
            if let Some(name) = counter {
                let help_prefix = format!("# HELP {name} ");
                if let Some(help) = lines.last_mut() {
                    if let Some(text) = help.strip_prefix(&help_prefix) {
                        *help = format!("# HELP {name}_total {text}");
                    }
                }
                lines.push(format!("# TYPE {name}_total counter"));
            } else {
                lines.push(line.to_string());
            }
        }
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

/// What a request asks for, once its method and path are checked.
#[derive(Debug, PartialEq)]
enum Route {
    Overview,
    Jobs,
    Submit,
    JobsOverview,
    Job(JobId),
    Checkpoints(JobId),
    Savepoint(JobId),
    Stop(JobId),
    Cancel(JobId),
    TaskManagers,
    /// The format is negotiated from the headers after routing.
    Metrics(MetricsFormat),
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
        (["overview"], "GET") => Ok(Route::Overview),
        (["overview"], _) => Err(Failure::method_not_allowed(method, path, "GET")),
        (["jobs"], "GET") => Ok(Route::Jobs),
        (["jobs"], "POST") => Ok(Route::Submit),
        (["jobs"], _) => Err(Failure::method_not_allowed(method, path, "GET, POST")),
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
        (["taskmanagers"], "GET") => Ok(Route::TaskManagers),
        (["taskmanagers"], _) => Err(Failure::method_not_allowed(method, path, "GET")),
        (["metrics"], "GET") => Ok(Route::Metrics(MetricsFormat::Prometheus)),
        (["metrics"], _) => Err(Failure::method_not_allowed(method, path, "GET")),
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

/// The body of `POST /jobs`: the field names of Flink's `/jars/:id/run`,
/// with `program` in place of the jar. A `null` is taken as absent, as
/// Flink's Jackson takes it.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubmitBody {
    program: String,
    #[serde(default, alias = "programArgsList")]
    program_args: Option<Vec<String>>,
    /// Any JSON, checked by [`parallelism`] so that every wrong value gets
    /// a message that names the field.
    #[serde(default)]
    parallelism: Option<Value>,
    #[serde(default)]
    savepoint_path: Option<String>,
    #[serde(default)]
    allow_non_restored_state: Option<bool>,
}

/// Parses a JSON body; an empty body is the default (all fields absent).
fn parse_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(body)
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body)
        .map_err(|error| Failure::new(400, format!("malformed JSON body: {error}")))
}

/// Checks a path given to the JobManager (a savepoint's target directory,
/// or the savepoint a job starts from). The JobManager runs in another
/// process, maybe on another machine, so a relative path would be read
/// against a working directory the client does not know. A `..` is refused
/// too: the JobManager uses paths as given, and a path that names one
/// directory but climbs out of it (`/savepoints/../etc`) is path traversal,
/// never what a client means. `what` names the path in the messages.
fn absolute_path(what: &str, text: &str) -> Result<PathBuf, Failure> {
    let path = text.strip_prefix("file://").unwrap_or(text);
    if path.is_empty() {
        return Err(Failure::new(400, format!("{what} is empty")));
    }
    if path.len() > PATH_LENGTH_MAX {
        return Err(Failure::new(
            400,
            format!(
                "{what} is {} bytes long; the limit is {PATH_LENGTH_MAX}",
                path.len()
            ),
        ));
    }
    if !Path::new(path).is_absolute() {
        return Err(Failure::new(
            400,
            format!("{what} '{text}' is not an absolute path"),
        ));
    }
    if Path::new(path)
        .components()
        .any(|component| component == Component::ParentDir)
    {
        return Err(Failure::new(
            400,
            format!(
                "{what} '{text}' has a '..' component (path traversal): name the directory itself"
            ),
        ));
    }
    Ok(PathBuf::from(path))
}

/// Checks a savepoint's target directory (see [`absolute_path`]).
fn target_directory(text: Option<String>) -> Result<Option<PathBuf>, Failure> {
    text.map(|text| absolute_path("the target directory", &text))
        .transpose()
}

/// Checks `parallelism`: absent, or an integer from 1 to Flink's
/// [`MAX_PARALLELISM_UPPER_BOUND`].
fn parallelism(value: Option<Value>) -> Result<Option<u32>, Failure> {
    let Some(value) = value.filter(|value| !value.is_null()) else {
        return Ok(None);
    };
    match value.as_u64() {
        Some(parallelism) if (1..=u64::from(MAX_PARALLELISM_UPPER_BOUND)).contains(&parallelism) => {
            Ok(u32::try_from(parallelism).ok())
        }
        _ => Err(Failure::new(
            400,
            format!("parallelism must be an integer from 1 to {MAX_PARALLELISM_UPPER_BOUND}, not {value}"),
        )),
    }
}

/// Checks a `POST /jobs` body against the limits the control plane puts on
/// a deployment, so a job the TaskManagers would refuse is refused here,
/// with a message, before anything runs.
fn submission(body: SubmitBody) -> Result<JobSubmission, Failure> {
    if body.program.is_empty() {
        return Err(Failure::new(
            400,
            "program is empty: name the program to run",
        ));
    }
    if body.program.len() > PROGRAM_NAME_LENGTH_MAX {
        return Err(Failure::new(
            400,
            format!(
                "program is {} bytes long; the limit is {PROGRAM_NAME_LENGTH_MAX}",
                body.program.len()
            ),
        ));
    }
    let arguments = body.program_args.unwrap_or_default();
    if arguments.len() > ARGUMENT_COUNT_MAX {
        return Err(Failure::new(
            400,
            format!(
                "programArgs has {} entries; the limit is {ARGUMENT_COUNT_MAX}",
                arguments.len()
            ),
        ));
    }
    if let Some((index, argument)) = arguments
        .iter()
        .enumerate()
        .find(|(_, argument)| argument.len() > ARGUMENT_LENGTH_MAX)
    {
        return Err(Failure::new(
            400,
            format!(
                "programArgs[{index}] is {} bytes long; the limit is {ARGUMENT_LENGTH_MAX}",
                argument.len()
            ),
        ));
    }
    let savepoint_path = body
        .savepoint_path
        .map(|text| absolute_path("savepointPath", &text))
        .transpose()?;
    Ok(JobSubmission {
        program: body.program,
        arguments,
        parallelism: parallelism(body.parallelism)?,
        savepoint_path,
        allow_non_restored_state: body.allow_non_restored_state.unwrap_or(false),
    })
}

fn milliseconds(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Flink's `end-time` of a job that has not ended.
fn end_time(job: &JobStatus) -> i64 {
    job.end_time_ms
        .map_or(-1, |end| i64::try_from(end).unwrap_or(i64::MAX))
}

/// The job counts of `GET /overview` and `strom_jobs`: every state but the
/// ended ones counts as running (waiting for slots and restarting too).
#[derive(Debug, Default, PartialEq, Eq)]
struct JobCounts {
    running: u64,
    finished: u64,
    cancelled: u64,
    failed: u64,
}

impl JobCounts {
    fn of(jobs: &[JobStatus]) -> JobCounts {
        let mut counts = JobCounts::default();
        for job in jobs {
            match job.state.as_str() {
                "FINISHED" => counts.finished += 1,
                "CANCELED" => counts.cancelled += 1,
                "FAILED" => counts.failed += 1,
                _ => counts.running += 1,
            }
        }
        counts
    }
}

/// Slots over all TaskManagers: (total, free).
fn slot_counts(task_managers: &[TaskManagerStatus]) -> (u64, u64) {
    task_managers
        .iter()
        .fold((0, 0), |(total, free), task_manager| {
            (
                total + u64::from(task_manager.slots_total),
                free + u64::from(task_manager.slots_free),
            )
        })
}

fn cluster_overview_json(jobs: &[JobStatus], task_managers: &[TaskManagerStatus]) -> Value {
    let counts = JobCounts::of(jobs);
    let (slots_total, slots_free) = slot_counts(task_managers);
    json!({
        "taskmanagers": task_managers.len(),
        "slots-total": slots_total,
        "slots-available": slots_free,
        "jobs-running": counts.running,
        "jobs-finished": counts.finished,
        "jobs-cancelled": counts.cancelled,
        "jobs-failed": counts.failed,
        "strom-version": env!("CARGO_PKG_VERSION"),
    })
}

fn job_summary(job: &JobStatus) -> Value {
    let mut summary = json!({
        "jid": job.job_id.to_string(),
        "name": job.job_name,
        "state": job.state,
        "start-time": job.start_time_ms,
        "end-time": end_time(job),
        "duration": milliseconds(job.duration),
        "attempt": job.attempt,
        "restarts": job.restarts,
    });
    if let (Some(reason), Some(fields)) = (&job.reason, summary.as_object_mut()) {
        fields.insert("reason".to_string(), json!(reason));
    }
    summary
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

/// A vertex's watermark: the lowest of its subtasks', and none while any
/// subtask has none (Flink's lowest watermark, where a subtask without one
/// counts as the lowest possible).
fn vertex_watermark(subtasks: &[SubtaskStatus]) -> Option<i64> {
    subtasks
        .iter()
        .map(|subtask| subtask.watermark)
        .collect::<Option<Vec<i64>>>()?
        .into_iter()
        .min()
}

fn vertex_json(vertex: &VertexStatus) -> Value {
    let (records_in, records_out) = vertex.subtasks.iter().fold((0u64, 0u64), |sums, subtask| {
        (
            sums.0.saturating_add(subtask.records_in),
            sums.1.saturating_add(subtask.records_out),
        )
    });
    let subtasks: Vec<Value> = vertex
        .subtasks
        .iter()
        .map(|subtask| {
            json!({
                "subtask": subtask.subtask,
                "taskmanager-id": subtask.task_manager,
                "read-records": subtask.records_in,
                "write-records": subtask.records_out,
                "watermark": subtask.watermark,
            })
        })
        .collect();
    json!({
        "id": vertex.id.to_string(),
        "name": vertex.name,
        "parallelism": vertex.parallelism,
        "metrics": { "read-records": records_in, "write-records": records_out },
        "watermark": vertex_watermark(&vertex.subtasks),
        "subtasks": subtasks,
    })
}

fn job_json(job: &JobStatus) -> Value {
    let accumulators = job.accumulators.as_ref().map(|accumulators| {
        accumulators
            .iter()
            .map(|(name, value)| (name.to_string(), json!(value)))
            .collect::<serde_json::Map<String, Value>>()
    });
    json!({
        "jid": job.job_id.to_string(),
        "name": job.job_name,
        "program": job.program,
        "state": job.state,
        "reason": job.reason,
        "attempt": job.attempt,
        "restarts": job.restarts,
        "parallelism": job.parallelism,
        "start-time": job.start_time_ms,
        "end-time": end_time(job),
        "duration": milliseconds(job.duration),
        "vertices": job.vertices.iter().map(vertex_json).collect::<Vec<Value>>(),
        "accumulators": accumulators,
        "savepoint": job
            .stopped_with_savepoint
            .as_ref()
            .map(|path| path.display().to_string()),
    })
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

fn task_managers_json(task_managers: &[TaskManagerStatus]) -> Value {
    let task_managers: Vec<Value> = task_managers
        .iter()
        .map(|task_manager| {
            json!({
                "id": task_manager.id,
                "path": task_manager.control_address,
                "dataPort": task_manager.data_address,
                "slotsNumber": task_manager.slots_total,
                "freeSlots": task_manager.slots_free,
                "timeSinceLastHeartbeat": task_manager.last_heartbeat_ms_ago,
                "network": {
                    "elementsSent": task_manager.network.elements_sent,
                    "bytesSent": task_manager.network.bytes_sent,
                    "elementsReceived": task_manager.network.elements_received,
                    "bytesReceived": task_manager.network.bytes_received,
                },
            })
        })
        .collect();
    json!({ "taskmanagers": task_managers })
}

fn location_json(path: &Path) -> Value {
    json!({ "location": path.display().to_string() })
}

/// The states `strom_jobs` always has a series for (at 0 when no job is
/// in it), so a dashboard's query does not depend on a job having been
/// in a state.
const JOB_STATES: [&str; 6] = [
    "WAITING_FOR_SLOTS",
    "RUNNING",
    "RESTARTING",
    "FINISHED",
    "FAILED",
    "CANCELED",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job_id: String,
    job_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    job_id: String,
    job_name: String,
    vertex: usize,
    vertex_name: String,
    subtask: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskManagerLabels {
    taskmanager_id: String,
}

/// Registers a family and hands it back to be filled.
fn family<S, M>(registry: &mut Registry, name: &str, help: &str) -> Family<S, M>
where
    S: Clone + std::hash::Hash + Eq + std::fmt::Debug + EncodeLabelSet + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let family = Family::<S, M>::default();
    registry.register(name, help, family.clone());
    family
}

/// Registers a gauge without labels, set to `value`.
fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let gauge = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

/// The cluster's figures in Prometheus' text format, written by
/// `prometheus-client` from a registry made for this scrape: the figures
/// live in the JobManager, so there is nothing to keep between scrapes.
/// Help texts end without a period: the crate adds one.
fn metrics_text(
    jobs: &[JobStatus],
    task_managers: &[TaskManagerStatus],
) -> Result<String, Failure> {
    let mut registry = Registry::default();
    let (slots_total, slots_free) = slot_counts(task_managers);
    gauge(
        &mut registry,
        "strom_taskmanagers",
        "TaskManagers registered with the JobManager",
        task_managers.len() as u64,
    );
    gauge(
        &mut registry,
        "strom_slots_total",
        "Slots of all TaskManagers",
        slots_total,
    );
    gauge(
        &mut registry,
        "strom_slots_available",
        "Slots no job holds",
        slots_free,
    );
    let states: Family<StateLabels, Gauge> = family(
        &mut registry,
        "strom_jobs",
        "Jobs by state, the ended ones the JobManager keeps included",
    );
    for state in JOB_STATES {
        // Creates the series at 0; the guard is not needed.
        let _ = states.get_or_create(&StateLabels {
            state: state.to_string(),
        });
    }
    for job in jobs {
        states
            .get_or_create(&StateLabels {
                state: job.state.clone(),
            })
            .inc();
    }

    let restarts: Family<JobLabels, Counter> = family(
        &mut registry,
        "strom_job_restarts",
        "Restarts of the job after a failure",
    );
    let triggered: Family<JobLabels, Counter> = family(
        &mut registry,
        "strom_job_checkpoints_triggered",
        "Checkpoints the job triggered",
    );
    let completed: Family<JobLabels, Counter> = family(
        &mut registry,
        "strom_job_checkpoints_completed",
        "Checkpoints of the job that completed",
    );
    let failed: Family<JobLabels, Counter> = family(
        &mut registry,
        "strom_job_checkpoints_failed",
        "Checkpoints of the job that failed or were aborted",
    );
    let records_in: Family<TaskLabels, Counter> = family(
        &mut registry,
        "strom_task_records_in",
        "Records the subtask read, in the job's current attempt",
    );
    let records_out: Family<TaskLabels, Counter> = family(
        &mut registry,
        "strom_task_records_out",
        "Records the subtask wrote, in the job's current attempt",
    );
    let watermarks: Family<TaskLabels, Gauge> = family(
        &mut registry,
        "strom_task_watermark",
        "The subtask's current watermark, milliseconds since the Unix epoch",
    );
    // As in Flink, an ended job's series go away with it.
    for job in jobs.iter().filter(|job| !job.is_terminal()) {
        let labels = JobLabels {
            job_id: job.job_id.to_string(),
            job_name: job.job_name.clone(),
        };
        restarts
            .get_or_create(&labels)
            .inc_by(u64::from(job.restarts));
        triggered
            .get_or_create(&labels)
            .inc_by(job.checkpoints.triggered);
        completed
            .get_or_create(&labels)
            .inc_by(job.checkpoints.completed);
        failed.get_or_create(&labels).inc_by(job.checkpoints.failed);
        for vertex in &job.vertices {
            for subtask in &vertex.subtasks {
                let labels = TaskLabels {
                    job_id: labels.job_id.clone(),
                    job_name: labels.job_name.clone(),
                    vertex: vertex.id,
                    vertex_name: vertex.name.clone(),
                    subtask: subtask.subtask,
                };
                records_in.get_or_create(&labels).inc_by(subtask.records_in);
                records_out
                    .get_or_create(&labels)
                    .inc_by(subtask.records_out);
                if let Some(watermark) = subtask.watermark {
                    watermarks.get_or_create(&labels).set(watermark);
                }
            }
        }
    }

    let network = [
        (
            "strom_taskmanager_network_elements_sent",
            "Channel elements the TaskManager sent to other TaskManagers",
        ),
        (
            "strom_taskmanager_network_bytes_sent",
            "Payload bytes the TaskManager sent to other TaskManagers",
        ),
        (
            "strom_taskmanager_network_elements_received",
            "Channel elements the TaskManager received from other TaskManagers",
        ),
        (
            "strom_taskmanager_network_bytes_received",
            "Payload bytes the TaskManager received from other TaskManagers",
        ),
    ]
    .map(|(name, help)| family::<TaskManagerLabels, Counter>(&mut registry, name, help));
    for task_manager in task_managers {
        let labels = TaskManagerLabels {
            taskmanager_id: task_manager.id.clone(),
        };
        let counts = &task_manager.network;
        let values = [
            counts.elements_sent,
            counts.bytes_sent,
            counts.elements_received,
            counts.bytes_received,
        ];
        for (family, value) in network.iter().zip(values) {
            family.get_or_create(&labels).inc_by(value);
        }
    }

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|error| Failure::new(500, format!("cannot write the metrics: {error}")))?;
    Ok(text)
}

fn find_job(api: &dyn JobManagerApi, job: JobId) -> Result<JobStatus, Failure> {
    api.list_jobs()
        .map_err(job_manager_failure)?
        .into_iter()
        .find(|status| status.job_id == job)
        .ok_or_else(|| unknown_job(job))
}

/// Finds a job that has not ended, for a savepoint or a stop.
fn find_running_job(api: &dyn JobManagerApi, job: JobId) -> Result<JobStatus, Failure> {
    let status = find_job(api, job)?;
    if status.is_terminal() {
        return Err(ended_job(&status));
    }
    Ok(status)
}

fn ended_job(status: &JobStatus) -> Failure {
    Failure::new(
        409,
        format!("job {} has ended: it is {}", status.job_id, status.state),
    )
}

/// Carries out a routed request. May block for as long as a savepoint takes.
fn dispatch(api: &dyn JobManagerApi, route: Route, body: &[u8]) -> Result<Reply, Failure> {
    match route {
        Route::Overview => {
            let jobs = api.list_jobs().map_err(job_manager_failure)?;
            let task_managers = api.task_managers().map_err(job_manager_failure)?;
            Ok(Reply::ok(200, cluster_overview_json(&jobs, &task_managers)))
        }
        Route::Jobs => {
            let jobs = api.list_jobs().map_err(job_manager_failure)?;
            Ok(Reply::ok(200, jobs_json(&jobs)))
        }
        Route::Submit => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Err(Failure::new(
                    400,
                    "the request body is empty: send {\"program\": \"<name>\", ...}",
                ));
            }
            let request: SubmitBody = parse_json(body)?;
            let job = api
                .submit(submission(request)?)
                .map_err(submission_failure)?;
            Ok(Reply::ok(200, json!({ "jobid": job.to_string() })))
        }
        Route::JobsOverview => {
            let jobs = api.list_jobs().map_err(job_manager_failure)?;
            Ok(Reply::ok(200, overview_json(&jobs)))
        }
        Route::Job(job) => Ok(Reply::ok(200, job_json(&find_job(api, job)?))),
        Route::Checkpoints(job) => Ok(Reply::ok(200, checkpoints_json(&find_job(api, job)?))),
        Route::Savepoint(job) => {
            let request: SavepointBody = parse_body(body)?;
            let target = target_directory(request.target_directory)?;
            find_running_job(api, job)?;
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
            find_running_job(api, job)?;
            let location = api
                .trigger_savepoint(job, target, true)
                .map_err(job_manager_failure)?;
            Ok(Reply::ok(200, location_json(&location)))
        }
        Route::Cancel(job) => {
            // Flink: cancelling a cancelled job is no error; cancelling a
            // job that finished or failed is a conflict. A job unknown here
            // is the JobManager's to refuse (it may have just been
            // submitted).
            let listed = api.list_jobs().map_err(job_manager_failure)?;
            match listed.iter().find(|status| status.job_id == job) {
                Some(status) if status.state == "CANCELED" => return Ok(Reply::ok(202, json!({}))),
                Some(status) if status.is_terminal() => return Err(ended_job(status)),
                _ => {}
            }
            api.cancel(job).map_err(job_manager_failure)?;
            Ok(Reply::ok(202, json!({})))
        }
        Route::TaskManagers => {
            let task_managers = api.task_managers().map_err(job_manager_failure)?;
            Ok(Reply::ok(200, task_managers_json(&task_managers)))
        }
        Route::Metrics(format) => {
            let jobs = api.list_jobs().map_err(job_manager_failure)?;
            let task_managers = api.task_managers().map_err(job_manager_failure)?;
            let text = format.convert(metrics_text(&jobs, &task_managers)?);
            Ok(Reply::text(200, format.content_type(), text))
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
    use crate::messages::NetworkCounts;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;
    use strom_core::Accumulators;

    const JOB: &str = "0123456789abcdef0123456789abcdef";
    /// The id the fake gives a submitted job.
    const SUBMITTED: &str = "fedcba9876543210fedcba9876543210";
    const TASK_MANAGER: &str = "00000000000000a1";

    fn job_id() -> JobId {
        JOB.parse().unwrap()
    }

    /// A running job of two vertices: a source of parallelism 2 (one
    /// subtask without a watermark yet) and a sink.
    fn status() -> JobStatus {
        let subtask = |subtask: u32, records_in: u64, records_out: u64, watermark: Option<i64>| {
            SubtaskStatus {
                subtask,
                task_manager: Some(TASK_MANAGER.to_string()),
                records_in,
                records_out,
                watermark,
            }
        };
        JobStatus {
            job_id: job_id(),
            job_name: "nexmark-q5".to_string(),
            program: "nexmark".to_string(),
            state: "RUNNING".to_string(),
            reason: None,
            attempt: 1,
            restarts: 1,
            parallelism: 2,
            start_time_ms: 1_700_000_000_000,
            end_time_ms: None,
            duration: Duration::from_millis(5_000),
            checkpoints: CheckpointCounts {
                triggered: 3,
                completed: 2,
                failed: 1,
            },
            latest_checkpoint: Some(PathBuf::from("/checkpoints/chk-2")),
            vertices: vec![
                VertexStatus {
                    id: 0,
                    name: "Source: bids -> Map".to_string(),
                    parallelism: 2,
                    subtasks: vec![subtask(0, 0, 10, Some(1_000)), subtask(1, 0, 7, None)],
                },
                VertexStatus {
                    id: 1,
                    name: "Window -> Sink".to_string(),
                    parallelism: 2,
                    subtasks: vec![subtask(0, 9, 2, Some(900)), subtask(1, 8, 1, Some(950))],
                },
            ],
            accumulators: None,
            stopped_with_savepoint: None,
        }
    }

    /// A job that finished, stopped with a savepoint.
    fn finished() -> JobStatus {
        let mut accumulators = Accumulators::default();
        accumulators.add("results", 42);
        JobStatus {
            job_id: "00000000000000000000000000000002".parse().unwrap(),
            job_name: "wordcount".to_string(),
            program: "wordcount".to_string(),
            state: "FINISHED".to_string(),
            end_time_ms: Some(1_700_000_009_000),
            vertices: Vec::new(),
            accumulators: Some(accumulators),
            stopped_with_savepoint: Some(PathBuf::from("/sp/savepoint-9")),
            ..status()
        }
    }

    fn failed() -> JobStatus {
        JobStatus {
            job_id: "00000000000000000000000000000003".parse().unwrap(),
            state: "FAILED".to_string(),
            reason: Some("a task failed: boom".to_string()),
            end_time_ms: Some(1_700_000_001_000),
            ..status()
        }
    }

    fn task_manager() -> TaskManagerStatus {
        TaskManagerStatus {
            id: TASK_MANAGER.to_string(),
            control_address: Some("10.0.0.2:41000".to_string()),
            data_address: Some("10.0.0.2:6121".to_string()),
            slots_total: 2,
            slots_free: 1,
            last_heartbeat_ms_ago: 120,
            network: NetworkCounts {
                elements_sent: 5,
                bytes_sent: 500,
                elements_received: 6,
                bytes_received: 600,
            },
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
        assert_eq!(route("GET", "/overview"), Ok(Route::Overview));
        assert_eq!(route("POST", "/jobs"), Ok(Route::Submit));
        assert_eq!(route("POST", "/jobs/"), Ok(Route::Submit));
        assert_eq!(route("GET", "/taskmanagers"), Ok(Route::TaskManagers));
        assert_eq!(
            route("GET", "/metrics"),
            Ok(Route::Metrics(MetricsFormat::Prometheus))
        );
    }

    #[test]
    fn negotiates_the_metrics_format() {
        let format = MetricsFormat::negotiate;
        assert_eq!(format(None), MetricsFormat::Prometheus);
        assert_eq!(format(Some("*/*")), MetricsFormat::Prometheus);
        assert_eq!(
            format(Some("text/plain;version=0.0.4")),
            MetricsFormat::Prometheus
        );
        // What Prometheus' scraper sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(format(Some(prometheus)), MetricsFormat::OpenMetrics);
        assert_eq!(
            format(Some("application/openmetrics-text; q=0, text/plain")),
            MetricsFormat::Prometheus
        );
    }

    #[test]
    fn refuses_bad_routes_with_the_right_status() {
        let status = |method: &str, target: &str| route(method, target).unwrap_err().status;
        assert_eq!(status("GET", "/"), 404);
        assert_eq!(status("GET", "/taskmanagers/x"), 404);
        assert_eq!(status("GET", &format!("/jobs/{JOB}/vertices")), 404);
        assert_eq!(status("POST", "/overview"), 405);
        assert_eq!(status("POST", "/taskmanagers"), 405);
        assert_eq!(status("PUT", "/metrics"), 405);
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
        assert_eq!(wrong_method.allow, Some("GET, POST"));
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
        for climbing in ["/sp/../etc", "/..", "file:///sp/..", "/sp/x/../../y"] {
            let refused = target_directory(Some(climbing.to_string())).unwrap_err();
            assert_eq!(refused.status, 400, "{climbing}");
            assert!(
                refused.message.contains("path traversal"),
                "{}",
                refused.message
            );
        }
        // `..` inside a name is no component.
        assert_eq!(
            target_directory(Some("/sp/a..b".to_string())),
            Ok(Some(PathBuf::from("/sp/a..b")))
        );
        let long = format!("/{}", "d".repeat(PATH_LENGTH_MAX));
        assert_eq!(target_directory(Some(long)).unwrap_err().status, 400);
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
            json!({ "jobs": [{
                "jid": JOB, "name": "nexmark-q5", "state": "RUNNING",
                "start-time": 1_700_000_000_000u64, "end-time": -1, "duration": 5_000,
                "attempt": 1, "restarts": 1,
            }] })
        );
        let ended = overview_json(&[failed()]);
        assert_eq!(ended["jobs"][0]["reason"], json!("a task failed: boom"));
        assert_eq!(ended["jobs"][0]["end-time"], json!(1_700_000_001_000u64));
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
        assert_eq!(
            reply.body,
            ReplyBody::Json(json!({ "errors": ["no running job x"] }))
        );
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
        let status = |message: &str| submission_failure(message.to_string()).status;
        assert_eq!(status("unknown program 'x'"), 400);
        assert_eq!(status("not enough slots: job 'q5' needs 4"), 400);
        assert_eq!(status("the JobManager stopped"), 503);
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
    /// test releases them, and one TaskManager. It records what it is asked
    /// to do; a cancelled job stays listed, `CANCELED`, as the JobManager
    /// keeps ended jobs.
    struct FakeJobManager {
        jobs: Mutex<Vec<JobStatus>>,
        task_managers: Mutex<Vec<TaskManagerStatus>>,
        savepoint_released: AtomicBool,
        /// Savepoint requests that reached the fake (before they wait).
        savepoints_started: AtomicUsize,
        savepoints: Mutex<Vec<(JobId, Option<PathBuf>, bool)>>,
        submissions: Mutex<Vec<JobSubmission>>,
        cancellations: Mutex<Vec<JobId>>,
    }

    impl FakeJobManager {
        fn new() -> Arc<FakeJobManager> {
            Arc::new(FakeJobManager {
                jobs: Mutex::new(vec![status()]),
                task_managers: Mutex::new(vec![task_manager()]),
                savepoint_released: AtomicBool::new(true),
                savepoints_started: AtomicUsize::new(0),
                savepoints: Mutex::new(Vec::new()),
                submissions: Mutex::new(Vec::new()),
                cancellations: Mutex::new(Vec::new()),
            })
        }

        fn submissions(&self) -> Vec<JobSubmission> {
            self.submissions.lock().unwrap().clone()
        }

        /// Waits until `count` savepoint requests have reached the fake.
        fn wait_for_savepoint_requests(&self, count: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.savepoints_started.load(Ordering::Acquire) < count {
                assert!(
                    Instant::now() < deadline,
                    "the request never reached the handler"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
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
            self.savepoints_started.fetch_add(1, Ordering::AcqRel);
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
            self.cancellations.lock().unwrap().push(job);
            let mut jobs = self.jobs.lock().unwrap();
            let Some(status) = jobs
                .iter_mut()
                .find(|status| status.job_id == job && !status.is_terminal())
            else {
                return Err(format!("no running job {job}"));
            };
            status.state = "CANCELED".to_string();
            status.end_time_ms = Some(status.start_time_ms + 1);
            Ok(())
        }

        /// Refuses as the JobManager does: an unknown program, or the
        /// JobManager gone (the program `gone`).
        fn submit(&self, submission: JobSubmission) -> Result<JobId, String> {
            match submission.program.as_str() {
                "gone" => return Err("the JobManager stopped".to_string()),
                "nexmark" | "wordcount" => {}
                program => return Err(format!("unknown program '{program}'")),
            }
            self.submissions.lock().unwrap().push(submission);
            Ok(SUBMITTED.parse().unwrap())
        }

        fn task_managers(&self) -> Result<Vec<TaskManagerStatus>, String> {
            Ok(self.task_managers.lock().unwrap().clone())
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
        let (status, head, body) = read_text_answer(stream);
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).unwrap()
        };
        (status, head, body)
    }

    /// As [`exchange`], with the body as text.
    fn exchange_text(server: &RestServer, raw: &[u8]) -> (u16, String, String) {
        let mut stream = connect(server);
        stream.write_all(raw).unwrap();
        read_text_answer(&mut stream)
    }

    fn read_text_answer(stream: &mut TcpStream) -> (u16, String, String) {
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_string())
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
        // Cancelling it again is no error (Flink's answer), and does not
        // reach the JobManager.
        let (status, _, body) = exchange(&server, &request("PATCH", &target, ""));
        assert_eq!((status, body), (202, json!({})));
        assert_eq!(*fake.cancellations.lock().unwrap(), vec![job_id()]);
        // The cancelled job is still shown, with its checkpoints.
        let (status, _, body) = exchange(&server, &request("GET", "/jobs", ""));
        assert_eq!(
            (status, body),
            (
                200,
                json!({ "jobs": [{ "id": JOB, "status": "CANCELED" }] })
            )
        );
        let target = format!("/jobs/{JOB}/checkpoints");
        assert_eq!(exchange(&server, &request("GET", &target, "")).0, 200);
        // But no savepoint can be taken of it.
        let target = format!("/jobs/{JOB}/savepoints");
        let (status, _, body) = exchange(
            &server,
            &request("POST", &target, r#"{"target-directory": "/sp"}"#),
        );
        assert_eq!(
            (status, body),
            (
                409,
                json!({ "errors": [format!("job {JOB} has ended: it is CANCELED")] })
            )
        );
        // An unknown job is the JobManager's to refuse.
        let other = "00000000000000000000000000000009";
        let (status, _, body) = exchange(&server, &request("PATCH", &format!("/jobs/{other}"), ""));
        assert_eq!(
            (status, body),
            (
                404,
                json!({ "errors": [format!("no running job {other}")] })
            )
        );
        let target = format!("/jobs/{other}/checkpoints");
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
        fake.wait_for_savepoint_requests(1);
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
        // In flight: the server has read the request and is handling it.
        fake.wait_for_savepoint_requests(1);
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

    #[test]
    fn submits_a_job_and_answers_its_id() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let body = r#"{"program": "nexmark", "programArgs": ["--query", "q5"], "parallelism": 2,
            "savepointPath": "file:///sp/savepoint-1", "allowNonRestoredState": true}"#;
        let (status, head, answer) = exchange(&server, &request("POST", "/jobs", body));
        assert_eq!((status, answer), (200, json!({ "jobid": SUBMITTED })));
        assert!(head.contains("content-type: application/json"), "{head}");
        // Only `program` is needed; Flink's `programArgsList` is accepted,
        // and a `null` is an absent field.
        let body = r#"{"program": "wordcount", "programArgsList": ["--lines", "10"], "parallelism": null}"#;
        assert_eq!(exchange(&server, &request("POST", "/jobs", body)).0, 200);
        let body = r#"{"program": "wordcount"}"#;
        assert_eq!(exchange(&server, &request("POST", "/jobs/", body)).0, 200);
        assert_eq!(
            fake.submissions(),
            vec![
                JobSubmission {
                    program: "nexmark".to_string(),
                    arguments: vec!["--query".to_string(), "q5".to_string()],
                    parallelism: Some(2),
                    savepoint_path: Some(PathBuf::from("/sp/savepoint-1")),
                    allow_non_restored_state: true,
                },
                JobSubmission {
                    program: "wordcount".to_string(),
                    arguments: vec!["--lines".to_string(), "10".to_string()],
                    ..JobSubmission::default()
                },
                JobSubmission {
                    program: "wordcount".to_string(),
                    ..JobSubmission::default()
                },
            ]
        );
        server.stop();
    }

    #[test]
    fn refuses_bad_submissions_before_they_reach_the_job_manager() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let many = serde_json::to_string(&vec!["a"; ARGUMENT_COUNT_MAX + 1]).unwrap();
        let long = "a".repeat(ARGUMENT_LENGTH_MAX + 1);
        let refusals: Vec<(String, &str)> = vec![
            (String::new(), "the request body is empty"),
            ("{nope".to_string(), "malformed JSON body"),
            (
                r#"{"programArgs": []}"#.to_string(),
                "missing field `program`",
            ),
            (
                r#"{"program": "nexmark", "jarId": "x"}"#.to_string(),
                "unknown field `jarId`",
            ),
            (r#"{"program": ""}"#.to_string(), "program is empty"),
            (
                r#"{"program": "nexmark", "programArgs": "--query q5"}"#.to_string(),
                "invalid type",
            ),
            (
                r#"{"program": "nexmark", "parallelism": 0}"#.to_string(),
                "parallelism must be",
            ),
            (
                r#"{"program": "nexmark", "parallelism": 32769}"#.to_string(),
                "parallelism must be",
            ),
            (
                r#"{"program": "nexmark", "parallelism": -1}"#.to_string(),
                "parallelism must be",
            ),
            (
                r#"{"program": "nexmark", "parallelism": "2"}"#.to_string(),
                "parallelism must be",
            ),
            (
                r#"{"program": "nexmark", "savepointPath": "sp/savepoint-1"}"#.to_string(),
                "savepointPath 'sp/savepoint-1' is not an absolute path",
            ),
            (
                r#"{"program": "nexmark", "savepointPath": "/sp/../etc"}"#.to_string(),
                "path traversal",
            ),
            (
                r#"{"program": "nexmark", "savepointPath": ""}"#.to_string(),
                "savepointPath is empty",
            ),
            (
                format!(r#"{{"program": "nexmark", "programArgs": {many}}}"#),
                "programArgs has 1025 entries",
            ),
            (
                format!(r#"{{"program": "nexmark", "programArgs": ["--query", "{long}"]}}"#),
                "programArgs[1] is 4097 bytes",
            ),
            // The JobManager's own refusals.
            (
                r#"{"program": "unknown"}"#.to_string(),
                "unknown program 'unknown'",
            ),
        ];
        for (body, expected) in &refusals {
            let (status, _, answer) = exchange(&server, &request("POST", "/jobs", body));
            assert_eq!(status, 400, "{body}: {answer}");
            let message = answer["errors"][0].as_str().unwrap();
            assert!(message.contains(expected), "{body}: {message}");
        }
        let (status, _, answer) =
            exchange(&server, &request("POST", "/jobs", r#"{"program": "gone"}"#));
        assert_eq!(status, 503, "{answer}");
        // The largest parallelism is Flink's.
        let body = r#"{"program": "nexmark", "parallelism": 32768}"#;
        assert_eq!(exchange(&server, &request("POST", "/jobs", body)).0, 200);
        assert_eq!(fake.submissions().len(), 1);
        fake.submissions.lock().unwrap().clear();

        // A body over the limit, declared or chunked.
        let raw = "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n{";
        assert_eq!(exchange(&server, raw.as_bytes()).0, 413);
        let mut body = r#"{"program": "nexmark"}"#.to_string();
        body.push_str(&" ".repeat(BODY_SIZE_MAX + 1 - body.len()));
        assert_eq!(exchange(&server, &request("POST", "/jobs", &body)).0, 413);
        let (status, head, _) = exchange(&server, &request("DELETE", "/jobs", ""));
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, post"), "{head}");
        assert_eq!(fake.submissions(), Vec::new());
        // Nothing else changed either.
        assert_eq!(
            exchange(&server, &request("GET", "/jobs", "")).2,
            json!({ "jobs": [{ "id": JOB, "status": "RUNNING" }] })
        );
        server.stop();
    }

    #[test]
    fn savepoint_and_stop_refuse_climbing_target_directories() {
        let fake = FakeJobManager::new();
        let server = start(&fake, None);
        let target = format!("/jobs/{JOB}/savepoints");
        let body = r#"{"target-directory": "/sp/../../etc"}"#;
        let (status, _, answer) = exchange(&server, &request("POST", &target, body));
        assert_eq!(status, 400);
        assert!(answer["errors"][0]
            .as_str()
            .unwrap()
            .contains("path traversal"));
        let target = format!("/jobs/{JOB}/stop");
        let body = r#"{"targetDirectory": "/sp/.."}"#;
        assert_eq!(exchange(&server, &request("POST", &target, body)).0, 400);
        assert!(fake.savepoints.lock().unwrap().is_empty());
        server.stop();
    }

    #[test]
    fn serves_job_details_running_and_ended() {
        let fake = FakeJobManager::new();
        fake.jobs.lock().unwrap().push(finished());
        let server = start(&fake, None);
        let (status, _, body) = exchange(&server, &request("GET", &format!("/jobs/{JOB}"), ""));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            json!({
                "jid": JOB,
                "name": "nexmark-q5",
                "program": "nexmark",
                "state": "RUNNING",
                "reason": null,
                "attempt": 1,
                "restarts": 1,
                "parallelism": 2,
                "start-time": 1_700_000_000_000u64,
                "end-time": -1,
                "duration": 5_000,
                "vertices": [
                    {
                        "id": "0",
                        "name": "Source: bids -> Map",
                        "parallelism": 2,
                        "metrics": { "read-records": 0, "write-records": 17 },
                        // Subtask 1 has no watermark yet.
                        "watermark": null,
                        "subtasks": [
                            { "subtask": 0, "taskmanager-id": TASK_MANAGER, "read-records": 0, "write-records": 10, "watermark": 1_000 },
                            { "subtask": 1, "taskmanager-id": TASK_MANAGER, "read-records": 0, "write-records": 7, "watermark": null },
                        ],
                    },
                    {
                        "id": "1",
                        "name": "Window -> Sink",
                        "parallelism": 2,
                        "metrics": { "read-records": 17, "write-records": 3 },
                        "watermark": 900,
                        "subtasks": [
                            { "subtask": 0, "taskmanager-id": TASK_MANAGER, "read-records": 9, "write-records": 2, "watermark": 900 },
                            { "subtask": 1, "taskmanager-id": TASK_MANAGER, "read-records": 8, "write-records": 1, "watermark": 950 },
                        ],
                    },
                ],
                "accumulators": null,
                "savepoint": null,
            })
        );
        let ended = finished().job_id.to_string();
        let (status, _, body) = exchange(&server, &request("GET", &format!("/jobs/{ended}"), ""));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], json!("FINISHED"));
        assert_eq!(body["end-time"], json!(1_700_000_009_000u64));
        assert_eq!(body["vertices"], json!([]));
        assert_eq!(body["accumulators"], json!({ "results": 42 }));
        assert_eq!(body["savepoint"], json!("/sp/savepoint-9"));
        let (status, _, body) = exchange(&server, &request("GET", "/jobs/overview", ""));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["jobs"][1]["state"], json!("FINISHED"));
        // A stop or a cancel of a finished job is a conflict, as in Flink.
        let (status, _, body) = exchange(
            &server,
            &request(
                "POST",
                &format!("/jobs/{ended}/stop"),
                r#"{"targetDirectory": "/sp"}"#,
            ),
        );
        assert_eq!(status, 409, "{body}");
        let (status, _, body) = exchange(&server, &request("PATCH", &format!("/jobs/{ended}"), ""));
        assert_eq!(status, 409, "{body}");
        assert!(fake.cancellations.lock().unwrap().is_empty());
        let unknown = "00000000000000000000000000000009";
        let (status, _, body) = exchange(&server, &request("GET", &format!("/jobs/{unknown}"), ""));
        assert_eq!(status, 404, "{body}");
        assert!(
            body["errors"][0].as_str().unwrap().contains(unknown),
            "{body}"
        );
        server.stop();
    }

    #[test]
    fn serves_the_cluster_overview_and_task_managers() {
        let fake = FakeJobManager::new();
        fake.jobs.lock().unwrap().extend([finished(), failed()]);
        let waiting = JobStatus {
            job_id: "00000000000000000000000000000004".parse().unwrap(),
            state: "WAITING_FOR_SLOTS".to_string(),
            ..status()
        };
        fake.jobs.lock().unwrap().push(waiting);
        fake.task_managers.lock().unwrap().push(TaskManagerStatus {
            id: "00000000000000b2".to_string(),
            control_address: None,
            data_address: None,
            slots_total: 4,
            slots_free: 4,
            last_heartbeat_ms_ago: 0,
            network: NetworkCounts::default(),
        });
        let server = start(&fake, None);
        let (status, _, body) = exchange(&server, &request("GET", "/overview", ""));
        assert_eq!(
            (status, body),
            (
                200,
                json!({
                    "taskmanagers": 2,
                    "slots-total": 6,
                    "slots-available": 5,
                    "jobs-running": 2,
                    "jobs-finished": 1,
                    "jobs-cancelled": 0,
                    "jobs-failed": 1,
                    "strom-version": env!("CARGO_PKG_VERSION"),
                })
            )
        );
        let (status, _, body) = exchange(&server, &request("GET", "/taskmanagers", ""));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["taskmanagers"][0],
            json!({
                "id": TASK_MANAGER,
                "path": "10.0.0.2:41000",
                "dataPort": "10.0.0.2:6121",
                "slotsNumber": 2,
                "freeSlots": 1,
                "timeSinceLastHeartbeat": 120,
                "network": { "elementsSent": 5, "bytesSent": 500, "elementsReceived": 6, "bytesReceived": 600 },
            })
        );
        assert_eq!(body["taskmanagers"][1]["path"], Value::Null);
        assert_eq!(body["taskmanagers"][1]["dataPort"], Value::Null);
        server.stop();
    }

    /// Checks that every line of `text` is Prometheus text: `# HELP name
    /// text`, `# TYPE name type`, `# EOF`, or a sample `name{labels} value`
    /// whose label values are quoted and escaped; returns the samples'
    /// `name{labels}` and values.
    fn parse_prometheus_text(text: &str) -> Vec<(String, f64)> {
        let metric_name = |name: &str| {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut samples = Vec::new();
        assert!(text.ends_with('\n'), "{text}");
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("HELP"), Some(name), Some(_)) => assert!(metric_name(name), "{line}"),
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        assert!(metric_name(name), "{line}");
                        assert!(["counter", "gauge"].contains(&kind), "{line}");
                    }
                    (Some("EOF"), None, None) => {}
                    _ => panic!("not a Prometheus comment: {line}"),
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).expect(line);
            assert!(metric_name(&line[..name_end]), "{line}");
            let mut rest = &line[name_end..];
            if let Some(labels) = rest.strip_prefix('{') {
                let mut chars = labels.char_indices();
                // name="value" pairs, comma separated, up to the `}`.
                loop {
                    let (start, _) = chars.next().expect(line);
                    let equals = labels[start..].find('=').expect(line) + start;
                    assert!(metric_name(&labels[start..equals]), "{line}");
                    while chars.next().expect(line).0 < equals {}
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                    loop {
                        match chars.next().expect(line).1 {
                            '\\' => assert!(
                                matches!(chars.next().expect(line).1, '\\' | '"' | 'n'),
                                "{line}"
                            ),
                            '"' => break,
                            '\n' => panic!("raw newline: {line}"),
                            _ => {}
                        }
                    }
                    match chars.next().expect(line) {
                        (_, ',') => {}
                        (index, '}') => {
                            rest = &labels[index + 1..];
                            break;
                        }
                        _ => panic!("not a label set: {line}"),
                    }
                }
            }
            let value = rest.strip_prefix(' ').expect(line);
            let value: f64 = value.parse().expect(line);
            samples.push((line[..line.len() - rest.len()].to_string(), value));
        }
        samples
    }

    #[test]
    fn serves_prometheus_metrics() {
        let fake = FakeJobManager::new();
        // A name that needs escaping in a label value.
        fake.jobs.lock().unwrap()[0].job_name = "q5 \"hot\"\\items\nv2".to_string();
        fake.jobs.lock().unwrap().extend([finished(), failed()]);
        let server = start(&fake, None);
        let (status, head, text) = exchange_text(&server, &request("GET", "/metrics", ""));
        assert_eq!(status, 200, "{text}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        let samples = parse_prometheus_text(&text);
        let lines: Vec<&str> = text.lines().collect();
        assert!(!lines.contains(&"# EOF"), "{text}");
        for expected in [
            "# TYPE strom_slots_total gauge",
            "strom_taskmanagers 1",
            "strom_slots_total 2",
            "strom_slots_available 1",
            "strom_jobs{state=\"RUNNING\"} 1",
            "strom_jobs{state=\"FINISHED\"} 1",
            "strom_jobs{state=\"FAILED\"} 1",
            "strom_jobs{state=\"CANCELED\"} 0",
            "# TYPE strom_task_records_out_total counter",
            "# HELP strom_task_records_out_total Records the subtask wrote, in the job's current attempt.",
            "strom_taskmanager_network_bytes_sent_total{taskmanager_id=\"00000000000000a1\"} 500",
            "strom_taskmanager_network_elements_received_total{taskmanager_id=\"00000000000000a1\"} 6",
        ] {
            assert!(lines.contains(&expected), "{expected} not in\n{text}");
        }
        let labels = format!(r#"job_id="{JOB}",job_name="q5 \"hot\"\\items\nv2""#);
        let task = |vertex: &str, subtask: u32| {
            format!(
                r#"{labels},vertex="{vertex}",vertex_name="Window -> Sink",subtask="{subtask}""#
            )
            .replace(
                "Window -> Sink",
                if vertex == "0" {
                    "Source: bids -> Map"
                } else {
                    "Window -> Sink"
                },
            )
        };
        for (sample, value) in [
            (format!("strom_job_restarts_total{{{labels}}}"), 1.0),
            (
                format!("strom_job_checkpoints_completed_total{{{labels}}}"),
                2.0,
            ),
            (
                format!("strom_job_checkpoints_failed_total{{{labels}}}"),
                1.0,
            ),
            (
                format!("strom_task_records_out_total{{{}}}", task("0", 0)),
                10.0,
            ),
            (
                format!("strom_task_records_in_total{{{}}}", task("1", 1)),
                8.0,
            ),
            (format!("strom_task_watermark{{{}}}", task("1", 0)), 900.0),
        ] {
            assert!(
                samples.contains(&(sample.clone(), value)),
                "{sample} {value} not in\n{text}"
            );
        }
        // No watermark for a subtask without one, and no series for the
        // ended jobs.
        let unset = format!("strom_task_watermark{{{}}}", task("0", 1));
        assert!(samples.iter().all(|(sample, _)| *sample != unset), "{text}");
        let ended = finished().job_id.to_string();
        assert!(!text.contains(&ended), "{text}");

        // Prometheus' scraper asks for OpenMetrics and gets it.
        let raw = "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n";
        let (status, head, text) = exchange_text(&server, raw.as_bytes());
        assert_eq!(status, 200, "{text}");
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.lines()
                .any(|line| line == "# TYPE strom_task_records_out counter"),
            "{text}"
        );
        assert_eq!(parse_prometheus_text(&text).len(), samples.len());
        let (status, head, _) = exchange(&server, &request("POST", "/metrics", ""));
        assert_eq!(status, 405);
        assert!(head.contains("allow: get"), "{head}");
        server.stop();
    }

    #[test]
    fn new_endpoints_need_the_bearer_token() {
        let fake = FakeJobManager::new();
        let server = start(&fake, Some("s3cret"));
        for (method, target, body) in [
            ("GET", "/overview", ""),
            ("GET", "/taskmanagers", ""),
            ("GET", "/metrics", ""),
            ("GET", &format!("/jobs/{JOB}") as &str, ""),
            ("POST", "/jobs", r#"{"program": "nexmark"}"#),
        ] {
            let (status, head, _) = exchange(&server, &request(method, target, body));
            assert_eq!(status, 401, "{method} {target}");
            assert!(head.contains("www-authenticate: bearer"), "{head}");
        }
        assert_eq!(fake.submissions(), Vec::new());
        let raw = "POST /jobs HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Length: 22\r\n\r\n{\"program\": \"nexmark\"}";
        assert_eq!(exchange(&server, raw.as_bytes()).0, 200);
        let raw = b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n";
        assert_eq!(exchange_text(&server, raw).0, 200);
        server.stop();
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
            (404, json!({ "errors": [unknown_job(job_id()).message] }))
        );
        let target = format!("/jobs/{JOB}?mode=cancel");
        assert_eq!(exchange(&server, &authorized("PATCH", &target, "")).0, 404);
        let (status, _, body) = exchange(&server, &authorized("GET", "/overview", ""));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (
                &body["taskmanagers"],
                &body["slots-total"],
                &body["jobs-running"]
            ),
            (&json!(1), &json!(1), &json!(0))
        );
        let (status, _, body) = exchange(&server, &authorized("GET", "/taskmanagers", ""));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["taskmanagers"][0]["slotsNumber"], json!(1));
        let (status, _, text) = exchange_text(&server, &authorized("GET", "/metrics", ""));
        assert_eq!(status, 200, "{text}");
        assert!(
            text.lines().any(|line| line == "strom_slots_total 1"),
            "{text}"
        );
        // The cluster knows no programs: the JobManager's refusal is 400.
        let (status, _, body) = exchange(
            &server,
            &authorized("POST", "/jobs", r#"{"program": "nope"}"#),
        );
        assert_eq!(status, 400, "{body}");
        assert!(
            body["errors"][0].as_str().unwrap().contains("nope"),
            "{body}"
        );
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
