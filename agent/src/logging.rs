//! Log output: plain text by default, one JSON object per line with `log.type: json`.
//! `RUST_LOG` overrides the configured level.
//!
//! With `log.format` or `log.dateformat` and plain output, each line is laid out as Patroni's
//! Python `logging.Formatter` would (`%(asctime)s %(levelname)s: %(message)s` unless
//! `log.format` says otherwise), so that tools parsing Patroni's log lines read ours.
//! Events logged with the target [`CRITICAL_TARGET`] carry Python's `CRITICAL` level name.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self as tracing_format, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::{FieldError, LogConfig, LogFormat};

/// Target of events at Python's `CRITICAL` level (tracing has no such level: they are `ERROR`
/// events that print `CRITICAL`), e.g.
/// `tracing::error!(target: CRITICAL_TARGET, "Can't start; ...")`.
pub const CRITICAL_TARGET: &str = "pgwarden::critical";

/// Patroni's default `log.format`.
pub const DEFAULT_FORMAT: &str = "%(asctime)s %(levelname)s: %(message)s";

/// Maps Patroni's level names to a tracing filter; anything else is taken as a directive.
pub fn filter_for(level: &str) -> String {
    match level.to_ascii_uppercase().as_str() {
        "DEBUG" => "debug".into(),
        "INFO" => "info".into(),
        "WARNING" | "WARN" => "warn".into(),
        "ERROR" => "error".into(),
        // Only the events that print CRITICAL, as Python's level filters out ERROR.
        "CRITICAL" | "FATAL" => format!("off,{CRITICAL_TARGET}=error"),
        _ => level.to_owned(),
    }
}

/// A `log.format` or `log.dateformat` that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogFormatError {
    #[error("unknown attribute %({0})s: use asctime, created, filename, funcName, levelname, levelno, lineno, message, module, msecs, name, pathname, process, processName, relativeCreated, thread or threadName")]
    UnknownAttribute(String),
    #[error("%({attr}){conversion}: {attr} is text, use the s or r conversion")]
    TextAsNumber { attr: String, conversion: char },
    #[error("bad placeholder at byte {0}: expected %(name)s, %(name)d, %(name)-10s, ... or %%")]
    Placeholder(usize),
    #[error("{0:?} is not a valid strftime format")]
    DateFormat(String),
}

/// One attribute of Python's `LogRecord`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr {
    Asctime,
    Created,
    Filename,
    FuncName,
    Levelname,
    Levelno,
    Lineno,
    Message,
    Module,
    Msecs,
    Name,
    Pathname,
    Process,
    ProcessName,
    RelativeCreated,
    Thread,
    ThreadName,
}

impl Attr {
    fn parse(name: &str) -> Option<Attr> {
        Some(match name {
            "asctime" => Attr::Asctime,
            "created" => Attr::Created,
            "filename" => Attr::Filename,
            "funcName" => Attr::FuncName,
            "levelname" => Attr::Levelname,
            "levelno" => Attr::Levelno,
            "lineno" => Attr::Lineno,
            "message" => Attr::Message,
            "module" => Attr::Module,
            "msecs" => Attr::Msecs,
            "name" => Attr::Name,
            "pathname" => Attr::Pathname,
            "process" => Attr::Process,
            "processName" => Attr::ProcessName,
            "relativeCreated" => Attr::RelativeCreated,
            "thread" => Attr::Thread,
            "threadName" => Attr::ThreadName,
            _ => return None,
        })
    }

    fn is_number(self) -> bool {
        matches!(
            self,
            Attr::Created
                | Attr::Levelno
                | Attr::Lineno
                | Attr::Msecs
                | Attr::Process
                | Attr::RelativeCreated
                | Attr::Thread
        )
    }
}

/// `%(attr)[-0][width][.precision]conversion`, as Python's `%` operator reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    left: bool,
    zero: bool,
    width: usize,
    precision: Option<usize>,
    conversion: char,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Attr, Spec),
}

/// A parsed Python logging format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyFormat {
    pieces: Vec<Piece>,
    uses_asctime: bool,
}

impl PyFormat {
    pub fn parse(format: &str) -> Result<PyFormat, LogFormatError> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let bytes = format.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let Some(offset) = format[i..].find('%') else {
                text.push_str(&format[i..]);
                break;
            };
            text.push_str(&format[i..i + offset]);
            let start = i + offset;
            let rest = &format[start + 1..];
            if let Some(after) = rest.strip_prefix('%') {
                text.push('%');
                i = format.len() - after.len();
                continue;
            }
            let Some(inner) = rest.strip_prefix('(') else {
                return Err(LogFormatError::Placeholder(start));
            };
            let close = inner.find(')').ok_or(LogFormatError::Placeholder(start))?;
            let name = &inner[..close];
            let attr =
                Attr::parse(name).ok_or_else(|| LogFormatError::UnknownAttribute(name.into()))?;
            let mut chars = inner[close + 1..].char_indices().peekable();
            let (mut left, mut zero) = (false, false);
            while let Some((_, c)) = chars.peek().copied() {
                match c {
                    '-' => left = true,
                    '0' => zero = true,
                    ' ' | '+' | '#' => {}
                    _ => break,
                }
                chars.next();
            }
            let mut width = 0usize;
            while let Some((_, c)) = chars.peek().copied().filter(|(_, c)| c.is_ascii_digit()) {
                width = width
                    .saturating_mul(10)
                    .saturating_add(c as usize - '0' as usize);
                chars.next();
            }
            let mut precision = None;
            if chars.peek().is_some_and(|(_, c)| *c == '.') {
                chars.next();
                let mut p = 0usize;
                while let Some((_, c)) = chars.peek().copied().filter(|(_, c)| c.is_ascii_digit()) {
                    p = p
                        .saturating_mul(10)
                        .saturating_add(c as usize - '0' as usize);
                    chars.next();
                }
                precision = Some(p);
            }
            let Some((at, conversion)) = chars.next() else {
                return Err(LogFormatError::Placeholder(start));
            };
            match conversion {
                's' | 'r' | 'a' => {}
                'd' | 'i' | 'u' | 'f' | 'F' | 'e' | 'E' | 'g' | 'G' | 'x' | 'X' | 'o' => {
                    if !attr.is_number() {
                        return Err(LogFormatError::TextAsNumber {
                            attr: name.into(),
                            conversion,
                        });
                    }
                }
                _ => return Err(LogFormatError::Placeholder(start)),
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Field(
                attr,
                Spec {
                    left,
                    zero,
                    width,
                    precision,
                    conversion,
                },
            ));
            i = start + 1 + 1 + close + 1 + at + conversion.len_utf8();
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        let uses_asctime = pieces
            .iter()
            .any(|p| matches!(p, Piece::Field(Attr::Asctime, _)));
        Ok(PyFormat {
            pieces,
            uses_asctime,
        })
    }
}

/// Checks a `strftime` pattern the way chrono will read it (chrono panics on bad patterns at
/// format time, so they must be refused up front).
fn check_dateformat(pattern: &str) -> Result<(), LogFormatError> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(pattern).any(|i| matches!(i, Item::Error)) {
        return Err(LogFormatError::DateFormat(pattern.to_owned()));
    }
    Ok(())
}

/// What one log line is made of.
#[derive(Debug, Clone)]
pub struct LogRecord<'a> {
    pub time: chrono::DateTime<chrono::Local>,
    /// Seconds since the formatter was created (Python: since the logging module loaded).
    pub relative: f64,
    pub level: Level,
    pub target: &'a str,
    pub file: Option<&'a str>,
    pub line: Option<u32>,
    pub module_path: Option<&'a str>,
    /// The message followed by the event's fields as ` key=value`.
    pub message: &'a str,
    pub thread_name: &'a str,
    pub thread_id: i64,
    pub pid: u32,
}

impl LogRecord<'_> {
    fn level_name(&self) -> &'static str {
        if self.target == CRITICAL_TARGET {
            return "CRITICAL";
        }
        match self.level {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            // Python has no TRACE; parsers of Patroni's lines know DEBUG.
            Level::DEBUG | Level::TRACE => "DEBUG",
        }
    }

    fn level_no(&self) -> i64 {
        match self.level_name() {
            "CRITICAL" => 50,
            "ERROR" => 40,
            "WARNING" => 30,
            "INFO" => 20,
            _ => 10,
        }
    }
}

enum Value<'a> {
    Text(std::borrow::Cow<'a, str>),
    Int(i64),
    Float(f64),
}

/// Patroni's layout: a Python format string and an optional `strftime` date format.
#[derive(Debug, Clone)]
pub struct PatroniLayout {
    format: PyFormat,
    dateformat: Option<String>,
    started: std::time::Instant,
}

impl PatroniLayout {
    pub fn new(format: Option<&str>, dateformat: Option<&str>) -> Result<Self, LogFormatError> {
        let format = PyFormat::parse(format.unwrap_or(DEFAULT_FORMAT))?;
        let dateformat = dateformat.filter(|d| !d.is_empty()).map(str::to_owned);
        if let Some(d) = &dateformat {
            check_dateformat(d)?;
        }
        Ok(PatroniLayout {
            format,
            dateformat,
            started: std::time::Instant::now(),
        })
    }

    fn asctime(&self, time: &chrono::DateTime<chrono::Local>) -> String {
        match &self.dateformat {
            Some(pattern) => time.format(pattern).to_string(),
            // Python's default: `%Y-%m-%d %H:%M:%S,mmm`.
            None => format!(
                "{},{:03}",
                time.format("%Y-%m-%d %H:%M:%S"),
                time.timestamp_subsec_millis()
            ),
        }
    }

    /// One line, without the newline.
    pub fn render(&self, r: &LogRecord<'_>) -> String {
        let mut out = String::new();
        let asctime = self.format.uses_asctime.then(|| self.asctime(&r.time));
        for piece in &self.format.pieces {
            let (attr, spec) = match piece {
                Piece::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Piece::Field(attr, spec) => (*attr, spec),
            };
            let file = r.file.unwrap_or("");
            let basename = file.rsplit('/').next().unwrap_or(file);
            let value = match attr {
                Attr::Asctime => Value::Text(asctime.clone().unwrap_or_default().into()),
                Attr::Created => Value::Float(r.time.timestamp_micros() as f64 / 1e6),
                Attr::Filename => Value::Text(basename.into()),
                // Rust's log metadata has no function names: the module path is the nearest.
                Attr::FuncName => Value::Text(r.module_path.unwrap_or(r.target).into()),
                Attr::Levelname => Value::Text(r.level_name().into()),
                Attr::Levelno => Value::Int(r.level_no()),
                Attr::Lineno => Value::Int(r.line.map_or(0, i64::from)),
                Attr::Message => Value::Text(r.message.into()),
                Attr::Module => Value::Text(basename.trim_end_matches(".rs").into()),
                Attr::Msecs => Value::Float(f64::from(r.time.timestamp_subsec_micros()) / 1e3),
                Attr::Name => Value::Text(r.target.into()),
                Attr::Pathname => Value::Text(file.into()),
                Attr::Process => Value::Int(i64::from(r.pid)),
                Attr::ProcessName => Value::Text("MainProcess".into()),
                Attr::RelativeCreated => Value::Float(r.relative * 1e3),
                Attr::Thread => Value::Int(r.thread_id),
                Attr::ThreadName => Value::Text(r.thread_name.into()),
            };
            push_value(&mut out, &value, spec);
        }
        out
    }
}

/// Python's `%` conversion of one value.
fn push_value(out: &mut String, value: &Value<'_>, spec: &Spec) {
    let numeric = !matches!(spec.conversion, 's' | 'r' | 'a');
    let body = match (value, spec.conversion) {
        (Value::Text(t), 'r' | 'a') => format!("'{t}'"),
        (Value::Text(t), _) => t.to_string(),
        (Value::Int(n), 'f' | 'F' | 'e' | 'E' | 'g' | 'G') => {
            format!("{:.*}", spec.precision.unwrap_or(6), *n as f64)
        }
        (Value::Int(n), 'x') => format!("{n:x}"),
        (Value::Int(n), 'X') => format!("{n:X}"),
        (Value::Int(n), 'o') => format!("{n:o}"),
        (Value::Int(n), _) => n.to_string(),
        (Value::Float(f), 'd' | 'i' | 'u' | 'x' | 'X' | 'o') => (f.trunc() as i64).to_string(),
        (Value::Float(f), 's' | 'r' | 'a') => f.to_string(),
        (Value::Float(f), _) => format!("{:.*}", spec.precision.unwrap_or(6), f),
    };
    let body = match (spec.precision, numeric) {
        (Some(p), false) => body.chars().take(p).collect(),
        _ => body,
    };
    let len = body.chars().count();
    let pad = spec.width.saturating_sub(len);
    if spec.left {
        out.push_str(&body);
        out.extend(std::iter::repeat_n(' ', pad));
    } else if spec.zero && numeric {
        let (sign, digits) = body.split_at(usize::from(body.starts_with('-')));
        out.push_str(sign);
        out.extend(std::iter::repeat_n('0', pad));
        out.push_str(digits);
    } else {
        out.extend(std::iter::repeat_n(' ', pad));
        out.push_str(&body);
    }
}

/// Collects an event's message and its other fields as ` key=value`, as tracing prints them.
#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S, N> FormatEvent<S, N> for PatroniLayout
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        let message = visitor.message + &visitor.fields;
        let meta = event.metadata();
        let thread = std::thread::current();
        let record = LogRecord {
            time: chrono::Local::now(),
            relative: self.started.elapsed().as_secs_f64(),
            level: *meta.level(),
            target: meta.target(),
            file: meta.file(),
            line: meta.line(),
            module_path: meta.module_path(),
            message: &message,
            thread_name: thread.name().unwrap_or("Thread"),
            thread_id: i64::from(nix::unistd::gettid().as_raw()),
            pid: std::process::id(),
        };
        writeln!(writer, "{}", self.render(&record))
    }
}

/// tracing's own layouts, except that events for [`CRITICAL_TARGET`] say `CRITICAL`, not
/// `ERROR`.
struct CriticalAware<F>(F);

impl<S, N, F> FormatEvent<S, N> for CriticalAware<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if event.metadata().target() != CRITICAL_TARGET {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The level is the first `ERROR` of the line in both the text and the JSON layout.
        writer.write_str(&line.replacen("ERROR", "CRITICAL", 1))
    }
}

/// Checks `log.format` and `log.dateformat` (called by the configuration's validation).
pub fn validate(log: &LogConfig, errors: &mut Vec<FieldError>) {
    if log.kind == LogFormat::Plain {
        if let Some(serde_yaml::Value::String(format)) = &log.format {
            if let Err(e) = PyFormat::parse(format) {
                errors.push(FieldError {
                    path: "log.format".into(),
                    reason: e.to_string(),
                });
            }
        }
    }
    match &log.dateformat {
        None | Some(serde_yaml::Value::Null) => {}
        Some(serde_yaml::Value::String(d)) => {
            if let Err(e) = check_dateformat(d) {
                errors.push(FieldError {
                    path: "log.dateformat".into(),
                    reason: e.to_string(),
                });
            }
        }
        Some(_) => errors.push(FieldError {
            path: "log.dateformat".into(),
            reason: "expected a strftime format string".into(),
        }),
    }
}

/// How the agent logs, derived from `log`.
pub struct LogSettings {
    kind: LogFormat,
    level: String,
    layout: Option<PatroniLayout>,
}

impl LogSettings {
    /// The settings and what they do not apply, to log as warnings once logging runs.
    pub fn from_config(log: &LogConfig) -> (LogSettings, Vec<String>) {
        let mut warnings = Vec::new();
        let format = match &log.format {
            None | Some(serde_yaml::Value::Null) => None,
            Some(serde_yaml::Value::String(s)) => Some(s.as_str()),
            Some(_) if log.kind == LogFormat::Json => None,
            Some(_) => {
                // Patroni does the same: a list is the JSON layout's field list.
                warnings.push(format!(
                    "log.format: expected a format string when log.type is plain; using {DEFAULT_FORMAT:?}"
                ));
                Some(DEFAULT_FORMAT)
            }
        };
        let dateformat = match &log.dateformat {
            Some(serde_yaml::Value::String(s)) if !s.is_empty() => Some(s.as_str()),
            _ => None,
        };
        if log.kind == LogFormat::Json && (log.format.is_some() || dateformat.is_some()) {
            warnings.push(
                "log.format and log.dateformat are not applied to log.type json: pgwarden's JSON lines have fixed fields (timestamp, level, target, message, ...)".into(),
            );
        }
        let layout = match (log.kind, format.is_some() || dateformat.is_some()) {
            (LogFormat::Plain, true) => match PatroniLayout::new(format, dateformat) {
                Ok(layout) => Some(layout),
                Err(e) => {
                    // Validation refuses these; this is only reached by a reload.
                    warnings.push(format!("log.format: {e}; using pgwarden's own layout"));
                    None
                }
            },
            _ => None,
        };
        (
            LogSettings {
                kind: log.kind,
                level: log.level.clone(),
                layout,
            },
            warnings,
        )
    }
}

/// The plain layout in use: Patroni's (`log.format`/`log.dateformat`) or pgwarden's own; a
/// reload swaps it.
#[derive(Clone, Default)]
struct SwitchableLayout(std::sync::Arc<std::sync::RwLock<Option<PatroniLayout>>>);

impl<S, N> FormatEvent<S, N> for SwitchableLayout
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let layout = self.0.read().unwrap_or_else(|e| e.into_inner());
        match layout.as_ref() {
            Some(layout) => layout.format_event(ctx, writer, event),
            None => CriticalAware(tracing_format::format()).format_event(ctx, writer, event),
        }
    }
}

/// Replaces the running subscriber's filter.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// What a reload of the configuration may change in the running subscriber.
struct Reloader {
    kind: LogFormat,
    /// `RUST_LOG` was set at startup: it keeps overriding `log.level`.
    env_filter: bool,
    set_filter: SetFilter,
    layout: SwitchableLayout,
}

static RELOADER: std::sync::OnceLock<Reloader> = std::sync::OnceLock::new();

/// `RUST_LOG`, unless unset or blank.
fn env_directives() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

fn level_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(filter_for(level)).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Safe to call more than once (later calls are ignored).
pub fn init(settings: LogSettings) {
    let env = env_directives();
    let filter = env
        .as_deref()
        .and_then(|d| EnvFilter::try_new(d).ok())
        .unwrap_or_else(|| level_filter(&settings.level));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let layout = SwitchableLayout::default();
    let (installed, set_filter): (bool, SetFilter) = match settings.kind {
        LogFormat::Plain => {
            *layout.0.write().unwrap_or_else(|e| e.into_inner()) = settings.layout;
            let builder = builder.event_format(layout.clone()).with_filter_reloading();
            let handle = builder.reload_handle();
            (
                builder.try_init().is_ok(),
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
            )
        }
        LogFormat::Json => {
            let builder = builder
                .fmt_fields(tracing_format::JsonFields::new())
                .event_format(CriticalAware(
                    tracing_format::format().json().flatten_event(true),
                ))
                .with_filter_reloading();
            let handle = builder.reload_handle();
            (
                builder.try_init().is_ok(),
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
            )
        }
    };
    if installed {
        let _ = RELOADER.set(Reloader {
            kind: settings.kind,
            env_filter: env.is_some(),
            set_filter,
            layout,
        });
    }
}

/// Applies `log.level`, `log.format` and `log.dateformat` from a reloaded configuration to the
/// running subscriber (SIGHUP, `POST /reload`), as Patroni's logger does on reload. Returns
/// what it could not apply, to log as warnings: `log.type` is kept until the agent restarts,
/// and `RUST_LOG`, when set, keeps overriding `log.level`.
pub fn reload(log: &LogConfig) -> Vec<String> {
    let (settings, mut warnings) = LogSettings::from_config(log);
    let Some(reloader) = RELOADER.get() else {
        return warnings;
    };
    if settings.kind != reloader.kind {
        warnings.push("log.type changes only when the agent restarts".into());
        return warnings;
    }
    if !reloader.env_filter {
        if let Err(e) = (reloader.set_filter)(level_filter(&settings.level)) {
            warnings.push(format!("log.level: {e}"));
        }
    }
    if settings.kind == LogFormat::Plain {
        *reloader.layout.0.write().unwrap_or_else(|e| e.into_inner()) = settings.layout;
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn patroni_levels_map_to_tracing() {
        assert_eq!(filter_for("WARNING"), "warn");
        assert_eq!(filter_for("error"), "error");
        assert_eq!(filter_for("critical"), "off,pgwarden::critical=error");
        let filter = EnvFilter::try_new(filter_for("CRITICAL")).expect("a valid filter");
        assert_eq!(
            filter.max_level_hint(),
            Some(tracing::level_filters::LevelFilter::ERROR)
        );
        assert_eq!(filter_for("pgwarden=debug"), "pgwarden=debug");
    }

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut buf) = self.0.lock() {
                buf.extend_from_slice(data);
            }
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            self.0
                .lock()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        }
    }

    #[test]
    fn critical_events_say_critical_and_level_critical_keeps_only_them() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter_for("CRITICAL")))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .event_format(CriticalAware(tracing_format::format()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("an ordinary error");
            tracing::error!(target: CRITICAL_TARGET, "cannot go on");
        });
        let text = out.text();
        assert!(!text.contains("an ordinary error"), "{text}");
        assert!(
            text.contains("CRITICAL pgwarden::critical: cannot go on"),
            "{text}"
        );

        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("info"))
            .with_writer(move || writer.clone())
            .fmt_fields(tracing_format::JsonFields::new())
            .event_format(CriticalAware(
                tracing_format::format().json().flatten_event(true),
            ))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: CRITICAL_TARGET, "cannot go on");
        });
        assert!(
            out.text().contains(r#""level":"CRITICAL""#),
            "{}",
            out.text()
        );
    }

    fn record<'a>(level: Level, target: &'a str, message: &'a str) -> LogRecord<'a> {
        LogRecord {
            time: chrono::Local
                .with_ymd_and_hms(2026, 12, 4, 17, 5, 9)
                .single()
                .expect("a valid local time")
                + chrono::Duration::milliseconds(42),
            relative: 1.5,
            level,
            target,
            file: Some("agent/src/ha/mod.rs"),
            line: Some(77),
            module_path: Some("pgwarden::ha"),
            message,
            thread_name: "main",
            thread_id: 4242,
            pid: 31337,
        }
    }

    #[test]
    fn default_format_is_patronis() {
        let layout = PatroniLayout::new(None, None).expect("valid");
        let line = layout.render(&record(Level::WARN, "pgwarden::ha", "no leader"));
        assert_eq!(line, "2026-12-04 17:05:09,042 WARNING: no leader");
    }

    #[test]
    fn every_attribute_with_widths_and_a_dateformat() {
        let layout = PatroniLayout::new(
            Some("[%(asctime)s] %(levelname)-8s|%(name)s|%(process)d|%(threadName)s|%(filename)s:%(lineno)05d|%(funcName)s|%(module)s|%(levelno)s|%(message).4s|%%"),
            Some("%d/%m/%Y %H.%M.%S"),
        )
        .expect("valid");
        let line = layout.render(&record(Level::INFO, "pgwarden::ha", "hello world"));
        assert_eq!(
            line,
            "[04/12/2026 17.05.09] INFO    |pgwarden::ha|31337|main|mod.rs:00077|pgwarden::ha|mod|20|hell|%"
        );
        let line = layout.render(&record(Level::ERROR, CRITICAL_TARGET, "x"));
        assert!(line.contains("] CRITICAL|"), "{line}");
        let layout = PatroniLayout::new(Some("%(msecs)03d %(created)f %(levelname)5s"), None)
            .expect("valid");
        let line = layout.render(&record(Level::DEBUG, "t", "m"));
        assert!(line.starts_with("042 1796"), "{line}");
        assert!(line.ends_with("DEBUG"), "{line}");
    }

    #[test]
    fn bad_formats_are_refused_with_the_reason() {
        assert_eq!(
            PyFormat::parse("%(asctime)s %(levelnam)s"),
            Err(LogFormatError::UnknownAttribute("levelnam".into()))
        );
        assert_eq!(
            PyFormat::parse("%(message)d"),
            Err(LogFormatError::TextAsNumber {
                attr: "message".into(),
                conversion: 'd'
            })
        );
        assert_eq!(
            PyFormat::parse("100% %(message)s"),
            Err(LogFormatError::Placeholder(3))
        );
        assert_eq!(
            PyFormat::parse("%(message)"),
            Err(LogFormatError::Placeholder(0))
        );
        assert!(PatroniLayout::new(None, Some("%Q")).is_err());
        let mut errors = Vec::new();
        let log = LogConfig {
            format: Some(serde_yaml::Value::String("%(nope)s".into())),
            dateformat: Some(serde_yaml::Value::String("%Y %Q".into())),
            ..LogConfig::default()
        };
        validate(&log, &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["log.format", "log.dateformat"]);
    }

    #[test]
    fn format_from_patronis_environment_and_a_bad_one_names_the_key() {
        let yaml = "scope: s\nname: n\nrestapi: {listen: '127.0.0.1:8008'}\netcd3: {hosts: ['127.0.0.1:2379']}\npostgresql: {listen: '127.0.0.1:5432', data_dir: /tmp/x, authentication: {superuser: {username: p}, replication: {username: r}}}\n";
        let mut env = std::collections::BTreeMap::new();
        env.insert(
            "PATRONI_LOG_FORMAT".to_owned(),
            "%(levelname)s %(message)s".to_owned(),
        );
        env.insert("PATRONI_LOG_DATEFORMAT".to_owned(), "%H:%M".to_owned());
        let loaded = crate::config::load_str(yaml, &env, &Default::default()).expect("loads");
        let (settings, warnings) = LogSettings::from_config(&loaded.config.log);
        assert!(settings.layout.is_some() && warnings.is_empty());
        env.insert("PATRONI_LOG_FORMAT".to_owned(), "%(when)s".to_owned());
        let err = crate::config::load_str(yaml, &env, &Default::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("`log.format`") && err.contains("%(when)s"),
            "{err}"
        );
    }

    #[test]
    fn json_keeps_its_fields_and_says_so() {
        let log = LogConfig {
            kind: LogFormat::Json,
            format: Some(serde_yaml::Value::String(DEFAULT_FORMAT.into())),
            ..LogConfig::default()
        };
        let (settings, warnings) = LogSettings::from_config(&log);
        assert!(settings.layout.is_none());
        assert_eq!(warnings.len(), 1);
        let (settings, warnings) = LogSettings::from_config(&LogConfig::default());
        assert!(settings.layout.is_none() && warnings.is_empty());
    }
}
