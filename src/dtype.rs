//! Element types: the `.nzt` numeric ids, bit widths and safetensors names, in one table.

use crate::error::NzError;

macro_rules! dtypes {
    ($($variant:ident = $id:literal, $bits:literal, $name:literal;)*) => {
        /// A tensor element type. The numbers are the `.nzt` dtype ids and are never reused.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[repr(u8)]
        pub enum Dtype { $($variant = $id,)* }

        impl Dtype {
            pub const ALL: &'static [Dtype] = &[$(Dtype::$variant,)*];

            /// Bits per element.
            pub fn bits(self) -> u32 { match self { $(Dtype::$variant => $bits,)* } }

            /// The name safetensors uses in its JSON header.
            pub fn name(self) -> &'static str { match self { $(Dtype::$variant => $name,)* } }

            /// The dtype with this `.nzt` id.
            pub fn from_id(id: u8) -> Result<Self, NzError> {
                match id {
                    $($id => Ok(Dtype::$variant),)*
                    _ => Err(NzError::UnknownDtype { what: format!("id {id}") }),
                }
            }

            /// The dtype with this safetensors name.
            pub fn from_name(name: &str) -> Result<Self, NzError> {
                match name {
                    $($name => Ok(Dtype::$variant),)*
                    _ => Err(NzError::UnknownDtype { what: format!("'{name}'") }),
                }
            }
        }
    };
}

dtypes! {
    BOOL = 0, 8, "BOOL";
    U8 = 1, 8, "U8";
    I8 = 2, 8, "I8";
    I16 = 3, 16, "I16";
    U16 = 4, 16, "U16";
    I32 = 5, 32, "I32";
    U32 = 6, 32, "U32";
    I64 = 7, 64, "I64";
    U64 = 8, 64, "U64";
    F16 = 9, 16, "F16";
    BF16 = 10, 16, "BF16";
    F32 = 11, 32, "F32";
    F64 = 12, 64, "F64";
    F8_E5M2 = 13, 8, "F8_E5M2";
    F8_E4M3 = 14, 8, "F8_E4M3";
    F8_E8M0 = 15, 8, "F8_E8M0";
    F4 = 16, 4, "F4";
    F6_E2M3 = 17, 6, "F6_E2M3";
    F6_E3M2 = 18, 6, "F6_E3M2";
    C64 = 19, 64, "C64";
}

impl Dtype {
    pub fn id(self) -> u8 {
        self as u8
    }

    /// Whether the float_split codec applies: a sign, an exponent and a mantissa in a whole number of bytes.
    pub fn is_splittable_float(self) -> bool {
        matches!(
            self,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8_E5M2 | Dtype::F8_E4M3
        )
    }

    /// Bytes per element, for whole-byte types.
    pub fn byte_width(self) -> Option<usize> {
        let bits = self.bits();
        bits.is_multiple_of(8).then_some(bits as usize / 8)
    }

    /// Exponent width in bits, for the float types (used by `analyze`).
    pub fn exponent_bits(self) -> Option<u32> {
        match self {
            Dtype::F16 => Some(5),
            Dtype::BF16 | Dtype::F32 => Some(8),
            Dtype::F64 => Some(11),
            Dtype::F8_E5M2 => Some(5),
            Dtype::F8_E4M3 => Some(4),
            _ => None,
        }
    }

    /// Byte length of `elements` elements, or None on overflow or a partial byte.
    pub fn byte_len(self, elements: u64) -> Option<u64> {
        let bits = elements.checked_mul(self.bits() as u64)?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for &d in Dtype::ALL {
            assert_eq!(Dtype::from_id(d.id()).unwrap(), d);
            assert_eq!(Dtype::from_name(d.name()).unwrap(), d);
        }
        assert!(Dtype::from_id(200).is_err());
        assert!(Dtype::from_name("F128").is_err());
    }
}
