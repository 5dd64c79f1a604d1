//! Durations as written in turn documents: `500ms`, `90s`, `2m`, `1h30m`.

use std::time::Duration;
use thiserror::Error;

/// Units in the order they must appear, with their length in milliseconds.
const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// A reason why a duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    /// The text is empty.
    #[error("empty duration: write a number with a unit, as in `90s` or `1h30m`")]
    Empty,

    /// The text is a bare number.
    #[error("duration `{0}` has no unit: write `{0}s` for seconds or `{0}m` for minutes")]
    MissingUnit(String),

    /// The text is not a sequence of whole numbers with units in decreasing order.
    #[error(
        "invalid duration `{0}`: write whole numbers with the units h, m, s or ms, largest \
         first, as in `500ms`, `90s` or `1h30m`"
    )]
    Invalid(String),

    /// The duration does not fit in 64 bits of milliseconds.
    #[error("duration `{0}` is too long: write at most a few thousand hours")]
    TooLong(String),
}

/// Parses a duration such as `500ms`, `90s`, `2m` or `1h30m15s`.
///
/// Each unit (`h`, `m`, `s`, `ms`) may appear once, largest first, after a whole number.
/// Surrounding whitespace is ignored, but whitespace inside is rejected.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(DurationError::MissingUnit(text.to_owned()));
    }

    let invalid = || DurationError::Invalid(text.to_owned());
    let too_long = || DurationError::TooLong(text.to_owned());
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (number, after_number) = rest.split_at(digits);
        let letters = after_number
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        let (unit, after_unit) = after_number.split_at(letters);

        // Searching only from `next_unit` on rejects repeated and out-of-order units.
        let position = UNITS[next_unit..]
            .iter()
            .position(|(name, _)| *name == unit);
        let index = next_unit + position.ok_or_else(invalid)?;
        if number.is_empty() {
            return Err(invalid());
        }
        let value: u64 = number.parse().map_err(|_| too_long())?;
        let part = value.checked_mul(UNITS[index].1).ok_or_else(too_long)?;
        total_ms = total_ms.checked_add(part).ok_or_else(too_long)?;
        next_unit = index + 1;
        rest = after_unit;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a configured duration in the syntax [`parse_duration`] accepts, such as `1h30m`.
///
/// Parts below a millisecond are dropped, and a zero duration is `0s`.
pub fn format_duration(duration: Duration) -> String {
    let mut rest_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if rest_ms == 0 {
        return "0s".to_owned();
    }
    let mut text = String::new();
    for (unit, unit_ms) in UNITS {
        let count = rest_ms / unit_ms;
        if count > 0 {
            text.push_str(&format!("{count}{unit}"));
        }
        rest_ms %= unit_ms;
    }
    text
}

/// Formats a measured duration for a result line: `45ms` below a tenth of a second, `1.4s`
/// below a minute, else `2m5s`.
pub fn format_elapsed(duration: Duration) -> String {
    if duration < Duration::from_millis(100) {
        return format!("{}ms", duration.as_millis());
    }
    let tenths = (duration.as_millis() + 50) / 100;
    if tenths < 600 {
        return format!("{}.{}s", tenths / 10, tenths % 10);
    }
    let whole_seconds = (duration.as_millis() + 500) / 1000;
    let whole_seconds = u64::try_from(whole_seconds).unwrap_or(u64::MAX);
    format_duration(Duration::from_secs(whole_seconds))
}

/// Reports whether `text` is something [`format_elapsed`] can produce.
pub(crate) fn is_elapsed(text: &str) -> bool {
    let decimal = text
        .strip_suffix('s')
        .and_then(|number| number.split_once('.'));
    if let Some((whole, fraction)) = decimal {
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        return digits(whole) && digits(fraction);
    }
    parse_duration(text).is_ok() && !text.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_duration_accepts_each_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn parse_duration_adds_parts() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_duration(" 1m30s500ms "),
            Ok(Duration::from_millis(90_500))
        );
    }

    #[test]
    fn parse_duration_rejects_bare_number() {
        assert_eq!(
            parse_duration("90"),
            Err(DurationError::MissingUnit("90".into()))
        );
    }

    #[test]
    fn parse_duration_rejects_bad_input() {
        for text in [
            "2x", "m", "1.5h", "30m1h", "1m1m", "1 m", "-1s", "1h30", "s1",
        ] {
            assert_eq!(
                parse_duration(text),
                Err(DurationError::Invalid(text.into())),
                "{text}"
            );
        }
        assert_eq!(parse_duration("  "), Err(DurationError::Empty));
    }

    #[test]
    fn parse_duration_rejects_overflow() {
        let text = "99999999999999999999h";
        assert_eq!(
            parse_duration(text),
            Err(DurationError::TooLong(text.into()))
        );
        let text = "9999999999999999h";
        assert_eq!(
            parse_duration(text),
            Err(DurationError::TooLong(text.into()))
        );
    }

    #[test]
    fn format_duration_round_trips() {
        for text in ["500ms", "1m30s", "2m", "1h30m", "1h1s", "3s250ms"] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(format_duration(duration), text);
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn format_elapsed_rounds_to_tenths() {
        assert_eq!(format_elapsed(Duration::from_millis(1_449)), "1.4s");
        assert_eq!(format_elapsed(Duration::from_millis(1_450)), "1.5s");
        assert_eq!(format_elapsed(Duration::from_millis(12)), "12ms");
        assert_eq!(format_elapsed(Duration::from_millis(99)), "99ms");
        assert_eq!(format_elapsed(Duration::from_millis(100)), "0.1s");
        assert_eq!(format_elapsed(Duration::from_millis(59_949)), "59.9s");
    }

    #[test]
    fn format_elapsed_uses_units_past_a_minute() {
        assert_eq!(format_elapsed(Duration::from_millis(59_950)), "1m");
        assert_eq!(format_elapsed(Duration::from_secs(125)), "2m5s");
        assert_eq!(format_elapsed(Duration::from_secs(3_723)), "1h2m3s");
    }

    #[test]
    fn is_elapsed_matches_formatted_durations() {
        for text in ["0.3s", "12.0s", "2m5s", "1h", "45ms", "0ms"] {
            assert!(is_elapsed(text), "{text}");
        }
        for text in ["exit 137", "", "1.s", ".5s", "an earlier step failed"] {
            assert!(!is_elapsed(text), "{text}");
        }
    }
}
