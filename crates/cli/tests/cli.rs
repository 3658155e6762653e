//! The `cogview` binary as a user runs it, on the fixtures in `tests/fixtures`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn base() -> String {
    fixtures().join("base/pipeline").to_string_lossy().into_owned()
}

fn cogview(args: &[&str]) -> Output {
    cogview_with(args, &[])
}

/// `cogview args` with these environment variables set.
fn cogview_with(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_cogview"))
        .args(args)
        .env_remove("COGVIEW_DEVICE")
        .env_remove("COGVIEW_BACKEND")
        .env_remove("COGVIEW_PRECISION")
        .env_remove("COGVIEW_MATMUL_KERNEL")
        // Every run starts from nothing (kernel_cache.rs tests the cache).
        .env("COGVIEW_KERNEL_CACHE", "off")
        .envs(vars.iter().copied())
        .output()
        .expect("cogview runs");
    println!("$ cogview {}\n{}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit, one `error:` line, no panic.
#[track_caller]
fn assert_clean_error(o: &Output, needle: &str) {
    assert!(!o.status.success());
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "`{}` should contain `{needle}`", lines[0]);
}

#[test]
fn devices_lists_lavapipe_and_the_cpu_backend() {
    let o = cogview(&["devices"]);
    assert!(o.status.success());
    let out = stdout(&o);
    let lvp = out.lines().find(|l| l.contains("llvmpipe")).expect("lavapipe is listed");
    for word in ["software", "Vulkan", "storage+arith", "no"] {
        assert!(lvp.contains(word), "`{lvp}` should say {word}");
    }
    // Its compiler: SPIR-V in the default build, WGSL without the native compilers.
    assert!(lvp.contains("spirv") || lvp.contains("wgsl"), "`{lvp}` should name its compiler");
    assert!(out.lines().any(|l| l.contains("cpu") && l.contains("burn-flex")));
    assert!(out.contains("cogview would use burn-flex CPU backend (CPU, cpu) in f32"), "{out}");
    assert!(out.contains("lacks bf16 arithmetic"), "{out}");
    assert!(out.contains("emulates bf16"), "{out}");
    let json = cogview(&["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["adapter"]["api"] == "vulkan" && r["capabilities"]["bf16"]["arithmetic"] == false));
    assert_eq!(rows.iter().filter(|r| r["selected"] == true).count(), 1);
}

#[test]
fn bf16_is_refused_with_one_line() {
    assert_clean_error(&cogview(&["devices", "--precision", "bf16"]), "lacks native bf16 arithmetic");
    assert_clean_error(&cogview(&["devices", "--backend", "vulkan", "--precision", "bf16"]), "llvmpipe");
    assert_clean_error(&cogview(&["devices", "--device", "42"]), "--device 42");
}

#[test]
fn f16_on_lavapipe_is_accepted_after_the_self_test_or_refused() {
    let o = cogview(&["devices", "--backend", "vulkan", "--precision", "f16"]);
    if o.status.success() {
        assert!(stdout(&o).contains("self-test of f16 arithmetic"), "{}", stdout(&o));
    } else {
        assert_clean_error(&o, "f16");
    }
}

#[test]
fn inspect_reports_counts_and_dtypes() {
    let o = cogview(&["inspect", "--model", &base(), "--device", "cpu"]);
    assert!(o.status.success());
    let out = stdout(&o);
    // Parameter counts straight from the files.
    for (component, file) in [("transformer", "transformer/diffusion_pytorch_model.safetensors"), ("vae", "vae/diffusion_pytorch_model.safetensors")] {
        let bytes = std::fs::read(fixtures().join("base/pipeline").join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let params: usize = st.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>()).sum();
        let section = out.split(&format!("\n{component} (")).nth(1).unwrap();
        assert!(section.contains(&format!("parameters {params} in {} tensors", st.len())), "{component}: {params}\n{section}");
        assert!(section.contains(&format!("stored     F32 {params}")), "{section}");
    }
    assert!(!out.contains("ignored") || out.contains("tied to shared.weight"));
    assert!(out.contains("precision     f32"));
    let o = cogview(&["inspect", "--model", &fixtures().join("overflow/pipeline").to_string_lossy(), "--device", "cpu"]);
    assert!(stdout(&o).contains("stored     BF16"));
    assert_clean_error(&cogview(&["inspect", "--model", "/no/such/model"]), "/no/such/model does not exist");
}

#[test]
fn tokenize_prints_padded_ids() {
    let o = cogview(&["tokenize", "--model", &base(), "--prompt", "a cat", "--max-sequence-length", "8"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["input_ids"], serde_json::json!([5, 147, 14, 1, 0, 0, 0, 0]));
    assert_eq!(v["attention_mask"], serde_json::json!([1, 1, 1, 1, 0, 0, 0, 0]));
}

/// The initial latents of the reference run `s4_g7_64x64`, written as bf16 (any float dtype
/// is accepted).
fn latents_file(dir: &Path, variant: &str) -> PathBuf {
    let bytes = std::fs::read(fixtures().join(variant).join("refs/pipeline.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("s4_g7_64x64.latents").unwrap();
    let bf: Vec<u8> = t
        .data()
        .chunks_exact(4)
        .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, t.shape().to_vec(), &bf).unwrap();
    let path = dir.join("latents.safetensors");
    std::fs::write(&path, safetensors::serialize([("latents", view)], None).unwrap()).unwrap();
    path
}

/// Every text chunk of a PNG (tEXt and iTXt), in order.
fn png_text(path: &Path) -> Vec<(String, String)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let mut out: Vec<(String, String)> = info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    out.extend(info.utf8_text.iter().map(|t| (t.keyword.clone(), t.get_text().unwrap())));
    out
}

/// The settings cogview wrote into a PNG (its `cogview` chunk).
fn settings(path: &Path) -> serde_json::Value {
    let text = png_text(path);
    let json = text.iter().find(|(k, _)| k == "cogview").unwrap_or_else(|| panic!("no cogview chunk in {text:?}"));
    serde_json::from_str(&json.1).unwrap()
}

/// A1111's PNG Info parser (`parse_generation_parameters` in
/// modules/infotext_utils.py): the lines before `Negative prompt:` are the prompt, the lines
/// after it the negative prompt, and the last line `Key: value` pairs, a value in double
/// quotes being a JSON string.
fn parse_a1111(text: &str) -> (String, String, Vec<(String, String)>) {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let last = lines.pop().unwrap();
    // re_param: `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`
    let mut pairs = Vec::new();
    let mut rest = last;
    while !rest.trim().is_empty() {
        let (key, after) = rest.split_once(':').unwrap();
        let after = after.trim_start();
        let (value, next) = if after.starts_with('"') {
            let mut end = 1;
            let bytes = after.as_bytes();
            while bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            let v: String = serde_json::from_str(&after[..=end]).unwrap();
            (v, after[end + 1..].trim_start_matches(','))
        } else {
            let (v, n) = after.split_once(',').unwrap_or((after, ""));
            (v.trim().to_string(), n)
        };
        pairs.push((key.trim().to_string(), value));
        rest = next;
    }
    let (mut prompt, mut negative, mut in_negative) = (String::new(), String::new(), false);
    for line in lines {
        let mut line = line.trim();
        if let Some(n) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = n.trim();
        }
        let target = if in_negative { &mut negative } else { &mut prompt };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    (prompt, negative, pairs)
}

#[test]
fn generate_writes_a_png_with_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let latents = latents_file(dir.path(), "base");
    let png = dir.path().join("out.png");
    let tensors = dir.path().join("t");
    let o = cogview(&[
        "generate", "--model", &base(), "--prompt", "A photo of a red fox sitting in the snow at sunrise, highly detailed, 4k.",
        "--steps", "4", "--guidance", "7", "--width", "64", "--height", "64", "--seed", "3", "--device", "cpu",
        "--latents", latents.to_str().unwrap(), "--save-tensors", tensors.to_str().unwrap(), "-o", png.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("outside the model card's recommended sizes"));
    let s = settings(&png);
    assert!(s["prompt"].as_str().unwrap().starts_with("A photo of a red fox"));
    assert_eq!(s["negative_prompt"], serde_json::Value::Null);
    assert_eq!((s["seed"].as_u64(), s["steps"].as_u64(), s["guidance"].as_f64()), (Some(3), Some(4), Some(7.0)));
    assert_eq!((s["width"].as_u64(), s["height"].as_u64()), (Some(64), Some(64)));
    assert_eq!(s["precision"], "f32");
    assert!(s["precision_reason"].as_str().unwrap().contains("emulates bf16"));
    assert!(s["adapter"].as_str().unwrap().contains("burn-flex"));
    assert!(s["latents"].as_str().unwrap().ends_with("latents.safetensors"));
    let text = png_text(&png);
    assert!(text.iter().any(|(k, v)| k == "Software" && v.starts_with("cogview ")));
    assert!(!text.iter().any(|(k, _)| k == "prompt" || k == "workflow"), "ComfyUI reads those as its own: {text:?}");
    let bytes = std::fs::read(tensors.join("tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("prompt_embeds").unwrap().shape(), [1, 224, 32]);
    assert_eq!(st.tensor("negative_prompt_embeds").unwrap().shape(), [1, 224, 32]);
    assert_eq!(st.tensor("step_latents").unwrap().shape(), [4, 1, 16, 8, 8]);
    assert_eq!(st.tensor("image").unwrap().shape(), [1, 3, 64, 64]);
    // Same seed, same image.
    let png2 = dir.path().join("again.png");
    let args = ["generate", "--model", &base(), "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64", "--seed", "11", "--device", "cpu", "-o"];
    let mut a = args.to_vec();
    a.push(png.to_str().unwrap());
    a.push("--overwrite");
    assert!(cogview(&a).status.success());
    let mut b = args.to_vec();
    b.push(png2.to_str().unwrap());
    assert!(cogview(&b).status.success());
    assert_eq!(std::fs::read(&png).unwrap(), std::fs::read(&png2).unwrap());
}

#[test]
fn bad_generate_input_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let p = png.to_str().unwrap();
    let model = base();
    let run = |extra: &[&str]| {
        let mut a = vec!["generate", "--model", &model, "--prompt", "x", "--device", "cpu", "-o", p];
        a.extend_from_slice(extra);
        cogview(&a)
    };
    assert_clean_error(&run(&["--steps", "2", "--width", "72", "--height", "64"]), "--width 72: must be a positive multiple of 16");
    assert_clean_error(&run(&["--steps", "2", "--width", "64", "--height", "1024"]), "--height 1024: at most 512");
    assert_clean_error(&run(&["--width", "64", "--height", "64", "--steps", "0"]), "--steps 0");
    let latents = latents_file(dir.path(), "base");
    assert_clean_error(&run(&["--steps", "2", "--width", "64", "--height", "96", "--latents", latents.to_str().unwrap()]), "expected [1, 16, 12, 8]");
    assert_clean_error(&run(&["--steps", "2", "--width", "64", "--height", "64", "--precision", "bf16"]), "bf16");
    assert!(!png.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the latents file");
}

/// A run killed half-way leaves neither the PNG nor a partial file.
#[test]
fn interrupted_run_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cogview"))
        .args(["generate", "--model", &base(), "--prompt", "x", "--steps", "1000", "--width", "64", "--height", "64", "--device", "cpu", "-o"])
        .arg(&png)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the denoising loop runs (its log line), then kill it.
    use std::io::BufRead;
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().contains("denoise") {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!png.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no partial file");
}

/// The real failure: f16 overflows inside block 0's feed-forward of the `overflow` fixture (with
/// the prompt and initial latents diffusers' black image came from). The run stops naming the
/// module and the step, and writes nothing; f32 and `--check-finite all` write the image.
#[test]
fn f16_overflow_stops_with_the_module_and_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let latents = latents_file(dir.path(), "overflow").to_string_lossy().into_owned();
    let png = dir.path().join("out.png");
    let model = fixtures().join("overflow/pipeline").to_string_lossy().into_owned();
    let prompt = "A photo of a red fox sitting in the snow at sunrise, highly detailed, 4k.";
    let args = |precision: &'static str| {
        vec![
            "generate".to_string(), "--model".into(), model.clone(), "--prompt".into(), prompt.into(), "--steps".into(), "4".into(),
            "--guidance".into(), "7".into(), "--width".into(), "64".into(), "--height".into(), "64".into(), "--latents".into(),
            latents.clone(), "--device".into(), "cpu".into(), "--precision".into(), precision.into(), "-o".into(),
            png.to_string_lossy().into_owned(),
        ]
    };
    let f16: Vec<String> = args("f16");
    let o = cogview(&f16.iter().map(String::as_str).collect::<Vec<_>>());
    assert_clean_error(&o, "first in transformer_blocks.0.ff.net.0.proj");
    assert!(stderr(&o).contains("at step 0 (timestep 999)"));
    assert!(stderr(&o).contains("use --precision f32"));
    assert!(!png.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the latents file");
    let mut f32_all: Vec<String> = args("f32");
    f32_all.extend(["--check-finite".to_string(), "all".to_string()]);
    assert!(cogview(&f32_all.iter().map(String::as_str).collect::<Vec<_>>()).status.success());
    assert!(png.exists());
}

/// `cogview bench` runs the three stages on random weights and reports every figure (the
/// figures themselves are not asserted: speed belongs to benchmarks).
#[test]
fn bench_reports_every_stage() {
    let o = cogview(&["bench", "--preset", "tiny", "--width", "64", "--height", "64", "--steps", "2", "--device", "cpu", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["t5_seconds", "first_step_seconds", "median_step_seconds", "guard_seconds_per_step", "vae_seconds", "t5_peak", "dit_peak", "vae_peak"] {
        assert!(v["report"].get(key).is_some(), "{key} in {v}");
    }
    // Loading is reported apart from each stage's forward: drawing random weights takes time.
    for key in ["t5_load_seconds", "dit_load_seconds", "vae_load_seconds"] {
        assert!(v["report"][key].as_f64().is_some_and(|s| s > 0.0), "{key} in {v}");
    }
    assert_eq!(v["report"]["dit_layers"], 2);
    // burn's CPU backend compiles no GPU kernel (the counts on a GPU: the kernel-cache tests).
    for key in ["t5_kernels", "dit_kernels", "vae_kernels"] {
        assert_eq!(v["report"][key], serde_json::json!({"compiled": 0, "tuned": 0}), "{key} in {v}");
    }
    // The whole image of the pipeline's 50 steps, from the stages: more than the 2 steps run.
    let r = &v["report"];
    let f = |k: &str| r[k].as_f64().unwrap();
    let parts = f("t5_seconds") + f("t5_load_seconds") + f("dit_load_seconds") + f("first_step_seconds") + f("vae_seconds") + f("vae_load_seconds");
    let image = v["image_seconds"].as_f64().unwrap();
    assert!((image - parts - 49.0 * f("median_step_seconds")).abs() <= 1e-9 * image.max(1.0), "{v}");
    assert_eq!(v["attention"], "f32", "{v}");
    // The CPU backend's attention is its own kernel, not one of the GPU's exact kernels.
    assert!(v["report"]["dit_exact_attention"].is_null(), "{v}");
    // The path before flash, to compare: the plan says so.
    let o = cogview(&["bench", "--preset", "tiny", "--width", "64", "--height", "64", "--steps", "1", "--device", "cpu", "--attention", "grouped", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["attention"].as_str(), v["report"]["plan"]["grouped_attention"].as_bool()), (Some("grouped"), Some(true)), "{v}");
    assert_eq!(v["matmul_kernel"], "autotune", "{v}");
    // A named matrix-product kernel is recorded (the CPU backend has no use for it).
    let o = cogview_with(&["bench", "--preset", "tiny", "--width", "64", "--height", "64", "--steps", "1", "--device", "cpu", "--json"], &[("COGVIEW_MATMUL_KERNEL", "gemm_None")]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["matmul_kernel"], "gemm_None", "{v}");
}

#[test]
fn completions_and_man_page() {
    let o = cogview(&["completions", "bash"]);
    assert!(o.status.success());
    let script = stdout(&o);
    assert!(script.contains("_cogview") && script.contains("--precision"), "{script}");
    let o = cogview(&["man"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains(".TH cogview"));
}

/// 3 prompts × 2 images: names from the template, seeds counting up from each prompt's seed
/// (its own, else --seed), each prompt encoded once, and no overwriting without --overwrite.
#[test]
fn batch_of_prompts_with_count_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red apple\n# a comment\n\n{\"prompt\": \"a green pear\", \"seed\": 100, \"guidance\": 1}\n{\"prompt\": \"a blue plum\", \"width\": 96}\n",
    )
    .unwrap();
    let template = dir.path().join("out/{index}-{seed}.png");
    let args = [
        "generate", "--model", &base(), "--prompts", prompts.to_str().unwrap(), "--count", "2", "--steps", "2",
        "--width", "64", "--height", "64", "--seed", "7", "--device", "cpu", "--output", template.to_str().unwrap(),
    ];
    let o = cogview(&args);
    assert!(o.status.success());
    assert!(stderr(&o).contains("6 image(s); the text encoder ran on 3 prompt(s)"), "{}", stderr(&o));
    let expect = [(0, 7, "a red apple", 64), (1, 8, "a red apple", 64), (2, 100, "a green pear", 64), (3, 101, "a green pear", 64), (4, 7, "a blue plum", 96), (5, 8, "a blue plum", 96)];
    for (index, seed, prompt, width) in expect {
        let s = settings(&dir.path().join(format!("out/{index}-{seed}.png")));
        assert_eq!(s["seed"].as_u64(), Some(seed));
        assert_eq!(s["prompt"], prompt);
        assert_eq!((s["width"].as_u64(), s["height"].as_u64()), (Some(width), Some(64)));
    }
    assert_eq!(settings(&dir.path().join("out/2-100.png"))["guidance"].as_f64(), Some(1.0));
    assert_eq!(std::fs::read_dir(dir.path().join("out")).unwrap().count(), 6);
    // Existing files stop the run before any work; --overwrite replaces them.
    let before = std::fs::metadata(dir.path().join("out/0-7.png")).unwrap().modified().unwrap();
    assert_clean_error(&cogview(&args), "already exists; pass --overwrite");
    assert_eq!(std::fs::metadata(dir.path().join("out/0-7.png")).unwrap().modified().unwrap(), before);
    let mut again = args.to_vec();
    again.push("--overwrite");
    assert!(cogview(&again).status.success());
    // One fixed name for several images is refused.
    let mut same = args.to_vec();
    let fixed = dir.path().join("one.png");
    let last = same.len() - 1;
    same[last] = fixed.to_str().unwrap();
    assert_clean_error(&cogview(&same), "add {index} or {seed}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"x\", \"sed\": 3}\n").unwrap();
    assert_clean_error(&cogview(&["generate", "--model", &base(), "--prompts", bad.to_str().unwrap(), "--device", "cpu"]), "line 1: unknown field `sed`");
}

/// `--dry-run` on the real configuration (config files only, no weights): the plan, and
/// nothing written.
#[test]
fn dry_run_prints_the_plan_without_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let real = fixtures().join("real");
    let o = cogview(&[
        "generate", "--model", real.to_str().unwrap(), "--prompt", "a cat", "--device", "cpu", "--max-memory", "8GiB",
        "--dry-run", "-o", out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let plan = stdout(&o);
    for needle in ["adapter     burn-flex", "precision   f32", "weights     bf16: ", "budget      8.00 GiB (--max-memory)", "encode    streamed", "denoise", "decode", "1024x1024 (size ok)"] {
        assert!(plan.contains(needle), "`{needle}` in\n{plan}");
    }
    assert!(!out.exists());
    // A tight budget streams the transformer and tiles the VAE.
    let o = cogview(&["generate", "--model", real.to_str().unwrap(), "--prompt", "a cat", "--device", "cpu", "--max-memory", "3GiB", "--dry-run"]);
    let plan = stdout(&o);
    assert!(plan.contains("denoise   streamed") && plan.contains("decode    tiles of"), "{plan}");
    assert_clean_error(&cogview(&["generate", "--model", real.to_str().unwrap(), "--prompt", "a", "--max-memory", "lots", "--dry-run"]), "--max-memory");
}

/// The help shows every output placeholder as typed (clap turns a literal `{n}` into a line
/// break, so the placeholders avoid that name).
#[test]
fn help_lists_the_output_placeholders() {
    let o = cogview(&["generate", "--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    for p in ["{index}", "{seed}", "{line}", "{image}", "{prompt}"] {
        assert!(help.contains(p), "`generate --help` should show {p}");
    }
}

/// What other tools read: A1111's `parameters` (parsed as its PNG Info does) gives every
/// value back, and `cogview info` prints the settings.
#[test]
fn png_metadata_reads_back_in_a1111_format_and_with_info() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("fox.png");
    let o = cogview(&[
        "generate", "--model", &base(), "--prompt", "a fox, in the snow: at dawn", "--negative-prompt", "blurry, dark",
        "--steps", "2", "--cfg-scale", "6.5", "-W", "64", "-H", "96", "-s", "42", "--device", "cpu", "-o", png.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let text = png_text(&png);
    let parameters = &text.iter().find(|(k, _)| k == "parameters").expect("a parameters chunk").1;
    let (prompt, negative, pairs) = parse_a1111(parameters);
    assert_eq!(prompt, "a fox, in the snow: at dawn");
    assert_eq!(negative, "blurry, dark");
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {k} in {pairs:?}"));
    assert_eq!(get("Steps"), "2");
    assert_eq!(get("CFG scale"), "6.5");
    assert_eq!(get("Seed"), "42");
    assert_eq!(get("Size"), "64x96");
    assert_eq!(get("Sampler"), "DDIM");
    assert_eq!(get("Model"), base());
    assert!(get("Version").starts_with("cogview "));
    assert_eq!(get("Precision"), "f32");
    assert!(get("Adapter").starts_with("burn-flex CPU backend (CPU, cpu)"), "{}", get("Adapter"));
    let o = cogview(&["info", png.to_str().unwrap()]);
    assert!(o.status.success());
    let info = stdout(&o);
    for line in ["prompt           a fox, in the snow: at dawn", "negative prompt  blurry, dark", "seed             42", "steps            2", "guidance         6.5", "size             64x96"] {
        assert!(info.contains(line), "`{line}` in\n{info}");
    }
    let json: serde_json::Value = serde_json::from_slice(&cogview(&["info", png.to_str().unwrap(), "--json"]).stdout).unwrap();
    assert_eq!(json["seed"], 42);
    assert_clean_error(&cogview(&["info", "/no/such.png"]), "/no/such.png");
}

/// A kernel name `COGVIEW_MATMUL_KERNEL` does not know is refused before anything runs, with
/// the names it takes; a known one is accepted.
#[test]
fn matmul_kernel_variable_is_checked() {
    let o = cogview_with(&["devices"], &[("COGVIEW_MATMUL_KERNEL", "fastest")]);
    assert_clean_error(&o, "COGVIEW_MATMUL_KERNEL=fastest is not a matmul kernel");
    assert!(stderr(&o).contains("matmul_simple_cyclic_cmma"), "{}", stderr(&o));
    let o = cogview_with(&["devices"], &[("COGVIEW_MATMUL_KERNEL", "matmul_simple_unit_max_tile_size")]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `generate --from` makes the same image again, byte for byte; a flag given as well wins.
#[test]
fn generate_from_reruns_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.png");
    let o = cogview(&[
        "generate", "--model", &base(), "--prompt", "a red apple", "--negative-prompt", "dull", "--steps", "3", "--guidance", "4",
        "--width", "96", "--height", "64", "--seed", "5", "--max-sequence-length", "32", "--device", "cpu", "-o", first.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let again = dir.path().join("again.png");
    let o = cogview(&["generate", "--from", first.to_str().unwrap(), "--model", &base(), "--device", "cpu", "-o", again.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&first).unwrap() == std::fs::read(&again).unwrap(), "the same file, metadata included");
    let other = dir.path().join("other.png");
    let o = cogview(&["generate", "--from", first.to_str().unwrap(), "--model", &base(), "--seed", "6", "--device", "cpu", "-o", other.to_str().unwrap()]);
    assert!(o.status.success());
    let s = settings(&other);
    assert_eq!((s["seed"].as_u64(), s["steps"].as_u64(), s["width"].as_u64()), (Some(6), Some(3), Some(96)));
    assert_clean_error(&cogview(&["generate", "--from", "/no/such.png", "--device", "cpu"]), "/no/such.png");
}

/// Every numeric flag is checked before any work: a non-zero exit naming the flag, one error
/// line, no panic, no file.
#[test]
fn every_bad_number_names_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    let model = base();
    for (flags, needle) in [
        (vec!["--guidance", "nan"], "--guidance NaN: must be a finite number"),
        (vec!["--guidance", "inf"], "--guidance inf"),
        (vec!["--cfg-scale=-inf"], "--guidance -inf"),
        (vec!["--steps", "0"], "--steps 0"),
        (vec!["--steps", "1001"], "--steps 1001: must be between 1 and 1000"),
        (vec!["--width", "72", "--height", "64"], "--width 72"),
        (vec!["-W", "64", "-H", "1024"], "--height 1024: at most 512"),
        (vec!["--max-sequence-length", "0"], "--max-sequence-length 0"),
        (vec!["--max-sequence-length", "300"], "--max-sequence-length 300: must be between 1 and 224"),
    ] {
        let mut args = vec!["generate", "--model", &model, "--prompt", "x", "--device", "cpu", "-o", png.to_str().unwrap()];
        if !flags.iter().any(|f| ["--width", "-W"].contains(f)) {
            args.extend(["--width", "64", "--height", "64"]);
        }
        args.extend(flags);
        assert_clean_error(&cogview(&args), needle);
        assert!(!png.exists());
    }
    // clap's own checks name the flag too.
    let o = cogview(&["generate", "--model", &model, "--prompt", "x", "--count", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("--count") && !stderr(&o).contains("panicked"));
    // A JSON Lines batch: the line and the field.
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"guidance_scale\": 1e40}\n").unwrap();
    let o = cogview(&["generate", "--model", &model, "--prompts", prompts.to_str().unwrap(), "--width", "64", "--height", "64", "--device", "cpu", "-o", "x-{index}.png"]);
    assert_clean_error(&o, "prompt line 2: --guidance inf");
}

/// The names users carry over from other tools: `--cfg-scale`, `--guidance-scale`,
/// `--num-inference-steps`, `-s`, `-W`, `-H`, and `num_inference_steps`/`guidance_scale` in
/// JSON Lines; `-q` prints the written path and nothing else; `RUST_LOG` is honoured.
#[test]
fn familiar_names_quiet_runs_and_rust_log() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let o = cogview(&[
        "-q", "generate", "--model", &base(), "--prompt", "x", "--num-inference-steps", "2", "--guidance-scale", "3",
        "-W", "64", "-H", "64", "-s", "9", "--device", "cpu", "-o", a.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), a.to_str().unwrap());
    assert_eq!(stderr(&o), "", "-q: nothing but errors");
    let s = settings(&a);
    assert_eq!((s["steps"].as_u64(), s["guidance"].as_f64(), s["seed"].as_u64()), (Some(2), Some(3.0), Some(9)));
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"y\", \"num_inference_steps\": 3, \"guidance_scale\": 2.5, \"seed\": 4}\n").unwrap();
    let b = dir.path().join("b.png");
    let o = cogview(&["generate", "--model", &base(), "--prompts", prompts.to_str().unwrap(), "-W", "64", "-H", "64", "--device", "cpu", "-o", b.to_str().unwrap()]);
    assert!(o.status.success());
    let s = settings(&b);
    assert_eq!((s["steps"].as_u64(), s["guidance"].as_f64(), s["seed"].as_u64()), (Some(3), Some(2.5), Some(4)));
    let run = |log: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cogview"));
        c.args(["generate", "--model", &base(), "--prompt", "x", "--steps", "1", "-W", "64", "-H", "64", "--device", "cpu", "--overwrite", "-o"]);
        c.arg(&b).env_remove("COGVIEW_LOG");
        match log {
            Some(l) => c.env("RUST_LOG", l),
            None => c.env_remove("RUST_LOG"),
        };
        String::from_utf8_lossy(&c.output().unwrap().stderr).into_owned()
    };
    assert!(run(None).contains(" INFO "), "info lines by default");
    let quiet = run(Some("error"));
    assert!(!quiet.contains(" INFO ") && !quiet.contains(" WARN "), "RUST_LOG=error: {quiet}");
}

/// Outside a display session (a container, CI, ssh) graphics drivers complain on stderr while
/// adapters are enumerated (Mesa 22's EGL: `error: XDG_RUNTIME_DIR is invalid…`). cogview keeps
/// them out of its output: with `-q` nothing but the written path is printed, even when every
/// adapter, GL included, is enumerated.
#[test]
fn no_driver_lines_outside_a_display_session() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_cogview"))
            .args(args)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("WAYLAND_DISPLAY")
            .env_remove("DISPLAY")
            .env_remove("COGVIEW_DEVICE")
            .output()
            .unwrap();
        assert!(o.status.success(), "cogview {}: {}", args.join(" "), stderr(&o));
        assert_eq!(stderr(&o), "", "cogview {} wrote lines it did not make", args.join(" "));
        stdout(&o)
    };
    run(&["-q", "devices", "--all"]);
    let model = base();
    let written = run(&["-q", "generate", "--device", "cpu", "--model", &model, "--prompt", "x", "--steps", "1", "-W", "64", "-H", "64", "-o", out.to_str().unwrap()]);
    assert_eq!(written.trim(), out.to_str().unwrap());
}
