//! Times the build of an image's microVM root disk (`ImageStore::disk`):
//! the first build (any disk of the image and agent there is removed
//! first) and a second call that finds it cached; prints both and the
//! disk's size. For bench/images.sh:
//!
//! `cargo run --release -p kiln-images --example disk_build -- STORE REF AGENT`
//!
//! STORE: an image store holding REF; AGENT: a static kiln-agent.

use std::os::unix::fs::MetadataExt as _;
use std::time::Instant;

use kiln_images::{GuestAgent, ImageStore};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, reference, agent] = &args[..] else {
        anyhow::bail!("usage: disk_build STORE REF AGENT");
    };
    let store = ImageStore::open(store)?;
    let image = store.resolve(reference)?;
    let agent = GuestAgent::new(std::fs::read(agent)?);
    let _ = std::fs::remove_file(store.disk_path(&image, &agent));
    let t = Instant::now();
    let disk = store.disk(&image, &agent)?;
    let first = t.elapsed();
    let t = Instant::now();
    store.disk(&image, &agent)?;
    let cached = t.elapsed();
    let m = std::fs::metadata(&disk)?;
    println!(
        "{reference}: first build {:.0} ms, cached {:.3} ms; disk {} MiB ({} MiB allocated)",
        first.as_secs_f64() * 1000.0,
        cached.as_secs_f64() * 1000.0,
        m.len() >> 20,
        (m.blocks() * 512) >> 20
    );
    Ok(())
}
