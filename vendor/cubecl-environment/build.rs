use cfg_aliases::cfg_aliases;

fn main() {
    // cogview: declared but never set (the Turso backends are left out).
    println!("cargo::rustc-check-cfg=cfg(native_cache)");
    println!("cargo::rustc-check-cfg=cfg(browser_cache)");
    // Setup cfg aliases
    cfg_aliases! {
        multi_threading: { all(feature = "std", not(target_family = "wasm")) },
        // Targets with a working `thread_local!` (includes single-threaded wasm with std).
        stream_local: { feature = "std" },
        // Filesystem and environment access for config loading and caching.
        std_io: { all(feature = "std", any(target_os = "windows", target_os = "linux", target_os = "macos", target_os = "android")) },
        // cogview: `persistence` on a file system stores one file per entry
        // (persistence/file.rs); the Turso backends (native_cache, browser_cache) are never set.
        file_cache: { all(feature = "persistence", std_io) },
        // Tokio runtime support (never on wasm).
        tokio_rt: { all(feature = "tokio", not(target_family = "wasm")) },
        // TODO: We can't yet activate it for everything because of how error handling is done in matmul.
        backtrace: { all(test, feature="std") },
    }
}
