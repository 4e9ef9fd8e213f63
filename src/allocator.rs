//! What the gateway asks of the process's allocator, which the binary chooses (`src/main.rs`
//! installs jemalloc). Parsing a config file is the one large, short use of memory: 2.6 KB a key
//! while it lasts, against 0.25 KB a key kept. jemalloc returns freed pages only as it goes on
//! allocating, or from its background thread, which may sleep through a single large free; so
//! the parse's pages are handed back explicitly once the config is built.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Set once, by the binary: a function that returns the allocator's freed pages to the system.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Returns freed pages to the system now (nothing where the binary set no allocator hook, as
/// in tests that build a gateway in process).
pub fn release_freed() {
    if let Some(release) = RELEASE.get() {
        release();
    }
}
