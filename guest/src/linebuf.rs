//! A fixed-size line buffer with `core::fmt::Write`, so lines can be formatted without
//! the heap (the panic handler uses it too).

use core::fmt;

pub const LINE_MAX: usize = 512;

/// Holds one console line; text beyond [`LINE_MAX`] - 1 bytes is cut, keeping room for
/// the newline.
pub struct LineBuf {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl LineBuf {
    pub const fn new() -> Self {
        LineBuf {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// The line with a trailing `\n` (added unless already there).
    pub fn finish(&mut self) -> &[u8] {
        if self.len == 0 || self.buf[self.len - 1] != b'\n' {
            let at = self.len.min(LINE_MAX - 1);
            self.buf[at] = b'\n';
            self.len = at + 1;
        }
        &self.buf[..self.len]
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Leave one byte for the newline; a cut line is still a line.
        let room = (LINE_MAX - 1).saturating_sub(self.len);
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn formats_and_terminates() {
        let mut l = LineBuf::new();
        write!(l, "C {}", 42).unwrap();
        assert_eq!(l.finish(), b"C 42\n");
    }

    #[test]
    fn long_lines_are_cut_with_newline() {
        let mut l = LineBuf::new();
        for _ in 0..100 {
            write!(l, "0123456789").unwrap();
        }
        let out = l.finish();
        assert_eq!(out.len(), LINE_MAX);
        assert_eq!(out[LINE_MAX - 1], b'\n');
    }
}
