//! The wire messages and their codec (see docs/protocol.md).
//!
//! A frame body is a MessagePack map with string keys and a snake_case `type`, or a UTF-8 JSON
//! object when its first byte is `{`. Values that the protocol does not interpret (`params`,
//! `result`, `request`, `headers`, `body`) are kept as the exact MessagePack bytes of that
//! value: borrowed from the frame by the engine's decoder (no copy, no re-encoding), copied
//! into a [`Payload`] by [`decode`]. Decoding is
//! hand-written over the MessagePack markers so that an envelope costs one pass and no
//! allocation beyond its strings; unknown keys are skipped, so peers may add fields.

use std::borrow::Cow;
use std::fmt;

use std::ops::Range;

use bytes::Bytes;
pub use bytestring::ByteString;
use serde::{de::DeserializeOwned, Serialize};

/// A call's id: a string or an unsigned integer, echoed back exactly as received.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestId {
    /// An unsigned integer id (what Ferry itself sends).
    Int(u64),
    /// A string id (what ZapJS sends, like `"req_1732000000000_0"`).
    Str(String),
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Int(n) => write!(f, "{n}"),
            RequestId::Str(s) => f.write_str(s),
        }
    }
}

impl From<u64> for RequestId {
    fn from(n: u64) -> Self {
        RequestId::Int(n)
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        RequestId::Str(s.to_owned())
    }
}

/// The MessagePack encoding of exactly one value, as it travels on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Bytes);

const NIL: &[u8] = &[0xc0];

impl Payload {
    /// The nil value (what absent params mean).
    pub fn nil() -> Payload {
        Payload(Bytes::from_static(NIL))
    }

    /// Wraps MessagePack bytes after checking that they hold exactly one well-formed value.
    pub fn from_msgpack(bytes: impl Into<Bytes>) -> Result<Payload, DecodeError> {
        let bytes = bytes.into();
        validate_value(&bytes)?;
        Ok(Payload(bytes))
    }

    /// Encodes a serde value (structs as maps with named fields).
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Payload, crate::Error> {
        rmp_serde::to_vec_named(value)
            .map(|v| Payload(v.into()))
            .map_err(|e| crate::Error::Encode(e.to_string()))
    }

    /// Appends a serde value's encoding (as [`Payload::encode`] makes it) to `out`, for
    /// callers that build a frame in place; on error `out` is left as it was.
    pub fn encode_into<T: Serialize + ?Sized>(
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), crate::Error> {
        let start = out.len();
        rmp_serde::encode::write_named(out, value).map_err(|e| {
            out.truncate(start);
            crate::Error::Encode(e.to_string())
        })
    }

    /// Wraps one value's bytes decoded from a frame: borrowed ones are copied.
    pub(crate) fn from_cow(bytes: Cow<'_, [u8]>) -> Payload {
        match bytes {
            Cow::Borrowed(b) => Payload(Bytes::copy_from_slice(b)),
            Cow::Owned(v) => Payload(v.into()),
        }
    }

    /// Wraps bytes that an encoder produced (one value, not checked again).
    pub(crate) fn from_encoded(bytes: impl Into<Bytes>) -> Payload {
        Payload(bytes.into())
    }

    /// Decodes into a serde type, with the same result as `rmp_serde::from_slice` (through a
    /// leaner decoder of Ferry's own, which leaves errors and rare types to rmp-serde).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, rmp_serde::decode::Error> {
        crate::fast_de::from_slice(&self.0)
    }

    /// Decodes into a dynamic MessagePack value. A value nested deeper than [`decode`]
    /// allows (256 levels of arrays and maps) gives nil: reading it would recurse once per
    /// level, as deep as the sender likes.
    ///
    /// [`decode`]: Payload::decode
    pub fn to_value(&self) -> rmpv::Value {
        self.to_value_within_limit().unwrap_or(rmpv::Value::Nil)
    }

    /// [`Payload::to_value`], or `None` for a value nested deeper than [`Payload::decode`]
    /// allows.
    pub(crate) fn to_value_within_limit(&self) -> Option<rmpv::Value> {
        value_within_limit(&self.0)
    }

    /// Encodes a dynamic MessagePack value.
    pub fn from_value(value: &rmpv::Value) -> Payload {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).expect("writing to a Vec cannot fail");
        Payload(out.into())
    }

    /// The raw MessagePack bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw MessagePack bytes, shared.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Whether this is the nil value.
    pub fn is_nil(&self) -> bool {
        &self.0[..] == NIL
    }
}

/// [`Payload::to_value_within_limit`] of one value's bytes, validated or produced by an encoder.
pub(crate) fn value_within_limit(bytes: &[u8]) -> Option<rmpv::Value> {
    if crate::fast_de::too_deep(bytes) {
        return None;
    }
    // The bytes were validated (or produced by an encoder), so reading cannot fail.
    Some(rmpv::decode::read_value(&mut &bytes[..]).unwrap_or(rmpv::Value::Nil))
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({})", self.to_value())
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Call a function registered on the peer.
    RpcCall {
        /// The registered name (shares the received frame's memory: no copy).
        function_name: ByteString,
        /// The argument (nil when absent).
        params: Payload,
        /// Unique among the sender's pending calls.
        request_id: RequestId,
    },
    /// A call's successful answer.
    RpcResponse {
        /// The call's id, as received.
        request_id: RequestId,
        /// The function's return value.
        result: Payload,
    },
    /// A call's failed answer.
    RpcError {
        /// The call's id, as received.
        request_id: RequestId,
        /// A human-readable message.
        error: String,
        /// `NotFound`, `InvalidParams`, `HandlerError`, `Internal`, or a peer's own type.
        error_type: String,
    },
    /// Run an HTTP-like route handler on the peer (ZapJS's route dispatch).
    InvokeHandler {
        /// The handler's id, like `api_users_get`.
        handler_id: String,
        /// `{method, path, headers, query?, params?, body?}`.
        request: Payload,
        /// Ferry's extension: lets several invocations be in flight. Absent means the answer
        /// comes in order.
        request_id: Option<RequestId>,
    },
    /// A route handler's answer.
    HandlerResponse {
        /// The handler's id.
        handler_id: String,
        /// HTTP status.
        status: u16,
        /// A map of header names to values.
        headers: Payload,
        /// The response body (usually a string).
        body: Payload,
        /// Echoes the invocation's id when it had one.
        request_id: Option<RequestId>,
    },
    /// A failure not expressed as `rpc_error`: a failed invocation, or a protocol complaint.
    Error {
        /// Like `HANDLER_NOT_FOUND`, `HANDLER_EXECUTION_ERROR`, `BAD_MESSAGE`.
        code: String,
        /// A human-readable message.
        message: String,
        /// An HTTP-like status.
        status: u16,
        /// An opaque id for correlating logs.
        digest: Option<String>,
        /// The id of the message this answers, when known.
        request_id: Option<RequestId>,
    },
    /// Liveness probe.
    HealthCheck,
    /// Answer to [`Message::HealthCheck`].
    HealthCheckResponse,
    /// Ferry's extension: the sender no longer wants the answer to this call.
    Cancel {
        /// The cancelled call's id.
        request_id: RequestId,
    },
}

/// Error codes of the `error` message that Ferry itself sends.
pub mod codes {
    /// The `type` is not one this peer knows.
    pub const UNKNOWN_MESSAGE_TYPE: &str = "UNKNOWN_MESSAGE_TYPE";
    /// The body did not decode, or a required field was missing or of the wrong kind.
    pub const BAD_MESSAGE: &str = "BAD_MESSAGE";
    /// A length prefix above the receiver's limit; the receiver closes the connection.
    pub const FRAME_TOO_LARGE: &str = "FRAME_TOO_LARGE";
    /// No route handler with that id.
    pub const HANDLER_NOT_FOUND: &str = "HANDLER_NOT_FOUND";
    /// The route handler failed.
    pub const HANDLER_EXECUTION_ERROR: &str = "HANDLER_EXECUTION_ERROR";
}

/// Why a frame body is not a message this side understands.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// True when the body was well-formed but its `type` is unknown.
    pub unknown_type: bool,
    /// What was wrong.
    pub message: String,
    /// The message's `request_id`, when it could be read, so the answer can name it.
    pub request_id: Option<RequestId>,
    /// The message's `type`, when it could be read.
    pub message_type: Option<String>,
}

impl DecodeError {
    fn bad(message: impl Into<String>) -> DecodeError {
        DecodeError {
            unknown_type: false,
            message: message.into(),
            request_id: None,
            message_type: None,
        }
    }

    /// The `error` code to answer with: `UNKNOWN_MESSAGE_TYPE` or `BAD_MESSAGE`.
    pub fn code(&self) -> &'static str {
        if self.unknown_type {
            codes::UNKNOWN_MESSAGE_TYPE
        } else {
            codes::BAD_MESSAGE
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DecodeError {}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Checks that `bytes` hold exactly one well-formed MessagePack value, so that splicing them
/// into a frame cannot corrupt the stream. One pass, no allocation.
pub fn validate_value(bytes: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(bytes);
    r.skip_value()?;
    if r.pos != bytes.len() {
        return Err(DecodeError::bad("trailing bytes after the value"));
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type DResult<T> = Result<T, DecodeError>;

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn eof() -> DecodeError {
        DecodeError::bad("MessagePack body is truncated")
    }

    fn u8(&mut self) -> DResult<u8> {
        let b = *self.buf.get(self.pos).ok_or_else(Self::eof)?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> DResult<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(Self::eof)?;
        let s = self.buf.get(self.pos..end).ok_or_else(Self::eof)?;
        self.pos = end;
        Ok(s)
    }

    /// A big-endian unsigned integer of `n` bytes (1, 2, 4 or 8).
    fn be(&mut self, n: usize) -> DResult<u64> {
        let b = self.take(n)?;
        Ok(match *b {
            [x] => x as u64,
            [a, b] => u16::from_be_bytes([a, b]) as u64,
            [a, b, c, d] => u32::from_be_bytes([a, b, c, d]) as u64,
            [a, b, c, d, e, f, g, h] => u64::from_be_bytes([a, b, c, d, e, f, g, h]),
            _ => b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64),
        })
    }

    fn peek(&self) -> DResult<u8> {
        self.buf.get(self.pos).copied().ok_or_else(Self::eof)
    }

    fn map_len(&mut self) -> DResult<usize> {
        match self.u8()? {
            m @ 0x80..=0x8f => Ok((m & 0x0f) as usize),
            0xde => Ok(self.be(2)? as usize),
            0xdf => Ok(self.be(4)? as usize),
            _ => Err(DecodeError::bad("message body is not a map")),
        }
    }

    /// A string, or `None` (with nothing consumed) when the next value is not one.
    fn try_str(&mut self) -> DResult<Option<&'a str>> {
        match self.try_raw_str()? {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(bytes)
                .map(Some)
                .map_err(|_| DecodeError::bad("string is not valid UTF-8")),
        }
    }

    /// A string's bytes, not checked to be UTF-8 (for map keys, which are only compared with
    /// known ASCII names), or `None` (nothing consumed) when the next value is not a string.
    fn try_raw_str(&mut self) -> DResult<Option<&'a [u8]>> {
        let len = match self.peek()? {
            m @ 0xa0..=0xbf => {
                self.pos += 1;
                (m & 0x1f) as usize
            }
            0xd9 => {
                self.pos += 1;
                self.be(1)? as usize
            }
            0xda => {
                self.pos += 1;
                self.be(2)? as usize
            }
            0xdb => {
                self.pos += 1;
                self.be(4)? as usize
            }
            _ => return Ok(None),
        };
        self.take(len).map(Some)
    }

    /// A non-negative integer, or `None` (nothing consumed) when the next value is not one.
    fn try_uint(&mut self) -> DResult<Option<u64>> {
        let start = self.pos;
        let m = self.peek()?;
        let v = match m {
            0x00..=0x7f => {
                self.pos += 1;
                m as i128
            }
            0xcc..=0xcf => {
                self.pos += 1;
                self.be(1 << (m - 0xcc))? as i128
            }
            0xd0..=0xd3 => {
                self.pos += 1;
                let n = 1usize << (m - 0xd0);
                let raw = self.be(n)?;
                let shift = 64 - 8 * n as u32;
                (((raw << shift) as i64) >> shift) as i128
            }
            _ => return Ok(None),
        };
        let n = u64::try_from(v).ok();
        if n.is_none() {
            // A negative integer: not one, so nothing consumed.
            self.pos = start;
        }
        Ok(n)
    }

    /// A request id (a string or an unsigned integer), or `None` when the next value is
    /// neither.
    fn try_request_id(&mut self) -> DResult<Option<RequestId>> {
        // Unsigned integers (all Ferry sends) straight from the bytes; the rest (strings,
        // non-negative signed integers, and truncated ones for the error) the general way.
        let (id, len) = match self.buf[self.pos..] {
            [m @ 0x00..=0x7f, ..] => (m as u64, 1),
            [0xcc, a, ..] => (a as u64, 2),
            [0xcd, a, b, ..] => (u16::from_be_bytes([a, b]) as u64, 3),
            [0xce, a, b, c, d, ..] => (u32::from_be_bytes([a, b, c, d]) as u64, 5),
            [0xcf, a, b, c, d, e, f, g, h, ..] => (u64::from_be_bytes([a, b, c, d, e, f, g, h]), 9),
            [0xa0..=0xbf | 0xd9..=0xdb, ..] => {
                return Ok(self.try_str()?.map(|s| RequestId::Str(s.to_owned())))
            }
            _ => return Ok(self.try_uint()?.map(RequestId::Int)),
        };
        self.pos += len;
        Ok(Some(RequestId::Int(id)))
    }

    /// Skips `expected` if the next bytes are exactly it.
    fn eat(&mut self, expected: &[u8]) -> bool {
        let hit = self.buf[self.pos..].starts_with(expected);
        if hit {
            self.pos += expected.len();
        }
        hit
    }

    fn is_nil(&mut self) -> DResult<bool> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Skips one value without recursion; the count of values still to skip can never
    /// exceed the bytes left, which bounds the work for hostile lengths.
    fn skip_value(&mut self) -> DResult<()> {
        self.skip_value_with(|_| {})
    }

    /// [`Reader::skip_value`], calling `on_f64` with the offset of every float64 marker.
    /// Generic rather than `dyn`, so that the walk compiles without a call per value.
    #[inline]
    fn skip_value_with(&mut self, mut on_f64: impl FnMut(usize)) -> DResult<()> {
        // On locals, with the checks inline: this walks every params and result value.
        let buf = self.buf;
        let mut pos = self.pos;
        let mut remaining: u64 = 1;
        // A big-endian length of `n` bytes at `pos`.
        let be = |pos: &mut usize, n: usize| -> DResult<u64> {
            let b = buf.get(*pos..*pos + n).ok_or_else(Self::eof)?;
            *pos += n;
            Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
        };
        while remaining > 0 {
            remaining -= 1;
            let Some(&m) = buf.get(pos) else {
                return Err(Self::eof());
            };
            pos += 1;
            // The common small values first: fixints, nil and bools have no bytes to skip,
            // fixmaps and fixarrays only add their entries to the values to skip, and a fixstr
            // is its length.
            let (skip, children): (u64, u64) = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => continue,
                0x80..=0x8f => (0, 2 * (m & 0x0f) as u64),
                0x90..=0x9f => (0, (m & 0x0f) as u64),
                0xa0..=0xbf => {
                    pos += (m & 0x1f) as usize;
                    if pos > buf.len() {
                        return Err(Self::eof());
                    }
                    continue;
                }
                0xc1 => return Err(DecodeError::bad("invalid MessagePack marker 0xc1")),
                0xc4 | 0xd9 => (be(&mut pos, 1)?, 0),
                0xc5 | 0xda => (be(&mut pos, 2)?, 0),
                0xc6 | 0xdb => (be(&mut pos, 4)?, 0),
                0xc7 => (be(&mut pos, 1)? + 1, 0),
                0xc8 => (be(&mut pos, 2)? + 1, 0),
                0xc9 => (be(&mut pos, 4)? + 1, 0),
                0xca => (4, 0),
                0xcb => {
                    on_f64(pos - 1);
                    (8, 0)
                }
                0xcc..=0xcf => (1 << (m - 0xcc), 0),
                0xd0..=0xd3 => (1 << (m - 0xd0), 0),
                0xd4..=0xd8 => (1 + (1 << (m - 0xd4)), 0),
                0xdc => (0, be(&mut pos, 2)?),
                0xdd => (0, be(&mut pos, 4)?),
                0xde => (0, 2 * be(&mut pos, 2)?),
                0xdf => (0, 2 * be(&mut pos, 4)?),
            };
            // `skip` is at most 2^32: no overflow on 64-bit targets.
            pos = pos
                .checked_add(usize::try_from(skip).map_err(|_| Self::eof())?)
                .filter(|&p| p <= buf.len())
                .ok_or_else(Self::eof)?;
            remaining += children;
            // Each value takes at least a byte: more values than bytes left is a truncation
            // (which also bounds the work for hostile counts).
            if remaining > (buf.len() - pos) as u64 {
                return Err(Self::eof());
            }
        }
        self.pos = pos;
        Ok(())
    }
}

/// Like [`validate_value`], and rewrites in place every float64 that holds a whole number
/// within the 64-bit integer range as that integer (`uint 64` or `int 64`: the same 9 bytes).
///
/// JavaScript has one number type, and JS MessagePack encoders (msgpackr) write whole numbers
/// beyond 32 bits as float64; the Node side normalizes them so that `2 ** 40` reaches any peer
/// as the integer it is, like `2 ** 20` does.
pub fn normalize_whole_floats(bytes: &mut [u8]) -> Result<(), DecodeError> {
    let mut floats = Vec::new();
    let mut r = Reader::new(bytes);
    r.skip_value_with(|at| floats.push(at))?;
    if r.pos != bytes.len() {
        return Err(DecodeError::bad("trailing bytes after the value"));
    }
    for at in floats {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[at + 1..at + 9]);
        let x = f64::from_be_bytes(raw);
        if x.fract() != 0.0 || !x.is_finite() {
            continue;
        }
        if (0.0..18_446_744_073_709_551_616.0).contains(&x) {
            bytes[at] = 0xcf;
            bytes[at + 1..at + 9].copy_from_slice(&(x as u64).to_be_bytes());
        } else if (-9_223_372_036_854_775_808.0..0.0).contains(&x) {
            bytes[at] = 0xd3;
            bytes[at + 1..at + 9].copy_from_slice(&(x as i64).to_be_bytes());
        }
    }
    Ok(())
}

/// A message's fields as found. Strings borrow from a MessagePack body (only those the
/// message keeps are copied) and own their text from a JSON one.
#[derive(Default)]
struct Fields<'a> {
    ty: Option<Cow<'a, str>>,
    function_name: Option<Cow<'a, str>>,
    handler_id: Option<Cow<'a, str>>,
    error: Option<Cow<'a, str>>,
    error_type: Option<Cow<'a, str>>,
    code: Option<Cow<'a, str>>,
    message: Option<Cow<'a, str>>,
    digest: Option<Cow<'a, str>>,
    request_id: Option<RequestId>,
    params: Option<Cow<'a, [u8]>>,
    result: Option<Cow<'a, [u8]>>,
    request: Option<Cow<'a, [u8]>>,
    headers: Option<Cow<'a, [u8]>>,
    body: Option<Cow<'a, [u8]>>,
    status: Option<u64>,
}

fn wrong(key: &str, want: &str) -> DecodeError {
    DecodeError::bad(format!("field `{key}` must be {want}"))
}

/// Decodes one frame body (MessagePack, or JSON when it starts with `{`) into a message that
/// owns its parts (copied out of `body`).
pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
    decode_ref(body).map(MessageRef::into_owned)
}

/// Decodes one frame body into a message that borrows its strings and values from `body`:
/// no copy and no allocation for a call or an answer, whichever its layout (values from a
/// JSON body are converted, so they are owned).
pub(crate) fn decode_ref(body: &[u8]) -> Result<MessageRef<'_>, DecodeError> {
    match common_layout(body) {
        Some(Common::Call {
            name,
            params,
            request_id,
        }) => {
            // A name that is not UTF-8 gets the general decoder's answer.
            if let Some(function_name) = text(&body[name]) {
                return Ok(MessageRef::RpcCall {
                    function_name: Cow::Borrowed(function_name),
                    params: Cow::Borrowed(&body[params]),
                    request_id,
                });
            }
        }
        Some(Common::Response { request_id, result }) => {
            return Ok(MessageRef::RpcResponse {
                request_id,
                result: Cow::Borrowed(&body[result]),
            })
        }
        None => {}
    }
    let fields = if body.first() == Some(&b'{') {
        json_fields(body)?
    } else {
        msgpack_fields(body)?
    };
    fields.into_message()
}

/// `bytes` as text, if they are UTF-8.
fn text(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8. (Function names are nearly always ASCII, and checking that
        // costs a fraction of the general UTF-8 check.)
        return Some(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).ok()
}

/// Where the parts of a message in Ferry's own layout are (see [`common_layout`]).
enum Common {
    Call {
        name: Range<usize>,
        params: Range<usize>,
        request_id: RequestId,
    },
    Response {
        request_id: RequestId,
        result: Range<usize>,
    },
}

/// The two messages of every call, in the exact layout Ferry writes them (and ZapJS's serde
/// peers write `rpc_call`): keys in a fixed order, `type` first. These are read straight into
/// the message, without the general field table. `None` for anything else, well-formed or
/// not: the general decoder then reads it (and gives the precise error), with the same result
/// for every body this accepts (a function name that is not UTF-8 is left to it too).
fn common_layout(body: &[u8]) -> Option<Common> {
    let mut r = Reader::new(body);
    let value = |r: &mut Reader<'_>| -> Option<Range<usize>> {
        let start = r.pos;
        r.skip_value().ok()?;
        Some(start..r.pos)
    };
    let m = if r.eat(CALL_HEAD) {
        let name = r.try_raw_str().ok()??;
        let start = name.as_ptr() as usize - body.as_ptr() as usize;
        let name = start..start + name.len();
        if !r.eat(b"\xa6params") {
            return None;
        }
        let params = value(&mut r)?;
        if !r.eat(b"\xaarequest_id") {
            return None;
        }
        Common::Call {
            name,
            params,
            request_id: r.try_request_id().ok()??,
        }
    } else if r.eat(RESPONSE_HEAD) {
        let request_id = r.try_request_id().ok()??;
        if !r.eat(b"\xa6result") {
            return None;
        }
        Common::Response {
            request_id,
            result: value(&mut r)?,
        }
    } else {
        return None;
    };
    (r.pos == body.len()).then_some(m)
}

fn msgpack_fields<'a>(body: &'a [u8]) -> DResult<Fields<'a>> {
    let mut r = Reader::new(body);
    let n = r.map_len()?;
    let mut f = Fields::default();
    for _ in 0..n {
        let raw_key = r
            .try_raw_str()?
            .ok_or_else(|| DecodeError::bad("map keys must be strings"))?;
        // Keys are compared as bytes; the text is only made for an error message.
        let wrong = |want: &str| wrong(&String::from_utf8_lossy(raw_key), want);
        let string = |r: &mut Reader<'a>| -> DResult<Cow<'a, str>> {
            Ok(Cow::Borrowed(
                r.try_str()?.ok_or_else(|| wrong("a string"))?,
            ))
        };
        let opt_string = |r: &mut Reader<'a>| -> DResult<Option<Cow<'a, str>>> {
            if r.is_nil()? {
                Ok(None)
            } else {
                string(r).map(Some)
            }
        };
        let raw = |r: &mut Reader<'a>| -> DResult<Cow<'a, [u8]>> {
            let start = r.pos;
            r.skip_value()?;
            Ok(Cow::Borrowed(&body[start..r.pos]))
        };
        match raw_key {
            b"type" => f.ty = Some(string(&mut r)?),
            b"function_name" => {
                let s = r.try_raw_str()?.ok_or_else(|| wrong("a string"))?;
                let s = text(s).ok_or_else(|| DecodeError::bad("string is not valid UTF-8"))?;
                f.function_name = Some(Cow::Borrowed(s));
            }
            b"handler_id" => f.handler_id = Some(string(&mut r)?),
            b"error" => f.error = Some(string(&mut r)?),
            b"error_type" => f.error_type = Some(string(&mut r)?),
            b"code" => f.code = Some(string(&mut r)?),
            b"message" => f.message = Some(string(&mut r)?),
            b"digest" => f.digest = opt_string(&mut r)?,
            b"request_id" => {
                f.request_id = if r.is_nil()? {
                    None
                } else {
                    Some(
                        r.try_request_id()?
                            .ok_or_else(|| wrong("a string or an unsigned integer"))?,
                    )
                }
            }
            b"status" => {
                f.status = Some(r.try_uint()?.ok_or_else(|| wrong("an unsigned integer"))?)
            }
            b"params" => f.params = Some(raw(&mut r)?),
            b"result" => f.result = Some(raw(&mut r)?),
            b"request" => f.request = Some(raw(&mut r)?),
            b"headers" => f.headers = Some(raw(&mut r)?),
            b"body" => f.body = Some(raw(&mut r)?),
            _ => r.skip_value()?,
        }
    }
    if r.pos != body.len() {
        return Err(DecodeError::bad("trailing bytes after the message map"));
    }
    Ok(f)
}

fn json_fields(body: &[u8]) -> DResult<Fields<'static>> {
    use serde_json::Value as J;
    let map: serde_json::Map<String, J> = serde_json::from_slice(body)
        .map_err(|e| DecodeError::bad(format!("invalid JSON body: {e}")))?;
    let mut f = Fields::default();
    for (key, v) in map {
        let string = |v: J| match v {
            J::String(s) => Ok(Cow::Owned(s)),
            _ => Err(wrong(&key, "a string")),
        };
        let raw = |v: &J| {
            rmp_serde::to_vec(v)
                .map(Cow::Owned)
                .map_err(|e| DecodeError::bad(e.to_string()))
        };
        match key.as_str() {
            "type" => f.ty = Some(string(v)?),
            "function_name" => f.function_name = Some(string(v)?),
            "handler_id" => f.handler_id = Some(string(v)?),
            "error" => f.error = Some(string(v)?),
            "error_type" => f.error_type = Some(string(v)?),
            "code" => f.code = Some(string(v)?),
            "message" => f.message = Some(string(v)?),
            "digest" => f.digest = if v.is_null() { None } else { Some(string(v)?) },
            "request_id" => {
                f.request_id = match v {
                    J::Null => None,
                    J::String(s) => Some(RequestId::Str(s)),
                    J::Number(n) if n.as_u64().is_some() => n.as_u64().map(RequestId::Int),
                    _ => return Err(wrong(&key, "a string or an unsigned integer")),
                }
            }
            "status" => {
                f.status = Some(
                    v.as_u64()
                        .ok_or_else(|| wrong(&key, "an unsigned integer"))?,
                )
            }
            "params" => f.params = Some(raw(&v)?),
            "result" => f.result = Some(raw(&v)?),
            "request" => f.request = Some(raw(&v)?),
            "headers" => f.headers = Some(raw(&v)?),
            "body" => f.body = Some(raw(&v)?),
            _ => {}
        }
    }
    Ok(f)
}

impl<'a> Fields<'a> {
    fn into_message(mut self) -> Result<MessageRef<'a>, DecodeError> {
        let ty = self.ty.take();
        // Cheap on the success path: integer ids are copied, string ids are rare.
        let request_id = self.request_id.clone();
        self.build(ty.as_deref()).map_err(|mut e| {
            e.request_id = request_id;
            e.message_type = ty.map(Cow::into_owned);
            e
        })
    }

    fn build(self, ty: Option<&str>) -> Result<MessageRef<'a>, DecodeError> {
        fn need<T>(v: Option<T>, ty: &str, key: &str) -> DResult<T> {
            v.ok_or_else(|| DecodeError::bad(format!("`{ty}` message lacks `{key}`")))
        }
        let nil = || Cow::Borrowed(NIL);
        let t = ty.ok_or_else(|| DecodeError::bad("message lacks `type`"))?;
        let status = |s: Option<u64>| -> DResult<u16> {
            u16::try_from(need(s, t, "status")?)
                .map_err(|_| DecodeError::bad("`status` is out of range"))
        };
        Ok(match t {
            "rpc_call" => MessageRef::RpcCall {
                function_name: need(self.function_name, t, "function_name")?,
                params: self.params.unwrap_or_else(nil),
                request_id: need(self.request_id, t, "request_id")?,
            },
            "rpc_response" => MessageRef::RpcResponse {
                request_id: need(self.request_id, t, "request_id")?,
                result: self.result.unwrap_or_else(nil),
            },
            "rpc_error" => MessageRef::RpcError {
                request_id: need(self.request_id, t, "request_id")?,
                error: need(self.error, t, "error")?,
                error_type: self.error_type.unwrap_or(Cow::Borrowed("Internal")),
            },
            "invoke_handler" => MessageRef::InvokeHandler {
                handler_id: need(self.handler_id, t, "handler_id")?,
                request: need(self.request, t, "request")?,
                request_id: self.request_id,
            },
            "handler_response" => MessageRef::HandlerResponse {
                handler_id: need(self.handler_id, t, "handler_id")?,
                status: status(self.status)?,
                headers: self.headers.unwrap_or_else(nil),
                body: self.body.unwrap_or_else(nil),
                request_id: self.request_id,
            },
            "error" => MessageRef::Error {
                code: need(self.code, t, "code")?,
                message: self.message.unwrap_or_default(),
                status: self.status.map_or(Ok(500), |s| status(Some(s)))?,
                digest: self.digest,
                request_id: self.request_id,
            },
            "health_check" => MessageRef::HealthCheck,
            "health_check_response" => MessageRef::HealthCheckResponse,
            "cancel" => MessageRef::Cancel {
                request_id: need(self.request_id, t, "request_id")?,
            },
            other => {
                return Err(DecodeError {
                    unknown_type: true,
                    message: format!("unknown message type `{other}`"),
                    request_id: None,
                    message_type: None,
                })
            }
        })
    }
}

/// A [`Message`] that borrows its strings and values from the frame body it was decoded from
/// (see [`decode_ref`]); the fields mean what [`Message`]'s do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MessageRef<'a> {
    RpcCall {
        function_name: Cow<'a, str>,
        params: Cow<'a, [u8]>,
        request_id: RequestId,
    },
    RpcResponse {
        request_id: RequestId,
        result: Cow<'a, [u8]>,
    },
    RpcError {
        request_id: RequestId,
        error: Cow<'a, str>,
        error_type: Cow<'a, str>,
    },
    InvokeHandler {
        handler_id: Cow<'a, str>,
        request: Cow<'a, [u8]>,
        request_id: Option<RequestId>,
    },
    HandlerResponse {
        handler_id: Cow<'a, str>,
        status: u16,
        headers: Cow<'a, [u8]>,
        body: Cow<'a, [u8]>,
        request_id: Option<RequestId>,
    },
    Error {
        code: Cow<'a, str>,
        message: Cow<'a, str>,
        status: u16,
        digest: Option<Cow<'a, str>>,
        request_id: Option<RequestId>,
    },
    HealthCheck,
    HealthCheckResponse,
    Cancel {
        request_id: RequestId,
    },
}

impl MessageRef<'_> {
    /// The same message, owning copies of its parts.
    pub(crate) fn into_owned(self) -> Message {
        let payload = Payload::from_cow;
        match self {
            MessageRef::RpcCall {
                function_name,
                params,
                request_id,
            } => Message::RpcCall {
                function_name: function_name.into_owned().into(),
                params: payload(params),
                request_id,
            },
            MessageRef::RpcResponse { request_id, result } => Message::RpcResponse {
                request_id,
                result: payload(result),
            },
            MessageRef::RpcError {
                request_id,
                error,
                error_type,
            } => Message::RpcError {
                request_id,
                error: error.into_owned(),
                error_type: error_type.into_owned(),
            },
            MessageRef::InvokeHandler {
                handler_id,
                request,
                request_id,
            } => Message::InvokeHandler {
                handler_id: handler_id.into_owned(),
                request: payload(request),
                request_id,
            },
            MessageRef::HandlerResponse {
                handler_id,
                status,
                headers,
                body,
                request_id,
            } => Message::HandlerResponse {
                handler_id: handler_id.into_owned(),
                status,
                headers: payload(headers),
                body: payload(body),
                request_id,
            },
            MessageRef::Error {
                code,
                message,
                status,
                digest,
                request_id,
            } => Message::Error {
                code: code.into_owned(),
                message: message.into_owned(),
                status,
                digest: digest.map(Cow::into_owned),
                request_id,
            },
            MessageRef::HealthCheck => Message::HealthCheck,
            MessageRef::HealthCheckResponse => Message::HealthCheckResponse,
            MessageRef::Cancel { request_id } => Message::Cancel { request_id },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding: MessagePack maps with `type` first, written straight into the output buffer.

fn w_map(out: &mut Vec<u8>, n: u32) {
    rmp::encode::write_map_len(out, n).expect("Vec write");
}

fn w_str(out: &mut Vec<u8>, s: &str) {
    // Short strings (function names, keys) with one write; longer ones through rmp.
    if s.len() < 32 {
        out.push(0xa0 | s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    } else {
        rmp::encode::write_str(out, s).expect("Vec write");
    }
}

/// An unsigned integer in its shortest MessagePack form (as rmp writes it), in one write.
fn w_uint(out: &mut Vec<u8>, n: u64) {
    let b = n.to_be_bytes();
    match n {
        0..=0x7f => out.push(n as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, n as u8]),
        0x100..=0xffff => out.extend_from_slice(&[0xcd, b[6], b[7]]),
        0x1_0000..=0xffff_ffff => out.extend_from_slice(&[0xce, b[4], b[5], b[6], b[7]]),
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&b);
        }
    }
}

fn w_id(out: &mut Vec<u8>, id: &RequestId) {
    match id {
        RequestId::Int(n) => w_uint(out, *n),
        RequestId::Str(s) => w_str(out, s),
    }
}

fn w_kv_str(out: &mut Vec<u8>, k: &str, v: &str) {
    w_str(out, k);
    w_str(out, v);
}

/// How Ferry's `rpc_call` body begins: a map of 4, `type: "rpc_call"`, the `function_name`
/// key (its value follows). Written and recognized as one piece.
const CALL_HEAD: &[u8] = b"\x84\xa4type\xa8rpc_call\xadfunction_name";
/// How Ferry's `rpc_response` body begins: a map of 3, `type: "rpc_response"`, the
/// `request_id` key.
const RESPONSE_HEAD: &[u8] = b"\x83\xa4type\xacrpc_response\xaarequest_id";

/// Writes an `rpc_call` body.
pub fn encode_rpc_call(
    out: &mut Vec<u8>,
    function_name: &str,
    params: &[u8],
    request_id: &RequestId,
) {
    encode_rpc_call_parts(out, function_name, &[params], request_id)
}

/// Writes an `rpc_call` body whose params are the concatenation of `params` (one MessagePack
/// value in pieces, such as a `bin` header and the bytes it announces).
pub fn encode_rpc_call_parts(
    out: &mut Vec<u8>,
    function_name: &str,
    params: &[&[u8]],
    request_id: &RequestId,
) {
    encode_rpc_call_head(out, function_name);
    for part in params {
        out.extend_from_slice(part);
    }
    encode_rpc_call_tail(out, request_id);
}

/// Writes an `rpc_call` body up to its params: the params (one MessagePack value) follow,
/// then [`encode_rpc_call_tail`].
pub fn encode_rpc_call_head(out: &mut Vec<u8>, function_name: &str) {
    out.extend_from_slice(CALL_HEAD);
    w_str(out, function_name);
    out.extend_from_slice(b"\xa6params");
}

/// Writes the end of an `rpc_call` body, after its params: its request_id.
pub fn encode_rpc_call_tail(out: &mut Vec<u8>, request_id: &RequestId) {
    out.extend_from_slice(b"\xaarequest_id");
    w_id(out, request_id);
}

/// The header of a MessagePack `bin` of `len` bytes (its shortest form), in `buf`; `None`
/// past 2^32 - 1 bytes, which MessagePack cannot announce.
pub fn bin_header(len: usize, buf: &mut [u8; 5]) -> Option<&[u8]> {
    let n = u32::try_from(len).ok()?;
    let b = n.to_be_bytes();
    Some(match n {
        0..=0xff => {
            *buf = [0xc4, n as u8, 0, 0, 0];
            &buf[..2]
        }
        0x100..=0xffff => {
            *buf = [0xc5, b[2], b[3], 0, 0];
            &buf[..3]
        }
        _ => {
            *buf = [0xc6, b[0], b[1], b[2], b[3]];
            &buf[..]
        }
    })
}

/// Writes an `rpc_response` body.
pub fn encode_rpc_response(out: &mut Vec<u8>, request_id: &RequestId, result: &[u8]) {
    encode_rpc_response_parts(out, request_id, &[result])
}

/// Writes an `rpc_response` body whose result is the concatenation of `result` (one
/// MessagePack value in pieces, such as a `bin` header and the bytes it announces).
pub fn encode_rpc_response_parts(out: &mut Vec<u8>, request_id: &RequestId, result: &[&[u8]]) {
    encode_rpc_response_head(out, request_id);
    for part in result {
        out.extend_from_slice(part);
    }
}

/// Writes an `rpc_response` body up to its result: the caller then writes the result, one
/// MessagePack value, right after it.
pub fn encode_rpc_response_head(out: &mut Vec<u8>, request_id: &RequestId) {
    out.extend_from_slice(RESPONSE_HEAD);
    w_id(out, request_id);
    out.extend_from_slice(b"\xa6result");
}

/// Writes an `rpc_error` body.
pub fn encode_rpc_error(out: &mut Vec<u8>, request_id: &RequestId, error: &str, error_type: &str) {
    w_map(out, 4);
    w_kv_str(out, "type", "rpc_error");
    w_str(out, "request_id");
    w_id(out, request_id);
    w_kv_str(out, "error", error);
    w_kv_str(out, "error_type", error_type);
}

/// Writes an `invoke_handler` body.
pub fn encode_invoke_handler(
    out: &mut Vec<u8>,
    handler_id: &str,
    request: &[u8],
    request_id: Option<&RequestId>,
) {
    w_map(out, 3 + request_id.is_some() as u32);
    w_kv_str(out, "type", "invoke_handler");
    w_kv_str(out, "handler_id", handler_id);
    w_str(out, "request");
    out.extend_from_slice(request);
    if let Some(id) = request_id {
        w_str(out, "request_id");
        w_id(out, id);
    }
}

/// Writes a `handler_response` body.
pub fn encode_handler_response(
    out: &mut Vec<u8>,
    handler_id: &str,
    status: u16,
    headers: &[u8],
    body: &[u8],
    request_id: Option<&RequestId>,
) {
    w_map(out, 5 + request_id.is_some() as u32);
    w_kv_str(out, "type", "handler_response");
    w_kv_str(out, "handler_id", handler_id);
    w_str(out, "status");
    w_uint(out, status as u64);
    w_str(out, "headers");
    out.extend_from_slice(headers);
    w_str(out, "body");
    out.extend_from_slice(body);
    if let Some(id) = request_id {
        w_str(out, "request_id");
        w_id(out, id);
    }
}

/// Writes an `error` body.
pub fn encode_error(
    out: &mut Vec<u8>,
    code: &str,
    message: &str,
    status: u16,
    digest: Option<&str>,
    request_id: Option<&RequestId>,
) {
    w_map(
        out,
        4 + digest.is_some() as u32 + request_id.is_some() as u32,
    );
    w_kv_str(out, "type", "error");
    w_kv_str(out, "code", code);
    w_kv_str(out, "message", message);
    w_str(out, "status");
    w_uint(out, status as u64);
    if let Some(d) = digest {
        w_kv_str(out, "digest", d);
    }
    if let Some(id) = request_id {
        w_str(out, "request_id");
        w_id(out, id);
    }
}

fn encode_unit(out: &mut Vec<u8>, ty: &str) {
    w_map(out, 1);
    w_kv_str(out, "type", ty);
}

/// Writes a `cancel` body.
pub fn encode_cancel(out: &mut Vec<u8>, request_id: &RequestId) {
    w_map(out, 2);
    w_kv_str(out, "type", "cancel");
    w_str(out, "request_id");
    w_id(out, request_id);
}

/// Builds the `{status, headers, body}` map that an answered `invoke_handler` resolves to.
/// Nil (or absent) headers become an empty map, so callers always get a map.
pub fn handler_result(status: u16, headers: &Payload, body: &Payload) -> Payload {
    Payload(handler_result_bytes(status, &headers.0, &body.0).into())
}

/// [`handler_result`] over the raw bytes of `headers` and `body`.
pub(crate) fn handler_result_bytes(status: u16, headers: &[u8], body: &[u8]) -> Vec<u8> {
    const EMPTY_MAP: &[u8] = &[0x80];
    let headers = if headers == NIL { EMPTY_MAP } else { headers };
    let mut out = Vec::with_capacity(32 + headers.len() + body.len());
    w_map(&mut out, 3);
    w_str(&mut out, "status");
    w_uint(&mut out, status as u64);
    w_str(&mut out, "headers");
    out.extend_from_slice(headers);
    w_str(&mut out, "body");
    out.extend_from_slice(body);
    out
}

impl Message {
    /// Appends this message's MessagePack body (no length prefix) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::RpcCall {
                function_name,
                params,
                request_id,
            } => encode_rpc_call(out, function_name, &params.0, request_id),
            Message::RpcResponse { request_id, result } => {
                encode_rpc_response(out, request_id, &result.0)
            }
            Message::RpcError {
                request_id,
                error,
                error_type,
            } => encode_rpc_error(out, request_id, error, error_type),
            Message::InvokeHandler {
                handler_id,
                request,
                request_id,
            } => encode_invoke_handler(out, handler_id, &request.0, request_id.as_ref()),
            Message::HandlerResponse {
                handler_id,
                status,
                headers,
                body,
                request_id,
            } => encode_handler_response(
                out,
                handler_id,
                *status,
                &headers.0,
                &body.0,
                request_id.as_ref(),
            ),
            Message::Error {
                code,
                message,
                status,
                digest,
                request_id,
            } => encode_error(
                out,
                code,
                message,
                *status,
                digest.as_deref(),
                request_id.as_ref(),
            ),
            Message::HealthCheck => encode_unit(out, "health_check"),
            Message::HealthCheckResponse => encode_unit(out, "health_check_response"),
            Message::Cancel { request_id } => encode_cancel(out, request_id),
        }
    }

    /// This message as a complete frame (length prefix and body).
    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let at = crate::frame::begin_frame(&mut out);
        self.encode(&mut out);
        crate::frame::finish_frame(&mut out, at, usize::MAX).expect("no limit");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_headers_are_the_shortest_form_rmp_writes() {
        for len in [
            0usize,
            1,
            255,
            256,
            1023,
            1024,
            65535,
            65536,
            1 << 24,
            u32::MAX as usize,
        ] {
            let mut ours = [0; 5];
            let mut theirs = Vec::new();
            rmp::encode::write_bin_len(&mut theirs, len as u32).unwrap();
            assert_eq!(bin_header(len, &mut ours), Some(&theirs[..]), "{len}");
        }
        assert_eq!(bin_header(u32::MAX as usize + 1, &mut [0; 5]), None);
    }
    use serde::Deserialize;

    fn roundtrip(m: Message) {
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(decode(&out).unwrap(), m);
    }

    #[test]
    fn every_message_roundtrips() {
        let p = Payload::encode(&serde_json::json!({"a": 1, "b": [true, null, "x"]})).unwrap();
        roundtrip(Message::RpcCall {
            function_name: "add".into(),
            params: p.clone(),
            request_id: 7.into(),
        });
        roundtrip(Message::RpcResponse {
            request_id: "req_1_0".into(),
            result: p.clone(),
        });
        roundtrip(Message::RpcError {
            request_id: 1.into(),
            error: "no".into(),
            error_type: "NotFound".into(),
        });
        roundtrip(Message::InvokeHandler {
            handler_id: "h".into(),
            request: p.clone(),
            request_id: None,
        });
        roundtrip(Message::InvokeHandler {
            handler_id: "h".into(),
            request: p.clone(),
            request_id: Some(3.into()),
        });
        roundtrip(Message::HandlerResponse {
            handler_id: "h".into(),
            status: 201,
            headers: p.clone(),
            body: Payload::encode("ok").unwrap(),
            request_id: Some("x".into()),
        });
        roundtrip(Message::Error {
            code: "BAD_MESSAGE".into(),
            message: "m".into(),
            status: 400,
            digest: Some("d".into()),
            request_id: None,
        });
        roundtrip(Message::HealthCheck);
        roundtrip(Message::HealthCheckResponse);
        roundtrip(Message::Cancel {
            request_id: u64::MAX.into(),
        });
    }

    /// What `decode` gives without its fast path.
    fn general(body: &Bytes) -> Result<Message, DecodeError> {
        msgpack_fields(body)
            .and_then(Fields::into_message)
            .map(MessageRef::into_owned)
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_decoder() {
        let call = |name: &str, id: RequestId| Message::RpcCall {
            function_name: name.into(),
            params: Payload::encode(&serde_json::json!({"a": [1, "x"], "b": null})).unwrap(),
            request_id: id,
        };
        let response = |id: RequestId| Message::RpcResponse {
            request_id: id,
            result: Payload::encode(&3.5).unwrap(),
        };
        let mut canonical: Vec<Vec<u8>> = [
            call("add", RequestId::Int(7)),
            call("ünïcödé", RequestId::Int(u64::MAX)),
            call(&"n".repeat(300), RequestId::Str("req_1".into())),
            response(RequestId::Int(0)),
            response(RequestId::Str("r".repeat(40))),
        ]
        .iter()
        .map(|m| {
            let mut out = Vec::new();
            m.encode(&mut out);
            out
        })
        .collect();
        // ZapJS's serde peers write rpc_call in the same layout.
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum Zap {
            RpcCall {
                function_name: String,
                params: Option<u8>,
                request_id: String,
            },
        }
        canonical.push(
            rmp_serde::to_vec_named(&Zap::RpcCall {
                function_name: "f".into(),
                params: None,
                request_id: "req_1732000000000_0".into(),
            })
            .unwrap(),
        );
        for body in &canonical {
            let body = Bytes::from(body.clone());
            assert!(common_layout(&body).is_some(), "not taken: {body:x?}");
            assert_eq!(decode(&body), general(&body));
        }
        // Near misses: every truncation, a trailing byte, a name that is not UTF-8 or not a
        // string, ids that are not ids, a key out of place. Same answer, error or not.
        let mut near = Vec::new();
        for body in &canonical {
            near.extend((0..body.len()).map(|n| body[..n].to_vec()));
            near.push([&body[..], &[0xc0]].concat());
        }
        let call_add = &canonical[0];
        let name_at = call_add
            .windows(4)
            .position(|w| w == b"\xa3add")
            .expect("the name");
        for (at, byte) in [
            (name_at + 1, 0xff),        // not UTF-8
            (name_at, 0x03),            // not a string
            (call_add.len() - 1, 0xff), // id -1
            (call_add.len() - 1, 0xc0), // id nil
            (call_add.len() - 2, b'x'), // a different key
        ] {
            let mut b = call_add.clone();
            b[at] = byte;
            near.push(b);
        }
        // A response whose id is a float.
        let mut float_id = canonical[3][..canonical[3].len() - 16].to_vec();
        assert!(float_id.ends_with(b"request_id\x00"), "{float_id:x?}");
        float_id.pop();
        float_id.extend_from_slice(b"\xcb\x3f\xf0\0\0\0\0\0\0\xa6result\xc0");
        near.push(float_id);
        for body in near {
            let body = Bytes::from(body);
            assert_eq!(decode(&body), general(&body), "{body:x?}");
        }
    }

    /// Request ids in every integer encoding, minimal or not, signed or not, and strings, read
    /// as rmpv reads the same value; every truncation is an error, never a wrong id.
    #[test]
    fn request_ids_in_every_encoding() {
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for n in [
            0u64,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            i64::MAX as u64,
            u64::MAX,
        ] {
            let mut minimal = Vec::new();
            rmp::encode::write_uint(&mut minimal, n).unwrap();
            cases.push(minimal);
            cases.push([&[0xcf][..], &n.to_be_bytes()].concat());
            if n <= u8::MAX as u64 {
                cases.push(vec![0xcc, n as u8]);
            }
            if n <= u16::MAX as u64 {
                cases.push([&[0xcd][..], &(n as u16).to_be_bytes()].concat());
            }
            if n <= u32::MAX as u64 {
                cases.push([&[0xce][..], &(n as u32).to_be_bytes()].concat());
            }
            if n <= i64::MAX as u64 {
                cases.push([&[0xd3][..], &(n as i64).to_be_bytes()].concat());
            }
            if n <= i8::MAX as u64 {
                cases.push(vec![0xd0, n as u8]);
            }
        }
        for neg in [-1i64, -32, -33, -128, -129, i64::MIN] {
            let mut b = Vec::new();
            rmp::encode::write_sint(&mut b, neg).unwrap();
            cases.push(b);
        }
        cases.extend([
            b"\xa3req".to_vec(),
            b"\xd9\x03abc".to_vec(),
            vec![0xc0],
            vec![0xc3],
            b"\xcb\x3f\xf0\0\0\0\0\0\0".to_vec(),
        ]);
        for whole in &cases {
            let value = rmpv::decode::read_value(&mut &whole[..]).unwrap();
            let want = match &value {
                rmpv::Value::Integer(i) => i.as_u64().map(RequestId::Int),
                rmpv::Value::String(s) => s.as_str().map(RequestId::from),
                _ => None,
            };
            let mut r = Reader::new(whole);
            let got = r.try_request_id().unwrap();
            assert_eq!(got, want, "{whole:x?}");
            // An id is consumed whole; anything else is left for the caller's error.
            let used = if got.is_some() { whole.len() } else { 0 };
            assert_eq!(r.pos, used, "{whole:x?}");
            for cut in 0..whole.len() {
                let mut r = Reader::new(&whole[..cut]);
                if let Ok(Some(id)) = r.try_request_id() {
                    panic!("{:x?} truncated to {cut} bytes read as {id:?}", whole);
                }
            }
        }
    }

    /// Ferry's own integer and string writers give rmp's bytes, at every width's edges.
    #[test]
    fn writers_match_rmp() {
        for n in [
            0u64,
            1,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            0xffff_ffff,
        ]
        .into_iter()
        .chain([1u64 << 32, u64::MAX - 1, u64::MAX])
        {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            w_uint(&mut ours, n);
            rmp::encode::write_uint(&mut theirs, n).unwrap();
            assert_eq!(ours, theirs, "{n}");
        }
        for len in [0, 1, 30, 31, 32, 33, 255, 256, 70_000] {
            let s = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            w_str(&mut ours, &s);
            rmp::encode::write_str(&mut theirs, &s).unwrap();
            assert_eq!(ours, theirs, "{len}");
        }
    }

    #[test]
    fn matches_rmp_serde_named_encoding() {
        // What a serde-derived peer (like ZapJS's Rust side) writes must decode the same.
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum Zap {
            RpcCall {
                function_name: String,
                params: serde_json::Value,
                request_id: String,
            },
        }
        let bytes = rmp_serde::to_vec_named(&Zap::RpcCall {
            function_name: "f".into(),
            params: serde_json::json!({"n": -3}),
            request_id: "req_1732000000000_0".into(),
        })
        .unwrap();
        let Message::RpcCall {
            params, request_id, ..
        } = decode(&bytes).unwrap()
        else {
            panic!()
        };
        assert_eq!(request_id, RequestId::Str("req_1732000000000_0".into()));
        #[derive(Deserialize, PartialEq, Debug)]
        struct P {
            n: i32,
        }
        assert_eq!(params.decode::<P>().unwrap(), P { n: -3 });
    }

    #[test]
    fn json_bodies_decode() {
        let body =
            br#"{"type":"rpc_call","function_name":"add","params":{"a":2,"b":3},"request_id":42}"#;
        let m = decode(&Bytes::from_static(body)).unwrap();
        let Message::RpcCall {
            function_name,
            params,
            request_id,
        } = m
        else {
            panic!()
        };
        assert_eq!(function_name, "add");
        assert_eq!(request_id, RequestId::Int(42));
        assert_eq!(
            params.decode::<serde_json::Value>().unwrap(),
            serde_json::json!({"a":2,"b":3})
        );
    }

    #[test]
    fn absent_params_are_nil_and_unknown_keys_are_skipped() {
        let body =
            br#"{"type":"rpc_call","function_name":"f","request_id":"r","extra":[1,{"x":2}]}"#;
        let Message::RpcCall { params, .. } = decode(&Bytes::from_static(body)).unwrap() else {
            panic!()
        };
        assert!(params.is_nil());
    }

    #[test]
    fn classifies_bad_bodies() {
        let unknown =
            decode(&Bytes::from_static(br#"{"type":"nope","request_id":5}"#)).unwrap_err();
        assert!(unknown.unknown_type);
        assert_eq!(unknown.request_id, Some(RequestId::Int(5)));
        let missing = decode(&Bytes::from_static(
            br#"{"type":"rpc_call","request_id":"a"}"#,
        ))
        .unwrap_err();
        assert_eq!(missing.code(), codes::BAD_MESSAGE);
        assert_eq!(missing.request_id, Some("a".into()));
        for garbage in [
            &b""[..],
            b"\xc1",
            b"\x93\x01\x02",
            b"\x82\xa4type",
            b"{nope",
            b"\xdf\xff\xff\xff\xff",
        ] {
            let e = decode(&Bytes::copy_from_slice(garbage)).unwrap_err();
            assert!(!e.unknown_type, "{garbage:?}");
        }
        // A huge declared array inside params must fail fast, not loop.
        let mut body = Vec::new();
        w_map(&mut body, 2);
        w_kv_str(&mut body, "type", "rpc_call");
        w_str(&mut body, "params");
        body.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(decode(&body).is_err());
    }

    #[test]
    fn whole_floats_become_integers() {
        let value = rmpv::Value::Array(vec![
            rmpv::Value::F64(2f64.powi(40)),
            rmpv::Value::F64(-(2f64.powi(40))),
            rmpv::Value::F64(1.5),
            rmpv::Value::F64(1e300),
            rmpv::Value::Binary(vec![0xcb; 9]),
        ]);
        let mut bytes = Payload::from_value(&value).as_bytes().to_vec();
        let len = bytes.len();
        normalize_whole_floats(&mut bytes).unwrap();
        assert_eq!(bytes.len(), len);
        let back = Payload::from_msgpack(bytes).unwrap().to_value();
        assert_eq!(back[0], rmpv::Value::from(1u64 << 40));
        assert_eq!(back[1], rmpv::Value::from(-(1i64 << 40)));
        assert_eq!(back[2], rmpv::Value::F64(1.5));
        assert_eq!(back[3], rmpv::Value::F64(1e300));
        assert_eq!(back[4], rmpv::Value::Binary(vec![0xcb; 9]));
        assert!(normalize_whole_floats(&mut [0xcb, 0, 0]).is_err());
    }

    #[test]
    fn payload_validation() {
        assert!(Payload::from_msgpack(vec![0x92, 0x01]).is_err());
        assert!(Payload::from_msgpack(vec![0x01, 0x02]).is_err());
        assert!(Payload::from_msgpack(vec![0x92, 0x01, 0xc0]).is_ok());
    }

    #[test]
    fn the_value_walk_agrees_with_rmpv_on_every_kind_and_truncation() {
        use rmpv::Value as V;
        let long = |n: usize| "x".repeat(n);
        let values = vec![
            V::Nil,
            V::from(true),
            V::from(0),
            V::from(127),
            V::from(128),
            V::from(-1),
            V::from(-33),
            V::from(70_000),
            V::from(u64::MAX),
            V::from(i64::MIN),
            V::from(1.5f32),
            V::from(2.5f64),
            V::from(""),
            V::from(long(31)),
            V::from(long(32)),
            V::from(long(300)),
            V::from(long(70_000)),
            V::Binary(vec![7; 3]),
            V::Binary(vec![7; 300]),
            V::Ext(1, vec![1]),
            V::Ext(2, vec![1; 16]),
            V::Ext(3, vec![1; 5]),
            V::Array(vec![]),
            V::Array((0..15).map(V::from).collect()),
            V::Array((0..16).map(V::from).collect()),
            V::Map(vec![]),
            V::Map(vec![(V::from("a"), V::from(1)), (V::from("b"), V::from(2))]),
            V::Map((0..16).map(|i| (V::from(i), V::Nil)).collect()),
            V::Array(vec![V::Map(vec![(
                V::from("deep"),
                V::Array(vec![
                    V::Array(vec![V::from(-5), V::from("é")]),
                    V::Map(vec![]),
                ]),
            )])]),
        ];
        for v in &values {
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, v).unwrap();
            assert!(validate_value(&bytes).is_ok(), "{v}");
            // Every truncation is refused, and so is a trailing byte.
            for cut in 0..bytes.len() {
                assert!(validate_value(&bytes[..cut]).is_err(), "{v} cut at {cut}");
            }
            let mut more = bytes.clone();
            more.push(0xc0);
            assert!(validate_value(&more).is_err(), "{v} with a trailing byte");
        }
        // Counts beyond the bytes that follow are refused at once.
        for hostile in [&b"\x8f"[..], b"\x9f\x01", b"\xdd\xff\xff\xff\xff", b"\xc1"] {
            assert!(validate_value(hostile).is_err(), "{hostile:?}");
        }
    }
}
