//! A console's recent output, replayed to each viewer that attaches.

use std::collections::VecDeque;

/// The last `capacity` bytes a console printed.
#[derive(Debug)]
pub(crate) struct Scrollback {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes pushed out of the front since the start: once non-zero, the front may
    /// be the middle of a line.
    dropped: u64,
}

/// How far into a wrapped ring a replay looks for the start of a line.
const LINE_SEARCH: usize = 1024;

impl Scrollback {
    pub(crate) fn new(capacity: usize) -> Self {
        Scrollback {
            bytes: VecDeque::with_capacity(capacity.min(64 * 1024)),
            capacity,
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let overflow = (self.bytes.len() + bytes.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.dropped += overflow as u64;
        self.bytes.extend(bytes);
    }

    /// What a new viewer gets: the ring, from the first line start once older
    /// output has been dropped (no half line at the top).
    pub(crate) fn replay(&self) -> (&[u8], &[u8]) {
        let skip = if self.dropped == 0 {
            0
        } else {
            self.bytes
                .iter()
                .take(LINE_SEARCH)
                .position(|&b| b == b'\n')
                .map_or(0, |at| at + 1)
        };
        let (front, back) = self.bytes.as_slices();
        if skip <= front.len() {
            (&front[skip..], back)
        } else {
            (&[], &back[skip - front.len()..])
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(ring: &Scrollback) -> Vec<u8> {
        let (a, b) = ring.replay();
        [a, b].concat()
    }

    #[test]
    fn keeps_everything_below_capacity() {
        let mut ring = Scrollback::new(16);
        ring.push(b"abc");
        ring.push(b"def\n");
        assert_eq!(replayed(&ring), b"abcdef\n");
    }

    #[test]
    fn keeps_the_last_bytes_from_a_line_start_once_wrapped() {
        let mut ring = Scrollback::new(10);
        ring.push(b"first line\nsecond\n");
        // The ring holds "ine\nsecond\n" minus one byte: "ne\nsecond\n"; the half
        // line "ne\n" is not replayed.
        assert_eq!(ring.len(), 10);
        assert_eq!(replayed(&ring), b"second\n");
    }

    #[test]
    fn a_chunk_larger_than_the_ring_keeps_its_tail() {
        let mut ring = Scrollback::new(4);
        ring.push(b"0123456789");
        assert_eq!(ring.len(), 4);
        assert_eq!(replayed(&ring), b"6789");
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut ring = Scrollback::new(0);
        ring.push(b"abc");
        assert_eq!(replayed(&ring), b"");
    }
}
