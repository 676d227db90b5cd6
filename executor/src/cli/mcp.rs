//! `kiln mcp`: Kiln's MCP server for desktop agents, over stdio. It bridges
//! the agent's stdio (one JSON-RPC message a line) to the Streamable HTTP
//! MCP endpoint `/mcp` of a running `kiln serve`, so that there is one MCP
//! server, one set of tools and one place where sandboxes live: each `kiln
//! mcp` process is one MCP session on the daemon, and the session (with its
//! sandboxes) ends when the agent closes stdin.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use super::submit::{parse_server, SseParser};

#[derive(Debug, Args)]
#[command(after_help = "\
Configure a desktop agent to start `kiln mcp` (see docs/agents.md); it
needs a running `kiln serve`, reached at --server.")]
pub struct McpArgs {
    /// The server's base URL (its MCP endpoint is `/mcp` under it).
    #[arg(long, env = "KILN_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Bearer token for a server that requires one.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// What the bridge learned from the server.
#[derive(Default)]
struct Session {
    id: Option<String>,
    protocol: Option<String>,
}

struct Bridge {
    host: String,
    path: String,
    token: Option<String>,
    session: std::sync::Mutex<Session>,
    stdout: Mutex<tokio::io::Stdout>,
}

impl Bridge {
    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(&self.host)
            .await
            .with_context(|| format!("connecting to {} (--server / KILN_SERVER)", self.host))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self, method: &str, body: Vec<u8>) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(method)
            .uri(&self.path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json, text/event-stream");
        {
            let s = self.session.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(id) = &s.id {
                req = req.header("mcp-session-id", id);
            }
            if let Some(v) = &s.protocol {
                req = req.header("mcp-protocol-version", v);
            }
        }
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        Ok(req.body(Full::new(Bytes::from(body)))?)
    }

    /// Writes one message to stdout as one line.
    async fn emit(&self, msg: &[u8]) -> anyhow::Result<()> {
        // Re-encoded, so that a message is always exactly one line.
        let v: Value = serde_json::from_slice(msg).context("the server sent a non-JSON message")?;
        if let Some(p) = v.pointer("/result/protocolVersion").and_then(Value::as_str) {
            self.session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .protocol = Some(p.to_owned());
        }
        let mut line = serde_json::to_vec(&v)?;
        line.push(b'\n');
        let mut out = self.stdout.lock().await;
        out.write_all(&line).await?;
        out.flush().await?;
        Ok(())
    }

    /// Posts one message; forwards the answer (JSON or an event stream).
    async fn post(&self, msg: Vec<u8>) -> anyhow::Result<()> {
        let mut sender = self.connect().await?;
        let resp = sender
            .send_request(self.request("POST", msg.clone())?)
            .await
            .context("posting to the MCP endpoint")?;
        if let Some(id) = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            self.session.lock().unwrap_or_else(|p| p.into_inner()).id = Some(id.to_owned());
        }
        let status = resp.status();
        let sse = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            // A request (it has an id) gets a JSON-RPC error, so the agent
            // is not left waiting.
            let req: Value = serde_json::from_slice(&msg).unwrap_or_default();
            if let Some(id) = req.get("id") {
                let err = serde_json::json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": {"code": -32000, "message": format!(
                        "the Kiln server answered HTTP {status}: {}",
                        String::from_utf8_lossy(&bytes).trim()
                    )},
                });
                self.emit(err.to_string().as_bytes()).await?;
            }
            return Ok(());
        }
        if !sse {
            let bytes = body.collect().await?.to_bytes();
            if !bytes.iter().all(u8::is_ascii_whitespace) {
                self.emit(&bytes).await?;
            }
            return Ok(());
        }
        let mut parser = SseParser::default();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            for (_event, data) in parser.push(&data) {
                if !data.trim().is_empty() {
                    self.emit(data.as_bytes()).await?;
                }
            }
        }
        Ok(())
    }

    /// Ends the session on the server (its sandboxes with it).
    async fn close(&self) {
        if self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .is_none()
        {
            return;
        }
        if let (Ok(mut s), Ok(req)) = (self.connect().await, self.request("DELETE", Vec::new())) {
            let _ = s.send_request(req).await;
        }
    }
}

pub async fn mcp(a: McpArgs) -> anyhow::Result<ExitCode> {
    let (host, base) = parse_server(&a.server)?;
    let bridge = Arc::new(Bridge {
        host,
        path: format!("{base}/mcp"),
        token: a.token,
        session: Default::default(),
        stdout: Mutex::new(tokio::io::stdout()),
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut inflight = JoinSet::new();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if line.trim().is_empty() {
            continue;
        }
        let b = bridge.clone();
        let first = b
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .is_none();
        if first {
            // The session id comes with the first answer; later messages
            // need it, so the first is answered before anything else goes.
            if let Err(e) = b.post(line.into_bytes()).await {
                eprintln!("kiln mcp: {e:#}");
            }
            continue;
        }
        inflight.spawn(async move {
            if let Err(e) = b.post(line.into_bytes()).await {
                eprintln!("kiln mcp: {e:#}");
            }
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    bridge.close().await;
    Ok(ExitCode::SUCCESS)
}
