//! Sizes as people write and read them.
//!
//! Input: a number, possibly with a fraction, and a unit. Binary units are `KiB`, `MiB`,
//! `GiB`, `TiB` and their one-letter forms `K`, `M`, `G`, `T` (as in qemu-img and dd); decimal
//! units are `KB`, `MB`, `GB`, `TB` (powers of 1000, as disk makers and EBS's GB count); no unit
//! or `B` is bytes. The result must be a whole number of bytes.
//!
//! Output: [`human_size`], binary units with at most one decimal.

const BINARY: [(&str, u64); 9] = [
    ("B", 1),
    ("K", 1 << 10),
    ("KiB", 1 << 10),
    ("M", 1 << 20),
    ("MiB", 1 << 20),
    ("G", 1 << 30),
    ("GiB", 1 << 30),
    ("T", 1 << 40),
    ("TiB", 1 << 40),
];
const DECIMAL: [(&str, u64); 4] = [
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// The bytes in one `unit` (case-insensitive for two-letter units and longer).
fn unit_of(unit: &str) -> Option<u64> {
    if unit.is_empty() {
        return Some(1);
    }
    BINARY
        .iter()
        .chain(DECIMAL.iter())
        .find(|(u, _)| u.eq_ignore_ascii_case(unit) && (unit.len() > 1 || *u == unit))
        .or_else(|| {
            // `k` is common for kilo; other one-letter units are upper case only (`m` could be
            // read as milli).
            (unit == "k").then_some(&BINARY[1])
        })
        .map(|(_, m)| *m)
}

/// Parses a size such as `4096`, `512MiB`, `1.5GiB`, `10G` (GiB) or `10GB` (10⁹ bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) => (w, f),
        None => (num, ""),
    };
    let valid_number = !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(num.contains('.') && frac.is_empty());
    if !valid_number {
        return Err(format!(
            "invalid size {s:?}: expected a number and a unit, e.g. 4096, 512MiB, 1.5GiB or 10GB"
        ));
    }
    let Some(mult) = unit_of(unit) else {
        return Err(format!(
            "invalid size unit {unit:?} in {s:?}: use B, KiB, MiB, GiB, TiB (or K, M, G, T: the \
             same), or KB, MB, GB, TB (powers of 1000)"
        ));
    };
    let too_large = || format!("size {s:?} is too large");
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole.checked_mul(mult).ok_or_else(too_large)?;
    if !frac.is_empty() {
        // frac / 10^len of a unit, exactly: at most 12 digits keep 10^len * mult in u128.
        if frac.len() > 12 {
            return Err(format!("size {s:?} has more decimals than make sense"));
        }
        let scale = 10u128.pow(frac.len() as u32);
        let f: u128 = frac.parse().map_err(|_| too_large())?;
        let part = f * u128::from(mult);
        if !part.is_multiple_of(scale) {
            return Err(format!(
                "size {s:?} is not a whole number of bytes; give it in a smaller unit"
            ));
        }
        let part = u64::try_from(part / scale).map_err(|_| too_large())?;
        bytes = bytes.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// `1073741824` → `1 GiB`, `1610612736` → `1.5 GiB`, `1000` → `1000 B`: binary units, one
/// decimal at most (rounded; callers that need the exact count print the bytes too).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_units_and_fractions() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10gib"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("10 GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size("2.25TB"), Ok(2_250_000_000_000));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        for (s, says) in [
            ("", "expected a number"),
            ("MiB", "expected a number"),
            ("1.", "expected a number"),
            (".5G", "expected a number"),
            ("1.2.3G", "expected a number"),
            ("-1G", "expected a number"),
            ("5 parsecs", "unit \"parsecs\""),
            ("5m", "unit \"m\""),
            ("0.3B", "whole number of bytes"),
            ("1.0000001KiB", "whole number of bytes"),
            ("99999999999TiB", "too large"),
            ("18446744073709551616", "too large"),
        ] {
            let e = parse_size(s).expect_err(s);
            assert!(e.contains(says), "{s:?}: {e}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1000), "1000 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(68_000_000_000), "63.3 GiB");
        assert_eq!(human_size(u64::MAX), "16777216 TiB");
    }
}
