//! What the fuzz targets share: reading the fuzzer's bytes as a few small
//! choices (a limit, where to split a stream) followed by the payload, and
//! the checks that several targets make of a parsed job.
//!
//! A target takes its choices from the front of the input with [`Input`]
//! and gives the rest to the parser, so that the fuzzer's mutations of the
//! payload and of the choices stay independent.

use kiln_protocol::{check_rel_path, JobSpec};

/// The fuzzer's bytes, consumed from the front. Past the end every choice
/// reads as zero, so short inputs are still valid.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub fn u8(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((b, rest)) => {
                self.bytes = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }

    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        head
    }

    /// Everything not consumed yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// Read sizes for a stream of `len` bytes, from `choices`: each choice is
/// the size of one read (0 counts as 1), the last read takes what is left.
/// This is how a socket may hand the host or the agent a stream.
pub fn read_sizes(choices: &[u8], len: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut left = len;
    for &c in choices {
        if left == 0 {
            break;
        }
        let n = usize::from(c).max(1).min(left);
        sizes.push(n);
        left -= n;
    }
    if left > 0 {
        sizes.push(left);
    }
    sizes
}

/// What must hold of every job that parsed, whatever its intake: it
/// re-serialises to JSON that parses back to the same job, that JSON is the
/// job's one canonical form (serialising again gives the same bytes), and
/// the files it puts in the work directory have distinct valid paths, the
/// entrypoint among them.
pub fn check_job(spec: &JobSpec) {
    let json = serde_json::to_vec(spec).expect("a parsed job serialises");
    let again = JobSpec::from_json(&json).unwrap_or_else(|e| {
        panic!(
            "a parsed job re-serialised to JSON that it refuses ({e}): {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(&again, spec, "the JSON round trip changed the job");
    assert_eq!(
        serde_json::to_vec(&again).expect("a parsed job serialises"),
        json,
        "a job has more than one canonical JSON form"
    );
    let (files, entry) = spec.materialize("main.x");
    assert!(
        files.iter().any(|f| f.path == entry),
        "entrypoint {entry:?} is none of the job's files"
    );
    for (i, f) in files.iter().enumerate() {
        check_rel_path("path", &f.path).expect("a materialised path is valid");
        assert!(
            files[..i].iter().all(|g| g.path != f.path),
            "two files at {:?}",
            f.path
        );
    }
}

/// Whether `field` is a field of a job as [`kiln_protocol::SpecError`]
/// names them: a key, a dotted path, or an indexed list entry.
pub fn is_job_field(field: &str) -> bool {
    const TOP: [&str; 10] = [
        "body",
        "job",
        "id",
        "runtime",
        "code",
        "files",
        "entrypoint",
        "args",
        "env",
        "stdin",
    ];
    const LIMITS: [&str; 6] = [
        "limits.timeout_ms",
        "limits.memory_mb",
        "limits.pids",
        "limits.output_bytes",
        "limits.disk_mb",
        "limits.cpus",
    ];
    if TOP.contains(&field) || LIMITS.contains(&field) || field.starts_with("env.") {
        return true;
    }
    let indexed = |list: &str, subfields: &[&str]| {
        let Some(rest) = field.strip_prefix(list).and_then(|r| r.strip_prefix('[')) else {
            return false;
        };
        let Some((index, tail)) = rest.split_once(']') else {
            return false;
        };
        !index.is_empty()
            && index.bytes().all(|b| b.is_ascii_digit())
            && (subfields.contains(&tail))
    };
    indexed("files", &[".path", ".content", ".encoding"]) || indexed("args", &[""])
}
