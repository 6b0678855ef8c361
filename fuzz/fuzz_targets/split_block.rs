//! Structure-aware fuzzing of the float_split decoder, below the container (no checksums, no header).
//!
//! Input: `selector u8` (low bits pick one of the six float_split dtypes, bit 7 asks for a split_local
//! block), `n u16` (elements in the block), `params_len u16`, the tensor's params (format-spec/nzt.md 12.1),
//! then the block payload: a split payload (13.1), or a split_local payload (13.2) whose block-local params
//! are parsed with `SplitParams::parse_local` against the tensor's params. `fuzz/make_seeds.py` cuts the seeds
//! out of real `.nzt` files.
//!
//! Besides "no panic", the target asserts:
//! - the fast decode path (packed tables, SIMD kernels, paired blocks) gives exactly what the scalar reference
//!   gives: the same error or the same bytes;
//! - params that parse serialize back to the same length and parse to the same value (only padding bits of
//!   the last table byte may differ);
//! - a block that decodes re-encodes to a payload of the same length, with the same rANS states and words
//!   (the decoder of section 14.2 is the exact inverse of the encoder), which decodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

use neuzip::codec::split::{
    encode_block, split_local_payload, LocalChoice, SplitDecoder, SplitParams, RANS_HEADER_BYTES,
};
use neuzip::Dtype;

const DTYPES: [Dtype; 6] = [
    Dtype::F16,
    Dtype::BF16,
    Dtype::F32,
    Dtype::F64,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
];

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_at_checked(5) else {
        return;
    };
    let dtype = DTYPES[(head[0] & 0x7f) as usize % DTYPES.len()];
    let local = head[0] & 0x80 != 0;
    let n = u16::from_le_bytes([head[1], head[2]]) as usize;
    let params_len = u16::from_le_bytes([head[3], head[4]]) as usize;
    let Some((param_bytes, payload)) = rest.split_at_checked(params_len) else {
        return;
    };
    let Ok(params) = SplitParams::parse(param_bytes, dtype) else {
        return;
    };
    check_params_round_trip(&params, param_bytes, dtype);
    let decoder = SplitDecoder::new(params.clone(), dtype);
    let width = dtype.byte_width().unwrap();
    let mut out = vec![0u8; n * width];
    if !local {
        let result = decoder.decode_block(payload, &mut out);
        check_against_reference(&decoder, payload, &out, &result);
        check_pair(&decoder, payload, &out, &result);
        if result.is_ok() {
            check_reencode(&params, dtype, payload, &out);
        }
        return;
    }
    let Ok((local_bytes, body)) = split_local_payload(payload) else {
        return;
    };
    let Ok((local_params, borrowed)) = SplitParams::parse_local(local_bytes, dtype, &params) else {
        return;
    };
    let choice = LocalChoice {
        params: local_params.clone(),
        borrowed: borrowed.clone(),
        bits: 0.0,
    };
    let written = choice.to_bytes();
    assert_eq!(
        written.len(),
        local_bytes.len(),
        "local params change length when rewritten"
    );
    assert_eq!(
        SplitParams::parse_local(&written, dtype, &params),
        Ok((local_params.clone(), borrowed.clone())),
        "rewritten local params parse to something else"
    );
    let local_decoder = decoder.local(local_params.clone(), &borrowed, dtype);
    let result = local_decoder.decode_block(body, &mut out);
    check_against_reference(&local_decoder, body, &out, &result);
    if result.is_ok() {
        check_reencode(&local_params, dtype, body, &out);
    }
});

type DecodeResult = Result<(), neuzip::codec::rans::StreamError>;

/// The scalar reference decoder must agree with the fast path on every input.
fn check_against_reference(decoder: &SplitDecoder, payload: &[u8], fast: &[u8], result: &DecodeResult) {
    let mut reference = vec![0u8; fast.len()];
    let expected = decoder.decode_block_reference(payload, &mut reference);
    assert_eq!(result, &expected, "fast and reference decoders disagree on the verdict");
    if expected.is_ok() {
        assert!(fast == &reference[..], "fast and reference decoders disagree on the bytes");
    }
}

/// The block decoded as the first and as the second of a pair (with itself) gives what it gives alone.
fn check_pair(decoder: &SplitDecoder, payload: &[u8], single: &[u8], result: &DecodeResult) {
    let mut a = vec![0u8; single.len()];
    let mut b = vec![0u8; single.len()];
    let results = decoder.decode_block_pair([payload, payload], [&mut a, &mut b]);
    assert_eq!(results[0], *result, "paired decode (first) disagrees");
    assert_eq!(results[1], *result, "paired decode (second) disagrees");
    if result.is_ok() {
        assert!(a == single && b == single, "paired decode gives other bytes");
    }
}

fn check_params_round_trip(params: &SplitParams, bytes: &[u8], dtype: Dtype) {
    let written = params.to_bytes();
    assert_eq!(
        written.len(),
        bytes.len(),
        "params change length when rewritten"
    );
    assert_eq!(
        SplitParams::parse(&written, dtype).as_ref(),
        Ok(params),
        "rewritten params parse to something else"
    );
}

fn check_reencode(params: &SplitParams, dtype: Dtype, payload: &[u8], decoded: &[u8]) {
    let again = encode_block(params, dtype, decoded);
    assert_eq!(
        again.len(),
        payload.len(),
        "re-encoded payload has another length"
    );
    if params.has_rans() {
        let words = u32::from_le_bytes(
            payload[RANS_HEADER_BYTES - 4..RANS_HEADER_BYTES]
                .try_into()
                .unwrap(),
        );
        let stream = RANS_HEADER_BYTES + 2 * words as usize;
        assert!(
            again[..stream] == payload[..stream],
            "re-encoding gives other rANS states or words"
        );
    }
    let mut out = vec![0u8; decoded.len()];
    SplitDecoder::new(params.clone(), dtype)
        .decode_block(&again, &mut out)
        .expect("a re-encoded block decodes");
    assert!(out == decoded, "re-encoded block decodes to other bytes");
}
