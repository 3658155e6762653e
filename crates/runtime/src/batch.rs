//! A day's work in one run: prompts from a file, several images per prompt, output names from a
//! template.
//!
//! The prompt file has one prompt per line, or a JSON object per line (JSON Lines) that can
//! also override `negative_prompt`, `seed`, `steps`, `guidance`, `width` and `height` for that
//! line. Empty lines and lines starting with `#` are skipped. With `--count N`, a prompt whose
//! seed is S (its own, else `--seed`) gives images with seeds S, S+1, …, S+N−1.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::request::Request;

/// A prompt file or an output name that cannot be used; the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BatchError(String);

/// One line of a prompt file: the prompt and what it overrides.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromptLine {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    /// Also read as diffusers names it.
    #[serde(alias = "num_inference_steps")]
    pub steps: Option<usize>,
    /// Also read as diffusers (`guidance_scale`) and A1111 (`cfg_scale`) name it.
    #[serde(alias = "guidance_scale", alias = "cfg_scale")]
    pub guidance: Option<f32>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// img2img: the picture to start from (relative to the prompt file's folder).
    pub init_image: Option<PathBuf>,
    pub strength: Option<f64>,
    /// The line number in the file (from 1), for names and messages.
    #[serde(skip)]
    pub line: usize,
}

/// Reads a prompt file (see the module doc).
pub fn read_prompts(path: &Path) -> Result<Vec<PromptLine>, BatchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BatchError(format!("--prompts {}: {e}", path.display())))?;
    let mut lines = parse_prompts(&text).map_err(|m| BatchError(format!("--prompts {}: {m}", path.display())))?;
    let folder = path.parent().unwrap_or(Path::new(""));
    for line in &mut lines {
        if let Some(image) = &mut line.init_image {
            *image = folder.join(&*image);
        }
    }
    Ok(lines)
}

/// [`read_prompts`] on text.
pub fn parse_prompts(text: &str) -> Result<Vec<PromptLine>, String> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut line = if t.starts_with('{') {
            serde_json::from_str::<PromptLine>(t).map_err(|e| format!("line {}: {e}", i + 1))?
        } else {
            PromptLine { prompt: t.to_string(), ..Default::default() }
        };
        if line.prompt.trim().is_empty() {
            return Err(format!("line {}: the prompt is empty", i + 1));
        }
        line.line = i + 1;
        lines.push(line);
    }
    if lines.is_empty() {
        return Err("no prompts (one per line, or JSON Lines with a \"prompt\")".into());
    }
    Ok(lines)
}

/// One image of a batch: its request and what its name is made of.
#[derive(Clone, Debug)]
pub struct Item {
    pub request: Request,
    /// Position in the batch, from 0.
    pub index: usize,
    /// The prompt's line in the prompt file (1 for `--prompt`).
    pub line: usize,
    /// The image's number for its prompt, from 0.
    pub n: usize,
    /// The line's own init image, if it names one.
    pub init_image: Option<PathBuf>,
    /// Whether the line sets the width and the height itself.
    pub sized: [bool; 2],
}

/// The batch: `count` images per line, each line's overrides applied to `defaults`.
pub fn expand(lines: &[PromptLine], count: usize, defaults: &Request) -> Vec<Item> {
    let mut items = Vec::new();
    for line in lines {
        for n in 0..count {
            let mut r = defaults.clone();
            r.prompt = line.prompt.clone();
            if let Some(v) = &line.negative_prompt {
                r.negative_prompt = Some(v.clone());
            }
            r.seed = line.seed.unwrap_or(defaults.seed).wrapping_add(n as u64);
            r.steps = line.steps.unwrap_or(r.steps);
            r.guidance = line.guidance.unwrap_or(r.guidance);
            r.width = line.width.unwrap_or(r.width);
            r.height = line.height.unwrap_or(r.height);
            r.strength = line.strength.unwrap_or(r.strength);
            let (init_image, sized) = (line.init_image.clone(), [line.width.is_some(), line.height.is_some()]);
            items.push(Item { request: r, index: items.len(), line: line.line, n, init_image, sized });
        }
    }
    items
}

/// The placeholders an output template may use.
pub const PLACEHOLDERS: &str = "{index} (position in the batch, from 0), {seed}, {line} (prompt line, from 1), \
    {image} (the image's number for its prompt, from 0), {prompt} (the prompt's first words, file-name safe)";

/// The file name of `item` from `template`.
pub fn output_name(template: &str, item: &Item) -> Result<PathBuf, String> {
    let slug: String = item
        .request
        .prompt
        .chars()
        .map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .take(40)
        .collect();
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| format!("`{template}`: unclosed `{{`"))? + open;
        let value = match &rest[open + 1..close] {
            "index" => item.index.to_string(),
            "seed" => item.request.seed.to_string(),
            "line" => item.line.to_string(),
            "image" => item.n.to_string(),
            "prompt" => slug.clone(),
            other => return Err(format!("`{template}`: unknown placeholder {{{other}}}; use {PLACEHOLDERS}")),
        };
        out.push_str(&value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(PathBuf::from(out))
}

/// Every item's output path, checked before any work: distinct names, and no existing file
/// unless `overwrite`.
pub fn output_paths(template: &str, items: &[Item], overwrite: bool) -> Result<Vec<PathBuf>, BatchError> {
    let paths = items.iter().map(|i| output_name(template, i)).collect::<Result<Vec<_>, _>>().map_err(|m| BatchError(format!("--output {m}")))?;
    for (i, p) in paths.iter().enumerate() {
        if let Some(j) = paths[..i].iter().position(|q| q == p) {
            return Err(BatchError(format!(
                "--output `{template}` names images {j} and {i} both {}; add {{index}} or {{seed}} to the template",
                p.display()
            )));
        }
        if p.exists() && !overwrite {
            return Err(BatchError(format!(
                "{} already exists; pass --overwrite to replace it, or choose another --output",
                p.display()
            )));
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_and_json_lines() {
        let lines = parse_prompts("a cat\n\n# comment\n{\"prompt\": \"a dog\", \"seed\": 7, \"width\": 512}\n").unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].prompt.as_str(), lines[0].line), ("a cat", 1));
        assert_eq!((lines[1].seed, lines[1].width, lines[1].line), (Some(7), Some(512), 4));
        assert!(parse_prompts("{\"prompt\": \"x\", \"sed\": 1}").unwrap_err().contains("line 1"));
        let aliases = parse_prompts("{\"prompt\": \"x\", \"num_inference_steps\": 30, \"guidance_scale\": 4.5}\n{\"prompt\": \"y\", \"cfg_scale\": 6}").unwrap();
        assert_eq!((aliases[0].steps, aliases[0].guidance, aliases[1].guidance), (Some(30), Some(4.5), Some(6.0)));
        assert!(parse_prompts("{\"prompt\": \"  \"}").unwrap_err().contains("empty"));
        assert!(parse_prompts("# nothing\n").is_err());
    }

    #[test]
    fn seeds_count_up_per_prompt_and_names_follow_the_template() {
        let lines = parse_prompts("a cat\n{\"prompt\": \"a dog!\", \"seed\": 100}").unwrap();
        let mut defaults = Request::new("");
        defaults.seed = 5;
        let items = expand(&lines, 2, &defaults);
        let seeds: Vec<u64> = items.iter().map(|i| i.request.seed).collect();
        assert_eq!(seeds, [5, 6, 100, 101]);
        let name = output_name("out/{index}-{line}-{image}-{seed}-{prompt}.png", &items[3]).unwrap();
        assert_eq!(name, PathBuf::from("out/3-2-1-101-a-dog.png"));
        assert!(output_name("{nope}.png", &items[0]).unwrap_err().contains("unknown placeholder"));
        let err = output_paths("same.png", &items, false).unwrap_err().to_string();
        assert!(err.contains("add {index}"), "{err}");
    }
}
