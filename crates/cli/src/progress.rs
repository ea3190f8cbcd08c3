//! Progress people can see: bars on a terminal (bytes, files, rate, ETA), nothing when stderr
//! is not a terminal (indicatif hides its bars then).

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// A bar counting bytes of `total`, labelled `label`.
pub fn bytes(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Bars for layers being populated: files filled, data in place, bytes fetched, rate, ETA.
pub struct LayerBars {
    multi: MultiProgress,
    bars: Vec<ProgressBar>,
}

impl LayerBars {
    /// One bar per layer.
    pub fn new(labels: &[String]) -> LayerBars {
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> ");
        let bars = labels
            .iter()
            .map(|label| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(label.clone());
                bar.enable_steady_tick(Duration::from_millis(250));
                bar
            })
            .collect();
        LayerBars { multi, bars }
    }

    /// Updates layer `i`.
    pub fn update(&self, i: usize, layer: &lazylayer_daemon::LayerStatus) {
        let bar = &self.bars[i];
        bar.set_length(layer.bytes);
        bar.set_position(layer.bytes_populated);
        bar.set_message(format!(
            "files {}/{} fetched {}",
            layer.files_populated,
            layer.files,
            indicatif::HumanBytes(layer.bytes_fetched)
        ));
    }

    /// Ends the bars.
    pub fn finish(self) {
        for bar in &self.bars {
            bar.finish();
        }
        let _ = self.multi.clear();
    }
}
