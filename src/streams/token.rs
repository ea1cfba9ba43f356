//! [`StreamToken`]: how everything that reports on a stream names it.

use std::fmt;

/// Names a stream in a [`Reactor`](crate::Reactor): its slab key and that slot's
/// generation. Each stream's libvirt callback carries it, so a slot that is reused
/// by a newer stream never receives an older stream's events.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamToken {
    pub(crate) key: u32,
    pub(crate) generation: u32,
}

impl fmt::Debug for StreamToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamToken({}v{})", self.key, self.generation)
    }
}
