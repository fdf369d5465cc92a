//! Spans in OTLP's protobuf (`ExportTraceServiceRequest`), encoded by hand.
//!
//! The proxy writes one fixed shape of message, so a dozen lines of protobuf wire format do
//! what `prost` and the generated OTLP types would (with `opentelemetry` and its SDK behind
//! them). The tests decode what this writes with `opentelemetry-proto`'s types, so the field
//! numbers are checked against the published schema, not against this file.

/// OTLP's `Span.SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server = 2,
    Client = 3,
}

/// A span's own fields; its attributes are written after them.
pub struct Span<'a> {
    pub trace_id: &'a [u8; 16],
    pub span_id: &'a [u8; 8],
    /// None for a root span.
    pub parent_span_id: Option<&'a [u8; 8]>,
    /// Bits 0-7 the W3C trace flags; bits 8 and 9 whether the parent is remote.
    pub flags: u32,
    pub name: &'a str,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// OTLP `Status.code` ERROR, else UNSET.
    pub error: bool,
}

/// `Status.code = STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;

/// One `ExportTraceServiceRequest` being written: one resource (`service.name`,
/// `service.version`), one instrumentation scope, then each span as it is added. Spans are
/// written straight from what the caller holds; nothing is gathered first.
pub struct Batch {
    out: Writer,
    /// Where the open `ResourceSpans` and `ScopeSpans` begin, closed by `finish`.
    resource_spans: usize,
    scope_spans: usize,
    spans: usize,
}

impl Batch {
    /// `spans` is about how many will be added, so that the buffer rarely grows.
    pub fn new(service_name: &str, spans: usize) -> Self {
        let mut out = Writer {
            buf: Vec::with_capacity(256 + spans * 320),
        };
        // ExportTraceServiceRequest.resource_spans = 1
        let resource_spans = out.open(1);
        // ResourceSpans.resource = 1
        out.message(1, |resource| {
            // Resource.attributes = 1
            key_text(resource, 1, "service.name", service_name);
            key_text(resource, 1, "service.version", env!("CARGO_PKG_VERSION"));
        });
        // ResourceSpans.scope_spans = 2
        let scope_spans = out.open(2);
        // ScopeSpans.scope = 1: InstrumentationScope name = 1, version = 2
        out.message(1, |scope| {
            scope.bytes(1, env!("CARGO_PKG_NAME").as_bytes());
            scope.bytes(2, env!("CARGO_PKG_VERSION").as_bytes());
        });
        Self {
            out,
            resource_spans,
            scope_spans,
            spans: 0,
        }
    }

    /// Adds a span, with the attributes `attributes` writes.
    pub fn span(&mut self, span: &Span<'_>, attributes: impl FnOnce(&mut Attributes<'_>)) {
        self.spans += 1;
        // ScopeSpans.spans = 2
        self.out.message(2, |s| {
            s.bytes(1, span.trace_id);
            s.bytes(2, span.span_id);
            if let Some(parent) = span.parent_span_id {
                s.bytes(4, parent);
            }
            s.bytes(5, span.name.as_bytes());
            s.varint_field(6, span.kind as u64);
            s.fixed64(7, span.start_unix_nanos);
            s.fixed64(8, span.end_unix_nanos);
            // Span.attributes = 9
            attributes(&mut Attributes(s));
            if span.error {
                // Status.code = 3
                s.message(15, |status| status.varint_field(3, STATUS_ERROR));
            }
            s.fixed32(16, span.flags);
        });
    }

    /// How many spans were added.
    pub fn spans(&self) -> usize {
        self.spans
    }

    pub fn finish(mut self) -> Vec<u8> {
        // The inner message first: closing it moves only bytes after the outer one's start.
        self.out.close(self.scope_spans);
        self.out.close(self.resource_spans);
        self.out.buf
    }
}

/// A span's attributes (`Span.attributes`, `KeyValue`s), as they are written.
pub struct Attributes<'w>(&'w mut Writer);

impl Attributes<'_> {
    pub fn text(&mut self, key: &str, value: &str) {
        key_text(self.0, 9, key, value);
    }

    pub fn int(&mut self, key: &str, value: i64) {
        // KeyValue key = 1, value = 2 (AnyValue int_value = 3, the two's complement varint)
        self.0.message(9, |kv| {
            kv.bytes(1, key.as_bytes());
            kv.message(2, |any| any.varint_field(3, value as u64));
        });
    }
}

/// A `KeyValue` with a string (key = 1, value = 2 as an `AnyValue`, string_value = 1) in field
/// `field`.
fn key_text(w: &mut Writer, field: u32, key: &str, value: &str) {
    w.message(field, |kv| {
        kv.bytes(1, key.as_bytes());
        kv.message(2, |any| any.bytes(1, value.as_bytes()));
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
        let start = self.open(field);
        f(self);
        self.close(start);
    }

    /// Begins an embedded message whose length `close` fills in; where it begins.
    fn open(&mut self, field: u32) -> usize {
        self.tag(field, 2);
        self.buf.push(0);
        self.buf.len() - 1
    }

    fn close(&mut self, start: usize) {
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
