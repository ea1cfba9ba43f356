//! Streaming checksums: the digest grows as the bytes flow through a transfer.

use std::sync::{Arc, Mutex};

use clap::ValueEnum;
use sha2::Digest as _;
use virt_reactor::volume::Tap;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Algorithm {
    Sha256,
    Blake3,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
        }
    }
}

enum State {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

/// A digest being computed, shared between a transfer (as its tap) and the program.
#[derive(Clone)]
pub struct Digest(Arc<Mutex<State>>);

impl Digest {
    pub fn new(algorithm: Algorithm) -> Digest {
        let state = match algorithm {
            Algorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
            Algorithm::Blake3 => State::Blake3(Box::default()),
        };
        Digest(Arc::new(Mutex::new(state)))
    }

    fn update(&self, bytes: &[u8]) {
        match &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Sha256(h) => h.update(bytes),
            State::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// The digest of what it saw so far, in lower-case hex.
    pub fn hex(&self) -> String {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Sha256(h) => h
                .clone()
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            State::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

impl Tap for Digest {
    fn data(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }

    fn hole(&mut self, mut length: u64) {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        while length > 0 {
            let n = length.min(ZEROS.len() as u64) as usize;
            self.update(&ZEROS[..n]);
            length -= n as u64;
        }
    }
}
