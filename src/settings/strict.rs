//! Strict reading of the layered settings tree into the raw types.
//!
//! The `config` crate's own deserializer converts between kinds: a float
//! in an integer key is rounded (`drain_secs = 1.5` becomes 2, a Discord
//! id written as a float becomes another id), `true` becomes 1, a number
//! becomes a string. This deserializer reads the same merged tree and
//! converts nothing but the environment's text: an integer key takes a
//! TOML integer or an environment value that is an integer; a float key a
//! number; a boolean key a TOML boolean or `true`/`false` (also
//! `on`/`off`, `yes`/`no`, `1`/`0`) from the environment; a string key a
//! string. Anything else is an error naming the key (`daemon.drain_secs`,
//! `adapters.discord.moderators[0]`) and where the value came from.

use std::fmt;

use config::{Value, ValueKind};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// A settings value that does not fit its key.
#[derive(Debug)]
pub struct ValueError {
    /// Dotted path of the key (`daemon.drain_secs`, `jobs.schedules[0].cron`);
    /// empty for the root.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ValueError {}

impl de::Error for ValueError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self { key: String::new(), message: msg.to_string() }
    }
}

impl ValueError {
    /// The same error one level up: `segment` is a key or `[index]`.
    fn under(mut self, segment: &str) -> Self {
        self.key = match (self.key.is_empty(), self.key.starts_with('[')) {
            (true, _) => segment.to_string(),
            (false, true) => format!("{segment}{}", self.key),
            (false, false) => format!("{segment}.{}", self.key),
        };
        self
    }
}

/// Deserialises `value` (the merged settings tree) into `T` strictly.
///
/// Errors: [`ValueError`] naming the key at fault.
pub fn deserialize<T: DeserializeOwned>(value: Value) -> Result<T, ValueError> {
    T::deserialize(Strict(value))
}

/// One node of the tree.
struct Strict(Value);

/// How a value is described in an error.
fn describe(kind: &ValueKind) -> String {
    match kind {
        ValueKind::Nil => "nothing".into(),
        ValueKind::Boolean(b) => format!("the boolean {b}"),
        ValueKind::I64(i) => format!("the integer {i}"),
        ValueKind::I128(i) => format!("the integer {i}"),
        ValueKind::U64(i) => format!("the integer {i}"),
        ValueKind::U128(i) => format!("the integer {i}"),
        ValueKind::Float(x) => format!("the number {x:?}"),
        ValueKind::String(s) => format!("the string {s:?}"),
        ValueKind::Table(_) => "a table".into(),
        ValueKind::Array(_) => "a list".into(),
    }
}

impl Strict {
    fn is_from_environment(&self) -> bool {
        self.0.origin() == Some("the environment")
    }

    fn wrong(&self, expected: &str) -> ValueError {
        let origin = self.0.origin().map(|o| format!(" (in {o})")).unwrap_or_default();
        de::Error::custom(format!("expected {expected}, found {}{origin}", describe(&self.0.kind)))
    }

    fn integer<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::I64(i) => visitor.visit_i64(i),
            ValueKind::U64(i) => visitor.visit_u64(i),
            ValueKind::I128(i) => visitor.visit_i128(i),
            ValueKind::U128(i) => visitor.visit_u128(i),
            ValueKind::String(ref s) if self.is_from_environment() => match (s.trim().parse::<i64>(), s.trim().parse::<u64>()) {
                (Ok(i), _) => visitor.visit_i64(i),
                (_, Ok(i)) => visitor.visit_u64(i),
                _ => Err(self.wrong("an integer")),
            },
            _ => Err(self.wrong("an integer")),
        }
    }

    fn float<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::Float(x) => visitor.visit_f64(x),
            ValueKind::I64(i) => visitor.visit_f64(i as f64),
            ValueKind::U64(i) => visitor.visit_f64(i as f64),
            ValueKind::String(ref s) if self.is_from_environment() => match s.trim().parse::<f64>() {
                Ok(x) => visitor.visit_f64(x),
                Err(_) => Err(self.wrong("a number")),
            },
            _ => Err(self.wrong("a number")),
        }
    }
}

impl<'de> de::Deserializer<'de> for Strict {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::Nil => visitor.visit_unit(),
            ValueKind::Boolean(b) => visitor.visit_bool(b),
            ValueKind::I64(i) => visitor.visit_i64(i),
            ValueKind::I128(i) => visitor.visit_i128(i),
            ValueKind::U64(i) => visitor.visit_u64(i),
            ValueKind::U128(i) => visitor.visit_u128(i),
            ValueKind::Float(x) => visitor.visit_f64(x),
            ValueKind::String(s) => visitor.visit_string(s),
            ValueKind::Array(values) => visitor.visit_seq(Seq { values: values.into_iter().enumerate() }),
            ValueKind::Table(table) => visitor.visit_map(Map::new(table)),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::Boolean(b) => visitor.visit_bool(b),
            ValueKind::String(ref s) if self.is_from_environment() => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "on" | "yes" | "1" => visitor.visit_bool(true),
                "false" | "off" | "no" | "0" => visitor.visit_bool(false),
                _ => Err(self.wrong("true or false")),
            },
            _ => Err(self.wrong("true or false")),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.integer(visitor)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.float(visitor)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.float(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_string(visitor)
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_string(visitor)
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::String(s) => visitor.visit_string(s),
            _ => Err(self.wrong("a string")),
        }
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::Nil => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::Nil => visitor.visit_unit(),
            _ => Err(self.wrong("nothing")),
        }
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_unit(visitor)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::Array(values) => visitor.visit_seq(Seq { values: values.into_iter().enumerate() }),
            _ => Err(self.wrong("a list")),
        }
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::Table(table) => visitor.visit_map(Map::new(table)),
            _ => Err(self.wrong("a table")),
        }
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        match self.0.kind {
            ValueKind::String(s) => visitor.visit_enum(IntoDeserializer::<ValueError>::into_deserializer(s)),
            _ => Err(self.wrong("a string")),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_any(visitor)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_any(visitor)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        visitor.visit_unit()
    }
}

/// A list's elements; an element's error is named by its index.
struct Seq {
    values: std::iter::Enumerate<std::vec::IntoIter<Value>>,
}

impl<'de> de::SeqAccess<'de> for Seq {
    type Error = ValueError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, ValueError> {
        match self.values.next() {
            Some((index, value)) => {
                seed.deserialize(Strict(value)).map(Some).map_err(|e| e.under(&format!("[{index}]")))
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.values.len())
    }
}

/// A table's entries; a value's error is named by its key.
struct Map {
    entries: std::vec::IntoIter<(String, Value)>,
    /// The entry whose key was just read.
    value: Option<(String, Value)>,
}

impl Map {
    fn new(table: config::Map<String, Value>) -> Self {
        Self { entries: table.into_iter().collect::<Vec<_>>().into_iter(), value: None }
    }
}

impl<'de> de::MapAccess<'de> for Map {
    type Error = ValueError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, ValueError> {
        match self.entries.next() {
            Some((key, value)) => {
                let read = seed.deserialize(IntoDeserializer::<ValueError>::into_deserializer(key.clone()));
                self.value = Some((key, value));
                read.map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, ValueError> {
        let (key, value) = self.value.take().ok_or_else(|| de::Error::custom("a value without its key"))?;
        seed.deserialize(Strict(value)).map_err(|e| e.under(&key))
    }
}
