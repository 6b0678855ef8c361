//! Plans and encodes every tensor of a safetensors file again and again (output discarded; one thread unless
//! told otherwise) and prints the median time of the plan pass and of the encode pass: a steady loop for
//! profilers and for A/B runs of the encode path, with the fastest round, which noisy machines disturb least.
//!
//!     cargo run --release --example encode_loop -- model.safetensors [ROUNDS=9] [THREADS=1]
use neuzip::convert::{encode_blocks, plan_all, Bounds, ConvertOptions};
use std::time::Instant;

/// The allocator of the `neuzip` command, so that the loop times what it runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: encode_loop FILE.safetensors [ROUNDS] [THREADS]");
        std::process::exit(2);
    };
    let source = neuzip::source::SafetensorsFile::open(std::path::Path::new(path)).expect("opens");
    let rounds: usize = args.get(2).map_or(9, |s| s.parse().expect("ROUNDS"));
    let threads: usize = args.get(3).map_or(1, |s| s.parse().expect("THREADS"));
    let opts = ConvertOptions::default();
    let bytes: u64 = source.tensors.iter().map(|t| t.end - t.start).sum();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let (mut plan_s, mut encode_s) = (Vec::new(), Vec::new());
    pool.install(|| {
        for _ in 0..rounds {
            let start = Instant::now();
            let plans = plan_all(&source, &opts, &|_| {});
            plan_s.push(start.elapsed().as_secs_f64());
            let start = Instant::now();
            encode_blocks(&source, &plans, &opts, Bounds::Skip, &|_| {}, |_, _, _| {
                Ok(())
            })
            .expect("encodes");
            encode_s.push(start.elapsed().as_secs_f64());
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let together: Vec<f64> = plan_s.iter().zip(&encode_s).map(|(p, e)| p + e).collect();
    let fastest = together.iter().copied().fold(f64::INFINITY, f64::min);
    let (plan, encode) = (median(&mut plan_s), median(&mut encode_s));
    println!(
        "plan {:.1} ms, encode {:.1} ms, together {:.3} GB/s (fastest round {:.1} ms)",
        plan * 1e3,
        encode * 1e3,
        bytes as f64 / (plan + encode) / 1e9,
        fastest * 1e3
    );
}
