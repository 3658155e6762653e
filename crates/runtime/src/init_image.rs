//! The picture img2img starts from: read (PNG, JPEG, WebP; any RGB, RGBA or gray; alpha
//! dropped), resized as PIL resizes it, and made into the VAE's input as diffusers'
//! `VaeImageProcessor.preprocess` does: `x / 255 · 2 − 1` in f32, planar `[1, 3, H, W]`.

use std::path::Path;

use sha2::Digest;

use crate::request::{Field, RequestError};

/// An init image's pixels and where they came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitImage {
    /// 8-bit RGB, row-major, `height × width × 3`.
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
    /// The file's name (without its folder), for the PNG metadata.
    pub name: String,
    /// The file's sha256, hex.
    pub sha256: String,
}

impl InitImage {
    /// Reads `path`: an error naming the file when it cannot be read or decoded.
    pub fn open(path: &Path) -> Result<Self, RequestError> {
        let bytes = std::fs::read(path).map_err(|e| RequestError::new(Field::InitImage, &path.display(), e.to_string()))?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        Self::decode(&bytes, &name).map_err(|problem| RequestError::new(Field::InitImage, &path.display(), problem))
    }

    /// Decodes a PNG, JPEG or WebP file's bytes.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Self, String> {
        let format = image::guess_format(bytes).map_err(|_| "not a PNG, JPEG or WebP image".to_string())?;
        if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) {
            return Err(format!("{format:?} images are not supported (PNG, JPEG or WebP)"));
        }
        let decoded = image::load_from_memory_with_format(bytes, format).map_err(|e| format!("cannot be decoded: {e}"))?;
        // PIL's `convert("RGB")`: gray is replicated, alpha dropped (not composited).
        let rgb = decoded.to_rgb8();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        let sha256 = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { rgb: rgb.into_raw(), width, height, name: name.to_string(), sha256 })
    }

    /// `VaeImageProcessor.preprocess(image, height, width)`: resized with PIL's Lanczos filter
    /// when the size differs, then `x / 255 · 2 − 1` in f32, planar.
    ///
    /// # Shapes
    /// - → `[1, 3, height, width]` values in [-1, 1]
    pub fn preprocess(&self, width: usize, height: usize) -> Vec<f32> {
        let resized;
        let rgb = if (width, height) == (self.width, self.height) {
            &self.rgb
        } else {
            resized = resize_lanczos(&self.rgb, self.width, self.height, width, height);
            &resized
        };
        let plane = width * height;
        let mut out = vec![0f32; 3 * plane];
        for (p, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = (px[c] as f32 / 255.0) * 2.0 - 1.0;
            }
        }
        out
    }
}

/// Bits of PIL's fixed-point coefficients for 8-bit images (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// PIL's Lanczos window: `sinc(x) · sinc(x / 3)` on [-3, 3).
fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
    if (-3.0..3.0).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 }
}

/// PIL's `precompute_coeffs` and `normalize_coeffs_8bpc` for one axis: per output position,
/// the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; the values here are never below -1.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut k: Vec<f64> = (0..xmax).map(|x| lanczos((x as f64 + xmin as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = k.iter().sum();
            if total != 0.0 {
                k.iter_mut().for_each(|w| *w /= total);
            }
            let fixed = k
                .iter()
                .map(|w| {
                    let v = w * (1u64 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// PIL's `clip8`: a fixed-point sum back to 0–255.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `Image.resize((out_w, out_h), Image.LANCZOS)` on an 8-bit RGB image, as Pillow computes it:
/// a horizontal pass, then a vertical one, each with fixed-point weights and rounding to 8
/// bits in between (Pillow's `ImagingResample` on 8-bit bands).
pub fn resize_lanczos(rgb: &[u8], width: usize, height: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let pass = |src: &[u8], lines: usize, len: usize, stride: usize, step: usize, out_len: usize| {
        // `lines` runs of `len` pixels, pixel i of line l at (l · stride + i · step) · 3.
        let k = coefficients(len, out_len);
        let mut out = vec![0u8; lines * out_len * 3];
        for l in 0..lines {
            for (o, (start, w)) in k.iter().enumerate() {
                for c in 0..3 {
                    let mut sum = 1i64 << (PRECISION_BITS - 1);
                    for (j, wj) in w.iter().enumerate() {
                        sum += src[(l * stride + (start + j) * step) * 3 + c] as i64 * *wj as i64;
                    }
                    out[(l * out_len + o) * 3 + c] = clip8(sum);
                }
            }
        }
        out
    };
    let horizontal = if out_w != width { pass(rgb, height, width, width, 1, out_w) } else { rgb.to_vec() };
    if out_h == height {
        return horizontal;
    }
    // Columns as lines: the vertical pass writes them transposed, so transpose back.
    let columns = pass(&horizontal, out_w, height, 1, out_w, out_h);
    let mut out = vec![0u8; out_w * out_h * 3];
    for x in 0..out_w {
        for y in 0..out_h {
            out[(y * out_w + x) * 3..][..3].copy_from_slice(&columns[(x * out_h + y) * 3..][..3]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_to_the_same_size_changes_nothing_and_flat_stays_flat() {
        let flat = vec![77u8; 5 * 4 * 3];
        assert_eq!(resize_lanczos(&flat, 5, 4, 5, 4), flat);
        assert_eq!(resize_lanczos(&flat, 5, 4, 9, 3), vec![77u8; 9 * 3 * 3]);
    }

    #[test]
    fn preprocess_maps_to_minus_one_one_planar() {
        let img = InitImage { rgb: vec![0, 255, 51, 255, 0, 102], width: 2, height: 1, name: "x".into(), sha256: String::new() };
        let x = img.preprocess(2, 1);
        assert_eq!(x, [-1.0, 1.0, 1.0, -1.0, 51.0 / 255.0 * 2.0 - 1.0, 102.0 / 255.0 * 2.0 - 1.0]);
    }

    #[test]
    fn unreadable_images_are_clear_errors() {
        assert!(InitImage::decode(b"hello", "x").unwrap_err().contains("not a PNG, JPEG or WebP"));
        let png = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0];
        assert!(InitImage::decode(&png, "x").unwrap_err().contains("cannot be decoded"));
    }
}
