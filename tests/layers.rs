//! The layer check (issue 10, "Layers that only point down"): every module under
//! `src/` imports only from its own layer or lower ones, and no two files import
//! each other, directly or around a loop.
//!
//! Layers, by top folder under `src/` (a file's layer is its top folder; `src/lib.rs`
//! is the crate root and exempt, and so are the binaries in `src/bin/`):
//!
//! | layer | folder            | holds                                                   |
//! |-------|-------------------|---------------------------------------------------------|
//! | 0     | `src/vocab/`      | `Interest`/`Readiness`, `Error`, `CloseReason`, lifecycle types |
//! | 1     | `src/sys/`        | the C boundary (every `unsafe`)                         |
//! | 2     | `src/engine/`     | the tables and libvirt's six entry points               |
//! | 3     | `src/event_loop/` | `EventLoop`, `Watch`, `Timer`, connect, the default loop |
//! | 4     | `src/streams/`    | `Stream`, the slab, handlers, inbox, lanes, transfers   |
//! | 5     | `src/features/`   | volumes, consoles, domain events, the testbed           |
//!
//! What counts as an import of a file: a `use` item (nested braces, `self`, `as`,
//! globs and `pub use` re-exports included) and any path in the code that starts at
//! `crate::`, `super::`, `self::`, a child module declared in the file, or a name a
//! `use` bound to a module of this crate. Comments (doc comments and doc links
//! included) and string and char literals are not code. A `mod child;` declaration
//! is not an import.
//!
//! A path resolves to the file of its longest prefix that names one:
//! `crate::a::b::c` is `src/a/b/c.rs` or `src/a/b/c/mod.rs`, else `src/a/b.rs` or
//! `src/a/b/mod.rs`, and so on. So `crate::streams::Reactor` is an import of
//! `src/streams/mod.rs`. A path that reaches only the crate root (`crate::Error`) is
//! followed through `src/lib.rs`'s `use`/`pub use` items to the file that defines
//! it. `super` is the parent of the file's module: the folder's `mod.rs` for
//! `src/a/b.rs`, but `src/a.rs`'s parent for `src/a/mod.rs`; inline `mod x { }`
//! blocks (such as `mod tests`) are modules of their own.
//!
//! The check runs on the file contents it is given (`check`), so the self test
//! below feeds it an in-memory fixture with a known upward import and a known
//! cycle. Run `cargo test --test layers -- --nocapture` to see the summary.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

/// The layers, lowest first: a module may import from its own layer or lower ones.
const LAYERS: &[(&str, u8)] = &[
    ("vocab", 0),
    ("sys", 1),
    ("engine", 2),
    ("event_loop", 3),
    ("streams", 4),
    ("features", 5),
];

/// The crate root: exempt from the layers, and not a node of the import graph.
const ROOT: &str = "src/lib.rs";

#[test]
fn layers_point_down_and_imports_have_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, "src", &mut files);
    // Binaries are crates of their own: they see only the library's public API.
    files.retain(|(path, _)| !path.starts_with("src/bin/"));
    files.sort();
    assert!(
        files.iter().any(|(path, _)| path == ROOT),
        "no {ROOT} under {}",
        src.display()
    );

    let report = check(&files, LAYERS);
    println!("{}", report.summary(LAYERS));
    let problems = report.problems();
    assert!(problems.is_empty(), "layer check failed:\n{problems}");
    // A walk that found nothing would pass vacuously.
    assert!(
        report.files.len() > 1 && !report.edges.is_empty(),
        "layer check read {} files and found {} imports: is src/ where it looks?",
        report.files.len(),
        report.edges.len()
    );
}

/// The check finds what it must: an import that points up, a cycle, and a file
/// outside the layer folders, in a fixture that also holds every form of path the
/// parser has to get right (and the comments and strings it has to ignore).
#[test]
fn layer_check_detects_upward_imports_and_cycles() {
    let files = fixture(&[
        (
            "src/lib.rs",
            "mod vocab; mod sys; mod engine;\npub use vocab::error::Error;\n",
        ),
        (
            "src/vocab/mod.rs",
            "pub(crate) mod error;\npub(crate) mod bits;\npub use bits::Bits;\n",
        ),
        (
            "src/vocab/error.rs",
            r##"//! Mentions crate::engine::Table in a comment: not an import.
// use crate::engine::Table;
/* a block /* nested */ crate::engine::Table */
/// See [`crate::engine::Table`].
use super::bits::Bits;
const S: &str = "crate::engine::Table \" crate::sys::a";
const R: &str = r#"crate::engine::Table " crate::sys::b"#;
const Q: char = '"';
const E: char = '\'';
fn f<'a>(x: &'a str) -> &'a str { let _ = "}"; x }
pub struct Error;
#[cfg(test)]
mod tests {
    use super::*;
    use super::super::bits;
    fn t() { let _ = bits::Bits; }
}
"##,
        ),
        ("src/vocab/bits.rs", "pub struct Bits;\n"),
        (
            "src/sys/mod.rs",
            "mod a;\nmod b;\nuse super::vocab::Bits;\n",
        ),
        (
            "src/sys/a.rs",
            "use super::b::go;\npub(in crate::sys) fn come() {}\n",
        ),
        (
            "src/sys/b.rs",
            "use crate::engine::{\n    table::{Table, self as t},\n    self,\n};\n\
             pub fn go() { crate::sys::a::come(); }\n",
        ),
        (
            "src/engine/mod.rs",
            "pub mod table;\nuse crate::vocab::Bits;\nuse crate::vocab;\n\
             pub struct Engine;\nfn f() { vocab::error::fail(); }\n",
        ),
        (
            "src/engine/table/mod.rs",
            "mod row;\nuse super::Engine;\npub struct Table;\n",
        ),
        (
            "src/engine/table/row.rs",
            "use super::Table;\nfn f() -> crate::Error { crate::Error }\n",
        ),
    ]);

    let report = check(&files, LAYERS);
    let edges: Vec<(&str, &str)> = report
        .edges
        .keys()
        .map(|(from, to)| (from.as_str(), to.as_str()))
        .collect();
    let mut expected = vec![
        ("src/vocab/mod.rs", "src/vocab/bits.rs"),
        ("src/vocab/error.rs", "src/vocab/bits.rs"),
        ("src/sys/mod.rs", "src/vocab/mod.rs"),
        ("src/sys/a.rs", "src/sys/b.rs"),
        ("src/sys/b.rs", "src/sys/a.rs"),
        ("src/sys/b.rs", "src/engine/mod.rs"),
        ("src/sys/b.rs", "src/engine/table/mod.rs"),
        ("src/engine/mod.rs", "src/vocab/mod.rs"),
        ("src/engine/mod.rs", "src/vocab/error.rs"),
        ("src/engine/table/mod.rs", "src/engine/mod.rs"),
        ("src/engine/table/row.rs", "src/engine/table/mod.rs"),
        ("src/engine/table/row.rs", "src/vocab/error.rs"),
    ];
    expected.sort_unstable();
    assert_eq!(edges, expected, "import edges of the fixture");

    let upward: Vec<String> = report.upward.iter().map(Upward::line).collect();
    assert_eq!(
        upward,
        [
            "src/sys/b.rs -> src/engine/mod.rs (layer 1 -> 2)",
            "src/sys/b.rs -> src/engine/table/mod.rs (layer 1 -> 2)",
        ]
    );
    assert_eq!(report.cycles, [vec!["src/sys/a.rs", "src/sys/b.rs"]]);
    assert!(report.outside.is_empty(), "{:?}", report.outside);
    let problems = report.problems();
    assert!(problems.contains("src/sys/b.rs -> src/engine/table/mod.rs (layer 1 -> 2)"));
    assert!(problems.contains("src/sys/a.rs -> src/sys/b.rs -> src/sys/a.rs"));

    // A file directly in src/ (other than lib.rs) or in a folder that is no layer.
    let files = fixture(&[
        ("src/lib.rs", "mod vocab; mod helpers; mod util;\n"),
        ("src/vocab/mod.rs", "use crate::helpers::help;\n"),
        ("src/helpers.rs", "pub fn help() {}\n"),
        ("src/util/x.rs", "\n"),
    ]);
    let report = check(&files, LAYERS);
    assert_eq!(
        report.outside,
        [
            "src/helpers.rs: file outside a layer folder",
            "src/util/x.rs: file outside a layer folder (`util` is not a layer)",
        ]
    );
    assert!(!report.problems().is_empty());
}

fn fixture(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
        .collect()
}

/// Every `.rs` file under `dir`, as (`src/...` path with `/`, contents).
fn read_tree(dir: &Path, rel: &str, out: &mut Vec<(String, String)>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let rel = format!("{rel}/{name}");
        if path.is_dir() {
            read_tree(&path, &rel, out);
        } else if name.ends_with(".rs") {
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            out.push((rel, text));
        }
    }
}

// ---------------------------------------------------------------------------
// The check: files in, report out.
// ---------------------------------------------------------------------------

/// One import that points to a higher layer.
#[derive(Debug)]
struct Upward {
    from: String,
    to: String,
    from_layer: u8,
    to_layer: u8,
    /// Where: the first reference that makes the edge (line and path as written).
    via: Ref,
}

impl Upward {
    fn line(&self) -> String {
        format!(
            "{} -> {} (layer {} -> {})",
            self.from, self.to, self.from_layer, self.to_layer
        )
    }
}

#[derive(Debug, Default)]
struct Report {
    /// Each file under src/ except the root, with its layer (None: outside any).
    files: BTreeMap<String, Option<u8>>,
    /// Import edges between files (root excluded), with the first reference each.
    edges: BTreeMap<(String, String), Ref>,
    upward: Vec<Upward>,
    /// Strongly connected components of more than one file, each sorted.
    cycles: Vec<Vec<String>>,
    /// Files that are in no layer.
    outside: Vec<String>,
}

impl Report {
    fn summary(&self, layers: &[(&str, u8)]) -> String {
        let mut out = format!(
            "layer check: {} files under src/ ({ROOT} exempt)\n",
            self.files.len()
        );
        let mut numbers: Vec<u8> = layers.iter().map(|&(_, n)| n).collect();
        numbers.sort_unstable();
        numbers.dedup();
        for n in numbers {
            let names: Vec<&str> = layers
                .iter()
                .filter(|&&(_, m)| m == n)
                .map(|&(name, _)| name)
                .collect();
            let count = self.files.values().filter(|l| **l == Some(n)).count();
            let _ = writeln!(out, "  [{n}] {:<12} {count:>3} files", names.join(" "));
        }
        if !self.outside.is_empty() {
            let _ = writeln!(out, "  outside any layer: {} files", self.outside.len());
        }
        let _ = writeln!(out, "import edges: {}", self.edges.len());
        let _ = writeln!(out, "upward imports: {}", self.upward.len());
        let _ = write!(out, "cycles: {}", self.cycles.len());
        out
    }

    /// Everything wrong, one line each (empty when the check passes).
    fn problems(&self) -> String {
        let mut out = String::new();
        for line in &self.outside {
            let _ = writeln!(out, "{line}");
        }
        if !self.upward.is_empty() {
            let _ = writeln!(out, "{} upward imports:", self.upward.len());
            for up in &self.upward {
                let _ = writeln!(
                    out,
                    "  {}    [line {}: {}]",
                    up.line(),
                    up.via.line,
                    up.via.text
                );
            }
        }
        for scc in &self.cycles {
            let _ = writeln!(out, "cycle of {} files: {}", scc.len(), scc.join(", "));
            let _ = writeln!(out, "  e.g. {}", self.example_cycle(scc).join(" -> "));
        }
        out
    }

    /// One loop through an SCC's first file: the shortest path back to it.
    fn example_cycle(&self, scc: &[String]) -> Vec<String> {
        let start = &scc[0];
        let inside: BTreeSet<&String> = scc.iter().collect();
        let mut prev: HashMap<&String, &String> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        while let Some(node) = queue.pop_front() {
            for (from, to) in self.edges.keys() {
                if from != node || !inside.contains(to) {
                    continue;
                }
                if to == start {
                    let mut path = vec![node.clone()];
                    let mut at = node;
                    while at != start {
                        at = prev[at];
                        path.push(at.clone());
                    }
                    path.reverse();
                    path.push(start.clone());
                    return path;
                }
                if !prev.contains_key(to) {
                    prev.insert(to, node);
                    queue.push_back(to);
                }
            }
        }
        scc.to_vec()
    }
}

/// Runs the layer check on `files` (`src/...` path, contents).
fn check(files: &[(String, String)], layers: &[(&str, u8)]) -> Report {
    let modules: BTreeSet<&str> = files.iter().map(|(path, _)| path.as_str()).collect();
    let parsed: BTreeMap<&str, Parsed> = files
        .iter()
        .map(|(path, text)| (path.as_str(), parse(path, text)))
        .collect();
    let root_names = parsed
        .get(ROOT)
        .map(|p| p.scopes[0].names.clone())
        .unwrap_or_default();

    let mut report = Report::default();
    for path in modules.iter().filter(|p| **p != ROOT) {
        match layer_of(path, layers) {
            Ok(layer) => {
                report.files.insert((*path).to_owned(), Some(layer));
            }
            Err(why) => {
                report.files.insert((*path).to_owned(), None);
                report.outside.push(format!("{path}: {why}"));
            }
        }
    }

    for (from, p) in &parsed {
        if *from == ROOT {
            continue;
        }
        for r in &p.refs {
            let Some(to) = resolve(&r.path, &modules, &root_names, 0) else {
                continue;
            };
            if to == *from || to == ROOT {
                continue;
            }
            report
                .edges
                .entry(((*from).to_owned(), to.to_owned()))
                .or_insert_with(|| r.clone());
        }
    }

    for ((from, to), via) in &report.edges {
        if let (Some(from_layer), Some(to_layer)) = (report.files[from], report.files[to]) {
            if to_layer > from_layer {
                report.upward.push(Upward {
                    from: from.clone(),
                    to: to.clone(),
                    from_layer,
                    to_layer,
                    via: via.clone(),
                });
            }
        }
    }

    report.cycles = strongly_connected(&report.files, &report.edges)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .collect();
    report
}

/// The layer of `src/<top>/...` (or of `src/<top>.rs`, a layer's module file).
fn layer_of(path: &str, layers: &[(&str, u8)]) -> Result<u8, String> {
    let rest = path.strip_prefix("src/").unwrap_or(path);
    let (top, in_folder) = match rest.split_once('/') {
        Some((folder, _)) => (folder, true),
        None => (rest.strip_suffix(".rs").unwrap_or(rest), false),
    };
    match layers.iter().find(|&&(name, _)| name == top) {
        Some(&(_, layer)) => Ok(layer),
        None if in_folder => Err(format!(
            "file outside a layer folder (`{top}` is not a layer)"
        )),
        None => Err("file outside a layer folder".to_owned()),
    }
}

/// The file an absolute module path (segments after `crate`) lives in: the longest
/// prefix that names a file. Paths that reach only the crate root follow the root's
/// `use` items (its re-exports) to where the name is defined.
fn resolve<'m>(
    path: &[String],
    modules: &BTreeSet<&'m str>,
    root_names: &BTreeMap<String, Vec<String>>,
    depth: usize,
) -> Option<&'m str> {
    for len in (1..=path.len()).rev() {
        let stem = format!("src/{}", path[..len].join("/"));
        for candidate in [format!("{stem}.rs"), format!("{stem}/mod.rs")] {
            if let Some(found) = modules.get(candidate.as_str()) {
                return Some(*found);
            }
        }
    }
    if let (Some(first), true) = (path.first(), depth < 8) {
        if let Some(target) = root_names.get(first) {
            let mut full = target.clone();
            full.extend(path[1..].iter().cloned());
            if full != path {
                return resolve(&full, modules, root_names, depth + 1);
            }
        }
    }
    modules.get(ROOT).copied()
}

/// Tarjan's strongly connected components of the file graph.
fn strongly_connected(
    nodes: &BTreeMap<String, Option<u8>>,
    edges: &BTreeMap<(String, String), Ref>,
) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        adjacent: BTreeMap<&'a str, Vec<&'a str>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            let successors = self.adjacent.get(v).cloned().unwrap_or_default();
            for w in successors {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                scc.sort();
                self.out.push(scc);
            }
        }
    }

    let mut adjacent: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        adjacent.entry(from).or_default().push(to);
    }
    let mut tarjan = Tarjan {
        adjacent,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for node in nodes.keys() {
        if !tarjan.index.contains_key(node.as_str()) {
            tarjan.visit(node);
        }
    }
    tarjan.out.sort();
    tarjan.out
}

// ---------------------------------------------------------------------------
// The parser: comments and literals out, tokens, modules, `use` trees, paths.
// ---------------------------------------------------------------------------

/// A reference to a module path of this crate, as found in one file.
#[derive(Clone, Debug)]
struct Ref {
    /// Absolute: the segments after `crate`.
    path: Vec<String>,
    line: usize,
    /// The path as written.
    text: String,
}

/// A module inside one file: the file's own, or an inline `mod x { }`.
#[derive(Debug, Default)]
struct Scope {
    /// Absolute module path.
    module: Vec<String>,
    /// Names that lead to modules of this crate: declared child modules and
    /// `use` bindings, each to its absolute path.
    names: BTreeMap<String, Vec<String>>,
    uses: Vec<UseLeaf>,
}

/// One leaf of a `use` tree: `use a::{b::c as d, e::*}` has two.
#[derive(Clone, Debug)]
struct UseLeaf {
    /// Segments as written, `crate`/`super`/`self` included.
    segments: Vec<String>,
    /// The name it binds (None for globs and `as _`).
    binds: Option<String>,
    glob: bool,
    line: usize,
}

#[derive(Debug)]
struct Parsed {
    scopes: Vec<Scope>,
    refs: Vec<Ref>,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

/// The module path of a file: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`.
fn module_of(path: &str) -> Vec<String> {
    let rest = path.strip_prefix("src/").unwrap_or(path);
    let rest = rest.strip_suffix(".rs").unwrap_or(rest);
    if path == ROOT {
        return Vec::new();
    }
    let mut segments: Vec<String> = rest.split('/').map(str::to_owned).collect();
    if segments.last().map(String::as_str) == Some("mod") {
        segments.pop();
    }
    segments
}

fn parse(path: &str, text: &str) -> Parsed {
    let tokens = tokenize(&strip(text));
    let (mut scopes, scope_of, in_use) = collect_items(&tokens, module_of(path));
    bind_names(&mut scopes);

    let mut refs = Vec::new();
    for scope in &scopes {
        for leaf in &scope.uses {
            if let Some(abs) = absolute(&leaf.segments, scope) {
                refs.push(Ref {
                    path: abs,
                    line: leaf.line,
                    text: leaf.segments.join("::"),
                });
            }
        }
    }

    // Paths in the code outside `use` items.
    let mut i = 0;
    while i < tokens.len() {
        let starts_path = !in_use[i]
            && matches!(tokens[i].0, Tok::Ident(_))
            && tokens.get(i + 1).map(|t| &t.0) == Some(&Tok::Path)
            && !(i > 0 && matches!(tokens[i - 1].0, Tok::Path | Tok::Punct('.')));
        if !starts_path {
            i += 1;
            continue;
        }
        let mut segments = Vec::new();
        let mut j = i;
        while let Some((Tok::Ident(name), _)) = tokens.get(j) {
            segments.push(name.clone());
            if tokens.get(j + 1).map(|t| &t.0) == Some(&Tok::Path)
                && matches!(tokens.get(j + 2), Some((Tok::Ident(_), _)))
            {
                j += 2;
            } else {
                break;
            }
        }
        if let Some(abs) = absolute(&segments, &scopes[scope_of[i]]) {
            refs.push(Ref {
                path: abs,
                line: tokens[i].1,
                text: segments.join("::"),
            });
        }
        i = j + 1;
    }
    Parsed { scopes, refs }
}

/// Pass one: the scopes (inline modules), `mod` declarations and `use` leaves.
/// Returns the scopes, each token's scope, and whether each token is in a `use`.
fn collect_items(
    tokens: &[(Tok, usize)],
    module: Vec<String>,
) -> (Vec<Scope>, Vec<usize>, Vec<bool>) {
    let mut scopes = vec![Scope {
        module,
        ..Scope::default()
    }];
    let mut scope_of = vec![0; tokens.len()];
    let mut in_use = vec![false; tokens.len()];
    // (scope, brace depth inside its braces)
    let mut open: Vec<(usize, usize)> = vec![(0, 0)];
    let mut depth = 0;
    let ident = |i: usize| match tokens.get(i) {
        Some((Tok::Ident(name), _)) => Some(name.as_str()),
        _ => None,
    };
    let punct = |i: usize, c: char| tokens.get(i).map(|t| &t.0) == Some(&Tok::Punct(c));

    let mut i = 0;
    while i < tokens.len() {
        let current = open.last().map_or(0, |&(s, _)| s);
        scope_of[i] = current;
        match &tokens[i].0 {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if open.len() > 1 && open.last().map(|&(_, d)| d) == Some(depth) {
                    open.pop();
                }
                depth = depth.saturating_sub(1);
            }
            // `pub(in crate::x)` names an ancestor for visibility: not an import.
            Tok::Ident(kw) if kw == "pub" && punct(i + 1, '(') => {
                let start = i;
                while i + 1 < tokens.len() && !punct(i, ')') {
                    i += 1;
                }
                in_use[start..=i].fill(true);
                scope_of[start..=i].fill(current);
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let Some(name) = ident(i + 1) {
                    let child = {
                        let mut m = scopes[current].module.clone();
                        m.push(name.to_owned());
                        m
                    };
                    scopes[current].names.insert(name.to_owned(), child.clone());
                    if punct(i + 2, '{') {
                        scope_of[i + 1] = current;
                        scope_of[i + 2] = current;
                        depth += 1;
                        scopes.push(Scope {
                            module: child,
                            ..Scope::default()
                        });
                        open.push((scopes.len() - 1, depth));
                        i += 3;
                        continue;
                    }
                }
            }
            Tok::Ident(kw) if kw == "use" => {
                let start = i;
                i += 1;
                if tokens.get(i).map(|t| &t.0) == Some(&Tok::Path) {
                    i += 1; // `use ::std::...`: an extern crate
                }
                let mut leaves = Vec::new();
                use_tree(tokens, &mut i, &[], &mut leaves);
                while i < tokens.len() && !punct(i, ';') {
                    i += 1;
                }
                let end = i.min(tokens.len() - 1);
                in_use[start..=end].fill(true);
                scope_of[start..=end].fill(current);
                scopes[current].uses.extend(leaves);
            }
            _ => {}
        }
        i += 1;
    }
    (scopes, scope_of, in_use)
}

/// Parses one use tree at `tokens[*i]` with `prefix` before it.
fn use_tree(tokens: &[(Tok, usize)], i: &mut usize, prefix: &[String], out: &mut Vec<UseLeaf>) {
    let mut segments = prefix.to_vec();
    let line = tokens.get(*i).map_or(0, |t| t.1);
    loop {
        match tokens.get(*i).map(|t| &t.0) {
            Some(Tok::Ident(name)) => {
                segments.push(name.clone());
                *i += 1;
                if tokens.get(*i).map(|t| &t.0) == Some(&Tok::Path) {
                    *i += 1;
                    continue;
                }
                let mut binds = segments.last().cloned();
                if binds.as_deref() == Some("self") {
                    segments.pop();
                    binds = segments.last().cloned();
                }
                if let (Some(Tok::Ident(kw)), Some(Tok::Ident(alias))) = (
                    tokens.get(*i).map(|t| &t.0),
                    tokens.get(*i + 1).map(|t| &t.0),
                ) {
                    if kw == "as" {
                        binds = (alias != "_").then(|| alias.clone());
                        *i += 2;
                    }
                }
                out.push(UseLeaf {
                    segments,
                    binds,
                    glob: false,
                    line,
                });
                return;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push(UseLeaf {
                    segments,
                    binds: None,
                    glob: true,
                    line,
                });
                return;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match tokens.get(*i).map(|t| &t.0) {
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        None => return,
                        Some(_) => {
                            let before = *i;
                            use_tree(tokens, i, &segments, out);
                            if *i == before {
                                *i += 1; // not a use tree: step over it
                            }
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

/// Fills each scope's names with its `use` bindings that lead into this crate,
/// and with an enclosing scope's names when it glob-imports that scope
/// (`mod tests { use super::*; }`).
fn bind_names(scopes: &mut [Scope]) {
    for _ in 0..8 {
        let mut changed = false;
        for s in 0..scopes.len() {
            let mut add: Vec<(String, Vec<String>)> = Vec::new();
            for leaf in &scopes[s].uses {
                let Some(abs) = absolute(&leaf.segments, &scopes[s]) else {
                    continue;
                };
                if leaf.glob {
                    for other in scopes.iter().filter(|o| o.module == abs) {
                        add.extend(other.names.clone());
                    }
                } else if let Some(name) = &leaf.binds {
                    add.push((name.clone(), abs));
                }
            }
            for (name, abs) in add {
                if let Entry::Vacant(slot) = scopes[s].names.entry(name) {
                    slot.insert(abs);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
}

/// The absolute path (after `crate`) of a path as written in `scope`, or None
/// when it leads outside this crate (std, extern crates, locals).
fn absolute(segments: &[String], scope: &Scope) -> Option<Vec<String>> {
    let (first, rest) = segments.split_first()?;
    let mut abs = match first.as_str() {
        "crate" => Vec::new(),
        "self" => scope.module.clone(),
        "super" => {
            let mut m = scope.module.clone();
            m.pop()?;
            m
        }
        name => scope.names.get(name)?.clone(),
    };
    let mut rest = rest.iter().peekable();
    while rest.peek().map(|s| s.as_str()) == Some("super") {
        abs.pop()?;
        rest.next();
    }
    abs.extend(rest.cloned());
    Some(abs)
}

/// Blanks comments and string/char literals (keeping newlines), so that only
/// code is left.
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let is_ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let prev_ident = i > 0 && is_ident(c[i - 1]);
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut nest = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    nest += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    nest -= 1;
                    out.push_str("  ");
                    i += 2;
                    if nest == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (!prev_ident || (i >= 1 && c[i - 1] == 'b' && !(i >= 2 && is_ident(c[i - 2]))))
            && matches!(c.get(i + 1), Some('"' | '#'))
            && {
                let mut k = i + 1;
                while c.get(k) == Some(&'#') {
                    k += 1;
                }
                c.get(k) == Some(&'"')
            }
        {
            // Raw string r"..", r#".."#, br"..".
            let mut hashes = 0;
            i += 1;
            out.push(' ');
            while c[i] == '#' {
                hashes += 1;
                i += 1;
                out.push(' ');
            }
            i += 1; // opening quote
            out.push(' ');
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|h| c.get(i + h) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && c.get(i + 1) == Some(&'\\') {
            // Escaped char literal: '\n', '\'', '\u{..}'.
            out.push_str("  ");
            i += 2;
            if i < c.len() {
                out.push(' ');
                i += 1;
            }
            while i < c.len() && c[i] != '\'' {
                blank(&mut out, c[i]);
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            // Char literal 'x' (a lifetime 'a is left as it is).
            out.push_str("   ");
            i += 3;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Identifiers, `::` and single punctuation, each with its line (from 1).
fn tokenize(code: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphabetic() || ch == '_' {
            if ch == 'r' && c.get(i + 1) == Some(&'#') {
                i += 2; // raw identifier r#name
            }
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            tokens.push((Tok::Ident(c[start..i].iter().collect()), line));
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            tokens.push((Tok::Path, line));
            i += 2;
        } else {
            tokens.push((Tok::Punct(ch), line));
            i += 1;
        }
    }
    tokens
}
