//! Length-prefixed framing: a 4-byte big-endian body length, then the body.
//!
//! [`FrameDecoder`] is sans-IO: push whatever bytes arrived with [`FrameDecoder::extend`],
//! then pull complete bodies with [`FrameDecoder::next_frame`]. It never allocates per frame:
//! bodies are split off the internal buffer as reference-counted [`Bytes`].

use bytes::{Buf, Bytes, BytesMut};

/// The default limit on a frame body: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// A length prefix announced a body above the limit. The stream cannot be trusted past this
/// point (the prefix may be garbage), so the connection should be closed after reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OversizedFrame {
    /// The announced body length.
    pub len: usize,
    /// The limit in force.
    pub max: usize,
}

/// Splits a byte stream into frame bodies.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that rejects bodies longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::with_capacity(64 * 1024),
            max,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer to read into directly (for drivers that read with `read_buf`).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet returned as a frame (a partial frame at the end of a stream
    /// means the peer hung up mid-frame).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete body, `Ok(None)` when more bytes are needed, or an error when the
    /// next length prefix exceeds the limit.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, OversizedFrame> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(OversizedFrame { len, max: self.max });
        }
        if self.buf.len() < HEADER_LEN + len {
            // Reserve room for the rest of this frame so the next read can fill it at once.
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

/// Appends a frame header placeholder to `out` and returns its position, for
/// [`finish_frame`] to fill in once the body is written.
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    at
}

/// Writes the length of the body that follows the header at `at`. If the body is over `max`,
/// removes the whole frame from `out` and returns the error.
pub fn finish_frame(out: &mut Vec<u8>, at: usize, max: usize) -> Result<(), OversizedFrame> {
    let len = out.len() - at - HEADER_LEN;
    if len > max || len > u32::MAX as usize {
        out.truncate(at);
        return Err(OversizedFrame { len, max });
    }
    out[at..at + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_across_reads() {
        let mut out = Vec::new();
        for body in [&b"hello"[..], b"", b"world!"] {
            let at = begin_frame(&mut out);
            out.extend_from_slice(body);
            finish_frame(&mut out, at, 100).unwrap();
        }
        let mut d = FrameDecoder::new(100);
        let mut got = Vec::new();
        for byte in out {
            d.extend(&[byte]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![&b"hello"[..], b"", b"world!"]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn rejects_oversized_prefix_before_reading_body() {
        let mut d = FrameDecoder::new(10);
        d.extend(&11u32.to_be_bytes());
        assert_eq!(d.next_frame(), Err(OversizedFrame { len: 11, max: 10 }));
    }

    #[test]
    fn oversized_outgoing_frame_is_removed() {
        let mut out = b"prev".to_vec();
        let at = begin_frame(&mut out);
        out.extend_from_slice(&[0; 11]);
        assert!(finish_frame(&mut out, at, 10).is_err());
        assert_eq!(out, b"prev");
    }
}
