//! `cogview`: CogView3-Plus-3B text-to-image on any GPU, one portable binary.
//!
//! The CLI only parses, calls `cogview-runtime`, and prints.

mod bench;
mod devices;
mod generate;
mod info;
mod inspect;
mod model;
mod serve;
mod tokenize;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cogview_runtime::{BackendChoice, DeviceChoice, Precision};
use tracing_subscriber::prelude::*;

#[derive(Parser)]
#[command(name = "cogview", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). COGVIEW_LOG, else RUST_LOG, takes a full
    /// filter instead (e.g. `cogview=debug,wgpu_hal=warn`).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors and the paths of the files written: no progress bars, no summaries.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Where compiled GPU kernels and their autotune results are kept between runs: a
    /// directory, or `off`. The first run on an adapter and driver compiles and tunes every
    /// kernel it needs (minutes at 1024²); later runs read them. Default: the platform's cache
    /// directory + cogview/kernels.
    #[arg(long, global = true, value_name = "DIR|off", env = "COGVIEW_KERNEL_CACHE")]
    kernel_cache: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter (GPU and CPU) and what cogview would do on each.
    Devices(devices::DevicesArgs),
    /// Describe a model folder: components, parameters, stored dtypes, files, configs, and the
    /// device and precision cogview would use for it here.
    Inspect(inspect::InspectArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
    /// Time the stages on random weights (no checkpoint needed).
    Bench(Box<bench::BenchArgs>),
    /// Print the token ids of a prompt as the pipeline pads them (JSON).
    Tokenize(tokenize::TokenizeArgs),
    /// Generate images from a prompt or a file of prompts.
    Generate(Box<generate::GenerateArgs>),
    /// Print the settings a cogview PNG was made with (A1111 `parameters` of other tools' PNGs).
    Info(info::InfoArgs),
    /// Load the model once and serve it over HTTP: the OpenAI images API, the AUTOMATIC1111
    /// API, job progress as server-sent events, and a page to use it at /.
    Serve(Box<serve::ServeArgs>),
    /// Fetch a model from the hub into the Hugging Face cache (what `generate` does on first
    /// use) and print its folder.
    Download(model::ModelArgs),
    /// Compile and tune the GPU kernels an image size needs, into the kernel cache, without a
    /// checkpoint (two blocks of each model on random weights), so that the first `generate`
    /// is as fast as the next ones.
    Warmup(Box<bench::WarmupArgs>),
}

/// Where to compute and in which dtype; shared by every command that runs a model.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Adapter: `auto` (best GPU: discrete, integrated, virtual; the CPU backend if there is
    /// none), `cpu` (burn's CPU backend), or an index from `cogview devices`.
    #[arg(long, default_value = "auto", env = "COGVIEW_DEVICE")]
    pub device: DeviceChoice,
    /// Graphics API: auto, vulkan, metal, dx12 or gl. On Windows, `dx12` forces DirectX 12
    /// where Vulkan would otherwise be preferred.
    #[arg(long, default_value = "auto", env = "COGVIEW_BACKEND")]
    pub backend: BackendChoice,
    /// Compute dtype: `auto` (bf16 where the adapter computes bf16, else f32), bf16, f32, or
    /// f16 (not supported by the model's authors: it overflows; only when asked for).
    #[arg(long, default_value = "auto", env = "COGVIEW_PRECISION")]
    pub precision: Precision,
}

fn main() -> ExitCode {
    // SAFETY: the first statement of `main`, before any thread starts.
    unsafe { cogview_runtime::kernel_activity::skip_error_backtraces() };
    // Release builds abort on panic. The message must reach the terminal even when the panic
    // hits while the drivers' stderr output is being captured.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        cogview_runtime::driver_output::release_for_panic();
        report(info)
    }));
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // wgpu logs an error for every graphics API it cannot start while listing adapters (EGL on
    // a headless Linux box): noise unless asked for with -v.
    let noise = if cli.verbose > 0 { "warn" } else { "warn,wgpu_hal=off" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("COGVIEW_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{noise},cogview={level}")));
    let print = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(filter);
    // Beside what is printed, CubeCL's compilations and tunings are counted (progress bars,
    // summaries, bench reports).
    tracing_subscriber::registry().with(print).with(cogview_runtime::kernel_activity::layer()).init();
    if let Some(cache) = &cli.kernel_cache {
        cogview_runtime::kernel_cache::set_location(match cache.as_str() {
            "off" => cogview_runtime::kernel_cache::CacheLocation::Off,
            dir => cogview_runtime::kernel_cache::CacheLocation::Dir(dir.into()),
        });
    }
    let result = match cogview_runtime::matmul_kernel::from_env() {
        // Read where the products run, deep in the kernels: a bad name is refused here first.
        Err(e) => Err(anyhow::anyhow!(e)),
        Ok(_) => run(cli, &matches),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on: the chain joined, no backtrace.
            eprintln!("error: {}", e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Devices(args) => devices::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Generate(args) => {
            let sub = matches.subcommand_matches("generate").expect("the generate subcommand");
            let explicit = |id: &str| {
                matches!(sub.value_source(id), Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable))
            };
            generate::run(*args, cli.quiet, &explicit)
        }
        Command::Info(args) => info::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Bench(args) => bench::run(*args),
        Command::Warmup(args) => bench::warmup(*args, cli.quiet),
        Command::Download(args) => args
            .open(cogview_runtime::import::hub::Files::All)
            .map(|folder| println!("{}", folder.root.display())),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "cogview", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map_err(anyhow::Error::from),
    }
}
