//! Five-field cron expressions (minute hour day-of-month month day-of-week),
//! in UTC, for `[[jobs.schedules]]` (a bottom-floor module: the settings
//! parse schedules with it, the job runner fires them).
//!
//! Each field takes `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`,
//! and comma-separated lists of these. Day of week is 0-7 (0 and 7 are
//! Sunday). As in Vixie cron, when both day fields are restricted a day
//! matches if either does. `@hourly`, `@daily`, `@weekly` and `@monthly`
//! are accepted as shorthands.

use std::fmt;

/// Why a cron expression was refused; each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("{expression:?} has {count} fields; a cron expression has 5 (minute hour day month weekday)")]
    FieldCount { expression: String, count: usize },
    #[error("{field}: step {step:?} is not a number")]
    BadStep { field: &'static str, step: String },
    #[error("{field}: a step of 0")]
    ZeroStep { field: &'static str },
    #[error("{field}: {text:?} is not a number")]
    NotANumber { field: &'static str, text: String },
    #[error("{field}: {value} is not in {min}-{max}")]
    OutOfRange { field: &'static str, value: u32, min: u32, max: u32 },
    #[error("{field}: the range {lo}-{hi} is backwards")]
    Backwards { field: &'static str, lo: u32, hi: u32 },
}

/// A parsed schedule.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    source: String,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Whether the day-of-month and day-of-week fields were both restricted.
    either_day: bool,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?})", self.source)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses one field into a bit set of the values it allows.
fn field(text: &str, name: &'static str, min: u32, max: u32) -> Result<u64, CronError> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 =
                    step.parse().map_err(|_| CronError::BadStep { field: name, step: step.to_string() })?;
                if step == 0 {
                    return Err(CronError::ZeroStep { field: name });
                }
                (range, step)
            }
            None => (part, 1),
        };
        let number = |t: &str| -> Result<u32, CronError> {
            let n: u32 = t.parse().map_err(|_| CronError::NotANumber { field: name, text: t.to_string() })?;
            if n < min || n > max {
                return Err(CronError::OutOfRange { field: name, value: n, min, max });
            }
            Ok(n)
        };
        let (lo, hi) = match range {
            "*" => (min, max),
            r => match r.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if step > 1 => (number(r)?, max),
                None => {
                    let n = number(r)?;
                    (n, n)
                }
            },
        };
        if lo > hi {
            return Err(CronError::Backwards { field: name, lo, hi });
        }
        for v in (lo..=hi).step_by(step as usize) {
            bits |= 1 << v;
        }
    }
    Ok(bits)
}

impl Cron {
    /// Parses an expression (surrounding spaces ignored).
    ///
    /// # Errors
    /// [`CronError`] naming the field that is wrong and why.
    pub fn parse(text: &str) -> Result<Self, CronError> {
        let source = text.trim().to_string();
        let expanded = match source.as_str() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(CronError::FieldCount { expression: source.clone(), count: fields.len() });
        };
        let mut weekdays = field(dow, "day of week", 0, 7)? as u8;
        if weekdays & 0x80 != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        Ok(Self {
            minutes: field(minute, "minute", 0, 59)?,
            hours: field(hour, "hour", 0, 23)? as u32,
            days: field(dom, "day of month", 1, 31)? as u32,
            months: field(month, "month", 1, 12)? as u16,
            weekdays,
            either_day: dom != "*" && dow != "*",
            source,
        })
    }

    fn day_matches(&self, day: u32, weekday: u32) -> bool {
        let dom = self.days & (1 << day) != 0;
        let dow = self.weekdays & (1 << weekday) != 0;
        if self.either_day {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The first whole minute strictly after `after` (Unix seconds) that
    /// the schedule matches, in Unix seconds. `None` if there is none within
    /// eight years (e.g. `0 0 31 2 *`).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        let mut minute = after / 60 + 1;
        let limit = minute + 8 * 366 * 24 * 60;
        while minute < limit {
            let days = minute / (24 * 60);
            let (year_month_day, weekday) = (civil_from_days(days as i64), ((days + 4) % 7) as u32);
            let (_, month, day) = year_month_day;
            if self.months & (1 << month) == 0 || !self.day_matches(day, weekday) {
                minute = (days + 1) * 24 * 60;
                continue;
            }
            let hour = ((minute / 60) % 24) as u32;
            if self.hours & (1 << hour) == 0 {
                minute = (minute / 60 + 1) * 60;
                continue;
            }
            if self.minutes & (1 << (minute % 60)) != 0 {
                return Some(minute * 60);
            }
            minute += 1;
        }
        None
    }
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic
/// Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-22 00:00:00 UTC, a Sunday.
    const SUNDAY: u64 = 1_795_305_600;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(SUNDAY as i64 / 86_400), (2026, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn next_fire_times() {
        let at = |s: &str, after: u64| Cron::parse(s).unwrap().next_after(after).unwrap();
        assert_eq!(at("* * * * *", SUNDAY), SUNDAY + 60);
        assert_eq!(at("* * * * *", SUNDAY + 59), SUNDAY + 60);
        assert_eq!(at("30 4 * * *", SUNDAY), SUNDAY + 4 * 3600 + 1800);
        assert_eq!(at("@daily", SUNDAY), SUNDAY + 86_400);
        assert_eq!(at("*/15 * * * *", SUNDAY + 60), SUNDAY + 900);
        // Weekdays: Sunday is 0 and 7; Monday 03:00 is a day and 3 hours on.
        assert_eq!(at("0 3 * * 1", SUNDAY), SUNDAY + 86_400 + 3 * 3600);
        assert_eq!(at("0 3 * * 7", SUNDAY), SUNDAY + 3 * 3600);
        // Day of month and month: 2026-12-01 00:00.
        assert_eq!(at("0 0 1 12 *", SUNDAY), SUNDAY + 9 * 86_400);
        // Both day fields restricted: either matches (the 1st, or Monday).
        assert_eq!(at("0 0 1 * 1", SUNDAY), SUNDAY + 86_400);
        assert_eq!(at("0 9-17/4 * * *", SUNDAY), SUNDAY + 9 * 3600);
        assert_eq!(at("5,10 * * * *", SUNDAY + 6 * 60), SUNDAY + 10 * 60);
        assert!(Cron::parse("0 0 31 2 *").unwrap().next_after(SUNDAY).is_none());
    }

    #[test]
    fn bad_expressions_say_why() {
        for (text, why) in [
            ("* * * *", "5"),
            ("60 * * * *", "minute: 60"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day of week"),
            ("*/0 * * * *", "step of 0"),
            ("5-1 * * * *", "backwards"),
            ("x * * * *", "not a number"),
        ] {
            let err = Cron::parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
