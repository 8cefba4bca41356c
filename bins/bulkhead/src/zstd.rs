//! zstd-compressed image layers (`application/vnd.oci.image.layer.v1.tar+zstd`), decoded
//! with the pure-Rust `ruzstd` crate. A layer may hold several frames, and skippable
//! frames between them: `zstd:chunked` layers (podman, buildah) are made that way. Each
//! frame is decoded in turn, and each skippable frame is read past, until the end.

use std::io::{self, BufRead, BufReader, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// Every frame of a zstd stream, decoded in order, as one `Read`.
pub struct Frames<R: Read> {
    src: BufReader<R>,
    dec: FrameDecoder,
    in_frame: bool,
}

impl<R: Read> Frames<R> {
    pub fn new(src: R) -> Frames<R> {
        Frames {
            src: BufReader::with_capacity(1 << 16, src),
            dec: FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: Read> Read for Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                if self.dec.can_collect() > 0 {
                    return self.dec.read(buf);
                }
                if self.dec.is_finished() {
                    // The frame's own checksum, when it carries one.
                    if let (Some(want), Some(got)) = (
                        self.dec.get_checksum_from_data(),
                        self.dec.get_calculated_checksum(),
                    ) {
                        if want != got {
                            return Err(bad("zstd: frame checksum mismatch".into()));
                        }
                    }
                    self.in_frame = false;
                    continue;
                }
                self.dec
                    .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBytes(buf.len()))
                    .map_err(|e| bad(format!("zstd: {e}")))?;
                continue;
            }
            // Between frames: the end of the stream, or the next frame's header.
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped =
                        io::copy(&mut (&mut self.src).take(length.into()), &mut io::sink())?;
                    if skipped != u64::from(length) {
                        return Err(bad("zstd: a skippable frame runs past the end".into()));
                    }
                }
                Err(e) => return Err(bad(format!("zstd: {e}"))),
            }
        }
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// `data` compressed by the zstd command (what skopeo and podman make is the same
    /// format).
    fn zstd_cli(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut c = Command::new("zstd")
            .args(["-q", "-c", "-3", "--check"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the zstd command (scripts/install-deps.sh installs it)");
        let mut w = c.stdin.take().unwrap();
        let input = data.to_vec();
        let t = std::thread::spawn(move || w.write_all(&input).unwrap());
        let out = c.wait_with_output().unwrap();
        t.join().unwrap();
        assert!(out.status.success());
        out.stdout
    }

    fn decode(z: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = vec![];
        Frames::new(z).read_to_end(&mut out)?;
        Ok(out)
    }

    fn sample(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 7) as u8)
            .collect()
    }

    #[test]
    fn one_frame() {
        let data = sample(300_000, 7);
        assert_eq!(decode(&zstd_cli(&data)).unwrap(), data);
    }

    #[test]
    fn several_frames_with_skippable_frames_between() {
        let (a, b) = (sample(100_000, 3), sample(70_000, 11));
        let mut z = zstd_cli(&a);
        // A skippable frame, as zstd:chunked puts its table of contents.
        z.extend(0x184D_2A50u32.to_le_bytes());
        z.extend(5u32.to_le_bytes());
        z.extend(b"hello");
        z.extend(zstd_cli(&b));
        let mut want = a;
        want.extend(b);
        assert_eq!(decode(&z).unwrap(), want);
        assert_eq!(decode(&[]).unwrap(), b"");
    }

    #[test]
    fn damage_is_an_error_not_a_short_layer() {
        let z = zstd_cli(&sample(200_000, 5));
        // Cut short.
        assert!(decode(&z[..z.len() / 2]).is_err());
        // One byte of incompressible content changed: zstd stores such data as raw
        // blocks, so only the frame's checksum can tell.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let raw: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut z = zstd_cli(&raw);
        let at = z.len() - 100;
        z[at] ^= 0x55;
        assert!(decode(&z).is_err(), "a damaged frame decoded");
        // Not zstd at all.
        let e = decode(b"plainly not zstd").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // A skippable frame that claims more than there is.
        let mut s = 0x184D_2A5Fu32.to_le_bytes().to_vec();
        s.extend(1000u32.to_le_bytes());
        s.extend(b"short");
        assert!(decode(&s).is_err());
    }
}
