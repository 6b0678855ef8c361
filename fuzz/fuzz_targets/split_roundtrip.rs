//! The float_split encoder on arbitrary data: plan a tensor, encode each block with the tensor's tables
//! (mode split) and with the block's own choice (mode split_local), and decode both back to the input.
//!
//! Input: `selector u8` (picks one of the six float_split dtypes), `block_elements u16` (0 is read as 1),
//! then the tensor's little-endian elements (a trailing partial element is dropped).
#![no_main]
use libfuzzer_sys::fuzz_target;

use neuzip::codec::split::{
    block_field_counts, choose_block_coding, encode_block, encode_local_block, plan,
    split_local_payload, FieldStats, SplitDecoder, SplitParams,
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
    let Some((head, rest)) = data.split_at_checked(3) else {
        return;
    };
    let dtype = DTYPES[head[0] as usize % DTYPES.len()];
    let block_elements = u16::from_le_bytes([head[1], head[2]]).max(1) as usize;
    let width = dtype.byte_width().unwrap();
    let tensor = &rest[..rest.len() / width * width];
    let n = tensor.len() / width;
    let blocks = n.div_ceil(block_elements);
    let stats = FieldStats::gather(dtype, tensor);
    let Some(plan) = plan(&stats, blocks as u64) else {
        return;
    };
    let params = plan.params;
    assert!(!params.tables.is_empty(), "a plan codes at least one field");
    assert_eq!(
        SplitParams::parse(&params.to_bytes(), dtype).as_ref(),
        Ok(&params),
        "the planned params do not parse back"
    );
    let decoder = SplitDecoder::new(params.clone(), dtype);
    for block in tensor.chunks(block_elements * width) {
        let count = (block.len() / width) as u64;
        let mut out = vec![0u8; block.len()];

        let payload = encode_block(&params, dtype, block);
        decoder
            .decode_block(&payload, &mut out)
            .expect("a split block decodes");
        assert!(out == block, "split block does not round-trip");

        let counts = block_field_counts(&params.fields, dtype, block);
        let choice = choose_block_coding(&params, &counts, count);
        let local = encode_local_block(&choice, dtype, block);
        let (param_bytes, body) = split_local_payload(&local).expect("local payload splits");
        let (local_params, borrowed) = SplitParams::parse_local(param_bytes, dtype, &params)
            .expect("the encoder's local params parse");
        assert_eq!(local_params, choice.params);
        assert_eq!(borrowed, choice.borrowed);
        out.fill(0);
        decoder
            .local(local_params, &borrowed, dtype)
            .decode_block(body, &mut out)
            .expect("a split_local block decodes");
        assert!(out == block, "split_local block does not round-trip");
    }
});
