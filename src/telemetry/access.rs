//! The canonical access line, one a request, written by the proxy itself.
//!
//! Through `tracing` every field of the line was a call through `dyn Visit`, names were
//! checked and copied one by one, and the request id, the method and the message went through
//! `core::fmt`: 5 k instructions a line, 7% of a request (BENCHMARKS findings 24, 25, 27 and
//! 37). A [`Line`] is plain data: [`log`] asks `tracing` only whether the line is wanted
//! (`RUST_LOG`, target [`TARGET`], level `info`), writes it in one pass and queues it in one
//! piece. The bytes are what `tracing-subscriber`'s text and JSON formatters write for the
//! same event (the tests below compare the two on the same lines), and where the proxy's own
//! subscriber is not installed (an embedder's, a test's), the line goes as that event.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Level;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

use super::Queue;

/// The target of the canonical access line (`RUST_LOG=connector_proxy::access=off` turns it
/// off).
pub const TARGET: &str = "connector_proxy::access";

/// One request's line, its fields in the order they are written.
pub struct Line<'a> {
    pub request_id: &'a str,
    pub org: &'a str,
    pub connector: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub status: u16,
    pub error: &'a str,
    pub detail: &'a str,
    pub token: &'a str,
    /// Written as `upstream_ms`, milliseconds to the microsecond.
    pub upstream: Duration,
    /// Written as `duration_ms`, milliseconds to the microsecond.
    pub duration: Duration,
}

/// Where lines go once the proxy's subscriber is installed: its log queue, in its format.
struct Sink {
    queue: Queue,
    json: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends every [`Line`] to `queue` from now on (JSON or text).
pub(super) fn install(queue: Queue, json: bool) {
    let _ = SINK.set(Sink { queue, json });
}

/// Logs the line `line` makes, if `RUST_LOG` wants `info` for [`TARGET`] (made only then).
pub fn log<'a>(line: impl FnOnce() -> Line<'a>) {
    if tracing::enabled!(target: TARGET, Level::INFO) {
        line().log();
    }
}

impl Line<'_> {
    fn log(&self) {
        let Some(sink) = SINK.get() else {
            return self.event();
        };
        thread_local! {
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        LINE.with(|line| {
            // Borrowed only here, and nothing in between logs.
            let mut line = line.borrow_mut();
            line.clear();
            self.write(&mut line, sink.json, SystemTime::now());
            sink.queue.push(&line);
        });
    }

    /// The same line as a `tracing` event, for a subscriber other than the proxy's.
    fn event(&self) {
        tracing::info!(
            target: TARGET,
            request_id = %self.request_id,
            org = self.org,
            connector = self.connector,
            method = %self.method,
            host = self.host,
            status = self.status,
            error = self.error,
            detail = self.detail,
            token = self.token,
            upstream_ms = millis(self.upstream),
            duration_ms = millis(self.duration),
            "request"
        );
    }

    /// The line as the stock formatters write [`Self::event`] at `at`: in text, the time, the
    /// level right-aligned in five columns, the message, then `name=value` (strings quoted and
    /// escaped as `Debug` does, the request id and the method as they are); in JSON, one
    /// object with the fields flattened, strings escaped as serde_json does. Every piece goes
    /// in as bytes, and a field's name comes with its separator and, for a string, its opening
    /// quote (BENCHMARKS finding 56).
    fn write(&self, line: &mut Vec<u8>, json: bool, at: SystemTime) {
        if json {
            line.extend_from_slice(b"{\"timestamp\":\"");
            // Digits, dashes, colons and a dot: nothing to escape.
            push_utc(line, at);
            line.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
        } else {
            push_utc(line, at);
            line.extend_from_slice(b"  INFO request");
        }
        let mut fields = Fields { line, json };
        fields.shown(name!("request_id"), self.request_id);
        fields.string(quoted!("org"), self.org);
        fields.string(quoted!("connector"), self.connector);
        fields.shown(name!("method"), self.method);
        fields.string(quoted!("host"), self.host);
        fields.name(name!("status"));
        write_u64(fields.line, u64::from(self.status));
        fields.string(quoted!("error"), self.error);
        fields.string(quoted!("detail"), self.detail);
        fields.string(quoted!("token"), self.token);
        fields.millis(name!("upstream_ms"), self.upstream);
        fields.millis(name!("duration_ms"), self.duration);
        if json {
            line.push(b'}');
        }
        line.push(b'\n');
    }
}

/// What the `tracing` event carries for a time: milliseconds to the microsecond, `0.412`, never
/// `0.41236099999999997`. Exact below 2^53 microseconds (285 years).
fn millis(time: Duration) -> f64 {
    time.as_micros() as f64 / 1000.0
}

/// A field's name with the separator before it and the sign after it, in both formats: ` org=`
/// and `,"org":`, each written in one piece; a string field's with its opening quote too.
struct Name {
    text: &'static [u8],
    json: &'static [u8],
}

/// The [`Name`] of the field `name` (an identifier: nothing to escape).
macro_rules! name {
    ($name:literal) => {
        Name {
            text: concat!(" ", $name, "=").as_bytes(),
            json: concat!(",\"", $name, "\":").as_bytes(),
        }
    };
}
use name;

/// The [`Name`] of the string field `name`, with the quote that opens its value.
macro_rules! quoted {
    ($name:literal) => {
        Name {
            text: concat!(" ", $name, "=\"").as_bytes(),
            json: concat!(",\"", $name, "\":\"").as_bytes(),
        }
    };
}
use quoted;

/// Writes a line's fields after its message. The writers of names and strings are inlined into
/// [`Line::write`], so that each name is copied as a constant of known length, a few moves
/// instead of a call to `memcpy` (BENCHMARKS finding 56).
struct Fields<'a> {
    line: &'a mut Vec<u8>,
    json: bool,
}

impl Fields<'_> {
    #[inline(always)]
    fn name(&mut self, name: Name) {
        self.line
            .extend_from_slice(if self.json { name.json } else { name.text });
    }

    /// A string field, named by [`quoted!`]: escaped where needed.
    #[inline(always)]
    fn string(&mut self, name: Name, value: &str) {
        self.name(name);
        self.after_quote(value);
    }

    /// A field logged with `%` (`Display`): as it is in text, a JSON string in JSON.
    #[inline(always)]
    fn shown(&mut self, name: Name, value: &str) {
        self.name(name);
        if self.json {
            self.line.push(b'"');
            self.after_quote(value);
        } else {
            self.line.extend_from_slice(value.as_bytes());
        }
    }

    /// A string's value after its opening quote: as it is and the closing quote, or escaped.
    #[inline(always)]
    fn after_quote(&mut self, value: &str) {
        if plain(value) {
            self.line.extend_from_slice(value.as_bytes());
            self.line.push(b'"');
            return;
        }
        // Both escapers write the quotes themselves.
        self.line.pop();
        if self.json {
            let _ = serde_json::to_writer(&mut *self.line, value);
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }

    /// A time as [`millis`] gives it to the event, written as `f64`'s `Debug` and serde_json
    /// write that value.
    fn millis(&mut self, name: Name, time: Duration) {
        self.name(name);
        if write_thousandths(self.line, time) {
            return;
        }
        let value = millis(time);
        if self.json {
            // serde_json's own number form.
            let _ = serde_json::to_writer(&mut *self.line, &value);
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }
}

/// Bytes a `Debug` string and a JSON string both write as they are: printable ASCII but the
/// quote and the backslash.
fn plain(text: &str) -> bool {
    static PLAIN: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0x20;
        while b < 0x7f {
            table[b] = b != b'"' as usize && b != b'\\' as usize;
            b += 1;
        }
        table
    };
    text.bytes().all(|b| PLAIN[usize::from(b)])
}

/// Writes `time` in milliseconds when its whole microseconds are below 2^33 thousand (99 days),
/// and says whether it did. The event's value there, [`millis`], is the double nearest that
/// decimal, and doubles below 2^33 lie less than 2^-19 apart, so no other decimal of three
/// places or fewer reads back as it: its shortest form, which `f64`'s `Debug` and serde_json
/// both write, is that decimal, with at least one fractional digit. Grisu's search for it took
/// 900 instructions a value (BENCHMARKS finding 35).
fn write_thousandths(line: &mut Vec<u8>, time: Duration) -> bool {
    let micros = time.as_micros();
    if micros >= 8_589_934_592_000 {
        return false;
    }
    // Below 2^43.
    let micros = micros as u64;
    write_u64(line, micros / 1000);
    let fraction = micros % 1000;
    let digits = [
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ];
    // At least one fractional digit, and no trailing zero after it.
    let places = match fraction {
        f if f % 100 == 0 => 1,
        f if f % 10 == 0 => 2,
        _ => 3,
    };
    line.extend_from_slice(&digits[..=places]);
    true
}

fn write_u64(line: &mut Vec<u8>, value: u64) {
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
    line.extend_from_slice(&digits[at..]);
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

/// `at` as [`write_utc`] writes it. Each thread keeps the last second it wrote, so that within a
/// second only the microseconds are made anew (the date and the time of day took 350
/// instructions a line; BENCHMARKS finding 41).
fn push_utc(line: &mut Vec<u8>, at: SystemTime) {
    thread_local! {
        static LAST: Cell<Option<(u64, [u8; 27])>> = const { Cell::new(None) };
    }
    let text = at
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|since| match LAST.get() {
            Some((second, mut text)) if second == since.as_secs() => {
                put_digits(&mut text[20..26], u64::from(since.subsec_micros()));
                Some(text)
            }
            _ => utc(at).inspect(|text| LAST.set(Some((since.as_secs(), *text)))),
        });
    match text {
        // ASCII digits and punctuation, as `utc` makes them.
        Some(text) => line.extend_from_slice(&text),
        // Before 1970 or after 9999: as `write_utc` falls back.
        None => {
            let mut text = String::new();
            let _ = write_utc(&mut Writer::new(&mut text), at);
            line.extend_from_slice(text.as_bytes());
        }
    }
}

/// `value`'s last `digits.len()` decimal digits, zero-padded.
fn put_digits(digits: &mut [u8], mut value: u64) {
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
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
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], of_day / 3600);
    put_digits(&mut text[14..16], of_day / 60 % 60);
    put_digits(&mut text[17..19], of_day % 60);
    put_digits(&mut text[20..26], u64::from(since.subsec_micros()));
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
    use std::io;
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
    const AT: Duration = Duration::new(1_764_652_572, 123_456_789);

    #[derive(Clone, Copy)]
    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            write_utc(w, UNIX_EPOCH + AT)
        }
    }

    /// Lines with every kind of value the proxy logs, plain and in need of escaping, and times
    /// that the line writes itself and that it leaves to the stock number forms.
    fn lines() -> Vec<Line<'static>> {
        let cases = [
            (
                "flow-7",
                "acme",
                "-",
                Duration::ZERO,
                Duration::from_micros(412),
            ),
            (
                "a\"b\\c",
                "a\"c\\me",
                "line\nbreak\ttab, bell \u{7} and \u{200b} zero width",
                Duration::from_nanos(12_345_678),
                Duration::from_micros(3_500),
            ),
            (
                "del\u{7f}",
                "ünïcödé",
                "del \u{7f}, the one byte to escape here",
                Duration::from_nanos(999),
                Duration::from_secs(100_000_000_000),
            ),
            (
                "flow-8",
                "",
                "{\"json\": [1, 2]}",
                Duration::MAX,
                Duration::from_secs(1),
            ),
        ];
        cases
            .into_iter()
            .map(|(request_id, org, detail, upstream, duration)| Line {
                request_id,
                org,
                connector: "billing",
                method: "PATCH",
                host: "crm.example.com",
                status: 502,
                error: "upstream_unreachable",
                detail,
                token: "-",
                upstream,
                duration,
            })
            .collect()
    }

    /// What `format` writes for each line's event, and what [`Line::write`] writes.
    fn stock_and_ours<N, E>(format: E, fields: N, json: bool) -> (String, String)
    where
        N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
        E: tracing_subscriber::fmt::FormatEvent<tracing_subscriber::Registry, N>
            + Send
            + Sync
            + 'static,
    {
        let stock = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(fields)
            .event_format(format)
            .with_writer(stock.clone())
            .finish();
        let mut ours = Vec::new();
        tracing::subscriber::with_default(subscriber, || {
            for line in lines() {
                line.event();
                line.write(&mut ours, json, UNIX_EPOCH + AT);
            }
        });
        (stock.text(), String::from_utf8(ours).unwrap())
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
    fn the_line_is_what_the_stock_text_formatter_writes_for_its_event() {
        let (stock, ours) = stock_and_ours(text_format(), DefaultFields::new(), false);
        assert_eq!(stock.lines().count(), 4, "{stock}");
        assert!(stock.contains("org=\"a\\\"c\\\\me\""), "{stock}");
        assert_eq!(ours, stock);
    }

    #[test]
    fn the_line_is_what_the_stock_json_formatter_writes_for_its_event() {
        let (stock, ours) = stock_and_ours(json_format(), JsonFields::new(), true);
        for line in stock.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert_eq!(stock.lines().count(), 4, "{stock}");
        assert_eq!(ours, stock);
    }

    #[test]
    fn times_are_written_as_debug_and_serde_json_write_the_events_value() {
        let written = |time: Duration, json: bool| {
            let mut line = Vec::new();
            Fields {
                line: &mut line,
                json,
            }
            .millis(name!("t"), time);
            String::from_utf8(line).unwrap()
        };
        // Every microsecond to 1 s, then a spread to the line's own limit (2^33 ms, 99 days)
        // and past it, where the stock forms take over.
        let medium = (1_000_000..100_000_000u64).step_by(997);
        let large = (100_000_000..8_589_934_592_000u64).step_by(7_919_999_993);
        let beyond = [8_589_934_592_000, 12_345_678_901_234_567, u64::MAX];
        for n in (0..1_000_000)
            .chain(medium)
            .chain(large)
            .chain([8_589_934_591_999])
            .chain(beyond)
        {
            // A duration's nanoseconds past its last microsecond are not logged.
            let time = Duration::from_micros(n) + Duration::from_nanos(n % 1000);
            let value = millis(time);
            let debug = format!("{value:?}");
            assert_eq!(written(time, false), format!(" t={debug}"), "{n}");
            let json = serde_json::to_string(&value).unwrap();
            assert_eq!(written(time, true), format!(",\"t\":{json}"), "{n}");
            if n < 8_589_934_592_000 {
                assert!(write_thousandths(&mut Vec::new(), time), "{n}");
                assert_eq!(json, debug, "{n}");
            } else {
                assert!(!write_thousandths(&mut Vec::new(), time), "{n}");
            }
        }
        // Nanoseconds past the last whole microsecond are dropped, not rounded.
        assert_eq!(written(Duration::from_nanos(1_999), false), " t=0.001");
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
    fn a_line_kept_second_gives_the_same_timestamps_as_a_fresh_one() {
        // Within a second, across the next, back to an earlier one, and at the ends of the
        // years the compact form covers (beyond them both give the stock timer's now).
        let times = [
            (1_709_251_199, 999_998),
            (1_709_251_199, 7),
            (1_709_251_199, 999_999),
            (1_709_251_200, 0),
            (1_709_251_200, 123_456),
            (1_709_251_199, 5),
            (253_402_300_799, 1),
            (253_402_300_799, 2),
            (0, 4),
        ];
        for (seconds, micros) in times {
            let at = UNIX_EPOCH + Duration::new(seconds, micros * 1000);
            let mut pushed = Vec::new();
            push_utc(&mut pushed, at);
            let mut written = String::new();
            write_utc(&mut Writer::new(&mut written), at).unwrap();
            assert_eq!(pushed, written.as_bytes(), "{seconds}.{micros:06}");
        }
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
