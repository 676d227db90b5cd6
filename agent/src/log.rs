//! Terse logging to stderr (a host log file in a jail, the console in a
//! VM). The level comes from `KILN_AGENT_LOG` (error, warn, info, debug;
//! default warn). A full tracing stack would cost more memory than the agent
//! is allowed for something this simple.

use std::sync::atomic::{AtomicU8, Ordering};

pub const ERROR: u8 = 1;
pub const WARN: u8 = 2;
pub const INFO: u8 = 3;
pub const DEBUG: u8 = 4;

static LEVEL: AtomicU8 = AtomicU8::new(WARN);

/// Parses a level name; unknown names keep the default.
pub fn parse_level(s: &str) -> Option<u8> {
    match s.trim().to_ascii_lowercase().as_str() {
        "error" => Some(ERROR),
        "warn" | "warning" => Some(WARN),
        "info" => Some(INFO),
        "debug" | "trace" => Some(DEBUG),
        _ => None,
    }
}

/// Sets the level from `KILN_AGENT_LOG`.
pub fn init_from_env() {
    if let Some(l) = std::env::var("KILN_AGENT_LOG")
        .ok()
        .and_then(|v| parse_level(&v))
    {
        LEVEL.store(l, Ordering::Relaxed);
    }
}

pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

#[doc(hidden)]
pub fn emit(level: u8, args: std::fmt::Arguments<'_>) {
    let name = match level {
        ERROR => "ERROR",
        WARN => "WARN",
        INFO => "INFO",
        _ => "DEBUG",
    };
    eprintln!("kiln-agent[{}] {name} {args}", std::process::id());
}

#[macro_export]
macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::enabled($lvl) {
            $crate::log::emit($lvl, format_args!($($arg)*));
        }
    };
}
#[macro_export]
macro_rules! log_error { ($($arg:tt)*) => { $crate::log_at!($crate::log::ERROR, $($arg)*) }; }
#[macro_export]
macro_rules! log_warn { ($($arg:tt)*) => { $crate::log_at!($crate::log::WARN, $($arg)*) }; }
#[macro_export]
macro_rules! log_info { ($($arg:tt)*) => { $crate::log_at!($crate::log::INFO, $($arg)*) }; }
#[macro_export]
macro_rules! log_debug { ($($arg:tt)*) => { $crate::log_at!($crate::log::DEBUG, $($arg)*) }; }

#[cfg(test)]
mod tests {
    #[test]
    fn level_names_parse() {
        assert_eq!(super::parse_level("DEBUG"), Some(super::DEBUG));
        assert_eq!(super::parse_level("warn"), Some(super::WARN));
        assert_eq!(super::parse_level("loud"), None);
    }
}
