//! Times the layout search (`split::plan`) over every float tensor of a safetensors file, their statistics
//! gathered once beforehand, and prints the fastest of 15 passes on the calling thread: a steady loop for A/B
//! runs of the planner alone (`encode_loop` times it together with the gather).
//!
//!     cargo run --release --example plan_times -- model.safetensors
use neuzip::codec::split::{plan, FieldStats};
use std::time::Instant;

/// The allocator of the `neuzip` command, so that the loop times what it runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: plan_times FILE.safetensors");
        std::process::exit(2);
    };
    let source = neuzip::source::SafetensorsFile::open(std::path::Path::new(&path)).expect("opens");
    let block_elements = neuzip::convert::ConvertOptions::default().float_block_elements as u64;
    let stats: Vec<(FieldStats, u64)> = source
        .tensors
        .iter()
        .filter(|t| t.dtype.is_splittable_float() && t.elements() > 0)
        .map(|t| {
            let blocks = t.elements().div_ceil(block_elements);
            (FieldStats::gather(t.dtype, source.data(t)), blocks)
        })
        .collect();
    let mut fastest = f64::INFINITY;
    for _ in 0..15 {
        let start = Instant::now();
        for (s, blocks) in &stats {
            std::hint::black_box(plan(s, *blocks));
        }
        fastest = fastest.min(start.elapsed().as_secs_f64());
    }
    println!(
        "layout search over {} tensors: fastest of 15 passes {:.3} ms",
        stats.len(),
        fastest * 1e3
    );
}
