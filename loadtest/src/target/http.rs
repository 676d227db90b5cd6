//! `kiln serve`'s HTTP API as a target: `POST /v1/jobs` over one
//! keep-alive HTTP/1.1 connection per concurrent job (hyper's
//! `client::conn::http1`), reused, on loopback only.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{ending_of, Attempt, MAX_BODY_BYTES};
use crate::stats::Ending;

/// Wait assumed when a 429 carries no usable `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Longest `Retry-After` honoured, so that a confused server cannot park
/// the load generator.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// `kiln serve`'s job endpoint.
pub struct HttpTarget {
    addr: SocketAddr,
    host: HeaderValue,
    path: String,
    body: Bytes,
    expect_stdout: Option<String>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl HttpTarget {
    /// `url` must be `http://<loopback address>:<port>[/path]`: the load
    /// generator never sends anything off this host.
    pub fn new(url: &str, body: Bytes, expect_stdout: Option<String>) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("--url {url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => {
                (&rest[..i], format!("/v1/jobs{}", &rest[i..]))
            }
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/v1/jobs".to_owned()),
        };
        let authority = if authority.starts_with("localhost:") {
            authority.replacen("localhost", "127.0.0.1", 1)
        } else {
            authority.to_owned()
        };
        let addr: SocketAddr = authority.parse().with_context(|| {
            format!("--url {url:?}: expected an IP address and port, like http://127.0.0.1:8080")
        })?;
        if !addr.ip().is_loopback() {
            bail!("--url {url:?}: only loopback addresses (127.0.0.0/8, ::1) may be targeted");
        }
        Ok(Self {
            addr,
            host: HeaderValue::from_str(&authority).context("host header")?,
            path,
            body,
            expect_stdout,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }

    /// The request body sent for every job.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true).context("TCP_NODELAY")?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            // Ends when the server closes or the SendRequest is dropped.
            let _ = conn.await;
        });
        Ok(send)
    }

    /// An idle keep-alive connection, or a new one.
    async fn checkout(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        loop {
            let c = self.idle.lock().expect("pool lock").pop();
            match c {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => return self.connect().await,
            }
        }
    }

    fn checkin(&self, c: SendRequest<Full<Bytes>>) {
        if !c.is_closed() {
            self.idle.lock().expect("pool lock").push(c);
        }
    }

    /// Sends the job once.
    pub async fn attempt(&self) -> Attempt {
        let fail = |e: String| Attempt::Done(Ending::Failed(e));
        let mut conn = match self.checkout().await {
            Ok(c) => c,
            Err(e) => return fail(format!("{e:#}")),
        };
        if conn.ready().await.is_err() {
            // The server closed an idle connection: one fresh try.
            conn = match self.connect().await {
                Ok(c) => c,
                Err(e) => return fail(format!("{e:#}")),
            };
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.path)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(self.body.clone()))
            .expect("static request parts are valid");
        let resp = match conn.send_request(req).await {
            Ok(r) => r,
            Err(e) => return fail(format!("sending the request: {e}")),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s).min(MAX_RETRY_AFTER));
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY_BYTES);
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return fail(format!("reading the response: {e}")),
        };
        self.checkin(conn);
        match status {
            StatusCode::OK => Attempt::Done(ending_of(&body, self.expect_stdout.as_deref())),
            StatusCode::TOO_MANY_REQUESTS => {
                Attempt::Throttled(retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
            }
            s => Attempt::Done(Ending::Status(s.as_u16())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        let b = Bytes::new();
        assert!(HttpTarget::new("http://127.0.0.1:8080", b.clone(), None).is_ok());
        assert!(HttpTarget::new("http://localhost:8080/x", b.clone(), None).is_ok());
        assert!(HttpTarget::new("http://[::1]:8080/x", b.clone(), None).is_ok());
        let e = HttpTarget::new("http://10.0.0.1:8080", b.clone(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(HttpTarget::new("https://127.0.0.1:8080", b, None).is_err());
    }

    #[test]
    fn default_path_is_the_job_endpoint() {
        let t = HttpTarget::new("http://127.0.0.1:9/", Bytes::new(), None).unwrap();
        assert_eq!(t.endpoint(), "http://127.0.0.1:9/");
        let t = HttpTarget::new("http://127.0.0.1:9", Bytes::new(), None).unwrap();
        assert_eq!(t.endpoint(), "http://127.0.0.1:9/v1/jobs");
    }
}
