//! `console_mux`'s side of the terminal: in a terminal, a line editor (rustyline)
//! with history, completion of `@NAME` and `:use NAME`, guest output printed above
//! the prompt, and Ctrl-] that quits at once; with stdin piped, plain lines, as
//! scripts expect.

use std::io::{self, IsTerminal, Write};

use nix::sys::termios::{self, SetArg, Termios};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Cmd, CompletionType, Config, Context, Editor, ExternalPrinter, Helper, KeyEvent};

/// Ctrl-]: a line holding it ends piped input, as `virsh console`'s escape key.
const ESCAPE: char = '\u{1d}';

/// What the user typed.
pub enum Typed {
    Line(String),
    /// The end of input (or a piped line with Ctrl-] in it).
    End,
    /// Ctrl-] (or Ctrl-C) at the prompt: quit now.
    Quit,
}

/// Where the user's lines come from.
pub enum Input {
    Plain,
    Editor(Box<Editor<Names, DefaultHistory>>),
}

/// Where lines for the user go: stdout, or above the line editor's prompt.
pub enum Screen {
    Stdout,
    AbovePrompt(Box<dyn ExternalPrinter + Send>),
}

/// The terminal's mode before the line editor ran, put back when dropped: at exit
/// the editor may still be reading, in raw mode, its prompt last on the screen
/// (after a signal, a lost daemon).
pub struct TerminalMode(Termios);

/// The input, the screen, and (with the line editor) the mode to restore: the line
/// editor when stdin and stdout are both terminals.
pub fn open() -> rustyline::Result<(Input, Screen, Option<TerminalMode>)> {
    if !(io::stdin().is_terminal() && io::stdout().is_terminal()) {
        return Ok((Input::Plain, Screen::Stdout, None));
    }
    let mode = TerminalMode(termios::tcgetattr(io::stdin()).map_err(io::Error::from)?);
    let config = Config::builder()
        .auto_add_history(true)
        .completion_type(CompletionType::List)
        .build();
    let mut editor = Editor::with_config(config)?;
    editor.bind_sequence(KeyEvent::ctrl(']'), Cmd::Interrupt);
    let printer = editor.create_external_printer()?;
    Ok((
        Input::Editor(Box::new(editor)),
        Screen::AbovePrompt(Box::new(printer)),
        Some(mode),
    ))
}

impl Input {
    /// Completes `@NAME` and `:use NAME` with the names `names` gives at the time.
    pub fn complete_with(&mut self, names: impl Fn() -> Vec<String> + Send + 'static) {
        if let Input::Editor(editor) = self {
            editor.set_helper(Some(Names(Box::new(names))));
        }
    }

    /// The next line, showing `prompt` in the line editor.
    pub fn read(&mut self, prompt: &str) -> Typed {
        match self {
            Input::Plain => match io::stdin().lines().next() {
                Some(Ok(line)) if !line.contains(ESCAPE) => Typed::Line(line),
                _ => Typed::End,
            },
            Input::Editor(editor) => match editor.readline(prompt) {
                Ok(line) => Typed::Line(line),
                Err(ReadlineError::Interrupted) => Typed::Quit,
                // Ctrl-D on an empty line, or the terminal is gone.
                Err(_) => Typed::End,
            },
        }
    }

    /// How to quit, for the ready line.
    pub fn quit_hint(&self) -> &'static str {
        match self {
            Input::Plain => "Ctrl-] or end of input quits.",
            Input::Editor(_) => {
                "Tab completes, Up recalls; Ctrl-] quits at once, Ctrl-D at an empty prompt too."
            }
        }
    }
}

impl Screen {
    /// Prints `line` and a newline.
    pub fn line(&mut self, line: String) {
        // Nobody is left to tell when the terminal is gone.
        let _ = match self {
            Screen::Stdout => writeln!(io::stdout().lock(), "{line}"),
            Screen::AbovePrompt(printer) => printer.print(line + "\n").map_err(io::Error::other),
        };
    }
}

impl Drop for TerminalMode {
    fn drop(&mut self) {
        let stdin = io::stdin();
        if termios::tcgetattr(&stdin).is_ok_and(|now| now != self.0) {
            let _ = termios::tcsetattr(&stdin, SetArg::TCSADRAIN, &self.0);
            let _ = writeln!(io::stdout()); // below the prompt
        }
    }
}

/// The line editor's helper: completion of the names it is given.
pub struct Names(Box<dyn Fn() -> Vec<String> + Send>);

impl Completer for Names {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let before = &line[..pos];
        let mut names = (self.0)();
        names.sort();
        Ok(if let Some(partial) = before.strip_prefix(":use ") {
            (":use ".len(), starting(names, partial, ""))
        } else if let Some(partial) = before.strip_prefix('@').filter(|p| !p.contains(' ')) {
            names.push("all".to_owned());
            ("@".len(), starting(names, partial, " "))
        } else if before.starts_with(':') && !before.contains(' ') {
            (
                0,
                starting(vec![":use ".into(), ":list".into()], before, ""),
            )
        } else {
            (pos, Vec::new())
        })
    }
}

/// The `words` that start with `partial`, each followed by `after`.
fn starting(words: Vec<String>, partial: &str, after: &str) -> Vec<String> {
    words
        .into_iter()
        .filter(|word| word.starts_with(partial))
        .map(|word| word + after)
        .collect()
}

impl Hinter for Names {
    type Hint = String;
}
impl Highlighter for Names {}
impl Validator for Names {}
impl Helper for Names {}
