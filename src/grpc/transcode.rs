//! JSON <-> protobuf: the upstream speaks JSON, the gRPC API typed messages. `Fields` takes the
//! typed fields out of an upstream object one by one; what is left becomes the message's
//! `extra` Struct, so nothing the upstream said is lost. Requests go the other way: typed
//! fields set over the caller's `extra`.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value as PbValue};
use serde_json::{Map, Number, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn to_pb_value(v: Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_pb_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    PbValue { kind: Some(kind) }
}

pub fn to_struct(map: Map<String, Value>) -> Struct {
    Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_pb_value(v))).collect(),
    }
}

pub fn from_pb_value(v: PbValue) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => number(n),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(from_pb_value).collect()),
        Some(Kind::StructValue(s)) => Value::Object(from_struct(s)),
    }
}

/// Protobuf numbers are doubles; whole ones go back as JSON integers (a `limit` of 10, not 10.0).
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

pub fn from_struct(s: Struct) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, from_pb_value(v)))
        .collect()
}

/// An optional request Struct as a JSON object (absent: empty).
pub fn object(s: Option<Struct>) -> Map<String, Value> {
    s.map(from_struct).unwrap_or_default()
}

pub fn parse_time(text: &str) -> Option<Timestamp> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let nanos = t.unix_timestamp_nanos();
    Some(Timestamp {
        seconds: nanos.div_euclid(1_000_000_000) as i64,
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    })
}

/// A timestamp as the upstream writes it (RFC 3339, UTC); `None` when out of range.
pub fn format_time(t: &Timestamp) -> Option<String> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

pub fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// An upstream JSON object, from which typed fields are taken.
pub struct Fields(Map<String, Value>);

impl Fields {
    pub fn new(v: Value) -> Fields {
        match v {
            Value::Object(map) => Fields(map),
            _ => Fields(Map::new()),
        }
    }

    /// A string field ("" when absent or null); numbers and booleans are written out.
    pub fn string(&mut self, key: &str) -> String {
        match self.0.remove(key) {
            Some(Value::String(s)) => s,
            Some(Value::Null) | None => String::new(),
            Some(other @ (Value::Number(_) | Value::Bool(_))) => other.to_string(),
            Some(other) => {
                // Not a string: leave it in `extra` rather than lose it.
                self.0.insert(key.to_string(), other);
                String::new()
            }
        }
    }

    pub fn strings(&mut self, key: &str) -> Vec<String> {
        match self.0.remove(key) {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect(),
            Some(Value::Null) | None => Vec::new(),
            Some(other) => {
                self.0.insert(key.to_string(), other);
                Vec::new()
            }
        }
    }

    pub fn time(&mut self, key: &str) -> Option<Timestamp> {
        let parsed = self.0.get(key)?.as_str().and_then(parse_time);
        if parsed.is_some() || self.0.get(key).is_some_and(Value::is_null) {
            self.0.remove(key);
        }
        parsed
    }

    pub fn object(&mut self, key: &str) -> Option<Struct> {
        match self.0.remove(key) {
            Some(Value::Object(map)) => Some(to_struct(map)),
            Some(Value::Null) | None => None,
            Some(other) => {
                self.0.insert(key.to_string(), other);
                None
            }
        }
    }

    /// A nested object as `Fields` of its own (absent: `None`).
    pub fn nested(&mut self, key: &str) -> Option<Fields> {
        match self.0.remove(key) {
            Some(Value::Object(map)) => Some(Fields(map)),
            Some(Value::Null) | None => None,
            Some(other) => {
                self.0.insert(key.to_string(), other);
                None
            }
        }
    }

    pub fn boolean(&mut self, key: &str) -> bool {
        match self.0.remove(key) {
            Some(Value::Bool(b)) => b,
            Some(Value::Null) | None => false,
            Some(other) => {
                self.0.insert(key.to_string(), other);
                false
            }
        }
    }

    pub fn integer(&mut self, key: &str) -> i64 {
        match self.0.remove(key) {
            Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or(0),
            Some(Value::Null) | None => 0,
            Some(other) => {
                self.0.insert(key.to_string(), other);
                0
            }
        }
    }

    /// A field as it is (absent or null: `None`).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key).filter(|v| !v.is_null())
    }

    /// What is left, as the message's `extra`.
    pub fn extra(self) -> Option<Struct> {
        Some(to_struct(self.0))
    }
}

/// A request body: the caller's `extra` with the typed fields set over it.
#[derive(Default)]
pub struct Body(pub Map<String, Value>);

impl Body {
    pub fn over(extra: Option<Struct>) -> Body {
        Body(object(extra))
    }

    pub fn set(&mut self, key: &str, v: impl Into<Value>) -> &mut Self {
        self.0.insert(key.to_string(), v.into());
        self
    }

    /// Sets a string only when it is not empty (an unset proto3 string).
    pub fn text(&mut self, key: &str, v: String) -> &mut Self {
        if !v.is_empty() {
            self.0.insert(key.to_string(), Value::String(v));
        }
        self
    }

    pub fn list(&mut self, key: &str, v: Vec<String>) -> &mut Self {
        if !v.is_empty() {
            self.0.insert(key.to_string(), v.into());
        }
        self
    }

    pub fn object(&mut self, key: &str, v: Option<Struct>) -> &mut Self {
        if let Some(s) = v {
            self.0
                .insert(key.to_string(), Value::Object(from_struct(s)));
        }
        self
    }

    pub fn time(&mut self, key: &str, v: Option<&Timestamp>) -> &mut Self {
        if let Some(t) = v.and_then(format_time) {
            self.0.insert(key.to_string(), Value::String(t));
        }
        self
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_survives_the_round_trip_through_struct() {
        let v = json!({"a": 1, "b": [true, null, "x", 2.5], "c": {"d": {}}});
        let Value::Object(map) = v.clone() else {
            unreachable!()
        };
        assert_eq!(Value::Object(from_struct(to_struct(map))), v);
    }

    #[test]
    fn typed_fields_leave_the_rest_in_extra() {
        let mut f = Fields::new(
            json!({"id": "x", "tags": ["a"], "created": "2026-01-02T03:04:05.5+00:00", "other": 3}),
        );
        assert_eq!(f.string("id"), "x");
        assert_eq!(f.strings("tags"), vec!["a"]);
        let t = f.time("created").unwrap();
        assert_eq!((t.seconds % 60, t.nanos), (5, 500_000_000));
        let extra = f.extra().unwrap();
        assert_eq!(extra.fields.len(), 1);
        assert!(extra.fields.contains_key("other"));
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        let t = parse_time("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(format_time(&t).unwrap(), "2026-01-02T03:04:05Z");
    }
}
