//! Summaries of timing samples: median with quartiles and extremes, and ratios of medians.

use serde::Serialize;
use std::time::Duration;

/// The distribution of one set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    #[serde(rename = "min_ms", serialize_with = "ms")]
    pub min: f64,
    /// 25th percentile.
    #[serde(rename = "p25_ms", serialize_with = "ms")]
    pub p25: f64,
    /// Median.
    #[serde(rename = "p50_ms", serialize_with = "ms")]
    pub p50: f64,
    /// 75th percentile.
    #[serde(rename = "p75_ms", serialize_with = "ms")]
    pub p75: f64,
    /// Largest sample.
    #[serde(rename = "max_ms", serialize_with = "ms")]
    pub max: f64,
}

/// The `q` quantile (0..=1) of sorted values, linearly interpolated between closest ranks.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Summary {
    /// Summarises `samples` (milliseconds); `None` when there are none.
    pub fn of_ms(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            n: sorted.len(),
            min: sorted[0],
            p25: quantile(&sorted, 0.25),
            p50: quantile(&sorted, 0.5),
            p75: quantile(&sorted, 0.75),
            max: sorted[sorted.len() - 1],
        })
    }

    /// Summarises durations.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Summary::of_ms(&ms)
    }

    /// `p50 (p25–p75)` or, with fewer than 5 samples, `p50 (min–max)`, in ms.
    pub fn display(&self) -> String {
        if self.n >= 5 {
            format!(
                "{} ({}–{})",
                fmt_ms(self.p50),
                fmt_ms(self.p25),
                fmt_ms(self.p75)
            )
        } else if self.n > 1 {
            format!(
                "{} (min–max {}–{}, n={})",
                fmt_ms(self.p50),
                fmt_ms(self.min),
                fmt_ms(self.max),
                self.n
            )
        } else {
            format!("{} (n=1)", fmt_ms(self.p50))
        }
    }
}

/// Serialises milliseconds rounded to microseconds.
fn ms<S: serde::Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round3(*value))
}

/// Rounds to three decimals (microseconds when the unit is ms).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Milliseconds with a precision that suits the magnitude: `0.84 ms`, `12.3 ms`, `1,234 ms`.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{} ms", group_thousands(ms.round() as u64))
    }
}

/// `12345` → `12,345`.
pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quartiles_interpolate_between_ranks() {
        let s = Summary::of_ms(&[4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!(
            (s.min, s.p25, s.p50, s.p75, s.max),
            (1.0, 2.0, 3.0, 4.0, 5.0)
        );
        let even = Summary::of_ms(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(even.p50, 2.5);
        assert!(Summary::of_ms(&[]).is_none());
        assert_eq!(Summary::of_ms(&[7.0]).unwrap().display(), "7.00 ms (n=1)");
    }

    #[test]
    fn formats_milliseconds_by_magnitude() {
        assert_eq!(fmt_ms(0.8449), "0.84 ms");
        assert_eq!(fmt_ms(12.34), "12.3 ms");
        assert_eq!(fmt_ms(1234.4), "1,234 ms");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(group_thousands(100), "100");
    }
}
