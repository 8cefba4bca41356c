//! Length-prefixed frames: `u32` little-endian length, then that many payload bytes.

use std::io::{self, Read, Write};

/// Largest payload either side accepts. A declared length above this is refused before
/// anything is allocated or read.
pub const MAX_FRAME: u32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("cannot decode message: {0}")]
    Decode(String),
}

/// The payload length a frame's 4-byte prefix declares, refused above [`MAX_FRAME`]
/// before anything is allocated: for a reader that reads the prefix itself (an async
/// one), as [`read_frame`] does.
pub fn payload_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len as usize)
}

/// Read one frame's payload. Returns [`FrameError::Closed`] on a clean EOF before the
/// length prefix.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; payload_len(len)?];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Write one frame.
pub fn write_frame<W: Write>(w: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(
            payload.len().min(u32::MAX as usize) as u32
        ))?;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), b"hello");
        assert_eq!(read_frame(&mut r).unwrap(), b"");
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn oversized_declared_length_is_refused_without_reading() {
        let bytes = (MAX_FRAME + 1).to_le_bytes();
        let mut r = &bytes[..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1));
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        buf.truncate(6);
        let mut r = &buf[..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        let mut r = &buf[..2];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
    }

    #[test]
    fn oversized_payload_is_not_written() {
        let big = vec![0u8; MAX_FRAME as usize + 1];
        let mut out = Vec::new();
        assert!(matches!(
            write_frame(&mut out, &big),
            Err(FrameError::TooLarge(_))
        ));
        assert!(out.is_empty());
    }
}
