//! Which thread is running: `pthread_self`, a register read with no system call,
//! so the loop can tell its own thread on every iteration for nearly nothing.

/// The calling thread's identity; never 0, unique among live threads.
pub(crate) fn current() -> u64 {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    let id = unsafe { libc::pthread_self() };
    // pthread_t is an unsigned long: 64 bits here, 32 on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    u64::from(id)
}
