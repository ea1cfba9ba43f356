//! Medians, tables, target checks, the raw figures and the scenario 2 plot.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::Opts;

/// One figure of a case.
#[derive(Clone, Copy)]
pub(crate) struct Figure {
    /// The child's name for it.
    pub(crate) key: &'static str,
    /// What the table calls it.
    pub(crate) label: &'static str,
}

pub(crate) const fn figure(key: &'static str, label: &'static str) -> Figure {
    Figure { key, label }
}

struct Row {
    scenario: &'static str,
    case: String,
    figure: Figure,
    ours: Vec<f64>,
    default: Vec<f64>,
    /// The async path's runs (`loop=tokio`); empty for cases without it.
    tokio: Vec<f64>,
}

/// A plotted line: name, colour, dashed, points (x, (median, min, max)).
type Series = (String, &'static str, bool, Vec<(f64, (f64, f64, f64))>);

/// Everything measured in one invocation.
#[derive(Default)]
pub(crate) struct Results {
    rows: Vec<Row>,
    notes: Vec<String>,
    /// Targets a scenario judged itself (see `target`).
    targets: Vec<(String, String, Option<bool>)>,
}

/// (median, min, max); NaN for no values.
pub(crate) fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// The median of `b[i] / a[i]` over the runs both have, with its quartiles:
/// "median (q1–q3)".
fn paired(a: &[f64], b: &[f64]) -> String {
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| b / a)
        .filter(|r| r.is_finite())
        .collect();
    if ratios.len() < 4 {
        return "–".to_owned();
    }
    ratios.sort_by(f64::total_cmp);
    let quantile = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    format!(
        "{} ({}–{})",
        num(quantile(0.5)),
        num(quantile(0.25)),
        num(quantile(0.75))
    )
}

/// A table cell: median (min–max).
fn cell(v: &[f64]) -> String {
    let (m, lo, hi) = summary(v);
    if v.len() > 1 {
        format!("{} ({}–{})", num(m), num(lo), num(hi))
    } else {
        num(m)
    }
}

/// Three significant digits, whatever the magnitude.
pub(crate) fn num(x: f64) -> String {
    if x.is_nan() {
        return "–".to_owned();
    }
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x == 0.0 {
        "0".to_owned()
    } else {
        let decimals = (2 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.decimals$}")
    }
}

/// The table's two sides and their ratio's name: scenario 6 sets the console
/// service against conserver, the others our loop against libvirt's.
fn columns(scenario: &str) -> (&'static str, &'static str, &'static str) {
    if scenario == crate::service::SCENARIO {
        ("virt-consoled", "conserver + virsh", "ours/theirs")
    } else if scenario == crate::floods::SCENARIO {
        ("N guests flooding", "none flooding", "floods/none")
    } else if scenario == crate::multihost::SCENARIO {
        ("3 hosts", "1 host", "3 hosts/1 host")
    } else if scenario == crate::multihost::CHURN {
        ("churn", "steady", "churn/steady")
    } else if scenario == crate::multihost::RECONNECT {
        ("supervisor", "–", "–")
    } else if scenario == crate::programs::VOL_AGAINST_C {
        ("vol", "C client", "vol/C")
    } else if scenario == crate::programs::VIRSH_AGAINST_C {
        ("virsh", "C client", "virsh/C")
    } else if scenario == crate::programs::LIBRARY_AGAINST_C {
        ("library, our loop", "C client", "library/C")
    } else {
        ("ours", "default", "ours/default")
    }
}

impl Results {
    pub(crate) fn add(
        &mut self,
        scenario: &'static str,
        case: &str,
        figure: Figure,
        ours: Vec<f64>,
        default: Vec<f64>,
        tokio: Vec<f64>,
    ) {
        self.rows.push(Row {
            scenario,
            case: case.to_owned(),
            figure,
            ours,
            default,
            tokio,
        });
    }

    /// Adds `figures` of two sides' runs (each run a child's figures), as the
    /// table's two columns.
    pub(crate) fn add_sides(
        &mut self,
        scenario: &'static str,
        case: &str,
        figures: &[Figure],
        runs: &[Vec<HashMap<String, f64>>; 2],
    ) {
        for &figure in figures {
            let pick = |rs: &[HashMap<String, f64>]| -> Vec<f64> {
                rs.iter()
                    .map(|r| *r.get(figure.key).unwrap_or(&f64::NAN))
                    .collect()
            };
            let (a, b) = (pick(&runs[0]), pick(&runs[1]));
            self.add(scenario, case, figure, a, b, Vec::new());
        }
    }

    /// A run that failed: said on stderr now, and noted under the tables (its first
    /// line). `what` names it: scenario, case, side.
    pub(crate) fn failed_run(&mut self, what: &str, run: usize, error: &str) {
        eprintln!("compare: {what}, run {} FAILED: {error}", run + 1);
        self.note(format!(
            "**Failed run:** {what}, run {}: {}",
            run + 1,
            error.lines().next().unwrap_or("")
        ));
    }

    pub(crate) fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// A target, the figures it was judged on, and whether it was met.
    pub(crate) fn target(&mut self, what: String, figures: String, met: Option<bool>) {
        self.targets.push((what, figures, met));
    }

    /// The median of one figure of one side in one scenario's table.
    pub(crate) fn median_in(
        &self,
        scenario: &str,
        case: &str,
        key: &str,
        ours: bool,
    ) -> Option<f64> {
        self.median_of(
            |r| r.scenario == scenario && r.case == case && r.figure.key == key,
            ours,
        )
    }

    /// The median of one figure for one loop.
    pub(crate) fn median(&self, case: &str, key: &str, ours: bool) -> Option<f64> {
        self.median_of(|r| r.case == case && r.figure.key == key, ours)
    }

    /// The median of one side of the first row `wanted` picks.
    fn median_of(&self, wanted: impl Fn(&Row) -> bool, ours: bool) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| wanted(r))
            .map(|r| summary(if ours { &r.ours } else { &r.default }).0)
            .filter(|m| !m.is_nan())
    }

    /// The rows the async path ran in (with any figure).
    fn tokio_rows(&self) -> impl Iterator<Item = &Row> {
        self.rows
            .iter()
            .filter(|r| r.tokio.iter().any(|v| !v.is_nan()))
    }

    pub(crate) fn render(&self, opts: &Opts, elapsed: Duration) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# virt-reactor vs libvirt's default loop\n\n{} run(s) per loop and case{}; \
             {:.1} min in all. Cells: median (min–max); ratio = ours/default of the medians.\n",
            opts.runs,
            if opts.quick { " (--quick sizes)" } else { "" },
            elapsed.as_secs_f64() / 60.0
        );
        let mut scenario = "";
        for row in &self.rows {
            if row.scenario != scenario {
                scenario = row.scenario;
                let (ours, theirs, ratio) = columns(scenario);
                let _ = writeln!(
                    out,
                    "\n## {scenario}\n\n| case | figure | {ours} | {theirs} | {ratio} |\n|---|---|---|---|---|"
                );
            }
            let ratio = summary(&row.ours).0 / summary(&row.default).0;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                row.case,
                row.figure.label,
                cell(&row.ours),
                cell(&row.default),
                num(ratio)
            );
        }
        let mut scenario = "";
        for row in self.tokio_rows() {
            if scenario.is_empty() {
                let _ = writeln!(
                    out,
                    "\n## Async path (tokio) against the mio path\n\n\
                     The same cases, same runs: ours is `Reactor` on mio (as above), tokio is \
                     `virt_reactor::tokio` (its driver on a current_thread runtime, the bytes \
                     through `AsyncStream`s; {}). Ratio = tokio/ours of the medians; paired = the \
                     median of the ratios of the runs made back to back (run i of each), with \
                     its quartiles: drift of the machine between rounds cancels out of it.\n\n\
                     | scenario | case | figure | ours (mio) | tokio | tokio/ours | paired |\n|---|---|---|---|---|---|---|",
                    if opts.tokio_io == "copy" {
                        "downloads read with `AsyncRead::read`, uploads write with `AsyncWrite::write_all`"
                    } else {
                        "downloads read with `AsyncBufRead::fill_buf`, uploads write with `AsyncStream::write_owned`"
                    }
                );
            }
            scenario = row.scenario;
            let ratio = summary(&row.tokio).0 / summary(&row.ours).0;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                scenario.split(':').next().unwrap_or(scenario),
                row.case,
                row.figure.label,
                cell(&row.ours),
                cell(&row.tokio),
                num(ratio),
                paired(&row.ours, &row.tokio)
            );
        }
        let targets = self.targets();
        if !targets.is_empty() {
            let _ = writeln!(
                out,
                "\n## Targets\n\n| target | figures | met |\n|---|---|---|"
            );
            for (what, figures, met) in targets {
                let _ = writeln!(
                    out,
                    "| {what} | {figures} | {} |",
                    match met {
                        Some(true) => "yes",
                        Some(false) => "**no**",
                        None => "–",
                    }
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "\n{note}");
        }
        out
    }

    /// (target, the figures it was judged on, met?)
    fn targets(&self) -> Vec<(String, String, Option<bool>)> {
        let mut t = Vec::new();
        let m = |case: &str, key: &str, ours: bool| self.median(case, key, ours);
        for dir in ["download", "upload"] {
            for n in crate::streams::S1_STREAMS {
                let case = crate::streams::s1_label(dir, n, false);
                if let (Some(o), Some(d)) = (m(&case, "mibps", true), m(&case, "mibps", false)) {
                    t.push((
                        format!("S1 {case}: throughput ≥ 1.0× default"),
                        format!("{} / {} MiB/s = {}", num(o), num(d), num(o / d)),
                        Some(o / d >= 1.0),
                    ));
                }
                if let (Some(o), Some(d)) = (
                    m(&case, "cpu_per_gib", true),
                    m(&case, "cpu_per_gib", false),
                ) {
                    t.push((
                        format!("S1 {case}: client CPU per GiB ≤ 0.8× default"),
                        format!("{} / {} s/GiB = {}", num(o), num(d), num(o / d)),
                        Some(o / d <= 0.8),
                    ));
                }
            }
            let big = crate::streams::s1_label(dir, 64, true);
            let n16 = crate::streams::s1_label(dir, 16, false);
            if let (Some(b), Some(s)) = (m(&big, "mibps", true), m(&n16, "mibps", true)) {
                t.push((
                    format!("S1 {big} (ours) ≥ 0.95× ours at N=16"),
                    format!("{} / {} MiB/s = {}", num(b), num(s), num(b / s)),
                    Some(b / s >= 0.95),
                ));
            }
        }
        for kind in ["watches", "timers"] {
            let case = crate::loops::s2_label(kind, 10_000);
            if let Some(o) = m(&case, "us_per_iter", true) {
                t.push((
                    format!("S2 ours ≤ 2 µs per iteration with 10,000 idle {kind}"),
                    format!("{} µs", num(o)),
                    Some(o <= 2.0),
                ));
            }
        }
        let (k0, kmax) = (
            crate::streams::s3_label(0),
            crate::streams::s3_label(*crate::streams::S3_IDLE.last().expect("K")),
        );
        if let (Some(o0), Some(o1), Some(d0), Some(d1)) = (
            m(&k0, "cpu_per_gib", true),
            m(&kmax, "cpu_per_gib", true),
            m(&k0, "cpu_per_gib", false),
            m(&kmax, "cpu_per_gib", false),
        ) {
            t.push((
                format!("S3 CPU/GiB grows less than default's ({k0} → {kmax})"),
                format!(
                    "ours {} → {} s/GiB (×{}), default {} → {} (×{})",
                    num(o0),
                    num(o1),
                    num(o1 / o0),
                    num(d0),
                    num(d1),
                    num(d1 / d0)
                ),
                Some(o1 / o0 < d1 / d0),
            ));
        }
        let (one, all) = (
            crate::consoles::s4_label(false, false),
            crate::consoles::s4_label(true, false),
        );
        if let (Some(a), Some(o)) = (m(&all, "p99_ms", true), m(&one, "p99_ms", true)) {
            t.push((
                "S4 ours: p99 with every guest ≤ 2× a lone console's".to_owned(),
                format!("{} / {} ms = {}", num(a), num(o), num(a / o)),
                Some(a <= 2.0 * o),
            ));
        }
        for all in [false, true] {
            let (quiet, busy) = (
                crate::consoles::s4_label(all, false),
                crate::consoles::s4_label(all, true),
            );
            if let (Some(b), Some(q)) = (m(&busy, "p99_ms", true), m(&quiet, "p99_ms", true)) {
                t.push((
                    format!("S4 ours: upload adds ≤ 10 ms to p99 ({quiet})"),
                    format!("{} − {} = {} ms", num(b), num(q), num(b - q)),
                    Some(b - q <= 10.0),
                ));
            }
        }
        for row in self.tokio_rows() {
            let (o, k) = (summary(&row.ours), summary(&row.tokio));
            if o.0.is_nan() || k.0.is_nan() {
                continue;
            }
            match row.figure.key {
                "cpu_per_gib" => t.push((
                    format!("tokio {}: client CPU per GiB ≤ 1.1× ours", row.case),
                    format!("{} / {} s/GiB = {}", num(k.0), num(o.0), num(k.0 / o.0)),
                    Some(k.0 / o.0 <= 1.1),
                )),
                // Within noise: tokio's median inside ours' spread (up to ours'
                // slowest run), or within 10 % of ours' median.
                "p99_ms" => t.push((
                    format!(
                        "tokio {}: p99 the same as ours within noise (≤ ours' max run or ≤ 1.1×)",
                        row.case
                    ),
                    format!(
                        "{} / {} ms = {} (ours {}–{})",
                        num(k.0),
                        num(o.0),
                        num(k.0 / o.0),
                        num(o.1),
                        num(o.2)
                    ),
                    Some(k.0 <= o.2.max(1.1 * o.0)),
                )),
                _ => {}
            }
        }
        for row in self
            .rows
            .iter()
            .filter(|r| r.scenario == crate::service::SCENARIO)
        {
            let (o, c) = (summary(&row.ours).0, summary(&row.default).0);
            if o.is_nan() {
                continue;
            }
            match row.figure.key {
                // The issue sets the memory target at 24 guests (and more).
                "rss_mib" if !c.is_nan() && crate::service::guests_of(&row.case) >= 24 => t.push((
                    format!(
                        "S6 {}: RSS of the whole service ≤ 1/10 of conserver + virsh's",
                        row.case
                    ),
                    format!("{} / {} MiB = {}", num(o), num(c), num(o / c)),
                    Some(o <= 0.1 * c),
                )),
                "p99_ms" if !c.is_nan() => t.push((
                    format!("S6 {}: echo p99 ≤ conserver + virsh's", row.case),
                    format!("{} / {} ms = {}", num(o), num(c), num(o / c)),
                    Some(o <= c),
                )),
                "attach_max_ms" => t.push((
                    format!(
                        "S6 {}: attach → first replayed byte ≤ 50 ms (slowest console)",
                        row.case
                    ),
                    format!("{} ms (conserver: {} ms)", num(o), num(c)),
                    Some(o <= 50.0),
                )),
                _ => {}
            }
        }
        for what in ["idle streams", "idle watches"] {
            if let Some(o) = m(what, "rust_per", true) {
                t.push((
                    format!("S5 ≤ 4 KiB of reactor memory per {what} (each)"),
                    format!("{} bytes (Rust heap)", num(o)),
                    Some(o <= 4096.0),
                ));
            }
        }
        t.extend(self.targets.iter().cloned());
        t
    }

    pub(crate) fn raw_tsv(&self) -> String {
        let mut out = String::from("scenario\tcase\tfigure\tloop\tvalues\n");
        for row in &self.rows {
            for (kind, values) in [
                ("ours", &row.ours),
                ("default", &row.default),
                ("tokio", &row.tokio),
            ] {
                if kind == "tokio" && values.is_empty() {
                    continue;
                }
                let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
                let _ = writeln!(
                    out,
                    "{}\t{}\t{}\t{kind}\t{}",
                    row.scenario,
                    row.case,
                    row.figure.key,
                    values.join(" ")
                );
            }
        }
        out
    }

    /// Scenario 2 as an SVG: µs per iteration (log scale) against idle registrations.
    pub(crate) fn plot_s2(&self) -> Option<String> {
        let series: Vec<Series> = [
            ("watches", true),
            ("timers", true),
            ("watches", false),
            ("timers", false),
        ]
        .iter()
        .map(|&(kind, ours)| {
            let points: Vec<_> = crate::loops::S2_IDLE
                .iter()
                .filter_map(|&n| {
                    let case = crate::loops::s2_label(kind, n);
                    let row = self
                        .rows
                        .iter()
                        .find(|r| r.case == case && r.figure.key == "us_per_iter")?;
                    let s = summary(if ours { &row.ours } else { &row.default });
                    (!s.0.is_nan()).then_some((n as f64, s))
                })
                .collect();
            let name = format!(
                "{} loop, idle {kind}",
                if ours {
                    "virt-reactor"
                } else {
                    "libvirt default"
                }
            );
            let color = match (ours, kind) {
                (true, "watches") => "#1b7837",
                (true, _) => "#7fbc41",
                (false, "watches") => "#b2182b",
                (false, _) => "#f4a582",
            };
            (name, color, kind == "timers", points)
        })
        .filter(|s| !s.3.is_empty())
        .collect();
        if series.is_empty() {
            return None;
        }
        let (w, h) = (760.0, 460.0);
        let (left, right, top, bottom) = (80.0, 20.0, 50.0, 60.0);
        let xmax = series
            .iter()
            .flat_map(|s| s.3.iter().map(|p| p.0))
            .fold(1.0, f64::max);
        let ys = series
            .iter()
            .flat_map(|s| s.3.iter().flat_map(|p| [p.1 .1, p.1 .2]));
        let (ymin, ymax) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        let (lo, hi) = (
            ymin.log10().floor(),
            ymax.log10().ceil().max(ymin.log10().floor() + 1.0),
        );
        let px = |x: f64| left + (w - left - right) * x / xmax;
        let py = |y: f64| top + (h - top - bottom) * (1.0 - (y.log10() - lo) / (hi - lo));
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">Scenario 2: cost of one loop iteration (socketpair ping-pong) vs idle registrations</text>"#,
            w / 2.0
        );
        let mut decade = lo;
        while decade <= hi {
            let y = py(10f64.powf(decade));
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                w - right,
                left - 6.0,
                y + 4.0,
                num(10f64.powf(decade))
            );
            decade += 1.0;
        }
        for &n in crate::loops::S2_IDLE {
            let x = px(n as f64);
            // Ticks too close to the previous one get no label.
            let label = if n == 0 || px(n as f64) - px(0.0) > 30.0 {
                n.to_string()
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
                h - bottom,
                h - bottom + 16.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">idle registered watches or disabled timers</text>"#,
            (left + w - right) / 2.0,
            h - 18.0
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(20,{}) rotate(-90)" text-anchor="middle">µs per iteration (log scale; median, bars min–max)</text>"#,
            (top + h - bottom) / 2.0
        );
        for (i, (name, color, dashed, points)) in series.iter().enumerate() {
            let path: Vec<String> = points
                .iter()
                .map(|(x, (m, _, _))| format!("{:.1},{:.1}", px(*x), py(*m)))
                .collect();
            let dash = if *dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for (x, (m, lo, hi)) in points {
                let (cx, cy) = (px(*x), py(*m));
                let _ = writeln!(
                    s,
                    r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="{color}"/><circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{color}"/>"#,
                    py(*lo),
                    py(*hi)
                );
            }
            let ly = top + 14.0 + 18.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{name}</text>"#,
                left + 14.0,
                left + 44.0,
                left + 50.0,
                ly + 4.0
            );
        }
        s.push_str("</svg>\n");
        Some(s)
    }
}
