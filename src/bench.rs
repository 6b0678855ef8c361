//! `neuzip bench`: ratio and throughput of the codec on a file, in the manner of `zstd -b`, with an in-process
//! zstd and a plain memory copy measured in the same run as references. Every figure is the median of several
//! timed runs after a warm-up; throughput is in GB/s of original tensor bytes.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::convert::{encode_blocks, plan_all, Bounds, ConvertOptions, ConvertSummary};
use crate::error::{NzError, Result};
use crate::format::reader::{DecodeOptions, NztFile};
use crate::source::SafetensorsFile;

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// What was measured, e.g. "neuzip", "neuzip (no checksums)", "zstd -3", "memcpy".
    pub name: String,
    pub threads: usize,
    /// Original tensor bytes over stored bytes (None for memcpy).
    pub ratio: Option<f64>,
    pub bits_per_weight: Option<f64>,
    /// GB/s of original bytes (None where the row has no such direction).
    pub encode_gbps: Option<f64>,
    pub decode_gbps: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub file: String,
    pub tensor_bytes: u64,
    pub elements: u64,
    pub runs: usize,
    pub rows: Vec<BenchRow>,
}

/// Median seconds of `runs` timed calls of `f`, after one untimed warm-up.
fn median_seconds(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| NzError::malformed(format!("thread pool: {e}")))?;
    Ok(pool.install(f))
}

/// Benchmarks `source` (a safetensors file) whose conversion `converted` was written to `nzt_path`.
pub fn bench(
    source: &SafetensorsFile,
    nzt: &NztFile,
    converted: &ConvertSummary,
    opts: &ConvertOptions,
    thread_counts: &[usize],
    runs: usize,
) -> Result<BenchReport> {
    let tensor_bytes: u64 = source.tensors.iter().map(|t| t.end - t.start).sum();
    let elements: u64 = nzt
        .tensors()
        .iter()
        .map(|t| t.elements().unwrap_or(0))
        .sum();
    let data: Vec<&[u8]> = source.tensors.iter().map(|t| source.data(t)).collect();
    let gbps = |seconds: f64| tensor_bytes as f64 / seconds / 1e9;
    let ratio = tensor_bytes as f64 / converted.output_bytes.max(1) as f64;
    let bpw = |bytes: u64| 8.0 * bytes as f64 / elements.max(1) as f64;
    let unchecked = NztFile::from_bytes(crate::mmap::Bytes::Owned(
        std::fs::read(&converted.output).map_err(|e| NzError::io(&converted.output, e))?,
    ))?
    .with_options(DecodeOptions {
        verify_checksums: false,
    });
    let chunk = 1usize << 18;
    let mut rows = Vec::new();
    for &threads in thread_counts {
        let (encode, decode, decode_unchecked, zstd_encode, zstd_decode, zstd_bytes, memcpy) =
            in_pool(threads, || {
                let encode = median_seconds(runs, || {
                    let plans = plan_all(source, opts, &|_| {});
                    encode_blocks(
                        source,
                        &plans,
                        opts,
                        Bounds::Skip,
                        &|_| {},
                        |_, _, _| Ok(()),
                    )
                })?;
                let decode = median_seconds(runs, || nzt.for_each_block(|_, _, _| Ok(())))?;
                let decode_unchecked =
                    median_seconds(runs, || unchecked.for_each_block(|_, _, _| Ok(())))?;
                let chunks: Vec<&[u8]> = data.iter().flat_map(|d| d.chunks(chunk)).collect();
                let compress = || -> Result<Vec<Vec<u8>>> {
                    chunks
                        .par_iter()
                        .map(|c| {
                            zstd::bulk::compress(c, 3).map_err(|e| NzError::Zstd {
                                what: "bench".into(),
                                message: e.to_string(),
                            })
                        })
                        .collect()
                };
                let frames = compress()?;
                let zstd_bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
                let zstd_encode = median_seconds(runs, || compress().map(|_| ()))?;
                let zstd_decode = median_seconds(runs, || {
                    frames.par_iter().zip(&chunks).try_for_each(|(f, c)| {
                        zstd::bulk::decompress(f, c.len())
                            .map(|_| ())
                            .map_err(|e| NzError::Zstd {
                                what: "bench".into(),
                                message: e.to_string(),
                            })
                    })
                })?;
                let memcpy = median_seconds(runs, || {
                    chunks.par_iter().for_each(|c| {
                        let copy = c.to_vec();
                        std::hint::black_box(copy);
                    });
                    Ok(())
                })?;
                Ok::<_, NzError>((
                    encode,
                    decode,
                    decode_unchecked,
                    zstd_encode,
                    zstd_decode,
                    zstd_bytes,
                    memcpy,
                ))
            })??;
        rows.push(BenchRow {
            name: "neuzip".into(),
            threads,
            ratio: Some(ratio),
            bits_per_weight: Some(bpw(converted.output_bytes)),
            encode_gbps: Some(gbps(encode)),
            decode_gbps: Some(gbps(decode)),
        });
        rows.push(BenchRow {
            name: "neuzip (no checksums)".into(),
            threads,
            ratio: Some(ratio),
            bits_per_weight: Some(bpw(converted.output_bytes)),
            encode_gbps: None,
            decode_gbps: Some(gbps(decode_unchecked)),
        });
        rows.push(BenchRow {
            name: "zstd -3 (256 KiB chunks)".into(),
            threads,
            ratio: Some(tensor_bytes as f64 / zstd_bytes.max(1) as f64),
            bits_per_weight: Some(bpw(zstd_bytes)),
            encode_gbps: Some(gbps(zstd_encode)),
            decode_gbps: Some(gbps(zstd_decode)),
        });
        rows.push(BenchRow {
            name: "memcpy".into(),
            threads,
            ratio: None,
            bits_per_weight: None,
            encode_gbps: None,
            decode_gbps: Some(gbps(memcpy)),
        });
    }
    Ok(BenchReport {
        file: converted.input.display().to_string(),
        tensor_bytes,
        elements,
        runs,
        rows,
    })
}
