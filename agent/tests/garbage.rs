//! Whatever the host sends, the agent does not panic: malformed bytes end
//! the connection cleanly (exit 0, not a panic's 101), and well-formed but
//! nonsensical requests get errors while the agent keeps serving.

mod common;

use std::io::Write;
use std::time::Duration;

use common::Host;
use kiln_protocol::{ExecRequest, Frame, GetFile, Kill, PutFile};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Raw bytes after a valid Hello: a frame with a plausible length and
    /// any kind and body, then arbitrary bytes.
    #[test]
    fn malformed_bytes_close_the_connection_cleanly(
        kind in 0u8..0x20,
        body in proptest::collection::vec(any::<u8>(), 0..200),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut h = Host::start();
        h.hello(&[]);
        let mut bytes = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        bytes.push(kind);
        bytes.extend(&body);
        bytes.extend(&tail);
        let _ = h.sock.write_all(&bytes);
        let _ = h.sock.shutdown(std::net::Shutdown::Write);
        // Drain whatever the agent answers until it closes.
        for _ in 0..1000 {
            if h.try_recv().is_err() {
                break;
            }
        }
        prop_assert_eq!(h.wait_exit(Duration::from_secs(10)), Some(0));
    }

    /// Well-formed requests with arbitrary contents never stop the agent.
    #[test]
    fn nonsense_requests_are_answered_and_serving_continues(
        path in "[a-z./]{0,12}",
        runtime in prop_oneof![Just("bash".to_string()), Just("cobol".to_string()), "[a-z]{0,6}"],
        tag in any::<u32>(),
        signal in any::<i32>(),
        mode in any::<u32>(),
        max in any::<u64>(),
    ) {
        let mut h = Host::start();
        h.hello(&[]);
        h.send(&Frame::PutFile(PutFile { tag, mode, path: if path.is_empty() { "x".into() } else { path.clone() }, data: b"echo hi".to_vec() }));
        h.send(&Frame::GetFile(GetFile { tag, path: path.clone(), max_bytes: max }));
        h.send(&Frame::Kill(Kill { tag, signal }));
        h.send(&Frame::Stdin { tag, data: vec![1, 2, 3] });
        h.send(&Frame::Exec(ExecRequest {
            tag,
            runtime,
            entrypoint: path,
            args: vec![],
            env: Default::default(),
            output_limit: max,
            warm_next: true,
        }));
        h.send(&Frame::Ping(tag as u64));
        let mut ponged = false;
        for _ in 0..100 {
            match h.recv() {
                Frame::Pong(n) if n == tag as u64 => { ponged = true; break; }
                _ => {}
            }
        }
        prop_assert!(ponged);
        prop_assert!(h.child.try_wait().unwrap().is_none());
    }
}
