//! The MCP server (Model Context Protocol, with the official Rust SDK
//! `rmcp`): Kiln's tools for LLM agents. It is served as Streamable HTTP at
//! `/mcp` on the daemon's port, behind the API's bearer token (`http.rs`);
//! `kiln mcp` bridges a desktop agent's stdio to it (`cli/mcp.rs`).
//!
//! One [`KilnMcp`] exists per MCP session. The sandboxes it creates are the
//! session's: the tools refuse other sandboxes, and when the session ends
//! (the client deletes it, or `kiln mcp` exits) its sandboxes are deleted;
//! their TTL bounds them either way. Tools never fail the session: bad
//! arguments and failed runs are tool errors (`isError`) with a message the
//! model can act on. Output longer than [`MAX_TEXT_BYTES`] is cut for the
//! model with a note naming a `kiln://output/...` resource that holds all
//! of it.

mod http;
mod tools;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{
    ErrorData, Implementation, ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse,
    ReadResourceResult, ResourceContents, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool_handler, RoleServer, ServerHandler};

pub use http::McpEndpoint;

use crate::http::App;

/// Most bytes of one output stream shown to the model; the rest is behind a
/// resource URI.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// Whole outputs a session keeps for `resources/read`, oldest dropped first.
const KEPT_OUTPUTS: usize = 64;

/// What a session owns and keeps.
#[derive(Default)]
struct SessionState {
    sandboxes: HashSet<String>,
    /// The context `exec` with `stateful: true` uses, per sandbox and
    /// language.
    contexts: HashMap<(String, String), String>,
    /// Whole outputs by URI.
    outputs: HashMap<String, String>,
    order: VecDeque<String>,
    next_output: u64,
}

/// One MCP session's server.
#[derive(Clone)]
pub struct KilnMcp {
    app: Weak<App>,
    state: Arc<Mutex<SessionState>>,
    /// Deletes the session's sandboxes when the last clone goes.
    _reaper: Arc<Reaper>,
    tool_router: ToolRouter<Self>,
}

/// Deletes a session's sandboxes when the session's server is dropped.
struct Reaper {
    app: Weak<App>,
    state: Arc<Mutex<SessionState>>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let ids: Vec<String> = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sandboxes
            .drain()
            .collect();
        let Some(app) = self.app.upgrade() else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for id in ids {
                    if app
                        .scheduler
                        .workspaces()
                        .end(&id, crate::workspaces::EndReason::Deleted)
                        .await
                    {
                        tracing::info!(sandbox = %id, "MCP session ended; its sandbox deleted");
                    }
                }
            });
        }
    }
}

impl KilnMcp {
    pub fn new(app: Weak<App>) -> Self {
        let state = Arc::new(Mutex::new(SessionState::default()));
        Self {
            _reaper: Arc::new(Reaper {
                app: app.clone(),
                state: state.clone(),
            }),
            app,
            state,
            tool_router: Self::tool_router(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `text` whole behind a new resource URI and returns the URI.
    fn keep_output(&self, what: &str, text: String) -> String {
        let mut s = self.state();
        s.next_output += 1;
        let uri = format!("kiln://output/{}/{what}", s.next_output);
        s.outputs.insert(uri.clone(), text);
        s.order.push_back(uri.clone());
        while s.order.len() > KEPT_OUTPUTS {
            if let Some(old) = s.order.pop_front() {
                s.outputs.remove(&old);
            }
        }
        uri
    }

    /// `text` cut to [`MAX_TEXT_BYTES`] (on a character boundary) with a
    /// note naming the resource that keeps all of it.
    fn fit(&self, what: &str, text: &str) -> String {
        if text.len() <= MAX_TEXT_BYTES {
            return text.to_owned();
        }
        let mut cut = MAX_TEXT_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let uri = self.keep_output(what, text.to_owned());
        format!(
            "{}\n[{what} truncated: showing {cut} of {} bytes; the whole {what} is the resource {uri} (read it with resources/read)]",
            &text[..cut],
            text.len()
        )
    }
}

const INSTRUCTIONS: &str = "Kiln runs code in isolated sandboxes. For one-off code use run_code \
(python, node or bash). For work over several steps, create_sandbox, then exec in it (with \
stateful=true to keep Python variables and imports between calls, like notebook cells; the \
value of a trailing expression is returned), write_file/read_file/list_files under the \
sandbox's work directory, and delete_sandbox when done. Sandboxes belong to this session and \
are deleted when it ends or their TTL passes.";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for KilnMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("kiln", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    /// Protocol versions with sessions only. From 2026-07-28 on, MCP has no
    /// sessions and rmcp serves each request with a fresh server, so a
    /// sandbox could belong to nobody (and its owner's end would delete
    /// it at once); clients fall back to 2025-11-25.
    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let text = self.state().outputs.get(&request.uri).cloned();
        match text {
            Some(t) => Ok(ReadResourceResult::new(vec![ResourceContents::text(t, request.uri)]).into()),
            None => Err(ErrorData::resource_not_found(
                format!(
                    "no resource {}: outputs are kept for this session only, the last {KEPT_OUTPUTS}",
                    request.uri
                ),
                None,
            )),
        }
    }
}
