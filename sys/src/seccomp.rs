//! The seccomp program wire format. The host builds the seccomp filters a
//! job must install (the sandbox crate, with seccompiler), the protocol
//! carries them opaque (`Rooms::job_filters`, base64 in JSON), and the
//! agent installs them in every job process. This is the one place that
//! says what the bytes are: a classic BPF program, `struct sock_filter`
//! after `struct sock_filter` (linux/filter.h), each
//! [`INSTRUCTION_BYTES`] long in little-endian order: `code: u16`,
//! `jt: u8`, `jf: u8`, `k: u32`. The kernel takes at most
//! [`MAX_INSTRUCTIONS`] (`BPF_MAXINSNS`) per program.

/// Bytes of one `struct sock_filter`.
pub const INSTRUCTION_BYTES: usize = 8;

/// Most instructions the kernel accepts in one program (`BPF_MAXINSNS`,
/// include/uapi/linux/bpf_common.h).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// Why bytes are not a seccomp program.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Nothing: a program has at least one instruction.
    #[error("a seccomp program cannot be empty")]
    Empty,
    /// A length that is not a whole number of instructions.
    #[error("a seccomp program is a whole number of {INSTRUCTION_BYTES}-byte instructions, not {0} bytes")]
    Partial(usize),
    /// More instructions than the kernel accepts.
    #[error("a seccomp program has at most {MAX_INSTRUCTIONS} instructions, not {0}")]
    TooLong(usize),
}

/// Checks that `bytes` are a program's encoding, without decoding it.
pub fn check(bytes: &[u8]) -> Result<(), WireError> {
    match bytes.len() {
        0 => Err(WireError::Empty),
        n if n % INSTRUCTION_BYTES != 0 => Err(WireError::Partial(n)),
        n if n / INSTRUCTION_BYTES > MAX_INSTRUCTIONS => {
            Err(WireError::TooLong(n / INSTRUCTION_BYTES))
        }
        _ => Ok(()),
    }
}

/// Encodes a program.
pub fn encode(program: &[libc::sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * INSTRUCTION_BYTES);
    for i in program {
        out.extend_from_slice(&i.code.to_le_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_le_bytes());
    }
    out
}

/// Decodes a program.
pub fn decode(bytes: &[u8]) -> Result<Program, WireError> {
    check(bytes)?;
    Ok(Program(
        bytes
            .chunks_exact(INSTRUCTION_BYTES)
            .map(|i| libc::sock_filter {
                code: u16::from_le_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect(),
    ))
}

/// A decoded program, ready to install.
#[derive(Debug, Clone)]
pub struct Program(Vec<libc::sock_filter>);

impl Program {
    /// Its instructions.
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.0
    }

    /// The `struct sock_fprog` that `seccomp(2)` / `prctl(PR_SET_SECCOMP)`
    /// take. It points into this program: keep the program alive (and
    /// unmoved in its heap buffer, which a `Vec` guarantees) while it is
    /// used.
    pub fn fprog(&self) -> libc::sock_fprog {
        libc::sock_fprog {
            len: self.0.len() as u16,
            filter: self.0.as_ptr() as *mut libc::sock_filter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }

    #[test]
    fn the_encoding_is_little_endian_sock_filter() {
        // BPF_RET | BPF_K, SECCOMP_RET_ALLOW.
        let bytes = encode(&[insn(0x06, 1, 2, 0x7fff_0000)]);
        assert_eq!(bytes, [0x06, 0x00, 1, 2, 0x00, 0x00, 0xff, 0x7f]);
    }

    #[test]
    fn bytes_that_are_no_program_are_refused_by_reason() {
        assert_eq!(check(&[]), Err(WireError::Empty));
        assert_eq!(check(&[0; 12]), Err(WireError::Partial(12)));
        let too_long = vec![0u8; (MAX_INSTRUCTIONS + 1) * INSTRUCTION_BYTES];
        assert_eq!(
            check(&too_long),
            Err(WireError::TooLong(MAX_INSTRUCTIONS + 1))
        );
        assert!(decode(&[0; 16]).is_ok());
        assert!(WireError::Partial(12)
            .to_string()
            .contains("8-byte instructions"));
    }

    proptest! {
        /// Whatever the host encodes, the agent decodes to the same program,
        /// and re-encoding gives the same bytes.
        #[test]
        fn programs_round_trip(raw in proptest::collection::vec((any::<u16>(), any::<u8>(), any::<u8>(), any::<u32>()), 1..200)) {
            let program: Vec<libc::sock_filter> = raw.iter().map(|&(c, t, f, k)| insn(c, t, f, k)).collect();
            let bytes = encode(&program);
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(back.instructions().len(), program.len());
            for (a, b) in back.instructions().iter().zip(&program) {
                prop_assert_eq!((a.code, a.jt, a.jf, a.k), (b.code, b.jt, b.jf, b.k));
            }
            prop_assert_eq!(encode(back.instructions()), bytes);
            prop_assert_eq!(back.fprog().len as usize, program.len());
        }
    }
}
