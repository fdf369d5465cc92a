//! What starts a reload besides `POST /reload`: SIGHUP, and with `server.reload_on_change` a
//! change to the configuration file or to a file it names.
//!
//! Changes are found by polling a fingerprint of the files' contents, as Prometheus's
//! `auto-reload-config` does, not by inotify: Kubernetes updates a mounted ConfigMap or Secret
//! by swapping a symlink to a new folder, which a watch on the file itself never sees, and a
//! poll needs no dependency and works the same on every filesystem.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;

/// How often the files are read with `server.reload_on_change`. A ConfigMap update reaches a
/// pod's volume within a minute or so; two more seconds do not matter, and reading a few small
/// files every two seconds costs nothing.
pub const POLL: Duration = Duration::from_secs(2);

#[cfg(unix)]
pub async fn on_sighup(app: Arc<App>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /reload on the admin listener");
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let _ = app.reload().await;
    }
}

#[cfg(not(unix))]
pub async fn on_sighup(_: Arc<App>) {}

/// Reloads when the fingerprint of the watched files changes. A change that makes a bad
/// configuration is refused once (logged and counted as any failed reload) and not tried
/// again until the files change again. The setting is read at every poll, so that a reload
/// can switch it on or off.
pub async fn on_change(app: Arc<App>, every: Duration) {
    let mut last = match app.watched_files() {
        Some(files) => Some(fingerprint(files).await),
        None => None,
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(files) = app.watched_files() else {
            last = None;
            continue;
        };
        let now = fingerprint(files).await;
        match last {
            Some(before) if before != now => {
                tracing::info!("the configuration file or a file it names changed: reloading");
                let reloaded = app.reload().await.is_ok();
                // A good reload may name other files: watch what it loaded from now on.
                last = match app.watched_files() {
                    Some(files) if reloaded => Some(fingerprint(files).await),
                    _ => Some(now),
                };
            }
            _ => last = Some(now),
        }
    }
}

/// A hash of each file's path and content (or of its being unreadable, so that a file that goes
/// and comes back counts as a change).
async fn fingerprint(files: Vec<PathBuf>) -> u64 {
    let read = tokio::task::spawn_blocking(move || {
        let mut hasher = DefaultHasher::new();
        for path in &files {
            path.hash(&mut hasher);
            match std::fs::read(path) {
                Ok(content) => content.hash(&mut hasher),
                Err(e) => e.kind().hash(&mut hasher),
            }
        }
        hasher.finish()
    });
    read.await.unwrap_or_default()
}
