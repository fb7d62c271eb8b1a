//! The statistics of `cargo xtask bench`: interleaving order, median/min/max, paired ratios.
//! Pure functions, so the unit tests below check them without timing anything.

/// Median, min and max of a series of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// Summarizes samples (NaNs are dropped); `None` when there is nothing to summarize.
/// An even count takes the mean of the two middle samples as the median.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// Per-round ratios `a[i] / b[i]` of two interleaved series (rounds where either is missing or
/// `b` is zero are skipped). Pairing samples of the same round cancels slow drift in machine
/// load, which is why the runs are interleaved.
pub fn paired_ratios(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter_map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) if *y != 0.0 => Some(x / y),
            _ => None,
        })
        .collect()
}

/// The ratio of two medians.
pub fn ratio_of_medians(a: &Summary, b: &Summary) -> f64 {
    a.median / b.median
}

/// The order of the runs: round by round, every variant once per round (A B C A B C ...).
/// Each item is `(round, variant)`.
pub fn schedule(variants: usize, rounds: usize) -> Vec<(usize, usize)> {
    (0..rounds)
        .flat_map(|r| (0..variants).map(move |v| (r, v)))
        .collect()
}

/// Whether `value` meets a target: `at_most` for costs, otherwise for rates (at least).
pub fn met(value: f64, target: f64, at_most: bool) -> bool {
    if at_most {
        value <= target
    } else {
        value >= target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_extremes() {
        let s = summarize(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        let s = summarize(&[7.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (7.0, 7.0, 7.0));
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[f64::NAN]).is_none());
        let s = summarize(&[f64::NAN, 2.0, 1.0]).unwrap();
        assert_eq!((s.median, s.n), (1.5, 2));
    }

    #[test]
    fn ratios_pair_rounds() {
        let a = [Some(2.0), Some(3.0), None, Some(8.0)];
        let b = [Some(1.0), Some(2.0), Some(1.0), Some(0.0)];
        // Round 2 lacks `a`, round 3 has a zero floor: both skipped.
        assert_eq!(paired_ratios(&a, &b), vec![2.0, 1.5]);
        let r = summarize(&paired_ratios(&a, &b)).unwrap();
        assert_eq!(r.median, 1.75);
        let sa = summarize(&[2.0, 3.0, 4.0]).unwrap();
        let sb = summarize(&[1.0, 2.0, 2.0]).unwrap();
        assert_eq!(ratio_of_medians(&sa, &sb), 1.5);
    }

    #[test]
    fn schedule_interleaves_a_b_a_b() {
        assert_eq!(
            schedule(2, 3),
            vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
        );
        let s = schedule(3, 2);
        let variants: Vec<usize> = s.iter().map(|&(_, v)| v).collect();
        assert_eq!(variants, vec![0, 1, 2, 0, 1, 2]);
        // Every variant runs once per round.
        for r in 0..2 {
            let mut in_round: Vec<usize> = s
                .iter()
                .filter(|&&(rr, _)| rr == r)
                .map(|&(_, v)| v)
                .collect();
            in_round.sort();
            assert_eq!(in_round, vec![0, 1, 2]);
        }
        assert!(schedule(0, 5).is_empty());
        assert!(schedule(3, 0).is_empty());
    }

    #[test]
    fn targets() {
        assert!(met(1.15, 1.15, true));
        assert!(!met(1.2, 1.15, true));
        assert!(met(100.0, 100.0, false));
        assert!(!met(99.0, 100.0, false));
    }
}
