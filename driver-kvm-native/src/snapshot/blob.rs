//! A KVM state structure as it is in memory, kept in the state file as a hex string. Reading
//! one back demands exactly the structure's size: the file is untrusted input, and a blob of
//! another length means another KVM ABI or a damaged file, never something to pad or cut.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    /// The bytes of `value`.
    pub fn of<T: IntoBytes + Immutable>(value: &T) -> Self {
        Blob(value.as_bytes().to_vec())
    }

    /// The `T` these bytes hold; `what` names it in the error.
    pub fn to<T: FromBytes>(&self, what: &str) -> Result<T, String> {
        T::read_from_bytes(&self.0).map_err(|_| {
            format!(
                "{what}: {} bytes in the state file, expected {}",
                self.0.len(),
                std::mem::size_of::<T>()
            )
        })
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut hex = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s.serialize_str(&hex)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(d)?;
        if !hex.len().is_multiple_of(2) {
            return Err(serde::de::Error::custom("odd-length hex blob"));
        }
        hex.as_bytes()
            .chunks(2)
            .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
            .collect::<Option<Vec<u8>>>()
            .map(Blob)
            .ok_or_else(|| serde::de::Error::custom("a blob that is not lower-case hex"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_lapic_state, kvm_regs};

    #[test]
    fn round_trips_through_hex() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0x10_0000,
            rflags: 2,
            ..Default::default()
        };
        let json = serde_json::to_string(&Blob::of(&regs)).unwrap();
        assert!(json.starts_with("\"8877665544332211"), "{json}");
        let back: Blob = serde_json::from_str(&json).unwrap();
        let regs2: kvm_regs = back.to("registers").unwrap();
        assert_eq!(
            (regs2.rax, regs2.rip, regs2.rflags),
            (regs.rax, regs.rip, 2)
        );
    }

    #[test]
    fn a_wrong_length_or_bad_hex_is_refused() {
        let short = Blob(vec![0; 10]);
        let e = short
            .to::<kvm_lapic_state>("vCPU 0 local APIC")
            .unwrap_err();
        assert_eq!(
            e,
            "vCPU 0 local APIC: 10 bytes in the state file, expected 1024"
        );
        assert!(serde_json::from_str::<Blob>("\"abc\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"zz\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"AB\"").is_err());
        assert_eq!(serde_json::from_str::<Blob>("\"\"").unwrap(), Blob(vec![]));
    }
}
