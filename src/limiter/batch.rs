//! What one Redis script call sends and how its answer becomes each request's outcomes.
//!
//! A batch is written compactly: each distinct bucket once (its key in KEYS; interval, burst
//! and shadow in ARGV), then the requests as runs of the same shape (a run of 8 requests that
//! each draw cost 1 from buckets 1 and 2 is `8, 2, 1, 1, 2, 1`). Under load a batch is mostly
//! one such run, so the call's size no longer grows with its requests, only its loop.
//!
//! The script decides the requests in order, as before, and answers with only what the gateway
//! cannot know: Redis's `now`, each bucket's TAT as read, and one commit flag a request. The
//! gateway replays the same arithmetic on those ([`replay`]) for the `RateLimit` figures of
//! every request. The replay is done in `f64`, as Lua computes (its numbers are doubles), so
//! both sides take the same values operation for operation; a replay that ever disagreed with
//! a commit flag is an error, not a guess.
//!
//! Why: formatting 5 numbers a bucket in Lua and parsing 4 arguments a bucket was most of
//! redis-server's time a request (about 4.5 µs, on the load client's core in the benchmark).

use std::sync::Arc;
use std::time::Duration;

use super::credit::Grant;
use super::gcra::{self, Outcome};
use super::Charge;
use crate::config::Rate;
use crate::FastMap;

/// KEYS: the batch's distinct buckets. ARGV: per bucket interval (µs), burst, shadow (0/1) and
/// the grant asked for (tokens, 0 for none: `credit.rs`); then runs, each: count, bucket count n,
/// then n pairs of (bucket index, cost).
///
/// The requests of a run, and the runs, are decided in order, each all-or-nothing (its buckets
/// are committed only when every enforced one allows), and each sees what the earlier ones
/// committed: a bucket is read once (`GET`) and followed in `tat`; each changed bucket is
/// written once, at the end. After the runs, each grant asked for is taken when the bucket keeps
/// at least half its burst after it (the TAT moves on by the grant), else refused.
/// Returns `now,tat_1,...,tat_k,flags,grants` (one `1`/`0` a request, then one a bucket).
/// One string, not an array: redis-rs's parser of an array of integers cost more than a split.
/// Every number is a whole count of µs, written with `%d` (Lua's `%.0f` goes through glibc's
/// multi-precision float printing, which showed in redis-server's profile).
pub const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, shadow, ask, tat, first = {}, {}, {}, {}, {}, {}
for i = 1, #KEYS do
  local key = KEYS[i]
  interval[i] = tonumber(ARGV[4 * i - 3])
  burst[i] = tonumber(ARGV[4 * i - 2])
  shadow[i] = ARGV[4 * i - 1] == '1'
  ask[i] = tonumber(ARGV[4 * i])
  if tat[key] == nil then
    tat[key] = tonumber(redis.call('GET', key) or 0)
  end
  first[i] = string.format('%d', tat[key])
end
local a = 4 * #KEYS
local seen, dirty, flags = {}, {}, {}
local idx, cost, new = {}, {}, {}
while a < #ARGV do
  local count = tonumber(ARGV[a + 1])
  local n = tonumber(ARGV[a + 2])
  for j = 1, n do
    idx[j] = tonumber(ARGV[a + 1 + 2 * j])
    cost[j] = tonumber(ARGV[a + 2 + 2 * j])
  end
  a = a + 2 + 2 * n
  for c = 1, count do
    local commit = '1'
    for j = 1, n do
      local i = idx[j]
      local cur = tat[KEYS[i]]
      if cur < now then cur = now end
      local iv, b, w = interval[i], burst[i], cost[j]
      if cur + math.min(w, b) * iv - b * iv <= now then
        new[j] = cur + w * iv
      else
        new[j] = false
        if not shadow[i] then commit = '0' end
      end
    end
    if commit == '1' then
      for j = 1, n do
        if new[j] then
          local key = KEYS[idx[j]]
          if not seen[key] then
            seen[key] = true
            dirty[#dirty + 1] = key
          end
          tat[key] = new[j]
        end
      end
    end
    flags[#flags + 1] = commit
  end
end
local grants = {}
for i = 1, #KEYS do
  local g = '0'
  local p = ask[i]
  if p > 0 then
    local key = KEYS[i]
    local cur = tat[key]
    if cur < now then cur = now end
    local iv, b = interval[i], burst[i]
    if now + b * iv - cur >= (p + math.floor(b / 2)) * iv then
      tat[key] = cur + p * iv
      if not seen[key] then
        seen[key] = true
        dirty[#dirty + 1] = key
      end
      g = '1'
    end
  end
  grants[i] = g
end
for _, key in ipairs(dirty) do
  local v = tat[key]
  redis.call('SET', key, string.format('%d', v), 'PX', math.ceil((v - now) / 1000) + 1)
end
return string.format('%d', now) .. ',' .. table.concat(first, ',') .. ',' .. table.concat(flags)
  .. ',' .. table.concat(grants)
"#;

/// One bucket of a queued request, as the script takes it.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub key: Arc<str>,
    pub rate: Rate,
    pub interval_us: u64,
    pub burst: u64,
    pub cost: u64,
    pub shadow: bool,
    /// The grant asked for (0: none).
    pub ask: u64,
}

impl Bucket {
    pub fn of(c: &Charge, ask: u64) -> Bucket {
        Bucket {
            key: c.key.0.clone(),
            rate: c.rate,
            interval_us: (gcra::interval_nanos(&c.rate) / 1000).max(1),
            burst: c.rate.burst,
            cost: c.cost,
            shadow: c.shadow,
            ask,
        }
    }
}

/// Requests in a row with the same buckets and costs.
#[derive(Debug, PartialEq)]
struct Run {
    count: usize,
    /// (bucket index, cost) for each bucket of each of these requests.
    shape: Vec<(usize, u64)>,
}

/// A batch as one call sends it.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The distinct buckets (one a key and limit: a limit changed by a reload mid-batch makes
    /// two entries of one key, which share its TAT).
    buckets: Vec<&'a Bucket>,
    /// For each bucket, the grant asked for (the largest of its requests').
    asks: Vec<u64>,
    /// For each bucket, the index of the first one with its key: where its TAT is followed.
    tat_of: Vec<usize>,
    runs: Vec<Run>,
    requests: usize,
    /// Where each bucket (key and limit) and each key first stand in `buckets`: a batch of
    /// many accounts has up to 512 buckets, which a scan would compare pairwise.
    bucket_at: FastMap<(&'a str, u64, u64, bool), usize>,
    key_at: FastMap<&'a str, usize>,
}

impl<'a> Plan<'a> {
    /// The plan of `requests` (each a list of buckets), in their order.
    pub fn new<I>(requests: I) -> Plan<'a>
    where
        I: IntoIterator<Item = &'a [Bucket]>,
    {
        let mut plan = Plan {
            buckets: Vec::new(),
            asks: Vec::new(),
            tat_of: Vec::new(),
            runs: Vec::new(),
            requests: 0,
            bucket_at: FastMap::default(),
            key_at: FastMap::default(),
        };
        let mut shape = Vec::new();
        for request in requests {
            plan.requests += 1;
            shape.clear();
            for b in request {
                let i = plan.index(b);
                shape.push((i, b.cost));
            }
            match plan.runs.last_mut() {
                Some(run) if run.shape == shape => run.count += 1,
                _ => plan.runs.push(Run {
                    count: 1,
                    shape: shape.clone(),
                }),
            }
        }
        plan
    }

    fn index(&mut self, b: &'a Bucket) -> usize {
        let next = self.buckets.len();
        let at = *self
            .bucket_at
            .entry((&*b.key, b.interval_us, b.burst, b.shadow))
            .or_insert(next);
        if at == next {
            self.buckets.push(b);
            self.asks.push(b.ask);
            self.tat_of
                .push(*self.key_at.entry(&*b.key).or_insert(next));
        } else {
            self.asks[at] = self.asks[at].max(b.ask);
        }
        at
    }

    /// The `EVALSHA` of the script (by `sha`) for this batch.
    pub fn command(&self, sha: &str) -> redis::Cmd {
        let args: usize = self.runs.iter().map(|r| 2 + 2 * r.shape.len()).sum();
        let bytes: usize = self.buckets.iter().map(|b| b.key.len() + 32).sum();
        let mut cmd = redis::Cmd::with_capacity(3 + 5 * self.buckets.len() + args, 64 + bytes);
        cmd.arg("EVALSHA").arg(sha).arg(self.buckets.len());
        for b in &self.buckets {
            cmd.arg(&*b.key);
        }
        for (b, ask) in self.buckets.iter().zip(&self.asks) {
            cmd.arg(b.interval_us)
                .arg(b.burst)
                .arg(u8::from(b.shadow))
                .arg(*ask);
        }
        for r in &self.runs {
            cmd.arg(r.count).arg(r.shape.len());
            for &(i, cost) in &r.shape {
                // Lua counts from 1.
                cmd.arg(i + 1).arg(cost);
            }
        }
        cmd
    }

    /// Every request's outcomes from the script's answer, in the requests' order, and what was
    /// granted of each grant asked for.
    pub fn outcomes(&self, answer: &str) -> Result<(Vec<Vec<Outcome>>, Vec<Grant>), String> {
        let bad = |why: &str| format!("unexpected script reply {answer:?}: {why}");
        let mut parts = answer.split(',');
        let mut number = || -> Result<f64, String> {
            parts
                .next()
                .ok_or_else(|| bad("too few values"))?
                .parse::<i64>()
                .map(|v| v as f64)
                .map_err(|e| bad(&e.to_string()))
        };
        let now = number()?;
        let read = (0..self.buckets.len())
            .map(|_| number())
            .collect::<Result<Vec<f64>, String>>()?;
        let flags = parts.next().ok_or_else(|| bad("no commit flags"))?;
        if flags.len() != self.requests {
            return Err(bad(&format!("expected {} commit flags", self.requests)));
        }
        let granted = parts.next().ok_or_else(|| bad("no grant flags"))?;
        if parts.next().is_some() || granted.len() != self.buckets.len() {
            return Err(bad(&format!("expected {} grant flags", self.buckets.len())));
        }
        let (outcomes, tat) = self.replay(now, read, flags.as_bytes())?;
        let grants = self.grants(now, tat, granted.as_bytes())?;
        Ok((outcomes, grants))
    }

    /// The script's grants over the TATs the runs left, checked against its flags.
    fn grants(&self, now: f64, mut tat: Vec<f64>, flags: &[u8]) -> Result<Vec<Grant>, String> {
        let mut grants = Vec::new();
        for (i, (b, &ask)) in self.buckets.iter().zip(&self.asks).enumerate() {
            let flag = flags[i] == b'1';
            if ask == 0 {
                if flag {
                    return Err(format!("the script granted bucket {} unasked", i + 1));
                }
                continue;
            }
            let (iv, burst, p) = (b.interval_us as f64, b.burst as f64, ask as f64);
            let cur = tat[self.tat_of[i]].max(now);
            let grant = now + burst * iv - cur >= (p + (burst / 2.0).floor()) * iv;
            if grant != flag {
                return Err(format!(
                    "the script's grant flag of bucket {} ({flag}) is not what its replay finds \
                     ({grant})",
                    i + 1
                ));
            }
            if grant {
                tat[self.tat_of[i]] = cur + p * iv;
            }
            grants.push(Grant {
                key: super::BucketKey(b.key.clone()),
                rate: b.rate,
                tokens: if grant { ask } else { 0 },
                base_us: cur,
                now_us: now,
            });
        }
        Ok(grants)
    }

    /// The script's arithmetic over `now` and the TATs it read, committing where it did.
    fn replay(
        &self,
        now: f64,
        mut tat: Vec<f64>,
        flags: &[u8],
    ) -> Result<(Vec<Vec<Outcome>>, Vec<f64>), String> {
        let us = |v: f64| Duration::from_micros(v.max(0.0) as u64);
        let mut out = Vec::with_capacity(self.requests);
        let mut flags = flags.iter();
        let mut new = Vec::new();
        for run in &self.runs {
            for _ in 0..run.count {
                new.clear();
                let mut commit = true;
                let outcomes: Vec<Outcome> = run
                    .shape
                    .iter()
                    .map(|&(i, cost)| {
                        let b = self.buckets[i];
                        let (iv, burst, w) = (b.interval_us as f64, b.burst as f64, cost as f64);
                        let cur = tat[self.tat_of[i]].max(now);
                        let allow_at = cur + w.min(burst) * iv - burst * iv;
                        if allow_at <= now {
                            let next = cur + w * iv;
                            new.push(Some(next));
                            Outcome {
                                allowed: true,
                                tat: 0,
                                remaining: ((now + burst * iv - next) / iv).floor().max(0.0) as u64,
                                retry_after: Duration::ZERO,
                                reset: us(next - now),
                            }
                        } else {
                            new.push(None);
                            commit &= b.shadow;
                            Outcome {
                                allowed: false,
                                tat: 0,
                                remaining: 0,
                                retry_after: us(allow_at - now),
                                reset: us(cur - now),
                            }
                        }
                    })
                    .collect();
                let committed = flags.next() == Some(&b'1');
                if committed != commit {
                    return Err(format!(
                        "the script's commit flag of request {} ({committed}) is not what its \
                         replay finds ({commit})",
                        out.len() + 1
                    ));
                }
                if committed {
                    for (&(i, _), next) in run.shape.iter().zip(&new) {
                        if let Some(v) = next {
                            tat[self.tat_of[i]] = *v;
                        }
                    }
                }
                out.push(outcomes);
            }
        }
        Ok((out, tat))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(key: &str, interval_us: u64, burst: u64, cost: u64) -> Bucket {
        Bucket {
            key: key.into(),
            rate: Rate::new(burst, Duration::from_micros(interval_us * burst)),
            interval_us,
            burst,
            cost,
            shadow: false,
            ask: 0,
        }
    }

    /// The command a plan sends, its arguments joined by spaces.
    fn command_line(plan: &Plan) -> String {
        let args: Vec<String> = plan
            .command("sha")
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(v) => String::from_utf8_lossy(v).into_owned(),
                _ => "(not a plain argument)".into(),
            })
            .collect();
        args.join(" ")
    }

    #[test]
    fn requests_of_one_shape_are_one_run_and_buckets_are_sent_once() {
        let a = bucket("tg:{x}:api", 1000, 10, 1);
        let b = bucket("tg:{x}:key", 2000, 5, 1);
        let heavy = Bucket {
            cost: 3,
            ..a.clone()
        };
        let two = [a.clone(), b.clone()];
        let requests: Vec<&[Bucket]> = vec![&two, &two, &two, std::slice::from_ref(&heavy), &two];
        let plan = Plan::new(requests);
        assert_eq!(plan.buckets.len(), 2);
        assert_eq!(
            plan.runs,
            vec![
                Run {
                    count: 3,
                    shape: vec![(0, 1), (1, 1)]
                },
                Run {
                    count: 1,
                    shape: vec![(0, 3)]
                },
                Run {
                    count: 1,
                    shape: vec![(0, 1), (1, 1)]
                },
            ]
        );
        assert_eq!(
            command_line(&plan),
            "EVALSHA sha 2 tg:{x}:api tg:{x}:key 1000 10 0 0 2000 5 0 0 \
             3 2 1 1 2 1 1 1 1 3 1 2 1 1 2 1"
        );
    }

    /// 64 requests of 8 accounts each, every account twice: 256 buckets, each sent once and
    /// following its own TAT.
    #[test]
    fn a_batch_of_many_accounts_sends_each_bucket_once() {
        let requests: Vec<Vec<Bucket>> = (0..64)
            .map(|r| {
                (0..8)
                    .map(|b| bucket(&format!("tg:{{a{}}}:api", (r * 8 + b) % 256), 1000, 10, 1))
                    .collect()
            })
            .collect();
        let plan = Plan::new(requests.iter().map(|r| &r[..]));
        assert_eq!(plan.buckets.len(), 256);
        assert_eq!(plan.tat_of, (0..256).collect::<Vec<usize>>());
        assert_eq!(plan.runs.len(), 64);
        assert_eq!(plan.runs[32].shape[0], (0, 1));
        // Every bucket full at the start: the second time round each one has 8 left.
        let answer = format!(
            "5000000,{}{},{}",
            "0,".repeat(256),
            "1".repeat(64),
            "0".repeat(256)
        );
        let (out, grants) = plan.outcomes(&answer).unwrap();
        assert!(grants.is_empty());
        assert_eq!(out[0][0].remaining, 9);
        assert_eq!(out[63][7].remaining, 8);
    }

    #[test]
    fn a_key_under_two_limits_is_two_buckets_sharing_one_tat() {
        let old = bucket("tg:{x}:api", 1000, 10, 1);
        let new = bucket("tg:{x}:api", 500, 20, 1);
        let plan = Plan::new(vec![std::slice::from_ref(&old), std::slice::from_ref(&new)]);
        assert_eq!(plan.buckets.len(), 2);
        assert_eq!(plan.tat_of, vec![0, 0]);
        // Both read TAT 0 at now 1,000,000: the first commits to now + 1000, the second starts
        // from there.
        let (out, _) = plan.outcomes("1000000,0,0,11,00").unwrap();
        assert_eq!(out[0][0].reset, Duration::from_micros(1000));
        assert_eq!(out[1][0].reset, Duration::from_micros(1500));
        assert_eq!(out[1][0].remaining, 17);
    }

    /// The replay counts down as the script commits: burst 3 of one per ms, four requests at
    /// once, the fourth refused and told to wait one interval.
    #[test]
    fn the_replay_follows_the_commits_of_a_run() {
        let a = bucket("tg:{x}:api", 1000, 3, 1);
        let one = [a];
        let plan = Plan::new(vec![&one[..]; 4]);
        let (out, _) = plan.outcomes("5000000,0,1110,0").unwrap();
        let remaining: Vec<u64> = out.iter().map(|o| o[0].remaining).collect();
        assert_eq!(remaining, vec![2, 1, 0, 0]);
        let allowed: Vec<bool> = out.iter().map(|o| o[0].allowed).collect();
        assert_eq!(allowed, vec![true, true, true, false]);
        assert_eq!(out[3][0].retry_after, Duration::from_micros(1000));
        assert_eq!(out[3][0].reset, Duration::from_micros(3000));
        assert_eq!(out[2][0].reset, Duration::from_micros(3000));
    }

    /// A request refused by one bucket commits nothing, and a shadow bucket never refuses.
    #[test]
    fn a_refused_request_commits_nothing_and_shadow_buckets_do_not_refuse() {
        let wide = bucket("tg:{x}:wide", 1000, 100, 1);
        let full = bucket("tg:{x}:full", 1000, 1, 1);
        let shadow = Bucket {
            shadow: true,
            ..full.clone()
        };
        let refused = [wide.clone(), full];
        let watched = [wide.clone(), shadow];
        let plan = Plan::new(vec![&refused[..], &refused[..], &watched[..]]);
        // "full" (read as TAT now + 1 ms) is empty; the shadow entry shares its TAT.
        let (out, _) = plan.outcomes("1000000,0,1001000,1001000,001,000").unwrap();
        assert!(out[0][0].allowed && !out[0][1].allowed);
        // Nothing of the first request was taken from "wide".
        assert_eq!(out[1][0].remaining, 99);
        assert_eq!(out[2][0].remaining, 99);
        assert!(!out[2][1].allowed);
    }

    #[test]
    fn answers_that_do_not_fit_the_batch_are_errors() {
        let a = bucket("tg:{x}:api", 1000, 3, 1);
        let one = [a];
        let plan = Plan::new(vec![&one[..]; 2]);
        for bad in [
            "",
            "1000",
            "1000,0",
            "1000,0,1",
            "1000,0,111",
            "x,0,11",
            "1000,0,11",
            "1000,0,11,",
            "1000,0,11,00",
            "1000,0,11,0,1",
            // A grant nobody asked for.
            "1000,0,11,1",
        ] {
            assert!(plan.outcomes(bad).is_err(), "{bad:?} was taken");
        }
        // A commit the replay cannot reproduce is refused, not believed.
        let full = plan.outcomes("1000,9000,11,0").unwrap_err();
        assert!(full.contains("commit flag"), "{full}");
        assert!(plan.outcomes("1000,0,11,0").is_ok());
    }

    /// A grant moves the bucket on after the runs, and is taken only while the bucket keeps
    /// half its burst after it; the largest ask of a bucket's requests is the one sent.
    #[test]
    fn grants_are_asked_once_a_bucket_and_replayed_as_the_script_takes_them() {
        let a = bucket("tg:{x}:api", 1000, 100, 1);
        let asking = Bucket {
            ask: 40,
            ..a.clone()
        };
        let more = Bucket {
            ask: 50,
            ..a.clone()
        };
        let requests: Vec<&[Bucket]> = vec![
            std::slice::from_ref(&asking),
            std::slice::from_ref(&a),
            std::slice::from_ref(&more),
        ];
        let plan = Plan::new(requests);
        assert_eq!(
            command_line(&plan),
            "EVALSHA sha 1 tg:{x}:api 1000 100 0 50 3 1 1 1"
        );
        // A full bucket: three requests leave 97; a grant of 50 leaves 47 (under half the
        // burst), so it is refused.
        let (out, grants) = plan.outcomes("5000000,0,111,0").unwrap();
        assert_eq!(out[2][0].remaining, 97);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].tokens, 0);
        assert!(plan.outcomes("5000000,0,111,1").is_err());
        // A grant of 40 leaves 57, and is taken: from the TAT the runs left.
        let small = Bucket {
            ask: 40,
            ..a.clone()
        };
        let plan = Plan::new(vec![std::slice::from_ref(&small); 3]);
        let (_, grants) = plan.outcomes("5000000,0,111,1").unwrap();
        assert_eq!(grants[0].tokens, 40);
        assert_eq!(grants[0].base_us, 5_003_000.0);
        assert_eq!(grants[0].now_us, 5_000_000.0);
        assert!(plan.outcomes("5000000,0,111,0").is_err());
        // With the bucket read 10 ms behind now (empty, then full again), the same holds.
        let (_, grants) = plan.outcomes("5000000,4990000,111,1").unwrap();
        assert_eq!(grants[0].base_us, 5_003_000.0);
    }
}
