//! Single values of the job file: counts, durations, sizes, signals, port ranges, names, paths, environment tables.

use super::*;

impl Validator<'_> {
    pub(super) fn name(&mut self, name: &str, at: &FieldPath) {
        let valid = !name.is_empty()
            && name.len() <= 100
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            self.error(at, format!("invalid name {name:?}: {NAME_RULE}"));
        }
    }

    pub(super) fn path(&mut self, text: &str, at: &FieldPath) -> PathBuf {
        if text.is_empty() {
            self.error(at, "the path is empty");
        }
        self.base.join(text)
    }

    pub(super) fn existing_dir(&mut self, text: &str, at: &FieldPath) -> PathBuf {
        let path = self.path(text, at);
        if self.probe.kind(&path) != Ok(PathKind::Directory) {
            self.error(at, format!("{} is not an existing directory", path.display()));
        }
        path
    }

    /// A count with a lower bound and the u32 range as upper bound.
    pub(super) fn count(&mut self, value: i64, at: &FieldPath, min: i64) -> u32 {
        self.bounded(value, at, min, i64::from(u32::MAX))
    }

    pub(super) fn bounded(&mut self, value: i64, at: &FieldPath, min: i64, max: i64) -> u32 {
        if value < min || value > max {
            self.error(at, format!("{value} is out of range: expected a whole number from {min} to {max}"));
            return min.max(0) as u32;
        }
        value as u32
    }

    pub(super) fn duration(&mut self, value: &Value, at: &FieldPath) -> Option<Duration> {
        let parsed = match value {
            Value::String(text) => parse_duration(text),
            Value::Integer(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
            other => Err(format!("invalid duration {other}: {}", crate::spec::units::DURATION_HINT)),
        };
        match parsed {
            Ok(d) if d.is_zero() => {
                self.error(at, "must be longer than zero");
                None
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(at, format!("too long: at most {} days", MAX_DURATION.as_secs() / 86_400));
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.error(at, message);
                None
            }
        }
    }

    pub(super) fn duration_or(&mut self, value: Option<&Value>, at: &FieldPath, default: Duration) -> Duration {
        value.and_then(|v| self.duration(v, at)).unwrap_or(default)
    }

    pub(super) fn size(&mut self, value: &Value, at: &FieldPath) -> Option<u64> {
        let parsed = match value {
            Value::String(text) => parse_size(text),
            Value::Integer(n) if *n >= 0 => Ok(*n as u64),
            other => Err(format!("invalid size {other}: {}", crate::spec::units::SIZE_HINT)),
        };
        parsed.map_err(|message| self.error(at, message)).ok()
    }

    pub(super) fn log_limit(&mut self, value: Option<&Value>, at: &FieldPath) -> Option<u64> {
        match value {
            None => Some(DEFAULT_LOG_LIMIT),
            Some(Value::String(text)) if text == "unlimited" => None,
            Some(value) => match self.size(value, at) {
                Some(0) => {
                    self.error(at, "must be larger than zero (or \"unlimited\")");
                    None
                }
                limit => limit,
            },
        }
    }

    pub(super) fn signal(&mut self, name: Option<&str>, at: &FieldPath) -> StopSignal {
        let name = name.unwrap_or("TERM");
        let short = name.strip_prefix("SIG").unwrap_or(name).to_ascii_uppercase();
        match SIGNALS.iter().find(|(n, _)| *n == short) {
            Some((n, number)) => StopSignal { name: format!("SIG{n}"), number: *number },
            None => {
                let names: Vec<String> = SIGNALS.iter().map(|(n, _)| format!("SIG{n}")).collect();
                self.error(at, format!("unknown signal {name:?}: expected one of {}", names.join(", ")));
                StopSignal { name: "SIGTERM".into(), number: 15 }
            }
        }
    }

    pub(super) fn port_range(&mut self, text: Option<&str>, at: &FieldPath) -> PortRange {
        let Some(text) = text else {
            return DEFAULT_MASTER_PORTS;
        };
        let parsed = text
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
        match parsed {
            Some((first, last)) if 1024 <= first && first <= last => PortRange { first, last },
            _ => {
                self.error(
                    at,
                    format!("invalid port range {text:?}: expected e.g. \"29500-30499\" (ports 1024-65535)"),
                );
                DEFAULT_MASTER_PORTS
            }
        }
    }

    pub(super) fn env(&mut self, table: Option<&Table>, at: &FieldPath) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (key, value) in table.into_iter().flatten() {
            let at = at.key(key);
            if !is_identifier(key) {
                self.error(&at, format!("{key:?} is not a valid variable name (letters, digits, '_')"));
            } else if key.starts_with("DLAUNCH_") || RESERVED_ENV.contains(&key.as_str()) {
                self.error(&at, format!("{key} is set by dlaunch for every task and cannot be overridden"));
            }
            match substitutable(value, "environment values") {
                Ok(text) => env.push((key.clone(), text)),
                Err(message) => self.error(&at, message),
            }
        }
        env
    }
}
