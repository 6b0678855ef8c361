//! Error metrics for lossy reconstructions of a tensor: SQNR in dB and relative Frobenius error. Sums run in
//! f64 in index order, so the figures do not depend on thread count.

/// Signal energy `sum(w^2)` and error energy `sum((w - w_hat)^2)`.
pub fn energies(original: &[f32], reconstructed: &[f32]) -> (f64, f64) {
    assert_eq!(original.len(), reconstructed.len());
    original
        .iter()
        .zip(reconstructed)
        .fold((0.0, 0.0), |(signal, error), (&w, &r)| {
            let d = w as f64 - r as f64;
            (signal + (w as f64).powi(2), error + d * d)
        })
}

/// Signal-to-quantization-noise ratio `10 log10(sum w^2 / sum (w - w_hat)^2)` in dB; infinite when exact.
pub fn sqnr_db(original: &[f32], reconstructed: &[f32]) -> f64 {
    let (signal, error) = energies(original, reconstructed);
    10.0 * (signal / error).log10()
}

/// Relative Frobenius error `||w - w_hat|| / ||w||` (NaN for an all-zero original).
pub fn relative_frobenius(original: &[f32], reconstructed: &[f32]) -> f64 {
    let (signal, error) = energies(original, reconstructed);
    (error / signal).sqrt()
}

/// The median of a list of figures (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqnr_and_relative_error_agree() {
        let w = [1.0f32, -2.0, 3.0, 0.5];
        let r = [1.1f32, -2.0, 2.9, 0.5];
        let rel = relative_frobenius(&w, &r);
        let sqnr = sqnr_db(&w, &r);
        assert!((sqnr + 20.0 * rel.log10()).abs() < 1e-9);
        // 0.02 error energy against 14.25 signal energy.
        assert!((rel - (0.02f64 / 14.25).sqrt()).abs() < 1e-6);
        assert!(sqnr_db(&w, &w).is_infinite());
    }

    #[test]
    fn median_of_odd_and_even_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
