//! The page at `/` in a real headless browser: Debian's Chromium, driven through chromedriver
//! (package chromium-driver; `.ci/run` installs both). The test speaks the W3C WebDriver
//! protocol over plain HTTP with ureq, which the project already has, rather than pulling a
//! WebDriver crate and its TLS stack for a loopback connection.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into()
}

/// A chromedriver process and one headless Chromium session.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        assert!(Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(), "install chromium and chromium-driver (see .ci/run)");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(CHROMEDRIVER).arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while agent().get(format!("{base}/status")).call().is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": { "binary": CHROMIUM, "args": args } } } });
        let mut browser = Browser { driver, base, session: String::new(), _profile: profile };
        let created = browser.call("POST", "/session", Some(caps));
        browser.session = created["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut r = match method {
            "GET" => agent().get(url).call(),
            "DELETE" => agent().delete(url).call(),
            _ => agent().post(url).header("Content-Type", "application/json").send(body.unwrap_or(json!({})).to_string()),
        }
        .unwrap();
        let reply: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        reply["value"].clone()
    }

    fn session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self.session("POST", "/element", Some(json!({ "using": "css selector", "value": css })));
        v[ELEMENT].as_str().map(String::from)
    }

    fn element(&self, css: &str) -> String {
        self.find(css).unwrap_or_else(|| panic!("no element {css}"))
    }

    fn fill(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.session("POST", &format!("/element/{e}/clear"), None);
        self.session("POST", &format!("/element/{e}/value"), Some(json!({ "text": text })));
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.session("POST", &format!("/element/{e}/click"), None);
    }

    fn text(&self, css: &str) -> String {
        self.session("GET", &format!("/element/{}/text", self.element(css)), None).as_str().unwrap_or_default().to_string()
    }

    fn property(&self, css: &str, name: &str) -> Value {
        self.session("GET", &format!("/element/{}/property/{name}", self.element(css)), None)
    }

    /// Opens the page at `url`, waits for its device line to name `device`, fills the form's
    /// `fields` (CSS selector, text) and presses Generate.
    fn generate(&self, url: &str, device: &str, fields: &[(&str, &str)]) {
        self.session("POST", "/url", Some(json!({ "url": url })));
        self.wait(20, "the device line", |b| b.text("#device").contains(device));
        for (css, text) in fields {
            self.fill(css, text);
        }
        self.click("#generate");
    }

    /// Waits for `done` (checked every 50 ms), failing after `seconds`.
    fn wait(&self, seconds: u64, what: &str, mut done: impl FnMut(&Browser) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < Duration::from_secs(seconds), "waited {seconds} s for {what}; status: {}", self.text("#status"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `cogview serve` of the tiny model with `args`; the process and its URL.
fn serve(args: &[&str]) -> (Child, String) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/base/pipeline");
    let mut server = Command::new(env!("CARGO_BIN_EXE_cogview"))
        .args(["serve", "--port", "0", "--model"])
        .arg(&model)
        .args(args)
        .env_remove("COGVIEW_API_KEY")
        .env_remove("COGVIEW_DEVICE")
        .env_remove("COGVIEW_BACKEND")
        .env_remove("COGVIEW_PRECISION")
        .env_remove("COGVIEW_KERNEL_CACHE")
        .env("CUBECL_AUTOTUNE_LEVEL", "minimal")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = BufReader::new(server.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let url = line.strip_prefix("listening on ").unwrap().to_string();
    (server, url)
}

/// Fill the form, generate with the tiny model, see the progress and the image with its
/// parameters, and the session's history.
#[test]
fn the_page_generates_an_image_with_progress() {
    let (mut server, url) = serve(&["--device", "cpu"]);
    let browser = Browser::start();
    // Enough steps that the progress shows for a while.
    let fields = [("#prompt", "a red fox in the snow"), ("#width", "64"), ("#height", "64"), ("#steps", "1000"), ("#seed", "7")];
    browser.generate(&url, "burn-flex", &fields);
    browser.wait(60, "the progress", |b| b.text("#status").contains("transformer") && b.property("#bar", "value").as_f64() > Some(0.0));
    assert_eq!(browser.property("#bar", "max"), json!(1000));
    browser.wait(300, "the image", |b| b.text("#status").starts_with("done"));
    assert_eq!(browser.property("#image", "naturalWidth"), json!(64));
    assert!(browser.property("#image", "src").as_str().unwrap().starts_with("blob:"));
    let parameters = browser.text("#parameters");
    assert!(parameters.starts_with("a red fox in the snow") && parameters.contains("Steps: 1000") && parameters.contains("Seed: 7, Size: 64x64"), "{parameters}");
    assert!(browser.text("#status").contains("seed 7"));
    assert!(browser.find("#history li img").is_some(), "the image is in the session's history");
    let _ = server.kill();
    let _ = server.wait();
}

/// Job `id`'s statuses from its event stream, up to and including the finished one.
fn job_events(url: &str, id: u64) -> Vec<Value> {
    // No overall timeout: the stream lasts as long as the job.
    let stream: ureq::Agent = ureq::Agent::config_builder().build().into();
    let body = stream.get(format!("{url}/v1/jobs/{id}/events")).call().unwrap().into_body().into_reader();
    let mut seen = Vec::new();
    for line in BufReader::new(body).lines() {
        let Some(data) = line.unwrap().strip_prefix("data: ").map(|d| serde_json::from_str::<Value>(d).unwrap()) else { continue };
        let over = data["status"] != "queued" && data["status"] != "running";
        seen.push(data);
        if over {
            break;
        }
    }
    seen
}

/// On a GPU adapter (lavapipe) with nothing compiled yet (`--kernel-cache off`, a new process), a
/// job's first steps compile GPU kernels for a long while without a step event: the job's status
/// carries the counts as they grow (the event stream sends them while the step has not moved),
/// the page says "compiling GPU kernels", and the finished job says what it compiled. A second
/// job of the same size compiles and tunes nothing: the process keeps what the first one built.
#[test]
fn a_job_that_compiles_gpu_kernels_says_so() {
    let (mut server, url) = serve(&["--backend", "vulkan", "--precision", "f32", "--kernel-cache", "off"]);
    // The job's events, read beside the browser: every running status, then the finished one.
    let events = {
        let url = url.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while agent().get(format!("{url}/v1/jobs/1")).call().unwrap().status() != 200 {
                assert!(start.elapsed() < Duration::from_secs(60), "the page submitted no job");
                std::thread::sleep(Duration::from_millis(20));
            }
            job_events(&url, 1)
        })
    };
    let browser = Browser::start();
    browser.generate(&url, "llvmpipe", &[("#prompt", "a red fox in the snow"), ("#width", "32"), ("#height", "32"), ("#steps", "2")]);
    let mut compiling = false;
    browser.wait(600, "the image", |b| {
        let status = b.text("#status");
        compiling |= status.contains("compiling GPU kernels");
        status.starts_with("done")
    });
    assert!(compiling, "the page never said it was compiling");
    assert!(browser.text("#status").contains("GPU kernels compiled"), "{}", browser.text("#status"));

    let seen = events.join().unwrap();
    let done = seen.last().unwrap();
    assert_eq!(done["status"], "done", "{done}");
    let count = |e: &Value, what: &str| e["kernels"][what].as_u64().unwrap();
    assert!(count(done, "compiled") > 0 && count(done, "tuned") > 0, "{done}");
    // Only the counts moved between these two events: the status took them mid-step.
    let running: Vec<&Value> = seen.iter().filter(|e| e["status"] == "running").collect();
    let mid_step = running.windows(2).any(|w| w[0]["stage"] == w[1]["stage"] && w[0]["step"] == w[1]["step"] && count(w[1], "compiled") > count(w[0], "compiled"));
    assert!(mid_step, "no event while a step compiled: {running:?}");

    let again = agent()
        .post(format!("{url}/v1/jobs"))
        .send_json(json!({ "prompt": "a red fox in the snow", "width": 32, "height": 32, "steps": 2, "seed": 3 }))
        .unwrap()
        .into_body()
        .read_json::<Value>()
        .unwrap();
    let second = job_events(&url, again["id"].as_u64().unwrap()).pop().unwrap();
    assert_eq!(second["status"], "done", "{second}");
    assert_eq!(second["kernels"], json!({ "compiled": 0, "tuned": 0 }), "the second job built again what the first built");
    let _ = server.kill();
    let _ = server.wait();
}
