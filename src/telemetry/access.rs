//! The canonical access line, formatted without `tracing-subscriber`'s general machinery.
//!
//! Every request logs one event with target [`TARGET`] and a dozen fields. The stock formatters
//! write each field through `core::fmt` (a `Debug` call per value, a `write!` per name) and the
//! timestamp through seven padded `write!` arguments: 26 k instructions per line, 17% of a
//! request (BENCHMARKS finding 24). [`Lines`] writes that one event itself: names and plain
//! strings are copied, integers and timestamps are written as digits, and only what needs
//! escaping or is a `Debug` value goes through the slow path. The output is byte for byte what
//! the stock formatter writes (the tests below compare the two on the same events); every
//! other event goes to the stock formatter unchanged. The access event is logged outside any
//! span, so spans are not written for it.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the canonical access event.
pub const TARGET: &str = "connector_proxy::access";

/// Formats the access event itself and hands every other event to `stock`.
pub struct Lines<F, T = Utc> {
    pub stock: F,
    pub json: bool,
    pub timer: T,
}

impl<S, N, F, T> FormatEvent<S, N> for Lines<F, T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if event.metadata().target() != TARGET {
            return self.stock.format_event(ctx, writer, event);
        }
        // The line is put together in a buffer of the thread's and handed on in one piece:
        // each write to `writer` is a call through a `dyn fmt::Write`.
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
        }
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                self.line(&mut line, &writer, event)?;
                writer.write_str(&line)
            }
            // Only if a field's `Debug` logged an access event itself.
            Err(_) => {
                let mut line = String::new();
                self.line(&mut line, &writer, event)?;
                writer.write_str(&line)
            }
        })
    }
}

impl<F, T: FormatTime> Lines<F, T> {
    fn line(&self, line: &mut String, writer: &Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = event.metadata().level();
        if self.json {
            line.push_str("{\"timestamp\":\"");
            // The timestamp is digits, dashes, colons and a dot: nothing to escape.
            self.timer.format_time(&mut Writer::new(line))?;
            line.push_str("\",\"level\":\"");
            line.push_str(level.as_str());
            line.push('"');
        } else {
            self.timer.format_time(&mut Writer::new(line))?;
            line.push(' ');
            line.push_str(padded(level));
            line.push(' ');
        }
        event.record(&mut Fields {
            line,
            json: self.json,
            first: true,
            sanitize: writer.sanitizes_ansi_escapes(),
        });
        if self.json {
            line.push('}');
        }
        line.push('\n');
        Ok(())
    }
}

/// The level as the text formatter writes it: right-aligned in five columns.
fn padded(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// Writes an event's fields in the text (`name=value`, space-separated, the message bare) or
/// the flattened JSON (`,"name":value`) form. Writing to a `String` cannot fail, so the
/// `fmt::Result`s of `write!` are not looked at.
struct Fields<'a> {
    line: &'a mut String,
    json: bool,
    first: bool,
    /// The writer escapes terminal control characters in messages.
    sanitize: bool,
}

impl Fields<'_> {
    /// The separator and the name, before a value; false for fields that are not written.
    fn name(&mut self, field: &Field) -> bool {
        let name = field.name();
        // `log` records carry their metadata as fields; the formatters skip them.
        if name.starts_with("log.") {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        if self.json {
            self.line.push_str(",\"");
            json_key(self.line, name);
            self.line.push_str("\":");
        } else {
            if !std::mem::take(&mut self.first) {
                self.line.push(' ');
            }
            if name != "message" {
                self.line.push_str(name);
                self.line.push('=');
            }
        }
        true
    }

    /// The text form's message: bare, with terminal control characters escaped where the
    /// writer sanitizes them (as the stock formatter does).
    fn message(&mut self, value: &dyn fmt::Display) {
        let _ = if self.sanitize {
            write!(Sanitizing(self.line), "{value}")
        } else {
            write!(self.line, "{value}")
        };
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.name(field) {
            return;
        }
        if self.json {
            json_string(self.line, value);
        } else if field.name() == "message" {
            self.message(&value as &dyn fmt::Display);
        } else {
            debug_string(self.line, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.name(field) {
            write_u64(self.line, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.name(field) {
            if value < 0 {
                self.line.push('-');
            }
            write_u64(self.line, value.unsigned_abs());
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.name(field) {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if !self.name(field) {
            return;
        }
        if write_thousandths(self.line, value) {
            return;
        }
        if self.json {
            // serde_json's own number form (and `null` where JSON has no number).
            let _ = serde_json::to_writer(Adaptor(self.line), &value);
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.name(field) {
            return;
        }
        if self.json {
            let _ = serde_json::to_writer(Adaptor(self.line), &format_args!("{value:?}"));
        } else if field.name() == "message" {
            self.message(&format_args!("{value:?}"));
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }
}

/// Writes control characters that terminals act on as escapes: `tracing-subscriber`'s rules
/// for messages.
struct Sanitizing<'a>(&'a mut String);

impl fmt::Write for Sanitizing<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if !text
            .bytes()
            .any(|b| matches!(b, 0x07 | 0x08 | 0x0c | 0x1b | 0x7f..))
        {
            self.0.push_str(text);
            return Ok(());
        }
        for ch in text.chars() {
            match ch {
                '\x1b' => self.0.push_str("\\x1b"),
                '\x07' => self.0.push_str("\\x07"),
                '\x08' => self.0.push_str("\\x08"),
                '\x0c' => self.0.push_str("\\x0c"),
                '\x7f' => self.0.push_str("\\x7f"),
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                _ => self.0.push(ch),
            }
        }
        Ok(())
    }
}

/// Bytes a `Debug` string and a JSON string both write as they are.
fn plain(text: &str) -> bool {
    text.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// `value` as `str`'s `Debug` writes it: quoted, escaped where needed.
fn debug_string(line: &mut String, value: &str) {
    if plain(value) {
        line.push('"');
        line.push_str(value);
        line.push('"');
    } else {
        let _ = write!(line, "{value:?}");
    }
}

/// `value` as a JSON string, as serde_json escapes it.
fn json_string(line: &mut String, value: &str) {
    if plain(value) {
        line.push('"');
        line.push_str(value);
        line.push('"');
    } else {
        let _ = serde_json::to_writer(Adaptor(line), value);
    }
}

/// A field name inside a JSON key's quotes (tracing's names are identifiers; any other
/// spelling is escaped).
fn json_key(line: &mut String, name: &str) {
    if plain(name) {
        line.push_str(name);
    } else {
        let start = line.len();
        json_string(line, name);
        line.pop();
        line.remove(start);
    }
}

/// Writes `value` when it is a whole number of thousandths below 2^33 (the line's times: milliseconds
/// to the microsecond), and says whether it did. Such a value is the double nearest its
/// decimal, and doubles below 2^33 lie less than 2^-19 apart, so no other decimal of three places
/// or fewer reads back as it: its shortest form, which `f64`'s `Debug` and serde_json both
/// write, is that decimal, with at least one fractional digit. Grisu's search for it took 900
/// instructions a value (BENCHMARKS finding 35).
fn write_thousandths(line: &mut String, value: f64) -> bool {
    let thousandths = (value * 1000.0).round();
    if value.is_sign_negative()
        || !(0.0..8_589_934_592_000.0).contains(&thousandths)
        || thousandths / 1000.0 != value
    {
        return false;
    }
    // In range and whole, so the cast is exact.
    let thousandths = thousandths as u64;
    write_u64(line, thousandths / 1000);
    line.push('.');
    let mut fraction = thousandths % 1000;
    let mut places = 3;
    while places > 1 && fraction.is_multiple_of(10) {
        fraction /= 10;
        places -= 1;
    }
    let digits = [fraction / 100, fraction / 10 % 10, fraction % 10];
    line.extend(
        digits[3 - places..]
            .iter()
            .map(|&d| char::from(b'0' + d as u8)),
    );
    true
}

fn write_u64(line: &mut String, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    line.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// serde_json writes to an `io::Write`; the line is a `String`. serde_json writes whole UTF-8
/// sequences (string pieces between escapes, and the escapes).
struct Adaptor<'a>(&'a mut String);

impl io::Write for Adaptor<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let text = std::str::from_utf8(bytes).map_err(io::Error::other)?;
        self.0.push_str(text);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The wall clock in UTC to the microsecond, `2026-12-02T05:16:12.123456Z`: what
/// `tracing-subscriber`'s `SystemTime` timer writes, without its `write!` calls. Both the access
/// line and the stock formatter use it, so every line's timestamp has one spelling.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utc;

impl FormatTime for Utc {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_utc(w, SystemTime::now())
    }
}

fn write_utc(w: &mut Writer<'_>, at: SystemTime) -> fmt::Result {
    let Some(text) = utc(at) else {
        // Before 1970 or after 9999: rare enough for the stock timer's spelling.
        return tracing_subscriber::fmt::time::SystemTime.format_time(w);
    };
    w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
}

/// `at` as the 27 bytes of `YYYY-MM-DDTHH:MM:SS.ffffffZ`, for years 1970 to 9999.
fn utc(at: SystemTime) -> Option<[u8; 27]> {
    let since = at.duration_since(UNIX_EPOCH).ok()?;
    let seconds = since.as_secs();
    let days = seconds / 86_400;
    let (year, month, day) = civil(days);
    if year > 9999 {
        return None;
    }
    let of_day = seconds % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    Some(text)
}

/// Year, month and day of the `days`-th day after 1970-01-01 (the proleptic Gregorian
/// calendar; Howard Hinnant's `civil_from_days`, for days after the epoch).
fn civil(days: u64) -> (u64, u64, u64) {
    // Counted from 0000-03-01, so that the leap day ends a year.
    let days = days + 719_468;
    let era = days / 146_097;
    let of_era = days % 146_097;
    let year_of_era = (of_era - of_era / 1460 + of_era / 36_524 - of_era / 146_096) / 365;
    let of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * of_year + 2) / 153;
    let day = of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Json, JsonFields};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// One fixed instant, so that two formatters' lines can be compared whole.
    #[derive(Clone, Copy)]
    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            write_utc(w, UNIX_EPOCH + Duration::new(1_764_652_572, 123_456_789))
        }
    }

    /// Access events with every kind of value the proxy logs, plain and in need of escaping.
    fn events() {
        let method = http::Method::PATCH;
        for (org, detail, upstream_ms) in [
            ("acme", "-", 0.0),
            ("a\"c\\me", "line\nbreak\ttab", 12.345_678),
            ("ünïcödé", "bell \u{7} and \u{200b} zero width", 1.0e-7),
            ("", "{\"json\": [1, 2]}", f64::NAN),
            ("plain", "ansi \u{1b}[31mred", 1.0e17),
        ] {
            tracing::info!(
                target: TARGET,
                request_id = %"flow-7",
                org,
                connector = "billing",
                method = %method,
                status = 502_u64,
                negative = -42_i64,
                replayed = true,
                detail,
                upstream_ms,
                duration_ms = 3.5,
                "request"
            );
        }
        tracing::info!(target: TARGET, "a message with \u{1b}[31m, \u{85} and \u{7f} in it");
        tracing::info!(target: TARGET, "{} as a message argument", "a\u{7}b");
        tracing::warn!(
            other = "an event that is not the access line",
            "left to the stock"
        );
    }

    /// The lines `stock` writes for [`events`], and those [`Lines`] in front of it writes.
    macro_rules! stock_and_ours {
        ($format:expr, $fields:expr, $json:expr) => {{
            let (a, b) = (Buffer::default(), Buffer::default());
            let subscriber = tracing_subscriber::fmt()
                .fmt_fields($fields)
                .event_format($format)
                .with_writer(a.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, events);
            let subscriber = tracing_subscriber::fmt()
                .fmt_fields($fields)
                .event_format(Lines {
                    stock: $format,
                    json: $json,
                    timer: Fixed,
                })
                .with_writer(b.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, events);
            (a.text(), b.text())
        }};
    }

    fn text_format() -> Format<Full, Fixed> {
        Format::default()
            .with_target(false)
            .with_ansi(false)
            .with_timer(Fixed)
    }

    fn json_format() -> Format<Json, Fixed> {
        Format::default()
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_ansi(false)
            .with_timer(Fixed)
    }

    #[test]
    fn the_access_line_is_what_the_stock_text_formatter_writes() {
        let (stock, ours) = stock_and_ours!(text_format(), DefaultFields::new(), false);
        assert_eq!(stock.lines().count(), 8, "{stock}");
        assert!(stock.contains("org=\"a\\\"c\\\\me\""), "{stock}");
        assert_eq!(ours, stock);
    }

    #[test]
    fn the_access_line_is_what_the_stock_json_formatter_writes() {
        let (stock, ours) = stock_and_ours!(json_format(), JsonFields::new(), true);
        for line in stock.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert_eq!(stock.lines().count(), 8, "{stock}");
        assert_eq!(ours, stock);
    }

    #[test]
    fn thousandths_are_written_as_debug_and_serde_json_write_them_and_other_values_are_left() {
        let shortest = |value: f64| {
            let mut line = String::new();
            write_thousandths(&mut line, value).then_some(line)
        };
        // Every value to 1 s, then a spread to the limit (2^33 ms, 99 days).
        let medium = (1_000_000..100_000_000u64).step_by(997);
        let large = (100_000_000..8_589_934_592_000u64).step_by(7_919_999_993);
        for n in (0..1_000_000)
            .chain(medium)
            .chain(large)
            .chain([8_589_934_591_999])
        {
            let value = n as f64 / 1000.0;
            let debug = format!("{value:?}");
            assert_eq!(shortest(value).as_deref(), Some(debug.as_str()), "{n}");
            assert_eq!(serde_json::to_string(&value).unwrap(), debug, "{n}");
        }
        for value in [
            0.1234,
            1.0005,
            -1.0,
            -0.0,
            8_589_934_592.0,
            f64::NAN,
            f64::INFINITY,
            2.0f64.powi(-30),
        ] {
            assert_eq!(shortest(value), None, "{value:?}");
        }
    }

    #[test]
    fn timestamps_are_utc_to_the_microsecond() {
        // Instants whose dates `date -u -d @N` gives: the epoch, leap days in a year divisible
        // by 400 and by 4, the last second of a century that is no leap year, the end of 9999.
        for (seconds, micros, expected) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 7, "2000-02-29T00:00:00.000007Z"),
            (1_709_251_199, 999_999, "2024-02-29T23:59:59.999999Z"),
            (4_107_542_399, 500_000, "2100-02-28T23:59:59.500000Z"),
            (253_402_300_799, 0, "9999-12-31T23:59:59.000000Z"),
        ] {
            let at = UNIX_EPOCH + Duration::new(seconds, micros * 1000);
            let text = utc(at).unwrap();
            assert_eq!(std::str::from_utf8(&text).unwrap(), expected);
        }
        assert!(utc(UNIX_EPOCH + Duration::from_secs(253_402_300_800)).is_none());
        assert!(utc(UNIX_EPOCH - Duration::from_secs(1)).is_none());
    }

    #[test]
    fn every_day_from_1970_to_2200_has_its_date() {
        // Noon of each day, against a calendar walked a day at a time.
        let mut year = 1970;
        let mut month = 1;
        let mut day = 1;
        for days in 0..(230 * 366) {
            let at = UNIX_EPOCH + Duration::from_secs(days * 86_400 + 43_200);
            let text = utc(at).unwrap();
            let expected = format!("{year:04}-{month:02}-{day:02}T12:00:00.000000Z");
            assert_eq!(std::str::from_utf8(&text).unwrap(), expected, "day {days}");
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let length = match month {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            day += 1;
            if day > length {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
    }

    #[test]
    fn now_is_written_as_the_stock_timer_writes_it() {
        // Both read the clock; within the same second their first 19 bytes agree. A second
        // boundary between the two reads is retried.
        for _ in 0..3 {
            let mut ours = String::new();
            let mut stock = String::new();
            Utc.format_time(&mut Writer::new(&mut ours)).unwrap();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut stock))
                .unwrap();
            assert_eq!(ours.len(), stock.len(), "{ours} / {stock}");
            if ours[..19] == stock[..19] {
                return;
            }
        }
        panic!("the two timers disagree on the second three times");
    }
}
