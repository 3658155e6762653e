//! The smallest program that makes a picture with cogview's library:
//!
//! ```sh
//! cargo run --release -p cogview-runtime --example generate -- MODEL_DIR "a red fox in the snow" fox.png
//! ```
//!
//! MODEL_DIR is a diffusers CogView3-Plus folder (`cogview download` prints where it put one).

use cogview_runtime::import::ModelFolder;
use cogview_runtime::metadata::Settings;
use cogview_runtime::output::save_png;
use cogview_runtime::{BackendChoice, DeviceChoice, Options, Pipeline, Precision, Quiet, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No backtrace for each error CubeCL's SPIR-V compiler makes and drops.
    // SAFETY: no other thread runs yet.
    unsafe { cogview_runtime::kernel_activity::skip_error_backtraces() };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, prompt, out] = args.as_slice() else {
        return Err("usage: generate MODEL_DIR PROMPT OUT.png".into());
    };
    let target = cogview_runtime::target(DeviceChoice::Auto, BackendChoice::Auto, Precision::Auto)?;
    let mut pipeline = Pipeline::load(ModelFolder::open(model)?, target, Options::default())?;
    let request = Request::new(prompt.as_str());
    let image = pipeline.generate(&request, &mut Quiet)?;
    let settings = Settings::new(&request, &image, model, pipeline.target());
    save_png(out.as_ref(), &image.rgb, image.width, image.height, &settings.png_text())?;
    Ok(())
}
