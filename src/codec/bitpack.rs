//! Raw fields: `width`-bit values packed LSB-first, element i at bit `i * width` (format-spec/nzt.md, "split block").

/// Bytes needed for `n` values of `width` bits.
pub fn packed_len(n: usize, width: u32) -> usize {
    (n * width as usize).div_ceil(8)
}

/// Appends `values` (each below `2^width`) packed LSB-first.
pub fn pack(values: impl Iterator<Item = u32>, width: u32, out: &mut Vec<u8>) {
    debug_assert!((1..=32).contains(&width));
    let mut acc = 0u64;
    let mut bits = 0u32;
    for v in values {
        debug_assert!(width == 32 || v < 1 << width);
        acc |= (v as u64) << bits;
        bits += width;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
}

/// `pack` for a slice, eight values per step when they are at most 8 bits wide.
pub fn pack_slice(values: &[u32], width: u32, out: &mut Vec<u8>) {
    if width > 8 {
        return pack(values.iter().copied(), width, out);
    }
    let groups = values.chunks_exact(8);
    let rest = groups.remainder();
    out.reserve(packed_len(values.len(), width));
    for g in groups {
        let bits = g
            .iter()
            .enumerate()
            .fold(0u64, |acc, (k, &v)| acc | (v as u64) << (k as u32 * width));
        out.extend_from_slice(&bits.to_le_bytes()[..width as usize]);
    }
    pack(rest.iter().copied(), width, out);
}

/// Calls `sink(i, value)` for each of the `n` values packed in `bytes`, which must hold `packed_len(n, width)`.
pub fn unpack(bytes: &[u8], width: u32, n: usize, mut sink: impl FnMut(usize, u32)) {
    debug_assert!(bytes.len() >= packed_len(n, width));
    let mask = if width == 32 {
        u32::MAX as u64
    } else {
        (1u64 << width) - 1
    };
    let mut acc = 0u64;
    let mut bits = 0u32;
    let mut next_byte = 0usize;
    for i in 0..n {
        while bits < width {
            acc |= (bytes[next_byte] as u64) << bits;
            next_byte += 1;
            bits += 8;
        }
        sink(i, (acc & mask) as u32);
        acc >>= width;
        bits -= width;
    }
}

/// The packed bits of values `8 * group .. 8 * group + 8` (width at most 8), LSB first; values past the end
/// of `bytes` read as zero.
#[inline]
pub fn group_of_8(bytes: &[u8], width: u32, group: usize) -> u64 {
    debug_assert!(width <= 8);
    let start = group * width as usize;
    match bytes.get(start..start + 8) {
        Some(eight) => u64::from_le_bytes(eight.try_into().expect("8 bytes")),
        None => {
            let mut padded = [0u8; 8];
            let tail = bytes.get(start..).unwrap_or(&[]);
            padded[..tail.len()].copy_from_slice(tail);
            u64::from_le_bytes(padded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_slice_matches_pack() {
        for width in 1..=32u32 {
            for n in [0usize, 1, 7, 8, 9, 64, 1001] {
                let values: Vec<u32> = (0..n as u64)
                    .map(|i| ((i * 0x9e37_79b9 + 12345) % (1u64 << width)) as u32)
                    .collect();
                let (mut a, mut b) = (Vec::new(), Vec::new());
                pack(values.iter().copied(), width, &mut a);
                pack_slice(&values, width, &mut b);
                assert_eq!(a, b, "width {width} n {n}");
            }
        }
    }

    #[test]
    fn round_trips_every_width() {
        for width in 1..=32u32 {
            for n in [0usize, 1, 2, 7, 8, 9, 33, 1001] {
                let mask = if width == 32 {
                    u32::MAX
                } else {
                    (1 << width) - 1
                };
                let values: Vec<u32> = (0..n as u32)
                    .map(|i| i.wrapping_mul(2654435761) & mask)
                    .collect();
                let mut bytes = Vec::new();
                pack(values.iter().copied(), width, &mut bytes);
                assert_eq!(bytes.len(), packed_len(n, width));
                let mut back = vec![0u32; n];
                unpack(&bytes, width, n, |i, v| back[i] = v);
                assert_eq!(back, values, "width {width} n {n}");
            }
        }
    }

    #[test]
    fn layout_is_lsb_first() {
        let mut bytes = Vec::new();
        pack([1u32, 2, 3, 0x3f].into_iter(), 6, &mut bytes);
        // bits: 000001 | 000010 | 000011 | 111111 -> 0b10_000001, 0b0011_0000, 0b111111_00
        assert_eq!(bytes, vec![0b1000_0001, 0b0011_0000, 0b1111_1100]);
    }
}
