//! Micro-benchmark of the block codec on one tensor's worth of bf16 weights: single-field rANS decode with each
//! kernel the CPU has, whole-block split decode and encode, and a memcpy of the same bytes measured in the same
//! run as the reference. Figures are GB/s of decoded bf16 bytes, medians of several runs.
//!
//!   cargo bench --bench decode_kernels [-- PATH.safetensors [TENSOR]]
//!
//! Without a path it uses Gaussian bf16 weights (seeded). Under `cargo test` it runs once on a small input.
//! Times are this thread's CPU time (set NEUZIP_BENCH_WALL=1 for wall time): on a busy shared machine that
//! still compares kernels fairly; `neuzip bench` gives the wall-clock figures.

use neuzip::codec::freq::{histogram, FreqTable, PackedTable};
use neuzip::codec::rans::{self, FieldSymbols};
use neuzip::codec::simd::Kernel;
use neuzip::codec::split::{block_field_counts, encode_block, plan, FieldStats, SplitDecoder};
use neuzip::dtype::Dtype;
use std::hint::black_box;
use std::time::Instant;

/// Seconds of CPU time this thread has used: unlike wall time, it does not count time other processes on a
/// shared machine took from us, so kernels can be compared while the machine is busy.
fn thread_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn median_gbps(bytes: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let cpu_time = std::env::var_os("NEUZIP_BENCH_WALL").is_none();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let (s, c) = (Instant::now(), thread_seconds());
            f();
            if cpu_time {
                thread_seconds() - c
            } else {
                s.elapsed().as_secs_f64()
            }
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    bytes as f64 / t[t.len() / 2] / 1e9
}

fn gaussian_bf16(n: usize) -> Vec<u8> {
    let mut s = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .flat_map(|_| {
            let (u, v) = (next().max(1e-300), next());
            let g = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.05;
            ((((g as f32).to_bits() + 0x8000) >> 16) as u16).to_le_bytes()
        })
        .collect()
}

fn load(path: &str, tensor: Option<&str>) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    let name = tensor.map(str::to_owned).unwrap_or_else(|| {
        st.tensors()
            .into_iter()
            .filter(|(_, v)| v.dtype() == safetensors::Dtype::BF16)
            .max_by_key(|(_, v)| v.data().len())
            .expect("a bf16 tensor")
            .0
    });
    st.tensor(&name).expect("tensor").data().to_vec()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let benching = std::env::args().any(|a| a == "--bench");
    let data = match args.first() {
        Some(path) => load(path, args.get(1).map(String::as_str)),
        None => gaussian_bf16(if benching { 1 << 22 } else { 1 << 16 }),
    };
    let runs = if benching { 9 } else { 1 };
    let block_elements = 1 << 17;
    let blocks: Vec<&[u8]> = data.chunks(2 * block_elements).collect();
    let stats = FieldStats::gather(Dtype::BF16, &data);
    let params = plan(&stats, blocks.len() as u64)
        .expect("weights compress")
        .params;
    println!(
        "{} bf16 weights in {} blocks, layout {:?}",
        data.len() / 2,
        blocks.len(),
        params.fields
    );

    // Single-field rANS over the top 11 bits (sign, exponent, 2 mantissa bits).
    let symbols: Vec<Vec<u16>> = blocks
        .iter()
        .map(|b| {
            b.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) >> 5)
                .collect()
        })
        .collect();
    let counts = histogram(symbols.iter().flatten().map(|&s| s as u32), 11);
    let table = FreqTable::from_counts(&counts, 11, 12).expect("table");
    let packed = PackedTable::new(&table).expect("packs");
    let encoded: Vec<(rans::Encoded, Vec<u8>)> = symbols
        .iter()
        .map(|s| {
            let e = rans::encode(
                &[FieldSymbols {
                    symbols: s,
                    table: &table,
                }],
                s.len(),
            );
            let bytes = e.words.iter().flat_map(|w| w.to_le_bytes()).collect();
            (e, bytes)
        })
        .collect();
    let mut ranks = vec![0u8; block_elements];
    for &kernel in Kernel::available() {
        let gbps = median_gbps(data.len(), runs, || {
            for ((e, words), s) in encoded.iter().zip(&symbols) {
                rans::decode_ranks_with(kernel, &e.states, words, &packed, &mut ranks[..s.len()])
                    .expect("decodes");
            }
        });
        println!("rans decode, {:<10} kernel {gbps:8.3} GB/s", kernel.name());
    }
    let pair_kernels = [Kernel::Avx512, Kernel::Avx512Loads];
    for kernel in pair_kernels
        .into_iter()
        .filter(|k| Kernel::available().contains(k))
    {
        let mut ranks_b = vec![0u8; block_elements];
        let gbps = median_gbps(data.len(), runs, || {
            for pair in encoded.chunks(2).zip(symbols.chunks(2)) {
                let (enc, sym) = pair;
                if let ([(ea, wa), (eb, wb)], [sa, sb]) = (enc, sym) {
                    let (mut xa, mut xb, mut pa, mut pb) = (ea.states, eb.states, 0, 0);
                    let done = neuzip::codec::simd::decode_steps_pair(
                        kernel,
                        [&mut xa, &mut xb],
                        [&mut pa, &mut pb],
                        [wa, wb],
                        [&packed, &packed],
                        [&mut ranks[..sa.len()], &mut ranks_b[..sb.len()]],
                    );
                    black_box(done);
                }
            }
        });
        println!(
            "rans decode, {} pair (bulk steps of two interleaved blocks) {gbps:8.3} GB/s",
            kernel.name()
        );
    }
    let gbps = median_gbps(data.len(), runs, || {
        for ((e, words), s) in encoded.iter().zip(&symbols) {
            rans::decode_ranks(&e.states, words, &packed, &mut ranks[..s.len()]).expect("decodes");
        }
    });
    println!(
        "rans decode_ranks ({}) {gbps:8.3} GB/s",
        Kernel::selected().name()
    );

    let payloads: Vec<Vec<u8>> = blocks
        .iter()
        .map(|b| encode_block(&params, Dtype::BF16, b))
        .collect();
    let decoder = SplitDecoder::new(params.clone(), Dtype::BF16);
    let mut block_out = vec![0u8; 2 * block_elements];
    let gbps = median_gbps(data.len(), runs, || {
        for (p, b) in payloads.iter().zip(&blocks) {
            decoder
                .decode_block(p, &mut block_out[..b.len()])
                .expect("decodes");
        }
    });
    println!("split decode_block      {gbps:8.3} GB/s");
    for threads in [1, 2] {
        use rayon::prelude::*;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let mut outs: Vec<Vec<u8>> = blocks.iter().map(|b| vec![0u8; b.len()]).collect();
        let start = Instant::now();
        let rounds = runs.max(1);
        pool.install(|| {
            for _ in 0..rounds {
                payloads
                    .par_iter()
                    .zip(outs.par_iter_mut())
                    .for_each(|(p, o)| {
                        decoder.decode_block(p, o).expect("decodes");
                    });
            }
        });
        let gbps = (data.len() * rounds) as f64 / start.elapsed().as_secs_f64() / 1e9;
        println!("split decode_block, {threads} threads, wall {gbps:8.3} GB/s");
    }
    for (p, b) in payloads.iter().zip(&blocks) {
        decoder
            .decode_block(p, &mut block_out[..b.len()])
            .expect("decodes");
        assert_eq!(&block_out[..b.len()], *b, "round trip");
    }
    let gbps = median_gbps(data.len(), runs, || {
        for b in &blocks {
            black_box(encode_block(&params, Dtype::BF16, b));
        }
    });
    println!("split encode_block      {gbps:8.3} GB/s");
    let gbps = median_gbps(data.len(), runs, || {
        for b in &blocks {
            black_box(block_field_counts(&params.fields, Dtype::BF16, b));
        }
    });
    println!("block_field_counts (each block, every field) {gbps:8.3} GB/s");
    if let Ok(nzt_path) = std::env::var("NEUZIP_BENCH_NZT") {
        let file = neuzip::NztFile::open(std::path::Path::new(&nzt_path)).expect("open .nzt");
        let total: usize = file.tensors().iter().map(|t| t.byte_len() as usize).sum();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let start = Instant::now();
            let rounds = runs.max(1);
            pool.install(|| {
                for _ in 0..rounds {
                    file.for_each_block(|_, _, _| Ok(())).expect("decodes");
                }
            });
            let gbps = (total * rounds) as f64 / start.elapsed().as_secs_f64() / 1e9;
            println!("NztFile::for_each_block, {threads} threads, wall {gbps:8.3} GB/s");
            let start = Instant::now();
            pool.install(|| {
                for _ in 0..rounds {
                    for (i, t) in file.tensors().iter().enumerate() {
                        let mut out = vec![0u8; t.byte_len() as usize];
                        file.decode_tensor_into(i, &mut out).expect("decodes");
                    }
                }
            });
            let gbps = (total * rounds) as f64 / start.elapsed().as_secs_f64() / 1e9;
            println!("NztFile::decode_tensor_into, {threads} threads, wall {gbps:8.3} GB/s");
        }
    }
    let mut copy = vec![0u8; data.len()];
    let gbps = median_gbps(data.len(), runs, || {
        copy.copy_from_slice(black_box(&data));
        black_box(&copy);
    });
    println!("memcpy                  {gbps:8.3} GB/s");
}
