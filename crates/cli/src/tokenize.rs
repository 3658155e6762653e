//! `cogview tokenize`: the ids the text encoder gets, padded as the pipeline pads.

use anyhow::Result;
use clap::Args;
use cogview_runtime::import::{PromptTokenizer, location};

#[derive(Args)]
pub struct TokenizeArgs {
    /// A diffusers model folder, or a hub id in the Hugging Face cache.
    #[arg(long, default_value = "THUDM/CogView3-Plus-3B", env = "COGVIEW_MODEL")]
    model: String,
    #[arg(long, short)]
    prompt: String,
    /// Pad (and truncate) to this many tokens.
    #[arg(long, default_value_t = 224)]
    max_sequence_length: usize,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let root = location::resolve(&args.model)?;
    let tokenizer = PromptTokenizer::from_folder(&root.join("tokenizer"))?;
    let t = tokenizer.encode(&args.prompt, args.max_sequence_length)?;
    println!("{}", serde_json::json!({"input_ids": t.input_ids, "attention_mask": t.attention_mask}));
    Ok(())
}
