//! libvirt's event bits, as typed values: [`Interest`] is what a watch asks for,
//! [`Readiness`] is what it got.
//!
//! The bits are libvirt's own (`virEventHandleType`, and the same values in
//! `virStreamEventType`): READABLE = 1, WRITABLE = 2, ERROR = 4, HANGUP = 8.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

macro_rules! event_bits {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u8);

        impl $name {
            /// Data can be read (or end of file / end of stream is pending).
            pub const READABLE: $name = $name(1);
            /// Data can be written.
            pub const WRITABLE: $name = $name(2);
            /// An error condition.
            pub const ERROR: $name = $name(4);
            /// The peer hung up completely.
            pub const HANGUP: $name = $name(8);
            /// No bits.
            pub const NONE: $name = $name(0);

            /// From libvirt's integer; unknown bits are dropped.
            pub const fn from_raw(raw: i32) -> $name {
                $name((raw & 0xf) as u8)
            }

            /// libvirt's integer.
            pub const fn to_raw(self) -> i32 {
                self.0 as i32
            }

            /// Whether no bit is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// Whether every bit of `other` is set.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// These bits, less those of `other`.
            pub const fn without(self, other: $name) -> $name {
                $name(self.0 & !other.0)
            }

            /// Whether READABLE is set.
            pub const fn is_readable(self) -> bool {
                self.contains($name::READABLE)
            }

            /// Whether WRITABLE is set.
            pub const fn is_writable(self) -> bool {
                self.contains($name::WRITABLE)
            }

            /// Whether ERROR is set.
            pub const fn is_error(self) -> bool {
                self.contains($name::ERROR)
            }

            /// Whether HANGUP is set.
            pub const fn is_hangup(self) -> bool {
                self.contains($name::HANGUP)
            }
        }

        impl BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let names = [
                    (Self::READABLE, "READABLE"),
                    (Self::WRITABLE, "WRITABLE"),
                    (Self::ERROR, "ERROR"),
                    (Self::HANGUP, "HANGUP"),
                ];
                let set: Vec<&str> = names
                    .iter()
                    .filter(|(bit, _)| self.contains(*bit))
                    .map(|(_, name)| *name)
                    .collect();
                if set.is_empty() {
                    f.write_str("NONE")
                } else {
                    f.write_str(&set.join(" | "))
                }
            }
        }
    };
}

event_bits! {
    /// What a watch or stream callback asks to be told about.
    ///
    /// ERROR and HANGUP are always reported while a watch is enabled, whether asked
    /// for or not; [`Interest::NONE`] disables the watch completely.
    Interest
}

event_bits! {
    /// What a watch or stream callback was told: the condition that holds now.
    Readiness
}

impl Readiness {
    /// Maps one mio event to libvirt bits, as poll(2) would report them.
    ///
    /// HANGUP is a full hangup only (mio: read and write side both closed). A peer's
    /// half-close (`shutdown(SHUT_WR)`) is READABLE, as with poll(2).
    pub(crate) fn from_mio(event: &mio::event::Event) -> Readiness {
        let mut r = Readiness::NONE;
        if event.is_readable() || event.is_read_closed() {
            r |= Readiness::READABLE;
        }
        if event.is_writable() {
            r |= Readiness::WRITABLE;
        }
        if event.is_error() {
            r |= Readiness::ERROR;
        }
        if event.is_read_closed() && event.is_write_closed() {
            r |= Readiness::HANGUP;
        }
        r
    }

    /// The bits one watch with `events` gets: what it asked for, plus ERROR and HANGUP.
    pub(crate) fn for_watch(self, interest: Interest) -> Readiness {
        if interest.is_empty() {
            return Readiness::NONE;
        }
        let always = Readiness::ERROR.0 | Readiness::HANGUP.0;
        Readiness(self.0 & (interest.0 | always))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_are_libvirts() {
        assert_eq!(Interest::READABLE.to_raw(), 1);
        assert_eq!(Interest::WRITABLE.to_raw(), 2);
        assert_eq!(Readiness::ERROR.to_raw(), 4);
        assert_eq!(Readiness::HANGUP.to_raw(), 8);
        assert_eq!(Readiness::from_raw(0x1f).to_raw(), 0xf);
    }

    #[test]
    fn error_and_hangup_reach_every_enabled_watch() {
        let all = Readiness::READABLE | Readiness::WRITABLE | Readiness::ERROR | Readiness::HANGUP;
        let tail = Readiness::ERROR | Readiness::HANGUP;
        assert_eq!(
            all.for_watch(Interest::READABLE),
            Readiness::READABLE | tail
        );
        assert_eq!(
            all.for_watch(Interest::WRITABLE),
            Readiness::WRITABLE | tail
        );
        assert_eq!(
            all.for_watch(Interest::NONE),
            Readiness::NONE,
            "a disabled watch gets nothing"
        );
        assert_eq!(
            Readiness::WRITABLE.for_watch(Interest::READABLE),
            Readiness::NONE
        );
    }

    #[test]
    fn debug_names_bits() {
        assert_eq!(
            format!("{:?}", Readiness::READABLE | Readiness::HANGUP),
            "READABLE | HANGUP"
        );
        assert_eq!(format!("{:?}", Interest::NONE), "NONE");
    }
}
