//! `cogview serve`: one loaded [`Pipeline`](cogview_runtime::Pipeline) behind an HTTP server
//! that the apps people already use can talk to.
//!
//! - `POST /v1/images/generations`: the OpenAI images API (`prompt`, `n`, `size`,
//!   `response_format: b64_json`, plus `negative_prompt`, `seed`, `steps`, `guidance`);
//! - `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img`: the AUTOMATIC1111 API subset front-ends
//!   use;
//! - `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events` (server-sent events:
//!   stage, step, total, ETA), `DELETE /v1/jobs/{id}` (cancel);
//! - `GET /health`, `GET /metrics` (Prometheus text), and a page at `/`.
//!
//! One generation runs at a time on the device, from a bounded first-in-first-out queue; a full
//! queue answers 429 with `Retry-After`. Bad requests get a 4xx JSON error naming the field; a
//! failure on the device a 5xx naming the stage, and the server keeps serving.

pub mod api;
mod http;
mod jobs;
mod metrics;

pub use http::{ServeError, ServeOptions, serve};
