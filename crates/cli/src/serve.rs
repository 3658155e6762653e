//! `cogview serve`: the model loaded once, behind an HTTP server (see `cogview-server`).

use std::io::Write;
use std::net::IpAddr;

use anyhow::Result;
use clap::Args;
use cogview_runtime::guard::CheckFinite;
use cogview_runtime::import::hub::Files;
use cogview_runtime::plan::{WeightsChoice, parse_size};
use cogview_runtime::{Options, Pipeline};
use cogview_server::ServeOptions;

use crate::DeviceArgs;
use crate::model::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The address to listen on. The default answers this machine only; 0.0.0.0 answers every
    /// network it is on (with a warning: pass --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Requests that may wait behind the running one; more get 429 with Retry-After.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    queue: u32,
    /// The largest request body (init images come base64 in it); larger get 413.
    #[arg(long, value_parser = parse_size, default_value = "64MiB", value_name = "SIZE")]
    max_body_size: u64,
    /// Require `Authorization: Bearer KEY` on the API routes.
    #[arg(long, env = "COGVIEW_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How the transformer and VAE weights are stored: auto, bf16 or f32.
    #[arg(long, default_value = "auto")]
    weights: WeightsChoice,
    /// Device-memory budget, e.g. 8GiB: what stays loaded between requests, what is streamed.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_memory: Option<u64>,
    /// Non-finite checks: stages or all.
    #[arg(long, default_value = "stages")]
    check_finite: CheckFinite,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if !args.host.is_loopback() {
        let open = if args.api_key.is_none() { ", and anyone who can reach it can use it: pass --api-key" } else { "" };
        tracing::warn!("--host {}: the server answers other machines{open}", args.host);
    }
    let folder = args.model.open(Files::All)?;
    let target = cogview_runtime::target(args.device.device, args.device.backend, args.device.precision)?;
    // A server keeps what fits on the device between requests.
    let options = Options { weights: args.weights, max_memory: args.max_memory, check: args.check_finite, keep_loaded: true, ..Options::default() };
    let pipeline = Pipeline::load(folder, target, options)?;
    let options = ServeOptions {
        host: args.host,
        port: args.port,
        queue: args.queue as usize,
        max_body_bytes: args.max_body_size.try_into().unwrap_or(usize::MAX),
        api_key: args.api_key,
        model: args.model.model.clone(),
    };
    cogview_server::serve(pipeline, options, |addr| {
        println!("listening on http://{addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
