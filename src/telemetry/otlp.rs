//! Spans in OTLP's protobuf (`ExportTraceServiceRequest`), encoded by hand.
//!
//! The proxy writes one fixed shape of message, so a dozen lines of protobuf wire format do
//! what `prost` and the generated OTLP types would (with `opentelemetry` and its SDK behind
//! them). The tests decode what this writes with `opentelemetry-proto`'s types, so the field
//! numbers are checked against the published schema, not against this file.

use std::borrow::Cow;
use std::sync::Arc;

/// OTLP's `Span.SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server = 2,
    Client = 3,
}

/// An attribute's value (`AnyValue`): the kinds the proxy records.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(Cow<'static, str>),
    /// A string several spans share (the target host).
    Shared(Arc<str>),
    Int(i64),
}

/// A finished span, as plain data.
#[derive(Clone, Debug)]
pub struct SpanData {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Zero for a root span.
    pub parent_span_id: [u8; 8],
    /// Bits 0-7 the W3C trace flags; bits 8 and 9 whether the parent is remote.
    pub flags: u32,
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// OTLP `Status.code` ERROR, else UNSET.
    pub error: bool,
}

/// `Status.code = STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;

/// One `ExportTraceServiceRequest`: one resource (`service.name`, `service.version`), one
/// instrumentation scope, the spans.
pub fn encode(service_name: &str, spans: &[SpanData]) -> Vec<u8> {
    // About what a span takes, so that the buffer rarely grows.
    let mut out = Writer {
        buf: Vec::with_capacity(256 + spans.len() * 512),
    };
    // ExportTraceServiceRequest.resource_spans = 1
    out.message(1, |rs| {
        // ResourceSpans.resource = 1
        rs.message(1, |resource| {
            // Resource.attributes = 1
            key_value(
                resource,
                1,
                "service.name",
                &Value::Text(Cow::Owned(service_name.to_owned())),
            );
            key_value(
                resource,
                1,
                "service.version",
                &Value::Text(Cow::Borrowed(env!("CARGO_PKG_VERSION"))),
            );
        });
        // ResourceSpans.scope_spans = 2
        rs.message(2, |scope_spans| {
            // ScopeSpans.scope = 1: InstrumentationScope name = 1, version = 2
            scope_spans.message(1, |scope| {
                scope.bytes(1, env!("CARGO_PKG_NAME").as_bytes());
                scope.bytes(2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for span in spans {
                // ScopeSpans.spans = 2
                scope_spans.message(2, |s| encode_span(s, span));
            }
        });
    });
    out.buf
}

fn encode_span(s: &mut Writer, span: &SpanData) {
    s.bytes(1, &span.trace_id);
    s.bytes(2, &span.span_id);
    if span.parent_span_id != [0; 8] {
        s.bytes(4, &span.parent_span_id);
    }
    s.bytes(5, span.name.as_bytes());
    s.varint_field(6, span.kind as u64);
    s.fixed64(7, span.start_unix_nanos);
    s.fixed64(8, span.end_unix_nanos);
    for (key, value) in &span.attributes {
        key_value(s, 9, key, value);
    }
    if span.error {
        // Status.code = 3
        s.message(15, |status| status.varint_field(3, STATUS_ERROR));
    }
    s.fixed32(16, span.flags);
}

/// A `KeyValue` (key = 1, value = 2 as an `AnyValue`) in field `field`.
fn key_value(w: &mut Writer, field: u32, key: &str, value: &Value) {
    w.message(field, |kv| {
        kv.bytes(1, key.as_bytes());
        kv.message(2, |any| match value {
            // AnyValue.string_value = 1, int_value = 3
            Value::Text(s) => any.bytes(1, s.as_bytes()),
            Value::Shared(s) => any.bytes(1, s.as_bytes()),
            // int64 is written as the two's complement varint.
            Value::Int(i) => any.varint_field(3, *i as u64),
        });
    });
}

/// Protobuf's wire format, the four field types the message needs.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    #[inline]
    fn varint(&mut self, v: u64) {
        if v < 0x80 {
            // Tags, lengths and most numbers here: one byte.
            self.buf.push(v as u8);
            return;
        }
        let (bytes, n) = varint(v);
        self.buf.extend_from_slice(&bytes[..n]);
    }

    /// The field's number and wire type.
    #[inline]
    fn tag(&mut self, field: u32, wire_type: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire_type));
    }

    #[inline]
    fn varint_field(&mut self, field: u32, v: u64) {
        self.tag(field, 0);
        self.varint(v);
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, 1);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn fixed32(&mut self, field: u32, v: u32) {
        self.tag(field, 5);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A length-delimited field: strings, bytes.
    #[inline]
    fn bytes(&mut self, field: u32, v: &[u8]) {
        self.tag(field, 2);
        self.varint(v.len() as u64);
        self.buf.extend_from_slice(v);
    }

    /// An embedded message, written by `f` in place after a one-byte length. Most messages
    /// here (attributes, values) are shorter than 128 bytes, and their length fits that byte;
    /// a longer one (a span, the batch) moves its bytes up by what the length needs beyond it.
    fn message(&mut self, field: u32, f: impl FnOnce(&mut Writer)) {
        self.tag(field, 2);
        let start = self.buf.len();
        self.buf.push(0);
        f(self);
        let end = self.buf.len();
        let len = end - start - 1;
        if len < 0x80 {
            self.buf[start] = len as u8;
            return;
        }
        let (prefix, n) = varint(len as u64);
        self.buf.resize(end + n - 1, 0);
        self.buf.copy_within(start + 1..end, start + n);
        self.buf[start..start + n].copy_from_slice(&prefix[..n]);
    }
}

/// `v` in protobuf's varint: seven bits a byte, least significant first; the bytes and how many.
fn varint(mut v: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        bytes[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    (bytes, n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        // The examples of the protobuf encoding guide.
        let mut w = Writer::default();
        w.varint(1);
        w.varint(150);
        w.varint(300);
        assert_eq!(w.buf, [0x01, 0x96, 0x01, 0xac, 0x02]);
        let mut w = Writer::default();
        w.varint_field(3, (-1i64) as u64);
        assert_eq!(w.buf.len(), 1 + 10, "a negative int64 takes ten bytes");
    }

    #[test]
    fn nested_messages_are_prefixed_with_their_length_in_as_many_bytes_as_it_needs() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut w = Writer::default();
            w.message(2, |inner| inner.buf.extend_from_slice(&body));
            let (prefix, n) = varint(len as u64);
            let mut expected = vec![0x12];
            expected.extend_from_slice(&prefix[..n]);
            expected.extend_from_slice(&body);
            assert_eq!(w.buf, expected, "a body of {len} bytes");
        }
    }
}
