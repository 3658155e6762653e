//! `GET /metrics`: Prometheus' text format, written by hand (a few counters and gauges).

use std::sync::Mutex;
use std::time::Duration;

use cogview_runtime::Output;
use cogview_runtime::kernel_activity::Kernels;

use crate::jobs::Status;

#[derive(Default)]
struct Counts {
    /// `(endpoint, status)` → requests answered.
    requests: Vec<((String, u16), u64)>,
    jobs_done: u64,
    jobs_failed: u64,
    jobs_cancelled: u64,
    images: u64,
    steps: u64,
    step_seconds: f64,
    job_seconds: f64,
    /// The most device memory a stage of the last job held.
    peak_bytes: Option<u64>,
}

#[derive(Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut c = self.counts.lock().expect("metrics lock");
        let key = (endpoint.to_string(), status);
        match c.requests.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => c.requests.push((key, 1)),
        }
    }

    pub fn record_batch(&self, outputs: &[Output]) {
        let mut c = self.counts.lock().expect("metrics lock");
        c.images += outputs.len() as u64;
        for o in outputs {
            c.steps += o.step_seconds.len() as u64;
            c.step_seconds += o.step_seconds.iter().sum::<f64>();
        }
        c.peak_bytes = outputs
            .iter()
            .flat_map(|o| [Some(&o.text), o.encode_image.as_ref(), Some(&o.denoise), Some(&o.decode)])
            .flatten()
            .filter_map(|stage| stage.peak.in_use)
            .max();
    }

    pub fn record_job(&self, status: &Status, took: Duration) {
        let mut c = self.counts.lock().expect("metrics lock");
        match status {
            Status::Done { .. } => c.jobs_done += 1,
            Status::Failed { .. } => c.jobs_failed += 1,
            _ => c.jobs_cancelled += 1,
        }
        c.job_seconds += took.as_secs_f64();
    }

    /// The exposition text, with the queue's length and whether a job runs.
    pub fn render(&self, queued: usize, running: bool) -> String {
        let c = self.counts.lock().expect("metrics lock");
        let mut s = String::new();
        s += "# HELP cogview_requests_total HTTP requests answered, by endpoint and status.\n# TYPE cogview_requests_total counter\n";
        for ((endpoint, status), n) in &c.requests {
            s += &format!("cogview_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}\n");
        }
        s += "# HELP cogview_queue_length Jobs waiting.\n# TYPE cogview_queue_length gauge\n";
        s += &format!("cogview_queue_length {queued}\n");
        s += "# HELP cogview_running Whether a job is on the device.\n# TYPE cogview_running gauge\n";
        s += &format!("cogview_running {}\n", u8::from(running));
        s += "# HELP cogview_jobs_total Jobs finished, by outcome.\n# TYPE cogview_jobs_total counter\n";
        for (outcome, n) in [("done", c.jobs_done), ("failed", c.jobs_failed), ("cancelled", c.jobs_cancelled)] {
            s += &format!("cogview_jobs_total{{outcome=\"{outcome}\"}} {n}\n");
        }
        s += "# HELP cogview_images_total Images generated.\n# TYPE cogview_images_total counter\n";
        s += &format!("cogview_images_total {}\n", c.images);
        s += "# HELP cogview_step_seconds Denoising steps: their count and total seconds.\n# TYPE cogview_step_seconds summary\n";
        s += &format!("cogview_step_seconds_sum {}\ncogview_step_seconds_count {}\n", c.step_seconds, c.steps);
        s += "# HELP cogview_job_seconds_total Seconds spent running jobs.\n# TYPE cogview_job_seconds_total counter\n";
        s += &format!("cogview_job_seconds_total {}\n", c.job_seconds);
        // A server that compiles or tunes after its first jobs meets a new size or plan.
        let kernels = Kernels::now();
        s += "# HELP cogview_kernels_compiled_total GPU kernels compiled (not read from the kernel cache).\n# TYPE cogview_kernels_compiled_total counter\n";
        s += &format!("cogview_kernels_compiled_total {}\n", kernels.compiled);
        s += "# HELP cogview_kernels_tuned_total Autotune keys tuned (not read from the kernel cache).\n# TYPE cogview_kernels_tuned_total counter\n";
        s += &format!("cogview_kernels_tuned_total {}\n", kernels.tuned);
        if let Some(b) = c.peak_bytes {
            s += "# HELP cogview_peak_memory_bytes The most device memory a stage of the last job held.\n# TYPE cogview_peak_memory_bytes gauge\n";
            s += &format!("cogview_peak_memory_bytes {b}\n");
        }
        s
    }
}
