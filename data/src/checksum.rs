//! FNV-1a 64-bit checksum of token-file payloads: cheap, dependency-free corruption detection
//! (not a cryptographic hash; downloads are verified with sha256 in `scripts/fetch-data.sh`).

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_update(OFFSET, bytes)
}

/// Continue an FNV-1a 64 hash `h` over `bytes` (start from [`fnv1a64`]`(b"")`): hashing a stream
/// piece by piece gives the hash of the whole.
pub fn fnv1a64_update(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_fnv1a64_vectors() {
        // Reference values of the FNV-1a 64 test suite (Fowler/Noll/Vo).
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        assert_eq!(fnv1a64_update(fnv1a64(b"foo"), b"bar"), 0x85944171f73967e8);
    }
}
