use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = neuzip::NztFile::open(std::path::Path::new(&args[1])).expect("open");
    let rounds: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(20);
    let total: usize = file.tensors().iter().map(|t| t.byte_len() as usize).sum();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        for _ in 0..rounds {
            let start = Instant::now();
            file.for_each_block(|_, _, _| Ok(())).expect("decodes");
            let s = start.elapsed().as_secs_f64();
            eprintln!("{:.3} GB/s", total as f64 / s / 1e9);
        }
    });
}
