//! Where a volume's copies go: servers that are up and have room, spreading load (least
//! allocated fraction first) and preferring zones the volume does not use yet.

/// A candidate server as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub zone: String,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub up: bool,
}

impl Candidate {
    fn free(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.allocated_bytes)
    }
}

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{needed} copies of {} need {needed} storage servers with that much free space, but only {fit} qualify ({detail}); register more storage servers or free space", keel_proto::human_size(*size))]
    NotEnough {
        needed: usize,
        size: u64,
        fit: usize,
        detail: String,
    },
}

/// Picks `copies` distinct servers for a volume of `size` bytes.
pub fn place(
    candidates: &[Candidate],
    size: u64,
    copies: usize,
) -> Result<Vec<String>, PlacementError> {
    let mut fit: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.up && c.free() >= size)
        .collect();
    if fit.len() < copies {
        let detail = if candidates.is_empty() {
            "no storage server is registered".to_string()
        } else {
            candidates
                .iter()
                .map(|c| {
                    format!(
                        "{}: {}, {} free",
                        c.id,
                        if c.up { "up" } else { "down" },
                        keel_proto::human_size(c.free())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        return Err(PlacementError::NotEnough {
            needed: copies,
            size,
            fit: fit.len(),
            detail,
        });
    }
    // Least-loaded first; ties broken by id for determinism.
    fit.sort_by(|a, b| {
        let fa = a.allocated_bytes as f64 / a.capacity_bytes.max(1) as f64;
        let fb = b.allocated_bytes as f64 / b.capacity_bytes.max(1) as f64;
        fa.total_cmp(&fb).then_with(|| a.id.cmp(&b.id))
    });
    let mut chosen: Vec<&Candidate> = Vec::with_capacity(copies);
    while chosen.len() < copies {
        // The least-loaded server in a zone not used yet, else the least-loaded left.
        let next = fit
            .iter()
            .position(|c| !chosen.iter().any(|x| x.zone == c.zone))
            .unwrap_or(0);
        chosen.push(fit.remove(next));
    }
    Ok(chosen.into_iter().map(|c| c.id.clone()).collect())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn c(id: &str, zone: &str, cap: u64, alloc: u64, up: bool) -> Candidate {
        Candidate {
            id: id.into(),
            zone: zone.into(),
            capacity_bytes: cap,
            allocated_bytes: alloc,
            up,
        }
    }

    #[test]
    fn prefers_distinct_zones_then_least_loaded() {
        let cs = [
            c("a", "z1", 100, 10, true),
            c("b", "z1", 100, 0, true),
            c("c", "z2", 100, 50, true),
            c("d", "z3", 100, 90, true),
        ];
        assert_eq!(place(&cs, 5, 1).unwrap(), ["b"]);
        assert_eq!(place(&cs, 5, 2).unwrap(), ["b", "c"]);
        assert_eq!(place(&cs, 5, 3).unwrap(), ["b", "c", "d"]);
        // d has 10 free: a 20-byte volume's third copy goes to z1 again.
        assert_eq!(place(&cs, 20, 3).unwrap(), ["b", "c", "a"]);
    }

    #[test]
    fn skips_down_and_full_servers_and_says_why() {
        let cs = [c("a", "z1", 100, 0, false), c("b", "z2", 100, 95, true)];
        let err = place(&cs, 10, 1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("a: down"), "{msg}");
        assert!(msg.contains("b: up, 5 B free"), "{msg}");
        let none = place(&[], 10, 1).unwrap_err().to_string();
        assert!(none.contains("no storage server is registered"), "{none}");
    }

    #[test]
    fn never_places_two_copies_on_one_server() {
        let cs = [c("a", "z1", 1000, 0, true)];
        assert!(place(&cs, 10, 2).is_err());
    }
}
