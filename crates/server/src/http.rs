//! The HTTP side: routes, JSON errors, authentication, the event stream, the page.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use cogview_runtime::models::Configs;
use cogview_runtime::{Pipeline, Request as ImageRequest};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::api::{Api, ApiError, Img2Img, JobRequest, OpenAiRequest, Txt2Img};
use crate::jobs::{self, Image, Job, Queue, Status, Worker};
use crate::metrics::Metrics;

/// How the server listens and queues.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: IpAddr,
    /// 0: any free port (the bound address is reported).
    pub port: u16,
    /// Jobs that may wait behind the running one before requests get 429.
    pub queue: usize,
    /// The largest request body (413 past it).
    pub max_body_bytes: usize,
    /// When set, the API routes want `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The `--model` given (health, PNG metadata).
    pub model: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the handlers share.
struct AppState {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    configs: Configs,
    health: serde_json::Value,
    api_key: Option<String>,
}

/// Serves `pipeline` until interrupted (Ctrl-C). `ready` gets the bound address.
pub fn serve(pipeline: Pipeline, options: ServeOptions, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let queue = Arc::new(Queue::new(options.queue));
    let metrics = Arc::new(Metrics::default());
    let t = pipeline.target();
    let health = json!({
        "model": options.model,
        "adapter": t.adapter.label(),
        "compiler": t.capabilities.compiler,
        "precision": t.precision.dtype,
        "matmul": t.precision.matmul,
        "attention": if t.precision.flash.is_some() { "f16 tiles" } else { "f32" },
        "precision_reason": t.precision.reason,
        "auth": options.api_key.is_some(),
    });
    let state = Arc::new(AppState { queue: queue.clone(), metrics: metrics.clone(), configs: pipeline.configs().clone(), health, api_key: options.api_key });
    let worker = Worker { pipeline, model: options.model, metrics };
    std::thread::Builder::new().name("cogview-worker".into()).spawn(move || jobs::run(queue, worker))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(options.host, options.port);
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
        ready(listener.local_addr()?);
        let app = router(state, options.max_body_bytes);
        axum::serve(listener, app).with_graceful_shutdown(async { tokio::signal::ctrl_c().await.ok(); }).await?;
        Ok(())
    })
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/images/generations", post(openai))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(job).delete(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/images/{index}", get(image))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { Failure::from(ApiError::new(404, "not_found", "no such endpoint")) })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// An error response: the JSON body, and `Retry-After` for a full queue.
struct Failure {
    error: ApiError,
    retry_after: Option<u64>,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self { error, retry_after: None }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.error.body())).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// `Json<T>` whose rejections (not JSON, a missing field, a body past the limit) are this
/// server's JSON errors, with the status axum chose (400, 413, 415, 422).
struct ApiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = rejection.status().as_u16();
                let message = match &rejection {
                    JsonRejection::BytesRejection(_) if status == 413 => "the request body is too large".to_string(),
                    r => r.body_text(),
                };
                Err(ApiError::new(status, "invalid_request_error", message).into())
            }
        }
    }
}

async fn authenticate(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return Failure::from(ApiError::new(401, "authentication_error", "this server wants `Authorization: Bearer KEY` (--api-key)")).into_response();
        }
    }
    next.run(req).await
}

/// Counts every answered request by route and status.
async fn count(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    s.metrics.record_request(&endpoint, response.status().as_u16());
    response
}

/// A finished job's images, with the headers that say which job it was (`x-cogview-job`) and
/// where it finished among all jobs (`x-cogview-sequence`: the queue is first in, first out).
struct Finished {
    images: Arc<Vec<Image>>,
    headers: [(&'static str, String); 2],
}

/// Queues `requests` and waits for them; a client that goes away cancels its job.
async fn run(s: &AppState, api: Api, requests: Vec<ImageRequest>) -> Result<Finished, Failure> {
    let job = submit_job(s, api, requests)?;
    let mut guard = CancelOnDrop(Some(job.clone()));
    let status = job.finished().await;
    guard.0 = None;
    match status {
        Status::Done { images, sequence, .. } => {
            Ok(Finished { images, headers: [("x-cogview-job", job.id.to_string()), ("x-cogview-sequence", sequence.to_string())] })
        }
        Status::Failed { error, .. } => Err(error.into()),
        Status::Cancelled { .. } => Err(ApiError::new(409, "cancelled", format!("job {} was cancelled", job.id)).into()),
        _ => unreachable!("finished() returns a finished status"),
    }
}

fn submit_job(s: &AppState, api: Api, requests: Vec<ImageRequest>) -> Result<Arc<Job>, Failure> {
    s.queue.submit(api, requests).map_err(|full| {
        // One job takes seconds to minutes; ask the client to come back after a few.
        let retry_after = (s.queue.len() as u64 + 1) * 5;
        Failure { error: ApiError::new(429, "rate_limit_error", format!("{full}; try again later")), retry_after: Some(retry_after) }
    })
}

/// Cancels the job when the handler is dropped before it finished (the client disconnected);
/// emptied once the job has finished.
struct CancelOnDrop(Option<Arc<Job>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = &self.0 {
            job.cancel();
        }
    }
}

fn b64(png: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn openai(State(s): State<Arc<AppState>>, ApiJson(body): ApiJson<OpenAiRequest>) -> Result<impl IntoResponse, Failure> {
    let requests = body.common()?.requests(&s.configs, Api::OpenAi)?;
    let done = run(&s, Api::OpenAi, requests).await?;
    let data: Vec<_> = done.images.iter().map(|i| json!({ "b64_json": b64(&i.png), "revised_prompt": null })).collect();
    Ok((done.headers, Json(json!({ "created": unix_now(), "data": data }))))
}

/// A1111's answer: base64 PNGs, the request back, and `info` as a JSON string.
fn a1111_reply(parameters: serde_json::Value, done: Finished) -> impl IntoResponse {
    let images = &done.images;
    let seeds: Vec<u64> = images.iter().map(|i| i.seed).collect();
    let info = json!({
        "seed": seeds.first(),
        "all_seeds": seeds,
        "width": images.first().map(|i| i.width),
        "height": images.first().map(|i| i.height),
        "sampler_name": cogview_runtime::metadata::SAMPLER,
        "infotexts": images.iter().map(|i| i.parameters.clone()).collect::<Vec<_>>(),
    });
    let body = json!({ "images": images.iter().map(|i| b64(&i.png)).collect::<Vec<_>>(), "parameters": parameters, "info": info.to_string() });
    (done.headers, Json(body))
}

async fn txt2img(State(s): State<Arc<AppState>>, ApiJson(body): ApiJson<Txt2Img>) -> Result<impl IntoResponse, Failure> {
    let parameters = serde_json::to_value(&body).unwrap_or_default();
    let requests = body.common().requests(&s.configs, Api::A1111)?;
    Ok(a1111_reply(parameters, run(&s, Api::A1111, requests).await?))
}

async fn img2img(State(s): State<Arc<AppState>>, ApiJson(body): ApiJson<Img2Img>) -> Result<impl IntoResponse, Failure> {
    let mut parameters = serde_json::to_value(&body.base).unwrap_or_default();
    parameters["denoising_strength"] = body.denoising_strength.into();
    let requests = body.common()?.requests(&s.configs, Api::A1111)?;
    Ok(a1111_reply(parameters, run(&s, Api::A1111, requests).await?))
}

async fn submit(State(s): State<Arc<AppState>>, ApiJson(body): ApiJson<JobRequest>) -> Result<(StatusCode, Json<serde_json::Value>), Failure> {
    let requests = body.common()?.requests(&s.configs, Api::Jobs)?;
    let job = submit_job(&s, Api::Jobs, requests)?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&job, false))))
}

/// A job as JSON: its id and status (with the PNGs, base64, when `with_images`).
fn job_json(job: &Job, with_images: bool) -> serde_json::Value {
    let status = job.status();
    let mut v = serde_json::to_value(&status).unwrap_or_default();
    v["id"] = job.id.into();
    if let (Status::Done { images, .. }, true) = (&status, with_images) {
        for (i, image) in images.iter().enumerate() {
            v["images"][i]["b64_png"] = b64(&image.png).into();
        }
    }
    v
}

fn find(s: &AppState, id: u64) -> Result<Arc<Job>, Failure> {
    s.queue.get(id).ok_or_else(|| ApiError::new(404, "not_found", format!("no job {id}")).into())
}

async fn job(State(s): State<Arc<AppState>>, Path(id): Path<u64>) -> Result<Json<serde_json::Value>, Failure> {
    let job = find(&s, id)?;
    Ok(Json(job_json(&job, true)))
}

async fn cancel(State(s): State<Arc<AppState>>, Path(id): Path<u64>) -> Result<Json<serde_json::Value>, Failure> {
    let job = find(&s, id)?;
    job.cancel();
    Ok(Json(job_json(&job, false)))
}

async fn image(State(s): State<Arc<AppState>>, Path((id, index)): Path<(u64, usize)>) -> Result<Response, Failure> {
    let job = find(&s, id)?;
    let Status::Done { images, .. } = job.status() else {
        return Err(ApiError::new(404, "not_found", format!("job {id} has no images (yet)")).into());
    };
    let image = images.get(index).ok_or_else(|| ApiError::new(404, "not_found", format!("job {id} has no image {index}")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], image.png.as_ref().clone()).into_response())
}

/// Server-sent events: the job's status now, then at every change, until it finishes
/// (`progress` events, then one `done`, `failed` or `cancelled`).
async fn events(State(s): State<Arc<AppState>>, Path(id): Path<u64>) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Failure> {
    let rx = find(&s, id)?.subscribe();
    let stream = futures_util::stream::unfold((rx, true, false), |(mut rx, first, over)| async move {
        if over {
            return None;
        }
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let status = rx.borrow_and_update().clone();
        let name = match &status {
            Status::Queued { .. } | Status::Running { .. } => "progress",
            Status::Done { .. } => "done",
            Status::Failed { .. } => "failed",
            Status::Cancelled { .. } => "cancelled",
        };
        let event = Event::default().event(name).json_data(&status).unwrap_or_default();
        Some((Ok(event), (rx, false, status.finished())))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn health(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let mut v = s.health.clone();
    v["status"] = "ok".into();
    v["queue_length"] = s.queue.len().into();
    v["running"] = s.queue.running.load(Ordering::Relaxed).into();
    Json(v)
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let text = s.metrics.render(s.queue.len(), s.queue.running.load(Ordering::Relaxed));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
