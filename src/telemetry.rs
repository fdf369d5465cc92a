//! Logs: `tracing` to stdout through a writer off the request path.
//!
//! A request's canonical line is formatted on the request's task and handed, whole, to a
//! bounded queue; one thread writes the queue out through a 64 KiB buffer, flushed whenever the
//! queue runs empty: under load one `write` carries many lines, instead of one `write` per line
//! on the request path. When the queue is full, a line is dropped, not waited for, and counted
//! (`connector_proxy_log_lines_dropped_total`): a slow terminal or log collector cannot stall
//! requests. Written here rather than taken from `tracing-appender`, whose non-blocking writer
//! does the same but brings `time`, `symlink` and crossbeam for its file rotation.

use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds: about 2.5 MiB of canonical lines at the most.
const QUEUE_LINES: usize = 8192;

static DROPPED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber (filtered by `RUST_LOG`, `info` by default), writing to
/// stdout off the request path. Keep the guard until the process ends: dropping it writes out
/// what is queued.
pub fn init(format: LogFormat) -> LogGuard {
    let (queue, guard) = Queue::start(io::stdout(), QUEUE_LINES);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(queue);
    match format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().flatten_event(true).init(),
    }
    guard
}

/// Log lines dropped so far because the queue was full.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// What the writer thread is sent.
enum Message {
    Line(Vec<u8>),
    /// Write out everything before this, then answer.
    Flush(SyncSender<()>),
}

/// The sending side: `tracing-subscriber` asks it for a writer per event and writes the
/// formatted line into it in one `write`.
#[derive(Clone)]
pub struct Queue {
    lines: SyncSender<Message>,
}

/// At the end of the process: writes out what is queued (waiting a second at the most).
pub struct LogGuard {
    lines: SyncSender<Message>,
}

impl Queue {
    /// A queue of `capacity` lines, written to `out` by a thread of its own.
    pub fn start<W: Write + Send + 'static>(out: W, capacity: usize) -> (Self, LogGuard) {
        let (lines, received) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("connector-proxy-log".into())
            .spawn(move || write_out(received, out))
            .expect("the log thread starts");
        let guard = LogGuard {
            lines: lines.clone(),
        };
        (Self { lines }, guard)
    }
}

/// Writes lines as they come, many per `write` when they come fast: the buffer is flushed when
/// the queue runs empty (or fills the buffer), not after each line.
fn write_out<W: Write>(queue: Receiver<Message>, out: W) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let handle = |message, out: &mut BufWriter<W>| match message {
        Message::Line(line) => {
            let _ = out.write_all(&line);
        }
        Message::Flush(done) => {
            let _ = out.flush();
            let _ = done.send(());
        }
    };
    while let Ok(message) = queue.recv() {
        handle(message, &mut out);
        loop {
            match queue.try_recv() {
                Ok(message) => handle(message, &mut out),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return drop(out.flush()),
            }
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

impl Write for Queue {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        match self.lines.try_send(Message::Line(line.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            // The writer thread is gone (the process is ending): nothing to be done.
            Err(TrySendError::Disconnected(_)) => {}
        }
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
        // The global subscriber holds a sender for the life of the process, so the thread does
        // not end by itself: ask it to write out what is queued, and wait for that.
        let (done, written) = sync_channel(1);
        let wait = std::time::Duration::from_secs(1);
        if self.lines.send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    #[test]
    fn lines_queued_together_go_out_in_one_write_and_a_full_queue_drops_and_counts() {
        let recorder = Recorder::default();
        let (lines, received) = sync_channel(4);
        let mut queue = Queue { lines };
        let before = dropped_lines();
        for i in 0..6 {
            queue.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        // Four fit; the fifth and sixth were dropped and counted, without blocking.
        assert_eq!(dropped_lines() - before, 2);
        drop(queue);
        write_out(received, recorder.clone());
        let writes = recorder.0.lock().unwrap();
        assert_eq!(writes.len(), 1, "one write for the four queued lines");
        assert_eq!(writes[0], b"line 0\nline 1\nline 2\nline 3\n");
    }
}
