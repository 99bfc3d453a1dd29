//! The byte stream both ends of a bulk transfer agree on.
//!
//! A seeded generator instead of a checksum: the receiver regenerates the stream and compares
//! every byte, so a lost, duplicated or reordered byte is reported with its offset.

/// An endless, seeded, reproducible byte stream.
pub struct Stream {
    rng: fastrand::Rng,
    block: [u8; 8],
    used: usize,
    pub offset: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream { rng: fastrand::Rng::with_seed(seed), block: [0; 8], used: 8, offset: 0 }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            if self.used == 8 {
                self.block = self.rng.u64(..).to_le_bytes();
                self.used = 0;
            }
            *b = self.block[self.used];
            self.used += 1;
        }
        self.offset += buf.len() as u64;
    }

    /// Checks that `got` is the next part of the stream; on mismatch returns the offset of the
    /// first wrong byte.
    pub fn check(&mut self, got: &[u8]) -> Result<(), u64> {
        let start = self.offset;
        let mut want = vec![0u8; got.len()];
        self.fill(&mut want);
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(i) => Err(start + i as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut whole = vec![0; 1000];
        Stream::new(9).fill(&mut whole);
        let mut s = Stream::new(9);
        let mut pieces = Vec::new();
        for n in [1, 7, 8, 100, 884] {
            let mut b = vec![0; n];
            s.fill(&mut b);
            pieces.extend(b);
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn a_missing_byte_is_found_at_its_offset() {
        let mut sent = vec![0; 100];
        Stream::new(3).fill(&mut sent);
        sent.remove(40);
        let mut check = Stream::new(3);
        assert_eq!(check.check(&sent), Err(40));
    }
}
