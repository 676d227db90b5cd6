//! A client for Firecracker's HTTP API on its unix socket: typed requests
//! for what Kiln configures and controls (machine, boot source, drives,
//! vsock, entropy, logger, metrics, actions, pause and resume, snapshot
//! create and load, instance info), over one persistent HTTP/1.1 connection
//! (hyper's low-level client on a tokio `UnixStream`), each call bounded in
//! time. An error answer keeps Firecracker's HTTP status and its
//! `fault_message` word for word: that message is the only explanation
//! Firecracker gives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::models::{
    ActionType, BootSource, Drive, EntropyDevice, Fault, FirecrackerVersion, InstanceAction,
    InstanceInfo, Logger, MachineConfig, MetricsConfig, NetworkInterface, NetworkInterfaceUpdate,
    SnapshotCreateParams, SnapshotLoadParams, VmConfig, VmState, VmStateBody, Vsock,
};

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API socket does not accept connections (Firecracker is gone or
    /// not listening yet).
    #[error("cannot connect to Firecracker's API socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP connection could not be set up.
    #[error("HTTP handshake on Firecracker's API socket {socket} failed: {source}")]
    Handshake {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    /// The request or its answer was cut off (Firecracker died or closed
    /// the connection).
    #[error("{method} {path} to Firecracker failed in transport: {source}")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    /// No complete answer came in time.
    #[error("{method} {path}: Firecracker did not answer within {within:?}")]
    Timeout {
        method: Method,
        path: String,
        within: Duration,
    },
    /// Firecracker refused the request; `fault_message` is its own words.
    #[error("Firecracker refused {method} {path} ({status}): {fault_message}")]
    Refused {
        method: Method,
        path: String,
        status: StatusCode,
        fault_message: String,
    },
    /// The answer was not the JSON the swagger promises.
    #[error("Firecracker's answer to {method} {path} is not the expected JSON: {source}")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The request body could not be serialised (a path that is not UTF-8).
    #[error("the body of {method} {path} cannot be encoded as JSON: {source}")]
    Encode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ApiError {
    /// Firecracker's own explanation, when it refused the request.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            ApiError::Refused { fault_message, .. } => Some(fault_message),
            _ => None,
        }
    }

    /// The HTTP status Firecracker answered with, when it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The client of one Firecracker process's API.
#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl ApiClient {
    /// A client for the API socket at `socket` (a host path); each call
    /// waits at most `timeout` for its answer. Connects on first use.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Makes `slot` hold a connection ready for a request: the cached one
    /// unless it closed, else a new one. No request is ever retried: a
    /// closed connection is noticed before anything is sent on it.
    async fn ready<'a>(
        &self,
        slot: &'a mut Option<SendRequest<Full<Bytes>>>,
    ) -> Result<&'a mut SendRequest<Full<Bytes>>, ApiError> {
        let usable = match slot.as_mut() {
            Some(s) => !s.is_closed() && s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ApiError::Handshake {
                    socket: self.socket.clone(),
                    source,
                })?;
            // The connection task ends when Firecracker closes the socket or
            // the sender is dropped.
            tokio::spawn(async move {
                let _ = connection.await;
            });
            *slot = Some(sender);
        }
        Ok(slot.as_mut().expect("set just above"))
    }

    /// One request; `Ok` carries the status and body of a 2xx answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        // One request at a time on the one connection (Firecracker serves
        // its API requests one by one anyway).
        let exchange = async {
            let mut slot = self.conn.lock().await;
            let sender = self.ready(&mut slot).await?;
            let mut request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, "localhost")
                .header(hyper::header::ACCEPT, "application/json");
            if body.is_some() {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let request = request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .expect("a request built from a method, a path and constant headers is valid");
            let transport = |source| ApiError::Transport {
                method: method.clone(),
                path: path.to_owned(),
                source,
            };
            let response = sender.send_request(request).await.map_err(transport)?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(transport)?
                .to_bytes();
            Ok::<_, ApiError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                method: method.clone(),
                path: path.to_owned(),
                within: self.timeout,
            })??;
        if status.is_success() {
            return Ok((status, bytes));
        }
        let fault_message = match serde_json::from_slice::<Fault>(&bytes) {
            Ok(f) => f.fault_message,
            // Not Firecracker's error shape: keep whatever it said.
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        Err(ApiError::Refused {
            method,
            path: path.to_owned(),
            status,
            fault_message,
        })
    }

    async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|source| ApiError::Encode {
            method: method.clone(),
            path: path.to_owned(),
            source,
        })?;
        self.call(method, path, Some(json)).await.map(|_| ())
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ApiError> {
        let (_, bytes) = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode {
            method: Method::GET,
            path: path.to_owned(),
            source,
        })
    }

    /// `PUT /machine-config` (before boot).
    pub async fn put_machine_config(&self, config: &MachineConfig) -> Result<(), ApiError> {
        self.send(Method::PUT, "/machine-config", config).await
    }

    /// `GET /machine-config`.
    pub async fn machine_config(&self) -> Result<MachineConfig, ApiError> {
        self.get("/machine-config").await
    }

    /// `PUT /boot-source` (before boot).
    pub async fn put_boot_source(&self, source: &BootSource) -> Result<(), ApiError> {
        self.send(Method::PUT, "/boot-source", source).await
    }

    /// `PUT /drives/{drive_id}` (before boot).
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), ApiError> {
        let path = format!("/drives/{}", drive.drive_id);
        self.send(Method::PUT, &path, drive).await
    }

    /// `PUT /network-interfaces/{iface_id}` (before boot).
    pub async fn put_network_interface(&self, nic: &NetworkInterface) -> Result<(), ApiError> {
        let path = format!("/network-interfaces/{}", nic.iface_id);
        self.send(Method::PUT, &path, nic).await
    }

    /// `PATCH /network-interfaces/{iface_id}` (a running VM's limiters).
    pub async fn patch_network_interface(
        &self,
        update: &NetworkInterfaceUpdate,
    ) -> Result<(), ApiError> {
        let path = format!("/network-interfaces/{}", update.iface_id);
        self.send(Method::PATCH, &path, update).await
    }

    /// `PUT /vsock` (before boot).
    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), ApiError> {
        self.send(Method::PUT, "/vsock", vsock).await
    }

    /// `PUT /entropy` (before boot).
    pub async fn put_entropy(&self, device: &EntropyDevice) -> Result<(), ApiError> {
        self.send(Method::PUT, "/entropy", device).await
    }

    /// `PUT /logger`.
    pub async fn put_logger(&self, logger: &Logger) -> Result<(), ApiError> {
        self.send(Method::PUT, "/logger", logger).await
    }

    /// `PUT /metrics` (once per process).
    pub async fn put_metrics(&self, metrics: &MetricsConfig) -> Result<(), ApiError> {
        self.send(Method::PUT, "/metrics", metrics).await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.send(Method::PUT, "/actions", &InstanceAction { action_type })
            .await
    }

    /// `PATCH /vm`: pause or resume the vCPUs.
    pub async fn set_state(&self, state: VmState) -> Result<(), ApiError> {
        self.send(Method::PATCH, "/vm", &VmStateBody { state })
            .await
    }

    /// `PUT /snapshot/create` (the VM must be paused).
    pub async fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.send(Method::PUT, "/snapshot/create", params).await
    }

    /// `PUT /snapshot/load` (on a fresh process).
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.send(Method::PUT, "/snapshot/load", params).await
    }

    /// `GET /`: id, state and version.
    pub async fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion, ApiError> {
        self.get("/version").await
    }

    /// `GET /vm/config`: the configuration as Firecracker holds it.
    pub async fn vm_config(&self) -> Result<VmConfig, ApiError> {
        self.get("/vm/config").await
    }
}
