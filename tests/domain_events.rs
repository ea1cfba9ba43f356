//! Domain lifecycle events from the in-process test driver arrive through the loop.
//!
//! Each test registers the loop itself, so run them one process each (cargo-nextest).

mod support;

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::loop_thread::{Delivered, LoopThread};
use virt_reactor::{LifecycleEvent, LifecycleKind};

/// How long one expected event may take to arrive.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to listen for events that must not come.
const QUIET_PERIOD: Duration = Duration::from_millis(300);

fn domain_xml(name: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><memory unit='MiB'>16</memory>\
         <os><type>hvm</type></os></domain>"
    )
}

fn event(domain: &str, kind: LifecycleKind, detail: i32) -> LifecycleEvent {
    LifecycleEvent {
        domain: domain.to_owned(),
        kind,
        detail,
    }
}

fn next_event(rx: &Receiver<Delivered>, waiting_for: &LifecycleEvent) -> Delivered {
    rx.recv_timeout(EVENT_TIMEOUT).unwrap_or_else(|e| {
        panic!("no event within {EVENT_TIMEOUT:?} while waiting for {waiting_for}: {e}")
    })
}

#[test]
fn lifecycle_events_arrive_in_order_on_the_loop_thread() {
    let event_loop = LoopThread::start();
    let conn = virt_reactor::connect("test:///default").expect("open test:///default");
    let (subscription, rx) = event_loop.deliveries(&conn);

    let name = "events-lifecycle";
    let dom = conn
        .define_domain_xml(&domain_xml(name))
        .expect("define the domain");
    dom.create().expect("start the domain");
    dom.suspend().expect("suspend the domain");
    dom.resume().expect("resume the domain");
    dom.destroy().expect("destroy the domain");
    dom.undefine().expect("undefine the domain");

    let expected = [
        event(name, LifecycleKind::Defined, 0),   // Added
        event(name, LifecycleKind::Started, 0),   // Booted
        event(name, LifecycleKind::Suspended, 0), // Paused
        event(name, LifecycleKind::Resumed, 0),   // Unpaused
        event(name, LifecycleKind::Stopped, 1),   // Destroyed
        event(name, LifecycleKind::Undefined, 0), // Removed
    ];
    for want in &expected {
        let (got, thread) = next_event(&rx, want);
        assert_eq!(&got, want, "events out of order or wrong");
        assert_eq!(
            thread,
            event_loop.id(),
            "{got} was not delivered by the loop thread"
        );
    }
    match rx.recv_timeout(QUIET_PERIOD) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("unexpected event after the scripted lifecycle: {other:?}"),
    }

    event_loop.unsubscribe(subscription);
    drop(dom);
    drop(conn);
    event_loop.finish();
}

#[test]
fn dropped_subscription_stops_delivery_and_frees_its_closure() {
    let event_loop = LoopThread::start();
    let conn = virt_reactor::connect("test:///default").expect("open test:///default");

    // Subscription `dropped` carries `alive`; `kept` proves events still flow after.
    let alive = Arc::new(());
    let (tx, dropped_rx) = mpsc::channel();
    let token = Arc::clone(&alive);
    let dropped = event_loop.subscribe(&conn, move |event| {
        let _owned = &token;
        let _ = tx.send(event.clone());
    });
    let (kept, kept_rx) = event_loop.deliveries(&conn);
    assert_eq!(Arc::strong_count(&alive), 2, "the closure holds its token");

    let name = "events-dropped";
    let dom = conn
        .define_domain_xml(&domain_xml(name))
        .expect("define the domain");
    let defined = event(name, LifecycleKind::Defined, 0);
    let got = dropped_rx
        .recv_timeout(EVENT_TIMEOUT)
        .expect("the subscription delivers before it is dropped");
    assert_eq!(got, defined);
    assert_eq!(next_event(&kept_rx, &defined).0, defined);

    event_loop.unsubscribe(dropped);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while Arc::strong_count(&alive) > 1 {
        assert!(
            Instant::now() < deadline,
            "the dropped subscription's closure was not freed within {EVENT_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }

    dom.undefine().expect("undefine the domain");
    let undefined = event(name, LifecycleKind::Undefined, 0);
    assert_eq!(next_event(&kept_rx, &undefined).0, undefined);
    let late: Vec<LifecycleEvent> = dropped_rx.try_iter().collect();
    assert!(
        late.is_empty(),
        "events after the drop were delivered: {late:?}"
    );

    event_loop.unsubscribe(kept);
    drop(dom);
    drop(conn);
    event_loop.finish();
}
