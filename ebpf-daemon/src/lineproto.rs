//! Line-protocol points and their encoding (DataKit parses with influxdb1-client `models`).
//!
//! The encoder never produces a line DataKit would reject: one bad line makes DataKit drop the
//! whole request (contract §4.3), so anything LP cannot carry is cleaned up or left out here.
//!
//! Rules, in the order they are applied:
//! - CR and LF in the measurement, keys and tag values become a space (LP has no escape for them).
//! - Dots in tag and field keys become `_` (the reference does this; DataKit leaves dots in
//!   `network` keys as they are).
//! - Keys are cut to [`MAX_KEY_LEN`] bytes and tag values to [`MAX_TAG_VALUE_LEN`] bytes, at a char
//!   boundary (DataKit's own limits).
//! - A run of backslashes that ends the text, or stands right before a character that gets
//!   escaped, is removed: the parser would read it as escaping the separator or the escape itself.
//!   Other backslashes are kept as they are.
//! - Tags with an empty key or value are left out (LP cannot carry an empty tag value); fields with
//!   an empty key and non-finite floats are left out.
//! - When a key is given twice, the last value wins. When a key is both a tag and a field, the
//!   field is kept and the tag dropped: fields carry the data, and DataKit refuses the overlap.
//! - Tags are written sorted by key (influx convention; stable output); fields in insertion order.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Longest key (tag or field) DataKit accepts, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Longest tag value DataKit keeps, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 1024;

/// A field value. Every numeric field the reference emits is a signed integer.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Int(i64),
    #[cfg_attr(not(test), expect(dead_code, reason = "used by the network plugins"))]
    Uint(u64),
    #[cfg_attr(not(test), expect(dead_code, reason = "used by the network plugins"))]
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

/// Why a point could not be encoded; the caller counts and skips it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// No field is left once invalid ones are removed (LP needs at least one).
    #[error("point has no valid field")]
    NoFields,
    /// The measurement is empty once cleaned up.
    #[error("point has an empty measurement")]
    EmptyMeasurement,
}

impl Point {
    /// A point with no tags and no fields yet.
    pub fn new(measurement: impl Into<String>, timestamp_ns: i64) -> Self {
        Self {
            measurement: measurement.into(),
            tags: Vec::new(),
            fields: Vec::new(),
            timestamp_ns,
        }
    }

    /// Adds a tag (builder style). A later tag with the same key wins at encoding time.
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.push((key.into(), value.into()));
        self
    }

    /// Adds a field (builder style). A later field with the same key wins at encoding time.
    pub fn field(mut self, key: impl Into<String>, value: Field) -> Self {
        self.fields.push((key.into(), value));
        self
    }

    #[cfg_attr(not(test), expect(dead_code, reason = "used by the network plugins"))]
    /// Sets a tag, replacing the value of an existing tag with the same key.
    pub fn set_tag(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self.tags.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.tags.push((key, value)),
        }
    }

    /// Appends this point as one line (no trailing newline) to `out`.
    ///
    /// On error `out` is left unchanged.
    pub fn encode(&self, out: &mut String) -> Result<(), EncodeError> {
        let measurement = clean(&self.measurement, usize::MAX, false, MEASUREMENT_SPECIAL);
        if measurement.is_empty() {
            return Err(EncodeError::EmptyMeasurement);
        }

        // Fields first: a point without fields must leave `out` untouched.
        let mut fields: Vec<(Cow<'_, str>, &Field)> = Vec::with_capacity(self.fields.len());
        for (k, v) in &self.fields {
            if let Field::Float(f) = v
                && !f.is_finite()
            {
                continue;
            }
            let key = clean(k, MAX_KEY_LEN, true, KEY_SPECIAL);
            if key.is_empty() {
                continue;
            }
            match fields.iter_mut().find(|(fk, _)| *fk == key) {
                Some(slot) => slot.1 = v,
                None => fields.push((key, v)),
            }
        }
        if fields.is_empty() {
            return Err(EncodeError::NoFields);
        }

        let mut tags: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::with_capacity(self.tags.len());
        for (k, v) in &self.tags {
            let key = clean(k, MAX_KEY_LEN, true, KEY_SPECIAL);
            let value = clean(v, MAX_TAG_VALUE_LEN, false, KEY_SPECIAL);
            if key.is_empty() || value.is_empty() || fields.iter().any(|(fk, _)| *fk == key) {
                continue;
            }
            match tags.iter_mut().find(|(tk, _)| *tk == key) {
                Some(slot) => slot.1 = value,
                None => tags.push((key, value)),
            }
        }
        tags.sort_by(|a, b| a.0.cmp(&b.0));

        escape_into(out, &measurement, MEASUREMENT_SPECIAL);
        for (k, v) in &tags {
            out.push(',');
            escape_into(out, k, KEY_SPECIAL);
            out.push('=');
            escape_into(out, v, KEY_SPECIAL);
        }
        for (i, (k, v)) in fields.iter().enumerate() {
            out.push(if i == 0 { ' ' } else { ',' });
            escape_into(out, k, KEY_SPECIAL);
            out.push('=');
            write_field_value(out, v);
        }
        // Writing to a String cannot fail.
        let _ = write!(out, " {}", self.timestamp_ns);
        Ok(())
    }
}

/// Appends the valid points of `points` to `out`, one line each, lines joined by `\n`.
///
/// Returns how many points were skipped as invalid.
pub fn encode_batch(points: &[Point], out: &mut String) -> usize {
    let mut skipped = 0;
    for p in points {
        let mark = out.len();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        if p.encode(out).is_err() {
            out.truncate(mark);
            skipped += 1;
        }
    }
    skipped
}

/// Characters escaped with a backslash in the measurement.
const MEASUREMENT_SPECIAL: &[char] = &[',', ' '];
/// Characters escaped with a backslash in tag keys, tag values and field keys.
const KEY_SPECIAL: &[char] = &[',', '=', ' '];

/// Applies the clean-up rules (see the module docs) to a measurement, key or tag value, before
/// escaping. Borrows when nothing needs changing, which is the common case.
fn clean<'a>(s: &'a str, max_len: usize, is_key: bool, special: &[char]) -> Cow<'a, str> {
    let needs_work = s.len() > max_len
        || s.bytes()
            .any(|b| b == b'\n' || b == b'\r' || b == b'\\' || (is_key && b == b'.'));
    if !needs_work {
        return Cow::Borrowed(s);
    }

    let mut text: String = s
        .chars()
        .map(|c| match c {
            '\n' | '\r' => ' ',
            '.' if is_key => '_',
            c => c,
        })
        .collect();
    if text.len() > max_len {
        let mut cut = max_len;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    if !text.contains('\\') {
        return Cow::Owned(text);
    }

    // Drop each backslash run followed by the end or by a character that will be escaped.
    let mut result = String::with_capacity(text.len());
    let mut run = 0usize;
    for c in text.chars() {
        if c == '\\' {
            run += 1;
            continue;
        }
        if !special.contains(&c) {
            result.extend(std::iter::repeat_n('\\', run));
        }
        run = 0;
        result.push(c);
    }
    Cow::Owned(result)
}

fn escape_into(out: &mut String, s: &str, special: &[char]) {
    for c in s.chars() {
        if special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

fn write_field_value(out: &mut String, v: &Field) {
    // Writing to a String cannot fail.
    let _ = match v {
        Field::Int(i) => write!(out, "{i}i"),
        Field::Uint(u) => write!(out, "{u}u"),
        // Display is the shortest representation that round-trips, never in exponent form.
        Field::Float(f) => write!(out, "{f}"),
        Field::Bool(b) => write!(out, "{b}"),
        Field::Str(s) => {
            out.push('"');
            for c in s.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
            Ok(())
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(p: &Point) -> String {
        let mut s = String::new();
        p.encode(&mut s).expect("encodes");
        s
    }

    fn one(f: Field) -> String {
        line(&Point::new("m", 1).field("f", f))
    }

    #[test]
    fn netflow_point_exact_line() {
        let p = Point::new("netflow", 1_700_000_000_123_456_789)
            .tag("host", "node-1")
            .tag("status", "info")
            .tag("src_ip", "10.0.0.1")
            .tag("dst_ip", "10.0.0.2")
            .tag("src_port", "*")
            .tag("dst_port", "443")
            .tag("transport", "tcp")
            .tag("family", "IPv4")
            .tag("direction", "outgoing")
            .tag("process_name", "")
            .tag("src_ip_type", "other")
            .tag("dst_ip_type", "other")
            .tag("source", "netflow")
            .tag("k8s.pod.name", "web 1,a=b")
            .field("bytes_read", Field::Int(1024))
            .field("bytes_written", Field::Int(2048))
            .field("retransmits", Field::Int(0))
            .field("rtt", Field::Int(1500))
            .field("rtt_var", Field::Int(250))
            .field("tcp_closed", Field::Int(1))
            .field("tcp_established", Field::Int(1));
        assert_eq!(
            line(&p),
            "netflow,direction=outgoing,dst_ip=10.0.0.2,dst_ip_type=other,dst_port=443,\
             family=IPv4,host=node-1,k8s_pod_name=web\\ 1\\,a\\=b,source=netflow,src_ip=10.0.0.1,\
             src_ip_type=other,src_port=*,status=info,transport=tcp \
             bytes_read=1024i,bytes_written=2048i,retransmits=0i,rtt=1500i,rtt_var=250i,\
             tcp_closed=1i,tcp_established=1i 1700000000123456789"
        );
    }

    #[test]
    fn field_types() {
        assert_eq!(one(Field::Int(42)), "m f=42i 1");
        assert_eq!(one(Field::Int(-7)), "m f=-7i 1");
        assert_eq!(one(Field::Uint(u64::MAX)), "m f=18446744073709551615u 1");
        assert_eq!(one(Field::Float(3.25)), "m f=3.25 1");
        assert_eq!(one(Field::Float(1.0)), "m f=1 1");
        assert_eq!(one(Field::Float(0.1)), "m f=0.1 1");
        assert_eq!(one(Field::Float(1e-7)), "m f=0.0000001 1");
        assert_eq!(one(Field::Bool(true)), "m f=true 1");
        assert_eq!(one(Field::Bool(false)), "m f=false 1");
        assert_eq!(one(Field::Str("hi".into())), "m f=\"hi\" 1");
        assert_eq!(one(Field::Str(String::new())), "m f=\"\" 1");
    }

    #[test]
    fn float_round_trips() {
        for f in [0.1 + 0.2, f64::MIN_POSITIVE, f64::MAX, -1.5e300, 123456.789] {
            let s = one(Field::Float(f));
            let v = s.strip_prefix("m f=").unwrap().strip_suffix(" 1").unwrap();
            assert_eq!(v.parse::<f64>().unwrap(), f, "{v}");
        }
    }

    #[test]
    fn non_finite_floats_are_left_out() {
        let p = Point::new("m", 1)
            .field("nan", Field::Float(f64::NAN))
            .field("inf", Field::Float(f64::INFINITY))
            .field("ninf", Field::Float(f64::NEG_INFINITY))
            .field("ok", Field::Int(1));
        assert_eq!(line(&p), "m ok=1i 1");
        let only_nan = Point::new("m", 1).field("nan", Field::Float(f64::NAN));
        let mut out = String::from("keep");
        assert_eq!(only_nan.encode(&mut out), Err(EncodeError::NoFields));
        assert_eq!(out, "keep");
    }

    #[test]
    fn no_fields_is_an_error() {
        let mut out = String::new();
        let p = Point::new("m", 1).tag("a", "b");
        assert_eq!(p.encode(&mut out), Err(EncodeError::NoFields));
        let p = Point::new("m", 1).field("", Field::Int(1));
        assert_eq!(p.encode(&mut out), Err(EncodeError::NoFields));
        assert!(out.is_empty());
    }

    #[test]
    fn empty_measurement_is_an_error() {
        let mut out = String::new();
        for m in ["", "\\", "\\\\"] {
            let p = Point::new(m, 1).field("f", Field::Int(1));
            assert_eq!(p.encode(&mut out), Err(EncodeError::EmptyMeasurement));
        }
        assert!(out.is_empty());
    }

    #[test]
    fn measurement_escaping() {
        let p = Point::new("my m,x=y\nz\r", 1).field("f", Field::Int(1));
        // `=` needs no escape in a measurement.
        assert_eq!(line(&p), "my\\ m\\,x=y\\ z\\  f=1i 1");
        let p = Point::new("a.b\\", 1).field("f", Field::Int(1));
        assert_eq!(line(&p), "a.b f=1i 1");
    }

    #[test]
    fn tag_and_field_key_escaping() {
        let p = Point::new("m", 1)
            .tag("k ,=", "v ,=")
            .field("f ,=", Field::Str("s ,=".into()));
        assert_eq!(line(&p), "m,k\\ \\,\\==v\\ \\,\\= f\\ \\,\\==\"s ,=\" 1");
    }

    #[test]
    fn string_field_special_characters() {
        let s = "line1\nline2\t\"quoted\" back\\slash\r";
        assert_eq!(
            one(Field::Str(s.into())),
            "m f=\"line1\nline2\t\\\"quoted\\\" back\\\\slash\r\" 1"
        );
        assert_eq!(one(Field::Str("\\".into())), "m f=\"\\\\\" 1");
        assert_eq!(one(Field::Str("\"".into())), "m f=\"\\\"\" 1");
    }

    #[test]
    fn newlines_in_names_and_tag_values_become_spaces() {
        let p = Point::new("m", 1)
            .tag("a\nb", "x\r\ny")
            .field("c\nd", Field::Int(1));
        assert_eq!(line(&p), "m,a\\ b=x\\ \\ y c\\ d=1i 1");
    }

    #[test]
    fn trailing_backslashes_are_removed() {
        let p = Point::new("m", 1)
            .tag("path", "C:\\dir\\")
            .tag("k\\", "v\\\\\\")
            .field("f", Field::Int(1));
        assert_eq!(line(&p), "m,k=v,path=C:\\dir f=1i 1");
        // A value made only of backslashes ends up empty, so the tag is left out.
        let p = Point::new("m", 1)
            .tag("a", "\\\\")
            .field("f", Field::Int(1));
        assert_eq!(line(&p), "m f=1i 1");
    }

    #[test]
    fn backslash_before_escaped_char_is_removed() {
        // `a\,b` written as `a\\,b` would end the value at the comma.
        let p = Point::new("m", 1)
            .tag("t", "a\\,b")
            .tag("u", "x\\\\ y")
            .tag("w", "keep\\n")
            .field("f", Field::Int(1));
        assert_eq!(line(&p), "m,t=a\\,b,u=x\\ y,w=keep\\n f=1i 1");
        // A newline turned into a space is escaped, so a backslash before it goes too.
        let p = Point::new("m", 1)
            .tag("t", "a\\\nb")
            .field("f", Field::Int(1));
        assert_eq!(line(&p), "m,t=a\\ b f=1i 1");
    }

    #[test]
    fn empty_tags_are_left_out() {
        let p = Point::new("m", 1)
            .tag("empty", "")
            .tag("", "nokey")
            .tag("ok", "1")
            .field("f", Field::Int(1));
        assert_eq!(line(&p), "m,ok=1 f=1i 1");
    }

    #[test]
    fn dots_in_keys_become_underscores() {
        let p = Point::new("m.x", 1)
            .tag("k8s.pod", "a.b")
            .field("x.y", Field::Str("1.2".into()));
        assert_eq!(line(&p), "m.x,k8s_pod=a.b x_y=\"1.2\" 1");
    }

    #[test]
    fn tags_sorted_and_last_duplicate_wins() {
        let p = Point::new("m", 1)
            .tag("b", "2")
            .tag("a", "1")
            .tag("c", "3")
            .tag("b", "22")
            .tag("a_x", "dot-1")
            .tag("a.x", "dot-2")
            .field("z", Field::Int(1))
            .field("y", Field::Int(2))
            .field("z", Field::Int(3));
        assert_eq!(line(&p), "m,a=1,a_x=dot-2,b=22,c=3 z=3i,y=2i 1");
    }

    #[test]
    fn set_tag_replaces() {
        let mut p = Point::new("m", 1).tag("a", "1").field("f", Field::Int(1));
        p.set_tag("a", "2");
        p.set_tag("b", "3");
        assert_eq!(p.tags.len(), 2);
        assert_eq!(line(&p), "m,a=2,b=3 f=1i 1");
    }

    #[test]
    fn key_both_tag_and_field_keeps_field() {
        let p = Point::new("m", 1)
            .tag("pid", "123")
            .tag("x.y", "tag")
            .tag("other", "o")
            .field("pid", Field::Str("123".into()))
            .field("x_y", Field::Int(5));
        assert_eq!(line(&p), "m,other=o pid=\"123\",x_y=5i 1");
    }

    #[test]
    fn unicode_passes_through() {
        let p = Point::new("测量 m", 1)
            .tag("主机", "节点 一,二")
            .tag("emoji", "🚀")
            .field("字段", Field::Str("值 \"引号\"".into()));
        assert_eq!(
            line(&p),
            "测量\\ m,emoji=🚀,主机=节点\\ 一\\,二 字段=\"值 \\\"引号\\\"\" 1"
        );
    }

    #[test]
    fn long_tag_values_and_keys_are_cut_at_char_boundary() {
        // 3-byte chars: 1024 is not a multiple of 3, so the cut falls back to 1023 bytes.
        let value = "é".repeat(600); // 2 bytes each: cut exactly at 1024
        let value3 = "中".repeat(400); // 3 bytes each: cut at 1023
        let key = "k".repeat(300);
        let p = Point::new("m", 1)
            .tag("a", value.clone())
            .tag("b", value3)
            .tag(key.clone(), "v")
            .field(key.clone(), Field::Int(1))
            .field("g", Field::Int(1));
        let l = line(&p);
        let cut_key = "k".repeat(256);
        let expected = format!(
            "m,a={},b={} {cut_key}=1i,g=1i 1",
            "é".repeat(512),
            "中".repeat(341)
        );
        // The tag with the long key collides with the (cut) field key and is dropped.
        assert_eq!(l, expected);
    }

    #[test]
    fn tag_value_exactly_at_limit_is_kept() {
        let v = "x".repeat(MAX_TAG_VALUE_LEN);
        let p = Point::new("m", 1)
            .tag("t", v.clone())
            .field("f", Field::Int(1));
        assert_eq!(line(&p), format!("m,t={v} f=1i 1"));
    }

    #[test]
    fn negative_timestamp() {
        let p = Point::new("m", -5).field("f", Field::Int(1));
        assert_eq!(line(&p), "m f=1i -5");
    }

    #[test]
    fn batch_skips_invalid_and_joins_with_newlines() {
        let points = vec![
            Point::new("a", 1).field("f", Field::Int(1)),
            Point::new("bad", 2),
            Point::new("b", 3).field("f", Field::Str("x\ny".into())),
            Point::new("", 4).field("f", Field::Int(1)),
        ];
        let mut out = String::new();
        assert_eq!(encode_batch(&points, &mut out), 2);
        assert_eq!(out, "a f=1i 1\nb f=\"x\ny\" 3");

        let mut out = String::new();
        assert_eq!(encode_batch(&points[1..2], &mut out), 1);
        assert_eq!(out, "");
        assert_eq!(encode_batch(&[], &mut out), 0);
        assert_eq!(out, "");
    }
}
