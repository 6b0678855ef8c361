//! A BERT encoder in f32 and the sentence embedding of sentence-transformers' all-MiniLM-L6-v2: word,
//! position and token-type embeddings, LayerNorm, self-attention layers with exact-erf GELU, then the mean
//! of the token states and L2 normalization.
//!
//! Sequences of different lengths are packed one after another instead of padded: each attends only to its
//! own tokens, which is what a padded batch with an attention mask computes for its real tokens.

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;

use crate::weights::{Checkpoint, Tensor};

/// The fields of a Hugging Face `config.json` that the forward pass uses.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}

fn default_position_type() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn from_json(text: &str) -> Result<BertConfig> {
        let config: BertConfig = serde_json::from_str(text).context("config.json")?;
        ensure!(
            config.hidden_act == "gelu",
            "hidden_act '{}' is not supported (only exact 'gelu')",
            config.hidden_act
        );
        ensure!(
            config.position_embedding_type == "absolute",
            "position_embedding_type '{}' is not supported",
            config.position_embedding_type
        );
        ensure!(
            config.num_attention_heads > 0
                && config
                    .hidden_size
                    .is_multiple_of(config.num_attention_heads),
            "hidden_size {} is not a multiple of num_attention_heads {}",
            config.hidden_size,
            config.num_attention_heads
        );
        ensure!(
            config.hidden_size > 0 && config.intermediate_size > 0 && config.type_vocab_size > 0,
            "hidden_size, intermediate_size and type_vocab_size must be positive"
        );
        Ok(config)
    }
}

/// `y = x W^T + b` with `W` stored `[outputs, inputs]` as in PyTorch.
struct Linear {
    /// The checkpoint's weight tensors stacked into `weight`, in order.
    names: Vec<String>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

struct Layer {
    /// Query, key and value stacked into one `[3 * hidden, hidden]` matrix.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// Called with a linear layer's weight names, its inputs (`[tokens * input_width]`) and `input_width`.
pub type InputObserver<'a> = dyn FnMut(&[String], &[f32], usize) + 'a;

/// A BERT encoder with its weights in f32.
pub struct BertModel {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
}

fn expect_shape(tensor: Tensor, name: &str, shape: &[usize]) -> Result<Tensor> {
    if tensor.shape != shape {
        bail!(
            "'{name}' has shape {:?}, the config implies {shape:?}",
            tensor.shape
        );
    }
    Ok(tensor)
}

fn load(ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<Tensor> {
    expect_shape(ckpt.tensor(name)?, name, shape)
}

fn load_linear(
    ckpt: &Checkpoint,
    prefixes: &[String],
    inputs: usize,
    outputs: usize,
) -> Result<Linear> {
    let mut weight = Vec::with_capacity(prefixes.len() * outputs * inputs);
    let mut bias = Vec::with_capacity(prefixes.len() * outputs);
    for prefix in prefixes {
        weight.extend(load(ckpt, &format!("{prefix}.weight"), &[outputs, inputs])?.data);
        bias.extend(load(ckpt, &format!("{prefix}.bias"), &[outputs])?.data);
    }
    Ok(Linear {
        names: prefixes.iter().map(|p| format!("{p}.weight")).collect(),
        weight,
        bias,
        inputs,
        outputs: outputs * prefixes.len(),
    })
}

fn load_norm(ckpt: &Checkpoint, prefix: &str, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        gamma: load(ckpt, &format!("{prefix}.weight"), &[size])?.data,
        beta: load(ckpt, &format!("{prefix}.bias"), &[size])?.data,
        eps: eps as f32,
    })
}

impl BertModel {
    /// Reads every tensor the encoder needs from `ckpt`, checking its shape against `config`.
    pub fn load(config: &BertConfig, ckpt: &Checkpoint) -> Result<BertModel> {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let qkv_names = ["query", "key", "value"].map(|m| format!("{p}.attention.self.{m}"));
            layers.push(Layer {
                qkv: load_linear(ckpt, &qkv_names, h, h)?,
                attention_out: load_linear(ckpt, &[format!("{p}.attention.output.dense")], h, h)?,
                attention_norm: load_norm(
                    ckpt,
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    eps,
                )?,
                intermediate: load_linear(
                    ckpt,
                    &[format!("{p}.intermediate.dense")],
                    h,
                    config.intermediate_size,
                )?,
                output: load_linear(
                    ckpt,
                    &[format!("{p}.output.dense")],
                    config.intermediate_size,
                    h,
                )?,
                output_norm: load_norm(ckpt, &format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        Ok(BertModel {
            word: load(
                ckpt,
                "embeddings.word_embeddings.weight",
                &[config.vocab_size, h],
            )?,
            position: load(
                ckpt,
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: load(
                ckpt,
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            embedding_norm: load_norm(ckpt, "embeddings.LayerNorm", h, eps)?,
            layers,
            config: config.clone(),
        })
    }

    /// The last hidden states of each sequence (token type 0 throughout), `[tokens * hidden]` per sequence.
    pub fn encode(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.encode_observed(sequences, &mut |_, _, _| {})
    }

    /// `encode`, calling `observe(weight_names, inputs, input_width)` with the inputs of every linear layer
    /// (`[tokens * input_width]`, every token of every sequence) before it is applied.
    pub fn encode_observed(
        &self,
        sequences: &[Vec<u32>],
        observe: &mut InputObserver<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        let h = self.config.hidden_size;
        let mut starts = vec![0usize];
        for seq in sequences {
            ensure!(
                seq.len() <= self.config.max_position_embeddings,
                "a sequence of {} tokens is longer than max_position_embeddings {}",
                seq.len(),
                self.config.max_position_embeddings
            );
            if let Some(&id) = seq
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                bail!("token id {id} is outside the vocabulary");
            }
            starts.push(starts.last().unwrap() + seq.len());
        }
        let tokens = *starts.last().unwrap();
        let mut hidden = vec![0f32; tokens * h];
        for (seq, &start) in sequences.iter().zip(&starts) {
            for (pos, &id) in seq.iter().enumerate() {
                let row = &mut hidden[(start + pos) * h..(start + pos + 1) * h];
                let word = &self.word.data[id as usize * h..(id as usize + 1) * h];
                let position = &self.position.data[pos * h..(pos + 1) * h];
                let token_type = &self.token_type.data[..h];
                for i in 0..h {
                    row[i] = word[i] + token_type[i] + position[i];
                }
            }
        }
        layer_norm(&mut hidden, &self.embedding_norm);
        for layer in &self.layers {
            self.layer_forward(layer, &mut hidden, &starts, observe);
        }
        Ok(starts
            .windows(2)
            .map(|w| hidden[w[0] * h..w[1] * h].to_vec())
            .collect())
    }

    /// Sentence embeddings: the mean of each sequence's last hidden states, L2-normalized.
    pub fn embed(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let h = self.config.hidden_size;
        Ok(self
            .encode(sequences)?
            .iter()
            .map(|states| normalize(&mean_rows(states, h)))
            .collect())
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        hidden: &mut [f32],
        starts: &[usize],
        observe: &mut InputObserver<'_>,
    ) {
        let mut apply = |x: &[f32], layer: &Linear| {
            observe(&layer.names, x, layer.inputs);
            linear(x, layer)
        };
        let qkv = apply(hidden, &layer.qkv);
        let context = self.attention(&qkv, starts);
        let attended = apply(&context, &layer.attention_out);
        add_assign(hidden, &attended);
        layer_norm(hidden, &layer.attention_norm);
        let mut inner = apply(hidden, &layer.intermediate);
        inner.par_chunks_mut(4096).for_each(|chunk| {
            for x in chunk {
                *x = gelu(*x);
            }
        });
        let out = apply(&inner, &layer.output);
        add_assign(hidden, &out);
        layer_norm(hidden, &layer.output_norm);
    }

    /// Multi-head scaled dot-product attention within each sequence; `qkv` is `[tokens, 3 * hidden]`.
    fn attention(&self, qkv: &[f32], starts: &[usize]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut context = vec![0f32; qkv.len() / 3];
        let mut per_sequence = Vec::with_capacity(starts.len());
        let mut rest = context.as_mut_slice();
        for w in starts.windows(2) {
            let (this, tail) = rest.split_at_mut((w[1] - w[0]) * h);
            per_sequence.push((w[0], this));
            rest = tail;
        }
        per_sequence.into_par_iter().for_each(|(start, out)| {
            let n = out.len() / h;
            let row = |t: usize| &qkv[(start + t) * 3 * h..(start + t + 1) * 3 * h];
            let mut scores = vec![0f32; n];
            for head in 0..heads {
                let (q_at, k_at, v_at) = (head * d, h + head * d, 2 * h + head * d);
                for i in 0..n {
                    let q = &row(i)[q_at..q_at + d];
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = dot(q, &row(j)[k_at..k_at + d]) * scale;
                    }
                    softmax(&mut scores);
                    let ctx = &mut out[i * h + head * d..i * h + (head + 1) * d];
                    for (j, &p) in scores.iter().enumerate() {
                        let v = &row(j)[v_at..v_at + d];
                        for (c, &x) in ctx.iter_mut().zip(v) {
                            *c += p * x;
                        }
                    }
                }
            }
        });
        context
    }
}

/// Tokens per tile of the matrix product: each weight row is read once per tile of inputs held in cache.
const TILE: usize = 32;

/// `x W^T + b` for the rows of `x`. Every output element is one [`dot`], whatever the thread count and
/// whichever other tokens share the batch, so a sentence's embedding depends on neither.
fn linear(x: &[f32], layer: &Linear) -> Vec<f32> {
    let (n_in, n_out) = (layer.inputs, layer.outputs);
    let tokens = x.len() / n_in;
    let mut y = vec![0f32; tokens * n_out];
    y.par_chunks_mut(TILE * n_out)
        .zip(x.par_chunks(TILE * n_in))
        .for_each(|(y_tile, x_tile)| {
            for (o, w) in layer.weight.chunks_exact(n_in).enumerate() {
                let b = layer.bias[o];
                for (t, x_row) in x_tile.chunks_exact(n_in).enumerate() {
                    y_tile[t * n_out + o] = dot(x_row, w) + b;
                }
            }
        });
    y
}

/// A dot product with 16 partial sums, so that it vectorizes.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// LayerNorm over each row of `x` (rows of `gamma.len()` values), statistics in f64.
fn layer_norm(x: &mut [f32], norm: &LayerNorm) {
    let h = norm.gamma.len();
    x.par_chunks_mut(h).for_each(|row| {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (var + norm.eps as f64).sqrt();
        for ((v, g), b) in row.iter_mut().zip(&norm.gamma).zip(&norm.beta) {
            *v = ((*v as f64 - mean) * inv) as f32 * g + b;
        }
    });
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// GELU with the exact error function: `x/2 (1 + erf(x/sqrt 2))`.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// The error function in f64, accurate to about 1e-15: the series
/// `erf x = 2/sqrt(pi) e^(-x^2) sum_n (2x^2)^n x / (1*3*...*(2n+1))` below 2.5 and the continued fraction
/// `erfc x = e^(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))` above.
pub fn erf(x: f64) -> f64 {
    let ax = x.abs();
    if ax.is_nan() {
        return f64::NAN;
    }
    let value = if ax < 2.5 {
        let two_x2 = 2.0 * ax * ax;
        let (mut term, mut sum, mut n) = (ax, ax, 0.0);
        while term > sum * 1e-17 {
            n += 1.0;
            term *= two_x2 / (2.0 * n + 1.0);
            sum += term;
        }
        std::f64::consts::FRAC_2_SQRT_PI * (-ax * ax).exp() * sum
    } else if ax < 6.0 {
        let mut fraction = ax;
        for k in (1..=60).rev() {
            fraction = ax + (k as f64 / 2.0) / fraction;
        }
        1.0 - (-ax * ax).exp() / (fraction * std::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    value.copysign(x)
}

/// The mean of the rows of `states` (rows of `h` values).
pub fn mean_rows(states: &[f32], h: usize) -> Vec<f32> {
    let rows = states.len() / h;
    let mut sum = vec![0f64; h];
    for row in states.chunks_exact(h) {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    sum.iter()
        .map(|&s| (s / rows.max(1) as f64) as f32)
        .collect()
}

/// `x / max(|x|, 1e-12)`, as `torch.nn.functional.normalize`.
pub fn normalize(x: &[f32]) -> Vec<f32> {
    let norm = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let inv = 1.0 / norm.max(1e-12);
    x.iter().map(|&v| (v as f64 * inv) as f32).collect()
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-300)
}
