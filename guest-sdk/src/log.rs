//! Logging through the host: the only output channel a policy has.
//!
//! The host grants no stdout, stderr or files, so every line a policy wants
//! an operator to see goes through the imported `host.log`, which tags it with
//! the policy. Outside WebAssembly (native unit tests) there is no host, and
//! lines go to stderr instead.

pub use crate::bindings::cellhost::policy::host::Level;

/// Writes `message` to the host log at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::cellhost::policy::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let name = match level {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        };
        eprintln!("{name} {message}");
    }
}

/// Logs at trace level.
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Logs at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Logs at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}

#[cfg(test)]
mod tests {
    #[test]
    fn logging_natively_does_not_need_a_host() {
        super::trace("t");
        super::debug("d");
        super::info("i");
        super::warn("w");
        super::error("e");
    }
}
