//! The queue and the one worker that runs it: jobs first in, first out, one at a time on the
//! device, each with a status its waiters and event streams watch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use cogview_runtime::kernel_activity::Kernels;
use cogview_runtime::metadata::Settings;
use cogview_runtime::output::png_bytes;
use cogview_runtime::{Pipeline, Progress, Request, RuntimeError, Stage};
use serde::Serialize;
use tokio::sync::watch;

use crate::api::{Api, ApiError};
use crate::metrics::Metrics;

/// How many finished jobs stay readable (`GET /v1/jobs/{id}`) before the oldest are dropped.
const KEPT_FINISHED: usize = 64;

/// How often a running job's status takes the kernel counts while nothing else moves it: a step
/// that compiles GPU kernels (a first run on an adapter, a new size) sends no step event for a
/// minute or more, and the counts are what shows it is busy.
const KERNEL_POLL: Duration = Duration::from_millis(500);

/// A generated image, encoded.
#[derive(Clone, Debug, Serialize)]
pub struct Image {
    /// The PNG, with the same metadata the CLI writes.
    #[serde(skip)]
    pub png: Arc<Vec<u8>>,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// A1111's `parameters` text.
    pub parameters: String,
}

/// Where a job is.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    Queued { position: usize },
    /// `kernels`, here and in every finished status: GPU kernels compiled and autotune keys
    /// tuned since the job started (none on the CPU backend, none for what the kernel cache or
    /// an earlier job already has, none for a job cancelled before it ran).
    Running { stage: Stage, step: usize, total: usize, eta_seconds: Option<f64>, kernels: Kernels },
    Done { images: Arc<Vec<Image>>, seconds: f64, sequence: u64, kernels: Kernels },
    Failed { error: ApiError, kernels: Kernels },
    Cancelled { stage: Option<Stage>, step: Option<usize>, kernels: Kernels },
}

impl Status {
    pub fn finished(&self) -> bool {
        matches!(self, Status::Done { .. } | Status::Failed { .. } | Status::Cancelled { .. })
    }
}

/// One submitted request (one or more images).
pub struct Job {
    pub id: u64,
    pub api: Api,
    pub requests: Vec<Request>,
    cancel: AtomicBool,
    status: watch::Sender<Status>,
}

impl Job {
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Asks the job to stop: a queued job never runs, a running one stops before its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// The finished status, once the job is done, failed or cancelled.
    pub async fn finished(&self) -> Status {
        let mut rx = self.subscribe();
        loop {
            let status = rx.borrow_and_update().clone();
            if status.finished() {
                return status;
            }
            if rx.changed().await.is_err() {
                return self.status();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the queue is full ({capacity} waiting)")]
pub struct QueueFull {
    pub capacity: usize,
}

/// The waiting jobs, and every job still readable.
pub struct Queue {
    waiting: Mutex<VecDeque<Arc<Job>>>,
    wake: Condvar,
    capacity: usize,
    next_id: AtomicU64,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    finished_order: Mutex<VecDeque<u64>>,
    /// Whether a job is on the device now.
    pub running: AtomicBool,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            waiting: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            capacity,
            next_id: AtomicU64::new(1),
            jobs: Mutex::new(HashMap::new()),
            finished_order: Mutex::new(VecDeque::new()),
            running: AtomicBool::new(false),
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.lock().expect("queue lock").len()
    }

    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.jobs.lock().expect("jobs lock").get(&id).cloned()
    }

    /// Adds a job at the back, or refuses it when `capacity` jobs already wait.
    pub fn submit(&self, api: Api, requests: Vec<Request>) -> Result<Arc<Job>, QueueFull> {
        let mut waiting = self.waiting.lock().expect("queue lock");
        if waiting.len() >= self.capacity {
            return Err(QueueFull { capacity: self.capacity });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (status, _) = watch::channel(Status::Queued { position: waiting.len() + 1 });
        let job = Arc::new(Job { id, api, requests, cancel: AtomicBool::new(false), status });
        self.jobs.lock().expect("jobs lock").insert(id, job.clone());
        waiting.push_back(job.clone());
        self.wake.notify_one();
        Ok(job)
    }

    /// The next job, waiting for one.
    fn next(&self) -> Arc<Job> {
        let mut waiting = self.waiting.lock().expect("queue lock");
        loop {
            if let Some(job) = waiting.pop_front() {
                for (i, j) in waiting.iter().enumerate() {
                    j.status.send_replace(Status::Queued { position: i + 1 });
                }
                return job;
            }
            waiting = self.wake.wait(waiting).expect("queue lock");
        }
    }

    /// Records a job as finished, dropping the oldest finished ones past [`KEPT_FINISHED`].
    fn finish(&self, job: &Job, status: Status) {
        job.status.send_replace(status);
        let mut order = self.finished_order.lock().expect("order lock");
        order.push_back(job.id);
        while order.len() > KEPT_FINISHED {
            let old = order.pop_front().expect("not empty");
            self.jobs.lock().expect("jobs lock").remove(&old);
        }
    }
}

/// What the worker needs besides the queue.
pub struct Worker {
    pub pipeline: Pipeline,
    /// The `--model` given, for the PNG metadata.
    pub model: String,
    pub metrics: Arc<Metrics>,
}

/// Runs the queue's jobs one at a time, forever.
pub fn run(queue: Arc<Queue>, mut worker: Worker) {
    let mut sequence = 0;
    loop {
        let job = queue.next();
        if job.cancel.load(Ordering::Relaxed) {
            queue.finish(&job, Status::Cancelled { stage: None, step: None, kernels: Kernels::default() });
            continue;
        }
        queue.running.store(true, Ordering::Relaxed);
        let start = Instant::now();
        let at_start = Kernels::now();
        let mut progress = JobProgress { job: &job, stage: Stage::Text, total: 0, at_start };
        let result = std::thread::scope(|s| {
            let (stop, stopped) = mpsc::channel::<()>();
            s.spawn(|| follow_kernels(&job, at_start, stopped));
            let result = worker.pipeline.generate_batch(&job.requests, &mut progress);
            drop(stop);
            result
        });
        let kernels = progress.kernels();
        let status = match result {
            Ok(batch) => {
                worker.metrics.record_batch(&batch.outputs);
                let images = batch
                    .outputs
                    .iter()
                    .zip(&job.requests)
                    .map(|(out, request)| {
                        let settings = Settings::new(request, out, &worker.model, worker.pipeline.target());
                        let png = png_bytes(&out.rgb, out.width, out.height, &settings.png_text()).expect("an in-memory PNG encodes");
                        Image { png: Arc::new(png), seed: request.seed, width: out.width, height: out.height, parameters: settings.parameters() }
                    })
                    .collect();
                sequence += 1;
                Status::Done { images: Arc::new(images), seconds: start.elapsed().as_secs_f64(), sequence, kernels }
            }
            Err(RuntimeError::Cancelled { stage, step }) => Status::Cancelled { stage: Some(stage), step, kernels },
            Err(e) => {
                tracing::warn!("job {}: {e}", job.id);
                Status::Failed { error: ApiError::run(&e, job.api), kernels }
            }
        };
        worker.metrics.record_job(&status, start.elapsed());
        queue.running.store(false, Ordering::Relaxed);
        queue.finish(&job, status);
    }
}

/// Puts the kernel counts since `at_start` into the job's running status every [`KERNEL_POLL`]
/// while they change, until `stopped` closes (the job is over).
fn follow_kernels(job: &Job, at_start: Kernels, stopped: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(KERNEL_POLL) {
        let now = Kernels::now().since(at_start);
        job.status.send_if_modified(|status| match status {
            Status::Running { kernels, .. } if *kernels != now => {
                *kernels = now;
                true
            }
            _ => false,
        });
    }
}

/// A job's progress, as its status.
struct JobProgress<'a> {
    job: &'a Job,
    stage: Stage,
    total: usize,
    /// The process's kernel counts when the job started.
    at_start: Kernels,
}

impl JobProgress<'_> {
    /// Kernels compiled and tuned since the job started.
    fn kernels(&self) -> Kernels {
        Kernels::now().since(self.at_start)
    }
}

impl Progress for JobProgress<'_> {
    fn stage(&mut self, stage: Stage, steps: usize) {
        (self.stage, self.total) = (stage, steps);
        self.job.status.send_replace(Status::Running { stage, step: 0, total: steps, eta_seconds: None, kernels: self.kernels() });
    }

    fn step(&mut self, done: usize, elapsed: Duration) {
        let per_step = elapsed.as_secs_f64() / done.max(1) as f64;
        let eta = Some(per_step * self.total.saturating_sub(done) as f64);
        self.job.status.send_replace(Status::Running { stage: self.stage, step: done, total: self.total, eta_seconds: eta, kernels: self.kernels() });
    }

    fn cancelled(&self) -> bool {
        self.job.cancel.load(Ordering::Relaxed)
    }
}
