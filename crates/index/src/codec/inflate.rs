//! A safe wrapper over zlib's inflate (zlib-rs through its C API, libz-rs-sys): the zran
//! technique needs `Z_BLOCK`, the bit position in `data_type`, `inflatePrime` and
//! `inflateSetDictionary`, which no safe Rust API exposes. All unsafe code of the crate is here.

use std::ffi::CStr;

use libz_rs_sys::{
    Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END, inflate, inflateEnd, inflateInit2_,
    inflatePrime, inflateReset2, inflateSetDictionary, z_stream, zlibVersion,
};

/// Whether the stream has a gzip wrapper or is raw deflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrapper {
    /// gzip header and trailer (windowBits 15 + 16).
    Gzip,
    /// Raw deflate (windowBits -15), for resuming mid-stream.
    Raw,
}

impl Wrapper {
    fn window_bits(self) -> i32 {
        match self {
            Wrapper::Gzip => 31,
            Wrapper::Raw => -15,
        }
    }
}

/// What one call to inflate did.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output bytes produced.
    pub produced: usize,
    /// The deflate stream (and, with a gzip wrapper, its trailer) is complete.
    pub stream_end: bool,
    /// zlib's `data_type`: unused bits of the last input byte (0..7), +64 in the last block,
    /// +128 right after a block boundary.
    pub data_type: i32,
}

/// An inflate stream.
pub struct Inflater {
    // Boxed: zlib keeps a pointer back to the stream, so it must not move.
    stream: Box<z_stream>,
}

// SAFETY: the z_stream and the state it owns are only touched through &mut self; nothing is
// shared between threads.
unsafe impl Send for Inflater {}

impl Inflater {
    /// A new stream.
    pub fn new(wrapper: Wrapper) -> Result<Self, String> {
        let mut stream = Box::new(z_stream::default());
        // SAFETY: `stream` is a valid, zeroed z_stream with default allocators; the version
        // string and size come from the same library.
        let code = unsafe {
            inflateInit2_(
                stream.as_mut(),
                wrapper.window_bits(),
                zlibVersion(),
                std::mem::size_of::<z_stream>() as i32,
            )
        };
        if code != Z_OK {
            return Err(format!("inflateInit2 failed ({code})"));
        }
        Ok(Inflater { stream })
    }

    /// Starts over (a new gzip member, or a switch between gzip and raw).
    pub fn reset(&mut self, wrapper: Wrapper) -> Result<(), String> {
        // SAFETY: the stream was initialised by inflateInit2_.
        let code = unsafe { inflateReset2(self.stream.as_mut(), wrapper.window_bits()) };
        self.check(code, "inflateReset2")
    }

    /// Feeds `bits` bits of `value` (low bits) before the next input byte.
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), String> {
        // SAFETY: the stream was initialised; bits is at most 7.
        let code = unsafe {
            inflatePrime(
                self.stream.as_mut(),
                i32::from(bits.min(7)),
                i32::from(value),
            )
        };
        self.check(code, "inflatePrime")
    }

    /// Sets the preceding 32 KiB of output that back-references may reach (raw mode only).
    pub fn set_dictionary(&mut self, dictionary: &[u8]) -> Result<(), String> {
        if dictionary.is_empty() {
            return Ok(());
        }
        // SAFETY: the pointer and length describe a live slice for the duration of the call.
        let code = unsafe {
            inflateSetDictionary(
                self.stream.as_mut(),
                dictionary.as_ptr(),
                dictionary.len() as u32,
            )
        };
        self.check(code, "inflateSetDictionary")
    }

    /// Inflates from `input` into `output`. With `stop_at_blocks`, it returns at every deflate
    /// block boundary (Z_BLOCK), which is where checkpoints can be taken.
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_blocks: bool,
    ) -> Result<Step, String> {
        let avail_in = input.len().min(u32::MAX as usize) as u32;
        let avail_out = output.len().min(u32::MAX as usize) as u32;
        self.stream.next_in = input.as_ptr();
        self.stream.avail_in = avail_in;
        self.stream.next_out = output.as_mut_ptr();
        self.stream.avail_out = avail_out;
        let flush = if stop_at_blocks { Z_BLOCK } else { Z_NO_FLUSH };
        // SAFETY: next_in/avail_in and next_out/avail_out describe live slices borrowed for the
        // duration of the call; the stream was initialised.
        let code = unsafe { inflate(self.stream.as_mut(), flush) };
        let step = Step {
            consumed: (avail_in - self.stream.avail_in) as usize,
            produced: (avail_out - self.stream.avail_out) as usize,
            stream_end: code == Z_STREAM_END,
            data_type: self.stream.data_type,
        };
        // Do not keep pointers into the caller's buffers.
        self.stream.next_in = std::ptr::null();
        self.stream.avail_in = 0;
        self.stream.next_out = std::ptr::null_mut();
        self.stream.avail_out = 0;
        match code {
            Z_OK | Z_STREAM_END | Z_BUF_ERROR => Ok(step),
            _ => Err(self.message(code, "inflate")),
        }
    }

    fn check(&self, code: i32, what: &str) -> Result<(), String> {
        if code == Z_OK {
            Ok(())
        } else {
            Err(self.message(code, what))
        }
    }

    fn message(&self, code: i32, what: &str) -> String {
        if self.stream.msg.is_null() {
            format!("{what} failed ({code})")
        } else {
            // SAFETY: zlib sets msg to a static NUL-terminated string.
            let text = unsafe { CStr::from_ptr(self.stream.msg) };
            format!("{what}: {}", text.to_string_lossy())
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised and is ended exactly once.
        unsafe {
            inflateEnd(self.stream.as_mut());
        }
    }
}
