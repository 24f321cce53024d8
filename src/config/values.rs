//! Scalar value types of the config: every string may carry `${VAR}` or
//! `${VAR:-default}`, sizes take units, durations are humantime, and secrets
//! never print. Interpolation happens while deserializing so that a missing
//! variable is reported at the line and column of the value that needs it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Expand `${VAR}` and `${VAR:-default}` from the process environment.
/// `$$` stands for a literal `$`.
pub fn interpolate(input: &str) -> Result<String, String> {
    interpolate_with(input, |name| std::env::var(name).ok())
}

/// Interpolation with an injectable environment, for tests.
pub fn interpolate_with(
    input: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {input:?}: write `${{VAR}}`"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{expr}}}` is not a valid variable reference"));
            }
            match (lookup(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set; set it or write `${{{name}:-default}}`"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads a YAML scalar as text whatever its YAML type (so `workers: ${N:-4}`
/// and `workers: 4` both work), interpolates it, then converts it. The
/// conversion runs inside the visitor so that the parser pins its error to
/// the value's own line and column.
struct ScalarVisitor<F> {
    what: &'static str,
    convert: F,
}

impl<T, F: FnOnce(String) -> Result<T, String>> ScalarVisitor<F> {
    fn finish<E: de::Error>(self, text: String) -> Result<T, E> {
        (self.convert)(text).map_err(E::custom)
    }
}

impl<T, F: FnOnce(String) -> Result<T, String>> Visitor<'_> for ScalarVisitor<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.what)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        let text = interpolate(v).map_err(E::custom)?;
        self.finish(text)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<T, E> {
        self.visit_str(&v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.finish(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.finish(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.finish(v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        self.finish(v.to_string())
    }
}

/// Deserialize a scalar, interpolated, then converted by `convert`.
fn scalar<'de, D, T>(
    deserializer: D,
    what: &'static str,
    convert: impl FnOnce(String) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_any(ScalarVisitor { what, convert })
}

/// Deserialize any `FromStr` type from an interpolated scalar.
pub fn parse_scalar<'de, D, T>(deserializer: D, what: &'static str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    scalar(deserializer, what, |text| {
        text.trim()
            .parse()
            .map_err(|e| format!("{text:?} is not {what}: {e}"))
    })
}

/// Plain text after interpolation.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a string", Ok).map(Text)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// An integer, a boolean or a float that may also be written with `${VAR}`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(transparent)]
pub struct Num<T>(pub T);

impl<'de, T> Deserialize<'de> for Num<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let what = match std::any::type_name::<T>() {
            "usize" | "u32" | "u64" => "a whole number",
            other => other,
        };
        parse_scalar(d, what).map(Num)
    }
}

/// A boolean that may be written `true`/`false`/`yes`/`no` or via `${VAR}`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Default)]
#[serde(transparent)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "true or false", |text| {
            match text.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Ok(Flag(true)),
                "false" | "no" | "off" => Ok(Flag(false)),
                _ => Err(format!("{text:?} is not true or false")),
            }
        })
    }
}

/// A size in bytes: `1048576`, `16MiB`, `100MB`, `2GiB`, `1.5 GB`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| "expected a number of bytes or a size such as 16MiB".to_string())?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?}; use B, KB, KiB, MB, MiB, GB, GiB, TB or TiB"
                ));
            }
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err("size out of range".into());
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_scalar(d, "a size")
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let units = [
            (1u64 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (size, name) in units {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A humantime duration (`10s`, `5m`, `1h 30m`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(Dur)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_scalar(d, "a duration such as 10s, 5m or 1h 30m")
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// A credential. It prints and serializes as `***` so that `check`, logs,
/// receipts and error reports can never show it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value (from config, a `*_file`, or a test).
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a string", Ok).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_string())
    }

    #[test]
    fn interpolation_forms() {
        assert_eq!(interpolate_with("a ${SET} b", env).unwrap(), "a value b");
        assert_eq!(interpolate_with("${UNSET:-dflt}", env).unwrap(), "dflt");
        assert_eq!(interpolate_with("${SET:-dflt}", env).unwrap(), "value");
        assert_eq!(interpolate_with("cost $$5 $x", env).unwrap(), "cost $5 $x");
        let err = interpolate_with("${UNSET}", env).unwrap_err();
        assert!(err.contains("UNSET"), "{err}");
        assert!(interpolate_with("${OPEN", env).is_err());
        assert!(interpolate_with("${BAD NAME}", env).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("16MiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 20));
        assert_eq!("100MB".parse::<ByteSize>().unwrap(), ByteSize(100_000_000));
        assert_eq!("1.5 KiB".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert_eq!("42".parse::<ByteSize>().unwrap(), ByteSize(42));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(32 << 20).to_string(), "32MiB");
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret} {secret:?}"), "*** \"***\"");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"***\"");
        assert_eq!(secret.expose(), "hunter2");
    }
}
