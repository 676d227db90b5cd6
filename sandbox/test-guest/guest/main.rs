//! Kiln's Firecracker test guest: a bare-metal x86-64 program, no Linux,
//! that Firecracker boots directly (an ELF "vmlinux" linked at 16 MiB, no
//! PVH note, so Firecracker enters it in 64-bit mode with its own GDT,
//! identity-mapped first GiB and a stack at 0x8ff0).
//!
//! It exists because this machine's nested `/dev/kvm` cannot boot a Linux
//! kernel but does run simple guest code: with it the Firecracker layer is
//! tested against a real VMM, real KVM, real snapshots and Kiln's real page
//! server. It speaks a line protocol on COM1 (Firecracker's stdin and
//! stdout):
//!
//! | command | answer |
//! | --- | --- |
//! | `echo TEXT` | `echo TEXT` |
//! | `write SEED PAGES` | `wrote PAGES SUM` after writing the pattern |
//! | `check SEED PAGES` | `check ok=N bad=M sum=SUM` after reading it back |
//! | `count` | `count TICKS`: timer ticks (100 Hz) so far |
//! | `mem` | `mem BYTES`: end of RAM from Firecracker's e820 map, last page touched |
//! | `cpus` | `cpus N`: processors in Firecracker's MP table |
//!
//! numbers in decimal, `SUM` in hex; anything else gets `error ...`. It
//! announces `kiln-test-guest ready` once set up. Between commands it halts
//! with interrupts on (the PIT's tick and the UART's receive interrupt wake
//! it), so an idle guest costs the host almost nothing.
//!
//! Under this machine's nested KVM (PVM) ring-0 guest code is not run
//! natively but emulated instruction by instruction by KVM's x86 emulator,
//! which knows no SSE arithmetic: the build (`build.rs`) turns SSE off, and
//! the work per command is kept small (a few thousand instructions a page).

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, Ordering};

#[path = "../src/pattern.rs"]
#[allow(dead_code)]
mod pattern;

/// COM1's I/O ports (the 16550 UART Firecracker emulates at 0x3f8, IRQ 4).
const COM1: u16 = 0x3f8;
const COM1_IER: u16 = COM1 + 1;
const COM1_LCR: u16 = COM1 + 3;
const COM1_MCR: u16 = COM1 + 4;
const COM1_LSR: u16 = COM1 + 5;
/// LSR bit 0: a received byte waits in RBR.
const LSR_DATA_READY: u8 = 0x01;
/// LSR bit 5: the transmit holding register is empty.
const LSR_THR_EMPTY: u8 = 0x20;

/// The two 8259 PICs, remapped so that IRQ n arrives as vector 32 + n.
const PIC1_CMD: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_CMD: u16 = 0xa0;
const PIC2_DATA: u16 = 0xa1;
const IRQ_BASE: u8 = 32;

/// The 8254 PIT: input clock 1.193182 MHz, divided down to 100 Hz.
const PIT_CH0: u16 = 0x40;
const PIT_CMD: u16 = 0x43;
const PIT_DIVISOR: u16 = 11932;

/// Where Firecracker puts the Linux zero page (`boot_params`) and, in it,
/// the e820 map (arch/x86/include/uapi/asm/bootparam.h offsets).
const ZERO_PAGE: u64 = 0x7000;
const E820_ENTRIES: u64 = ZERO_PAGE + 0x1e8;
const E820_TABLE: u64 = ZERO_PAGE + 0x2d0;
const E820_RAM: u32 = 1;

/// Firecracker writes its MP table in system memory, from 0x9fc00 below
/// 1 MiB (arch/x86_64/layout.rs `SYSTEM_MEM_START`).
const MP_SEARCH: (u64, u64) = (0x9fc00, 0x10_0000);

/// Timer ticks since boot, incremented by the IRQ 0 handler.
static TICKS: AtomicU64 = AtomicU64::new(0);

/// A cell the single running vCPU owns (Firecracker starts only the boot
/// processor; the others wait for an INIT/SIPI that never comes).
struct Global<T>(UnsafeCell<T>);

// SAFETY: only the boot vCPU runs guest code, and the interrupt handlers
// touch nothing but `TICKS` (an atomic) and the PIC.
unsafe impl<T> Sync for Global<T> {}

/// One 64-bit interrupt gate (Intel SDM vol. 3, 6.14.1).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const VECTORS: usize = 48;

#[repr(C, align(16))]
struct Idt([Gate; VECTORS]);

static IDT: Global<Idt> = Global(UnsafeCell::new(Idt(
    [Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    }; VECTORS],
)));

// Entry, stack and interrupt stubs. The exceptions (0..31) report their
// vector and stop; IRQ 0 counts a tick; every IRQ is acknowledged to the
// PIC(s) it came through.
global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    cli
    lea rsp, [rip + kiln_stack_top]
    // Let the compiler's SSE code run: CR0.EM off, CR0.MP on,
    // CR4.OSFXSR and CR4.OSXMMEXCPT on (Linux does this itself; we are
    // entered with the bare long-mode state Firecracker sets up).
    mov rax, cr0
    and rax, ~0x4
    or rax, 0x2
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600
    mov cr4, rax
    call {main}
1:  cli
    hlt
    jmp 1b

    .section .bss.kiln_stack, "aw", @nobits
    .balign 16
    .skip 65536
kiln_stack_top:

    .section .text
kiln_exception_common:
    mov rdi, [rsp]
    and rsp, -16
    call {fault}
2:  cli
    hlt
    jmp 2b

    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
kiln_exception_\v:
    push \v
    jmp kiln_exception_common
    .endr

kiln_irq_timer:
    push rax
    lock inc qword ptr [rip + {ticks}]
    mov al, 0x20
    out 0x20, al
    pop rax
    iretq

kiln_irq_master:
    push rax
    mov al, 0x20
    out 0x20, al
    pop rax
    iretq

kiln_irq_slave:
    push rax
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    pop rax
    iretq

    .section .rodata.kiln_vectors, "a"
    .balign 8
    .global kiln_vectors
kiln_vectors:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad kiln_exception_\v
    .endr
    .quad kiln_irq_timer
    .rept 7
    .quad kiln_irq_master
    .endr
    .rept 8
    .quad kiln_irq_slave
    .endr
"#,
    main = sym guest_main,
    fault = sym fault,
    ticks = sym TICKS,
);

extern "C" {
    /// The handler address of each vector, from the assembly above.
    static kiln_vectors: [u64; VECTORS];
}

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O on the devices this guest owns; no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: `addr` is guest RAM inside the identity-mapped first GiB
    // (callers check it against the e820 map or use fixed low addresses).
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn write_u64(addr: u64, value: u64) {
    // SAFETY: as in `read_u64`; the pattern region holds nothing else.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

fn read_u8(addr: u64) -> u8 {
    // SAFETY: as in `read_u64`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read_u16(addr: u64) -> u16 {
    // SAFETY: as in `read_u64`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: as in `read_u64`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn put(bytes: &[u8]) {
    for &b in bytes {
        while inb(COM1_LSR) & LSR_THR_EMPTY == 0 {}
        outb(COM1, b);
    }
}

fn put_dec(mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[i..]);
}

fn put_hex(n: u64) {
    let mut digits = [0u8; 16];
    for (i, d) in digits.iter_mut().enumerate() {
        let nibble = (n >> (60 - 4 * i)) & 0xf;
        *d = b"0123456789abcdef"[nibble as usize];
    }
    put(&digits);
}

/// Called by the exception stubs: says which vector, then the caller stops.
extern "C" fn fault(vector: u64) {
    put(b"fault vector ");
    put_dec(vector);
    put(b"\n");
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    put(b"panic\n");
    loop {
        // SAFETY: stops this vCPU for good; nothing is left to run.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Never called, only linked: the prebuilt `libcore` of the host target is
/// compiled with unwinding, and the parts of it we use still name the
/// personality routine (`DW.ref.rust_eh_personality`). With `panic=abort`
/// nothing unwinds; stable Rust has no other way to satisfy the reference
/// (the `eh_personality` lang item is unstable).
#[no_mangle]
extern "C" fn rust_eh_personality() {}

fn setup_interrupts() {
    let cs: u16;
    // SAFETY: reads the code segment selector Firecracker loaded.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    // SAFETY: nothing else uses the IDT yet (interrupts are off) and
    // `kiln_vectors` is immutable data from the assembly.
    let (idt, vectors) = unsafe { (&mut *IDT.0.get(), &*core::ptr::addr_of!(kiln_vectors)) };
    for (gate, &handler) in idt.0.iter_mut().zip(vectors.iter()) {
        *gate = Gate {
            offset_low: handler as u16,
            selector: cs,
            ist: 0,
            type_attr: 0x8e, // present, ring 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is a static that lives forever and every gate points
    // at a handler above.
    unsafe { asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack)) };

    // PICs: ICW1 (edge, cascade, ICW4 follows), ICW2 (vector bases), ICW3
    // (slave on IRQ 2), ICW4 (8086 mode), then masks: timer and COM1 only.
    outb(PIC1_CMD, 0x11);
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, IRQ_BASE);
    outb(PIC2_DATA, IRQ_BASE + 8);
    outb(PIC1_DATA, 0x04);
    outb(PIC2_DATA, 0x02);
    outb(PIC1_DATA, 0x01);
    outb(PIC2_DATA, 0x01);
    outb(PIC1_DATA, !((1 << 0) | (1 << 4)));
    outb(PIC2_DATA, 0xff);

    // PIT channel 0: lobyte/hibyte, mode 2 (rate generator).
    outb(PIT_CMD, 0x34);
    outb(PIT_CH0, PIT_DIVISOR as u8);
    outb(PIT_CH0, (PIT_DIVISOR >> 8) as u8);

    // COM1: 8N1, OUT2 (routes the interrupt), receive interrupt on.
    outb(COM1_LCR, 0x03);
    outb(COM1_MCR, 0x0b);
    outb(COM1_IER, 0x01);
}

/// Waits until a byte is there to read: with interrupts off, checks the
/// UART, and only if it is empty halts with `sti; hlt`, which is atomic (the
/// interrupt shadow of `sti` covers `hlt`), so a byte that arrives after the
/// check still wakes us. Returns with interrupts on.
fn wait_for_input() {
    loop {
        // SAFETY: masks interrupts for the check; the handlers are installed.
        unsafe { asm!("cli", options(nomem, nostack)) };
        if inb(COM1_LSR) & LSR_DATA_READY != 0 {
            // SAFETY: as above.
            unsafe { asm!("sti", options(nomem, nostack)) };
            return;
        }
        // SAFETY: as above; every handler preserves every register.
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
    }
}

/// The end of RAM according to the e820 map Firecracker wrote.
fn ram_end() -> u64 {
    let entries = u64::from(read_u8(E820_ENTRIES)).min(128);
    let mut end = 0;
    for i in 0..entries {
        let entry = E820_TABLE + i * 20;
        if read_u32(entry + 16) == E820_RAM {
            end = end.max(read_u64(entry) + read_u64(entry + 8));
        }
    }
    end
}

/// Processors listed in the MP configuration table (MP spec 1.4, 4.1 and
/// 4.2), walked by the table's length: Firecracker's entry count also
/// counts the floating pointer structure.
fn mp_processors() -> Option<u64> {
    let mut addr = MP_SEARCH.0 & !0xf;
    while addr < MP_SEARCH.1 {
        if read_u32(addr) == u32::from_le_bytes(*b"_MP_") {
            let table = u64::from(read_u32(addr + 4));
            if table == 0 || read_u32(table) != u32::from_le_bytes(*b"PCMP") {
                return None;
            }
            let end = table + u64::from(read_u16(table + 4));
            let mut entry = table + 44;
            let mut cpus = 0;
            while entry < end {
                entry += match read_u8(entry) {
                    0 => {
                        cpus += 1;
                        20
                    }
                    1..=4 => 8,
                    _ => return None,
                };
            }
            return Some(cpus);
        }
        addr += 16;
    }
    None
}

fn parse_u64(word: Option<&[u8]>) -> Option<u64> {
    let word = word?;
    if word.is_empty() || word.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for &b in word {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// `(seed, pages)` of a `write` or `check`, if both parse and the pages fit
/// in RAM.
fn pattern_args<'a>(mut words: impl Iterator<Item = &'a [u8]>) -> Result<(u64, u64), &'static [u8]> {
    let seed = parse_u64(words.next()).ok_or(&b"error: expected SEED PAGES"[..])?;
    let pages = parse_u64(words.next()).ok_or(&b"error: expected SEED PAGES"[..])?;
    if pages > pattern::MAX_PAGES {
        return Err(b"error: too many pages");
    }
    if pattern::REGION_START + pages * pattern::PAGE_SIZE > ram_end() {
        return Err(b"error: pages beyond the end of RAM");
    }
    Ok((seed, pages))
}

fn page_addr(page: u64) -> u64 {
    pattern::REGION_START + page * pattern::PAGE_SIZE
}

fn run(line: &[u8]) {
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    match words.next() {
        Some(b"echo") => {
            put(b"echo");
            if let Some(rest) = line.get(5..) {
                put(b" ");
                put(rest);
            }
        }
        Some(b"write") => match pattern_args(words) {
            Ok((seed, pages)) => {
                let mut sum = 0u64;
                for page in 0..pages {
                    for i in 0..pattern::WORDS_PER_PAGE {
                        let w = pattern::word(seed, page, i);
                        write_u64(page_addr(page) + i * pattern::WORD_STRIDE, w);
                        sum = sum.wrapping_add(w);
                    }
                }
                put(b"wrote ");
                put_dec(pages);
                put(b" ");
                put_hex(sum);
            }
            Err(e) => put(e),
        },
        Some(b"check") => match pattern_args(words) {
            Ok((seed, pages)) => {
                let (mut ok, mut bad, mut sum) = (0u64, 0u64, 0u64);
                for page in 0..pages {
                    let mut intact = true;
                    for i in 0..pattern::WORDS_PER_PAGE {
                        let w = read_u64(page_addr(page) + i * pattern::WORD_STRIDE);
                        sum = sum.wrapping_add(w);
                        intact &= w == pattern::word(seed, page, i);
                    }
                    if intact {
                        ok += 1;
                    } else {
                        bad += 1;
                    }
                }
                put(b"check ok=");
                put_dec(ok);
                put(b" bad=");
                put_dec(bad);
                put(b" sum=");
                put_hex(sum);
            }
            Err(e) => put(e),
        },
        Some(b"count") => {
            put(b"count ");
            put_dec(TICKS.load(Ordering::Relaxed));
        }
        Some(b"mem") => {
            let end = ram_end();
            if end >= pattern::PAGE_SIZE {
                // Touch the last page: the memory is there, not just listed.
                let last = end - 8;
                write_u64(last, read_u64(last) ^ 1);
                write_u64(last, read_u64(last) ^ 1);
            }
            put(b"mem ");
            put_dec(end);
        }
        Some(b"cpus") => match mp_processors() {
            Some(n) => {
                put(b"cpus ");
                put_dec(n);
            }
            None => put(b"error: no MP table"),
        },
        _ => put(b"error: unknown command"),
    }
    put(b"\n");
}

/// The guest's main loop: set up, announce, then serve commands forever,
/// with interrupts on so that the tick counter runs during commands too.
extern "C" fn guest_main() -> ! {
    setup_interrupts();
    put(b"kiln-test-guest ready\n");
    let mut line = [0u8; 128];
    let mut len = 0;
    loop {
        wait_for_input();
        while inb(COM1_LSR) & LSR_DATA_READY != 0 {
            match inb(COM1) {
                b'\n' | b'\r' => {
                    if len > 0 {
                        run(&line[..len]);
                    }
                    len = 0;
                }
                b if len < line.len() => {
                    line[len] = b;
                    len += 1;
                }
                // An overlong line is cut; its tail is dropped.
                _ => {}
            }
        }
    }
}
