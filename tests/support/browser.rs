//! A real browser for tests: Debian's headless Chromium, driven over WebDriver by
//! `chromedriver` (packages `chromium` and `chromium-driver`, installed by
//! scripts/setup-host.sh) through `fantoccini`.
//!
//! The calls block (each runs on the browser's own current-thread tokio runtime),
//! so plain `#[test]`s can use it next to blocking helpers. A failure panics with
//! what was awaited and the path of a screenshot taken then.
//!
//! Not in `support/mod.rs`, so that the test binaries that do not need a browser
//! do not build one in: use it as `mod support { pub mod browser; }`.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::elements::Element;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

/// How long anything awaited may take: generous, only a failure waits this long.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// One headless Chromium and the chromedriver that runs it; both end on drop.
pub struct Browser {
    runtime: Runtime,
    client: Option<Client>,
    driver: Child,
    /// Where the driver's log and failure screenshots go.
    dir: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session.
    pub fn start() -> Browser {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "browser-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = dir.join("chromedriver.log");
        let mut driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("browser: cannot run chromedriver ({err}): run scripts/setup-host.sh")
            });
        let listening = Instant::now() + PATIENCE;
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some(status) = driver.try_wait().unwrap() {
                panic!(
                    "browser: chromedriver exited ({status}); see {}",
                    log.display()
                );
            }
            assert!(
                Instant::now() < listening,
                "browser: chromedriver not listening on {port}; see {}",
                log.display()
            );
            sleep(Duration::from_millis(50));
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": "/usr/bin/chromium",
                // No sandbox: the tests run as root. The rest keeps Chromium from
                // needing a GPU or a large /dev/shm.
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,800",
                ],
            }),
        );
        let client = runtime
            .block_on(
                ClientBuilder::new(HttpConnector::new())
                    .capabilities(capabilities)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .unwrap_or_else(|err| {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!(
                    "browser: no Chromium session ({err}); see {}",
                    log.display()
                )
            });
        Browser {
            runtime,
            client: Some(client),
            driver,
            dir,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the session lives until drop")
    }

    /// Opens `url` and waits for it to load.
    pub fn goto(&self, url: &str) {
        let result = self.runtime.block_on(self.client().goto(url));
        self.check(result, &format!("open {url}"));
    }

    /// The first element matching `css`, waiting for it to appear.
    fn element(&self, css: &str) -> Element {
        self.wait_until(&format!("an element {css}"), |browser| {
            browser
                .runtime
                .block_on(browser.client().find(Locator::Css(css)))
                .ok()
        })
    }

    /// Waits until an element matches `css`.
    pub fn wait_for(&self, css: &str) {
        self.element(css);
    }

    /// Clicks the element matching `css` (once it is there).
    pub fn click(&self, css: &str) {
        let element = self.element(css);
        let result = self.runtime.block_on(element.click());
        self.check(result, &format!("click {css}"));
    }

    /// Types `text` as key presses into whatever has the focus, as a person does,
    /// e.g. xterm.js's hidden textarea after a click on the terminal. `\n` is the
    /// Enter key; [`Key`]s can be given as chars (`char::from(Key::Escape)`).
    pub fn type_keys(&self, text: &str) {
        let mut keys = KeyActions::new("keyboard".to_owned());
        for c in text.chars() {
            let value = if c == '\n' { Key::Enter.into() } else { c };
            keys = keys
                .then(KeyAction::Down { value })
                .then(KeyAction::Up { value });
        }
        let result = self.runtime.block_on(self.client().perform_actions(keys));
        self.check(result, &format!("type {text:?}"));
    }

    /// Runs `script` (a function body: `return` gives the result) in the page.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        let result = self.runtime.block_on(self.client().execute(script, args));
        self.check(result, &format!("run {script:?}"))
    }

    /// The rows an xterm.js terminal (DOM renderer) shows now, one line each,
    /// without trailing blanks: the screen as a person sees it.
    pub fn screen_text(&self, terminal_css: &str) -> String {
        let rows = self.execute(
            "const rows = document.querySelector(arguments[0] + ' .xterm-rows');
             if (!rows) return null;
             return Array.from(rows.children, (row) =>
                 row.textContent.replace(/\\u00a0/g, ' ').trimEnd()).join('\\n').trimEnd();",
            vec![json!(terminal_css)],
        );
        rows.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the terminal in `terminal_css` shows `needle`; returns its screen.
    pub fn wait_for_screen(&self, terminal_css: &str, needle: &str) -> String {
        self.wait_until(&format!("{needle:?} in {terminal_css}"), |browser| {
            Some(browser.screen_text(terminal_css)).filter(|text| text.contains(needle))
        })
    }

    /// Waits until `probe` gives something, polling; panics after [`PATIENCE`]
    /// with `what` and a screenshot.
    pub fn wait_until<T>(&self, what: &str, mut probe: impl FnMut(&Browser) -> Option<T>) -> T {
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(found) = probe(self) {
                return found;
            }
            if Instant::now() > until {
                panic!("browser: no {what} within {PATIENCE:?}{}", self.evidence());
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub fn screenshot(&self, path: &Path) {
        let png = self.runtime.block_on(self.client().screenshot());
        let png = self.check(png, "take a screenshot");
        std::fs::write(path, png).unwrap();
    }

    /// The value of a finished command, or a panic that says what failed.
    fn check<T, E: std::fmt::Display>(&self, result: Result<T, E>, what: &str) -> T {
        result.unwrap_or_else(|err| panic!("browser: {what}: {err}{}", self.evidence()))
    }

    /// Where to look after a failure: a screenshot of it and the driver's log.
    fn evidence(&self) -> String {
        let shot = self.dir.join("failure.png");
        let saved = self
            .runtime
            .block_on(self.client().screenshot())
            .ok()
            .and_then(|png| std::fs::write(&shot, png).ok());
        let shot = match saved {
            Some(()) => format!("; screenshot {}", shot.display()),
            None => String::new(),
        };
        format!(
            "{shot}; driver log {}",
            self.dir.join("chromedriver.log").display()
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session ends Chromium; then the driver goes.
        if let Some(client) = self.client.take() {
            let closed = self
                .runtime
                .block_on(async { tokio::time::timeout(PATIENCE, client.close()).await });
            if !matches!(closed, Ok(Ok(()))) {
                eprintln!("browser: the session did not close cleanly");
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}
