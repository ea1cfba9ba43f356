//! Scenario 7: one reactor across several hosts (issue 13). Console echo latency
//! with the consoles spread over 3 hosts, against the same number of consoles on
//! one host, in the same run, alternating.
//!
//! The hosts are `tests/support/hosts.rs`'s: a network namespace each, with a
//! private libvirtd listening on TCP at the namespace's veth address. Host 1
//! carries 3 × G guests, hosts 2 and 3 G each (G = `--guests`); every guest runs
//! in both cases, so both see the same load. "3 hosts" times G consoles of each
//! host, "1 host" the 3 × G of host 1, all through `consoles::latency` (ours, one
//! `ConsoleMux` per connection) over TCP.

use std::collections::HashMap;
use std::time::Instant;

use virt::connect::Connect;
use virt_reactor::testbed::{GuestMode, Guests, Testbed};

use crate::hosts::{self, Host};
use crate::report::{figure, Figure, Results};
use crate::{run_child, Loop, Opts};

pub(crate) const SCENARIO: &str = "Scenario 7: consoles on 3 hosts against 1 host";
const HOSTS: usize = 3;

const FIGURES: &[Figure] = &[
    figure("p50_ms", "median ms"),
    figure("p99_ms", "p99 ms"),
    figure("samples", "echoes timed"),
    figure("lost", "echoes lost (5 s)"),
];

#[derive(Clone, Copy)]
enum Layout {
    Spread,
    One,
}

pub(crate) fn scenario7(opts: &Opts, results: &mut Results) {
    let hosts = match hosts::start(HOSTS) {
        Ok(hosts) => hosts,
        Err(e) => {
            eprintln!("compare: {SCENARIO}: cannot start the hosts (root needed): {e}");
            results.note(format!(
                "**Skipped:** {SCENARIO}: cannot start the hosts: {e}"
            ));
            return;
        }
    };
    let per_host = opts.guests;
    let testbed = Testbed::open(&opts.testbed).expect("the testbed (bash testbed/build.sh)");
    // Every guest's name, host by host.
    let mut placed: Vec<Vec<String>> = Vec::new();
    let mut guards = Vec::new();
    let started = Instant::now();
    for (k, host) in hosts.iter().enumerate() {
        let count = if k == 0 { HOSTS * per_host } else { per_host };
        let (guests, names) = boot(host, &testbed, count);
        guards.push(guests);
        placed.push(names);
    }
    eprintln!(
        "compare: {SCENARIO}: {} guests booting on {HOSTS} hosts ({:.1} s)",
        placed.iter().map(Vec::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    let uris: Vec<String> = hosts.iter().map(Host::uri).collect();
    let args = |layout: Layout, samples: usize| -> Vec<String> {
        let (uri, guests) = match layout {
            Layout::Spread => (
                uris.join(","),
                placed
                    .iter()
                    .enumerate()
                    .flat_map(|(k, names)| {
                        names[..per_host].iter().map(move |n| format!("{k}:{n}"))
                    })
                    .collect::<Vec<_>>(),
            ),
            Layout::One => (uris[0].clone(), placed[0].clone()),
        };
        vec![
            format!("uri={uri}"),
            format!("guests={}", guests.join(",")),
            format!("samples={samples}"),
            "upload=0".to_owned(),
        ]
    };
    // An untimed pass over every guest of every host: no timed run shares the CPUs
    // with a boot.
    let every: Vec<String> = placed
        .iter()
        .enumerate()
        .flat_map(|(k, names)| names.iter().map(move |n| format!("{k}:{n}")))
        .collect();
    let warm = vec![
        format!("uri={}", uris.join(",")),
        format!("guests={}", every.join(",")),
        "samples=1".to_owned(),
        "upload=0".to_owned(),
    ];
    if let Err(e) = run_child(Loop::Ours, "console", &warm) {
        results.note(format!(
            "**Failed:** {SCENARIO}: the guests never answered: {e}"
        ));
        return;
    }
    eprintln!(
        "compare: {SCENARIO}: every console answers ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let samples = if opts.quick { 50 } else { 300 };
    let label = format!("{} consoles", HOSTS * per_host);
    let mut runs: [Vec<HashMap<String, f64>>; 2] = [Vec::new(), Vec::new()];
    for run in 0..opts.runs {
        let order = if run % 2 == 0 {
            [Layout::Spread, Layout::One]
        } else {
            [Layout::One, Layout::Spread]
        };
        for layout in order {
            match run_child(Loop::Ours, "console", &args(layout, samples)) {
                Ok(figures) => runs[layout as usize].push(figures),
                Err(e) => {
                    eprintln!("compare: {SCENARIO} run {run} FAILED: {e}");
                    results.note(format!(
                        "**Failed run:** {SCENARIO}, run {}: {}",
                        run + 1,
                        e.lines().next().unwrap_or("")
                    ));
                }
            }
        }
    }
    for &figure in FIGURES {
        let pick = |rs: &[HashMap<String, f64>]| -> Vec<f64> {
            rs.iter()
                .map(|r| *r.get(figure.key).unwrap_or(&f64::NAN))
                .collect()
        };
        results.add(
            SCENARIO,
            &label,
            figure,
            pick(&runs[0]),
            pick(&runs[1]),
            Vec::new(),
        );
    }
    results.note(format!(
        "Scenario 7: {HOSTS} hosts (network namespaces, a private libvirtd on TCP each); \
         host 1 runs {} testbed guests, hosts 2 and 3 {per_host} each; \"3 hosts\" times \
         {per_host} consoles of each host, \"1 host\" {} of host 1; {samples} echo rounds \
         per run, ours, one ConsoleMux per connection.",
        HOSTS * per_host,
        HOSTS * per_host
    ));
    drop(guards);
}

/// Boots `count` testbed guests `LABEL-1` … on `host`; they may still be booting.
fn boot(host: &Host, testbed: &Testbed, count: usize) -> (Guests, Vec<String>) {
    let conn = Connect::open(Some(&host.uri())).expect("connect to a host");
    let guests = Guests::new();
    let names: Vec<String> = (1..=count).map(|i| format!("{}-{i}", host.label)).collect();
    for name in &names {
        guests.track(&conn, name);
        conn.create_domain_xml(&testbed.guest_xml(name, GuestMode::Plain), 0)
            .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", host.daemon.log_tail(20)));
    }
    (guests, names)
}
