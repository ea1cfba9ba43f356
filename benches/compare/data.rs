//! The bytes every transfer moves: a pure function of their offset, so that a
//! receiver checks each byte as it arrives and an uploaded volume is checked
//! afterwards, without storing any reference copy.

const SEED: u64 = 0x5eed_1e55_f00d_cafe;

/// The 8 bytes at `8 * index`: distinct for every index (an odd multiplier is a
/// bijection), so a byte in the wrong place or a wrong byte is caught, and cheap
/// enough (one multiply, vectorized) that checking costs little next to the
/// transfer itself.
#[inline(always)]
fn word(index: u64) -> u64 {
    index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ SEED
}

#[inline]
fn byte(offset: u64) -> u8 {
    word(offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Fills `buf` with the bytes at `offset..`.
pub(crate) fn fill(offset: u64, buf: &mut [u8]) {
    let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
    for (i, b) in buf[..head].iter_mut().enumerate() {
        *b = byte(offset + i as u64);
    }
    let mut index = (offset + head as u64) / 8;
    let mut blocks = buf[head..].chunks_exact_mut(512);
    for block in &mut blocks {
        for (k, chunk) in block.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&word(index + k as u64).to_le_bytes());
        }
        index += 64;
    }
    let mut chunks = blocks.into_remainder().chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word(index).to_le_bytes());
        index += 1;
    }
    let tail = chunks.into_remainder();
    let tail_offset = index * 8;
    for (i, b) in tail.iter_mut().enumerate() {
        *b = byte(tail_offset + i as u64);
    }
}

/// Whether `buf` holds exactly the bytes at `offset..`.
pub(crate) fn check(offset: u64, buf: &[u8]) -> bool {
    let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
    if buf[..head]
        .iter()
        .enumerate()
        .any(|(i, &b)| b != byte(offset + i as u64))
    {
        return false;
    }
    let mut index = (offset + head as u64) / 8;
    // Blocks of 64 words, compared without branches so that the loop vectorizes.
    let mut blocks = buf[head..].chunks_exact(512);
    for block in &mut blocks {
        let mut diff = 0u64;
        for (k, chunk) in block.chunks_exact(8).enumerate() {
            let got = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            diff |= got ^ word(index + k as u64);
        }
        if diff != 0 {
            return false;
        }
        index += 64;
    }
    let mut chunks = blocks.remainder().chunks_exact(8);
    for chunk in &mut chunks {
        let got = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if got != word(index) {
            return false;
        }
        index += 1;
    }
    let tail_offset = index * 8;
    chunks
        .remainder()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == byte(tail_offset + i as u64))
}

/// Writes the bytes at `base..base + len` into `file` from its start.
pub(crate) fn write_file(file: &std::fs::File, base: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (4 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        fill(base + done, &mut buf[..n]);
        file.write_all_at(&buf[..n], done)?;
        done += n as u64;
    }
    Ok(())
}

/// Checks that the file at `path` starts with the bytes at `base..base + len`.
pub(crate) fn check_file(path: &std::path::Path, base: u64, len: u64) -> Result<(), String> {
    use std::io::Read;
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(fail)?;
    let mut buf = vec![0u8; (4 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..n]).map_err(fail)?;
        if !check(base + done, &buf[..n]) {
            return Err(format!(
                "{}: wrong bytes in {}..{}",
                path.display(),
                done,
                done + n as u64
            ));
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fill_and_check_agree_at_any_alignment() {
        let mut whole = vec![0u8; 3000];
        super::fill(3, &mut whole);
        for start in 0..20 {
            for len in [0, 1, 7, 8, 9, 100, 600, 1500] {
                let mut part = vec![0u8; len];
                super::fill(3 + start as u64, &mut part);
                assert_eq!(part, whole[start..start + len]);
                assert!(super::check(3 + start as u64, &part));
            }
        }
        for bad in [2, 500, 1900, 2999] {
            whole[bad] ^= 1;
            assert!(!super::check(3, &whole));
            whole[bad] ^= 1;
        }
        assert!(super::check(3, &whole));
    }
}
