//! The MCP tools. Each takes its arguments as a JSON object and parses them
//! itself against the schema it advertises, so that wrong arguments are a
//! tool error the model can read and correct, not a protocol error.

use std::sync::Arc;

use base64::Engine as _;
use rmcp::handler::server::common::schema_for_type;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ErrorData, JsonObject};
use rmcp::{schemars, tool, tool_router};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::KilnMcp;
use crate::contexts::ContextExecResult;
use crate::http::App;
use crate::workspaces::{EndReason, Workspace};
use kiln_protocol::{JobResult, JobSpec};

type ToolResult = Result<CallToolResult, ErrorData>;

/// A tool error: the model sees `message` and `isError: true`.
fn fail(message: impl Into<String>) -> ToolResult {
    Ok(CallToolResult::error(vec![ContentBlock::text(
        message.into(),
    )]))
}

fn parse<T: DeserializeOwned>(args: JsonObject) -> Result<T, String> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| format!("bad arguments: {e}; see the tool's input schema"))
}

/// A file to place before the code runs.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileArg {
    /// Path relative to the work directory, e.g. `data/input.csv`.
    pub path: String,
    /// The file's content (UTF-8 text, or base64 when `base64` is true).
    pub content: String,
    /// Whether `content` is base64 (for binary files).
    #[serde(default)]
    pub base64: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeArgs {
    /// `python`, `node` or `bash` (aliases such as `py`, `js`, `sh` work).
    pub language: String,
    /// The program's source.
    pub code: String,
    /// Files to place in the work directory first.
    #[serde(default)]
    pub files: Vec<FileArg>,
    /// Standard input for the program.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Time limit in milliseconds (default 10000, at most 900000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Whether the code may reach the internet, under the server's egress
    /// rules (refused where the server cannot give it). Default false.
    #[serde(default)]
    pub allow_internet: bool,
    /// An OCI image the server has (or may pull) whose filesystem the code
    /// runs in, e.g. `registry/python:3.12`; default: the server's.
    #[serde(default)]
    pub image: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxArgs {
    /// The sandbox's main language (`python`, `node`, `bash`); execs default
    /// to it. Default `python`.
    #[serde(default)]
    pub template: Option<String>,
    /// Seconds until the sandbox is deleted on its own (default from the
    /// server, typically 600).
    #[serde(default)]
    pub ttl_s: Option<f64>,
    /// Whether code may reach the internet (refused where the server
    /// cannot give it).
    #[serde(default)]
    pub allow_internet: bool,
    /// Memory limit in MiB.
    #[serde(default)]
    pub memory_mb: Option<i64>,
    /// An OCI image the server has (or may pull) to root the sandbox in,
    /// e.g. `registry/python:3.12`; default: the server's.
    #[serde(default)]
    pub image: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// A sandbox id from create_sandbox.
    pub sandbox_id: String,
    /// The code to run.
    pub code: String,
    /// Language of the code; default the sandbox's template.
    #[serde(default)]
    pub language: Option<String>,
    /// Run in the sandbox's long-lived interpreter (Python or Node): variables,
    /// imports and loaded data stay between stateful execs, and the value
    /// of a trailing expression is returned, like a notebook cell. Default
    /// false: a fresh process per exec (files persist either way).
    #[serde(default)]
    pub stateful: bool,
    /// Time limit in milliseconds (default 10000). A stateful exec that
    /// passes it is interrupted and keeps its state.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    pub sandbox_id: String,
    /// Path relative to the sandbox's work directory.
    pub path: String,
    /// UTF-8 text, or base64 when `base64` is true.
    pub content: String,
    #[serde(default)]
    pub base64: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathArgs {
    pub sandbox_id: String,
    /// Path relative to the sandbox's work directory.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    pub sandbox_id: String,
    /// Directory relative to the work directory; default the work
    /// directory itself.
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxArgs {
    pub sandbox_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

fn files_json(files: &[FileArg]) -> Vec<Value> {
    files
        .iter()
        .map(|f| {
            let mut v = json!({"path": f.path, "content": f.content});
            if f.base64 {
                v["encoding"] = json!("base64");
            }
            v
        })
        .collect()
}

fn spec(v: Value) -> Result<JobSpec, String> {
    JobSpec::from_json(v.to_string().as_bytes()).map_err(|e| e.to_string())
}

impl KilnMcp {
    fn app(&self) -> Result<Arc<App>, String> {
        self.app
            .upgrade()
            .ok_or_else(|| "the server is shutting down".to_owned())
    }

    /// The session's sandbox `id`.
    fn owned(&self, id: &str) -> Result<(Arc<App>, Arc<Workspace>), String> {
        let app = self.app()?;
        if !self.state().sandboxes.contains(id) {
            return Err(format!(
                "sandbox {id} is not one of this session's sandboxes; list_sandboxes shows yours, create_sandbox makes one"
            ));
        }
        match app.scheduler.workspaces().get(id) {
            Some(ws) => Ok((app, ws)),
            None => {
                self.state().sandboxes.remove(id);
                Err(format!(
                    "sandbox {id} is gone (deleted, or its TTL passed); create a new one"
                ))
            }
        }
    }

    /// A job result as text for the model (plus images), cut where long.
    fn render(&self, r: &JobResult, ctx: Option<&ContextExecResult>) -> CallToolResult {
        let mut head = format!(
            "outcome: {}",
            serde_json::to_value(r.outcome)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("?")
        );
        if let Some(c) = r.exit_code {
            head.push_str(&format!(", exit code {c}"));
        }
        if let Some(s) = r.signal {
            head.push_str(&format!(", signal {s}"));
        }
        if let Some(m) = &r.message {
            head.push_str(&format!("\nnote: {m}"));
        }
        let mut text = head;
        if !r.stdout.is_empty() {
            text.push_str("\n--- stdout ---\n");
            text.push_str(&self.fit("stdout", &r.stdout));
        }
        if r.stdout_truncated {
            text.push_str("\n[stdout passed the output limit and was cut by the sandbox]");
        }
        if !r.stderr.is_empty() {
            text.push_str("\n--- stderr ---\n");
            text.push_str(&self.fit("stderr", &r.stderr));
        }
        let mut blocks = Vec::new();
        if let Some(c) = ctx {
            for d in &c.results {
                if let Some(Value::String(t)) = d.data.get("text/plain") {
                    let label = if d.kind == "result" {
                        "result"
                    } else {
                        "display"
                    };
                    text.push_str(&format!("\n--- {label} ---\n"));
                    text.push_str(&self.fit(label, t));
                }
                for mime in ["image/png", "image/jpeg"] {
                    if let Some(Value::String(b64)) = d.data.get(mime) {
                        blocks.push(ContentBlock::image(b64.clone(), mime));
                    }
                }
            }
            if !c.context_alive {
                text.push_str("\n[the interpreter died and its state is lost; the next stateful exec starts a fresh one]");
            }
        }
        blocks.insert(0, ContentBlock::text(text));
        let ok = matches!(r.outcome, kiln_protocol::Outcome::Ok);
        if ok {
            CallToolResult::success(blocks)
        } else {
            CallToolResult::error(blocks)
        }
    }

    /// The session's default context for `language` in `ws`, made on first
    /// use (and again after it died).
    async fn default_context(
        &self,
        app: &App,
        ws: &Workspace,
        language: &str,
    ) -> Result<String, String> {
        let key = (ws.info().id.clone(), language.to_owned());
        let known = self.state().contexts.get(&key).cloned();
        if let Some(id) = known {
            if let Ok(c) = ws.contexts.get(&id) {
                if !matches!(c.info().state, crate::contexts::ContextState::Dead { .. }) {
                    return Ok(id);
                }
                let _ = ws.contexts.delete(&id).await;
            }
        }
        let info = crate::http::contexts::create_in(app, ws, Some(language), None)
            .await
            .map_err(|e| e.message)?;
        self.state().contexts.insert(key, info.id.clone());
        Ok(info.id)
    }
}

#[tool_router(vis = "pub(super)")]
impl KilnMcp {
    #[tool(
        description = "Run a program once in a fresh, isolated sandbox and return its stdout, stderr, exit code and outcome (ok, error, timeout, oom, killed). Use for one-off code; nothing is kept afterwards. For several steps that share files or variables, use create_sandbox and exec instead.",
        input_schema = schema_for_type::<RunCodeArgs>()
    )]
    async fn run_code(&self, Parameters(args): Parameters<JsonObject>) -> ToolResult {
        let a: RunCodeArgs = match parse(args) {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let app = match self.app() {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let mut body =
            json!({"runtime": a.language, "code": a.code, "files": files_json(&a.files)});
        if let Some(s) = a.stdin {
            body["stdin"] = json!(s);
        }
        if let Some(t) = a.timeout_ms {
            body["limits"] = json!({"timeout_ms": t});
        }
        if a.allow_internet {
            body["allow_internet"] = json!(true);
        }
        if let Some(i) = a.image {
            body["image"] = json!(i);
        }
        let spec = match spec(body) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let handle = match app.scheduler.submit(spec, Default::default()) {
            Ok(h) => h,
            Err(e) => return fail(e.to_string()),
        };
        let r = handle.result().await;
        Ok(self.render(&r, None))
    }

    #[tool(
        description = "Create a sandbox that lives across calls (until delete_sandbox, its TTL, or the end of this session) and return its id. Files written to it and, with exec's stateful=true, Python variables persist between execs.",
        input_schema = schema_for_type::<CreateSandboxArgs>()
    )]
    async fn create_sandbox(&self, Parameters(args): Parameters<JsonObject>) -> ToolResult {
        let a: CreateSandboxArgs = match parse(args) {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let app = match self.app() {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let mut body = json!({
            "template": a.template.unwrap_or_else(|| "python".into()),
            "allow_internet": a.allow_internet,
        });
        if let Some(t) = a.ttl_s {
            body["ttl_s"] = json!(t);
        }
        if let Some(m) = a.memory_mb {
            body["memory_mb"] = json!(m);
        }
        if let Some(i) = a.image {
            body["image"] = json!(i);
        }
        let ws = app.scheduler.workspaces();
        let req = match crate::http::sandboxes::parse_create(
            ws.settings(),
            body.to_string().as_bytes(),
        ) {
            Ok(r) => r,
            Err(e) => return fail(e.message),
        };
        match ws.create(req).await {
            Ok(info) => {
                self.state().sandboxes.insert(info.id.clone());
                let v = serde_json::to_value(&info).unwrap_or_default();
                Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                    "sandbox_id: {}\ntemplate: {}\nexpires in {} s\n{}",
                    info.id, info.template, info.ttl_s, v
                ))]))
            }
            Err(e) => fail(format!("creating the sandbox failed: {e}")),
        }
    }

    #[tool(
        description = "Run code in one of your sandboxes (its files persist between execs). With stateful=true the code runs in the sandbox's long-lived Python interpreter: variables and imports stay, the value of a trailing expression is returned, and matplotlib figures come back as images. Returns stdout, stderr, outcome.",
        input_schema = schema_for_type::<ExecArgs>()
    )]
    async fn exec(&self, Parameters(args): Parameters<JsonObject>) -> ToolResult {
        let a: ExecArgs = match parse(args) {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let (app, ws) = match self.owned(&a.sandbox_id) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        let language = a.language.unwrap_or_else(|| ws.info().template.clone());
        let mut body = json!({"runtime": language, "code": a.code});
        if let Some(t) = a.timeout_ms {
            body["limits"] = json!({"timeout_ms": t});
        }
        let spec = match spec(body) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        if !a.stateful {
            return match app.scheduler.workspaces().exec(&ws, spec, &mut ()).await {
                Ok(r) => Ok(self.render(&r, None)),
                Err(e) => fail(e.to_string()),
            };
        }
        let ctx = match self.default_context(&app, &ws, &language).await {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        let cell = match crate::http::contexts::cell_from_spec(spec) {
            Ok(c) => c,
            Err(e) => return fail(e.message),
        };
        match crate::http::contexts::run_cell(&ws, &ctx, cell, &mut ()).await {
            Ok(r) => Ok(self.render(&r.result, Some(&r))),
            Err(e) => fail(e.message),
        }
    }

    #[tool(
        description = "Write a file into one of your sandboxes, under its work directory (the directory code runs in). Parent directories are created.",
        input_schema = schema_for_type::<WriteFileArgs>()
    )]
    async fn write_file(&self, Parameters(args): Parameters<JsonObject>) -> ToolResult {
        let a: WriteFileArgs = match parse(args) {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let (app, ws) = match self.owned(&a.sandbox_id) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        let data = if a.base64 {
            match base64::engine::general_purpose::STANDARD.decode(&a.content) {
                Ok(d) => d,
                Err(e) => return fail(format!("content: not base64 ({e})")),
            }
        } else {
            a.content.into_bytes()
        };
        let n = data.len();
        match app
            .scheduler
            .workspaces()
            .put_file(&ws, &a.path, data)
            .await
        {
            Ok(()) => Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                "wrote {n} bytes to {}",
                a.path
            ))])),
            Err(e) => fail(e.to_string()),
        }
    }

    #[tool(
        description = "Read a file from one of your sandboxes (path relative to its work directory). Text comes back as text; a binary file as base64.",
        input_schema = schema_for_type::<PathArgs>()
    )]
    async fn read_file(&self, Parameters(args): Parameters<JsonObject>) -> ToolResult {
        let a: PathArgs = match parse(args) {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let (app, ws) = match self.owned(&a.sandbox_id) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        match app.scheduler.workspaces().get_file(&ws, &a.path).await {
            Ok(data) => match String::from_utf8(data) {
                Ok(t) => Ok(CallToolResult::success(vec![ContentBlock::text(
                    self.fit("file", &t),
                )])),
                Err(e) => {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
                    Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                        "(binary file, base64)\n{}",
                        self.fit("file", &b64)
                    ))]))
                }
            },
            Err(e) => fail(format!("reading {}: {e}", a.path)),
        }
    }

    #[tool(
        description = "List files under a directory of one of your sandboxes (four levels deep, at most 1000 entries): one line per entry with its type (f file, d directory, l link), size in bytes and path.",
        input_schema = schema_for_type::<ListFilesArgs>()
    )]
    async fn list_files(&self, Parameters(args): Parameters<JsonObject>) -> ToolResult {
        let a: ListFilesArgs = match parse(args) {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let (app, ws) = match self.owned(&a.sandbox_id) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        let dir = a.path.unwrap_or_else(|| ".".into());
        if dir.starts_with('/') || dir.split('/').any(|c| c == "..") {
            return fail("path: must be relative to the work directory, without `..`");
        }
        let body = json!({
            "runtime": "bash",
            "entrypoint": ".kiln-list-files.sh",
            "files": [{"path": ".kiln-list-files.sh", "content":
                "cd -- \"$1\" || exit 2\nfind . -mindepth 1 -maxdepth 4 -not -name '.kiln-*' -printf '%y %s %P\\n' | sort -k3 | head -n 1000\n"}],
            "args": [dir],
        });
        let spec = match spec(body) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        match app.scheduler.workspaces().exec(&ws, spec, &mut ()).await {
            Ok(r) if r.exit_code == Some(0) => {
                Ok(CallToolResult::success(vec![ContentBlock::text(
                    if r.stdout.is_empty() {
                        "(empty)".to_owned()
                    } else {
                        self.fit("listing", &r.stdout)
                    },
                )]))
            }
            Ok(r) => fail(format!("listing {dir} failed: {}", r.stderr.trim())),
            Err(e) => fail(e.to_string()),
        }
    }

    #[tool(
        description = "Delete one of your sandboxes and everything in it now.",
        input_schema = schema_for_type::<SandboxArgs>()
    )]
    async fn delete_sandbox(&self, Parameters(args): Parameters<JsonObject>) -> ToolResult {
        let a: SandboxArgs = match parse(args) {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let (app, _ws) = match self.owned(&a.sandbox_id) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        self.state().sandboxes.remove(&a.sandbox_id);
        app.scheduler
            .workspaces()
            .end(&a.sandbox_id, EndReason::Deleted)
            .await;
        Ok(CallToolResult::success(vec![ContentBlock::text(format!(
            "sandbox {} deleted",
            a.sandbox_id
        ))]))
    }

    #[tool(
        description = "List this session's sandboxes with their template and expiry.",
        input_schema = schema_for_type::<NoArgs>()
    )]
    async fn list_sandboxes(&self, Parameters(_args): Parameters<JsonObject>) -> ToolResult {
        let app = match self.app() {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let mine: Vec<String> = self.state().sandboxes.iter().cloned().collect();
        let list: Vec<Value> = app
            .scheduler
            .workspaces()
            .list()
            .into_iter()
            .filter(|w| mine.contains(&w.id))
            .map(
                |w| json!({"sandbox_id": w.id, "template": w.template, "expires_at": w.expires_at}),
            )
            .collect();
        Ok(CallToolResult::success(vec![ContentBlock::text(
            json!({ "sandboxes": list }).to_string(),
        )]))
    }
}
