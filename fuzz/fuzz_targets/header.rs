//! The header parser on arbitrary bytes: it must return, Ok or Err, without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = neuzip::format::header::parse(data);
});
