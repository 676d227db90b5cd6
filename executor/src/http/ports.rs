//! Exposed ports: `POST /v1/sandboxes/{id}/ports` exposes a port of a
//! networked workspace, and `/v1/sandboxes/{id}/ports/{port}/…` proxies
//! HTTP (and WebSocket, by upgrade) to it, under the API's own auth.
//! Nothing listens on the host for a sandbox: the daemon connects to the
//! sandbox's address for each request, with the mark the firewall lets
//! into a sandbox (see `kiln_sandbox::network`), and the API token is not
//! passed on.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;

use super::sandboxes::find;
use super::{json_response, read_body, ApiError, App, Body};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExposeBody {
    port: u16,
}

fn view(id: &str, ports: &[u16]) -> serde_json::Value {
    json!({
        "ports": ports
            .iter()
            .map(|p| json!({"port": p, "path": format!("/v1/sandboxes/{id}/ports/{p}/")}))
            .collect::<Vec<_>>(),
    })
}

/// `POST /v1/sandboxes/{id}/ports` `{"port": 8080}`.
pub async fn expose(
    app: &Arc<App>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let body = read_body(req, app.max_body_bytes).await?;
    let b: ExposeBody = ApiError::parse_json(&body, "port")?;
    if b.port == 0 {
        return Err(ApiError::field("port", "0 is not a port; 1 to 65535"));
    }
    let ports = ws.expose(b.port).map_err(|e| {
        let mut a = ApiError::field("port", e);
        a.status = StatusCode::UNPROCESSABLE_ENTITY;
        a.code = "unsupported";
        a
    })?;
    Ok(json_response(StatusCode::OK, &view(id, &ports)))
}

/// `GET /v1/sandboxes/{id}/ports`.
pub fn list(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    Ok(json_response(StatusCode::OK, &view(id, &ws.exposed())))
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), dropped both ways
/// except for an upgrade, and the API's own credentials.
fn hop_by_hop(name: &hyper::header::HeaderName, upgrade: bool) -> bool {
    use hyper::header::*;
    let n = name.as_str();
    (!upgrade && (name == CONNECTION || name == UPGRADE))
        || name == AUTHORIZATION
        || name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == PROXY_AUTHORIZATION
        || n == "keep-alive"
        || n == "proxy-connection"
}

/// Any method on `/v1/sandboxes/{id}/ports/{port}/{rest}`: the request goes
/// to `/{rest}` (and query) on the sandbox's port.
pub async fn proxy(
    app: &Arc<App>,
    id: &str,
    port: &str,
    rest: &str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::field("port", format!("{port:?} is not a port")))?;
    if !ws.exposed().contains(&port) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_exposed",
            format!(
                "port {port} of sandbox {id} is not exposed; POST /v1/sandboxes/{id}/ports first"
            ),
        ));
    }
    let bad_gateway = |m: String| ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", m);
    let stream = ws
        .open_port(port)
        .await
        .map_err(|e| bad_gateway(format!("port {port} of sandbox {id}: {e}")))?;
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(stream))
        .map_err(|e| bad_gateway(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| bad_gateway(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
    let client_side = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let path = format!(
        "/{rest}{}",
        parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    let mut out = Request::builder().method(parts.method).uri(path);
    for (k, v) in &parts.headers {
        if !hop_by_hop(k, upgrade) {
            out = out.header(k, v);
        }
    }
    let out = out.body(body).map_err(|e| bad_gateway(e.to_string()))?;
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|e| bad_gateway(format!("port {port} of sandbox {id}: {e}")))?;
    let status = resp.status();
    let mut answer = Response::builder().status(status);
    for (k, v) in resp.headers() {
        if !hop_by_hop(k, status == StatusCode::SWITCHING_PROTOCOLS) {
            answer = answer.header(k, v);
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let server_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(s)) = (client_side.await, server_side.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s)).await;
            }
        });
        return answer
            .body(Body::empty())
            .map_err(|e| bad_gateway(e.to_string()));
    }
    let (tx, body) = Body::channel();
    let mut incoming = resp.into_body();
    tokio::spawn(async move {
        use http_body_util::BodyExt as _;
        while let Some(Ok(frame)) = incoming.frame().await {
            if let Ok(data) = frame.into_data() {
                if tx.send(data).await.is_err() {
                    return;
                }
            }
        }
    });
    answer.body(body).map_err(|e| bad_gateway(e.to_string()))
}
