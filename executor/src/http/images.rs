//! `/v1/images`: what `kiln image ls|pull|import|rm|gc` do on the host,
//! for operators over the API. Pulls, imports and unpacking run off the
//! request's task, so a client that goes away does not cut them short,
//! and jobs go on meanwhile.

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

use super::{json_response, percent_decode, query, read_body, ApiError, App, Body};
use crate::error_chain;

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{what}: {e}"),
    )
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(what, e))?
}

/// The store, made if missing.
fn store(app: &App) -> Result<kiln_images::ImageStore, ApiError> {
    app.scheduler
        .images()
        .store()
        .map_err(|e| internal("opening the image store", e))
}

/// `GET /v1/images`: the images jobs and sandboxes can name.
pub async fn list(app: &App) -> Result<Response<Body>, ApiError> {
    let images = app.scheduler.images().clone();
    let listed = blocking("listing images", move || {
        images.list().map_err(|e| internal("listing images", e))
    })
    .await?;
    Ok(json_response(StatusCode::OK, &json!({"images": listed})))
}

/// `POST /v1/images` `{"reference", "insecure"?, "username"?, "password"?}`:
/// pulls an image into the store (and unpacks it) while jobs go on;
/// answers `201` with the image.
pub async fn pull(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PullBody {
        reference: String,
        #[serde(default)]
        insecure: bool,
        username: Option<String>,
        password: Option<String>,
    }
    let body = read_body(req, app.max_body_bytes).await?;
    let b: PullBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::field("body", format!("not a pull request: {e}")))?;
    kiln_protocol::check_image_ref("reference", &b.reference)
        .map_err(|e| ApiError::field("reference", e.message))?;
    let store = store(app)?;
    let opts = kiln_images::PullOptions {
        insecure: b.insecure,
        username: b.username,
        password: b.password,
    };
    let s = store.clone();
    let reference = b.reference.clone();
    let pulled = tokio::spawn(async move { kiln_images::pull(&s, &reference, &opts).await })
        .await
        .map_err(|e| internal("pulling", e))?;
    let image = match pulled {
        Ok(i) => i,
        Err(e @ kiln_images::PullError::InsecureNotLoopback(_)) => {
            return Err(ApiError::field("insecure", e))
        }
        Err(e @ kiln_images::PullError::BadReference { .. }) => {
            return Err(ApiError::field("reference", e))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "pull_failed",
                error_chain(&e),
            ))
        }
    };
    let i = image.clone();
    blocking("unpacking", move || {
        store
            .root(&i)
            .map_err(|e| internal(&format!("unpacking {}", i.name), e))
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, &image))
}

/// `POST /v1/images/import?name=NAME`, the body a `docker save` archive or
/// a tar of an OCI image layout, at most `[images] import_max_mb`: streamed
/// to a scratch file in the store, imported (every blob verified) and
/// unpacked; answers `201` with the images it held. A body that is not
/// such an archive is a `400` saying why.
pub async fn import(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let name = query(&req, "name")
        .map(percent_decode)
        .transpose()?
        .filter(|n| !n.is_empty());
    if let Some(n) = &name {
        kiln_protocol::check_image_ref("name", n)
            .map_err(|e| ApiError::field("name", e.message))?;
    }
    let max = app.scheduler.images().import_max_bytes();
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the archive is larger than images.import_max_mb ({max} bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_big());
    }
    let store = store(app)?;
    // The scratch file is removed whatever happens (its guard's drop).
    let scratch = scratch_in(&store)?;
    let mut file = tokio::fs::File::create(&scratch.0)
        .await
        .map_err(|e| internal("making the scratch file", e))?;
    let mut body = req.into_body();
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading the request body: {e}"),
            )
        })?;
        if let Some(data) = frame.data_ref() {
            written += data.len() as u64;
            if written > max {
                return Err(too_big());
            }
            file.write_all(data)
                .await
                .map_err(|e| internal("writing the scratch file", e))?;
        }
    }
    file.flush()
        .await
        .map_err(|e| internal("writing the scratch file", e))?;
    drop(file);
    let imported = blocking("importing", move || {
        let got = kiln_images::import(&store, &scratch.0, name.as_deref()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_archive",
                format!("not an importable image archive: {}", error_chain(&e)),
            )
        })?;
        for i in &got {
            store
                .root(i)
                .map_err(|e| internal(&format!("unpacking {}", i.name), e))?;
        }
        drop(scratch);
        Ok(got)
    })
    .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"images": imported}),
    ))
}

/// A scratch file's path, removed on drop.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh scratch path in the store (its directory made); `gc` removes
/// what a crash leaves there.
fn scratch_in(store: &kiln_images::ImageStore) -> Result<Scratch, ApiError> {
    let path = store.scratch_blob_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| internal("making the scratch directory", e))?;
    }
    Ok(Scratch(path))
}

/// `DELETE /v1/images/{reference}`: removes the name (or, by digest, every
/// name of that image) from the store's index; answers the images removed.
/// Blobs and unpacked roots stay until `POST /v1/images/gc`; sandboxes
/// rooted in the image keep running.
pub async fn remove(app: &App, reference: &str) -> Result<Response<Body>, ApiError> {
    let reference = percent_decode(reference)?;
    kiln_protocol::check_image_ref("reference", &reference)
        .map_err(|e| ApiError::field("reference", e.message))?;
    let store = store(app)?;
    let gone = blocking("removing", move || {
        store.remove(&reference).map_err(|e| match e {
            kiln_images::StoreError::Unknown(_) => ApiError::not_found(e.to_string()),
            e => internal("removing", e),
        })
    })
    .await?;
    Ok(json_response(StatusCode::OK, &json!({"removed": gone})))
}

/// `POST /v1/images/gc`: removes blobs, unpacked roots and microVM disks
/// no stored image references (roots that live sandboxes use stay);
/// answers what it removed.
pub async fn gc(app: &App) -> Result<Response<Body>, ApiError> {
    let store = store(app)?;
    let report = blocking("collecting garbage", move || {
        store.gc().map_err(|e| internal("collecting garbage", e))
    })
    .await?;
    Ok(json_response(StatusCode::OK, &report))
}
