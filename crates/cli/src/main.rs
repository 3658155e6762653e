//! `cogview`: CogView3-Plus-3B text-to-image on any GPU, one portable binary.
//!
//! The CLI only parses, calls `cogview-runtime`, and prints.

mod bench;
mod devices;
mod generate;
mod inspect;
mod model;
mod tokenize;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cogview_runtime::{BackendChoice, DeviceChoice, Precision};

#[derive(Parser)]
#[command(name = "cogview", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
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
    /// Fetch a model from the hub into the Hugging Face cache (what `generate` does on first
    /// use) and print its folder.
    Download(model::ModelArgs),
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
    let cli = Cli::parse();
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{noise},cogview={level}")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let result = match cli.command {
        Command::Devices(args) => devices::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Generate(args) => generate::run(*args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Bench(args) => bench::run(*args),
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
