//! Data behind the report's plots, recorded by the sections as they measure (beside
//! their figures, which keep only percentiles): lines of (x, y) points and bars of
//! (label, value), grouped by plot.

use std::sync::Mutex;
use twinrun_lock::MutexExt;

#[derive(Clone, Debug)]
pub enum Data {
    /// One line of a line plot: its label and points.
    Line {
        label: String,
        points: Vec<(f64, f64)>,
    },
    /// The bars of a bar plot.
    Bars(Vec<(String, f64)>),
}

#[derive(Clone, Debug)]
pub struct Series {
    /// Plot id (the file name of the plot).
    pub plot: String,
    /// Title, with the units.
    pub title: String,
    pub data: Data,
}

static SERIES: Mutex<Vec<Series>> = Mutex::new(Vec::new());

fn push(s: Series) {
    SERIES.lock_or_recover().push(s);
}

/// A line of plot `plot`.
pub fn line(plot: &str, title: &str, label: &str, points: Vec<(f64, f64)>) {
    push(Series {
        plot: plot.into(),
        title: title.into(),
        data: Data::Line {
            label: label.into(),
            points,
        },
    });
}

/// Bars of plot `plot` (appended to those recorded before).
pub fn bars(plot: &str, title: &str, bars: Vec<(String, f64)>) {
    push(Series {
        plot: plot.into(),
        title: title.into(),
        data: Data::Bars(bars),
    });
}

/// Everything recorded so far.
pub fn all() -> Vec<Series> {
    SERIES.lock_or_recover().clone()
}
