//! Watch and timer ids: positive, monotonic, never handed out twice while alive.
//!
//! libvirt treats 0 as "no watch" (fdstreams test `watch != 0`) and -1 as failure, so
//! ids start at 1. Ids are not reused until the counter wraps after 2^31 - 1
//! registrations, and even then a live id is skipped, so a stale id can never reach a
//! newer registration.

#[derive(Debug)]
pub(super) struct IdAllocator {
    next: i32,
}

impl Default for IdAllocator {
    fn default() -> Self {
        IdAllocator { next: 1 }
    }
}

impl IdAllocator {
    /// The next free id; `in_use` says whether an id is still live.
    pub(super) fn next(&mut self, in_use: impl Fn(i32) -> bool) -> i32 {
        loop {
            let id = self.next;
            self.next = if id == i32::MAX { 1 } else { id + 1 };
            if !in_use(id) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_increase() {
        let mut ids = IdAllocator::default();
        assert_eq!(ids.next(|_| false), 1);
        assert_eq!(ids.next(|_| false), 2);
        assert_eq!(ids.next(|_| false), 3);
    }

    #[test]
    fn wrap_skips_zero_and_live_ids() {
        let mut ids = IdAllocator { next: i32::MAX };
        assert_eq!(ids.next(|_| false), i32::MAX);
        // 1 and 2 are still live after the wrap: they are skipped.
        assert_eq!(ids.next(|id| id == 1 || id == 2), 3);
    }
}
