//! The table of language runtimes. Adding a language is configuration: a
//! `[[runtime]]` entry in TOML with the command that runs a file and,
//! optionally, a warm start. The host owns the table and hands it to the agent
//! in the handshake, so both sides always agree.
//!
//! ## The warm-start contract
//!
//! A warm runtime is an interpreter the agent starts before any code exists,
//! with file descriptor 3 open on a pipe. It reads one line of JSON from fd 3:
//! `{"file": "/work/main.py", "args": [...], "env": {...}, "cwd": "/work"}`,
//! then replaces its environment, changes directory, sets its argv and runs
//! the file as the main program. stdin/stdout/stderr are already the job's.
//! Its exit status is the job's exit status. Whatever the interpreter does
//! before it blocks on fd 3 is off the job's clock, and how it exits is up
//! to it as long as the job cannot tell the difference: the built-in Python
//! entry dry-runs the job path before waiting and skips CPython's module
//! teardown when nothing can observe it (see `runtimes.toml`).
//!
//! ## The zygote contract
//!
//! A warm start marked `zygote = true` also works as a *zygote* in a
//! sandbox with rooms (a jail): the agent starts one copy per sandbox, as
//! the sandbox's root with the agent's capabilities, with fd 3 a
//! `SOCK_SEQPACKET` socket instead of a pipe. The command must tell the two
//! apart (the built-in Python looks at fd 3's type) and, on the socket:
//!
//! 1. read one message, the set-up: JSON `{"uid", "gid", "cwd", "filters"}`
//!    (the job's identity, its work directory, and the job's seccomp
//!    programs as base64 `struct sock_filter` arrays);
//! 2. prepare what it can, then send `{"ready": true}`;
//! 3. for each message `{"id": n}` arriving with five descriptors (a pidfd
//!    of the room's holder, then the new interpreter's stdin, stdout,
//!    stderr and control pipe), start an interpreter that is a child of the
//!    agent (not of the zygote: the agent reaps every exec), in the room's
//!    pid, mount, network and IPC namespaces (`setns` on the pidfd), and
//!    answer `{"id": n, "pid": p}` with its pid as the zygote sees it, or
//!    `{"id": n, "error": "..."}`. The answer comes only once the
//!    interpreter has entered the room: the `setns` needs the holder
//!    dumpable, and the agent (whose memory the holder shares) is not
//!    dumpable while it writes a job's files, which it may do as soon as
//!    it has the answer. That interpreter must, before it reads
//!    its job: put the four descriptors on 0-3 and close every other, start
//!    a session, have an empty capability bounding set, set its
//!    `oom_score_adj` to 1000, drop to the uid and gid with no
//!    supplementary groups, set no_new_privs, install the filters in order,
//!    and change to the work directory; then it is a warm interpreter as
//!    above. Any failure before the job must end it (status 127), never
//!    let it run code;
//! 4. exit when the socket closes.
//!
//! Everything a fork inherits was made before any job existed, and nothing
//! a job does reaches the zygote. But a fork also inherits the zygote's
//! memory layout: where libc, the heap and the stack are, the stack
//! protector's canary, the interpreter's hash seed. So after
//! `zygote_max_uses` forks the agent replaces the zygote with a freshly
//! started one, whose forks get a layout of their own (see
//! `docs/security.md`). Where rooms are not in use (a microVM guest), the
//! same command runs as a plain warm start.
//!
//! ## Clones
//!
//! A microVM restored from a template snapshot arrives with the warm
//! interpreters the template had, and so with their state, random number
//! generators included, shared by every clone. A warm start marked
//! `reseeds = true` draws its generators afresh from the operating system
//! when it takes its job (after the guest setup has renewed the kernel's
//! pool); the agent replaces every other warm interpreter after the setup,
//! at the price of a cold start for the next job.

use serde::{Deserialize, Serialize};

/// How to start an interpreter ahead of time (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmStart {
    pub command: Vec<String>,
    /// The command also speaks the zygote contract (see the module docs):
    /// in a sandbox with rooms, one long-lived copy forks every warm
    /// interpreter instead of each being started from scratch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zygote: bool,
    /// How many interpreters one zygote forks (each runs at most one job,
    /// and all share the zygote's memory layout) before the agent replaces
    /// it with a freshly started one; at least 1, only with `zygote`.
    /// Unset: [`DEFAULT_ZYGOTE_MAX_USES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zygote_max_uses: Option<u32>,
    /// The interpreter reseeds its random number generators from the
    /// operating system when it takes its job (see "Clones" above), so a
    /// restored guest may keep it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reseeds: bool,
}

/// Forks one zygote makes when the table does not say (see
/// [`WarmStart::zygote_max_uses`]). A fresh zygote costs one interpreter
/// start and import, ~30 ms of CPU on the benchmark machine: every 64 jobs
/// that was within the noise of pooled jobs' CPU and latency, every 16 it
/// added a third to the CPU and doubled the p99 (`docs/BENCHMARKS.md`).
pub const DEFAULT_ZYGOTE_MAX_USES: u32 = 64;

impl WarmStart {
    /// How many interpreters one zygote of this runtime forks.
    pub fn zygote_max_uses(&self) -> u32 {
        self.zygote_max_uses.unwrap_or(DEFAULT_ZYGOTE_MAX_USES)
    }
}

/// One language runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Canonical name, as reported in results and `/api/v2/runtimes`.
    pub name: String,
    /// Version string reported to clients (Piston's `version`).
    #[serde(default)]
    pub version: String,
    /// Other names accepted in a job's `runtime` (Piston's `aliases`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// File extensions (without the dot) that select this runtime.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// File name given to inline code.
    pub file: String,
    /// Command that runs a file cold; `{file}` is replaced by the
    /// entrypoint's absolute path, and the job's args are appended.
    pub command: Vec<String>,
    /// Optional warm start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmStart>,
    /// Which of Kiln's code-context drivers this runtime's interpreter
    /// runs (stateful cells, `POST /v1/sandboxes/{id}/contexts`); unset:
    /// the runtime has no code contexts. The driver is run by this
    /// runtime's `command`, so a runtime with another interpreter of the
    /// same language (an image's Python) gets contexts by naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contexts: Option<ContextDriver>,
}

/// A code-context driver shipped with Kiln: a program in the runtime's own
/// language that runs cells in one long-lived interpreter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContextDriver {
    /// For a CPython 3 interpreter.
    Python,
    /// For a Node.js interpreter.
    Node,
}

impl Runtime {
    /// The cold command for `file` with `args`.
    pub fn cold_argv(&self, file: &str, args: &[String]) -> Vec<String> {
        self.command
            .iter()
            .map(|a| a.replace("{file}", file))
            .chain(args.iter().cloned())
            .collect()
    }

    /// Whether `name` (case-insensitive) names this runtime.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// Why a runtime table or a runtime name was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The TOML did not parse as a runtime table.
    #[error("runtime table is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// A runtime entry is unusable.
    #[error("runtime {name:?}: {message}")]
    Invalid { name: String, message: String },
    /// The job names a runtime the table does not have.
    #[error("unknown runtime {name:?}; available: {available}")]
    Unknown { name: String, available: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    runtime: Vec<Runtime>,
}

/// The runtimes a host offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeTable {
    runtimes: Vec<Runtime>,
}

/// The built-in table: Python 3, Node.js and Bash from the host's `/usr/bin`.
pub const DEFAULT_RUNTIMES_TOML: &str = include_str!("runtimes.toml");

impl Default for RuntimeTable {
    fn default() -> Self {
        Self::from_toml(DEFAULT_RUNTIMES_TOML).expect("the built-in runtime table is valid")
    }
}

impl RuntimeTable {
    /// Parses a table of `[[runtime]]` entries.
    pub fn from_toml(text: &str) -> Result<Self, RuntimeError> {
        let file: TableFile = toml::from_str(text)?;
        let table = Self {
            runtimes: file.runtime,
        };
        table.check()?;
        Ok(table)
    }

    fn check(&self) -> Result<(), RuntimeError> {
        for (i, r) in self.runtimes.iter().enumerate() {
            let invalid = |message: &str| RuntimeError::Invalid {
                name: r.name.clone(),
                message: message.to_owned(),
            };
            if r.command.is_empty() || !r.command[0].starts_with('/') {
                return Err(invalid(
                    "`command` must start with an absolute program path",
                ));
            }
            if !r.command.iter().any(|a| a.contains("{file}")) {
                return Err(invalid("`command` must mention {file}"));
            }
            if let Some(w) = &r.warm {
                if w.command.is_empty() || !w.command[0].starts_with('/') {
                    return Err(invalid(
                        "`warm.command` must start with an absolute program path",
                    ));
                }
                match w.zygote_max_uses {
                    Some(_) if !w.zygote => {
                        return Err(invalid(
                            "`warm.zygote_max_uses` applies only with `warm.zygote = true`",
                        ))
                    }
                    Some(0) => {
                        return Err(invalid(
                            "`warm.zygote_max_uses` must be at least 1 (1 gives every job an interpreter from a fresh zygote)",
                        ))
                    }
                    _ => {}
                }
            }
            crate::job::check_rel_path("file", &r.file).map_err(|e| invalid(&e.to_string()))?;
            let names = std::iter::once(&r.name).chain(&r.aliases);
            for n in names {
                if self.runtimes[..i].iter().any(|o| o.answers_to(n)) {
                    return Err(invalid(&format!("name {n:?} is already taken")));
                }
            }
        }
        Ok(())
    }

    /// The runtime a job's `runtime` field names.
    pub fn resolve(&self, name: &str) -> Result<&Runtime, RuntimeError> {
        self.runtimes
            .iter()
            .find(|r| r.answers_to(name))
            .ok_or_else(|| RuntimeError::Unknown {
                name: name.to_owned(),
                available: self.names().join(", "),
            })
    }

    /// The runtime that runs files with this extension.
    pub fn by_extension(&self, ext: &str) -> Option<&Runtime> {
        self.runtimes
            .iter()
            .find(|r| r.extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)))
    }

    pub fn names(&self) -> Vec<&str> {
        self.runtimes.iter().map(|r| r.name.as_str()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Runtime> {
        self.runtimes.iter()
    }

    /// The same table with `runtime` in place of the runtime of its name:
    /// the table of one sandbox whose root keeps that interpreter
    /// elsewhere (an image's).
    pub fn with_replaced(&self, runtime: Runtime) -> Self {
        let runtimes = self
            .runtimes
            .iter()
            .map(|r| {
                if r.name == runtime.name {
                    runtime.clone()
                } else {
                    r.clone()
                }
            })
            .collect();
        Self { runtimes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_has_python_node_bash() {
        let t = RuntimeTable::default();
        assert_eq!(t.resolve("python3").unwrap().name, "python");
        assert_eq!(t.resolve("JS").unwrap().name, "node");
        assert_eq!(t.by_extension("sh").unwrap().name, "bash");
        assert!(t.resolve("python").unwrap().warm.is_some());
    }

    #[test]
    fn the_table_says_which_runtimes_have_code_contexts() {
        let t = RuntimeTable::default();
        assert_eq!(
            t.resolve("python").unwrap().contexts,
            Some(ContextDriver::Python)
        );
        assert_eq!(
            t.resolve("node").unwrap().contexts,
            Some(ContextDriver::Node)
        );
        assert_eq!(t.resolve("bash").unwrap().contexts, None);
        let mine = "[[runtime]]\nname='py312'\nfile='main.py'\ncommand=['/opt/py/bin/python3','{file}']\ncontexts='python'\n";
        let t = RuntimeTable::from_toml(mine).unwrap();
        assert_eq!(
            t.resolve("py312").unwrap().contexts,
            Some(ContextDriver::Python)
        );
        let e = RuntimeTable::from_toml(&mine.replace("'python'\n", "'ruby'\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ruby"), "{e}");
    }

    #[test]
    fn unknown_runtime_lists_the_available_ones() {
        let e = RuntimeTable::default()
            .resolve("cobol")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cobol") && e.contains("python"), "{e}");
    }

    #[test]
    fn a_new_runtime_is_just_configuration() {
        let t = RuntimeTable::from_toml(
            "[[runtime]]\nname='perl'\nfile='main.pl'\ncommand=['/usr/bin/perl','{file}']\n",
        )
        .unwrap();
        assert_eq!(
            t.resolve("perl")
                .unwrap()
                .cold_argv("/work/main.pl", &["a".into()]),
            ["/usr/bin/perl", "/work/main.pl", "a"]
        );
    }

    #[test]
    fn bad_tables_are_refused_with_the_reason() {
        let e =
            RuntimeTable::from_toml("[[runtime]]\nname='x'\nfile='m'\ncommand=['perl','{file}']\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = RuntimeTable::from_toml(
            "[[runtime]]\nname='x'\nfile='m'\ncommand=['/p','{file}']\n[[runtime]]\nname='y'\naliases=['X']\nfile='m'\ncommand=['/p','{file}']\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("taken"), "{e}");
    }

    #[test]
    fn zygote_max_uses_needs_a_zygote_and_at_least_one_job() {
        let table = |warm: &str| {
            RuntimeTable::from_toml(&format!(
                "[[runtime]]\nname='x'\nfile='m'\ncommand=['/p','{{file}}']\n[runtime.warm]\ncommand=['/p']\n{warm}"
            ))
        };
        let e = table("zygote = true\nzygote_max_uses = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zygote_max_uses") && e.contains("at least 1"),
            "{e}"
        );
        let e = table("zygote_max_uses = 4\n").unwrap_err().to_string();
        assert!(e.contains("zygote = true"), "{e}");
        let t = table("zygote = true\nzygote_max_uses = 4\n").unwrap();
        let warm = t.resolve("x").unwrap().warm.as_ref().unwrap();
        assert_eq!(warm.zygote_max_uses(), 4);
        let t = table("zygote = true\n").unwrap();
        let warm = t.resolve("x").unwrap().warm.as_ref().unwrap();
        assert_eq!(warm.zygote_max_uses(), DEFAULT_ZYGOTE_MAX_USES);
    }
}
