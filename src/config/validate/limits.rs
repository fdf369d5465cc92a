//! A connector's `max_concurrent`, `rate_limit` and `burst`.

use super::*;

impl Validator<'_> {
    pub(super) fn limits(&mut self, c: &RawConnector, place: &str) -> LimitSettings {
        let max_concurrent = c.max_concurrent.as_ref().and_then(|n| {
            match usize::try_from(*n.get_ref()) {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    self.problem(Some(n.span()), place, format!(
                        "max_concurrent = {} is not a number of requests; write one of at least 1, such as 50",
                        n.get_ref()
                    ));
                    None
                }
            }
        });
        let burst = c
            .burst
            .as_ref()
            .and_then(|b| match u32::try_from(*b.get_ref()) {
                Ok(b) if b >= 1 => Some(b),
                _ => {
                    self.problem(Some(b.span()), place, format!(
                    "burst = {} is not a number of requests; write one of at least 1, such as 100",
                    b.get_ref()
                ));
                    None
                }
            });
        let rate = match &c.rate_limit {
            None => {
                if let Some(b) = &c.burst {
                    self.problem(
                        Some(b.span()),
                        place,
                        "burst goes with rate_limit, which is not set; add rate_limit = \"50/s\" or remove burst",
                    );
                }
                None
            }
            Some(text) => match parse_rate(text.get_ref()) {
                Ok((count, per)) => Some(Rate {
                    count,
                    per,
                    burst: burst.unwrap_or(count),
                }),
                Err(why) => {
                    self.problem(Some(text.span()), place, format!(
                        "rate_limit {:?} {why}; write requests per time, such as \"50/s\", \"600/min\", \"1000/h\", \"10000/day\" or \"10/15s\"",
                        text.get_ref()
                    ));
                    None
                }
            },
        };
        LimitSettings {
            max_concurrent,
            rate,
        }
    }
}

/// The longest time a rate may be counted over: a yearly quota at the most.
const MAX_PERIOD: Duration = Duration::from_secs(366 * 86_400);

/// `"50/s"` as (50, one second).
fn parse_rate(text: &str) -> Result<(u32, Duration), &'static str> {
    let (count, per) = text.split_once('/').ok_or("has no \"/\"")?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| "does not start with a whole number of requests")?;
    if count == 0 {
        return Err("allows no request at all");
    }
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => humantime::parse_duration(other).map_err(|_| "has no time after the \"/\"")?,
    };
    if per.is_zero() {
        return Err("has a time of zero");
    }
    if per > MAX_PERIOD {
        return Err("has a time longer than 366 days");
    }
    if (per / count).is_zero() {
        return Err("is more than one request per nanosecond");
    }
    Ok((count, per))
}
