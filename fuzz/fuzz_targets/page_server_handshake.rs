//! The page server's handshake: the JSON region table a VMM sends with the
//! userfaultfd, read the way `handshake::receive` reads it (parsing what
//! has arrived after every read, until it is complete or wrong), validated
//! against a memory file of a length the input chooses.
//!
//! Input: the memory file's length (8 bytes), a byte choosing the system
//! page size, a byte giving the number of read sizes, the read sizes, then
//! the message.
//!
//! Properties: a table that is valid as a whole is accepted whatever the
//! reads (no prefix of it is refused, and a prefix is accepted only as the
//! same table); parsing is `validate` of the JSON; an accepted table is
//! sorted, page aligned, inside the file, without overlap in the address
//! space or the file, and `find` agrees with a linear search.
#![no_main]

use kiln_fuzz::{read_sizes, Input};
use kiln_snapshotter::handshake::{
    GuestRegionUffdMapping, HandshakeError, Parse, RegionTable, MAX_REGIONS,
};
use libfuzzer_sys::fuzz_target;

fn check_table(t: &RegionTable, file_len: u64, system_page: u64) {
    let r = t.regions();
    assert!(!r.is_empty() && r.len() <= MAX_REGIONS);
    for x in r {
        assert!(x.page_size.is_power_of_two() && x.page_size >= system_page);
        assert!(x.size > 0);
        for v in [x.base, x.size, x.offset] {
            assert_eq!(v % x.page_size, 0, "{x:?} is not page aligned");
        }
        assert!(x.offset + x.size <= file_len, "{x:?} is past the file");
        assert_eq!(x.pages() * x.page_size, x.size);
    }
    for w in r.windows(2) {
        assert!(
            w[0].base + w[0].size <= w[1].base,
            "{w:?} unsorted or overlapping"
        );
    }
    let mut by_offset: Vec<_> = r.iter().collect();
    by_offset.sort_by_key(|x| x.offset);
    for w in by_offset.windows(2) {
        assert!(
            w[0].offset + w[0].size <= w[1].offset,
            "{w:?} overlap in the file"
        );
    }
    assert_eq!(t.total_size(), r.iter().map(|x| x.size).sum::<u64>());
    for x in r {
        for addr in [
            x.base,
            x.base.wrapping_sub(1),
            x.base + x.size - 1,
            x.base.wrapping_add(x.size),
        ] {
            let linear = r.iter().position(|y| y.contains(addr));
            assert_eq!(t.find(addr), linear, "find({addr:#x})");
        }
    }
}

fn outcome(p: Result<Parse, HandshakeError>) -> Result<Option<RegionTable>, String> {
    match p {
        Ok(Parse::Complete(t)) => Ok(Some(t)),
        Ok(Parse::NeedMore) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let file_len = input.u64();
    let system_page = 4096u64 << (input.u8() % 5);
    let n_reads = usize::from(input.u8() % 16);
    let choices = input.take(n_reads);
    let msg = input.rest();

    let whole = outcome(RegionTable::parse_partial(msg, file_len, system_page));
    match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(msg) {
        Ok(raw) => {
            let v = RegionTable::validate(&raw, file_len, system_page).map_err(|e| e.to_string());
            assert_eq!(
                whole,
                v.map(Some),
                "parse_partial is not validate of the JSON"
            );
        }
        Err(e) if e.is_eof() => assert_eq!(whole, Ok(None)),
        Err(e) => assert_eq!(whole, Err(HandshakeError::Json(e).to_string())),
    }
    if let Ok(Some(t)) = &whole {
        check_table(t, file_len, system_page);
    }

    // The receive loop: parse after every read until complete or wrong.
    let mut at = 0;
    for n in read_sizes(choices, msg.len()) {
        at += n;
        match outcome(RegionTable::parse_partial(
            &msg[..at],
            file_len,
            system_page,
        )) {
            Ok(None) => continue,
            early => {
                if let Ok(Some(t)) = &whole {
                    assert_eq!(
                        &early,
                        &Ok(Some(t.clone())),
                        "a valid table was read as another"
                    );
                }
                return;
            }
        }
    }
});
