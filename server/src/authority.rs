//! The unix socket's `:authority` boundary: every request header block a client sends on a unix
//! socket connection is decoded and encoded again before the HTTP/2 server reads it, with an
//! `:authority` the server would refuse replaced by `localhost`.
//!
//! Why: the HTTP/2 server under tonic (h2) answers a request whose `:authority` is not a valid
//! URI authority with `RST_STREAM(PROTOCOL_ERROR)` (hyperium/h2 PR #487), and no release offers
//! a setting to relax that. Common clients send such values on a unix socket: Python grpcio
//! 1.57 and later the %-encoded socket path, grpc-java and grpcurl the plain path. On a unix socket the
//! authority names nothing, so whatever a client sends there is accepted. TCP listeners do not
//! go through this module and keep the server's normal HTTP/2 semantics.
//!
//! How: [`AuthorityRewriter`] is a pure state machine over the bytes the client sends. Frames
//! other than `HEADERS` and `CONTINUATION` pass unchanged, byte for byte, as they arrive. A
//! header block (one `HEADERS` frame and its `CONTINUATION` frames) is collected, decoded with a
//! per-connection HPACK decoder that mirrors the client's encoder (its dynamic table and table
//! size updates), and encoded again with an encoder that never uses the dynamic table, so the
//! server's decoder state never depends on ours: only static-table references and literals.
//! The result goes out as one `HEADERS` frame (end-of-stream flag and priority kept, padding
//! dropped) plus `CONTINUATION` frames of at most [`MAX_FRAME_SIZE`] bytes each.
//! [`AuthorityRewritingStream`] applies the rewriter to the read side of a connection; writes
//! pass straight through.
//!
//! Limits and errors: a header block may hold at most [`MAX_HEADER_BLOCK`] bytes as sent and
//! [`MAX_HEADER_LIST`] bytes decoded (counted as HPACK does, 32 bytes per field extra), a
//! `HEADERS` or `CONTINUATION` frame at most [`MAX_FRAME_SIZE`], and the client's dynamic table
//! at most [`HEADER_TABLE_SIZE`] (the server never advertises another `SETTINGS_HEADER_TABLE_SIZE`;
//! a test in `server/tests/unix_authority.rs` checks that). Anything else that HTTP/2 calls a
//! connection error in a header block (bad HPACK, a `CONTINUATION` out of place, padding longer
//! than its frame, `PUSH_PROMISE` from a client) is a [`RewriteError`]: the connection is closed,
//! the process goes on. Bytes that do not start with the HTTP/2 client preface pass unchanged:
//! the server answers them as it always did.

use loona_hpack::decoder::DecoderError;
use loona_hpack::{Decoder, Encoder};
use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest `HEADERS` or `CONTINUATION` frame payload accepted and written: the protocol's
/// default `SETTINGS_MAX_FRAME_SIZE`, which the server keeps.
pub const MAX_FRAME_SIZE: usize = 16_384;
/// The largest header block accepted, as sent (all fragments of one block together).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The largest decoded header list accepted: the sum over its fields of name, value and 32 bytes
/// (RFC 7541, section 4.1). Four times hyper's default limit, which the server then applies.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// The client's HPACK dynamic table may hold at most this much: the protocol default of
/// `SETTINGS_HEADER_TABLE_SIZE`, which the server does not change.
pub const HEADER_TABLE_SIZE: usize = 4096;
/// What an `:authority` the server would refuse becomes.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// [`AuthorityRewriter::feed`] stops taking input once this much output waits, so one read can
/// never make the output grow without bound (an HPACK index byte can stand for a 4 KiB field).
pub const OUTPUT_HIGH_WATER: usize = 64 * 1024;

const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a client's bytes cannot be passed on: each is an HTTP/2 connection error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RewriteError {
    /// A frame is out of place or malformed (HTTP/2 `PROTOCOL_ERROR`).
    #[error("HTTP/2 protocol error from the client: {0}")]
    Protocol(&'static str),
    /// A `HEADERS` or `CONTINUATION` frame is larger than [`MAX_FRAME_SIZE`].
    #[error("a {len}-byte header frame exceeds the maximum frame size of {MAX_FRAME_SIZE} bytes")]
    FrameSize {
        /// The frame's payload length.
        len: usize,
    },
    /// A header block is larger than [`MAX_HEADER_BLOCK`] as sent.
    #[error("the header block of stream {stream} exceeds {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge {
        /// The stream the block belongs to.
        stream: u32,
    },
    /// A header list is larger than [`MAX_HEADER_LIST`] once decoded.
    #[error("the header list of stream {stream} exceeds {MAX_HEADER_LIST} bytes once decoded")]
    HeaderListTooLarge {
        /// The stream the block belongs to.
        stream: u32,
    },
    /// The header block is not valid HPACK (HTTP/2 `COMPRESSION_ERROR`).
    #[error("HPACK decoding of the header block of stream {stream} failed: {error}")]
    Compression {
        /// The stream the block belongs to.
        stream: u32,
        /// What the decoder found.
        error: DecoderError,
    },
}

/// A frame header: payload length, type, flags and stream id.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(bytes: &[u8; FRAME_HEAD]) -> FrameHead {
        FrameHead {
            len: usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    fn write(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
        // `len` never exceeds MAX_FRAME_SIZE here, so three bytes hold it.
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
    }
}

/// Where the rewriter is in the client's byte stream.
enum State {
    /// Matching the client preface; `matched` bytes of it seen so far.
    Preface { matched: usize },
    /// Not HTTP/2 (no preface): everything passes unchanged.
    Transparent,
    /// Reading a frame header.
    Head {
        bytes: [u8; FRAME_HEAD],
        filled: usize,
    },
    /// Passing `remaining` bytes of a frame's payload on as they come.
    Payload { remaining: usize },
    /// Collecting the payload of a `HEADERS` or `CONTINUATION` frame.
    HeaderPayload { head: FrameHead, payload: Vec<u8> },
}

/// A header block being collected: its `HEADERS` frame's stream, flags and priority, and the
/// fragments so far.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Rewrites the client-to-server bytes of one HTTP/2 connection so that every request's
/// `:authority` is one the server accepts (see the module documentation). One per connection:
/// it holds the connection's HPACK state.
pub struct AuthorityRewriter {
    state: State,
    open: Option<OpenBlock>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    failed: Option<RewriteError>,
}

impl Default for AuthorityRewriter {
    fn default() -> AuthorityRewriter {
        AuthorityRewriter::new()
    }
}

impl AuthorityRewriter {
    /// A rewriter for a new connection, expecting the client preface.
    pub fn new() -> AuthorityRewriter {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let mut encoder = Encoder::new();
        // No dynamic table: the server's decoder never has to agree with ours on one.
        encoder.set_max_table_size(0);
        AuthorityRewriter {
            state: State::Preface { matched: 0 },
            open: None,
            decoder,
            encoder,
            failed: None,
        }
    }

    /// Takes bytes the client sent and appends what the server should read to `out`. Returns
    /// how many bytes of `input` were taken: all of them, unless `out` reached
    /// [`OUTPUT_HIGH_WATER`] first (call again with the rest once `out` is drained). After an
    /// error every call fails with that error.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, RewriteError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let mut taken = 0;
        while taken < input.len() && out.len() < OUTPUT_HIGH_WATER {
            match self.step(&input[taken..], out) {
                Ok(n) => taken += n,
                Err(error) => {
                    self.failed = Some(error.clone());
                    return Err(error);
                }
            }
        }
        Ok(taken)
    }

    /// Takes some bytes of `input` (at least one) in the current state.
    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, RewriteError> {
        match &mut self.state {
            State::Transparent => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
            State::Preface { matched } => {
                let n = input.len().min(PREFACE.len() - *matched);
                let expected = &PREFACE[*matched..*matched + n];
                out.extend_from_slice(&input[..n]);
                if input[..n] != *expected {
                    self.state = State::Transparent;
                } else if *matched + n == PREFACE.len() {
                    self.state = State::Head {
                        bytes: [0; FRAME_HEAD],
                        filled: 0,
                    };
                } else {
                    *matched += n;
                }
                Ok(n)
            }
            State::Head { bytes, filled } => {
                let n = input.len().min(FRAME_HEAD - *filled);
                bytes[*filled..*filled + n].copy_from_slice(&input[..n]);
                *filled += n;
                if *filled == FRAME_HEAD {
                    let bytes = *bytes;
                    self.on_frame_head(&bytes, out)?;
                }
                Ok(n)
            }
            State::Payload { remaining } => {
                let n = input.len().min(*remaining);
                out.extend_from_slice(&input[..n]);
                *remaining -= n;
                if *remaining == 0 {
                    self.expect_head();
                }
                Ok(n)
            }
            State::HeaderPayload { head, payload } => {
                let n = input.len().min(head.len - payload.len());
                payload.extend_from_slice(&input[..n]);
                if payload.len() == head.len {
                    let head = *head;
                    let payload = std::mem::take(payload);
                    self.expect_head();
                    self.on_header_frame(head, &payload, out)?;
                }
                Ok(n)
            }
        }
    }

    fn expect_head(&mut self) {
        self.state = State::Head {
            bytes: [0; FRAME_HEAD],
            filled: 0,
        };
    }

    /// Decides what to do with a frame once its header is complete.
    fn on_frame_head(
        &mut self,
        bytes: &[u8; FRAME_HEAD],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let head = FrameHead::parse(bytes);
        if let Some(open) = &self.open
            && (head.kind != CONTINUATION || head.stream != open.stream)
        {
            return Err(RewriteError::Protocol(
                "a header block was interrupted before its last CONTINUATION frame",
            ));
        }
        match head.kind {
            HEADERS | CONTINUATION => {
                if head.len > MAX_FRAME_SIZE {
                    return Err(RewriteError::FrameSize { len: head.len });
                }
                if head.stream == 0 {
                    return Err(RewriteError::Protocol("a header frame on stream 0"));
                }
                if head.kind == CONTINUATION && self.open.is_none() {
                    return Err(RewriteError::Protocol(
                        "a CONTINUATION frame without a HEADERS frame before it",
                    ));
                }
                if head.len == 0 {
                    self.expect_head();
                    return self.on_header_frame(head, &[], out);
                }
                self.state = State::HeaderPayload {
                    head,
                    payload: Vec::with_capacity(head.len),
                };
            }
            PUSH_PROMISE => {
                return Err(RewriteError::Protocol(
                    "a client must not send PUSH_PROMISE",
                ));
            }
            _ => {
                out.extend_from_slice(bytes);
                if head.len == 0 {
                    self.expect_head();
                } else {
                    self.state = State::Payload {
                        remaining: head.len,
                    };
                }
            }
        }
        Ok(())
    }

    /// Adds a complete `HEADERS` or `CONTINUATION` payload to the open block, and writes the
    /// block once it ends.
    fn on_header_frame(
        &mut self,
        head: FrameHead,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let mut open = match self.open.take() {
            Some(mut open) => {
                open.fragment.extend_from_slice(payload);
                open
            }
            None => {
                let (priority, fragment) = split_headers_payload(head.flags, payload)?;
                OpenBlock {
                    stream: head.stream,
                    end_stream: head.flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                }
            }
        };
        if open.fragment.len() > MAX_HEADER_BLOCK {
            return Err(RewriteError::HeaderBlockTooLarge {
                stream: open.stream,
            });
        }
        if head.flags & END_HEADERS == 0 {
            self.open = Some(open);
            return Ok(());
        }
        let block = self.transcode(open.stream, &open.fragment)?;
        open.fragment = Vec::new();
        write_header_block(&open, &block, out);
        Ok(())
    }

    /// Decodes a complete header block with the client's HPACK state and encodes it again with
    /// `:authority` normalised.
    fn transcode(&mut self, stream: u32, fragment: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let Self {
            decoder, encoder, ..
        } = self;
        let mut block = Vec::with_capacity(fragment.len() + 16);
        let mut list_size = 0usize;
        let mut too_large = false;
        decoder
            .decode_with_cb(fragment, |name, value| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size > MAX_HEADER_LIST {
                    too_large = true;
                }
                if too_large {
                    return;
                }
                let value = if &name[..] == b":authority" {
                    normalize_authority(&value)
                } else {
                    value
                };
                // Writing into a Vec cannot fail.
                let _ = encoder.encode_header_into((&name, &value), &mut block);
            })
            .map_err(|error| RewriteError::Compression { stream, error })?;
        if too_large {
            return Err(RewriteError::HeaderListTooLarge { stream });
        }
        Ok(block)
    }
}

/// Splits a `HEADERS` payload into its priority fields and its header block fragment, without
/// padding.
fn split_headers_payload(
    flags: u8,
    payload: &[u8],
) -> Result<(Option<[u8; 5]>, &[u8]), RewriteError> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let Some((&len, rest)) = body.split_first() else {
            return Err(RewriteError::Protocol(
                "a padded HEADERS frame without a pad length",
            ));
        };
        pad = usize::from(len);
        body = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let Some((fields, rest)) = body.split_first_chunk::<5>() else {
            return Err(RewriteError::Protocol(
                "a HEADERS frame too short for its priority fields",
            ));
        };
        priority = Some(*fields);
        body = rest;
    }
    if pad > body.len() {
        return Err(RewriteError::Protocol(
            "HEADERS padding longer than the frame",
        ));
    }
    Ok((priority, &body[..body.len() - pad]))
}

/// Writes an encoded header block as one `HEADERS` frame and as many `CONTINUATION` frames as
/// [`MAX_FRAME_SIZE`] requires.
fn write_header_block(open: &OpenBlock, block: &[u8], out: &mut Vec<u8>) {
    let mut flags = if open.end_stream { END_STREAM } else { 0 };
    let mut room = MAX_FRAME_SIZE;
    if open.priority.is_some() {
        flags |= PRIORITY;
        room -= 5;
    }
    let (first, mut rest) = block.split_at(block.len().min(room));
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority_len = open.priority.map_or(0, |p| p.len());
    FrameHead::write(priority_len + first.len(), HEADERS, flags, open.stream, out);
    if let Some(priority) = open.priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_SIZE));
        let flags = if tail.is_empty() { END_HEADERS } else { 0 };
        FrameHead::write(chunk.len(), CONTINUATION, flags, open.stream, out);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

/// The `:authority` the server gets for `value`: `value` itself when it is a valid URI authority
/// (the check the server makes), else [`REPLACEMENT_AUTHORITY`].
pub fn normalize_authority(value: &[u8]) -> Cow<'_, [u8]> {
    if http::uri::Authority::try_from(value).is_ok() {
        Cow::Borrowed(value)
    } else {
        tracing::trace!(
            authority = %String::from_utf8_lossy(value),
            "unix socket: :authority replaced by localhost"
        );
        Cow::Borrowed(REPLACEMENT_AUTHORITY)
    }
}

/// A connection whose incoming bytes pass through an [`AuthorityRewriter`]; what is written
/// passes unchanged. On a [`RewriteError`] reads fail with [`std::io::ErrorKind::InvalidData`]
/// and the server closes the connection.
pub struct AuthorityRewritingStream<T> {
    io: T,
    rewriter: AuthorityRewriter,
    /// Bytes read from `io` that the rewriter has not taken yet: `input[taken..filled]`.
    input: Box<[u8]>,
    taken: usize,
    filled: usize,
    /// Rewritten bytes not yet handed to the reader: `output[handed..]`.
    output: Vec<u8>,
    handed: usize,
}

/// How much is read from the connection at a time.
const READ_CHUNK: usize = 16 * 1024;

impl<T> AuthorityRewritingStream<T> {
    /// Wraps a freshly accepted connection.
    pub fn new(io: T) -> AuthorityRewritingStream<T> {
        AuthorityRewritingStream {
            io,
            rewriter: AuthorityRewriter::new(),
            input: vec![0; READ_CHUNK].into_boxed_slice(),
            taken: 0,
            filled: 0,
            output: Vec::new(),
            handed: 0,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityRewritingStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.handed < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.handed);
                buf.put_slice(&this.output[this.handed..this.handed + n]);
                this.handed += n;
                if this.handed == this.output.len() {
                    this.output.clear();
                    this.handed = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.taken < this.filled {
                let taken = this
                    .rewriter
                    .feed(&this.input[this.taken..this.filled], &mut this.output);
                match taken {
                    Ok(n) => this.taken += n,
                    Err(error) => {
                        tracing::debug!(%error, "unix socket: closing the connection");
                        // Frames before the error were rewritten already: hand them over first.
                        this.taken = this.filled;
                        if this.output.is_empty() {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                error,
                            )));
                        }
                    }
                }
                continue;
            }
            if let Some(error) = &this.rewriter.failed {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    error.clone(),
                )));
            }
            let mut read = ReadBuf::new(&mut this.input);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            this.taken = 0;
            this.filled = n;
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityRewritingStream<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = payload.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn request(authority: Option<&[u8]>) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/kilo.egress.v1.EgressService/GetRules".to_vec(),
            ),
        ];
        if let Some(authority) = authority {
            fields.push((b":authority".to_vec(), authority.to_vec()));
        }
        fields.push((b"te".to_vec(), b"trailers".to_vec()));
        fields.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
        fields
    }

    /// A client: an HPACK encoder with the dynamic table, as real clients use it.
    fn encode(encoder: &mut Encoder<'static>, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// The server's view: frames of the rewritten stream, header blocks decoded with one
    /// decoder for the connection, as h2 does. Returns (type, flags, stream, payload or fields).
    #[derive(Debug, PartialEq)]
    enum Seen {
        Headers {
            flags: u8,
            stream: u32,
            fields: Vec<(Vec<u8>, Vec<u8>)>,
        },
        Other {
            kind: u8,
            flags: u8,
            stream: u32,
            payload: Vec<u8>,
        },
    }

    fn server_view(bytes: &[u8]) -> Vec<Seen> {
        assert!(bytes.starts_with(PREFACE), "the preface passes first");
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = Decoder::new();
        let mut seen = Vec::new();
        let mut block: Option<(u8, u32, Vec<u8>)> = None;
        while !rest.is_empty() {
            let head = FrameHead::parse(rest[..9].try_into().unwrap());
            let payload = &rest[9..9 + head.len];
            rest = &rest[9 + head.len..];
            assert!(head.len <= MAX_FRAME_SIZE);
            match head.kind {
                HEADERS => {
                    assert!(block.is_none());
                    assert_eq!(head.flags & PADDED, 0, "padding is dropped");
                    let fragment = if head.flags & PRIORITY != 0 {
                        &payload[5..]
                    } else {
                        payload
                    };
                    block = Some((head.flags, head.stream, fragment.to_vec()));
                }
                CONTINUATION => {
                    let open = block.as_mut().expect("CONTINUATION after HEADERS");
                    assert_eq!(open.1, head.stream);
                    open.2.extend_from_slice(payload);
                    open.0 |= head.flags & END_HEADERS;
                }
                _ => {
                    assert!(block.is_none(), "nothing interleaves a header block");
                    seen.push(Seen::Other {
                        kind: head.kind,
                        flags: head.flags,
                        stream: head.stream,
                        payload: payload.to_vec(),
                    });
                }
            }
            if head.flags & END_HEADERS != 0 && matches!(head.kind, HEADERS | CONTINUATION) {
                let (flags, stream, fragment) = block.take().unwrap();
                let fields = decoder
                    .decode(&fragment)
                    .expect("the server decodes the block");
                seen.push(Seen::Headers {
                    flags: flags & !END_HEADERS & !PRIORITY,
                    stream,
                    fields,
                });
            }
        }
        assert!(block.is_none(), "no header block left open");
        seen
    }

    /// A literal with incremental indexing: `x: vvv...` of about 4 KiB, entry 62 after it.
    fn big_entry() -> Vec<u8> {
        let mut block = vec![0x40, 0x01, b'x'];
        block.extend(loona_hpack::encoder::encode_integer(4000, 7));
        block.extend(vec![b'v'; 4000]);
        block
    }

    fn rewrite(input: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let mut rewriter = AuthorityRewriter::new();
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let n = rewriter.feed(rest, &mut out)?;
            rest = &rest[n..];
        }
        Ok(out)
    }

    fn authority_of(seen: &Seen) -> Option<Vec<u8>> {
        match seen {
            Seen::Headers { fields, .. } => fields
                .iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| v.clone()),
            Seen::Other { .. } => None,
        }
    }

    fn connection(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for (i, block) in blocks.iter().enumerate() {
            bytes.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i as u32, block));
        }
        bytes
    }

    #[test]
    fn an_authority_the_server_refuses_becomes_localhost_a_valid_one_and_none_stay() {
        let mut client = Encoder::new();
        // (sent, what the server gets)
        type Case<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);
        let cases: [Case; 6] = [
            (
                Some(b"%2Frun%2Fkilo-egress%2Fkilo-egressd.sock"),
                Some(b"localhost"),
            ),
            (
                Some(b"/run/kilo-egress/kilo-egressd.sock"),
                Some(b"localhost"),
            ),
            (Some(b""), Some(b"localhost")),
            (Some(b"bad \x01 authority"), Some(b"localhost")),
            (Some(b"node-a.example:7443"), Some(b"node-a.example:7443")),
            (None, None),
        ];
        let blocks: Vec<Vec<u8>> = cases
            .iter()
            .map(|(sent, _)| encode(&mut client, &request(*sent)))
            .collect();
        let seen = server_view(&rewrite(&connection(&blocks)).unwrap());
        assert_eq!(seen.len(), 1 + cases.len());
        for (i, (sent, expected)) in cases.iter().enumerate() {
            let Seen::Headers { fields, stream, .. } = &seen[i + 1] else {
                panic!("{:?}", seen[i + 1]);
            };
            assert_eq!(*stream, 1 + 2 * i as u32);
            assert_eq!(authority_of(&seen[i + 1]).as_deref(), *expected, "{sent:?}");
            // Every other field arrives unchanged and in order.
            let others: Vec<_> = fields.iter().filter(|(n, _)| n != b":authority").collect();
            let wanted = request(None);
            assert_eq!(others, wanted.iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn other_frames_pass_byte_for_byte_and_flags_and_priority_are_kept() {
        let mut client = Encoder::new();
        let mut bytes = PREFACE.to_vec();
        let settings = frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
        let window = frame(0x8, 0, 0, &[0, 0x0f, 0, 0]);
        let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        let ping = frame(0x6, 0, 0, b"12345678");
        let unknown = frame(0xfa, 0x77, 3, b"extension frame");
        bytes.extend(&settings);
        bytes.extend(&window);
        let mut payload = vec![0x80, 0, 0, 3, 200]; // priority: exclusive on stream 3, weight 200
        payload.extend(encode(&mut client, &request(Some(b"/x.sock"))));
        bytes.extend(frame(
            HEADERS,
            END_HEADERS | PRIORITY | END_STREAM,
            1,
            &payload,
        ));
        bytes.extend(&data);
        bytes.extend(&ping);
        bytes.extend(&unknown);
        let out = rewrite(&bytes).unwrap();
        // The priority fields are where h2 reads them.
        let headers_at = PREFACE.len() + settings.len() + window.len();
        assert_eq!(out[headers_at + 3], HEADERS);
        assert_eq!(out[headers_at + 4], END_HEADERS | PRIORITY | END_STREAM);
        assert_eq!(&out[headers_at + 9..headers_at + 14], &[0x80, 0, 0, 3, 200]);
        let seen = server_view(&out);
        assert_eq!(authority_of(&seen[2]).as_deref(), Some(&b"localhost"[..]));
        let Seen::Headers { flags, .. } = &seen[2] else {
            panic!()
        };
        assert_eq!(*flags, END_STREAM);
        let tail = [settings, window];
        assert!(out.starts_with(&[PREFACE, &tail.concat()].concat()));
        assert!(out.ends_with(&[data, ping, unknown].concat()));
    }

    #[test]
    fn the_clients_dynamic_table_and_size_updates_are_followed_across_blocks() {
        let mut client = Encoder::new();
        let first = encode(&mut client, &request(Some(b"%2Fa.sock")));
        // The second block refers to the first one's entries in the client's table.
        let second = encode(&mut client, &request(Some(b"%2Fa.sock")));
        assert!(
            second.contains(&(0x80 | 62)),
            "te: trailers is indexed: {second:?}"
        );
        // A size update to 0 empties the client's table, then new literals follow.
        let mut third = vec![0x20];
        third.extend(
            Encoder::new().encode(
                request(Some(b"/b.sock"))
                    .iter()
                    .map(|(n, v)| (&n[..], &v[..])),
            ),
        );
        let seen = server_view(&rewrite(&connection(&[first, second, third])).unwrap());
        for seen in &seen[1..] {
            assert_eq!(authority_of(seen).as_deref(), Some(&b"localhost"[..]));
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn a_table_size_update_beyond_the_servers_setting_is_a_compression_error() {
        // 0x3f 0xe1 0x1f: a size update to 4097.
        let mut block = vec![0x3f, 0xe2, 0x1f];
        block.extend(encode(&mut Encoder::new(), &request(None)));
        let error = rewrite(&connection(&[block])).unwrap_err();
        assert!(
            matches!(
                error,
                RewriteError::Compression {
                    stream: 1,
                    error: DecoderError::InvalidMaxDynamicSize
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn continuation_frames_are_joined_and_a_block_is_written_in_frames_of_at_most_16k() {
        let mut fields = request(Some(b"/x.sock"));
        fields.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
        let block = encode(&mut Encoder::new(), &fields);
        let mut bytes = PREFACE.to_vec();
        let (a, rest) = block.split_at(10);
        bytes.extend(frame(HEADERS, END_STREAM, 1, a));
        let chunks: Vec<&[u8]> = rest.chunks(MAX_FRAME_SIZE).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            bytes.extend(frame(
                CONTINUATION,
                if last { END_HEADERS } else { 0 },
                1,
                chunk,
            ));
        }
        let out = rewrite(&bytes).unwrap();
        let seen = server_view(&out);
        assert_eq!(seen.len(), 1);
        let Seen::Headers {
            flags, fields: got, ..
        } = &seen[0]
        else {
            panic!()
        };
        assert_eq!(*flags, END_STREAM);
        assert_eq!(got.last().unwrap().1.len(), 40_000);
        assert_eq!(authority_of(&seen[0]).as_deref(), Some(&b"localhost"[..]));
    }

    #[test]
    fn padding_is_removed() {
        let block = encode(&mut Encoder::new(), &request(Some(b"/x.sock")));
        let mut payload = vec![7];
        payload.extend(&block);
        payload.extend([0; 7]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &payload));
        let seen = server_view(&rewrite(&bytes).unwrap());
        assert_eq!(authority_of(&seen[0]).as_deref(), Some(&b"localhost"[..]));
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_output() {
        let mut client = Encoder::new();
        let blocks = vec![
            encode(&mut client, &request(Some(b"%2Fa.sock"))),
            encode(&mut client, &request(Some(b"%2Fa.sock"))),
        ];
        let mut bytes = connection(&blocks);
        bytes.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        let whole = rewrite(&bytes).unwrap();
        let mut rewriter = AuthorityRewriter::new();
        let mut out = Vec::new();
        for byte in &bytes {
            assert_eq!(rewriter.feed(std::slice::from_ref(byte), &mut out), Ok(1));
        }
        assert_eq!(out, whole);
    }

    #[test]
    fn out_of_place_frames_are_protocol_errors() {
        let block = encode(&mut Encoder::new(), &request(Some(b"/x.sock")));
        let (a, b) = block.split_at(4);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "CONTINUATION without HEADERS",
                frame(CONTINUATION, END_HEADERS, 1, a),
            ),
            (
                "another frame inside a header block",
                [frame(HEADERS, 0, 1, a), frame(0x6, 0, 0, b"12345678")].concat(),
            ),
            (
                "CONTINUATION of another stream",
                [
                    frame(HEADERS, 0, 1, a),
                    frame(CONTINUATION, END_HEADERS, 3, b),
                ]
                .concat(),
            ),
            (
                "HEADERS on stream 0",
                frame(HEADERS, END_HEADERS, 0, &block),
            ),
            (
                "PUSH_PROMISE from a client",
                frame(PUSH_PROMISE, END_HEADERS, 1, &block),
            ),
            (
                "padding longer than the frame",
                frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 0x82]),
            ),
            (
                "padded without a pad length",
                frame(HEADERS, END_HEADERS | PADDED, 1, &[]),
            ),
            (
                "priority fields cut short",
                frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]),
            ),
        ];
        for (what, frames) in cases {
            let mut bytes = PREFACE.to_vec();
            bytes.extend(frames);
            let error = rewrite(&bytes).unwrap_err();
            assert!(
                matches!(error, RewriteError::Protocol(_)),
                "{what}: {error:?}"
            );
        }
    }

    #[test]
    fn oversized_frames_blocks_and_lists_are_refused_without_buffering_them() {
        // A HEADERS frame longer than the frame size limit: refused at its header.
        let mut rewriter = AuthorityRewriter::new();
        let mut out = Vec::new();
        let mut head = PREFACE.to_vec();
        head.extend(&frame(HEADERS, 0, 1, &[])[..9]);
        head[PREFACE.len()..PREFACE.len() + 3].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(
            rewriter.feed(&head, &mut out),
            Err(RewriteError::FrameSize { len: 0xff_ffff })
        );
        // The error sticks.
        assert!(rewriter.feed(b"more", &mut out).is_err());

        // Endless CONTINUATION frames: refused once the block passes the limit.
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..=MAX_HEADER_BLOCK / MAX_FRAME_SIZE {
            bytes.extend(frame(CONTINUATION, 0, 1, &[0x82; MAX_FRAME_SIZE]));
        }
        assert_eq!(
            rewrite(&bytes),
            Err(RewriteError::HeaderBlockTooLarge { stream: 1 })
        );

        // A small block whose index bytes each stand for a 4 KiB entry of the dynamic table.
        let mut block = big_entry();
        block.extend(vec![0x80 | 62; 20]);
        assert_eq!(
            rewrite(&connection(&[block])),
            Err(RewriteError::HeaderListTooLarge { stream: 1 })
        );
    }

    #[test]
    fn output_waits_at_the_high_water_mark() {
        // 30 blocks of 13 index bytes each standing for a ~4 KiB entry: ~1.6 MB decoded in all.
        let mut blocks = vec![big_entry()];
        blocks.extend((0..30).map(|_| vec![0x80 | 62; 13]));
        let bytes = connection(&blocks);
        let mut rewriter = AuthorityRewriter::new();
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        let mut most = 0;
        let mut total = 0;
        while !rest.is_empty() {
            let n = rewriter.feed(rest, &mut out).unwrap();
            rest = &rest[n..];
            most = most.max(out.len());
            total += out.len();
            out.clear();
        }
        assert!(total > 1_000_000, "{total}");
        assert!(most < OUTPUT_HIGH_WATER + MAX_HEADER_LIST + 1024, "{most}");
    }

    #[test]
    fn bytes_without_the_preface_pass_unchanged() {
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(rewrite(http1).unwrap(), http1);
        let almost = b"PRI * HTTP/2.0\r\n\r\nXX garbage \x00\x01";
        assert_eq!(rewrite(almost).unwrap(), almost);
    }

    #[test]
    fn normalize_authority_keeps_what_the_server_accepts() {
        assert_eq!(&*normalize_authority(b"localhost"), b"localhost");
        assert_eq!(&*normalize_authority(b"[::1]:7443"), b"[::1]:7443");
        assert_eq!(&*normalize_authority(b"/run/x.sock"), b"localhost");
        assert_eq!(&*normalize_authority(b"%2Frun%2Fx.sock"), b"localhost");
        assert_eq!(&*normalize_authority(b"\xff"), b"localhost");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Garbage after the preface never panics: the rewriter either passes it on or fails.
        #[test]
        fn garbage_frames_never_panic(garbage in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut bytes = PREFACE.to_vec();
            bytes.extend(&garbage);
            let _ = rewrite(&bytes);
        }

        /// Garbage header blocks are either rewritten into blocks the server decodes, or refused.
        #[test]
        fn garbage_header_blocks_never_panic(
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..256), 1..4)
        ) {
            if let Ok(out) = rewrite(&connection(&blocks)) {
                server_view(&out);
            }
        }
    }

    #[tokio::test]
    async fn the_stream_rewrites_reads_passes_writes_and_fails_reads_after_garbage() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = AuthorityRewritingStream::new(server);
        let block = encode(&mut Encoder::new(), &request(Some(b"/x.sock")));
        let mut bytes = connection(&[block]);
        let writer = tokio::spawn(async move {
            client.write_all(&bytes).await.unwrap();
            bytes.clear();
            client
                .write_all(&frame(CONTINUATION, END_HEADERS, 9, b"x"))
                .await
                .unwrap();
            let mut answer = [0; 5];
            client.read_exact(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        let error = loop {
            let mut buf = [0; 7];
            match server.read(&mut buf).await {
                Ok(0) => panic!("no error before the end"),
                Ok(n) => got.extend(&buf[..n]),
                Err(error) => break error,
            }
        };
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("CONTINUATION"), "{error}");
        let seen = server_view(&got);
        assert_eq!(authority_of(&seen[1]).as_deref(), Some(&b"localhost"[..]));
        server.write_all(b"hello").await.unwrap();
        assert_eq!(&writer.await.unwrap(), b"hello");
    }
}
