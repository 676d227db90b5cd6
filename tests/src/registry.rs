//! A real OCI distribution registry for tests: Debian's `docker-registry`
//! (the CNCF distribution registry) on a free loopback port, its storage
//! in the test's directory, optionally behind htpasswd (basic) auth or
//! behind bearer tokens from a token service the test runs ([`Tokens`]);
//! and `skopeo` to push images to it from an OCI layout.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;

/// A running registry, stopped on drop.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// Where it keeps blobs (`docker/registry/v2/blobs/sha256/..`).
    pub storage: PathBuf,
    /// `user:password` when it asks for them.
    pub creds: Option<String>,
    child: Child,
    /// The token service, when the registry wants bearer tokens.
    tokens: Option<Tokens>,
}

/// How a test registry authenticates.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    /// Anyone may push and pull.
    None,
    /// HTTP basic auth (htpasswd) for this user and password.
    Basic(&'a str, &'a str),
    /// Bearer tokens (the distribution token protocol) from a token
    /// service that hands them to this user and password only.
    Token(&'a str, &'a str),
}

/// A bcrypt htpasswd line for `user`/`password` (the registry accepts
/// only bcrypt), made with Python's crypt module.
fn htpasswd(user: &str, password: &str) -> String {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .output()
        .expect("running python3 for a bcrypt hash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{user}:{}", String::from_utf8_lossy(&out.stdout).trim())
}

impl Registry {
    /// Starts a registry in `dir`; with `auth`, behind basic auth for
    /// that user and password.
    pub fn start(dir: &Path, auth: Option<(&str, &str)>) -> Self {
        Self::start_with(dir, auth.map_or(Auth::None, |(u, p)| Auth::Basic(u, p)))
    }

    /// Starts a registry in `dir` that authenticates as `auth` says.
    pub fn start_with(dir: &Path, auth: Auth<'_>) -> Self {
        fs::create_dir_all(dir).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let storage = dir.join("storage");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n",
            storage.display()
        );
        let mut tokens = None;
        let creds = match auth {
            Auth::None => None,
            Auth::Basic(user, password) => {
                let path = dir.join("htpasswd");
                fs::write(&path, htpasswd(user, password) + "\n").unwrap();
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    path.display()
                ));
                Some(format!("{user}:{password}"))
            }
            Auth::Token(user, password) => {
                let t = Tokens::start(dir, user, password);
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    t.addr,
                    t.cert_pem.display()
                ));
                tokens = Some(t);
                Some(format!("{user}:{password}"))
            }
        };
        let config_path = dir.join("config.yml");
        fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // It logs every 404 a push's existence checks cause.
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry (Debian package docker-registry; scripts/test.sh installs it)");
        let registry = Self {
            host,
            storage,
            creds,
            child,
            tokens,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&registry.host).is_ok() {
                return registry;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not listen on {} within 10 s",
            registry.host
        );
    }

    /// Pushes the image `name` of the OCI layout `layout` as `repo:tag`.
    pub fn push(&self, layout: &Path, name: &str, repo_tag: &str) {
        let mut c = Command::new("skopeo");
        c.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some(creds) = &self.creds {
            c.arg("--dest-creds").arg(creds);
        }
        let out = c
            .arg(format!("oci:{}:{name}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host))
            .output()
            .expect("running skopeo (Debian package skopeo)");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The file holding blob `hex` in the registry's storage.
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Registry {
    /// Tokens the token service handed out, and requests it refused.
    pub fn token_counts(&self) -> (usize, usize) {
        let t = self.tokens.as_ref().expect("a token-auth registry");
        (
            t.issued.load(Ordering::SeqCst),
            t.refused.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `service` and `issuer` a token names, as the registry expects.
const TOKEN_SERVICE: &str = "kiln-test-registry";
const TOKEN_ISSUER: &str = "kiln-test-tokens";

/// A token service of the distribution token protocol, on loopback: `GET
/// /token?service=..&scope=repository:NAME:ACTIONS` with the right basic
/// credentials answers a JWT (ES256, signed with a key whose self-signed
/// certificate the registry trusts, carried in the `x5c` header) granting
/// the asked actions; without them, a 401. Made with `openssl` (key and
/// certificate) and ring (signatures). Stopped on drop.
struct Tokens {
    addr: std::net::SocketAddr,
    cert_pem: PathBuf,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tokens {
    fn start(dir: &Path, user: &str, password: &str) -> Self {
        let key_pem = dir.join("token-key.pem");
        let cert_pem = dir.join("token-cert.pem");
        let openssl = |args: &[&std::ffi::OsStr]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("running openssl (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let os = |s: &str| std::ffi::OsString::from(s);
        openssl(&[
            &os("req"),
            &os("-x509"),
            &os("-newkey"),
            &os("ec"),
            &os("-pkeyopt"),
            &os("ec_paramgen_curve:prime256v1"),
            &os("-nodes"),
            &os("-days"),
            &os("2"),
            &os("-subj"),
            &os("/CN=kiln-test-tokens"),
            &os("-keyout"),
            key_pem.as_os_str(),
            &os("-out"),
            cert_pem.as_os_str(),
        ]);
        let pkcs8 = openssl(&[
            &os("pkcs8"),
            &os("-topk8"),
            &os("-nocrypt"),
            &os("-outform"),
            &os("DER"),
            &os("-in"),
            key_pem.as_os_str(),
        ]);
        let cert_der = openssl(&[
            &os("x509"),
            &os("-outform"),
            &os("DER"),
            &os("-in"),
            cert_pem.as_os_str(),
        ]);
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &rng,
        )
        .expect("openssl's P-256 key as PKCS#8");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (issued, refused): (Arc<AtomicUsize>, Arc<AtomicUsize>) = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let signer = Signer {
            key,
            rng,
            x5c: STANDARD.encode(&cert_der),
            basic: format!("Basic {}", STANDARD.encode(format!("{user}:{password}"))),
            user: user.to_owned(),
            issued: Arc::clone(&issued),
            refused: Arc::clone(&refused),
        };
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    signer.answer(conn);
                }
            }
        });
        Self {
            addr,
            cert_pem,
            issued,
            refused,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Tokens {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the token service signs with, and whom it serves.
struct Signer {
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    /// The certificate, base64 DER, for the JWT header.
    x5c: String,
    /// The `Authorization` header the right credentials make.
    basic: String,
    user: String,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl Signer {
    /// Answers one HTTP/1.1 request and closes the connection.
    fn answer(&self, mut conn: std::net::TcpStream) {
        use std::io::{BufRead as _, BufReader, Write as _};
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            return;
        }
        let mut authorized = false;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.trim().is_empty() => break,
                Ok(_) => {
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("authorization") && value.trim() == self.basic
                        {
                            authorized = true;
                        }
                    }
                }
            }
        }
        let target = request.split(' ').nth(1).unwrap_or("");
        let (status, body) = if !target.starts_with("/token") {
            ("404 Not Found", "{}".to_owned())
        } else if !authorized {
            self.refused.fetch_add(1, Ordering::SeqCst);
            (
                "401 Unauthorized",
                r#"{"details":"bad credentials"}"#.to_owned(),
            )
        } else {
            self.issued.fetch_add(1, Ordering::SeqCst);
            let token = self.token(target);
            (
                "200 OK",
                format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#),
            )
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    /// A JWT granting what the request's `scope` parameters ask.
    fn token(&self, target: &str) -> String {
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let access: Vec<serde_json::Value> = query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("scope="))
            .map(percent_decode)
            .filter_map(|scope| {
                // repository:NAME:ACTIONS (NAME may hold a port's colon
                // only in other scope types; repository names do not).
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind,
                    "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER,
            "sub": self.user,
            "aud": TOKEN_SERVICE,
            "iat": now,
            "nbf": now - 10,
            "exp": now + 300,
            "jti": format!("{now}-{}", self.issued.load(Ordering::SeqCst)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .expect("signing a token");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// `%XX` escapes of a query parameter decoded (`+` as a space).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
