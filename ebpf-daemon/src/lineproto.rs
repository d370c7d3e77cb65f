//! Line-protocol points and their encoding (DataKit parses with influxdb1-client `models`).
//! INTERFACE STUB: the types below are the contract between modules; the helper fills in bodies.

/// A field value. Every numeric field the reference emits is a signed integer.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
    Str(String),
}

/// One point: measurement, tags (in insertion order), fields, timestamp in ns since the epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub measurement: String,
    pub tags: Vec<(String, String)>,
    pub fields: Vec<(String, Field)>,
    pub timestamp_ns: i64,
}
