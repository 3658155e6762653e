//! Graphics drivers write to the process's stderr on their own: Mesa's Vulkan device-select
//! layer and EGL print `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` on
//! machines without a display session, lavapipe announces that it is not conformant. Those
//! lines are not cogview's errors. While the graphics APIs are probed and a device is brought
//! up, stderr is a pipe; what the drivers wrote there is logged afterwards at debug level
//! (`-v` shows it), and stderr holds only cogview's own lines.

/// Runs `f` with the driver output it causes captured and logged at debug level. One capture
/// at a time: stderr is one descriptor for the whole process, and a capture started inside
/// another's would keep the first pipe open.
pub fn captured<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let (out, text) = capture(f);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        tracing::debug!("driver output while {what}: {line}");
    }
    out
}

/// Points stderr back at the terminal if a capture is under way, for a panic's message: release
/// builds abort on panic, so a capture's own restore never runs and the message would go into
/// the pipe with the process. For a panic hook; does nothing outside a capture.
pub fn release_for_panic() {
    imp::release_for_panic();
}

/// `f`'s result and what was written to stderr while it ran.
fn capture<T>(f: impl FnOnce() -> T) -> (T, String) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let capture = imp::Capture::start();
    let out = f();
    (out, capture.map(imp::Capture::finish).unwrap_or_default())
}

#[cfg(unix)]
mod imp {
    use std::io::Read;
    use std::os::fd::{FromRawFd, RawFd};
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::thread::JoinHandle;

    /// The saved original stderr while a capture is under way, else -1.
    static SAVED: AtomicI32 = AtomicI32::new(-1);

    pub fn release_for_panic() {
        let saved = SAVED.load(Ordering::SeqCst);
        if saved >= 0 {
            // SAFETY: `saved` stays open until the capture restores it, which clears SAVED
            // first; the process is going down, so the pipe's reader no longer matters.
            unsafe {
                libc::dup2(saved, 2);
            }
        }
    }

    /// stderr redirected into a pipe that a thread drains (so a chatty driver never blocks
    /// on a full pipe).
    pub struct Capture {
        saved: RawFd,
        reader: Option<JoinHandle<String>>,
    }

    impl Capture {
        pub fn start() -> Option<Self> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: plain POSIX calls on descriptors this function owns; stderr (2) is put
            // back by `Drop` whatever happens in between.
            unsafe {
                let saved = libc::dup(2);
                if saved < 0 {
                    return None;
                }
                if libc::pipe(fds.as_mut_ptr()) != 0 {
                    libc::close(saved);
                    return None;
                }
                libc::dup2(fds[1], 2);
                libc::close(fds[1]);
                let mut read_end = std::fs::File::from_raw_fd(fds[0]);
                let reader = std::thread::spawn(move || {
                    let mut bytes = Vec::new();
                    let _ = read_end.read_to_end(&mut bytes);
                    String::from_utf8_lossy(&bytes).into_owned()
                });
                SAVED.store(saved, Ordering::SeqCst);
                Some(Self { saved, reader: Some(reader) })
            }
        }

        /// Puts stderr back and returns what was written meanwhile.
        pub fn finish(mut self) -> String {
            self.restore();
            self.reader.take().and_then(|r| r.join().ok()).unwrap_or_default()
        }

        fn restore(&mut self) {
            if self.saved >= 0 {
                SAVED.store(-1, Ordering::SeqCst);
                // SAFETY: `saved` is the duplicate of the original stderr made in `start`.
                // Pointing 2 back at it closes the pipe's last write end, so the reader ends.
                unsafe {
                    libc::dup2(self.saved, 2);
                    libc::close(self.saved);
                }
                self.saved = -1;
            }
        }
    }

    impl Drop for Capture {
        fn drop(&mut self) {
            self.restore();
        }
    }
}

#[cfg(not(unix))]
mod imp {
    /// Drivers on other systems do not write to the console this way: nothing to capture.
    pub struct Capture;

    impl Capture {
        pub fn start() -> Option<Self> {
            None
        }

        pub fn finish(self) -> String {
            String::new()
        }
    }

    pub fn release_for_panic() {}
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// What is written to the stderr descriptor inside `captured` does not reach it, and
    /// stderr works again after.
    #[test]
    fn writes_to_fd_2_are_captured_and_stderr_comes_back() {
        let msg = b"error: XDG_RUNTIME_DIR is invalid or not set in the environment.\n";
        // SAFETY: writing a buffer to the (redirected) stderr descriptor.
        let (written, text) = capture(|| unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) });
        assert_eq!(written, msg.len() as isize);
        assert_eq!(text.as_bytes(), msg);
        assert_eq!(captured("testing", || 7), 7);
        // The descriptor is the real stderr again: writing to it succeeds.
        assert!(unsafe { libc::write(2, b"".as_ptr().cast(), 0) } >= 0);
    }

    /// After `release_for_panic` (what the CLI's panic hook calls) fd 2 is the real stderr
    /// again inside a capture: a panic's message written then is not swallowed by the pipe.
    #[test]
    fn a_panic_inside_a_capture_reaches_the_real_stderr() {
        let (before, after) = (b"driver line\n", b"(a line the test writes to the real stderr)\n");
        // SAFETY: writing buffers to the stderr descriptor.
        let ((), text) = capture(|| unsafe {
            libc::write(2, before.as_ptr().cast(), before.len());
            release_for_panic();
            libc::write(2, after.as_ptr().cast(), after.len());
        });
        assert_eq!(text.as_bytes(), before);
        release_for_panic(); // outside a capture: nothing to do
        assert!(unsafe { libc::write(2, b"".as_ptr().cast(), 0) } >= 0);
    }
}
