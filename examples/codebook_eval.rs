//! Codebook quantization (JLCM) against RTN-g128 with clipping and NF4-b64 on every 2-D tensor of a safetensors
//! model: SQNR, relative error and bits per weight (all metadata counted), medians, and the targets of the
//! codebook issue.
//!
//! cargo run --release --example codebook_eval -- [MODEL.safetensors] [--json] [--with-embeddings]
//!     [--uniform-weights | --importance FILE] [--rounds N] [--search-steps N] [--clusters K] [--group G]
//!     [--write-dir DIR]
//!
//! --importance names a safetensors file with one f32 vector per weight tensor, under the tensor's name, of
//! per-input-channel activation second moments; tensors without one use |w| + sigma.
//!
//! Embeddings (names containing "embeddings") are skipped unless --with-embeddings, since the codebook mode
//! keeps them lossless by default. --write-dir writes the dequantized model at 3 and 4 bits (fixed-rate and
//! entropy-coded JLCM; 1-D tensors and embeddings unchanged) as f32-b{B}.safetensors and f32-b{B}-ec.safetensors,
//! and the baselines as f32-rtn{B}-g128.safetensors and f32-nf4-b64.safetensors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use neuzip::codec::codebook::{self, CodebookInit, ErrorWeights, FitOptions};
use neuzip::codec::quant_baselines::{nf4, rtn_clipped, NF4_BLOCK, RTN_GROUP};
use neuzip::codec::quant_metrics::{median, relative_frobenius, sqnr_db};
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

const DEFAULT_MODEL: &str = "/work/main/data/minilm/model-f32.safetensors";
const BITS: [u32; 3] = [2, 3, 4];
const WRITE_BITS: [u32; 2] = [3, 4];
/// Codebook entries of the entropy-coded mode: 2^(B + EXTRA_BITS).
const EXTRA_BITS: u32 = 2;

struct Args {
    model: PathBuf,
    json: bool,
    with_embeddings: bool,
    uniform_weights: bool,
    importance: Option<PathBuf>,
    scale_search: bool,
    rounds: usize,
    search_steps: usize,
    clusters: usize,
    group: usize,
    write_dir: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        model: PathBuf::from(DEFAULT_MODEL),
        json: false,
        with_embeddings: false,
        uniform_weights: false,
        importance: None,
        scale_search: true,
        rounds: 8,
        search_steps: 8,
        clusters: 4,
        group: 128,
        write_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
        };
        match a.as_str() {
            "--json" => args.json = true,
            "--with-embeddings" => args.with_embeddings = true,
            "--uniform-weights" => args.uniform_weights = true,
            "--no-scale-search" => args.scale_search = false,
            "--rounds" => args.rounds = value("--rounds")?.parse()?,
            "--search-steps" => args.search_steps = value("--search-steps")?.parse()?,
            "--clusters" => args.clusters = value("--clusters")?.parse()?,
            "--group" => args.group = value("--group")?.parse()?,
            "--importance" => args.importance = Some(PathBuf::from(value("--importance")?)),
            "--write-dir" => args.write_dir = Some(PathBuf::from(value("--write-dir")?)),
            s if !s.starts_with("--") => args.model = PathBuf::from(s),
            s => anyhow::bail!("unknown option {s}"),
        }
    }
    Ok(args)
}

/// One method's figures on one tensor.
#[derive(Clone, Copy)]
struct Figure {
    sqnr: f64,
    rel: f64,
    bpw: f64,
}

fn figure(original: &[f32], deq: &[f32], bpw: f64) -> Figure {
    Figure {
        sqnr: sqnr_db(original, deq),
        rel: relative_frobenius(original, deq),
        bpw,
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let bytes = std::fs::read(&args.model)?;
    let model = SafeTensors::deserialize(&bytes)?;
    let mut names: Vec<String> = model.names().into_iter().map(String::from).collect();
    names.sort();
    let importance_bytes = match &args.importance {
        Some(path) => std::fs::read(path)?,
        None => Vec::new(),
    };
    let importance = match &args.importance {
        Some(_) => Some(SafeTensors::deserialize(&importance_bytes)?),
        None => None,
    };
    let weights_name = match (&args.importance, args.uniform_weights) {
        (Some(path), _) => format!("importance {}", path.display()),
        (None, true) => "uniform".to_string(),
        (None, false) => "|w|+sigma".to_string(),
    };

    // method -> tensor -> figure, and the dequantized tensors to write.
    let mut results: BTreeMap<String, BTreeMap<String, Figure>> = BTreeMap::new();
    let mut written: BTreeMap<String, BTreeMap<String, Vec<f32>>> = BTreeMap::new();
    let started = Instant::now();
    for name in &names {
        let view = model.tensor(name)?;
        let shape = view.shape().to_vec();
        if view.dtype() != Dtype::F32 || shape.len() != 2 {
            continue;
        }
        if name.contains("embeddings") && !args.with_embeddings {
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let w: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // The written models keep embeddings lossless, as the codebook mode does by default.
        let write = !name.contains("embeddings");
        // Importance per input channel, when the file has this tensor's name; else the default weights.
        let channel_importance: Option<Vec<f32>> = match &importance {
            Some(file) => match file.tensor(name) {
                Ok(v) => Some(
                    v.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                Err(_) => None,
            },
            None => None,
        };
        let error_weights = match (&channel_importance, args.uniform_weights) {
            (Some(v), _) => ErrorWeights::PerInput(v),
            (None, true) => ErrorWeights::Uniform,
            (None, false) => ErrorWeights::AbsPlusSigma,
        };
        let tensor_start = Instant::now();
        let mut record = |method: String, f: Figure| {
            results.entry(method).or_default().insert(name.clone(), f);
        };

        let r = nf4(&w, rows, cols, NF4_BLOCK)?;
        record(
            "nf4-b64".into(),
            figure(&w, &r.dequantized, r.bits_per_weight()),
        );
        if write {
            written
                .entry("f32-nf4-b64".into())
                .or_default()
                .insert(name.clone(), r.dequantized);
        }
        for bits in BITS {
            let r = rtn_clipped(&w, rows, cols, bits, RTN_GROUP)?;
            record(
                format!("rtn{bits}-g128-clip"),
                figure(&w, &r.dequantized, r.bits_per_weight()),
            );
            if write && WRITE_BITS.contains(&bits) {
                written
                    .entry(format!("f32-rtn{bits}-g128"))
                    .or_default()
                    .insert(name.clone(), r.dequantized);
            }

            let options = FitOptions {
                index_bits: bits,
                group_size: args.group,
                row_clusters: args.clusters,
                rounds: args.rounds,
                init: CodebookInit::Lloyd,
                rate_lambda: 0.0,
                scale_search: args.scale_search,
            };
            let (q, _) = codebook::fit(&w, rows, cols, error_weights, &options)?;
            let fixed = q.fixed_rate_size();
            let deq = q.dequantize();
            record(
                format!("jlcm{bits}-fixed"),
                figure(&w, &deq, fixed.bits_per_weight()),
            );
            // Same indices, entropy-coded: same error, fewer bits.
            let coded = q.entropy_coded_size();
            record(
                format!("jlcm{bits}-fixed-ans"),
                figure(&w, &deq, coded.bits_per_weight()),
            );
            if write && WRITE_BITS.contains(&bits) {
                written
                    .entry(format!("f32-b{bits}"))
                    .or_default()
                    .insert(name.clone(), deq);
            }

            // Entropy-coded mode at the fixed-rate mode's total size.
            let ec_options = FitOptions {
                index_bits: bits + EXTRA_BITS,
                ..options
            };
            let target = fixed.bits_per_weight();
            match codebook::fit_entropy_coded(
                &w,
                rows,
                cols,
                error_weights,
                &ec_options,
                target,
                args.search_steps,
            )? {
                Some((q, size)) => {
                    let deq = q.dequantize();
                    record(
                        format!("jlcm{bits}-ec"),
                        figure(&w, &deq, size.bits_per_weight()),
                    );
                    if write && WRITE_BITS.contains(&bits) {
                        written
                            .entry(format!("f32-b{bits}-ec"))
                            .or_default()
                            .insert(name.clone(), deq);
                    }
                }
                None => eprintln!("{name}: no entropy-coded fit within {target:.3} bits/weight"),
            }
        }
        eprintln!(
            "{name} {rows}x{cols}: {:.1} s (total {:.1} s)",
            tensor_start.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }

    let med = |method: &str, pick: fn(&Figure) -> f64| -> f64 {
        let v: Vec<f64> = results
            .get(method)
            .map_or(Vec::new(), |m| m.values().map(pick).collect());
        median(&v)
    };
    // Median over tensors of the per-tensor SQNR difference a - b.
    let med_diff = |a: &str, b: &str| -> f64 {
        let (Some(ma), Some(mb)) = (results.get(a), results.get(b)) else {
            return f64::NAN;
        };
        let v: Vec<f64> = ma
            .iter()
            .filter_map(|(t, fa)| mb.get(t).map(|fb| fa.sqnr - fb.sqnr))
            .collect();
        median(&v)
    };
    let tensors = results.get("nf4-b64").map_or(0, |m| m.len());
    let mut summary = serde_json::Map::new();
    for method in results.keys() {
        summary.insert(
            method.clone(),
            json!({
                "median_sqnr_db": med(method, |f| f.sqnr),
                "median_rel_error": med(method, |f| f.rel),
                "median_bits_per_weight": med(method, |f| f.bpw),
            }),
        );
    }
    let checks = vec![
        (
            "4 bits: jlcm4-fixed >= nf4-b64",
            med_diff("jlcm4-fixed", "nf4-b64"),
            0.0,
        ),
        (
            "4 bits: jlcm4-fixed >= rtn4 + 0.3 dB",
            med_diff("jlcm4-fixed", "rtn4-g128-clip"),
            0.3,
        ),
        (
            "4 bits: jlcm4-ec >= nf4-b64",
            med_diff("jlcm4-ec", "nf4-b64"),
            0.0,
        ),
        (
            "4 bits: jlcm4-ec >= rtn4 + 0.3 dB",
            med_diff("jlcm4-ec", "rtn4-g128-clip"),
            0.3,
        ),
        (
            "3 bits: jlcm3-fixed >= rtn3 + 0.5 dB",
            med_diff("jlcm3-fixed", "rtn3-g128-clip"),
            0.5,
        ),
        (
            "3 bits: jlcm3-ec >= rtn3 + 0.5 dB",
            med_diff("jlcm3-ec", "rtn3-g128-clip"),
            0.5,
        ),
        (
            "2 bits: jlcm2-fixed vs rtn2 (report)",
            med_diff("jlcm2-fixed", "rtn2-g128-clip"),
            f64::NAN,
        ),
        (
            "2 bits: jlcm2-ec vs rtn2 (report)",
            med_diff("jlcm2-ec", "rtn2-g128-clip"),
            f64::NAN,
        ),
        (
            "ec vs fixed at 2 bits >= 1.5 dB",
            med_diff("jlcm2-ec", "jlcm2-fixed"),
            1.5,
        ),
        (
            "ec vs fixed at 3 bits >= 1.5 dB",
            med_diff("jlcm3-ec", "jlcm3-fixed"),
            1.5,
        ),
        (
            "ec vs fixed at 4 bits >= 1.5 dB",
            med_diff("jlcm4-ec", "jlcm4-fixed"),
            1.5,
        ),
    ];

    if let Some(dir) = &args.write_dir {
        std::fs::create_dir_all(dir)?;
        for (variant, tensors) in &written {
            let path = dir.join(format!("{variant}.safetensors"));
            let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
            for name in &names {
                let view = model.tensor(name)?;
                let bytes = match tensors.get(name) {
                    Some(deq) => deq.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    None => view.data().to_vec(),
                };
                data.push((name.clone(), view.shape().to_vec(), bytes));
            }
            let mut views = Vec::new();
            for (name, shape, bytes) in &data {
                let dtype = model.tensor(name)?.dtype();
                views.push((
                    name.clone(),
                    safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)?,
                ));
            }
            safetensors::serialize_to_file(views, None, &path)?;
            eprintln!("wrote {}", path.display());
        }
    }

    if args.json {
        let per_tensor: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(method, m)| {
                let t: serde_json::Map<String, serde_json::Value> = m
                    .iter()
                    .map(|(t, f)| (t.clone(), json!({"sqnr_db": f.sqnr, "rel_error": f.rel, "bits_per_weight": f.bpw})))
                    .collect();
                (method.clone(), serde_json::Value::Object(t))
            })
            .collect();
        let checks: Vec<serde_json::Value> = checks
            .iter()
            .map(|(what, diff, need)| {
                json!({"check": what, "median_sqnr_gain_db": diff, "required_db": if need.is_nan() { None } else { Some(*need) },
                       "met": if need.is_nan() { None } else { Some(*diff >= *need) }})
            })
            .collect();
        let out = json!({
            "model": args.model.display().to_string(),
            "tensors": tensors,
            "error_weights": weights_name,
            "row_clusters": args.clusters,
            "group_size": args.group,
            "rounds": args.rounds,
            "summary": summary,
            "checks": checks,
            "per_tensor": per_tensor,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{tensors} 2-D tensors of {} (error weights {}, K={}, G={}, {} rounds)",
        args.model.display(),
        weights_name,
        args.clusters,
        args.group,
        args.rounds
    );
    println!(
        "{:<20} {:>12} {:>12} {:>10}",
        "method", "median SQNR", "median rel", "median bpw"
    );
    for method in results.keys() {
        println!(
            "{:<20} {:>9.2} dB {:>12.5} {:>10.4}",
            method,
            med(method, |f| f.sqnr),
            med(method, |f| f.rel),
            med(method, |f| f.bpw)
        );
    }
    println!("\nmedian over tensors of the per-tensor SQNR difference:");
    for (what, diff, need) in &checks {
        let verdict = if need.is_nan() {
            "report".to_string()
        } else if diff >= need {
            "met".to_string()
        } else {
            "NOT met".to_string()
        };
        println!("  {what:<40} {diff:>+7.2} dB  {verdict}");
    }
    Ok(())
}
