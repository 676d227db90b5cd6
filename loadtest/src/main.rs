//! `kiln-loadtest`: the load generator for Kiln (open and closed loop, cold
//! vs warm, HDR percentiles, JSON report). Not built yet: it needs the HTTP
//! API of `kiln serve`. Until then it says so and exits with status 2 rather
//! than pretending to measure anything.

fn main() {
    eprintln!(
        "kiln-loadtest: not implemented yet; it needs `kiln serve` (see README, status table)"
    );
    std::process::exit(2);
}
