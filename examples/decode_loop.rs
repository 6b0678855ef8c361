//! Decodes every block of a `.nzt` file again and again (`for_each_block`, output discarded) on 1 thread and
//! on N, interleaved, and prints the median throughput of each and their ratio: a steady loop for profilers
//! and for A/B runs of the decode path.
//!
//!     cargo run --release --example decode_loop -- model.nzt [ROUNDS=15] [THREADS=2]
use std::time::Instant;

/// The allocator of the `neuzip` command, so that the loop times what it runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: decode_loop FILE.nzt [ROUNDS] [THREADS]");
        std::process::exit(2);
    };
    let file = neuzip::NztFile::open(std::path::Path::new(path)).expect("opens");
    let rounds: usize = args.get(2).map_or(15, |s| s.parse().expect("ROUNDS"));
    let threads: usize = args.get(3).map_or(2, |s| s.parse().expect("THREADS"));
    let bytes: u64 = file.tensors().iter().map(|t| t.byte_len()).sum();
    let pools: Vec<rayon::ThreadPool> = [1, threads]
        .iter()
        .map(|&n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .expect("pool")
        })
        .collect();
    let mut rates = [Vec::new(), Vec::new()];
    // Runs of three per pool, alternating, so that each pool's threads are awake for most of its runs.
    for _ in 0..rounds.div_ceil(3) {
        for (pool, rate) in pools.iter().zip(&mut rates) {
            for _ in 0..3 {
                let start = Instant::now();
                pool.install(|| file.for_each_block(|_, _, _| Ok(())))
                    .expect("decodes");
                rate.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (one, many) = (median(&mut rates[0]), median(&mut rates[1]));
    println!(
        "1 thread {one:.3} GB/s, {threads} threads {many:.3} GB/s, ratio {:.2}",
        many / one
    );
}
