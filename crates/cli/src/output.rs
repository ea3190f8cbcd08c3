//! Writing results to stdout: a closed pipe (`lazylayer inspect --files | head`) ends the
//! output quietly instead of panicking.

use std::io::Write;

/// Prints `text` to stdout; a reader that went away is not an error.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::anyhow!("writing to stdout: {e}")),
    }
}
