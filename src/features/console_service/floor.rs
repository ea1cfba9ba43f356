//! Who may type into a console now: the rule for input from several writers.
//!
//! The writer whose input comes first holds the floor; its bytes go to the guest at
//! once, so a lone writer stays interactive key by key. It keeps the floor until it
//! has sent a line end (`\r` or `\n`), or has sent nothing for [`IDLE`] while
//! others wait, or leaves or loses the write role. The others' input waits, each in
//! its own queue, and goes out whole when their turn comes, in the order they asked.
//! So two writers' lines never interleave.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A holder that sent nothing for this long yields to a waiting writer.
pub(crate) const IDLE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(crate) struct Floor {
    holder: Option<usize>,
    /// When the holder last sent input.
    last: Option<Instant>,
    waiting: VecDeque<usize>,
}

/// Whose input goes to the console now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// The holder goes on (it may have nothing to send yet, mid-line).
    Holder(usize),
    /// A waiting writer has just been given the floor.
    Given(usize),
}

impl Floor {
    /// `key` has input to send: it waits for its turn unless it holds the floor.
    pub(crate) fn ask(&mut self, key: usize) {
        if self.holder != Some(key) && !self.waiting.contains(&key) {
            self.waiting.push_back(key);
        }
    }

    /// Whose turn it is. A holder idle for [`IDLE`] while others wait goes to the
    /// back of the queue.
    pub(crate) fn turn(&mut self, now: Instant) -> Option<Turn> {
        if let Some(holder) = self.holder {
            if !self.idle(now) || self.waiting.is_empty() {
                return Some(Turn::Holder(holder));
            }
            self.holder = None;
            self.waiting.push_back(holder);
        }
        let next = self.waiting.pop_front()?;
        self.holder = Some(next);
        self.last = Some(now);
        Some(Turn::Given(next))
    }

    /// The holder sent input; a line end gives up the floor.
    pub(crate) fn sent(&mut self, key: usize, line_ended: bool, now: Instant) {
        if self.holder == Some(key) {
            self.last = Some(now);
            if line_ended {
                self.holder = None;
            }
        }
    }

    /// `key` left, cannot write any more, or has nothing to send.
    pub(crate) fn leave(&mut self, key: usize) {
        if self.holder == Some(key) {
            self.holder = None;
        }
        self.waiting.retain(|&k| k != key);
    }

    /// When the holder's idle time runs out while others wait.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match (self.holder, self.waiting.is_empty()) {
            (Some(_), false) => self.last.map(|at| at + IDLE),
            _ => None,
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.last.is_some_and(|at| now >= at + IDLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_writer_holds_until_its_line_ends() {
        let (mut floor, now) = (Floor::default(), Instant::now());
        floor.ask(1);
        assert_eq!(floor.turn(now), Some(Turn::Given(1)));
        floor.sent(1, false, now);
        floor.ask(2);
        floor.ask(3);
        assert_eq!(floor.turn(now), Some(Turn::Holder(1)), "1 is mid-line");
        floor.sent(1, true, now);
        assert_eq!(floor.turn(now), Some(Turn::Given(2)));
        floor.sent(2, true, now);
        assert_eq!(floor.turn(now), Some(Turn::Given(3)));
        floor.sent(3, true, now);
        assert_eq!(floor.turn(now), None);
    }

    #[test]
    fn an_idle_holder_yields_to_a_waiting_writer() {
        let (mut floor, now) = (Floor::default(), Instant::now());
        floor.ask(1);
        assert_eq!(floor.turn(now), Some(Turn::Given(1)));
        floor.sent(1, false, now);
        assert_eq!(floor.deadline(), None, "nobody waits");
        floor.ask(2);
        assert_eq!(floor.deadline(), Some(now + IDLE));
        assert_eq!(floor.turn(now), Some(Turn::Holder(1)));
        let later = now + IDLE;
        assert_eq!(floor.turn(later), Some(Turn::Given(2)));
        floor.sent(2, true, later);
        assert_eq!(floor.turn(later), Some(Turn::Given(1)), "1 queued behind 2");
    }

    #[test]
    fn a_holder_that_leaves_frees_the_floor() {
        let (mut floor, now) = (Floor::default(), Instant::now());
        floor.ask(1);
        floor.ask(2);
        assert_eq!(floor.turn(now), Some(Turn::Given(1)));
        floor.leave(1);
        assert_eq!(floor.turn(now), Some(Turn::Given(2)));
        floor.leave(2);
        assert_eq!(floor.turn(now), None);
    }
}
