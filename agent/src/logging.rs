//! Log output: plain text by default, one JSON object per line with `log.type: json`.
//! `RUST_LOG` overrides the configured level.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Maps Patroni's level names to a tracing filter; anything else is taken as a directive.
pub fn filter_for(level: &str) -> String {
    match level.to_ascii_uppercase().as_str() {
        "DEBUG" => "debug".into(),
        "INFO" => "info".into(),
        "WARNING" | "WARN" => "warn".into(),
        "ERROR" | "CRITICAL" | "FATAL" => "error".into(),
        _ => level.to_owned(),
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls are ignored).
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter_for(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patroni_levels_map_to_tracing() {
        assert_eq!(filter_for("WARNING"), "warn");
        assert_eq!(filter_for("critical"), "error");
        assert_eq!(filter_for("pgwarden=debug"), "pgwarden=debug");
    }
}
