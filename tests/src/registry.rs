//! A real OCI distribution registry for tests: Debian's `docker-registry`
//! (the CNCF distribution registry) on a free loopback port, its storage
//! in the test's directory, optionally behind htpasswd (basic) auth; and
//! `skopeo` to push images to it from an OCI layout.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running registry, stopped on drop.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// Where it keeps blobs (`docker/registry/v2/blobs/sha256/..`).
    pub storage: PathBuf,
    /// `user:password` when it asks for them.
    pub creds: Option<String>,
    child: Child,
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
        if let Some((user, password)) = auth {
            let path = dir.join("htpasswd");
            fs::write(&path, htpasswd(user, password) + "\n").unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                path.display()
            ));
        }
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
            creds: auth.map(|(u, p)| format!("{u}:{p}")),
            child,
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

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
