//! The one error type of the core, with a stable [`Error::code`] per failure.
//!
//! Drivers and bindings never inspect messages: they switch on [`Error::code`] (the
//! `ERR_FERRY_*` strings that the Node addon exposes as `err.code`) and, for errors that came
//! from the peer, [`Error::error_type`] (the wire `error_type` / `code`).

use std::fmt;
use std::time::Duration;

/// The `error_type` of an `rpc_error` message: why the peer could not answer a call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// No function is registered under the called name.
    NotFound,
    /// The params did not decode into the function's input type.
    InvalidParams,
    /// The function ran and returned an error (or a JS handler threw).
    HandlerError,
    /// A bug on the serving side, such as a panicking handler; the peer survives it.
    Internal,
    /// Any other `error_type` a peer sent, kept verbatim.
    Other(String),
}

impl ErrorType {
    /// The string written on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorType::NotFound => "NotFound",
            ErrorType::InvalidParams => "InvalidParams",
            ErrorType::HandlerError => "HandlerError",
            ErrorType::Internal => "Internal",
            ErrorType::Other(s) => s,
        }
    }

    /// Parses a wire string; unknown strings become [`ErrorType::Other`].
    pub fn parse(s: &str) -> ErrorType {
        match s {
            "NotFound" => ErrorType::NotFound,
            "InvalidParams" => ErrorType::InvalidParams,
            "HandlerError" => ErrorType::HandlerError,
            "Internal" => ErrorType::Internal,
            other => ErrorType::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can end a call, a connection or a server other than success.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer answered the call with `rpc_error`.
    #[error("{message}")]
    Remote {
        /// The wire `error_type`.
        kind: ErrorType,
        /// The peer's human-readable message.
        message: String,
    },
    /// The peer answered with an `error` message (a failed `invoke_handler`, or a protocol
    /// complaint such as `BAD_MESSAGE` about one of our frames).
    #[error("{message} ({code})")]
    Peer {
        /// The wire `code`, such as `HANDLER_NOT_FOUND` or `BAD_MESSAGE`.
        code: String,
        /// The peer's human-readable message.
        message: String,
        /// The HTTP-like status the peer attached.
        status: u16,
    },
    /// No answer arrived within the call's timeout.
    #[error("call timed out after {0:?}")]
    Timeout(Duration),
    /// The caller cancelled the call (AbortSignal, or a dropped future).
    #[error("call cancelled")]
    Cancelled,
    /// The connection ended before the answer arrived.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// This side closed the connection (or the client) while the call was pending, or the
    /// call was made after close.
    #[error("connection closed")]
    Closed,
    /// A frame to send or receive is larger than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// Params could not be encoded to MessagePack.
    #[error("could not encode params: {0}")]
    Encode(String),
    /// A result did not decode into the requested type.
    #[error("could not decode result: {0}")]
    Decode(String),
    /// The peer broke the protocol (for example a malformed frame).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Connecting, binding or socket I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The stable code of this failure, as the Node addon exposes it in `err.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Remote { kind, .. } => match kind {
                ErrorType::NotFound => "ERR_FERRY_NOT_FOUND",
                ErrorType::InvalidParams => "ERR_FERRY_INVALID_PARAMS",
                ErrorType::HandlerError => "ERR_FERRY_HANDLER",
                ErrorType::Internal => "ERR_FERRY_INTERNAL",
                ErrorType::Other(_) => "ERR_FERRY_REMOTE",
            },
            Error::Peer { code, .. } => match code.as_str() {
                "HANDLER_NOT_FOUND" => "ERR_FERRY_NOT_FOUND",
                "HANDLER_EXECUTION_ERROR" => "ERR_FERRY_HANDLER",
                "FRAME_TOO_LARGE" => "ERR_FERRY_FRAME_TOO_LARGE",
                "BAD_MESSAGE" | "UNKNOWN_MESSAGE_TYPE" => "ERR_FERRY_BAD_MESSAGE",
                _ => "ERR_FERRY_REMOTE",
            },
            Error::Timeout(_) => "ERR_FERRY_TIMEOUT",
            Error::Cancelled => "ERR_FERRY_CANCELLED",
            Error::ConnectionLost(_) => "ERR_FERRY_CONNECTION_LOST",
            Error::Closed => "ERR_FERRY_CLOSED",
            Error::FrameTooLarge { .. } => "ERR_FERRY_FRAME_TOO_LARGE",
            Error::Encode(_) => "ERR_FERRY_ENCODE",
            Error::Decode(_) => "ERR_FERRY_DECODE",
            Error::Protocol(_) => "ERR_FERRY_PROTOCOL",
            Error::Io { .. } => "ERR_FERRY_IO",
        }
    }

    /// The wire error type when the error came from the peer: the `error_type` of an
    /// `rpc_error`, or the `code` of an `error` message.
    pub fn error_type(&self) -> Option<&str> {
        match self {
            Error::Remote { kind, .. } => Some(kind.as_str()),
            Error::Peer { code, .. } => Some(code),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
