//! `cogview serve` as apps use it: the real server on a loopback port with the tiny fixture
//! model, driven with a real HTTP client (ureq).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::Engine;
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn base() -> String {
    fixtures().join("base/pipeline").to_string_lossy().into_owned()
}

/// A running `cogview serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cogview"))
            .args(["serve", "--model", model, "--port", "0", "--device", "cpu"])
            .args(extra)
            .env_remove("COGVIEW_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cogview serve starts");
        let first = BufReader::new(child.stdout.take().unwrap()).lines().next().and_then(Result::ok);
        let Some(url) = first.as_deref().and_then(|l| l.strip_prefix("listening on ")).map(String::from) else {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("the server did not start: {first:?}\n{err}");
        };
        Server { child, url }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).build().into()
    }

    /// `(status, headers, JSON body)` of a POST.
    fn post(&self, path: &str, body: &Value) -> (u16, ureq::http::HeaderMap, Value) {
        self.post_raw(path, &body.to_string(), &[])
    }

    fn post_raw(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, ureq::http::HeaderMap, Value) {
        let mut req = Self::agent().post(format!("{}{path}", self.url)).header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut r = req.send(body).expect("the server answers");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.body_mut().read_to_string().unwrap();
        (status, headers, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = Self::agent().get(format!("{}{path}", self.url)).call().expect("the server answers");
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    fn delete(&self, path: &str) -> u16 {
        Self::agent().delete(format!("{}{path}", self.url)).call().expect("the server answers").status().as_u16()
    }

    fn healthy(&self) {
        let (status, body) = self.get("/health");
        assert_eq!(status, 200, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "ok");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn b64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s.as_str().unwrap()).unwrap()
}

/// What `cogview generate` writes for these flags.
fn generate(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let out = dir.join(name);
    let o = Command::new(env!("CARGO_BIN_EXE_cogview"))
        .args(["generate", "--device", "cpu", "-o"])
        .arg(&out)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

/// The seed cogview wrote into a PNG.
fn seed_of(png: &[u8]) -> u64 {
    let reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
    let json = &reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "cogview").unwrap().text;
    serde_json::from_str::<Value>(json).unwrap()["seed"].as_u64().unwrap()
}

/// Both generation APIs answer with the very PNG `cogview generate` writes for the same request
/// and seed (pixels and metadata), for text-to-image and img2img.
#[test]
fn generation_endpoints_return_what_generate_writes() {
    let dir = tempfile::tempdir().unwrap();
    let model = base();
    let server = Server::start(&model, &[]);
    let (status, _, body) = server.post(
        "/v1/images/generations",
        &json!({ "prompt": "a red fox", "negative_prompt": "blurry", "size": "64x64", "n": 2, "seed": 5, "steps": 2, "guidance": 7, "model": "cogview" }),
    );
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, seed) in [5, 6].into_iter().enumerate() {
        let cli = generate(dir.path(), &format!("openai-{seed}.png"), &["--model", &model, "--prompt", "a red fox", "-n", "blurry", "-W", "64", "-H", "64", "--seed", &seed.to_string(), "--steps", "2", "--guidance", "7"]);
        assert!(b64(&data[i]["b64_json"]) == cli, "OpenAI image {i} (seed {seed}) differs from the CLI's");
    }
    let (status, _, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({ "prompt": "a blue boat", "negative_prompt": "", "steps": 3, "cfg_scale": 4.5, "width": 64, "height": 96, "seed": 9, "sampler_name": "Euler a" }),
    );
    assert_eq!(status, 200, "{body}");
    let cli = generate(dir.path(), "a1111.png", &["--model", &model, "--prompt", "a blue boat", "-W", "64", "-H", "96", "--seed", "9", "--steps", "3", "--cfg-scale", "4.5"]);
    assert!(b64(&body["images"][0]) == cli, "the A1111 image differs from the CLI's");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([9]));
    assert!(info["infotexts"][0].as_str().unwrap().contains("Seed: 9, Size: 64x96"));
    let init = fixtures().join("img2img/init_64x64.png");
    let picture = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&init).unwrap());
    let (status, _, body) = server.post(
        "/sdapi/v1/img2img",
        &json!({ "prompt": "a watercolor", "init_images": [format!("data:image/png;base64,{picture}")], "denoising_strength": 0.5, "steps": 4, "cfg_scale": 7, "seed": 3 }),
    );
    assert_eq!(status, 200, "{body}");
    let cli = generate(dir.path(), "img2img.png", &["--model", &model, "--prompt", "a watercolor", "-i", init.to_str().unwrap(), "--strength", "0.5", "--seed", "3", "--steps", "4", "--guidance", "7"]);
    // The one difference: an uploaded image has no file name, so the metadata names it "init image".
    let (served_pixels, served_text) = png_content(&b64(&body["images"][0]));
    let (cli_pixels, cli_text) = png_content(&cli);
    assert!(served_pixels == cli_pixels, "the img2img pixels differ from the CLI's");
    let cli_text: Vec<_> = cli_text.into_iter().map(|(k, v)| (k, v.replace("init_64x64.png", "init image"))).collect();
    assert_eq!(served_text, cli_text, "the img2img metadata differs from the CLI's beyond the file name");
}

/// A PNG's decoded pixels and its text chunks.
fn png_content(png: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut pixels).unwrap();
    let text = reader.info().uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    (pixels, text)
}

/// Eight clients at once: each gets its own image, the same one it gets alone, and the jobs
/// finish in the order they were queued.
#[test]
fn eight_clients_are_served_in_queue_order() {
    let server = Server::start(&base(), &[]);
    let request = |seed: u64| json!({ "prompt": "a lighthouse", "size": "64x64", "seed": seed, "steps": 3 });
    let answers: Vec<(u64, u64, u64, Vec<u8>)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8u64)
            .map(|seed| {
                let server = &server;
                s.spawn(move || {
                    let (status, headers, body) = server.post("/v1/images/generations", &request(seed));
                    assert_eq!(status, 200, "{body}");
                    let number = |h: &str| headers.get(h).unwrap().to_str().unwrap().parse::<u64>().unwrap();
                    (seed, number("x-cogview-job"), number("x-cogview-sequence"), b64(&body["data"][0]["b64_json"]))
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut by_job = answers.clone();
    by_job.sort_by_key(|a| a.1);
    let sequences: Vec<u64> = by_job.iter().map(|a| a.2).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "first queued, first finished: {sequences:?}");
    for (seed, _, _, png) in &answers {
        assert_eq!(seed_of(png), *seed);
        let (_, _, alone) = server.post("/v1/images/generations", &request(*seed));
        assert!(b64(&alone["data"][0]["b64_json"]) == *png, "seed {seed}: the image differs from the one made alone");
    }
}

/// Reads server-sent events from `path` until `stop` says so.
fn events(server: &Server, path: &str, mut stop: impl FnMut(&str, &Value) -> bool) {
    let r = Server::agent().get(format!("{}{path}", server.url)).call().unwrap();
    let mut lines = BufReader::new(r.into_body().into_reader()).lines();
    let mut name = String::new();
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") && stop(&name, &serde_json::from_str(data).unwrap()) {
            return;
        }
    }
}

/// A job is followed through its event stream (step, total, ETA) and cancelled mid-run: it
/// stops at the next step, and the server goes on serving.
#[test]
fn a_cancelled_job_stops_at_the_next_step() {
    let server = Server::start(&base(), &[]);
    let (status, _, job) = server.post("/v1/jobs", &json!({ "prompt": "x", "width": 64, "height": 64, "steps": 1000, "seed": 1 }));
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_u64().unwrap();
    let mut seen = 0;
    let mut last = Value::Null;
    events(&server, &format!("/v1/jobs/{id}/events"), |name, e| {
        if name == "progress" && e["stage"] == "transformer" && e["step"].as_u64().unwrap() >= 3 && seen == 0 {
            assert!(e["total"] == 1000 && e["eta_seconds"].as_f64().unwrap() > 0.0, "{e}");
            seen = e["step"].as_u64().unwrap();
            assert_eq!(server.delete(&format!("/v1/jobs/{id}")), 200);
        }
        last = json!({ "event": name, "status": e });
        name == "cancelled"
    });
    assert_eq!(last["event"], "cancelled", "{last}");
    // What the job compiled before it stopped (nothing on the CPU backend), as `done` says it.
    assert_eq!(last["status"]["kernels"], json!({ "compiled": 0, "tuned": 0 }), "{last}");
    let stopped = last["status"]["step"].as_u64().unwrap();
    assert!(stopped >= seen && stopped < 1000, "stopped before step {stopped}, cancelled after {seen}");
    assert_eq!(serde_json::from_str::<Value>(&server.get(&format!("/v1/jobs/{id}")).1).unwrap()["status"], "cancelled");
    let (status, _, _) = server.post("/v1/images/generations", &json!({ "prompt": "x", "size": "64x64", "steps": 1 }));
    assert_eq!(status, 200);
}

/// Every bad request gets its status and a JSON error naming the field; the server answers
/// the next request after each.
#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let server = Server::start(&base(), &["--queue", "1", "--max-body-size", "64KiB"]);
    let ok = json!({ "prompt": "x", "size": "64x64", "steps": 1 });
    let with = |k: &str, v: Value| {
        let mut r = ok.clone();
        r[k] = v;
        r
    };
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/images/generations", with("size", json!("72x64")).to_string(), 400, Some("size")),
        ("/v1/images/generations", with("steps", json!(0)).to_string(), 400, Some("steps")),
        ("/v1/images/generations", with("guidance", json!(1e39)).to_string(), 400, Some("guidance")),
        ("/v1/images/generations", with("prompt", json!("a".repeat(4001))).to_string(), 400, Some("prompt")),
        ("/v1/images/generations", with("n", json!(50)).to_string(), 400, Some("n")),
        ("/v1/images/generations", with("response_format", json!("url")).to_string(), 400, Some("response_format")),
        ("/sdapi/v1/txt2img", json!({ "prompt": "x", "width": 64, "height": 64, "cfg_scale": 1e39 }).to_string(), 400, Some("cfg_scale")),
        ("/sdapi/v1/txt2img", json!({ "prompt": "x", "width": 64, "height": 50 }).to_string(), 400, Some("height")),
        ("/sdapi/v1/img2img", json!({ "prompt": "x", "init_images": ["bm90IGFuIGltYWdl"] }).to_string(), 400, Some("init_images")),
        ("/v1/images/generations", "{not json".to_string(), 400, None),
        ("/v1/images/generations", json!({ "size": "64x64" }).to_string(), 422, None),
        ("/v1/images/generations", with("prompt", json!("a".repeat(70_000))).to_string(), 413, None),
    ];
    for (path, body, status, param) in cases {
        let (got, _, reply) = server.post_raw(path, &body, &[]);
        assert_eq!(got, status, "{path} {}: {reply}", &body[..body.len().min(80)]);
        assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
        assert_eq!(reply["error"]["param"].as_str(), param, "{reply}");
        server.healthy();
    }
    assert_eq!(server.get("/v1/jobs/999").0, 404);
    // A full queue: one job running, one waiting, the next refused with Retry-After.
    let long = json!({ "prompt": "x", "width": 64, "height": 64, "steps": 1000 });
    let (_, _, running) = server.post("/v1/jobs", &long);
    let id = running["id"].as_u64().unwrap();
    events(&server, &format!("/v1/jobs/{id}/events"), |_, e| e["status"] == "running");
    let (status, _, waiting) = server.post("/v1/jobs", &long);
    assert_eq!(status, 202, "{waiting}");
    assert_eq!(waiting["position"], 1);
    let (status, headers, refused) = server.post("/v1/jobs", &long);
    assert_eq!(status, 429, "{refused}");
    assert!(headers.get("retry-after").is_some());
    for job in [&running, &waiting] {
        assert_eq!(server.delete(&format!("/v1/jobs/{}", job["id"])), 200);
    }
    server.healthy();
}

/// A failure on the device (a NaN planted in a transformer weight) is a 500 naming the stage;
/// the server keeps serving.
#[test]
fn a_failure_on_the_device_is_a_5xx_naming_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&fixtures().join("base/pipeline"), &model);
    let file = model.join("transformer/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    // The file: an 8-byte header length, the JSON header, then the data the offsets index.
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let offset = 8 + header_len + meta.info("transformer_blocks.1.ff.net.2.weight").unwrap().data_offsets.0;
    bytes[offset..offset + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    let server = Server::start(model.to_str().unwrap(), &[]);
    for _ in 0..2 {
        let (status, _, body) = server.post("/v1/images/generations", &json!({ "prompt": "x", "size": "64x64", "steps": 1 }));
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["error"]["stage"], "transformer", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("transformer_blocks.1.ff.net.2"), "{body}");
        server.healthy();
    }
    // A job says the same in its `failed` event, with what it compiled (nothing on the CPU).
    let (status, _, job) = server.post("/v1/jobs", &json!({ "prompt": "x", "width": 64, "height": 64, "steps": 1 }));
    assert_eq!(status, 202, "{job}");
    let mut last = Value::Null;
    events(&server, &format!("/v1/jobs/{}/events", job["id"]), |name, e| {
        last = json!({ "event": name, "status": e });
        name != "progress"
    });
    assert_eq!((&last["event"], &last["status"]["error"]["stage"]), (&json!("failed"), &json!("transformer")), "{last}");
    assert_eq!(last["status"]["kernels"], json!({ "compiled": 0, "tuned": 0 }), "{last}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `--api-key`: the API wants the bearer token, the page and the health check do not;
/// `/metrics` counts what happened; `/` is the page.
#[test]
fn api_key_metrics_health_and_page() {
    let server = Server::start(&base(), &["--api-key", "s3cret"]);
    let request = json!({ "prompt": "x", "size": "64x64", "steps": 1 }).to_string();
    let (status, _, body) = server.post_raw("/v1/images/generations", &request, &[]);
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = server.post_raw("/v1/images/generations", &request, &[("Authorization", "Bearer wrong")]);
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = server.post_raw("/v1/images/generations", &request, &[("Authorization", "Bearer s3cret")]);
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&server.get("/health").1).unwrap();
    assert_eq!((health["auth"].as_bool(), health["queue_length"].as_u64()), (Some(true), Some(0)));
    assert!(health["adapter"].as_str().unwrap().contains("burn-flex") && health["precision"] == "f32", "{health}");
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "cogview_requests_total{endpoint=\"/v1/images/generations\",status=\"401\"} 2",
        "cogview_requests_total{endpoint=\"/v1/images/generations\",status=\"200\"} 1",
        "cogview_images_total 1",
        "cogview_queue_length 0",
        "cogview_step_seconds_count 1",
        // burn's CPU backend compiles no GPU kernel.
        "cogview_kernels_compiled_total 0",
        "cogview_kernels_tuned_total 0",
    ] {
        assert!(metrics.contains(line), "`{line}` in\n{metrics}");
    }
    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>cogview</title>") && page.contains("id=\"generate\""));
}

/// The server binds to loopback unless told otherwise, and says so when it is.
#[test]
fn other_hosts_get_a_warning() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cogview"))
        .args(["serve", "--model", &base(), "--port", "0", "--device", "cpu", "--host", "0.0.0.0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(line.starts_with("listening on http://0.0.0.0:"), "{line}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answers other machines") && err.contains("--api-key"), "{err}");
    let server = Server::start(&base(), &[]);
    assert!(server.url.starts_with("http://127.0.0.1:"), "{}", server.url);
}
