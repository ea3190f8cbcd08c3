//! A model, not a measurement: how many bytes and serial round trips a workload's demand misses
//! would cost at other fetch granularities, replayed from a recorded profile (`run --record`)
//! against a layer's index. It weighs the startup issue's lever 2 (fetch less than a whole span)
//! before the index format changes for it. Each profile file, in order, is a miss if any of its
//! bytes are not local; a miss costs one round trip plus its new bytes at the link's rate.
//! Compressed positions inside a span are interpolated from uncompressed ones (the index keeps
//! only span boundaries), so the figures are estimates.

use std::path::PathBuf;

use lazylayer_index::{LayerIndex, SpanStart};

/// Options of `lazylayer-bench granularity`.
#[derive(clap::Args)]
pub struct Args {
    /// A layer's index file (e.g. ROOT/indexes/sha256/HEX of a store that pulled it).
    #[arg(long)]
    index: PathBuf,
    /// A prefetch profile recorded on that layer (ROOT/profiles/MANIFEST.json).
    #[arg(long)]
    profile: PathBuf,
    /// Link bandwidth in Mbit/s.
    #[arg(long, default_value_t = 100)]
    mbit: u64,
    /// Round-trip time in milliseconds.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
}

/// How a miss is fetched.
struct Granularity {
    name: &'static str,
    /// Verified chunk size inside a span (the fetch ends at the chunk holding the file's end);
    /// `None`: whole spans.
    chunk: Option<u64>,
    /// Checkpoint spacing inside a span (the fetch starts at the checkpoint before the file,
    /// plus its window); `None`: the span's own checkpoint only.
    checkpoint: Option<u64>,
    /// Each file compressed on its own (eStargz, zstd:chunked): exactly its bytes, no window.
    per_file: bool,
}

const GRANULARITIES: [Granularity; 5] = [
    Granularity {
        name: "whole spans (today)",
        chunk: None,
        checkpoint: None,
        per_file: false,
    },
    Granularity {
        name: "64 KiB verified chunks",
        chunk: Some(64 << 10),
        checkpoint: None,
        per_file: false,
    },
    Granularity {
        name: "+ checkpoints every 256 KiB",
        chunk: Some(64 << 10),
        checkpoint: Some(256 << 10),
        per_file: false,
    },
    Granularity {
        name: "+ checkpoints every 128 KiB",
        chunk: Some(32 << 10),
        checkpoint: Some(128 << 10),
        per_file: false,
    },
    Granularity {
        name: "per file (eStargz-like)",
        chunk: None,
        checkpoint: None,
        per_file: true,
    },
];

pub async fn run(args: Args) -> anyhow::Result<()> {
    let index = LayerIndex::open(&args.index)?;
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&args.profile)?)?;
    let layer = index.blob_digest.to_string();
    let files: Vec<&str> = profile["files"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|f| f["layer"].as_str() == Some(layer.as_str()))
        .filter_map(|f| f["path"].as_str())
        .collect();
    let windows: Vec<u64> = index
        .spans
        .iter()
        .filter_map(|s| match s.start {
            SpanStart::Deflate { window_len, .. } => Some(window_len as u64),
            SpanStart::Fresh | SpanStart::Chunk { .. } | SpanStart::Continue => None,
        })
        .collect();
    let window = windows.iter().sum::<u64>() / windows.len().max(1) as u64;
    println!(
        "{} profile files of layer {layer}; {} spans; mean stored window {} KiB; link {} Mbit/s, {} ms",
        files.len(),
        index.spans.len(),
        window >> 10,
        args.mbit,
        args.latency_ms
    );
    println!(
        "{:32} {:>7} {:>10} {:>10}",
        "granularity", "misses", "fetched", "estimate"
    );
    let rate = (args.mbit * 1_000_000 / 8) as f64;
    for g in &GRANULARITIES {
        let (misses, bytes) = replay(&index, &files, g, window);
        let seconds = misses as f64 * args.latency_ms as f64 / 1000.0 + bytes as f64 / rate;
        println!(
            "{:32} {:>7} {:>6.1} MiB {:>9.2}s",
            g.name,
            misses,
            bytes as f64 / (1 << 20) as f64,
            seconds
        );
    }
    Ok(())
}

/// Misses and compressed bytes fetched for `files` in order at granularity `g`.
fn replay(index: &LayerIndex, files: &[&str], g: &Granularity, window: u64) -> (usize, u64) {
    // Per span: compressed intervals already local, and checkpoints whose window is local.
    let mut local: Vec<Vec<(u64, u64)>> = vec![Vec::new(); index.spans.len()];
    let mut windows = std::collections::HashSet::new();
    let (mut misses, mut total) = (0, 0);
    for path in files {
        let Some(entry) = index.entry(path.as_bytes()) else {
            continue;
        };
        let size = entry.stored_size();
        if size == 0 {
            continue;
        }
        let (start, end) = (entry.data_offset, entry.data_offset + size);
        let (first, last) = (index.span_at(start), index.span_at(end - 1));
        let mut need = 0;
        for (i, here) in local.iter_mut().enumerate().take(last + 1).skip(first) {
            let span = &index.spans[i];
            let at = |offset: u64| compressed_at(index, i, offset);
            if g.per_file {
                let (from, to) = (at(start.max(span.uncompressed_start)), at(end));
                need += missing(here, from, to.max(from + 1));
                continue;
            }
            let mut from = span.compressed_start;
            if let Some(spacing) = g.checkpoint
                && i == first
            {
                let checkpoint = from + (at(start) - from) / spacing * spacing;
                if checkpoint > from && !covered(here, checkpoint, at(start)) {
                    if windows.insert((i, checkpoint)) {
                        need += window;
                    }
                    from = checkpoint;
                }
            }
            let to = match g.chunk {
                Some(chunk) if i == last => {
                    let rel = (at(end) - span.compressed_start).div_ceil(chunk) * chunk;
                    (span.compressed_start + rel).min(span.compressed_end)
                }
                _ => span.compressed_end,
            };
            need += missing(here, from, to);
        }
        if need > 0 {
            misses += 1;
            total += need;
        }
    }
    (misses, total)
}

/// The compressed offset of uncompressed `offset` in span `i`, interpolated.
fn compressed_at(index: &LayerIndex, i: usize, offset: u64) -> u64 {
    let span = &index.spans[i];
    let (u0, u1) = (span.uncompressed_start, index.span_uncompressed_end(i));
    let fraction = (offset.clamp(u0, u1) - u0) as f64 / (u1 - u0).max(1) as f64;
    span.compressed_start + ((span.compressed_end - span.compressed_start) as f64 * fraction) as u64
}

fn covered(local: &[(u64, u64)], from: u64, to: u64) -> bool {
    local.iter().any(|&(a, b)| a <= from && to <= b)
}

/// Bytes of `from..to` not in `local`, which then holds them (kept sorted and disjoint).
fn missing(local: &mut Vec<(u64, u64)>, from: u64, to: u64) -> u64 {
    if from >= to {
        return 0;
    }
    let inside: u64 = local
        .iter()
        .map(|&(a, b)| b.min(to).saturating_sub(a.max(from)))
        .sum();
    local.push((from, to));
    local.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(local.len());
    for &(a, b) in local.iter() {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    *local = merged;
    (to - from) - inside
}
