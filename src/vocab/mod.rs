//! The vocabulary every layer speaks: event bits, the error type, and what libvirt
//! reports about connections and domains. It depends on nothing else in the crate.

pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod interest;
pub(crate) mod sync;
