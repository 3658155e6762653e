//! Writing results: PNGs with tEXt metadata and the `--save-tensors` safetensors file, each
//! written to a temporary file in the destination folder and renamed into place, so an
//! interrupted run never leaves a partial file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::pipeline::{HostTensor, Tensors};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Encode { path: PathBuf, message: String },
}

/// Writes `path` through a temporary sibling file that is renamed over it once complete; the
/// temporary file is removed if anything fails.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<(), String>) -> Result<(), OutputError> {
    let io = |source| OutputError::Io { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut tmp = tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".partial").tempfile_in(&dir).map_err(io)?;
    write(tmp.as_file_mut()).map_err(|message| OutputError::Encode { path: path.to_path_buf(), message })?;
    tmp.as_file_mut().flush().map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// An 8-bit RGB PNG with `(key, value)` tEXt chunks (iTXt for non-Latin-1 values).
pub fn save_png(path: &Path, rgb: &[u8], width: usize, height: usize, text: &[(String, String)]) -> Result<(), OutputError> {
    write_atomically(path, |file| encode_png(std::io::BufWriter::new(file), rgb, width, height, text))
}

/// [`save_png`]'s file, in memory (what the server sends).
pub fn png_bytes(rgb: &[u8], width: usize, height: usize, text: &[(String, String)]) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    encode_png(&mut bytes, rgb, width, height, text)?;
    Ok(bytes)
}

fn encode_png(out: impl Write, rgb: &[u8], width: usize, height: usize, text: &[(String, String)]) -> Result<(), String> {
    let mut enc = png::Encoder::new(out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        let latin1 = v.chars().all(|c| (c as u32) < 256);
        let r = if latin1 { enc.add_text_chunk(k.clone(), v.clone()) } else { enc.add_itxt_chunk(k.clone(), v.clone()) };
        r.map_err(|e| e.to_string())?;
    }
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

/// The tEXt/iTXt chunks of a PNG, in order.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>, OutputError> {
    let io = |source| OutputError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| OutputError::Encode { path: path.to_path_buf(), message: e.to_string() })?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    Ok(out)
}

/// `DIR/tensors.safetensors` with f32 `prompt_embeds`, `negative_prompt_embeds` (with CFG),
/// `init_latents` (img2img), `step_latents` and `image`.
pub fn save_tensors(dir: &Path, t: &Tensors) -> Result<PathBuf, OutputError> {
    let path = dir.join("tensors.safetensors");
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut entries: Vec<(&str, &HostTensor)> =
        vec![("prompt_embeds", &t.prompt_embeds), ("step_latents", &t.step_latents), ("image", &t.image)];
    if let Some(n) = &t.negative_prompt_embeds {
        entries.push(("negative_prompt_embeds", n));
    }
    if let Some(i) = &t.init_latents {
        entries.push(("init_latents", i));
    }
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = entries.iter().map(|(k, (v, s))| (k.to_string(), bytes(v), s.clone())).collect();
    let views = data
        .iter()
        .map(|(k, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OutputError::Encode { path: path.clone(), message: e.to_string() })?;
    let serialized = safetensors::serialize(views, None).map_err(|e| OutputError::Encode { path: path.clone(), message: e.to_string() })?;
    write_atomically(&path, |f| f.write_all(&serialized).map_err(|e| e.to_string()))?;
    Ok(path)
}

/// Reads `--latents FILE`: one tensor named `latents` of shape `[1, C, h, w]` in any float
/// dtype, as f32.
pub fn read_latents(path: &Path, shape: [usize; 4]) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--latents {}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("--latents {}: {e}", path.display()))?;
    let t = st.tensor("latents").map_err(|_| format!("--latents {}: no tensor named `latents`", path.display()))?;
    if t.shape() != shape {
        return Err(format!("--latents {}: shape {:?}, expected {shape:?} for this size", path.display(), t.shape()));
    }
    let b = t.data();
    Ok(match t.dtype() {
        safetensors::Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        safetensors::Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        safetensors::Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        safetensors::Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        d => return Err(format!("--latents {}: dtype {d:?} is not a float type", path.display())),
    })
}
