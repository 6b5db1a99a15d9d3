//! How many connection sessions each service has, live and dead, kept as they are born, die
//! and are dropped. The session gauges and the pruning of dead connections ask after every
//! snapshot; counting the connection table each time cost a pass over every connection (at
//! 100k live sessions, a tenth of the daemon's time at rest, all of it cache misses).

/// Per service: live and dead connections.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnTally {
    /// A handful of services: a linear search by name beats hashing it.
    counts: Vec<(String, Counts)>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    live: u64,
    dead: u64,
}

impl ConnTally {
    fn of(&mut self, service: &str) -> &mut Counts {
        let i = match self.counts.iter().position(|(s, _)| s == service) {
            Some(i) => i,
            None => {
                self.counts.push((service.to_owned(), Counts::default()));
                self.counts.len() - 1
            }
        };
        &mut self.counts[i].1
    }

    /// A connection entered the table, alive (one found dead then dies at once).
    pub fn entered(&mut self, service: &str) {
        self.of(service).live += 1;
    }

    /// A connection in the table died.
    pub fn died(&mut self, service: &str) {
        let c = self.of(service);
        c.live = c.live.saturating_sub(1);
        c.dead += 1;
    }

    /// A dead connection left the table.
    pub fn dropped_dead(&mut self, service: &str) {
        let c = self.of(service);
        c.dead = c.dead.saturating_sub(1);
    }

    /// Dead connections in the table, of every service.
    pub fn dead(&self) -> u64 {
        self.counts.iter().map(|(_, c)| c.dead).sum()
    }

    /// (service, dead, count) for every count above zero.
    pub fn iter(&self) -> impl Iterator<Item = (&str, bool, u64)> {
        self.counts.iter().flat_map(|(s, c)| {
            [(s.as_str(), false, c.live), (s.as_str(), true, c.dead)]
                .into_iter()
                .filter(|(_, _, n)| *n > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_births_deaths_and_drops_per_service() {
        let mut t = ConnTally::default();
        t.entered("api");
        t.entered("api");
        t.entered("llm");
        t.died("llm");
        t.died("api");
        assert_eq!(t.dead(), 2);
        let got: Vec<_> = t.iter().collect();
        assert_eq!(got, [("api", false, 1), ("api", true, 1), ("llm", true, 1)]);
        t.dropped_dead("api");
        t.dropped_dead("llm");
        assert_eq!(t.dead(), 0);
        assert_eq!(t.iter().collect::<Vec<_>>(), [("api", false, 1)]);
    }
}
