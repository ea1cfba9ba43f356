//! The browser helper (tests/support/browser.rs) in real headless Chromium, on
//! pages of our own: typing, clicking and reading back, screenshots, and the
//! vendored xterm.js taking keys and showing them. The service's own page is
//! tested against the running service once it exists.

mod support {
    pub mod browser;
}

use std::fs;
use std::path::{Path, PathBuf};

use support::browser::Browser;

/// A file of its own under the test's target tmp dir.
fn page(name: &str, html: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console_web");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.html", std::process::id()));
    fs::write(&path, html).unwrap();
    path
}

fn url(path: &Path) -> String {
    format!("file://{}", path.display())
}

#[test]
fn browser_types_clicks_reads_back_and_takes_screenshots() {
    let path = page(
        "form",
        r#"<!doctype html><meta charset="utf-8"><title>form</title>
        <input id="name"><button id="go" type="button">go</button>
        <p id="echo"></p><p id="clicked">not yet</p>
        <script>
          const $ = (id) => document.getElementById(id);
          $("name").addEventListener("input", () => { $("echo").textContent = $("name").value; });
          $("go").addEventListener("click", () => { $("clicked").textContent = "clicked " + $("name").value; });
        </script>"#,
    );
    let browser = Browser::start();
    browser.goto(&url(&path));
    browser.type_into("#name", "héllo, browser");
    assert_eq!(browser.value("#name"), "héllo, browser");
    // The page's own script saw every key.
    assert_eq!(browser.text("#echo"), "héllo, browser");
    assert_eq!(browser.text("#clicked"), "not yet");
    browser.click("#go");
    assert_eq!(browser.text("#clicked"), "clicked héllo, browser");
    assert_eq!(browser.attr("#go", "type").as_deref(), Some("button"));
    let title = browser.execute("return document.title + ':' + arguments[0]", vec![1.into()]);
    assert_eq!(title, "form:1");

    let shot = path.with_extension("png");
    browser.screenshot(&shot);
    let png = fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // IHDR: as wide as the window (--window-size=1280,800), and not empty.
    assert_eq!(&png[16..20], &1280u32.to_be_bytes());
    assert!(u32::from_be_bytes(png[20..24].try_into().unwrap()) > 0);
}

#[test]
fn vendored_xterm_takes_keys_and_shows_them() {
    let xterm = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/web/xterm");
    let path = page(
        "xterm",
        &format!(
            r#"<!doctype html><meta charset="utf-8"><title>xterm</title>
            <link rel="stylesheet" href="file://{dir}/xterm.css">
            <script src="file://{dir}/xterm.js"></script>
            <div id="terminal"></div>
            <script>
              // A local echo, as a guest's shell does: Enter is CR, shown as CRLF.
              const term = new Terminal();
              term.open(document.getElementById("terminal"));
              term.onData((data) => term.write(data.replace(/\r/g, "\r\n")));
              term.write("ready$ ");
            </script>"#,
            dir = xterm.display()
        ),
    );
    let browser = Browser::start();
    browser.goto(&url(&path));
    browser.wait_for("#terminal .xterm-helper-textarea");
    browser.wait_for_screen("#terminal", "ready$");
    browser.click("#terminal");
    browser.type_keys("echo hi\nsecond line");
    let screen = browser.wait_for_screen("#terminal", "second line");
    assert_eq!(screen, "ready$ echo hi\nsecond line", "{screen}");
}
