//! Value types for the config file: durations written `30s`, `500ms`, `2m`, and byte
//! sizes written `64KiB`, `1MiB` or as a plain number of bytes.
//!
//! They parse once at the edge so nothing deeper handles strings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration as written in the config: `30s`, `500ms`, `2m`, `1h`, `0s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }

    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }

    pub fn get(self) -> Duration {
        self.0
    }

    /// `None` for `0s`, which the config uses to mean "off".
    pub fn non_zero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// The longest duration a setting may have. Deadlines are clock readings plus a
/// setting (`Instant + Duration` panics past what the clock holds), so an absurd value
/// must be an error here, not a panic on a request or a signal later.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        // humantime also accepts compound forms such as `1m30s`.
        let d = humantime::parse_duration(s).map_err(|_| {
            format!(
                "invalid duration {s:?}: write a number and a unit, like `30s`, `500ms` or `2m`"
            )
        })?;
        if d > MAX_DURATION {
            return Err(format!("duration {s:?} is too long: at most 365d"));
        }
        Ok(Dur(d))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        let ms = d.as_millis();
        if !d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}", humantime::format_duration(d))
        } else if ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"500ms\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                if v == 0 {
                    return Ok(Dur(Duration::ZERO));
                }
                if v < 0 {
                    return Err(E::custom("a duration cannot be negative"));
                }
                Err(E::custom(format!(
                    "a bare number is ambiguous: write \"{v}s\" or \"{v}ms\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size in bytes: `65536`, `64KiB`, `1MiB`, `1GiB`, or `64KB` (decimal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        ByteSize(n * 1024)
    }

    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

// Written by hand: the crates that do this (bytesize, ubyte) bring formatting rules we
// do not want in configs, and the grammar here is six suffixes.
impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!("invalid size {s:?}: write bytes, or a number with KiB, MiB, GiB, KB, MB or GB")
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", n >> 30)
        } else if n != 0 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n != 0 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 65536, \"64KiB\" or \"1MiB\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations_parse_as_written() {
        assert_eq!("30s".parse::<Dur>().unwrap(), Dur::secs(30));
        assert_eq!("500ms".parse::<Dur>().unwrap(), Dur::millis(500));
        assert_eq!("2m".parse::<Dur>().unwrap(), Dur::secs(120));
        assert_eq!("0".parse::<Dur>().unwrap(), Dur::secs(0));
        assert!("30".parse::<Dur>().is_err());
        assert!("fast".parse::<Dur>().is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("65536".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize::kib(64));
        assert_eq!("1MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(1));
        assert_eq!("2GB".parse::<ByteSize>().unwrap(), ByteSize(2_000_000_000));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
    }

    proptest! {
        #[test]
        fn duration_display_round_trips(ms in 0u64..10_000_000_000) {
            let d = Dur::millis(ms);
            prop_assert_eq!(d.to_string().parse::<Dur>().unwrap(), d);
        }

        #[test]
        fn size_display_round_trips(n in 0u64..(1 << 50)) {
            let s = ByteSize(n);
            prop_assert_eq!(s.to_string().parse::<ByteSize>().unwrap(), s);
        }
    }
}
