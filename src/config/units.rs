//! The small value types of the config file: durations, byte sizes and rates.
//!
//! Each is written one way only (`"250ms"`, `"5MiB"`, `"625/1m"`), so a unit can never be
//! misread: a rate is always "COUNT per PERIOD", never "one token every N seconds".

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Parses `"250ms"`, `"5s"`, `"1m"`, `"2h"`, `"1d"` (and humantime's combinations, `"1m30s"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration: write e.g. \"5s\" or \"250ms\"".into());
    }
    if text.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "duration {text:?} has no unit: write e.g. \"{text}s\" or \"{text}ms\""
        ));
    }
    humantime::parse_duration(text).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// A duration written with its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map(Span).map_err(de::Error::custom)
    }
}

/// A byte size: an integer, or a string with a unit (`"64KiB"`, `"5MiB"`, `"1GiB"`, `"500B"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad size {text:?}: write e.g. \"5MiB\" or a number of bytes"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1024,
        "MiB" | "MB" | "M" => 1024 * 1024,
        "GiB" | "GB" | "G" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "bad size unit {other:?} in {text:?}: use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => parse_size(&t).map(Size).map_err(de::Error::custom),
        }
    }
}

/// `COUNT` requests per `PERIOD`, with a burst (how many may arrive at once on a full bucket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub period: Duration,
    pub burst: u64,
}

impl Rate {
    pub fn new(count: u64, period: Duration) -> Rate {
        Rate {
            count,
            period,
            burst: count,
        }
    }

    pub fn with_burst(mut self, burst: u64) -> Rate {
        self.burst = burst;
        self
    }

    /// This rate at a share of its count and burst (at least 1 each), for a local fallback.
    pub fn scaled(&self, share: f64) -> Rate {
        let scale = |n: u64| ((n as f64 * share).floor() as u64).max(1);
        Rate {
            count: scale(self.count),
            period: self.period,
            burst: scale(self.burst),
        }
    }

    /// The GCRA emission interval: the time one unit of quota takes to come back.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1) as u32
    }

    /// The window in whole seconds, as `RateLimit-Policy` reports it (`w=`).
    pub fn window_secs(&self) -> u64 {
        self.period.as_secs().max(1)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.count,
            humantime::format_duration(self.period)
        )?;
        if self.burst != self.count {
            write!(f, " (burst {})", self.burst)?;
        }
        Ok(())
    }
}

/// Parses `"625/1m"`, `"40000/15m"`, `"10/s"` (a bare unit means one of it).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let hint = "write a rate as \"COUNT/PERIOD\", e.g. \"625/1m\" or \"40000/15m\"";
    let (count, period) = text
        .split_once('/')
        .ok_or_else(|| format!("bad rate {text:?}: {hint}"))?;
    let count = count.trim();
    if count.eq_ignore_ascii_case("unlimited") || count.eq_ignore_ascii_case("inf") {
        return Err(format!(
            "rate {text:?}: to have no limit, leave the limit out instead of writing a rate"
        ));
    }
    let count: u64 = count
        .replace('_', "")
        .parse()
        .map_err(|_| format!("bad rate {text:?}: the count must be a whole number; {hint}"))?;
    if count == 0 {
        return Err(format!(
            "rate {text:?} admits nothing: a count of 0 is not \"unlimited\"; leave the limit out for no limit"
        ));
    }
    let period = period.trim();
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(period)?
    } else {
        parse_duration(&format!("1{period}"))?
    };
    if period.is_zero() {
        return Err(format!("rate {text:?} has a zero period"));
    }
    if period < Duration::from_millis(1) {
        return Err(format!("rate {text:?}: the period must be at least 1ms"));
    }
    if u32::try_from(count).is_err() {
        return Err(format!("rate {text:?}: the count is too large"));
    }
    Ok(Rate::new(count, period))
}

/// A limit: a rate, and whether it only reports (`shadow = true`: counted, logged and measured,
/// never denied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    pub rate: Rate,
    pub shadow: bool,
}

impl From<Rate> for Limit {
    fn from(rate: Rate) -> Limit {
        Limit {
            rate,
            shadow: false,
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Table(Table),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            rate: String,
            burst: Option<i64>,
            #[serde(default)]
            shadow: bool,
        }
        let (text, burst, shadow) = match Raw::deserialize(d)? {
            Raw::Text(t) => (t, None, false),
            Raw::Table(t) => (t.rate, t.burst, t.shadow),
        };
        let rate = parse_rate(&text).map_err(de::Error::custom)?;
        let rate = match burst {
            None => rate,
            Some(b) if b < 1 => {
                return Err(de::Error::custom(format!(
                    "burst {b} for rate {text:?}: a burst below 1 would deny every request; the smallest burst is 1"
                )))
            }
            Some(b) => rate.with_burst(b as u64),
        };
        Ok(Limit { rate, shadow })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_count_per_period() {
        let r = parse_rate("625/1m").unwrap();
        assert_eq!(
            (r.count, r.period, r.burst),
            (625, Duration::from_secs(60), 625)
        );
        assert_eq!(
            parse_rate("40000/15m").unwrap().period,
            Duration::from_secs(900)
        );
        assert_eq!(parse_rate("10/s").unwrap().period, Duration::from_secs(1));
        assert_eq!(
            parse_rate("1/1m").unwrap().interval(),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn misleading_rates_are_rejected() {
        assert!(parse_rate("0/1m")
            .unwrap_err()
            .contains("not \"unlimited\""));
        assert!(parse_rate("unlimited/1m").is_err());
        assert!(parse_rate("625").is_err());
        assert!(parse_rate("625/60").unwrap_err().contains("no unit"));
        assert!(parse_rate("5/0s").is_err());
    }

    #[test]
    fn sizes_and_durations_need_units() {
        assert_eq!(parse_size("5MiB").unwrap(), 5 * 1024 * 1024);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("30").is_err());
    }
}
