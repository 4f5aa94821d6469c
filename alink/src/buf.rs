//! Reusable byte buffers for frame bodies and page payloads.
//!
//! Why a pool: a multi-MiB allocation is a fresh anonymous mapping, and the kernel
//! faults in and zeroes each of its pages on first touch; freeing it unmaps them again.
//! Profiles of the initial synchronisation showed that first-touch work (page faults and
//! `clear_page`) on every 16 MiB receive and staging buffer cost more than the copies and
//! the network together, on both PMs. A [`BufPool`] keeps released buffers (bounded)
//! and hands them out again, so the steady state touches memory that is already mapped.
//!
//! Buffers come in size classes (powers of two and three quarter steps between them,
//! from [`MIN_CLASS`]), so a buffer fits any later request of its class and a 16 MiB
//! payload plus a small head wastes at most a quarter. A [`Buf`] returns its memory to
//! its pool when dropped, from any thread; [`Buf::into_bytes`] wraps it for
//! reference-counted sending, and the memory goes back when the last clone is dropped.
//! The pool keeps at most `max_idle_bytes` idle; what does not fit is freed.

use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

/// Smallest size class (bytes).
pub const MIN_CLASS: usize = 4096;
/// Requests above this are plain allocations, never pooled (1 GiB, the frame ceiling).
pub const MAX_POOLED: usize = 1 << 30;
/// Idle bytes a pool keeps by default.
pub const DEFAULT_MAX_IDLE_BYTES: usize = 64 << 20;

/// The size class of a `len`-byte request: the smallest of 2^k, 1.25, 1.5 and 1.75 x 2^k
/// (k >= 12) that holds it.
pub fn class_of(len: usize) -> usize {
    if len <= MIN_CLASS {
        return MIN_CLASS;
    }
    let p = len.next_power_of_two();
    let q = p / 8; // steps of a quarter of the lower power of two (p / 2)
    let lower = p / 2;
    (1..=4)
        .map(|k| lower + k * q)
        .find(|&c| c >= len)
        .unwrap_or(p)
}

#[derive(Debug)]
struct Inner {
    state: Mutex<Free>,
    max_idle_bytes: usize,
}

#[derive(Debug, Default)]
struct Free {
    /// Idle buffers, each `len() == capacity() == its class`, newest last (reused first:
    /// its pages are the likeliest to be resident and in cache).
    bufs: Vec<Vec<u8>>,
    idle_bytes: usize,
    /// Counters for reports and tests.
    reused: u64,
    allocated: u64,
}

/// A bounded pool of byte buffers, cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct BufPool {
    inner: Arc<Inner>,
}

/// How a pool has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers handed out again from the pool.
    pub reused: u64,
    /// Buffers that had to be allocated.
    pub allocated: u64,
    /// Bytes idle in the pool now.
    pub idle_bytes: usize,
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool::new(DEFAULT_MAX_IDLE_BYTES)
    }
}

impl BufPool {
    /// A pool keeping at most `max_idle_bytes` of released buffers.
    pub fn new(max_idle_bytes: usize) -> BufPool {
        BufPool {
            inner: Arc::new(Inner {
                state: Mutex::new(Free::default()),
                max_idle_bytes,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        self.inner.state.lock_or_recover()
    }

    /// A buffer of `len` bytes. Its contents are unspecified (zero when new, what the
    /// last user left otherwise): callers overwrite all of it.
    pub fn take(&self, len: usize) -> Buf {
        if len > MAX_POOLED {
            return Buf {
                data: vec![0u8; len],
                len,
                pool: None,
            };
        }
        let class = class_of(len);
        let reused = {
            let mut f = self.lock();
            let hit = f.bufs.iter().rposition(|b| b.len() == class);
            let b = hit.map(|i| f.bufs.swap_remove(i));
            if let Some(b) = &b {
                f.idle_bytes -= b.len();
                f.reused += 1;
            } else {
                f.allocated += 1;
            }
            b
        };
        // A zeroed allocation of this size is an untouched anonymous mapping (calloc):
        // nothing is faulted in until written.
        let data = reused.unwrap_or_else(|| vec![0u8; class]);
        debug_assert_eq!(data.len(), class);
        Buf {
            data,
            len,
            pool: Some(self.inner.clone()),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PoolStats {
        let f = self.lock();
        PoolStats {
            reused: f.reused,
            allocated: f.allocated,
            idle_bytes: f.idle_bytes,
        }
    }
}

impl Inner {
    fn put(&self, data: Vec<u8>) {
        let mut f = self.state.lock_or_recover();
        if f.idle_bytes + data.len() > self.max_idle_bytes {
            // Over the bound: free it (outside the lock).
            drop(f);
            drop(data);
            return;
        }
        f.idle_bytes += data.len();
        f.bufs.push(data);
    }
}

/// A byte buffer of a fixed length, from a [`BufPool`] (or standalone). Dereferences to
/// its `len` bytes; goes back to its pool when dropped.
pub struct Buf {
    /// The whole class-sized allocation (`len <= data.len()`).
    data: Vec<u8>,
    len: usize,
    pool: Option<Arc<Inner>>,
}

impl Buf {
    /// A standalone buffer holding `v` (not pooled).
    pub fn from_vec(v: Vec<u8>) -> Buf {
        Buf {
            len: v.len(),
            data: v,
            pool: None,
        }
    }

    /// Shortens the buffer to `len` bytes (no effect if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Wraps the buffer as reference-counted [`bytes::Bytes`]; the memory goes back to
    /// the pool when the last clone is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Clone for Buf {
    /// A standalone copy (not pooled).
    fn clone(&self) -> Buf {
        Buf::from_vec(self.to_vec())
    }
}

impl PartialEq for Buf {
    fn eq(&self, other: &Buf) -> bool {
        **self == **other
    }
}

impl Eq for Buf {}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} bytes)", self.len)
    }
}

impl From<Vec<u8>> for Buf {
    fn from(v: Vec<u8>) -> Buf {
        Buf::from_vec(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_hold_the_request_and_waste_at_most_a_quarter() {
        assert_eq!(class_of(0), MIN_CLASS);
        assert_eq!(class_of(4096), 4096);
        assert_eq!(class_of(4097), 5120);
        assert_eq!(class_of(16 << 20), 16 << 20);
        assert_eq!(class_of((16 << 20) + 100), 20 << 20);
        for len in (1..200_000)
            .step_by(997)
            .chain([1 << 24, (1 << 24) + 1, 3 << 20])
        {
            let c = class_of(len);
            assert!(c >= len, "{len} -> {c}");
            assert!(c == MIN_CLASS || c - len < c / 4 + 1, "{len} -> {c}");
        }
    }

    #[test]
    fn released_buffers_are_reused_in_their_class() {
        let pool = BufPool::new(1 << 20);
        let mut a = pool.take(10_000);
        assert_eq!(a.len(), 10_000);
        a[9_999] = 7;
        let p = a.as_ptr();
        drop(a);
        assert_eq!(pool.stats().idle_bytes, class_of(10_000));
        // Same class: the same memory back.
        let b = pool.take(9_000);
        assert_eq!(b.as_ptr(), p);
        assert_eq!(b.len(), 9_000);
        // Another class: a new allocation.
        let c = pool.take(100_000);
        assert_ne!(c.as_ptr(), p);
        let s = pool.stats();
        assert_eq!((s.reused, s.allocated, s.idle_bytes), (1, 2, 0));
    }

    #[test]
    fn idle_bytes_stay_bounded() {
        let pool = BufPool::new(3 * 8192);
        let bufs: Vec<Buf> = (0..10).map(|_| pool.take(8192)).collect();
        drop(bufs);
        assert_eq!(pool.stats().idle_bytes, 3 * 8192);
        // A buffer larger than the bound is never kept.
        drop(pool.take(1 << 20));
        assert_eq!(pool.stats().idle_bytes, 3 * 8192);
    }

    #[test]
    fn bytes_return_the_buffer_when_the_last_clone_drops() {
        let pool = BufPool::new(1 << 20);
        let mut b = pool.take(5000);
        b.copy_from_slice(&[3u8; 5000]);
        let bytes = b.into_bytes();
        let clone = bytes.clone();
        assert_eq!(&clone[..], &[3u8; 5000][..]);
        drop(bytes);
        assert_eq!(pool.stats().idle_bytes, 0, "a clone is still alive");
        drop(clone);
        assert_eq!(pool.stats().idle_bytes, class_of(5000));
    }

    #[test]
    fn buffers_go_back_from_other_threads() {
        let pool = BufPool::new(1 << 20);
        let b = pool.take(4096);
        std::thread::spawn(move || drop(b)).join().unwrap();
        assert_eq!(pool.stats().idle_bytes, 4096);
    }

    #[test]
    fn truncate_and_standalone_buffers() {
        let mut b = Buf::from_vec(vec![1, 2, 3, 4]);
        b.truncate(2);
        assert_eq!(&b[..], &[1, 2]);
        b.truncate(10);
        assert_eq!(b.len(), 2);
        assert_eq!(b.clone(), b);
    }
}
