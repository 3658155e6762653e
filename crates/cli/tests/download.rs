//! `--model ORG/NAME` against a small hub on 127.0.0.1 that serves the tiny fixture in the hub's
//! layout (the API's file list, `resolve` URLs with range requests, etags and commits), as
//! huggingface.co does: a fresh download, an offline second run, dropped connections tried
//! again, an interrupted transfer resumed by the next run, a 404 and a truncated file. No
//! internet.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use sha2::Digest;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the hub does wrong, for the error tests.
#[derive(Clone, Default)]
struct Faults {
    /// Drop the connection after this many bytes of the first full transfer of this file, and
    /// the next this-many transfers of it before any byte.
    interrupt: Option<(String, usize, usize)>,
    /// Serve this file short (without a length, so the client cannot tell) every time.
    truncate: Option<String>,
    /// Close this many connections at first without an answer.
    refuse: usize,
}

struct Hub {
    port: u16,
    /// `GET path` and its Range header, in order.
    log: Arc<Mutex<Vec<(String, String)>>>,
}

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file of a folder, by repo path.
fn files_of(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

impl Hub {
    /// Serves `test/tiny`: the base fixture plus files the pipeline must not fetch.
    fn start(faults: Faults) -> Hub {
        let mut files = files_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/base/pipeline"));
        files.insert("README.md".into(), b"# tiny".to_vec());
        files.insert("transformer/diffusion_pytorch_model.bin".into(), vec![0; 1000]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread_log = log.clone();
        std::thread::spawn(move || {
            let mut faults = faults;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve(stream, &files, &mut faults, &thread_log);
            }
        });
        Hub { port, log }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(mut stream: TcpStream, files: &BTreeMap<String, Vec<u8>>, faults: &mut Faults, log: &Mutex<Vec<(String, String)>>) {
    if faults.refuse > 0 {
        faults.refuse -= 1;
        log.lock().unwrap().push(("(refused)".into(), String::new()));
        return; // dropped: the client sees the connection closed
    }
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    reader.read_line(&mut request).unwrap();
    let mut range = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') && k.eq_ignore_ascii_case("range") {
            range = v.trim().to_string();
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    log.lock().unwrap().push((path.clone(), range.clone()));
    let reply = |stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        head += "\r\n";
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    if let Some(repo) = path.strip_prefix("/api/models/").and_then(|p| p.strip_suffix("/revision/main")) {
        if repo != "test/tiny" {
            return reply(&mut stream, "404 Not Found", &[("Content-Length", "0".into())], b"");
        }
        let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        let headers = [("Content-Type", "application/json".into()), ("Content-Length", body.len().to_string())];
        return reply(&mut stream, "200 OK", &headers, body.as_bytes());
    }
    let Some(file) = path.strip_prefix("/test/tiny/resolve/main/") else {
        return reply(&mut stream, "404 Not Found", &[("Content-Length", "0".into())], b"");
    };
    let Some(content) = files.get(file) else {
        return reply(&mut stream, "404 Not Found", &[("X-Error-Code", "EntryNotFound".into()), ("Content-Length", "0".into())], b"");
    };
    // LFS files are named by their sha256, the others by a (git) hash of 40 hex digits.
    let etag = if file.ends_with(".safetensors") { sha256(content) } else { sha256(content)[..40].to_string() };
    let total = content.len();
    let (start, end) = match range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
        Some((s, e)) => (s.parse::<usize>().unwrap_or(0), e.parse::<usize>().map_or(total.saturating_sub(1), |e| e.min(total - 1))),
        None => (0, total - 1),
    };
    if start >= total {
        return reply(&mut stream, "416 Range Not Satisfiable", &[("Content-Length", "0".into())], b"");
    }
    let body = &content[start..=end];
    let mut headers = vec![
        ("ETag", format!("\"{etag}\"")),
        ("X-Repo-Commit", COMMIT.to_string()),
        ("Content-Range", format!("bytes {start}-{end}/{total}")),
    ];
    let whole_transfer = range != "bytes=0-0";
    if whole_transfer && faults.truncate.as_deref() == Some(file) {
        // No length, half the bytes, a clean close: only the size check can tell.
        return reply(&mut stream, "206 Partial Content", &headers, &body[..body.len() / 2]);
    }
    headers.push(("Content-Length", body.len().to_string()));
    if whole_transfer && let Some((_, after, again)) = faults.interrupt.clone().filter(|(f, _, _)| f == file) {
        faults.interrupt = (again > 0).then(|| (file.to_string(), 0, again - 1));
        reply(&mut stream, "206 Partial Content", &headers, &body[..after]);
        let _ = stream.flush();
        return; // the connection drops mid-body
    }
    reply(&mut stream, "206 Partial Content", &headers, body);
}

fn cogview(hf_home: &Path, endpoint: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_cogview"))
        .args(args)
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("COGVIEW_MODEL")
        .env_remove("COGVIEW_DEVICE")
        .env_remove("COGVIEW_BACKEND")
        .env_remove("COGVIEW_PRECISION")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .output()
        .expect("cogview runs");
    println!("$ cogview {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

fn generate(dir: &Path, model: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let output = dir.join(out).to_string_lossy().into_owned();
    let mut args: Vec<String> = ["generate", "--model", model, "--prompt", "a red apple", "--steps", "2", "--width", "64", "--height", "64"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--seed", "1", "--device", "cpu", "--output", &output].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(home: &Path, endpoint: &str, args: &[String]) -> Output {
    cogview(home, endpoint, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "`{line}` should contain `{n}`");
    }
}

fn snapshot(home: &Path) -> PathBuf {
    home.join("hub/models--test--tiny/snapshots").join(COMMIT)
}

#[test]
fn fresh_download_then_offline() {
    let hub = Hub::start(Faults::default());
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let o = run(&home, &hub.endpoint(), &generate(tmp.path(), "test/tiny", "a.png", &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tmp.path().join("a.png").is_file());
    // Only what the pipeline reads, each file whole.
    let requested: Vec<String> = hub.requests().into_iter().map(|(p, _)| p).collect();
    assert!(!requested.iter().any(|p| p.ends_with(".bin") || p.ends_with("README.md")), "{requested:?}");
    let fixture = files_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/base/pipeline"));
    for (f, bytes) in &fixture {
        assert_eq!(&std::fs::read(snapshot(&home).join(f)).unwrap(), bytes, "{f}");
    }
    assert_eq!(std::fs::read_to_string(home.join("hub/models--test--tiny/refs/main")).unwrap(), COMMIT);

    // Offline, with nothing listening: the cache is enough.
    let o = run(&home, "http://127.0.0.1:9", &generate(tmp.path(), "test/tiny", "b.png", &["--offline"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(tmp.path().join("a.png")).unwrap(), std::fs::read(tmp.path().join("b.png")).unwrap());
    // Online again: one listing, no file transferred again.
    let before = hub.requests().len();
    let o = run(&home, &hub.endpoint(), &generate(tmp.path(), "test/tiny", "c.png", &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let again: Vec<_> = hub.requests()[before..].to_vec();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].0.starts_with("/api/models/test/tiny"));
    // `cogview download` prints the cached folder.
    let o = cogview(&home, &hub.endpoint(), &["download", "--model", "test/tiny"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), snapshot(&home).to_string_lossy());
    // Offline without a cache: a clear error.
    let empty = tmp.path().join("empty");
    let o = run(&empty, "http://127.0.0.1:9", &generate(tmp.path(), "test/tiny", "d.png", &["--offline"]));
    assert_clean_error(&o, &["--offline", "test/tiny", "not in the Hugging Face cache"]);
}

/// A network blip does not stop a run: refused connections and a transfer cut half-way are
/// tried again, the transfer continuing where it stopped.
#[test]
fn dropped_connections_are_tried_again() {
    let file = "vae/diffusion_pytorch_model.safetensors";
    let hub = Hub::start(Faults { refuse: 2, interrupt: Some((file.into(), 5000, 1)), ..Default::default() });
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let o = run(&home, &hub.endpoint(), &generate(tmp.path(), "test/tiny", "a.png", &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("trying again"), "{}", stderr(&o));
    let log = hub.requests();
    assert_eq!(log.iter().take_while(|(p, _)| p == "(refused)").count(), 2, "{log:?}");
    assert!(log[2].0.starts_with("/api/models/test/tiny"), "the listing is asked again: {log:?}");
    let ranges: Vec<String> = log.iter().filter(|(p, _)| p.ends_with(file)).map(|(_, r)| r.clone()).collect();
    assert!(ranges.contains(&"bytes=5000-".to_string()), "the transfer continues at byte 5000: {ranges:?}");
    let fixture = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/base/pipeline").join(file)).unwrap();
    assert_eq!(std::fs::read(snapshot(&home).join(file)).unwrap(), fixture);
}

/// A transfer that keeps failing stops the run with what it kept; the next run continues it.
#[test]
fn interrupted_transfer_resumes() {
    let file = "vae/diffusion_pytorch_model.safetensors";
    // The first transfer and every retry of this run fail; the next run's is served.
    let retries = cogview_runtime::import::hub::RETRIES;
    let hub = Hub::start(Faults { interrupt: Some((file.into(), 5000, retries)), ..Default::default() });
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let args = generate(tmp.path(), "test/tiny", "a.png", &[]);
    let o = run(&home, &hub.endpoint(), &args);
    assert_clean_error(&o, &[file, "5000 of", "run the same command again to resume"]);
    assert!(!tmp.path().join("a.png").exists(), "no image from a failed run");
    let o = run(&home, &hub.endpoint(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let ranges: Vec<String> = hub.requests().into_iter().filter(|(p, _)| p.ends_with(file)).map(|(_, r)| r).collect();
    assert!(ranges.contains(&"bytes=5000-".to_string()), "the second run continues at byte 5000: {ranges:?}");
    let fixture = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/base/pipeline").join(file)).unwrap();
    assert_eq!(std::fs::read(snapshot(&home).join(file)).unwrap(), fixture);
}

#[test]
fn missing_model_and_truncated_file_are_clear_errors() {
    let file = "transformer/diffusion_pytorch_model.safetensors";
    let hub = Hub::start(Faults { truncate: Some(file.into()), ..Default::default() });
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let o = run(&home, &hub.endpoint(), &generate(tmp.path(), "test/missing", "a.png", &[]));
    assert_clean_error(&o, &["test/missing", "HTTP 404", "check the model id"]);
    let o = run(&home, &hub.endpoint(), &generate(tmp.path(), "test/tiny", "a.png", &[]));
    assert_clean_error(&o, &[file, "bytes, the hub lists", "removed"]);
    assert!(!tmp.path().join("a.png").exists());
    assert!(!snapshot(&home).join(file).exists(), "a bad file must not look cached");
}
