//! Typed front matter values and the checks that serde's derive cannot express.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::duration::{parse_duration, DurationError};

/// Network access of a sandbox (key `network`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkSetting {
    /// No network interface at all (`network: off` or `network: false`).
    Off,
    /// Unrestricted outbound access (`network: on` or `network: true`).
    On,
    /// Outbound access limited by rules (`network: {allow: [...], deny: [...]}`).
    Rules(NetworkRules),
}

/// Destinations a sandbox may or may not reach, as host names, IP addresses or CIDR ranges.
///
/// Both lists are kept as written, and the executor decides how to resolve and enforce them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkRules {
    /// Destinations the sandbox may reach. When empty, any destination that is not denied.
    pub allow: Vec<String>,
    /// Destinations the sandbox may not reach, even when allowed.
    pub deny: Vec<String>,
}

impl<'de> Deserialize<'de> for NetworkSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NetworkVisitor)
    }
}

struct NetworkVisitor;

impl<'de> Visitor<'de> for NetworkVisitor {
    type Value = NetworkSetting;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("`off`, `on`, or a mapping with `allow` and `deny` lists")
    }

    fn visit_bool<E: de::Error>(self, enabled: bool) -> Result<NetworkSetting, E> {
        Ok(if enabled {
            NetworkSetting::On
        } else {
            NetworkSetting::Off
        })
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<NetworkSetting, E> {
        match text {
            "on" => Ok(NetworkSetting::On),
            "off" => Ok(NetworkSetting::Off),
            _ => Err(E::invalid_value(de::Unexpected::Str(text), &self)),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<NetworkSetting, A::Error> {
        let rules = NetworkRules::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(NetworkSetting::Rules(rules))
    }
}

/// A string that is not empty or blank.
pub(super) struct NonEmptyString(pub String);

impl<'de> Deserialize<'de> for NonEmptyString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim().is_empty() {
            return Err(de::Error::custom("the value is empty"));
        }
        Ok(Self(text))
    }
}

/// An absolute path in the guest.
pub(super) struct AbsolutePath(pub String);

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        if !path.starts_with('/') {
            return Err(de::Error::custom(format!(
                "`{path}` is not an absolute path"
            )));
        }
        Ok(Self(path))
    }
}

/// A step time limit: a duration string such as `90s`, more than zero.
pub(super) struct Timeout(pub Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TimeoutVisitor)
    }
}

struct TimeoutVisitor;

impl Visitor<'_> for TimeoutVisitor {
    type Value = Timeout;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a duration such as `90s` or `1h30m`")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Timeout, E> {
        parse_timeout(text).map(Timeout).map_err(E::custom)
    }

    // YAML reads `timeout: 90` as a number, so the error names the missing unit.
    fn visit_u64<E: de::Error>(self, number: u64) -> Result<Timeout, E> {
        Err(E::custom(DurationError::MissingUnit(number.to_string())))
    }
}

/// Parses a step time limit, which must be more than zero.
pub(crate) fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text).map_err(|error| error.to_string())?;
    if duration.is_zero() {
        return Err(format!(
            "a timeout of `{}` would stop every step at once",
            text.trim()
        ));
    }
    Ok(duration)
}

/// A list of strings that may be written as a single string.
pub(super) struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

struct OneOrManyVisitor;

impl<'de> Visitor<'de> for OneOrManyVisitor {
    type Value = OneOrMany;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string or a list of strings")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<OneOrMany, E> {
        Ok(OneOrMany(vec![text.to_owned()]))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<OneOrMany, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = sequence.next_element::<String>()? {
            items.push(item);
        }
        Ok(OneOrMany(items))
    }
}

/// Environment variables: names checked, scalar values turned into strings.
pub(super) struct Env(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Env {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, EnvValue>::deserialize(deserializer)?;
        let mut env = BTreeMap::new();
        for (name, EnvValue(value)) in raw {
            if !is_variable_name(&name) {
                return Err(de::Error::custom(format!(
                    "`{name}` is not a valid variable name (letters, digits and `_`, not \
                     starting with a digit)"
                )));
            }
            env.insert(name, value);
        }
        Ok(Self(env))
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    let starts_well = chars
        .next()
        .is_some_and(|first| first == '_' || first.is_ascii_alphabetic());
    starts_well && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// One environment value. YAML reads `PORT: 8080` as a number, which the guest needs as text.
struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(EnvValueVisitor)
    }
}

struct EnvValueVisitor;

impl Visitor<'_> for EnvValueVisitor {
    type Value = EnvValue;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string, number or boolean")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<EnvValue, E> {
        Ok(EnvValue(text.to_owned()))
    }

    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<EnvValue, E> {
        Ok(EnvValue(flag.to_string()))
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<EnvValue, E> {
        Ok(EnvValue(number.to_string()))
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<EnvValue, E> {
        Ok(EnvValue(number.to_string()))
    }

    fn visit_f64<E: de::Error>(self, number: f64) -> Result<EnvValue, E> {
        Ok(EnvValue(number.to_string()))
    }
}
