//! Logs: `tracing` to stdout through a writer off the request path.
//!
//! A request's canonical line is formatted on the request's task and appended to a shared
//! buffer: a lock and a copy, no system call. One thread writes the buffer out: a line that
//! finds it idle is written at once; after each write the thread waits [`LINGER`], and the lines
//! that come meanwhile go out together in the next `write`. A busy proxy wakes the thread and
//! writes once a `LINGER`, and its requests never wake it. (Woken by the first line of each
//! burst and waiting a millisecond, it made the access log cost 13 to 15% of the throughput on
//! one shared core with an HTTP/1.1 upstream; BENCHMARKS finding 55.) Lines also go out early
//! when the buffer is half full. When the buffer holds [`PENDING_LIMIT`] bytes (stdout
//! slower than the requests), a line is dropped, not waited for, and counted
//! (`connector_proxy_log_lines_dropped_total`). Written here rather than taken from
//! `tracing-appender`, whose non-blocking writer sends each line through a channel (waking its
//! thread per line when it keeps up) and brings `time`, `symlink` and crossbeam along.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{Format, JsonFields};

use access::Utc;

pub mod access;
pub mod otlp;
pub mod trace;

/// Bytes waiting to be written at the most: past this, lines are dropped.
const PENDING_LIMIT: usize = 1 << 20;

/// The writer's wait after each write, for lines to gather; a half-full buffer ends it early.
const LINGER: Duration = Duration::from_millis(20);

static DROPPED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber (filtered by `RUST_LOG`, `info` by default), writing to
/// stdout off the request path. Keep the guard until the process ends: dropping it writes out
/// what is pending.
pub fn init(format: LogFormat) -> LogGuard {
    let (queue, guard) = Queue::start(io::stdout(), PENDING_LIMIT, LINGER);
    access::install(queue.clone(), format == LogFormat::Json);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // No colours, even on a terminal: tracing-subscriber's `ansi` feature styles every field
    // name even with colours off, about 10 k instructions per canonical line (BENCHMARKS
    // finding 25), so it is not compiled in.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(queue);
    let stock = Format::default()
        .with_target(false)
        .with_ansi(false)
        .with_timer(Utc);
    match format {
        LogFormat::Text => subscriber.event_format(stock).init(),
        LogFormat::Json => subscriber
            .fmt_fields(JsonFields::new())
            .event_format(stock.json().flatten_event(true))
            .init(),
    }
    guard
}

/// Log lines dropped so far because too much was pending.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    limit: usize,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// The writer sleeps on `wake` and wants a notification for the next line.
    idle: bool,
    /// Asked by [`LogGuard`]: answered once everything before it is written.
    flushed: Vec<std::sync::mpsc::SyncSender<()>>,
}

/// The writing side `tracing-subscriber` is given: every event's line arrives in one `write`.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

/// At the end of the process: writes out what is pending (waiting a second at the most).
pub struct LogGuard {
    shared: Arc<Shared>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn half_full(&self, pending: &Pending) -> bool {
        pending.bytes.len() >= self.limit / 2
    }

    /// Takes what is pending and who asked for a flush, for one write.
    fn take(&self, spare: &mut Vec<u8>) -> Vec<std::sync::mpsc::SyncSender<()>> {
        let mut pending = self.lock();
        std::mem::swap(&mut pending.bytes, spare);
        std::mem::take(&mut pending.flushed)
    }
}

impl Queue {
    /// A queue holding up to `limit` bytes, written to `out` by a thread of its own.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        limit: usize,
        linger: Duration,
    ) -> (Self, LogGuard) {
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            wake: Condvar::new(),
            limit,
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("connector-proxy-log".into())
            .spawn(move || write_out(&writer, out, linger))
            .expect("the log thread starts");
        (
            Self {
                shared: shared.clone(),
            },
            LogGuard { shared },
        )
    }
}

/// The writer thread: sleeps until a line comes (the line wakes it), writes what is pending,
/// then waits `linger` for more (pushes do not wake it then; a flush or a half-full buffer
/// does), and writes again or goes back to sleep.
fn write_out<W: Write>(shared: &Shared, mut out: W, linger: Duration) {
    let mut batch = Vec::new();
    loop {
        {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && pending.flushed.is_empty() {
                pending.idle = true;
                pending = shared.wake.wait(pending).unwrap_or_else(|p| p.into_inner());
            }
        }
        write_batch(shared, &mut out, &mut batch);
        let pending = shared.lock();
        let _ = shared
            .wake
            .wait_timeout_while(pending, linger, |p| {
                p.flushed.is_empty() && !shared.half_full(p)
            })
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// One write of everything pending; then answers those who asked for a flush.
fn write_batch<W: Write>(shared: &Shared, out: &mut W, batch: &mut Vec<u8>) {
    let flushed = shared.take(batch);
    if !batch.is_empty() {
        let _ = out.write_all(batch);
        let _ = out.flush();
        batch.clear();
    }
    for done in flushed {
        let _ = done.send(());
    }
}

impl Queue {
    /// Queues `line` whole, or drops and counts it past the limit.
    fn push(&self, line: &[u8]) {
        let mut pending = self.shared.lock();
        if pending.bytes.len() + line.len() > self.shared.limit {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_half_full = self.shared.half_full(&pending);
        let needed = pending.bytes.len() + line.len();
        if needed > pending.bytes.capacity() {
            // Doubling, but never past the limit: with the batch being written, the log holds
            // twice the limit at the most.
            let grown = (pending.bytes.capacity() * 2).clamp(needed, self.shared.limit);
            let len = pending.bytes.len();
            pending.bytes.reserve_exact(grown - len);
        }
        pending.bytes.extend_from_slice(line);
        // Idle, or lingering while the buffer fills up.
        let wake = std::mem::take(&mut pending.idle)
            || (!was_half_full && self.shared.half_full(&pending));
        drop(pending);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

impl Write for Queue {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Queue {
    type Writer = Queue;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (done, written) = std::sync::mpsc::sync_channel(1);
        let mut pending = self.shared.lock();
        pending.flushed.push(done);
        pending.idle = false;
        drop(pending);
        // Idle or lingering, the writer wakes for it.
        self.shared.wake.notify_one();
        let _ = written.recv_timeout(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A writer that records each `write` call it gets.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn queue(limit: usize) -> Queue {
        Queue {
            shared: Arc::new(Shared {
                pending: Mutex::default(),
                wake: Condvar::new(),
                limit,
            }),
        }
    }

    #[test]
    fn pending_lines_go_out_in_one_write_and_past_the_limit_are_dropped_and_counted() {
        let mut queue = queue(28);
        let before = dropped_lines();
        for i in 0..6 {
            queue.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        // Four lines of 7 bytes fit in 28; the fifth and sixth were dropped, without waiting.
        assert_eq!(dropped_lines() - before, 2);
        let mut recorder = Recorder::default();
        write_batch(&queue.shared, &mut recorder, &mut Vec::new());
        let writes = recorder.0.lock().unwrap();
        assert_eq!(writes.len(), 1, "one write for the four pending lines");
        assert_eq!(writes[0], b"line 0\nline 1\nline 2\nline 3\n");
    }

    #[test]
    fn the_buffer_never_reserves_room_past_the_limit() {
        let mut queue = queue(1000);
        for _ in 0..4 {
            queue.write_all(&[b'x'; 300]).unwrap();
        }
        let pending = queue.shared.lock();
        assert_eq!(pending.bytes.len(), 900, "the fourth line was dropped");
        assert!(
            pending.bytes.capacity() <= 1000,
            "{}",
            pending.bytes.capacity()
        );
    }

    #[test]
    fn the_guard_writes_out_what_is_pending() {
        let recorder = Recorder::default();
        let (mut queue, guard) = Queue::start(recorder.clone(), 1 << 16, LINGER);
        queue.write_all(b"last words\n").unwrap();
        drop(guard);
        let written: Vec<u8> = recorder.0.lock().unwrap().concat();
        assert_eq!(written, b"last words\n");
    }

    /// A line that finds the writer idle is written at once; the lines that come within
    /// `linger` of a write wait and go out together (here, with an hour's linger, once they
    /// fill half the buffer, or when the guard asks).
    #[test]
    fn lines_after_a_write_gather_for_the_next_and_a_lone_line_goes_at_once() {
        let recorder = Recorder::default();
        let hour = Duration::from_secs(3600);
        let (mut queue, guard) = Queue::start(recorder.clone(), 1 << 16, hour);
        let writes = || recorder.0.lock().unwrap().clone();
        // Liveness only: how long the writer takes is not measured.
        let wait_for = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while writes().len() < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        queue.write_all(b"first\n").unwrap();
        wait_for(1);
        assert_eq!(writes(), [b"first\n"], "the first line, written at once");
        queue.write_all(b"second\n").unwrap();
        queue.write_all(b"third\n").unwrap();
        let half = vec![b'x'; 1 << 15];
        queue.write_all(&half).unwrap();
        wait_for(2);
        let gathered = [&b"second\nthird\n"[..], &half].concat();
        assert_eq!(writes(), [b"first\n".to_vec(), gathered], "half the buffer");
        queue.write_all(b"last\n").unwrap();
        drop(guard);
        assert_eq!(writes().len(), 3);
        assert_eq!(writes()[2], b"last\n", "the flush at the end");
    }
}
