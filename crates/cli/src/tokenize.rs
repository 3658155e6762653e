//! `cogview tokenize`: the ids the text encoder gets, padded as the pipeline pads.

use anyhow::Result;
use clap::Args;
use cogview_runtime::import::PromptTokenizer;
use cogview_runtime::import::hub::Files;

use crate::model::ModelArgs;

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, short)]
    prompt: String,
    /// Pad (and truncate) to this many tokens.
    #[arg(long, default_value_t = 224)]
    max_sequence_length: usize,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let folder = args.model.open(Files::Configs)?;
    let tokenizer = PromptTokenizer::from_folder(&folder.root.join("tokenizer"))?;
    let t = tokenizer.encode(&args.prompt, args.max_sequence_length)?;
    println!("{}", serde_json::json!({"input_ids": t.input_ids, "attention_mask": t.attention_mask}));
    Ok(())
}
