//! Durations (humantime: `1s`, `5m`, `1h 30m`) and byte sizes (`512MB`, `1GB`, `1.5GiB`) as they are
//! written in plans. Both keep the text they were written as, so a rendered plan shows what the user
//! wrote.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A humantime duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// Parses a duration; the error names the text and says what is wrong with it, in a few words
    /// (the forms a duration takes are for the hint that goes with it).
    pub fn parse(text: &str) -> Result<Dur, String> {
        use humantime::DurationError as E;
        let t = text.trim();
        humantime::parse_duration(t).map(Dur).map_err(|e| {
            let at = |offset: usize| t.get(offset..).unwrap_or_default().trim();
            let why = match e {
                E::Empty => "it is empty".to_string(),
                E::InvalidCharacter(offset) => match at(offset).chars().next() {
                    Some(c) => format!("unexpected character `{c}`"),
                    None => "unexpected character".to_string(),
                },
                E::NumberExpected(offset) => {
                    format!("a number is expected before `{}`", at(offset))
                }
                E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
                    format!("a time unit is needed, as in `{value}s` or `{value}ms`")
                }
                E::UnknownUnit { unit, .. } => format!("unknown time unit `{unit}`"),
                E::NumberOverflow => {
                    "the number is too large, or finer than a nanosecond".to_string()
                }
            };
            format!("invalid duration `{text}`: {why}")
        })
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let text = String::deserialize(d)?;
        Dur::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A size in bytes. Units follow PostgreSQL (`kB`, `MB`, `GB`, `TB` are powers of 1024); `KiB`,
/// `MiB`, `GiB`, `TiB` are accepted as the same; a bare number is bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num.parse().map_err(|_| match num {
            "" => format!("invalid size `{text}`: it does not start with a number"),
            _ => format!("invalid size `{text}`: `{num}` is not a number"),
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "invalid size `{text}`: unknown unit `{}`",
                    unit.trim()
                ));
            }
        };
        let bytes = num * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("invalid size `{text}`: out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", human_bytes(self.0))
    }
}

/// `1536` -> `1.5 kB`, PostgreSQL style (powers of 1024).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}B", self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        let text = String::deserialize(d)?;
        ByteSize::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("1GB").unwrap().0, 1 << 30);
        assert_eq!(ByteSize::parse("512 MB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("1.5GiB").unwrap().0, 3 << 29);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert_eq!(
            ByteSize::parse("1 parsec").unwrap_err(),
            "invalid size `1 parsec`: unknown unit `parsec`"
        );
        assert!(ByteSize::parse("GB").is_err());
        assert_eq!(human_bytes(1536), "1.5 kB");
    }

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("1s").unwrap().0, Duration::from_secs(1));
        assert_eq!(Dur::parse("1h 30m").unwrap().0, Duration::from_secs(5400));
        assert_eq!(
            Dur::parse("5 sex").unwrap_err(),
            "invalid duration `5 sex`: unknown time unit `sex`"
        );
        assert_eq!(
            Dur::parse("100").unwrap_err(),
            "invalid duration `100`: a time unit is needed, as in `100s` or `100ms`"
        );
        assert_eq!(
            Dur::parse(" ").unwrap_err(),
            "invalid duration ` `: it is empty"
        );
        assert_eq!(
            Dur::parse("1h m").unwrap_err(),
            "invalid duration `1h m`: a number is expected before `m`"
        );
        assert_eq!(
            Dur::parse("1s!").unwrap_err(),
            "invalid duration `1s!`: unexpected character `!`"
        );
    }
}
