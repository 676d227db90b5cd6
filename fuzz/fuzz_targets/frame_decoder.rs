//! The host<->agent frame decoder, as both ends run it: the host's reader
//! (`sandbox/src/agent.rs`) and the agent's (`agent/src/agent.rs`) build the
//! same `Decoder` with the same limit and feed it whatever each read of the
//! socket returned, so one target covers both; what differs between them,
//! and between runs, is where the reads split the stream, and that is
//! fuzzed.
//!
//! Input: one byte choosing the frame size limit, one the number of read
//! sizes, the read sizes, then the stream. Properties:
//! - the frames and the final error do not depend on how the stream was
//!   split into reads;
//! - the blocking reader `read_frame` (used by the agent's tests and tools)
//!   agrees with the decoder, also when reads are interrupted;
//! - the decoder never holds more than one frame's worth of bytes beyond a
//!   read;
//! - every decoded frame re-encodes to a body that decodes to the same
//!   frame: byte for byte the same body for the binary frames, and for the
//!   JSON frames one canonical encoding.
#![no_main]

use std::io::{self, Read};

use kiln_fuzz::{read_sizes, Input};
use kiln_protocol::limits::MAX_FRAME_BYTES;
use kiln_protocol::{read_frame, Decoder, Frame, FrameError};
use libfuzzer_sys::fuzz_target;

/// Every frame decoded and how the stream ended (the error, as text).
type Outcome = (Vec<Frame>, String);

fn decode(stream: &[u8], sizes: &[usize], max: usize) -> Outcome {
    let mut d = Decoder::new(max);
    let mut frames = Vec::new();
    let mut at = 0;
    for &n in sizes {
        d.extend(&stream[at..at + n]);
        at += n;
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, e.to_string()),
            }
        }
        // At most one incomplete frame (its length prefix checked against
        // the limit) is buffered, plus what the last read brought.
        assert!(
            d.pending() <= 4 + max + n,
            "the decoder holds {} bytes with a limit of {max} after a read of {n}",
            d.pending()
        );
    }
    (frames, d.finish().to_string())
}

/// A reader handing out the stream in the given read sizes, failing with
/// `Interrupted` before the reads whose choice byte is odd.
struct Reads<'a> {
    stream: &'a [u8],
    sizes: std::vec::IntoIter<usize>,
    interrupt: std::slice::Iter<'a, u8>,
    pending: usize,
}

impl Read for Reads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending == 0 {
            if self.interrupt.next().is_some_and(|b| b & 1 == 1) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            self.pending = self.sizes.next().unwrap_or(0);
        }
        let n = self.pending.min(buf.len()).min(self.stream.len());
        buf[..n].copy_from_slice(&self.stream[..n]);
        self.stream = &self.stream[n..];
        self.pending -= n;
        Ok(n)
    }
}

fn read_blocking(stream: &[u8], sizes: &[usize], interrupt: &[u8], max: usize) -> Outcome {
    let mut r = Reads {
        stream,
        sizes: sizes.to_vec().into_iter(),
        interrupt: interrupt.iter(),
        pending: 0,
    };
    let mut frames = Vec::new();
    loop {
        match read_frame(&mut r, max) {
            Ok(f) => frames.push(f),
            Err(e) => return (frames, e.to_string()),
        }
    }
}

fn check_reencoding(f: &Frame, body: &[u8]) {
    let enc = f.encode();
    assert_eq!(
        u32::from_be_bytes(enc[..4].try_into().expect("4 bytes")) as usize,
        enc.len() - 4,
        "the length prefix of a re-encoded {} frame is wrong",
        f.name()
    );
    let again = Frame::decode_body(&enc[4..]).unwrap_or_else(|e| {
        panic!(
            "a decoded {} frame re-encodes to a body it refuses: {e}",
            f.name()
        )
    });
    assert_eq!(
        &again,
        f,
        "a re-encoded {} frame decodes differently",
        f.name()
    );
    // Exhaustive, so that a new frame kind must be placed here.
    let json = match f {
        Frame::Hello(_)
        | Frame::HelloAck(_)
        | Frame::Exec(_)
        | Frame::Kill(_)
        | Frame::GetFile(_)
        | Frame::Setup(_)
        | Frame::Started(_)
        | Frame::Exit(_)
        | Frame::Error(_) => true,
        Frame::Stdin { .. }
        | Frame::Stdout { .. }
        | Frame::Stderr { .. }
        | Frame::FileData { .. }
        | Frame::Ack { .. }
        | Frame::Reset { .. }
        | Frame::AwaitWarm { .. }
        | Frame::Ping(_)
        | Frame::Pong(_)
        | Frame::PutFile(_) => false,
    };
    if json {
        assert_eq!(again.encode(), enc, "{} has two encodings", f.name());
    } else {
        assert_eq!(
            &enc[4..],
            body,
            "a binary {} frame re-encodes to other bytes",
            f.name()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // Both ends use MAX_FRAME_BYTES; small limits reach the refusal of an
    // oversized prefix with small inputs.
    let max = match input.u8() {
        0 => MAX_FRAME_BYTES,
        m => usize::from(m) * 16,
    };
    let n_reads = usize::from(input.u8() % 32);
    let choices = input.take(n_reads);
    let stream = input.rest();

    let whole = decode(stream, &[stream.len()], max);
    let sizes = read_sizes(choices, stream.len());
    let split = decode(stream, &sizes, max);
    assert_eq!(
        whole, split,
        "the read sizes {sizes:?} changed what was decoded"
    );
    let blocking = read_blocking(stream, &sizes, choices, max);
    assert_eq!(whole, blocking, "read_frame and the decoder disagree");

    // Each decoded frame's body, to compare re-encodings with.
    let mut at = 0;
    for f in &whole.0 {
        let len = u32::from_be_bytes(stream[at..at + 4].try_into().expect("4 bytes")) as usize;
        check_reencoding(f, &stream[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    if whole.0.is_empty() && stream.is_empty() {
        assert_eq!(whole.1, FrameError::Closed.to_string());
    }
});
