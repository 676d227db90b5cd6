//! The command line: `kiln-agent --fd N | --vsock-port P | --guest-init |
//! --version`.

/// What the agent was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Serve one connection on an inherited, connected socket.
    Fd(i32),
    /// Listen on AF_VSOCK (any CID) and serve connections one after another.
    Vsock(u32),
    /// PID 1 of a microVM guest: set the guest up, then listen on vsock
    /// (port and the rest from the kernel command line, `kiln.*`).
    GuestInit,
    Version,
    Help,
}

pub const USAGE: &str = "usage: kiln-agent --fd N | --vsock-port PORT | --guest-init | --version

  --fd N             serve the host protocol on inherited connected socket fd N
                     until it closes, then kill every job and exit 0
  --vsock-port PORT  listen on AF_VSOCK (any CID) port PORT and serve host
                     connections one after another (inside a microVM)
  --guest-init       as PID 1 of a microVM guest: mount /proc, /sys, /dev, a
                     tmpfs overlay on the read-only root, then listen on
                     vsock (kiln.port=, kiln.ready=, kiln.log=, kiln.dns= on
                     the kernel command line), or serve the virtio-serial
                     port kiln.vport= names, and run jobs only after each
                     connection's guest setup (entropy, clock, hostname, id,
                     disk size, task cap); the default as PID 1 with no
                     argument
  --version          print the agent's version
environment: KILN_AGENT_LOG=error|warn|info|debug (default warn)";

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Mode, String> {
    let mut args = args.into_iter();
    let first = args.next().ok_or("missing --fd or --vsock-port")?;
    let (flag, inline) = match first.split_once('=') {
        Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
        None => (first, None),
    };
    let mode = match flag.as_str() {
        "--version" | "-V" if inline.is_none() => Mode::Version,
        "--help" | "-h" if inline.is_none() => Mode::Help,
        "--guest-init" if inline.is_none() => Mode::GuestInit,
        "--fd" | "--vsock-port" => {
            let value = inline
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))?;
            if flag == "--fd" {
                let fd: i32 = value
                    .parse()
                    .map_err(|_| format!("--fd {value:?} is not a file descriptor number"))?;
                if fd < 0 {
                    return Err(format!("--fd {fd} must not be negative"));
                }
                Mode::Fd(fd)
            } else {
                let port: u32 = value
                    .parse()
                    .map_err(|_| format!("--vsock-port {value:?} is not a port number"))?;
                if port == u32::MAX {
                    return Err("--vsock-port must not be VMADDR_PORT_ANY".into());
                }
                Mode::Vsock(port)
            }
        }
        other => return Err(format!("unknown argument {other:?}")),
    };
    if let Some(extra) = args.next() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Mode, String> {
        parse(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn accepts_the_three_modes() {
        assert_eq!(p(&["--fd", "3"]), Ok(Mode::Fd(3)));
        assert_eq!(p(&["--fd=7"]), Ok(Mode::Fd(7)));
        assert_eq!(p(&["--vsock-port", "52"]), Ok(Mode::Vsock(52)));
        assert_eq!(p(&["--version"]), Ok(Mode::Version));
        assert_eq!(p(&["--guest-init"]), Ok(Mode::GuestInit));
    }

    #[test]
    fn refuses_bad_input_with_the_reason() {
        assert!(p(&[]).unwrap_err().contains("--fd"));
        assert!(p(&["--fd"]).unwrap_err().contains("needs a value"));
        assert!(p(&["--fd", "x"]).unwrap_err().contains("\"x\""));
        assert!(p(&["--fd", "-1"]).is_err());
        assert!(p(&["--vsock-port", "4294967295"]).is_err());
        assert!(p(&["--fd", "3", "more"]).unwrap_err().contains("more"));
        assert!(p(&["--bogus"]).unwrap_err().contains("--bogus"));
    }
}
