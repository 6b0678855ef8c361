//! Command-line interface: argument definitions, progress bars and human/JSON output. All real work is in
//! the library.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use neuzip::analyze::analyze;
use neuzip::codec::codebook::MAX_ROW_CLUSTERS;
use neuzip::codec::codebook_format::Importance;
use neuzip::codec::lossy::MAX_NORM_BLOCK;
use neuzip::convert::{
    convert_uncommitted, nzt_name, read_shard_index, ConvertOptions, ConvertSummary, NZT_INDEX,
    PROGRESS_PASSES, SAFETENSORS_INDEX,
};
use neuzip::format::writer::{EarlyWriteback, OutputFile};
use neuzip::format::MAGIC;
use neuzip::inspect::report;
use neuzip::precision::{
    CodebookChoice, CodebookMode, CodebookSettings, LossySettings, Precision, CODEBOOK_BITS,
    DEFAULT_CODEBOOK_GROUP, DEFAULT_NORM_BLOCK, DEFAULT_ROW_CLUSTERS,
};
use neuzip::source::SafetensorsFile;
use neuzip::verify::verify;
use neuzip::{DecodeOptions, NztFile};

/// Make neural-network weights smaller without changing what they compute.
///
/// neuzip converts safetensors checkpoints to .nzt files. The default codec is lossless: each float's sign,
/// exponent and top mantissa bits are entropy-coded with rANS and the remaining mantissa bits are stored
/// raw, so decoding gives back the original bytes exactly (bf16 weights shrink to about 10.6 bits).
/// With --mantissa-bits K the weight matrices are rounded to K mantissa bits instead (lossy; bf16 at K = 3
/// takes about 6.6 bits), within a bound that `verify --against` checks.
///
/// Typical use:
///   neuzip analyze model.safetensors        # what the codec can reach, before converting
///   neuzip analyze model.safetensors --sweep   # lossy: size and error for each K
///   neuzip convert model.safetensors        # writes model.nzt
///   neuzip verify model.nzt --against model.safetensors
///   neuzip decompress model.nzt -o restored.safetensors
#[derive(Parser, Debug)]
#[command(name = "neuzip", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a safetensors file, or a Hugging Face model directory (sharded with
    /// model.safetensors.index.json, or holding model.safetensors), to .nzt.
    Convert(ConvertArgs),
    /// Rebuild the original safetensors file from a .nzt (byte-identical), or every shard of a directory
    /// holding model.nzt.index.json.
    Decompress(DecompressArgs),
    /// Show each tensor's dtype, shape, codec and size before and after, with totals.
    Inspect(InspectArgs),
    /// Decode everything, checking every checksum; with --against, compare bit for bit with the original.
    Verify(VerifyArgs),
    /// Measure a safetensors file: exponent histograms, entropies, the codec's bound and predicted size.
    Analyze(AnalyzeArgs),
    /// Ratio and encode/decode throughput on a safetensors file, on 1 thread and on all, beside an
    /// in-process zstd -3 and a memory copy measured in the same run (medians after a warm-up).
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// A .safetensors file.
    file: PathBuf,
    /// Timed runs per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure decoding on a GPU instead (needs a build with `--features cuda`): GB/s of output beside a
    /// device-to-device copy. FILE may be a .safetensors file (converted first) or a .nzt file.
    #[arg(long)]
    gpu: bool,
    /// CUDA device number for --gpu.
    #[arg(long, default_value_t = 0, requires = "gpu")]
    device: usize,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// A .safetensors file or a model directory.
    input: PathBuf,
    /// Output file (for a file input; default: the input with .nzt) or directory (for a directory input;
    /// default: the input directory).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Replace outputs that already exist.
    #[arg(short, long)]
    force: bool,
    /// Elements per block for float tensors; each block decodes on its own.
    #[arg(long, default_value_t = neuzip::format::DEFAULT_FLOAT_BLOCK_ELEMENTS, value_name = "N")]
    block_elements: u32,
    /// zstd level for non-float tensors and for blocks where zstd beats the float codec.
    #[arg(long, default_value_t = 3, value_name = "LEVEL")]
    zstd_level: i32,
    #[command(flatten)]
    lossy: LossyArgs,
    /// Lossy with a size target: the whole file gets at most R bits per weight, and neuzip picks K for each
    /// tensor of rank 2 or more that no --tensor-bits rule names, giving bits where they lower the error most
    /// (every matrix counted as an equal source of relative error, so large embedding tables get fewer bits
    /// than the matrices every token goes through). With --mantissa-bits K, K stays the same everywhere and
    /// neuzip picks each tensor's normalization group instead (none, or 1024 down to 16 elements per scale
    /// byte). It runs one dry conversion per candidate first (K = 0..=10 and lossless, or the 9 group
    /// sizes), so it takes about that many times longer. With a sharded model, each shard meets the target.
    /// See the chosen settings per tensor with `neuzip inspect`.
    #[arg(long, value_name = "R", conflicts_with = "codebook_bits")]
    target_bits: Option<f64>,
    #[command(flatten)]
    codebook: CodebookArgs,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

/// Lossy mode: which tensors lose mantissa bits, and how many.
#[derive(Args, Debug, Clone)]
struct LossyArgs {
    /// Lossy: keep K mantissa bits (rounded to nearest even) of every BF16/F16/F32 tensor of rank 2 or more;
    /// 1-D tensors stay lossless. K equal to the dtype's mantissa width is lossless.
    #[arg(long, value_name = "K")]
    mantissa_bits: Option<u32>,
    /// Per-tensor precision by name: a glob (`*` any run, `?` one character), `=`, then K or `lossless`.
    /// Repeatable; the last matching pattern wins and overrides the rank rule, e.g.
    /// --tensor-bits '*embeddings*=lossless' --tensor-bits '*.bias=5'.
    #[arg(long, value_name = "PATTERN=K")]
    tensor_bits: Vec<String>,
    /// Lossy normalization group (default 256): divide each group of B elements (1..=1024) by a one-byte
    /// scale in [1, 2) before rounding and multiply it back on decode; the encoder picks the scale of least
    /// squared error for the group. It costs 8 bits per group and moves the rounding grid onto the group's
    /// large weights.
    #[arg(long, value_name = "B", conflicts_with = "no_norm")]
    norm_block: Option<u32>,
    /// Lossy: no normalization (plain rounding of every weight; smaller and faster to convert, less exact).
    #[arg(long)]
    no_norm: bool,
}

impl LossyArgs {
    fn settings(&self) -> Result<LossySettings> {
        if let Some(b) = self.norm_block {
            if !(1..=MAX_NORM_BLOCK).contains(&b) {
                bail!("--norm-block must be between 1 and {MAX_NORM_BLOCK}, not {b}");
            }
        }
        let mut settings = LossySettings {
            default_bits: self.mantissa_bits,
            norm_block: if self.no_norm {
                0
            } else {
                self.norm_block.unwrap_or(DEFAULT_NORM_BLOCK)
            },
            ..LossySettings::default()
        };
        for rule in &self.tensor_bits {
            settings
                .rules
                .push_parsed(rule, Precision::parse)
                .context("--tensor-bits")?;
        }
        settings.validate().context("--mantissa-bits")?;
        Ok(settings)
    }
}

/// Codebook mode: which tensors are quantized to codebook indices, and with what fit.
#[derive(Args, Debug, Clone)]
struct CodebookArgs {
    /// Codebook: quantize every BF16/F16/F32 tensor of rank 2 or more (flattened to rows x last dimension) to
    /// indices into per-row-cluster codebooks, with f16 scales per row and group and the indices rANS-coded,
    /// at R bits per weight (2 to 8, fractions allowed: 3, 3.5). R is a budget per tensor: its stored size,
    /// codebooks, index tables, scales, cluster ids and coded indices all counted, is at most R bits per
    /// weight (a tensor too small for its side data to fit gets the fixed-rate fit of floor(R) bits). The fit
    /// uses codebooks 4x larger than 2^ceil(R) and trades error against index entropy, searching the trade-off
    /// per tensor to fill the budget; the result does not depend on the thread count. 1-D tensors and tensors
    /// named *embeddings* stay lossless. With it, --tensor-bits values are R or `lossless`. Not with
    /// --mantissa-bits.
    #[arg(long, value_name = "R", conflicts_with_all = ["mantissa_bits", "norm_block", "no_norm"])]
    codebook_bits: Option<f64>,
    /// Codebook: the fixed-rate fit instead of a budget: R is a whole index width B, codebooks of 2^B entries
    /// fitted for error alone. The indices are still rANS-coded, so a tensor takes a little under B bits per
    /// weight plus its side data; faster to convert, less accurate at the same size.
    #[arg(long, requires = "codebook_bits")]
    fixed_rate: bool,
    /// Codebook: inputs per scale group (along the last dimension).
    #[arg(long, value_name = "G", default_value_t = DEFAULT_CODEBOOK_GROUP, requires = "codebook_bits")]
    group_size: u32,
    /// Codebook: row clusters per tensor (1..=256), each with its own codebook.
    #[arg(long, value_name = "K", default_value_t = DEFAULT_ROW_CLUSTERS, requires = "codebook_bits")]
    row_clusters: u32,
    /// Codebook and lossy: a safetensors file of per-input-channel importances (e.g. activation second
    /// moments over calibration text, like llama.cpp's imatrix; `examples/embedding_check --importance-out`
    /// writes one for BERT models), one 1-D F32 vector per weight tensor under its name. They weigh the
    /// codebook fit's errors (tensors without one use |w| + sigma) and the lossy mode's choice of scale
    /// bytes, and with --target-bits each tensor's error. Decoding does not need them.
    #[arg(long, value_name = "FILE")]
    importance: Option<PathBuf>,
}

impl CodebookArgs {
    fn importance(&self) -> Result<Option<std::sync::Arc<Importance>>> {
        let Some(path) = &self.importance else {
            return Ok(None);
        };
        let file = SafetensorsFile::open(path)
            .with_context(|| format!("reading --importance {}", path.display()))?;
        let importance = Importance::from_file(&file)
            .with_context(|| format!("--importance {}", path.display()))?;
        Ok(Some(std::sync::Arc::new(importance)))
    }
}

/// The lossy and codebook settings of the flags (`--tensor-bits` rules go to the codebook mode when
/// --codebook-bits is given).
fn precision_settings(
    lossy: &LossyArgs,
    codebook: &CodebookArgs,
) -> Result<(LossySettings, CodebookSettings)> {
    let Some(bits) = codebook.codebook_bits else {
        return Ok((lossy.settings()?, CodebookSettings::default()));
    };
    let (low, high) = (*CODEBOOK_BITS.start(), *CODEBOOK_BITS.end());
    if !(low as f64..=high as f64).contains(&bits) {
        bail!("--codebook-bits must be between {low} and {high}, not {bits}");
    }
    if codebook.fixed_rate && bits.fract() != 0.0 {
        bail!("--codebook-bits {bits} with --fixed-rate: the index width must be a whole number");
    }
    if codebook.group_size == 0 {
        bail!("--group-size must be at least 1");
    }
    if !(1..=MAX_ROW_CLUSTERS as u32).contains(&codebook.row_clusters) {
        bail!(
            "--row-clusters must be between 1 and {MAX_ROW_CLUSTERS}, not {}",
            codebook.row_clusters
        );
    }
    let mut settings = CodebookSettings {
        default_bits: Some(bits),
        mode: if codebook.fixed_rate {
            CodebookMode::FixedRate
        } else {
            CodebookMode::RateTarget
        },
        group_size: codebook.group_size,
        row_clusters: codebook.row_clusters,
        ..CodebookSettings::default()
    };
    for rule in &lossy.tensor_bits {
        settings
            .rules
            .push_parsed(rule, CodebookChoice::parse)
            .context("--tensor-bits")?;
    }
    settings.validate().context("--tensor-bits")?;
    Ok((LossySettings::default(), settings))
}

#[derive(Args, Debug)]
struct DecompressArgs {
    /// A .nzt file, or a directory holding model.nzt.index.json.
    input: PathBuf,
    /// Output file or directory (default: the input with .safetensors, or the input directory).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Replace outputs that already exist.
    #[arg(short, long)]
    force: bool,
    /// Skip checking block checksums (faster; corruption then shows up only as a stream error).
    #[arg(long)]
    no_verify_checksums: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// A .nzt or .safetensors file.
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The .nzt file to check.
    file: PathBuf,
    /// The original safetensors file, to compare bit for bit.
    #[arg(long, value_name = "ORIG")]
    against: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct AnalyzeArgs {
    /// A .safetensors file.
    file: PathBuf,
    /// Also list every tensor.
    #[arg(long)]
    tensors: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Elements per block assumed for the prediction.
    #[arg(long, default_value_t = neuzip::format::DEFAULT_FLOAT_BLOCK_ELEMENTS, value_name = "N")]
    block_elements: u32,
    /// Lossy sweep: the exact .nzt size and the error (SQNR, relative Frobenius, max abs and max rel error)
    /// for each K from 0 up, then lossless, without writing anything. --tensor-bits rules and the
    /// normalization flags apply; --mantissa-bits, if given, is the largest K visited. With --codebook-bits R
    /// it is a codebook sweep instead: each whole rate from 2 below R, then R (with --fixed-rate,
    /// --group-size, --row-clusters), and the codebook tensors' own size and error beside two reference
    /// quantizers on the same tensors, all metadata counted: RTN-g128 with clipping at each whole rate and
    /// NF4 with blocks of 64 (with --json: {"points": [...], "baselines": [...]}).
    #[arg(long)]
    sweep: bool,
    #[command(flatten)]
    lossy: LossyArgs,
    #[command(flatten)]
    codebook: CodebookArgs,
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("could not start the thread pool")?;
    }
    let quiet = cli.quiet;
    match cli.command {
        Command::Convert(args) => convert_cmd(args, quiet),
        Command::Decompress(args) => decompress_cmd(args, quiet),
        Command::Inspect(args) => inspect_cmd(args),
        Command::Verify(args) => verify_cmd(args, quiet),
        Command::Analyze(args) => analyze_cmd(args, quiet),
        Command::Bench(args) => bench_cmd(args, cli.threads),
    }
}

/// A byte-count progress bar on stderr, hidden when stderr is not a terminal or with --quiet.
fn progress_bar(total: u64, label: &str, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

fn with_extension(path: &Path, ext: &str) -> PathBuf {
    let mut out = path.to_path_buf();
    out.set_extension(ext);
    out
}

fn convert_one(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    quiet: bool,
) -> Result<(OutputFile, ConvertSummary)> {
    let mut size = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0) * PROGRESS_PASSES;
    if opts.target_bits_per_weight.is_some() {
        // One dry conversion per candidate K, then the conversion itself.
        if let Ok(source) = SafetensorsFile::open(input) {
            size *= 1 + neuzip::allocate::candidate_settings(&source, opts).len() as u64;
        }
    }
    let bar = progress_bar(size, &format!("convert {}", input.display()), quiet);
    let converted = convert_uncommitted(input, output, opts, &|n| bar.inc(n))
        .with_context(|| format!("converting {} to {}", input.display(), output.display()))?;
    bar.finish_and_clear();
    Ok(converted)
}

/// "K=2: 1 tensor (11.7 M weights), K=4: 24 tensors (...), ...; 6.55 bits/weight (target 6.6)", or at a fixed
/// K, "groups of 48: 30 tensors (...), no normalization: 1 tensor (...)".
fn allocation_line(a: &neuzip::allocate::Allocation) -> String {
    let fixed_k = a.fixed_mantissa_bits.is_some();
    // Lossless last; the smallest groups first, no normalization last.
    let key = |c: &neuzip::allocate::TensorChoice| match fixed_k {
        true => (0, c.norm_block.wrapping_sub(1)),
        false => (c.mantissa_bits.map_or(u32::MAX, |k| k), 0),
    };
    let mut groups: BTreeMap<(u32, u32), (String, usize, u64)> = BTreeMap::new();
    for c in &a.choices {
        let label = match (fixed_k, c.mantissa_bits, c.norm_block) {
            (true, _, 0) => "no normalization".to_string(),
            (true, _, b) => format!("groups of {b}"),
            (false, None, _) => "lossless".to_string(),
            (false, Some(k), _) => format!("K={k}"),
        };
        let g = groups.entry(key(c)).or_insert((label, 0, 0));
        g.1 += 1;
        g.2 += c.elements;
    }
    let parts: Vec<String> = groups
        .into_values()
        .map(|(label, n, weights)| {
            format!(
                "{label}: {n} tensor{} ({:.2} M weights)",
                if n == 1 { "" } else { "s" },
                weights as f64 / 1e6
            )
        })
        .collect();
    format!(
        "{} chosen for {:.2} bits/weight (target {}): {}",
        match fixed_k {
            true => "normalization groups",
            false => "mantissa bits",
        },
        a.predicted_bits_per_weight,
        a.target_bits_per_weight,
        parts.join(", ")
    )
}

fn convert_cmd(args: ConvertArgs, quiet: bool) -> Result<ExitCode> {
    if args.block_elements == 0 || args.block_elements as u64 * 8 > neuzip::format::MAX_BLOCK_BYTES
    {
        bail!(
            "--block-elements must be between 1 and {}",
            neuzip::format::MAX_BLOCK_BYTES / 8
        );
    }
    let (lossy, codebook) = precision_settings(&args.lossy, &args.codebook)?;
    let opts = ConvertOptions {
        float_block_elements: args.block_elements,
        zstd_level: args.zstd_level,
        replace: args.force,
        lossy,
        codebook,
        importance: args.codebook.importance()?,
        target_bits_per_weight: args.target_bits,
        ..ConvertOptions::default()
    };
    if args.codebook.importance.is_some()
        && args.codebook.codebook_bits.is_none()
        && args.lossy.mantissa_bits.is_none()
        && args.lossy.tensor_bits.is_empty()
        && args.target_bits.is_none()
    {
        bail!(
            "--importance weighs a lossy conversion: give --mantissa-bits, --tensor-bits, --target-bits or \
             --codebook-bits"
        );
    }
    if let Some(r) = args.target_bits {
        if !(r.is_finite() && r > 0.0) {
            bail!("--target-bits must be a positive number of bits per weight, not {r}");
        }
        if args.lossy.mantissa_bits.is_some()
            && (args.lossy.norm_block.is_some() || args.lossy.no_norm)
        {
            bail!(
                "--target-bits with --mantissa-bits chooses each tensor's normalization group itself: \
                 leave out --norm-block and --no-norm"
            );
        }
    }
    let started = Instant::now();
    let input = &args.input;
    // Every output is committed only once all are written: a failure leaves none behind.
    let mut pending: Vec<OutputFile> = Vec::new();
    let mut summaries = Vec::new();
    let mut convert = |input: &Path, output: &Path| -> Result<()> {
        let (out, summary) = convert_one(input, output, &opts, quiet)?;
        pending.push(out);
        summaries.push(summary);
        Ok(())
    };
    if input.is_dir() {
        let out_dir = args.output.clone().unwrap_or_else(|| input.clone());
        if !out_dir.is_dir() {
            bail!("output directory {} does not exist", out_dir.display());
        }
        if input.join(SAFETENSORS_INDEX).exists() {
            let (shards, index) = read_shard_index(input)
                .with_context(|| format!("reading the index in {}", input.display()))?;
            for shard in &shards {
                convert(&input.join(shard), &out_dir.join(nzt_name(shard)))?;
            }
            let index_path = out_dir.join(NZT_INDEX);
            let mut out = OutputFile::create(&index_path, args.force, &[])
                .with_context(|| format!("writing {}", index_path.display()))?;
            serde_json::to_writer_pretty(out.file(), &index)?;
            pending.push(out);
        } else if input.join("model.safetensors").exists() {
            let file = input.join("model.safetensors");
            convert(&file, &out_dir.join("model.nzt"))?;
        } else {
            bail!(
                "{} holds neither {SAFETENSORS_INDEX} nor model.safetensors",
                input.display()
            );
        }
    } else {
        let output = args
            .output
            .clone()
            .unwrap_or_else(|| with_extension(input, "nzt"));
        convert(input, &output)?;
    }
    for out in pending {
        let path = out.path().to_path_buf();
        out.commit()
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let rows: Vec<_> = summaries
            .iter()
            .map(|s| {
                serde_json::json!({
                    "input": s.input, "output": s.output, "input_bytes": s.input_bytes,
                    "output_bytes": s.output_bytes, "tensors": s.tensors,
                    "ratio": s.input_bytes as f64 / s.output_bytes.max(1) as f64,
                    "allocation": s.allocation,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "files": rows, "seconds": seconds })
        );
    } else {
        for s in &summaries {
            println!(
                "{} -> {}: {} -> {} ({:.3}x, {} tensors)",
                s.input.display(),
                s.output.display(),
                human_bytes(s.input_bytes),
                human_bytes(s.output_bytes),
                s.input_bytes as f64 / s.output_bytes.max(1) as f64,
                s.tensors
            );
            if let Some(a) = &s.allocation {
                println!("  {}", allocation_line(a));
            }
        }
        if summaries.len() > 1 {
            let (i, o): (u64, u64) = summaries
                .iter()
                .fold((0, 0), |a, s| (a.0 + s.input_bytes, a.1 + s.output_bytes));
            println!(
                "total: {} -> {} ({:.3}x) in {seconds:.2} s",
                human_bytes(i),
                human_bytes(o),
                i as f64 / o.max(1) as f64
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open_nzt(path: &Path, verify_checksums: bool) -> Result<NztFile> {
    Ok(NztFile::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .with_options(DecodeOptions { verify_checksums }))
}

fn decompress_one(
    input: &Path,
    output: &Path,
    force: bool,
    verify_checksums: bool,
    quiet: bool,
) -> Result<()> {
    let file = open_nzt(input, verify_checksums)?;
    let mut out = OutputFile::create(output, force, &[input])
        .with_context(|| format!("writing {}", output.display()))?;
    let total: u64 = file.tensors().iter().map(|t| t.byte_len()).sum();
    let bar = progress_bar(total, &format!("decompress {}", input.display()), quiet);
    {
        let writing = || format!("writing {}", output.display());
        let mut early = EarlyWriteback::new(out.file()).with_context(writing)?;
        let mut writer = BufWriter::with_capacity(1 << 20, &mut early);
        file.write_safetensors(&mut writer, |n| bar.inc(n))
            .with_context(|| format!("decompressing {}", input.display()))?;
        writer.flush().with_context(writing)?;
        drop(writer);
        early.finish().with_context(writing)?;
    }
    out.commit()
        .with_context(|| format!("writing {}", output.display()))?;
    bar.finish_and_clear();
    Ok(())
}

fn decompress_cmd(args: DecompressArgs, quiet: bool) -> Result<ExitCode> {
    let verify = !args.no_verify_checksums;
    let input = &args.input;
    if input.is_dir() {
        let index_path = input.join(NZT_INDEX);
        let text = std::fs::read(&index_path)
            .with_context(|| format!("reading {}", index_path.display()))?;
        let mut index: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("parsing {}", index_path.display()))?;
        let out_dir = args.output.clone().unwrap_or_else(|| input.clone());
        let map = index
            .get_mut("weight_map")
            .and_then(|m| m.as_object_mut())
            .with_context(|| format!("{} has no weight_map", index_path.display()))?;
        let mut shards: Vec<String> = Vec::new();
        for value in map.values_mut() {
            let shard = value
                .as_str()
                .context("weight_map values must be file names")?
                .to_string();
            if shard.contains('/') || shard.contains('\\') {
                bail!(
                    "shard name '{shard}' in {} is not a plain file name",
                    index_path.display()
                );
            }
            let restored =
                shard.strip_suffix(".nzt").unwrap_or(&shard).to_string() + ".safetensors";
            *value = serde_json::Value::String(restored);
            if !shards.contains(&shard) {
                shards.push(shard);
            }
        }
        for shard in &shards {
            let restored = shard.strip_suffix(".nzt").unwrap_or(shard).to_string() + ".safetensors";
            decompress_one(
                &input.join(shard),
                &out_dir.join(restored),
                args.force,
                verify,
                quiet,
            )?;
        }
        let out_index = out_dir.join(SAFETENSORS_INDEX);
        let mut out = OutputFile::create(&out_index, args.force, &[])?;
        serde_json::to_writer_pretty(out.file(), &index)?;
        out.commit()?;
    } else {
        let output = args
            .output
            .clone()
            .unwrap_or_else(|| with_extension(input, "safetensors"));
        decompress_one(input, &output, args.force, verify, quiet)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect_cmd(args: InspectArgs) -> Result<ExitCode> {
    let head = {
        use std::io::Read;
        let mut buf = [0u8; 8];
        let mut f = std::fs::File::open(&args.file)
            .with_context(|| format!("opening {}", args.file.display()))?;
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", args.file.display()))?;
        buf[..n].to_vec()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if head != MAGIC {
        let st = SafetensorsFile::open(&args.file).with_context(|| {
            format!(
                "{} is neither a .nzt nor a safetensors file",
                args.file.display()
            )
        })?;
        if args.json {
            let rows: Vec<_> = st
                .tensors
                .iter()
                .map(|t| serde_json::json!({"name": t.name, "dtype": t.dtype.name(), "shape": t.shape, "bytes": t.end - t.start}))
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::json!({"format": "safetensors", "tensors": rows, "file_bytes": st.file_len()})
            )?;
        } else {
            writeln!(
                out,
                "{:<60} {:>8} {:>18} {:>12}",
                "tensor (safetensors)", "dtype", "shape", "bytes"
            )?;
            for t in &st.tensors {
                writeln!(
                    out,
                    "{:<60} {:>8} {:>18} {:>12}",
                    t.name,
                    t.dtype.name(),
                    format!("{:?}", t.shape),
                    t.end - t.start
                )?;
            }
            writeln!(out, "{} tensors, {} bytes", st.tensors.len(), st.file_len())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let file = open_nzt(&args.file, true)?;
    let r = report(&file);
    if args.json {
        serde_json::to_writer_pretty(&mut out, &r)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<52} {:>5} {:>14} {:>13} {:>11} {:>11} {:>11} {:>7}",
        "tensor", "dtype", "shape", "codec", "blocks t/l/z/r", "original", "stored", "bits/w"
    )?;
    for t in &r.tensors {
        // Lossy tensors show K and their normalization group: "lossy K3 g48", "lossy K3 -".
        let codec = match (t.mantissa_bits, t.norm_block) {
            (Some(k), Some(0)) => format!("{} K{k} -", t.codec),
            (Some(k), Some(b)) => format!("{} K{k} g{b}", t.codec),
            _ => t.codec.clone(),
        };
        writeln!(
            out,
            "{:<52} {:>5} {:>14} {:>13} {:>11} {:>11} {:>11} {:>7.3}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            codec,
            format!(
                "{}/{}/{}/{}",
                t.blocks[2] + t.blocks[4] + t.blocks[5],
                t.blocks[3],
                t.blocks[1],
                t.blocks[0]
            ),
            t.original_bytes,
            t.stored_bytes,
            t.bits_per_weight
        )?;
    }
    writeln!(
        out,
        "total: {} tensors, {} weights, {} -> {} ({:.3}x), {:.4} bits/weight for the whole file, {:.4} for the block payloads alone, format {}",
        r.tensors.len(),
        r.elements,
        human_bytes(r.original_bytes),
        human_bytes(r.file_bytes),
        r.ratio,
        r.bits_per_weight,
        r.payload_bits_per_weight,
        r.version
    )?;
    Ok(ExitCode::SUCCESS)
}

fn verify_cmd(args: VerifyArgs, quiet: bool) -> Result<ExitCode> {
    let file = open_nzt(&args.file, true)?;
    let original = match &args.against {
        Some(p) => {
            Some(SafetensorsFile::open(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let total: u64 = file.tensors().iter().map(|t| t.byte_len()).sum();
    let bar = progress_bar(total, &format!("verify {}", args.file.display()), quiet);
    let result = verify(&file, original.as_ref(), |n| bar.inc(n))
        .with_context(|| format!("verifying {}", args.file.display()))?;
    bar.finish_and_clear();
    let against = args
        .against
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else if result.lossy {
        print_lossy_verify(&result, &against)?;
    } else {
        for t in result.tensors.iter().filter(|t| t.identical == Some(false)) {
            println!(
                "MISMATCH {}: {} elements differ",
                t.name, t.mismatched_elements
            );
        }
        if result.header_identical == Some(false) {
            println!("MISMATCH: the safetensors header differs from the original");
        }
        match result.all_identical {
            None => println!(
                "OK: {} tensors, {} decoded, every checksum and stream end verified",
                result.tensors.len(),
                human_bytes(result.decoded_bytes)
            ),
            Some(true) => println!(
                "OK: {} tensors, {} decoded, bit-exact against {against}",
                result.tensors.len(),
                human_bytes(result.decoded_bytes),
            ),
            Some(false) => {}
        }
    }
    if result.passed == Some(false) {
        if result.lossy {
            bail!(
                "{} does not match {against} within the lossy error bound",
                args.file.display()
            );
        }
        bail!("{} does not match {against}", args.file.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `verify` of a file with lossy tensors: per tensor and overall error, then the verdict.
fn print_lossy_verify(result: &neuzip::verify::VerifyReport, against: &str) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let sqnr = |e: &neuzip::verify::ErrorReport| {
        e.sqnr_db
            .map_or("exact".to_string(), |db| format!("{db:.2}"))
    };
    if result.error.is_some() {
        writeln!(
            out,
            "{:<52} {:>11} {:>7} {:>9} {:>10} {:>10} {:>10} {:>6}",
            "tensor", "codec", "bits/w", "SQNR dB", "rel frob", "max abs", "max rel", "check"
        )?;
    }
    for t in &result.tensors {
        let Some(e) = &t.error else {
            if t.identical == Some(false) {
                writeln!(
                    out,
                    "MISMATCH {}: {} elements differ",
                    t.name, t.mismatched_elements
                )?;
            }
            continue;
        };
        let check = match (t.within_bound, t.identical) {
            (Some(true), _) if t.codec == "codebook" => "finite",
            (Some(true), _) => "bound",
            (None, Some(true)) => "exact",
            _ => "FAIL",
        };
        writeln!(
            out,
            "{:<52} {:>11} {:>7.3} {:>9} {:>10.3e} {:>10.3e} {:>10.3e} {:>6}",
            t.name,
            t.codec,
            t.bits_per_weight,
            sqnr(e),
            e.relative_frobenius,
            e.max_abs_error,
            e.max_rel_error,
            check
        )?;
    }
    if result.header_identical == Some(false) {
        writeln!(
            out,
            "MISMATCH: the safetensors header differs from the original"
        )?;
    }
    match (&result.error, result.passed) {
        (Some(e), Some(passed)) => writeln!(
            out,
            "{}: {} tensors, {:.4} bits/weight for the whole file; float tensors together: SQNR {} dB, \
             relative Frobenius error {:.4e}, max abs error {:.4e}, max rel error {:.4e}; lossy tensors \
             {} the error bound (codebook tensors: finite), lossless tensors {} against {against}",
            if passed { "OK" } else { "FAILED" },
            result.tensors.len(),
            result.bits_per_weight,
            sqnr(e),
            e.relative_frobenius,
            e.max_abs_error,
            e.max_rel_error,
            if passed { "within" } else { "not all within" },
            if passed { "bit-exact" } else { "checked" },
        )?,
        _ => writeln!(
            out,
            "OK: {} tensors (lossy), {} decoded, {:.4} bits/weight, every checksum and stream end verified",
            result.tensors.len(),
            human_bytes(result.decoded_bytes),
            result.bits_per_weight
        )?,
    }
    Ok(())
}

fn analyze_cmd(args: AnalyzeArgs, quiet: bool) -> Result<ExitCode> {
    let source = SafetensorsFile::open(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let (lossy, codebook) = precision_settings(&args.lossy, &args.codebook)?;
    let opts = ConvertOptions {
        float_block_elements: args.block_elements.max(1),
        lossy,
        codebook,
        importance: args.codebook.importance()?,
        ..ConvertOptions::default()
    };
    if args.sweep {
        return sweep_cmd(&args, &source, &opts, quiet);
    }
    neuzip::convert::check_settings(&source, &opts)?;
    let bar = progress_bar(
        source.file_len() * PROGRESS_PASSES,
        &format!("analyze {}", args.file.display()),
        quiet,
    );
    let a = analyze(&source, &opts, &|n| bar.inc(n))
        .with_context(|| format!("analyzing {}", args.file.display()))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&a)?);
        return Ok(ExitCode::SUCCESS);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for d in &a.dtypes {
        writeln!(
            out,
            "{}: {} weights, exponent entropy {:.3} bits, codec bound {:.4} bits/weight",
            d.dtype, d.elements, d.exponent_entropy, d.bound_bits_per_weight
        )?;
        let max = d.exponent_histogram.values().copied().max().unwrap_or(1);
        for (e, c) in &d.exponent_histogram {
            let share = *c as f64 / d.elements.max(1) as f64;
            if share < 1e-4 {
                continue;
            }
            let bar = "#".repeat(((*c as f64 / max as f64) * 40.0).ceil() as usize);
            writeln!(
                out,
                "  exponent {e:>4}  {share:>7.3}%  {bar}",
                share = 100.0 * share
            )?;
        }
        let rare = d
            .exponent_histogram
            .values()
            .filter(|&&c| (c as f64) < 1e-4 * d.elements as f64)
            .count();
        if rare > 0 {
            writeln!(out, "  ({rare} more exponent values, each under 0.01%)")?;
        }
    }
    if args.tensors {
        writeln!(
            out,
            "{:<52} {:>5} {:>12} {:>14} {:>8} {:>9}",
            "tensor", "dtype", "weights", "layout", "bound", "predicted"
        )?;
        for t in &a.tensors {
            writeln!(
                out,
                "{:<52} {:>5} {:>12} {:>14} {:>8.3} {:>9.3}",
                t.name,
                t.dtype,
                t.elements,
                t.layout,
                t.bound_bits_per_weight,
                t.coded_bits_per_weight
            )?;
        }
    }
    writeln!(
        out,
        "total: {} weights, {} in; bound {:.4} bits/weight (zero-order, per-block choice, tables excluded); block payloads {:.4}; whole .nzt {} = {:.4} bits/weight ({:.3}x)",
        a.elements,
        human_bytes(a.input_bytes),
        a.bound_bits_per_weight,
        a.predicted_payload_bits_per_weight,
        human_bytes(a.predicted_bytes),
        a.predicted_bits_per_weight,
        a.input_bytes as f64 / a.predicted_bytes.max(1) as f64
    )?;
    Ok(ExitCode::SUCCESS)
}

fn sweep_cmd(
    args: &AnalyzeArgs,
    source: &SafetensorsFile,
    opts: &ConvertOptions,
    quiet: bool,
) -> Result<ExitCode> {
    let codebook = args.codebook.codebook_bits.is_some();
    let mut bits: Vec<f64> = neuzip::analyze::default_sweep_bits(source)
        .into_iter()
        .map(f64::from)
        .collect();
    if let Some(max) = args.lossy.mantissa_bits {
        bits = (0..=max).map(f64::from).collect();
    }
    if let Some(max) = args.codebook.codebook_bits {
        bits = neuzip::analyze::codebook_sweep_rates(max);
    }
    let bar = progress_bar(
        source.file_len() * PROGRESS_PASSES * (bits.len() as u64 + 1),
        &format!("sweep {}", args.file.display()),
        quiet,
    );
    let points = neuzip::analyze::sweep(source, opts, &bits, &|n| bar.inc(n))
        .with_context(|| format!("analyzing {}", args.file.display()))?;
    bar.finish_and_clear();
    // Baselines at each whole rate swept, on the same tensors.
    let baselines = if codebook {
        let whole: Vec<u32> = bits
            .iter()
            .filter(|b| b.fract() == 0.0)
            .map(|&b| b as u32)
            .collect();
        neuzip::analyze::baselines(source, opts, &whole)
            .with_context(|| format!("baselines on {}", args.file.display()))?
    } else {
        Vec::new()
    };
    if args.json {
        if codebook {
            let out = serde_json::json!({ "points": points, "baselines": baselines });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&points)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if codebook {
        writeln!(
            out,
            "{}: codebook sweep ({}), groups of {}, {} row clusters; 1-D tensors and *embeddings* lossless \
             unless a --tensor-bits rule says otherwise",
            args.file.display(),
            match opts.codebook.mode {
                CodebookMode::RateTarget => "R bits/weight per tensor at most",
                CodebookMode::FixedRate => "fixed rate, 2^R codewords",
            },
            opts.codebook.group_size,
            opts.codebook.row_clusters
        )?;
    } else {
        writeln!(
            out,
            "{}: lossy sweep, normalization {}; 1-D tensors lossless unless a --tensor-bits rule says otherwise",
            args.file.display(),
            match opts.lossy.norm_block {
                0 => "off".to_string(),
                b => format!("every {b} elements"),
            }
        )?;
    }
    writeln!(
        out,
        "{:>8} {:>12} {:>8} {:>9} {:>10} {:>10} {:>10}",
        if codebook { "R" } else { "K" },
        "bytes",
        "bits/w",
        "SQNR dB",
        "rel frob",
        "max abs",
        "max rel"
    )?;
    let db = |r: &neuzip::verify::ErrorReport| {
        r.sqnr_db
            .map_or("exact".to_string(), |db| format!("{db:.2}"))
    };
    for p in &points {
        writeln!(
            out,
            "{:>8} {:>12} {:>8.4} {:>9} {:>10.3e} {:>10.3e} {:>10.3e}",
            p.mantissa_bits
                .map(f64::from)
                .or(p.codebook_bits)
                .map_or("lossless".to_string(), |k| k.to_string()),
            p.predicted_bytes,
            p.bits_per_weight,
            db(&p.error),
            p.error.relative_frobenius,
            p.error.max_abs_error,
            p.error.max_rel_error
        )?;
    }
    if codebook {
        let quantized = points.iter().find_map(|p| p.codebook.as_ref());
        let (tensors, weights) = quantized.map_or((0, 0), |c| (c.tensors, c.weights));
        writeln!(
            out,
            "\nThe {tensors} codebook tensors alone ({weights} weights), all metadata counted, beside the \
             baselines (comparison only) on the same tensors; fixed-len b/w is the same fits with B-bit indices \
             and no entropy coding:"
        )?;
        writeln!(
            out,
            "{:<20} {:>8} {:>9} {:>10} {:>14}",
            "method", "bits/w", "SQNR dB", "rel frob", "fixed-len b/w"
        )?;
        for p in &points {
            if let (Some(r), Some(c)) = (p.codebook_bits, &p.codebook) {
                writeln!(
                    out,
                    "{:<20} {:>8.4} {:>9} {:>10.3e} {:>14.4}",
                    format!("codebook R={r}"),
                    c.bits_per_weight,
                    db(&c.error),
                    c.error.relative_frobenius,
                    c.fixed_length_bits_per_weight
                )?;
            }
        }
        for b in &baselines {
            let name = match b.method.as_str() {
                "rtn-g128-clip" => format!("rtn{}-g128-clip", b.bits),
                other => other.to_string(),
            };
            writeln!(
                out,
                "{:<20} {:>8.4} {:>9} {:>10.3e}",
                name,
                b.bits_per_weight,
                db(&b.error),
                b.error.relative_frobenius
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_cmd(args: BenchArgs, threads: Option<usize>) -> Result<ExitCode> {
    if args.gpu {
        return bench_gpu_cmd(args);
    }
    let source = SafetensorsFile::open(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let nzt_path = dir.path().join("bench.nzt");
    let opts = ConvertOptions::default();
    let (out, converted) = convert_uncommitted(&args.file, &nzt_path, &opts, &|_| {})?;
    out.commit()?;
    let nzt = open_nzt(&nzt_path, true)?;
    let all =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let counts: Vec<usize> = if all > 1 { vec![1, all] } else { vec![1] };
    let report = neuzip::bench::bench(&source, &nzt, &converted, &opts, &counts, args.runs.max(1))
        .with_context(|| format!("benchmarking {}", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let fmt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    println!(
        "{}: {} of tensors, {} weights, median of {} runs",
        report.file,
        human_bytes(report.tensor_bytes),
        report.elements,
        report.runs
    );
    println!(
        "{:<26} {:>7} {:>7} {:>9} {:>12} {:>12}",
        "", "threads", "ratio", "bits/w", "encode GB/s", "decode GB/s"
    );
    for r in &report.rows {
        println!(
            "{:<26} {:>7} {:>7} {:>9} {:>12} {:>12}",
            r.name,
            r.threads,
            fmt(r.ratio, 3),
            fmt(r.bits_per_weight, 4),
            fmt(r.encode_gbps, 3),
            fmt(r.decode_gbps, 3)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_gpu_cmd(args: BenchArgs) -> Result<ExitCode> {
    if !neuzip::gpu::enabled() {
        return Err(neuzip::NzError::NoCudaSupport).context("bench --gpu");
    }
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let is_nzt = std::fs::File::open(&args.file)
        .and_then(|mut f| {
            let mut magic = [0u8; 8];
            std::io::Read::read_exact(&mut f, &mut magic).map(|_| magic == MAGIC)
        })
        .unwrap_or(false);
    let nzt_path = if is_nzt {
        args.file.clone()
    } else {
        let nzt_path = dir.path().join("bench.nzt");
        let (out, _) =
            convert_uncommitted(&args.file, &nzt_path, &ConvertOptions::default(), &|_| {})?;
        out.commit()?;
        nzt_path
    };
    let report = neuzip::gpu::bench_gpu(&nzt_path, args.device, args.runs.max(1))
        .with_context(|| format!("GPU benchmark of {}", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let m = &report.memory;
    println!(
        "{} on {}: {} dense, {} compressed on the device (+{} of tables), median of {} runs",
        args.file.display(),
        report.device,
        human_bytes(m.dense_bytes),
        human_bytes(m.compressed_bytes),
        human_bytes(m.metadata_bytes),
        report.runs
    );
    println!(
        "{:<40} {:>12} {:>14} {:>18} {:>9}",
        "", "decode GB/s", "D2D copy GB/s", "bound (copy/1.66)", "of bound"
    );
    let largest = format!(
        "largest: {} ({})",
        report.largest,
        human_bytes(report.largest_bytes)
    );
    for (label, decode, copy) in [
        (
            "all tensors".to_string(),
            report.decode_gbps,
            report.copy_gbps,
        ),
        (
            largest,
            report.largest_decode_gbps,
            report.largest_copy_gbps,
        ),
    ] {
        let bound = neuzip::gpu::GpuBenchReport::memory_bound_gbps(copy);
        println!(
            "{label:<40} {decode:>12.1} {copy:>14.1} {bound:>18.1} {:>8.0}%",
            100.0 * decode / bound
        );
    }
    Ok(ExitCode::SUCCESS)
}
