//! Exact resource quantities and per-job demands.
//!
//! GPU shares and CPUs are counted in thousandths ([`Milli`]), so `0.5 + 0.25 + 0.25`
//! fills one GPU exactly and no float drift can oversubscribe a device.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A non-negative quantity in thousandths of a unit (1 GPU = `Milli(1000)`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Milli(pub u64);

/// Why a textual quantity is not a valid [`Milli`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("'{0}' is not a number")]
    NotANumber(String),
    #[error("'{0}' must be greater than 0")]
    NotPositive(String),
    #[error("'{0}' has more than 3 decimal places (the smallest share is 0.001)")]
    TooPrecise(String),
    #[error("'{0}' is too large")]
    TooLarge(String),
}

impl Milli {
    pub const ZERO: Milli = Milli(0);
    pub const ONE: Milli = Milli(1000);
    /// Upper bound accepted for any single quantity (one million units).
    pub const MAX: Milli = Milli(1_000_000_000);

    pub fn from_units(units: u64) -> Milli {
        Milli(units.saturating_mul(1000))
    }

    /// Parses a decimal like `4`, `0.5`, `0.125`, `2.0`, `1e3` exactly.
    /// Rejects negatives, zero, NaN/inf, more than 3 decimals and absurd sizes.
    ///
    /// ```
    /// use skyspool::resources::Milli;
    /// let half = Milli::parse_positive("0.5").unwrap();
    /// let quarter = Milli::parse_positive("0.25").unwrap();
    /// assert_eq!(half + quarter + quarter, Milli::ONE); // exact: no float drift
    /// assert!(Milli::parse_positive("0.33333333333").is_err());
    /// assert!(Milli::parse_positive("-1").is_err());
    /// ```
    pub fn parse_positive(text: &str) -> Result<Milli, QuantityError> {
        let s = text.trim();
        let bad = || QuantityError::NotANumber(text.to_string());
        if s.is_empty() {
            return Err(bad());
        }
        if s.starts_with('-') {
            return Err(QuantityError::NotPositive(text.to_string()));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        // Split an optional exponent (YAML floats like 1e3 / 1.5E+2).
        let (mantissa, exp) = match s.find(['e', 'E']) {
            Some(i) => {
                let e: i32 = s[i + 1..].parse().map_err(|_| bad())?;
                (&s[..i], e)
            }
            None => (s, 0),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((a, b)) => (a, b),
            None => (mantissa, ""),
        };
        if (int_part.is_empty() && frac_part.is_empty())
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        // digits as one integer with `scale` decimal places, then shift by exp.
        let digits: String = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        let mut scale: i32 = frac_part.len() as i32 - exp;
        // Drop trailing zeros that only add precision.
        let mut digits = digits.to_string();
        while scale > 0 && digits.ends_with('0') {
            digits.pop();
            scale -= 1;
        }
        if digits.is_empty() {
            return Err(QuantityError::NotPositive(text.to_string()));
        }
        if scale > 3 {
            return Err(QuantityError::TooPrecise(text.to_string()));
        }
        if digits.len() > 12 {
            return Err(QuantityError::TooLarge(text.to_string()));
        }
        let mut value: u64 = digits.parse().map_err(|_| bad())?;
        let mut shift = 3 - scale; // multiply by 10^shift
        while shift > 0 {
            value = value
                .checked_mul(10)
                .ok_or_else(|| QuantityError::TooLarge(text.to_string()))?;
            shift -= 1;
        }
        let m = Milli(value);
        if m > Milli::MAX {
            return Err(QuantityError::TooLarge(text.to_string()));
        }
        Ok(m)
    }

    pub fn is_whole(self) -> bool {
        self.0 % 1000 == 0
    }

    /// Number of whole units, rounding up (0.5 GPU -> 1).
    pub fn ceil_units(self) -> u64 {
        self.0.div_ceil(1000)
    }

    pub fn saturating_sub(self, other: Milli) -> Milli {
        Milli(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Add for Milli {
    type Output = Milli;
    fn add(self, o: Milli) -> Milli {
        Milli(self.0.saturating_add(o.0))
    }
}

impl std::ops::AddAssign for Milli {
    fn add_assign(&mut self, o: Milli) {
        self.0 = self.0.saturating_add(o.0);
    }
}

impl std::ops::SubAssign for Milli {
    fn sub_assign(&mut self, o: Milli) {
        self.0 = self.0.saturating_sub(o.0);
    }
}

impl fmt::Display for Milli {
    /// `4`, `0.5`, `0.125`, `1.25`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1000;
        let frac = self.0 % 1000;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{frac:03}");
            write!(f, "{whole}.{}", s.trim_end_matches('0'))
        }
    }
}

/// One acceptable accelerator demand per node, e.g. `H100:0.5`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AccelDemand {
    /// Accelerator type as written by the user (matching is case-insensitive).
    pub kind: String,
    /// Per-node count: a whole number >= 1, or a fraction in (0, 1).
    pub count: Milli,
}

impl fmt::Display for AccelDemand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.count)
    }
}

/// What one node must have free for the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeDemand {
    /// Alternatives in the user's order of preference; empty = no accelerator.
    pub accelerators: Vec<AccelDemand>,
    /// CPUs taken while the job runs (SkyPilot's default demand is 0.5).
    pub cpus: Milli,
}

/// The whole job's demand: `num_nodes` distinct nodes, each with `per_node` free.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Demand {
    pub num_nodes: u32,
    pub per_node: NodeDemand,
}

/// SkyPilot's CPU demand for a job that names no `cpus`.
pub const DEFAULT_JOB_CPUS: Milli = Milli(500);

impl Demand {
    /// The `sky queue` RESOURCES column: `1x[H100:1]`, `2x[T4:0.5]`, `1x[CPU:1+]`.
    ///
    /// ```
    /// use skyspool::resources::{AccelDemand, Demand, Milli, NodeDemand};
    /// let d = Demand {
    ///     num_nodes: 2,
    ///     per_node: NodeDemand {
    ///         accelerators: vec![AccelDemand { kind: "H100".into(), count: Milli(4000) }],
    ///         cpus: Milli(500),
    ///     },
    /// };
    /// assert_eq!(d.display_resources(false), "2x[H100:4]");
    /// ```
    pub fn display_resources(&self, cpus_plus: bool) -> String {
        let inner = match self.per_node.accelerators.first() {
            Some(a) if self.per_node.accelerators.len() == 1 => a.to_string(),
            Some(_) => self
                .per_node
                .accelerators
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join("|"),
            None => format!(
                "CPU:{}{}",
                self.per_node.cpus,
                if cpus_plus { "+" } else { "" }
            ),
        };
        format!("{}x[{}]", self.num_nodes, inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_quantities() {
        assert_eq!(Milli::parse_positive("4"), Ok(Milli(4000)));
        assert_eq!(Milli::parse_positive("0.5"), Ok(Milli(500)));
        assert_eq!(Milli::parse_positive(".25"), Ok(Milli(250)));
        assert_eq!(Milli::parse_positive("2.0"), Ok(Milli(2000)));
        assert_eq!(Milli::parse_positive("1e3"), Ok(Milli(1_000_000)));
        assert_eq!(Milli::parse_positive("1.5E+1"), Ok(Milli(15_000)));
        assert_eq!(Milli::parse_positive("0.125"), Ok(Milli(125)));
        assert_eq!(Milli::parse_positive("0.50000"), Ok(Milli(500)));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["-1", "0", "0.0", "nan", "inf", "", "abc", "1..2", "1e"] {
            assert!(Milli::parse_positive(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Milli::parse_positive("0.33333333333"),
            Err(QuantityError::TooPrecise(_))
        ));
        assert!(matches!(
            Milli::parse_positive("1e9"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn fractions_add_exactly() {
        let q = Milli::parse_positive("0.25").unwrap();
        assert_eq!(Milli(500) + q + q, Milli::ONE);
        assert_eq!(Milli(500).to_string(), "0.5");
        assert_eq!(Milli(4000).to_string(), "4");
        assert_eq!(Milli(1250).to_string(), "1.25");
        assert_eq!(Milli(500).ceil_units(), 1);
    }

    #[test]
    fn resources_column() {
        let d = Demand {
            num_nodes: 2,
            per_node: NodeDemand {
                accelerators: vec![AccelDemand {
                    kind: "T4".into(),
                    count: Milli(500),
                }],
                cpus: DEFAULT_JOB_CPUS,
            },
        };
        assert_eq!(d.display_resources(false), "2x[T4:0.5]");
        let c = Demand {
            num_nodes: 1,
            per_node: NodeDemand {
                accelerators: vec![],
                cpus: Milli(1000),
            },
        };
        assert_eq!(c.display_resources(true), "1x[CPU:1+]");
    }
}
