//! Length-prefixed framing: a 4-byte big-endian body length, then the body.
//!
//! [`FrameDecoder`] is sans-IO: read into [`FrameDecoder::spare`] (or push bytes with
//! [`FrameDecoder::extend`]), walk the complete bodies with [`FrameDecoder::frames`] (slices of
//! the decoder's buffer: no copy, no allocation, no reference count per frame), then drop
//! the ones handled with [`FrameDecoder::consume`].

/// The default limit on a frame body: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The decoder's buffer once it first holds anything, and its least room for a read.
const MIN_BUFFER: usize = 64 * 1024;

/// An empty buffer larger than this is given back (a huge frame's room is not kept). Above
/// twice the Node addon's read budget per poll (4 MiB), so that bulk traffic, which fills
/// the buffer with several frames before they are handled, does not regrow it every time.
const KEEP_BUFFER: usize = 16 * 1024 * 1024;

/// A length prefix announced a body above the limit. The stream cannot be trusted past this
/// point (the prefix may be garbage), so the connection should be closed after reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OversizedFrame {
    /// The announced body length.
    pub len: usize,
    /// The limit in force.
    pub max: usize,
}

/// Splits a byte stream into frame bodies, kept in one buffer that reads go straight into.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Always initialized up to its length; `start..end` holds the bytes not yet consumed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that rejects bodies longer than `max` bytes. It allocates nothing until the
    /// first bytes arrive.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        self.spare(data.len())[..data.len()].copy_from_slice(data);
        self.filled(data.len());
    }

    /// Room to read into, after the bytes buffered: at least `min` bytes, and the whole rest
    /// of a frame whose start is buffered, so that one read can complete it (the buffer is
    /// 64 KiB at least). Report how many bytes were written at its start with
    /// [`FrameDecoder::filled`].
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        let need = min.max(self.rest_of_frame());
        if self.buf.len() - self.end < need {
            let kept = self.end - self.start;
            let fits = kept + need <= self.buf.len();
            // A huge frame's room is given back here too, for a stream whose reads keep
            // ending mid-frame (so the buffer never empties).
            let oversized = self.buf.len() > KEEP_BUFFER && kept + need <= KEEP_BUFFER / 2;
            if fits && !oversized {
                self.buf.copy_within(self.start..self.end, 0);
            } else {
                // A fresh zeroed allocation rather than a resize: large ones come from the
                // kernel already zeroed, with no pass over them here.
                let len = (kept + need).next_power_of_two().max(MIN_BUFFER);
                let mut buf = vec![0; len];
                buf[..kept].copy_from_slice(&self.buf[self.start..self.end]);
                self.buf = buf;
            }
            self.start = 0;
            self.end = kept;
        }
        &mut self.buf[self.end..]
    }

    /// Records that the first `n` bytes of [`FrameDecoder::spare`] hold bytes read.
    pub fn filled(&mut self, n: usize) {
        assert!(
            self.end + n <= self.buf.len(),
            "filled beyond the spare room"
        );
        self.end += n;
    }

    /// The bytes missing from the frame whose start is buffered (0 when its length is not
    /// known yet or is over the limit).
    fn rest_of_frame(&self) -> usize {
        let data = &self.buf[self.start..self.end];
        match frame_len(data) {
            Some(len) if len <= self.max => (HEADER_LEN + len).saturating_sub(data.len()),
            _ => 0,
        }
    }

    /// Bytes received but not yet consumed (a partial frame at the end of a stream means the
    /// peer hung up mid-frame).
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The complete bodies buffered, in order; a length prefix over the limit ends the walk
    /// with an error. Call [`FrameDecoder::consume`] with [`Frames::consumed`] once done with
    /// them.
    pub fn frames(&self) -> Frames<'_> {
        Frames {
            buf: &self.buf[self.start..self.end],
            pos: 0,
            max: self.max,
            failed: false,
        }
    }

    /// Drops the first `n` buffered bytes (the frames handled).
    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.buffered(), "consumed more than was buffered");
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_BUFFER {
                self.buf = Vec::new();
            }
        }
    }
}

/// The length announced by the prefix at the start of `data`, once it is all there.
fn frame_len(data: &[u8]) -> Option<usize> {
    let prefix: [u8; HEADER_LEN] = data.get(..HEADER_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

/// The complete frame bodies of a [`FrameDecoder`]'s buffer (see [`FrameDecoder::frames`]).
#[derive(Debug)]
pub struct Frames<'a> {
    buf: &'a [u8],
    pos: usize,
    max: usize,
    failed: bool,
}

impl Frames<'_> {
    /// The bytes of the frames returned so far, to pass to [`FrameDecoder::consume`].
    pub fn consumed(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<&'a [u8], OversizedFrame>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = &self.buf[self.pos..];
        let len = frame_len(rest)?;
        if len > self.max {
            self.failed = true;
            return Some(Err(OversizedFrame { len, max: self.max }));
        }
        let body = rest.get(HEADER_LEN..HEADER_LEN + len)?;
        self.pos += HEADER_LEN + len;
        Some(Ok(body))
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

    fn framed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for body in bodies {
            let at = begin_frame(&mut out);
            out.extend_from_slice(body);
            finish_frame(&mut out, at, usize::MAX).unwrap();
        }
        out
    }

    /// Takes the complete bodies buffered, as a driver does.
    fn take(d: &mut FrameDecoder) -> Vec<Vec<u8>> {
        let mut frames = d.frames();
        let got = frames.by_ref().map(|f| f.unwrap().to_vec()).collect();
        let n = frames.consumed();
        d.consume(n);
        got
    }

    #[test]
    fn splits_frames_across_reads() {
        let bodies: [&[u8]; 3] = [b"hello", b"", b"world!"];
        let mut d = FrameDecoder::new(100);
        let mut got = Vec::new();
        for byte in framed(&bodies) {
            d.extend(&[byte]);
            got.extend(take(&mut d));
        }
        assert_eq!(got, bodies);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn reads_go_straight_into_the_buffer_and_partial_frames_move_to_the_front() {
        let big = vec![7u8; 100_000];
        let small = b"tail".to_vec();
        let stream = framed(&[&big, &small, &big]);
        let mut d = FrameDecoder::new(1 << 20);
        let mut got = Vec::new();
        let mut fed = 0;
        // Reads of awkward sizes, written into the spare room as a socket read would.
        for step in [3, 70_000, 1, 30_005, 8, 50_000, 200_000]
            .into_iter()
            .cycle()
        {
            if fed == stream.len() {
                break;
            }
            let room = d.spare(1);
            let n = step.min(room.len()).min(stream.len() - fed);
            room[..n].copy_from_slice(&stream[fed..fed + n]);
            d.filled(n);
            fed += n;
            got.extend(take(&mut d));
        }
        assert_eq!(got, vec![big.clone(), small, big]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_partial_frame_at_the_end_of_the_buffer_moves_to_its_front() {
        let bodies: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 1000]).collect();
        let refs: Vec<&[u8]> = bodies.iter().map(|b| &b[..]).collect();
        let stream = framed(&refs);
        let mut d = FrameDecoder::new(1 << 20);
        // 60,500 bytes: 60 whole frames and half of one, near the end of the 64 KiB buffer.
        d.extend(&stream[..60_500]);
        let mut got = take(&mut d);
        assert_eq!(got.len(), 60);
        let before = d.buf.len();
        let room = d.spare(16 * 1024);
        assert!(room.len() >= 16 * 1024);
        assert_eq!(d.buf.len(), before, "room made by moving, not by growing");
        d.extend(&stream[60_500..]);
        got.extend(take(&mut d));
        assert_eq!(got, bodies);
    }

    #[test]
    fn spare_room_fits_the_rest_of_a_started_frame() {
        let mut d = FrameDecoder::new(1 << 20);
        d.extend(&300_000u32.to_be_bytes());
        d.extend(&[1, 2, 3]);
        assert!(d.spare(1).len() >= 300_000 - 3);
        assert_eq!(d.buffered(), 7);
    }

    #[test]
    fn an_emptied_huge_buffer_is_given_back() {
        let mut d = FrameDecoder::new(usize::MAX);
        let body = vec![0u8; 2 * KEEP_BUFFER];
        d.extend(&framed(&[&body]));
        assert_eq!(take(&mut d), vec![body]);
        assert!(d.buf.is_empty());
        d.extend(&framed(&[b"x"]));
        assert_eq!(d.buf.len(), MIN_BUFFER);
    }

    #[test]
    fn a_huge_buffer_is_given_back_even_if_it_never_empties() {
        let small: Vec<Vec<u8>> = (0..40_000u32).map(|i| vec![i as u8; 1000]).collect();
        let huge = vec![9u8; 2 * KEEP_BUFFER];
        let mut bodies: Vec<&[u8]> = vec![&huge];
        bodies.extend(small.iter().map(|b| &b[..]));
        let stream = framed(&bodies);
        let mut d = FrameDecoder::new(usize::MAX);
        let mut got = 0;
        let mut largest = 0;
        // The huge frame, then reads that each end 2 bytes into the next frame.
        let first = HEADER_LEN + huge.len() + 2;
        d.extend(&stream[..first]);
        for (i, body) in take(&mut d).into_iter().enumerate() {
            assert_eq!(body, bodies[i]);
            got += 1;
        }
        largest = largest.max(d.buf.len());
        // All but the last 2 bytes: the stream ends mid-frame too.
        for chunk in stream[first..stream.len() - 2].chunks(HEADER_LEN + 1000) {
            d.extend(chunk);
            for body in take(&mut d) {
                assert_eq!(body, bodies[got]);
                got += 1;
            }
        }
        assert_eq!(got, bodies.len() - 1);
        assert_eq!(d.buffered(), HEADER_LEN + 1000 - 2);
        assert!(largest > 2 * KEEP_BUFFER);
        assert!(d.buf.len() <= KEEP_BUFFER, "kept {} bytes", d.buf.len());
    }

    #[test]
    fn rejects_oversized_prefix_before_reading_body() {
        let mut d = FrameDecoder::new(10);
        d.extend(&framed(&[b"ok"]));
        d.extend(&11u32.to_be_bytes());
        let mut frames = d.frames();
        assert_eq!(frames.next(), Some(Ok(&b"ok"[..])));
        assert_eq!(
            frames.next(),
            Some(Err(OversizedFrame { len: 11, max: 10 }))
        );
        assert_eq!(frames.next(), None);
        assert_eq!(frames.consumed(), 6);
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
