//! Durations ("30m", "1h 30m", 90) and sizes ("16GiB", "512M", 1024) as users write them.

use std::time::Duration;

pub const DURATION_HINT: &str =
    "expected a duration like \"90s\", \"30m\", \"1h 30m\" or \"2days\", or a number of seconds";
pub const SIZE_HINT: &str =
    "expected a size like \"512MiB\", \"16GiB\", \"16G\" (G = GiB, as in SLURM), \"2TB\", or a number of bytes";

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if let Ok(seconds) = trimmed.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(trimmed).map_err(|e| format!("invalid duration {text:?} ({e}): {DURATION_HINT}"))
}

pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {text:?}: {SIZE_HINT}");
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(invalid()),
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(invalid());
    }
    Ok(bytes.round() as u64)
}

/// "16 GiB", "1.5 MiB", "17 B": short and exact enough for people.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "1h 30m 5s": rounded to seconds beyond a minute, to milliseconds below.
pub fn format_duration(duration: Duration) -> String {
    let rounded = if duration >= Duration::from_secs(60) {
        Duration::from_secs(duration.as_secs())
    } else {
        Duration::from_millis(duration.as_millis() as u64)
    };
    humantime::format_duration(rounded).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("3x").unwrap_err().contains("\"30m\""));
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert_eq!(parse_size("2TB"), Ok(2_000_000_000_000));
        assert_eq!(parse_size("1.5 MiB"), Ok(3 << 19));
        assert_eq!(parse_size("100"), Ok(100));
        for bad in ["", "GiB", "-1G", "1.2.3G", "5 parsecs", "1e400G", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(16 << 30), "16 GiB");
        assert_eq!(format_size(3 << 19), "1.5 MiB");
        assert_eq!(format_size(17), "17 B");
        assert_eq!(format_duration(Duration::from_millis(61_500)), "1m 1s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s 500ms");
    }
}
