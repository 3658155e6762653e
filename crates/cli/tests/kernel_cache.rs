//! The kernel cache across processes, on lavapipe: a second process reads what the first compiled
//! and tuned, a corrupted entry is ignored and rewritten, two processes may fill one cache at
//! once, and the cache goes where it is told. Each process is a whole `cogview generate` of the
//! tiny fixture on lavapipe. The cache holds autotune results and, with the SPIR-V compiler (the
//! default build's on Vulkan), the compiled kernels; WGSL kernels are compiled in every process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn base() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/base/pipeline").to_string_lossy().into_owned()
}

/// `cogview ARGS` on lavapipe, f32, with the cache flag given (or the `COGVIEW_KERNEL_CACHE`
/// variable), logging the cache's reads and damaged entries.
fn cogview(args: &[&str], cache: Cache) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cogview"));
    c.args(args)
        .args(["--backend", "vulkan", "--precision", "f32"])
        .env_remove("COGVIEW_DEVICE")
        .env_remove("COGVIEW_BACKEND")
        .env_remove("COGVIEW_PRECISION")
        .env_remove("COGVIEW_KERNEL_CACHE")
        .env("COGVIEW_LOG", "warn,cogview=info,cubecl_runtime::tune=info,cubecl_environment::persistence::file=debug")
        .env("CUBECL_AUTOTUNE_LEVEL", "minimal");
    match cache {
        Cache::Flag(dir) => c.arg("--kernel-cache").arg(dir),
        Cache::Env(dir) => c.env("COGVIEW_KERNEL_CACHE", dir),
    };
    c
}

/// `cogview generate` of the tiny fixture on lavapipe into `png`.
fn generate(cache: Cache, png: &Path) -> Command {
    let mut c = cogview(&["generate", "--model", &base(), "--prompt", "a red fox", "--steps", "2", "--width", "32", "--height", "32"], cache);
    c.args(["--seed", "5", "--overwrite", "-o"]).arg(png);
    c
}

#[derive(Clone, Copy)]
enum Cache<'a> {
    Flag(&'a Path),
    Env(&'a Path),
}

fn finish(what: &str, out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{err}");
    err
}

fn run(what: &str, cache: Cache, png: &Path) -> String {
    finish(what, generate(cache, png).output().expect("cogview runs"))
}

fn spawn(cache: Cache, png: &Path) -> Child {
    generate(cache, png).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("cogview runs")
}

/// Autotune results read from the cache, as CubeCL logs them when it loads a tuner's entries.
fn reads(log: &str) -> usize {
    log.lines()
        .filter_map(|l| l.split("Loaded ").nth(1)?.strip_suffix(" autotune cached entries")?.parse::<usize>().ok())
        .sum()
}

/// Kernels compiled and autotune keys tuned over the run's stages, from `generate`'s summary line
/// (`GPU kernels compiled/tuned: encode 65/15, denoise 64/24, decode 24/15`).
fn kernels(log: &str) -> (u64, u64) {
    let line = log.lines().find_map(|l| l.strip_prefix("GPU kernels compiled/tuned: ")).unwrap_or_else(|| panic!("no kernel counts:\n{log}"));
    line.split(", ").fold((0, 0), |(c, t), stage| {
        let (compiled, tuned) = stage.rsplit(' ').next().and_then(|n| n.split_once('/')).expect("stage c/t");
        (c + compiled.parse::<u64>().unwrap(), t + tuned.parse::<u64>().unwrap())
    })
}

/// Whether the run's kernels went through the SPIR-V compiler (which the cache keeps) rather than
/// WGSL (compiled in every process), from the log's device line (`compiler=spirv`).
fn spirv(log: &str) -> bool {
    let compiler = log.split(" compiler=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_else(|| panic!("no compiler in the log:\n{log}"));
    assert!(compiler == "spirv" || compiler == "wgsl", "lavapipe runs SPIR-V or WGSL, not {compiler}");
    compiler == "spirv"
}

/// The entry files under `dir` (not the temporary ones), at any depth.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(entries(&path));
        } else if !e.file_name().to_string_lossy().starts_with('.') {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn pixels(png: &Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// The first process compiles and tunes (and says so, and counts what it tuned); the second
/// reads the entries, tunes nothing, compiles nothing (SPIR-V, the default build's compiler on
/// Vulkan; WGSL kernels are compiled again in every process) and makes the same image. Then every
/// entry is damaged: the third process ignores them, tunes again, makes the same image, and leaves
/// intact entries behind, which a fourth reads again.
#[test]
fn later_processes_read_the_cache_and_a_damaged_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("kernels");
    let png = |n: usize| dir.path().join(format!("{n}.png"));

    let first = run("first", Cache::Flag(&cache), &png(1));
    assert!(first.contains("first run on this adapter and driver"), "{first}");
    assert_eq!(reads(&first), 0, "{first}");
    let (compiled, tuned) = kernels(&first);
    assert!(compiled > 0 && tuned > 0, "a first run compiled {compiled} and tuned {tuned}:\n{first}");
    let written = entries(&cache);
    assert!(!written.is_empty(), "nothing cached in {}", cache.display());
    // One environment, named for cogview's version and the driver.
    let envs: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(envs.len() == 1 && envs[0].starts_with(&format!("cogview-{}-", env!("CARGO_PKG_VERSION"))), "{envs:?}");

    let second = run("second", Cache::Flag(&cache), &png(2));
    assert!(!second.contains("first run on this adapter"), "{second}");
    assert!(reads(&second) > 0, "the second process read nothing:\n{second}");
    let (compiled, tuned) = kernels(&second);
    let from_cache = if spirv(&second) { compiled == 0 } else { compiled > 0 };
    assert!(from_cache && tuned == 0, "the second process compiled {compiled} and tuned {tuned}:\n{second}");
    assert_eq!(pixels(&png(2)), pixels(&png(1)), "the cached kernels gave another image");
    assert_eq!(entries(&cache), written, "the second process found everything it needed");

    // Damage every entry: flip a byte in the middle of each.
    let damaged: Vec<Vec<u8>> = written
        .iter()
        .map(|f| {
            let mut bytes = std::fs::read(f).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x5a;
            std::fs::write(f, &bytes).unwrap();
            bytes
        })
        .collect();
    let third = run("third", Cache::Flag(&cache), &png(3));
    assert!(third.contains("not an intact entry"), "the damage went unnoticed:\n{third}");
    assert!(kernels(&third).1 > 0, "nothing was tuned again:\n{third}");
    assert_eq!(pixels(&png(3)), pixels(&png(1)), "a damaged cache changed the image");
    // A damaged entry is rewritten when the third process needs it: every winner's tuning result
    // and compiled kernel. One it does not need stays damaged: a compiled losing candidate the new
    // tuning skipped (a tuning stops early once a candidate is fast enough), and the tuning results
    // of keys tuned only inside such a candidate (burn's fused reduce-broadcast candidate that runs
    // the unfused reduces tunes each of them under its own key). So most entries are rewritten, and
    // the fourth process, which reads the cache, tunes nothing, compiles nothing (SPIR-V) and meets
    // no damaged entry but those left behind.
    let left: Vec<&PathBuf> = written.iter().zip(&damaged).filter(|(f, bad)| &&std::fs::read(f).unwrap() == bad).map(|(f, _)| f).collect();
    let tuning = |f: &Path| f.components().any(|c| c.as_os_str() == "autotune" || c.as_os_str() == "throughput");
    let rewritten = |tuning_entries: bool| written.iter().filter(|f| tuning(f) == tuning_entries && !left.contains(f)).count();
    assert!(rewritten(true) > 0, "no tuning result was rewritten; left damaged: {left:#?}");
    assert!(!spirv(&third) || rewritten(false) > 0, "no compiled kernel was rewritten");
    let fourth = run("fourth", Cache::Flag(&cache), &png(4));
    let (compiled, tuned) = kernels(&fourth);
    let from_cache = if spirv(&fourth) { compiled == 0 } else { compiled > 0 };
    assert!(reads(&fourth) > 0 && from_cache && tuned == 0, "the fourth process compiled {compiled} and tuned {tuned}:\n{fourth}");
    for line in fourth.lines().filter(|l| l.contains("not an intact entry")) {
        assert!(left.iter().any(|f| line.contains(&*f.to_string_lossy())), "the fourth process met a damaged entry the third rewrote: {line}");
    }
    assert_eq!(pixels(&png(4)), pixels(&png(1)));
}

/// `cogview warmup` of a size compiles and tunes what a `generate` of that size needs: the
/// `generate` after it tunes nothing. (Its memory samples once made the warmup's fused kernels
/// end where a `generate`'s do not, leaving three products to tune.)
#[test]
fn a_warmup_leaves_nothing_to_tune() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("kernels");
    let out = cogview(&["warmup", "--config", &base(), "-W", "32", "-H", "32"], Cache::Flag(&cache)).output().expect("cogview runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    finish("warmup", out);
    let tuned: u64 = stdout.split(" kernels compiled, ").nth(1).and_then(|t| t.split(" tuned").next()?.parse().ok()).unwrap_or_else(|| panic!("{stdout}"));
    assert!(tuned > 0, "the warmup tuned nothing: {stdout}");
    let after = run("generate after the warmup", Cache::Flag(&cache), &dir.path().join("after.png"));
    assert_eq!(kernels(&after).1, 0, "the generate after the warmup tuned:\n{after}");
    // `bench --no-memory-samples` runs the same kernels: it finds them all tuned too.
    let args = ["bench", "--config", &base(), "--width", "32", "--height", "32", "--steps", "1", "--layers", "1", "--stages", "denoise", "--no-memory-samples", "--json"];
    let out = cogview(&args, Cache::Flag(&cache)).output().expect("cogview runs");
    let stdout = out.stdout.clone();
    finish("bench", out);
    let report: serde_json::Value = serde_json::from_slice(&stdout).expect("bench JSON");
    assert_eq!((&report["report"]["dit_kernels"]["tuned"], &report["memory_samples"]), (&0.into(), &false.into()), "{report}");
    // The transformer's exact f32 attention: the kernel the warmup's autotune chose, read back.
    let exact = report["report"]["dit_exact_attention"].as_str();
    assert!(matches!(exact, Some("unit_flash" | "head_groups")), "{report}");
}

/// Two processes filling one empty cache at once (given by the environment variable) both
/// finish with the same image, and leave entries a third process reads whole and makes that
/// image from. `off` keeps nothing.
#[test]
fn two_processes_fill_one_cache_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("shared");
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let (ca, cb) = (spawn(Cache::Env(&cache), &a), spawn(Cache::Env(&cache), &b));
    finish("a", ca.wait_with_output().unwrap());
    finish("b", cb.wait_with_output().unwrap());
    assert_eq!(pixels(&a), pixels(&b));
    assert!(!entries(&cache).is_empty());
    let after = dir.path().join("after.png");
    let log = run("after", Cache::Env(&cache), &after);
    assert!(reads(&log) > 0 && !log.contains("not an intact entry"), "{log}");
    assert_eq!(pixels(&after), pixels(&a));

    // `off` keeps nothing anywhere, although this run tunes. Left to itself CubeCL keeps tuning
    // results in `target/environment` of the outermost Cargo project above the working directory
    // (the Cargo.toml makes this directory one), else in the user's cache directory.
    let off = tempfile::tempdir().unwrap();
    let (work, home) = (off.path().join("work"), off.path().join("home"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(work.join("Cargo.toml"), "[workspace]\n").unwrap();
    // Mesa's shader cache stays where it was (else every shader compiles anew: minutes).
    let user_cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    let o = generate(Cache::Flag(Path::new("off")), &off.path().join("off.png"))
        .current_dir(&work)
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("MESA_SHADER_CACHE_DIR", user_cache)
        .output()
        .unwrap();
    let log = finish("generate, cache off", o);
    assert!(!log.contains("kernel cache dir="), "{log}");
    assert!(kernels(&log).1 > 0, "the run tuned nothing, so nothing could have been kept:\n{log}");
    assert_eq!(names(&work), ["Cargo.toml"], "`off` wrote into the working directory's Cargo project");
    assert!(names(&home).is_empty(), "`off` wrote into the user's directories: {:?}", names(&home));
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}
