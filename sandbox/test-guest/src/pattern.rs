//! The memory pattern the test guest writes and checks, shared word for word
//! by the guest (compiled into it with `#[path]`) and the host tests, so that
//! the host knows the checksum a guest must report without reading its
//! memory. Pure arithmetic on `u64`: it must build without `std`.

/// Guest-physical address of the first pattern page: 32 MiB, above the
/// guest's own image (linked at 16 MiB) and its stack, inside the 1 GiB that
/// Firecracker's boot page tables map.
pub const REGION_START: u64 = 32 << 20;

/// The guest's page size (4 KiB pages; Firecracker maps with 2 MiB pages,
/// but the host serves and counts faults per 4 KiB page).
pub const PAGE_SIZE: u64 = 4096;

/// Most pages one command may touch: 4 MiB. Each first touch of a page costs
/// about a millisecond under this machine's nested KVM.
pub const MAX_PAGES: u64 = 1024;

/// Pattern words per page: one every 512 bytes. The guest's code is
/// emulated instruction by instruction on this machine (see the crate's
/// README), so filling every word of a page would cost ~15 ms a page; eight
/// words spread over it still tell a page served from the wrong offset, a
/// zero page or a stale page from the right one.
pub const WORDS_PER_PAGE: u64 = 8;

/// Bytes between two pattern words of a page.
pub const WORD_STRIDE: u64 = PAGE_SIZE / WORDS_PER_PAGE;

/// The word at `index` of pattern page `page` for `seed` (splitmix64 of the
/// three, so that neighbouring pages, words and seeds all differ).
pub fn word(seed: u64, page: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(page.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(index.wrapping_mul(0xd6e8_feb8_6659_fd93));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The checksum of `pages` pattern pages for `seed`: the wrapping sum of
/// every word, as the guest reports it after `write` and `check`.
pub fn checksum(seed: u64, pages: u64) -> u64 {
    let mut sum = 0u64;
    let mut page = 0;
    while page < pages {
        let mut i = 0;
        while i < WORDS_PER_PAGE {
            sum = sum.wrapping_add(word(seed, page, i));
            i += 1;
        }
        page += 1;
    }
    sum
}
