//! Reads a `text/event-stream` body with a real SSE parser
//! (`eventsource-stream`), driven synchronously: the source is a blocking
//! reader, so every poll is ready and a no-op waker suffices.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use eventsource_stream::{Event, Eventsource};
use futures_core::Stream;

struct Chunks<R>(R);

impl<R: Read + Unpin> Stream for Chunks<R> {
    type Item = Result<Vec<u8>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut buf = vec![0u8; 8192];
        match self.0.read(&mut buf) {
            Ok(0) => Poll::Ready(None),
            Ok(n) => {
                buf.truncate(n);
                Poll::Ready(Some(Ok(buf)))
            }
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

/// The events of `body`, in order, until the stream ends.
pub fn events<R: Read + Unpin>(body: R) -> impl Iterator<Item = Event> {
    let mut es = Chunks(body).eventsource();
    std::iter::from_fn(move || {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            match Pin::new(&mut es).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(e))) => return Some(e),
                Poll::Ready(Some(Err(e))) => panic!("bad event stream: {e}"),
                Poll::Ready(None) => return None,
                Poll::Pending => continue,
            }
        }
    })
}
