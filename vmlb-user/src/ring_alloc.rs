//! Space in the shared `MAGLEV` array for each service's table.
//!
//! A changed table is written into free space and the service then points at it, so the data
//! path never reads a half-written table. Space freed by a swap is reused only by a later
//! reconcile pass; a packet that read the old service value finishes in microseconds, long
//! before that. Hand-rolled first-fit over a sorted free list: a few hundred regions at most,
//! nothing a crate would do better.

#[derive(Debug)]
pub struct RingAlloc {
    /// Free ranges (start, len), sorted by start, never adjacent.
    free: Vec<(u32, u32)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the Maglev array has no free range of {wanted} entries (raise its size)")]
pub struct RingFull {
    pub wanted: u32,
}

impl RingAlloc {
    pub fn new(total: u32) -> Self {
        Self {
            free: if total == 0 { vec![] } else { vec![(0, total)] },
        }
    }

    pub fn alloc(&mut self, len: u32) -> Result<u32, RingFull> {
        let i = self
            .free
            .iter()
            .position(|&(_, l)| l >= len)
            .ok_or(RingFull { wanted: len })?;
        let (start, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        Ok(start)
    }

    pub fn free(&mut self, start: u32, len: u32) {
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, len));
        // Merge with the right, then the left neighbour.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Mark `[start, start+len)` used (adopting tables found in pinned maps).
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        let Some(i) = self
            .free
            .iter()
            .position(|&(s, l)| s <= start && start + len <= s + l)
        else {
            return false;
        };
        let (s, l) = self.free.remove(i);
        if start + len < s + l {
            self.free.insert(i, (start + len, s + l - start - len));
        }
        if s < start {
            self.free.insert(i, (s, start - s));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merges_back_to_one_range() {
        let mut a = RingAlloc::new(100);
        let x = a.alloc(30).unwrap();
        let y = a.alloc(30).unwrap();
        let z = a.alloc(40).unwrap();
        assert_eq!((x, y, z), (0, 30, 60));
        assert_eq!(a.alloc(1), Err(RingFull { wanted: 1 }));
        a.free(y, 30);
        a.free(x, 30);
        a.free(z, 40);
        assert_eq!(a.free, vec![(0, 100)]);
    }

    #[test]
    fn reserve_splits() {
        let mut a = RingAlloc::new(100);
        assert!(a.reserve(10, 20));
        assert!(!a.reserve(15, 5));
        assert_eq!(a.free, vec![(0, 10), (30, 70)]);
        assert_eq!(a.alloc(10).unwrap(), 0);
    }
}
