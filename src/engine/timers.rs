//! The timer table: libvirt's periodic timeouts, kept in a deadline heap.
//!
//! libvirt's frequency is in milliseconds: -1 disables the timer, 0 fires it on every
//! loop iteration, N fires it every N ms. An update re-arms from now. Re-arming pushes
//! a new heap entry with a new sequence number; entries whose sequence no longer
//! matches their timer are stale and skipped, so updates stay O(log n).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::ids::IdAllocator;
use crate::sys::callback::{FreeCallback, TimerCallback};

pub(super) struct Timer {
    /// `None` when disabled (-1).
    period: Option<Duration>,
    /// The sequence of the heap entry that is live for this timer.
    armed: u64,
    callback: TimerCallback,
    pub(super) free: Option<FreeCallback>,
}

/// A timer whose deadline passed, identified by the arming it fired for.
#[derive(Clone, Copy)]
pub(crate) struct DueTimer {
    pub(crate) id: i32,
    armed: u64,
}

#[derive(Default)]
pub(super) struct TimerTable {
    timers: FxHashMap<i32, Timer>,
    heap: BinaryHeap<Reverse<(Instant, u64, i32)>>,
    ids: IdAllocator,
    next_seq: u64,
}

impl TimerTable {
    pub(super) fn len(&self) -> usize {
        self.timers.len()
    }

    pub(super) fn armed(&self) -> usize {
        self.timers.values().filter(|t| t.period.is_some()).count()
    }

    pub(super) fn add(
        &mut self,
        frequency: i32,
        callback: TimerCallback,
        free: Option<FreeCallback>,
        now: Instant,
    ) -> i32 {
        let id = self.ids.next(|id| self.timers.contains_key(&id));
        self.timers.insert(
            id,
            Timer {
                period: None,
                armed: 0,
                callback,
                free,
            },
        );
        self.set(id, frequency, now);
        id
    }

    /// Sets the frequency and re-arms from `now`. Returns false for an unknown id.
    pub(super) fn set(&mut self, id: i32, frequency: i32, now: Instant) -> bool {
        let Some(timer) = self.timers.get_mut(&id) else {
            return false;
        };
        self.next_seq += 1;
        timer.armed = self.next_seq;
        timer.period = u64::try_from(frequency).ok().map(Duration::from_millis);
        if let Some(period) = timer.period {
            self.heap.push(Reverse((now + period, timer.armed, id)));
        }
        self.compact();
        true
    }

    pub(super) fn take(&mut self, id: i32) -> Option<Timer> {
        self.timers.remove(&id)
    }

    /// The earliest live deadline.
    pub(super) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, seq, id))) = self.heap.peek() {
            if self.is_live(id, seq) {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Moves every timer due at `now` into `out`. Each fires at most once per call,
    /// which is what makes a 0 ms timer fire once per iteration, not forever.
    pub(super) fn collect_due(&mut self, now: Instant, out: &mut Vec<DueTimer>) {
        while let Some(&Reverse((deadline, seq, id))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.is_live(id, seq) {
                out.push(DueTimer { id, armed: seq });
            }
        }
    }

    /// Re-arms a timer after its callback, unless the callback (or another thread)
    /// updated or removed it meanwhile.
    pub(super) fn rearm_after_fire(&mut self, due: DueTimer, now: Instant) {
        let Some(timer) = self.timers.get(&due.id) else {
            return;
        };
        if timer.armed != due.armed {
            return;
        }
        if let Some(period) = timer.period {
            self.heap.push(Reverse((now + period, due.armed, due.id)));
        }
    }

    /// The callback to run for `due`, unless an earlier callback of this iteration
    /// removed, disabled or re-armed the timer.
    pub(super) fn still_due(&self, due: DueTimer) -> Option<TimerCallback> {
        self.is_live(due.id, due.armed)
            .then(|| self.timers[&due.id].callback)
    }

    fn is_live(&self, id: i32, seq: u64) -> bool {
        self.timers
            .get(&id)
            .is_some_and(|t| t.armed == seq && t.period.is_some())
    }

    /// Drops stale entries once they outnumber live timers, so a timer updated on every
    /// RPC (libvirt's keepalive) cannot grow the heap without bound.
    fn compact(&mut self) {
        if self.heap.len() > 64 && self.heap.len() > 2 * self.timers.len() {
            let timers = &self.timers;
            self.heap.retain(|Reverse((_, seq, id))| {
                timers
                    .get(id)
                    .is_some_and(|t| t.armed == *seq && t.period.is_some())
            });
        }
    }
}
