//! Feeds arbitrary bytes, split at arbitrary points, to the frame decoder:
//! it must never panic, and a frame it accepts must re-encode to a frame it
//! accepts again.
#![no_main]

use kiln_protocol::{Decoder, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len().max(1));
    let mut d = Decoder::new(1 << 16);
    for part in [&data[..split], &data[split..]] {
        d.extend(part);
        while let Ok(Some(f)) = d.next_frame() {
            let again = Frame::decode_body(&f.encode()[4..]).expect("re-encoded frame decodes");
            assert_eq!(again, f);
        }
    }
});
