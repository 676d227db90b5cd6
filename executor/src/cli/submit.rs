//! `kiln submit`: sends one job to a running `kiln serve` and prints its
//! output like `kiln run` does (exit status included), or its result as
//! JSON; `--follow` streams the output as the job produces it (the API's
//! SSE stream), `--no-wait` prints the job id and returns at once.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kiln_protocol::{JobId, JobResult, RuntimeTable};
use serde_json::Value;

use super::job::{job_bytes, JobArgs};
use crate::cli::run::exit_status;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  kiln submit --runtime python -c 'print(1)'
  kiln submit script.py --follow -- arg1
  kiln submit --job job.json --json
  kiln submit --job job.json --timeout 30s --memory 1G   # flags override the file
  KILN_SERVER=http://kiln-node-1:8080 KILN_TOKEN=... kiln submit main.js

Job flags with --job override the document's fields. Sizes and durations
need their unit (64M, 1G; 500ms, 10s, 2m; see `kiln run --help`).

Exit status: as `kiln run` (the job's own; 124 timeout; 137 oom/killed;
2 rejected, by the server or for a wrong flag; 70 internal), and 75 when
the server is busy or shutting down.")]
pub struct SubmitArgs {
    #[command(flatten)]
    job_args: JobArgs,
    /// Stream the output as it happens.
    #[arg(short, long)]
    follow: bool,
    /// Print the JobResult as JSON.
    #[arg(long, conflicts_with = "follow")]
    json: bool,
    /// Do not wait: print the job's id and return.
    #[arg(long, conflicts_with_all = ["follow", "json"])]
    no_wait: bool,
    /// The server's base URL.
    #[arg(long, env = "KILN_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Bearer token for a server that requires one.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Exit status when the server refused for now (EX_TEMPFAIL).
const TEMPFAIL: u8 = 75;

/// `http://host:port[/base]` split into the address and the base path.
pub(crate) fn parse_server(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").with_context(|| {
        format!("--server {url:?}: only http:// URLs are supported, e.g. http://127.0.0.1:8080")
    })?;
    let (host, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        bail!("--server {url:?} names no host");
    }
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok((host, base.to_owned()))
}

async fn send(
    a: &SubmitArgs,
    path: &str,
    body: Vec<u8>,
    sse: bool,
) -> anyhow::Result<Response<Incoming>> {
    let (host, base) = parse_server(&a.server)?;
    let stream = tokio::net::TcpStream::connect(&host)
        .await
        .with_context(|| format!("connecting to {} (--server / KILN_SERVER)", a.server))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::post(format!("{base}{path}"))
        .header(hyper::header::HOST, &host)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if sse {
        req = req.header(hyper::header::ACCEPT, "text/event-stream");
    }
    if let Some(t) = &a.token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body)))?;
    sender.send_request(req).await.context("sending the job")
}

async fn body_json(resp: Response<Incoming>) -> anyhow::Result<Value> {
    let bytes = resp.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "the server's answer is not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// Prints a refusal and picks the exit status.
async fn refused(resp: Response<Incoming>) -> anyhow::Result<ExitCode> {
    let status = resp.status();
    let v = body_json(resp).await.unwrap_or(Value::Null);
    let msg = v["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string());
    eprintln!("kiln: the server refused the job ({status}): {msg}");
    Ok(ExitCode::from(match status.as_u16() {
        429 | 503 => TEMPFAIL,
        400..=499 => 2,
        _ => 70,
    }))
}

fn print_result(r: &JobResult, json: bool, output: bool) {
    if json {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer_pretty(&mut out, r);
        let _ = writeln!(out);
        return;
    }
    if output {
        let _ = std::io::stdout().write_all(r.stdout.as_bytes());
        let _ = std::io::stderr().write_all(r.stderr.as_bytes());
    }
    let _ = std::io::stdout().flush();
    if let Some(m) = &r.message {
        if !matches!(r.outcome, kiln_protocol::Outcome::Ok) {
            eprintln!("kiln: {}: {m}", r.outcome);
        }
    }
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<ExitCode> {
    // A job the command line gets wrong is rejected here, like `kiln run`
    // rejects it (status 2, a rejected result with --json), not sent.
    let body = match job_bytes(&a.job_args, &RuntimeTable::default()) {
        Ok((body, _)) => body,
        Err(e) => {
            let r = JobResult::rejected(JobId::random(), format!("{e:#}"));
            print_result(&r, a.json, false);
            return Ok(ExitCode::from(exit_status(&r)));
        }
    };
    if a.no_wait {
        let resp = send(&a, "/v1/jobs?wait=false", body, false).await?;
        if !resp.status().is_success() {
            return refused(resp).await;
        }
        let v = body_json(resp).await?;
        println!("{}", v["id"].as_str().unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let resp = send(&a, "/v1/jobs", body, a.follow).await?;
    if !resp.status().is_success() {
        return refused(resp).await;
    }
    if !a.follow {
        let r: JobResult = serde_json::from_value(body_json(resp).await?)
            .context("the server's answer is not a JobResult")?;
        print_result(&r, a.json, true);
        return Ok(ExitCode::from(exit_status(&r)));
    }
    let mut parser = SseParser::default();
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the event stream")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        for (event, data) in parser.push(data) {
            let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            match event.as_str() {
                "stdout" => {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(v["data"].as_str().unwrap_or_default().as_bytes());
                    let _ = o.flush();
                }
                "stderr" => {
                    let _ = std::io::stderr()
                        .write_all(v["data"].as_str().unwrap_or_default().as_bytes());
                }
                "exit" => {
                    let r: JobResult =
                        serde_json::from_value(v).context("the exit event is not a JobResult")?;
                    print_result(&r, false, false);
                    return Ok(ExitCode::from(exit_status(&r)));
                }
                _ => {}
            }
        }
    }
    bail!("the event stream ended without an exit event")
}

/// A Server-Sent Events parser (the WHATWG rules that matter here: lines
/// end in LF, CRLF or CR; `event:` and `data:` fields, a space after the
/// colon dropped; comments ignored; a blank line dispatches).
#[derive(Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            let end = line.pop();
            if end == Some(b'\r') && self.buf.first() == Some(&b'\n') {
                self.buf.remove(0);
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if !self.data.is_empty() {
                    let event = if self.event.is_empty() {
                        "message".to_owned()
                    } else {
                        std::mem::take(&mut self.event)
                    };
                    out.push((event, self.data.join("\n")));
                }
                self.data.clear();
                self.event.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.event = value,
                "data" => self.data.push(value),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks_are_reassembled() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: std").is_empty());
        assert!(p.push(b"out\ndata: {\"data\":1}\n").is_empty());
        let ev = p.push(b"\n: comment\r\nevent: exit\r\ndata: x\r\ndata: y\r\n\r\n");
        assert_eq!(
            ev,
            vec![
                ("stdout".into(), "{\"data\":1}".into()),
                ("exit".into(), "x\ny".into())
            ]
        );
    }

    #[test]
    fn server_urls_parse() {
        assert_eq!(
            parse_server("http://127.0.0.1:9/x/").unwrap(),
            ("127.0.0.1:9".into(), "/x".into())
        );
        assert_eq!(parse_server("http://h").unwrap().0, "h:80");
        assert!(parse_server("https://h").is_err());
    }
}
