//! Terminals for console tests: the pty side a backend's `--port pty` hands out, in raw mode,
//! and resizing it (which the backend sees through TIOCGWINSZ on its side).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Opens the terminal side of a pty at `path` in raw mode (no echo, no line editing), sized
/// `rows` x `cols`.
pub fn open_raw(path: &Path, rows: u16, cols: u16) -> std::io::Result<File> {
    let terminal = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    resize(&terminal, rows, cols)?;
    // SAFETY: termios calls on our own open descriptor, with a struct they fill first.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(terminal.as_raw_fd(), &mut t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(terminal.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(terminal)
}

/// Sets the terminal's size.
pub fn resize(terminal: &File, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from `ws`.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
