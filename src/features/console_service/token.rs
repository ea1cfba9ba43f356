//! The secret that TCP and web viewers present.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// A secret compared in constant time.
#[derive(Clone)]
pub(crate) struct Token(String);

impl Token {
    /// 128 random bits from the operating system, in hex.
    pub(crate) fn random() -> io::Result<Token> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(io::Error::other)?;
        Ok(Token(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The token in `path`, or a new one written there (mode 0600) if it does not
    /// exist.
    pub(crate) fn from_file(path: &Path) -> io::Result<Token> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let token = text.trim().to_owned();
                if token.is_empty() || token.contains(char::is_whitespace) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the token must be one word",
                    ));
                }
                if fs::metadata(path)?.mode() & 0o077 != 0 {
                    log::warn!("{}: readable by others; chmod 600 it", path.display());
                }
                Ok(Token(token))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let token = Token::random()?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                writeln!(file, "{}", token.0)?;
                Ok(token)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `given` is the token, in time that does not depend on where they
    /// differ.
    pub(crate) fn matches(&self, given: &[u8]) -> bool {
        constant_time_eq::constant_time_eq(given, self.0.as_bytes())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_itself() {
        let token = Token::random().unwrap();
        assert_eq!(token.as_str().len(), 32);
        assert!(token.matches(token.as_str().as_bytes()));
        assert!(!token.matches(b""));
        assert!(!token.matches(&token.as_str().as_bytes()[1..]));
        assert_ne!(token.as_str(), Token::random().unwrap().as_str());
    }

    #[test]
    fn a_missing_file_gets_a_new_private_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let made = Token::from_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(Token::from_file(&path)
            .unwrap()
            .matches(made.as_str().as_bytes()));
        fs::write(&path, "two words\n").unwrap();
        assert!(Token::from_file(&path).is_err());
    }
}
