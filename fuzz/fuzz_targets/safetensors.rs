//! The safetensors reader on arbitrary bytes: `SafetensorsFile::from_bytes` on the whole input and
//! `parse_header_json` on the input and on the header it declares. For a file that opens, every tensor's
//! bytes must lie inside it and have the length its dtype and shape give.
#![no_main]
use libfuzzer_sys::fuzz_target;

use neuzip::mmap::Bytes;
use neuzip::source::{parse_header_json, SafetensorsFile};

fuzz_target!(|data: &[u8]| {
    let _ = parse_header_json(data);
    if let Some(len) = data.get(..8) {
        let len = u64::from_le_bytes(len.try_into().unwrap());
        if let Some(json) = usize::try_from(len)
            .ok()
            .and_then(|n| data.get(8..8usize.checked_add(n)?))
        {
            let _ = parse_header_json(json);
        }
    }
    let Ok(file) = SafetensorsFile::from_bytes(Bytes::Owned(data.to_vec())) else {
        return;
    };
    let _ = file.metadata();
    let header = file.header_json();
    let tensors = parse_header_json(header).expect("from_bytes accepted this header");
    assert_eq!(tensors, file.tensors);
    let mut next = 0;
    for t in &file.tensors {
        assert_eq!(
            t.start, next,
            "'{}' does not start where the previous tensor ends",
            t.name
        );
        next = t.end;
        let elements = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let expected = elements.and_then(|e| t.dtype.byte_len(e));
        assert_eq!(Some(file.data(t).len() as u64), expected, "'{}'", t.name);
    }
    assert_eq!(8 + header.len() as u64 + next, file.file_len());
});
