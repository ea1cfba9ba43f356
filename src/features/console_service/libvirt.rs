//! What reaches the service's loop thread from libvirt: the reactor's state, filled
//! by lifecycle handlers and by work done off the loop.

use crate::vocab::events::LifecycleKind;

/// The reactor's state: what reaches the loop thread through libvirt's events and
/// `spawn_blocking`.
#[derive(Default)]
pub(crate) struct Libvirt {
    /// Lifecycle events of the hosts' domains, in order: host, domain, kind.
    pub(crate) lifecycle: Vec<(usize, String, LifecycleKind)>,
    /// Whether domains whose console ended still exist, by console name.
    pub(crate) checked: Vec<(String, Existence)>,
    /// The domains of a host that just connected, and whether each runs.
    pub(crate) listed: Vec<(usize, Listing)>,
}

/// A host's domains by name, and whether each runs.
pub(crate) type Listing = Result<Vec<(String, bool)>, String>;

/// What became of a domain whose console ended.
#[derive(Debug)]
pub(crate) enum Existence {
    Gone,
    Stopped,
    Running,
}
