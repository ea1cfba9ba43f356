//! The console service (issue 12): every guest's console on one thread, many
//! viewers, scrollback, durable logs and a browser terminal.

// Until the service loop plugs them in, only the tests use these modules.
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "the service loop is not in yet")
)]
pub(crate) mod transport;
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "the service loop is not in yet")
)]
pub(crate) mod web;
