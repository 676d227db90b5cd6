//! Response bodies: a whole buffer, or a stream fed by a task through a
//! bounded channel (SSE). A client that goes away drops the body, which
//! closes the channel, which stops the feeding task at its next send.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// Chunks an SSE stream may have in flight before its task waits.
const STREAM_DEPTH: usize = 16;

pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }

    pub fn empty() -> Self {
        Body::Full(None)
    }

    /// A streamed body and the sender that feeds it.
    pub fn channel() -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        (tx, Body::Stream(rx))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// Writes Server-Sent Events into a streamed body. Event data is always one
/// line of JSON, so no payload can break the framing.
pub struct SseSender {
    tx: mpsc::Sender<Bytes>,
}

impl SseSender {
    pub fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self { tx }
    }

    /// Sends one event; `false` once the client is gone.
    pub async fn send(&self, event: &str, data: &serde_json::Value) -> bool {
        let msg = format!("event: {event}\ndata: {data}\n\n");
        self.tx.send(Bytes::from(msg)).await.is_ok()
    }

    /// A comment line (ignored by SSE parsers) that keeps idle proxies from
    /// closing the stream; `false` once the client is gone.
    pub async fn keepalive(&self) -> bool {
        self.tx
            .send(Bytes::from_static(b": keepalive\n\n"))
            .await
            .is_ok()
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}
