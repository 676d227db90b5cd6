//! `/mcp` on the daemon's port: the MCP server as Streamable HTTP, one
//! [`KilnMcp`] per MCP session (rmcp's session manager keeps them). The
//! API's router has already checked the bearer token; rmcp's `Host` check
//! (against DNS rebinding of a local server) stays on only when the API
//! has no token, as then nothing else stands in a browser's way.

use std::sync::{Arc, OnceLock};

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use super::KilnMcp;
use crate::http::{App, Body};

type Service = StreamableHttpService<KilnMcp, LocalSessionManager>;

/// The daemon's MCP endpoint, made on its first request.
#[derive(Default)]
pub struct McpEndpoint {
    service: OnceLock<Service>,
}

impl McpEndpoint {
    fn service(app: &Arc<App>) -> &Service {
        app.mcp.service.get_or_init(|| {
            let weak = Arc::downgrade(app);
            let mut config = StreamableHttpServerConfig::default();
            if !app.token.is_empty() {
                config = config.disable_allowed_hosts();
            }
            // An idle session ends (and its sandboxes with it) only when
            // the longest TTL has passed: rmcp's default of 5 minutes would
            // take an agent's sandboxes away while it thinks.
            let mut sessions = LocalSessionManager::default();
            sessions.session_config.keep_alive =
                Some(app.scheduler.workspaces().settings().max_ttl);
            StreamableHttpService::new(
                move || Ok(KilnMcp::new(weak.clone())),
                Arc::new(sessions),
                config,
            )
        })
    }

    /// Answers one request to `/mcp` (POST, GET or DELETE).
    pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
        let resp = Self::service(app).handle(req).await;
        let (parts, mut body) = resp.into_parts();
        let (tx, out) = Body::channel();
        // rmcp's body may be an event stream that stays open; it is pumped
        // into the API's streamed body until either side ends.
        tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame;
                if let Ok(data) = frame.into_data() {
                    if tx.send(data).await.is_err() {
                        return;
                    }
                }
            }
        });
        Response::from_parts(parts, out)
    }
}
