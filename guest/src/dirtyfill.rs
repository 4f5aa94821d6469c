//! Page contents of the `dirty` workload: fill and verify one 4 KiB page
//! with `abi::dirty_word`.

use twinrun_guest_abi::dirty_word;

/// 64-bit words in a page.
pub const WORDS: usize = 512;

/// Writes version `version` of page `page` into `words`.
pub fn fill(words: &mut [u64; WORDS], seed: u64, page: u64, version: u64) {
    for (w, slot) in words.iter_mut().enumerate() {
        *slot = dirty_word(seed, page, version, w as u64);
    }
}

/// A word that does not hold what version `version` put there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub word: u64,
    pub expected: u64,
    pub found: u64,
}

/// Checks the page against version `version`; `read` reads word `w` (the guest reads
/// volatile from RAM, tests from a slice). Reports the first bad word.
pub fn verify(
    mut read: impl FnMut(usize) -> u64,
    seed: u64,
    page: u64,
    version: u64,
) -> Option<Mismatch> {
    for w in 0..WORDS {
        let expected = dirty_word(seed, page, version, w as u64);
        let found = read(w);
        if found != expected {
            return Some(Mismatch {
                word: w as u64,
                expected,
                found,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_verify() {
        let mut p = [0u64; WORDS];
        fill(&mut p, 7, 3, 2);
        assert_eq!(verify(|w| p[w], 7, 3, 2), None);
        // Another version or page does not match.
        assert!(verify(|w| p[w], 7, 3, 1).is_some());
        assert!(verify(|w| p[w], 7, 4, 2).is_some());
        p[17] ^= 1;
        let m = verify(|w| p[w], 7, 3, 2).unwrap();
        assert_eq!(m.word, 17);
        assert_eq!(m.found, m.expected ^ 1);
    }
}
