//! The `neuzip` command: parse arguments, run, print errors once with their context chain.

use std::io::ErrorKind;
use std::process::ExitCode;

mod cli;

/// mimalloc keeps freed pages for reuse, where glibc's malloc hands large blocks back to the system and the
/// encoder then faults them in again for each block (about 7% of one-thread encode time on MiniLM).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (e.g. `neuzip inspect | head`) is not an error worth a message.
            let broken_pipe = err.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == ErrorKind::BrokenPipe)
            });
            if !broken_pipe {
                eprintln!("neuzip: error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}
