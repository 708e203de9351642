//! [`Budget`], the per-replica state machine of one budget: units reserved from the
//! database in batches (a *lease*), spent in memory, refilled before they run out, given
//! back when idle, and never spent outside the window or epoch they were reserved for.
use std::time::Duration;

use uuid::Uuid;

use super::{CREDITS_MAX, Cost, Fleet, Mono, Period, Reading};
use crate::domain::TenantId;

/// How long a lease should last at the observed rate: at most about five reservations per
/// second for a busy budget on one replica.
pub const HORIZON: Duration = Duration::from_millis(200);
/// A busy budget reserves more in the background when what it holds would last less than
/// this, so that steady traffic does not wait for the database.
pub const PREFETCH_BELOW: Duration = Duration::from_millis(100);
/// A budget unused this long gives its lease back, so that units do not sit on a replica
/// that no longer needs them.
pub const IDLE: Duration = Duration::from_secs(1);
/// How long a remembered credit refusal stands. Credits can come back mid-period (another
/// replica gives its lease back) without any message, so a refusal is re-asked soon.
pub const CREDIT_REFUSAL_TTL: Duration = Duration::from_millis(250);
/// A budget holding nothing and unused this long can be dropped from memory.
pub const RETIRE_AFTER: Duration = Duration::from_secs(60);

/// The two kinds of budget; [`as_str`](Self::as_str) is the `kind` label of the usage
/// metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetKind {
    Rate,
    Credits,
}

impl BudgetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Rate => "rate",
            BudgetKind::Credits => "credits",
        }
    }
}

/// What a key says about one of its budgets, as read with the key (cached or not): the one
/// place that says which kind the budget is, with all that its state machine and its
/// statements need, so that nothing of one kind can be paired with the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terms {
    Rate {
        /// The tenant of the budget's window row.
        tenant: TenantId,
        limit: u64,
        period: Period,
    },
    Credits(CreditTerms),
}

impl Terms {
    pub fn kind(&self) -> BudgetKind {
        match self {
            Terms::Rate { .. } => BudgetKind::Rate,
            Terms::Credits(_) => BudgetKind::Credits,
        }
    }
}

/// A credit account as read with the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditTerms {
    /// The account's id: the key's usage id.
    pub account: Uuid,
    /// The stored balance when the key was read (for estimates only).
    pub balance: u64,
    /// Bumped by refills and by every credit write but adjustments: leases of an older
    /// epoch are void.
    pub epoch: u64,
    /// Bumped by every credit write made through the API: a refusal remembered under an
    /// older version no longer stands.
    pub version: u64,
    pub next_refill_ms: Option<i64>,
}

/// What a lease's units belong to; they are spendable nowhere else: a rate limit's window,
/// by its start (database clock), or a credit account's epoch. Which of the two is the
/// budget's kind, said by its [`Terms`] alone. Both only grow: a later window or epoch is
/// a greater tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tag(i64);

impl Tag {
    pub fn window(start_ms: i64) -> Self {
        Self(start_ms)
    }

    pub fn epoch(epoch: u64) -> Self {
        Self(i64::try_from(epoch).unwrap_or(i64::MAX))
    }

    /// A rate limit's tag, as the window's start.
    pub fn window_start(self) -> i64 {
        self.0
    }

    /// A credit account's tag, as its epoch.
    pub fn epoch_number(self) -> u64 {
        u64::try_from(self.0).unwrap_or(0)
    }
}

/// The database's answer to a take statement, read into the terms of a [`Budget`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Units granted; 0 for a refusal.
    pub units: u64,
    pub tag: Tag,
    /// When the units stop being spendable (database clock): the window's end or the next
    /// refill; `None` for credits without a refill.
    pub end_ms: Option<i64>,
    /// What the database had left after the statement: room below the limit, or the
    /// balance.
    pub remaining: u64,
    /// The account's version (credits; 0 for rate limits).
    pub version: u64,
    pub reading: Reading,
}

impl Grant {
    /// Granted when the statement took anything, refused (with what it said) when not.
    fn answer(self) -> Answer {
        if self.units > 0 {
            Answer::Granted(self)
        } else {
            Answer::Refused(self)
        }
    }
}

/// How to treat a take statement's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Granted(Grant),
    /// Not enough room or balance for the need.
    Refused(Grant),
    /// The statement read an older window than the row holds (it waited on the row across a
    /// boundary, or the database clock stepped back): nothing was taken; ask again.
    Again,
}

/// The row the rate-limit take statement returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateRow {
    pub window_start: i64,
    pub taken: i64,
    pub last_grant: i64,
    pub asked_window: i64,
    pub now_ms: i64,
}

impl RateRow {
    pub fn answer(&self, limit: u64, period: Period, sent: Mono, received: Mono) -> Answer {
        if self.window_start > self.asked_window {
            return Answer::Again;
        }
        let taken = u64::try_from(self.taken).unwrap_or(0);
        let grant = Grant {
            units: u64::try_from(self.last_grant).unwrap_or(0),
            tag: Tag::window(self.window_start),
            end_ms: Some(self.window_start.saturating_add(period.as_millis())),
            remaining: limit.saturating_sub(taken),
            version: 0,
            reading: Reading {
                sent,
                received,
                db_now_ms: self.now_ms,
            },
        };
        grant.answer()
    }
}

/// The row the credit take statement returns (no row: the account is unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditRow {
    pub last_grant: i64,
    pub balance: i64,
    pub epoch: i64,
    pub version: i64,
    pub next_refill_ms: Option<i64>,
    pub now_ms: i64,
}

impl CreditRow {
    pub fn answer(&self, sent: Mono, received: Mono) -> Answer {
        let grant = Grant {
            units: u64::try_from(self.last_grant).unwrap_or(0),
            tag: Tag::epoch(u64::try_from(self.epoch).unwrap_or(0)),
            end_ms: self.next_refill_ms,
            remaining: u64::try_from(self.balance).unwrap_or(0),
            version: u64::try_from(self.version).unwrap_or(0),
            reading: Reading {
                sent,
                received,
                db_now_ms: self.now_ms,
            },
        };
        grant.answer()
    }
}

/// What to do next for one request on one budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The request holds these units: spent if the request is admitted, handed back with
    /// [`Budget::put_back`] if a later check refuses it.
    Held(Hold),
    Refused(Refused),
    /// Run the take statement with this ask, then report with [`Budget::granted`],
    /// [`Budget::refused`] or [`Budget::failed`], and step again.
    Reserve(Ask),
    /// Another request's reservation for this budget is in flight: wait for it, then step
    /// again.
    AwaitReservation,
    /// The window (or refill period) is turning and this replica cannot yet tell on which
    /// side the database is: step again at this time (a few milliseconds at most).
    WaitUntil(Mono),
}

/// Units a request took from a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    generation: u64,
    units: u64,
    /// The lease's deadline: the units belong to a window or period that may end then.
    deadline: Option<Mono>,
}

impl Hold {
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Whether the units may still be spent at `now`. A request admits only if all its
    /// holds still may, checked once it holds them all: a request that waited (for another
    /// budget's reservation) across the end of a window must not spend that window's units
    /// in the next one. If one may not, put them all back and start over.
    pub fn usable_at(&self, now: Mono) -> bool {
        self.deadline.is_none_or(|d| now < d)
    }
}

/// What to ask the database for: at least `need`, ideally `want`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    pub need: u64,
    pub want: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The cost is above the limit: no window can ever admit it.
    CostAboveLimit,
    /// The database refused a need at least this large recently (see the design's
    /// "denials are remembered briefly").
    Remembered,
}

/// Units to return to the database, from the window or epoch they were reserved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GiveBack {
    pub units: u64,
    pub tag: Tag,
}

/// This replica's estimate of a budget, for responses: exact on one replica, off by what
/// the other replicas hold with several. Never used to decide anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub remaining: u64,
    /// The window's end or the next refill (database clock); `None`: credits without a
    /// refill.
    pub reset_ms: Option<i64>,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    tag: Tag,
    units: u64,
    /// Which lease this is: units put back into a replaced lease are lost, not moved into
    /// its successor (they belong to another window or epoch).
    generation: u64,
    /// The earliest local time the window or period can end; `None`: never.
    deadline: Option<Mono>,
}

impl Lease {
    fn live(&self, now: Mono) -> bool {
        self.deadline.is_none_or(|d| now < d)
    }
}

/// The database's last word on the budget, for estimates and turns.
#[derive(Clone, Copy, Debug)]
struct Seen {
    tag: Tag,
    remaining: u64,
    end_ms: Option<i64>,
    version: u64,
}

/// A refusal from the database, remembered so that a hammered, exhausted budget does not
/// cost a statement per request.
#[derive(Clone, Copy, Debug)]
struct Refusal {
    /// The smallest need the database refused: a need at least this large is refused too.
    need: u64,
    until: Mono,
    /// Rate limits: the limit it was refused under (a changed limit asks again).
    limit: Option<u64>,
    /// Credits: the account's epoch and version then (a newer one asks again).
    epoch: u64,
    version: u64,
}

/// The rate at which this replica spends from a budget, in units per second: sampled at
/// each reservation; a higher sample is taken at once (a burst gets big leases quickly), a
/// lower one halves the distance (a lull does not shrink them at once).
#[derive(Clone, Copy, Debug, Default)]
struct SpendRate {
    per_sec: f64,
    spent: u64,
    since: Option<Mono>,
}

impl SpendRate {
    fn sample(&mut self, now: Mono) {
        if let Some(since) = self.since {
            let secs = now.since(since).as_secs_f64().max(0.001);
            let sample = self.spent as f64 / secs;
            self.per_sec = if sample >= self.per_sec {
                sample
            } else {
                (sample + self.per_sec) / 2.0
            };
        }
        self.spent = 0;
        self.since = Some(now);
    }
}

/// Units spent over `span` at `per_sec`, rounded up.
fn units_for(per_sec: f64, span: Duration) -> u64 {
    // A float-to-int `as` saturates (and maps NaN to 0), which is what is wanted here.
    (per_sec * span.as_secs_f64()).ceil() as u64
}

/// One budget on one replica: its lease, what the database last said, a remembered
/// refusal, and the observed rate. Plain synchronous state: the caller keeps it behind a
/// mutex (never held across an `await`), runs the statements it asks for, and reports
/// their answers back.
#[derive(Debug, Default)]
pub struct Budget {
    lease: Option<Lease>,
    generation: u64,
    reading: Option<Reading>,
    seen: Option<Seen>,
    refusal: Option<Refusal>,
    spend_rate: SpendRate,
    in_flight: bool,
    last_use: Option<Mono>,
    /// The limit last stepped with (rate limits), for the cap when giving back.
    limit: Option<u64>,
    /// Units dropped unspent since last asked (see [`Budget::take_lost`]).
    lost: u64,
}

impl Budget {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next step of a request of `cost` on this budget. Check the budgets of a key in
    /// order (rate limits, then credits); on a refusal, put back what the earlier ones
    /// handed out.
    pub fn step(&mut self, cost: Cost, terms: &Terms, fleet: Fleet, now: Mono) -> Step {
        self.forget_stale(terms, now);
        if cost.is_free() {
            return Step::Held(Hold {
                generation: self.generation,
                units: 0,
                deadline: None,
            });
        }
        if let Terms::Rate { limit, .. } = *terms {
            self.limit = Some(limit);
            if cost.get() > limit {
                return Step::Refused(Refused::CostAboveLimit);
            }
        }
        if let Some(lease) = self.lease.as_mut()
            && lease.units >= cost.get()
        {
            lease.units -= cost.get();
            self.spend_rate.spent = self.spend_rate.spent.saturating_add(cost.get());
            self.last_use = Some(now);
            return Step::Held(Hold {
                generation: lease.generation,
                units: cost.get(),
                deadline: lease.deadline,
            });
        }
        let need = cost.get() - self.held();
        if self.refusal.is_some_and(|r| need >= r.need) {
            return Step::Refused(Refused::Remembered);
        }
        if self.in_flight {
            return Step::AwaitReservation;
        }
        if let Some(until) = self.turn(terms, now) {
            return Step::WaitUntil(until);
        }
        self.in_flight = true;
        Step::Reserve(Ask {
            need,
            want: self.want(need, terms, fleet, now),
        })
    }

    /// A reservation to make in the background, before the lease runs dry: when traffic is
    /// steady and what is held would last less than [`PREFETCH_BELOW`] (for a rate limit,
    /// or is below half its cap). Report its answer like any other.
    pub fn prefetch(&mut self, terms: &Terms, fleet: Fleet, now: Mono) -> Option<Ask> {
        self.forget_stale(terms, now);
        if self.in_flight || self.refusal.is_some() || fleet.replicas().is_none() {
            return None;
        }
        let held = self.lease?.units;
        let mut low = units_for(self.spend_rate.per_sec, PREFETCH_BELOW);
        if let Terms::Rate { limit, .. } = *terms {
            // Below half the cap, so that a capped lease is topped up in halves rather than
            // a statement per few units.
            low = low.min(fleet.rate_cap(limit) / 2);
        }
        if held >= low {
            return None;
        }
        self.in_flight = true;
        Some(Ask {
            need: 1,
            want: self.want(1, terms, fleet, now),
        })
    }

    /// The database granted `grant` (for a request's reservation or a prefetch). Units of
    /// the lease's window or epoch join it; units of a newer one replace it (the old units
    /// are over); units of an older one, or that can no longer be spent, are lost.
    pub fn granted(&mut self, grant: Grant, now: Mono) {
        self.in_flight = false;
        self.note(&grant);
        self.spend_rate.sample(now);
        self.refusal = None;
        // A fresh lease is about to be spent by the request that asked: not idle.
        self.last_use = Some(now);
        let deadline = grant.end_ms.map(|end| grant.reading.earliest(end));
        match self.lease.as_mut() {
            Some(lease) if lease.tag == grant.tag => {
                lease.units = lease.units.saturating_add(grant.units);
                // Both are lower bounds of the same instant: the later is the better one.
                lease.deadline = lease.deadline.max(deadline);
            }
            // A grant for a window or epoch this replica has already left.
            Some(lease) if lease.tag > grant.tag => self.lost += grant.units,
            _ => {
                if let Some(old) = self.lease.take() {
                    self.lost += old.units;
                }
                self.generation += 1;
                self.lease = Some(Lease {
                    tag: grant.tag,
                    units: grant.units,
                    generation: self.generation,
                    deadline,
                });
            }
        }
        // Granted in the last moments of a window: the units may already be unspendable.
        if let Some(lease) = self.lease
            && !lease.live(now)
        {
            self.lost += lease.units;
            self.lease = None;
        }
    }

    /// The database refused `ask` (`answer` carries what it said). The refusal is
    /// remembered: for a rate limit until its window can end, for credits for at most
    /// [`CREDIT_REFUSAL_TTL`] (see the design's "denials are remembered briefly").
    pub fn refused(&mut self, ask: Ask, answer: Grant, terms: &Terms, now: Mono) {
        self.in_flight = false;
        self.note(&answer);
        if let Some(lease) = self.lease
            && answer.tag > lease.tag
        {
            self.lost += lease.units;
            self.lease = None;
        }
        let (until, limit, epoch, version) = match *terms {
            Terms::Rate { limit, .. } => (
                answer
                    .end_ms
                    .map_or(now, |end| answer.reading.earliest(end)),
                Some(limit),
                0,
                0,
            ),
            Terms::Credits(t) => {
                let ttl = now.after(CREDIT_REFUSAL_TTL);
                let epoch = answer.tag.epoch_number().max(t.epoch);
                (
                    answer
                        .end_ms
                        .map_or(ttl, |end| ttl.min(answer.reading.earliest(end))),
                    None,
                    epoch,
                    answer.version.max(t.version),
                )
            }
        };
        let need = match self.refusal {
            Some(r) if r.limit == limit && r.epoch == epoch && r.version == version => {
                r.need.min(ask.need)
            }
            _ => ask.need,
        };
        self.refusal = Some(Refusal {
            need,
            until,
            limit,
            epoch,
            version,
        });
    }

    /// Drops a remembered refusal, so that the next step asks the database again: after
    /// the other replicas were asked to return what they hold (a recall), the refusal may
    /// no longer be the database's word.
    pub fn forget_refusal(&mut self) {
        self.refusal = None;
    }

    /// The reservation [`Budget::step`] handed out was never asked for (a stale
    /// verification may not reach the database): nothing is in flight, nothing was taken.
    pub fn not_asked(&mut self) {
        self.in_flight = false;
    }

    /// The statement failed, or must be asked again ([`Answer::Again`]). If its outcome is
    /// unknown, whatever it took is lost: never retried blindly, never assumed.
    pub fn failed(&mut self) {
        self.in_flight = false;
    }

    /// Hands back units a request held, when a later check refused it. They go back into
    /// the lease they came from if it is still the same one; otherwise they belonged to a
    /// window or epoch that is over, and are lost.
    pub fn put_back(&mut self, hold: Hold, now: Mono) {
        if hold.units == 0 {
            return;
        }
        self.spend_rate.spent = self.spend_rate.spent.saturating_sub(hold.units);
        match self.lease.as_mut() {
            Some(lease) if lease.generation == hold.generation && lease.live(now) => {
                lease.units = lease.units.saturating_add(hold.units);
            }
            _ => self.lost += hold.units,
        }
    }

    /// Units to return to the database now, taken out of the lease before the statement is
    /// sent (so they can never be both spent and returned): all of them when the budget has
    /// been idle for [`IDLE`] or the replica is shutting down; otherwise what a rate limit
    /// holds above its cap (after a put-back, or when the fleet grew). A give-back whose
    /// outcome is unknown must not be retried: returning units twice would create them.
    pub fn give_back(&mut self, now: Mono, fleet: Fleet, shutting_down: bool) -> Option<GiveBack> {
        let lease = self.lease.as_mut()?;
        if !lease.live(now) {
            self.lost += lease.units;
            self.lease = None;
            return None;
        }
        let idle = self.last_use.is_none_or(|t| now.since(t) >= IDLE);
        let units = if shutting_down || idle {
            lease.units
        } else {
            self.limit
                .map_or(0, |limit| lease.units.saturating_sub(fleet.rate_cap(limit)))
        };
        if units == 0 {
            return None;
        }
        lease.units -= units;
        let tag = lease.tag;
        // The returned units make room: a refusal remembered from before would be wrong.
        self.refusal = None;
        Some(GiveBack { units, tag })
    }

    /// This replica's estimate of the budget after this request, for the response. `wall_ms`
    /// stands in for the database clock when this replica has never asked the database about
    /// this budget.
    pub fn estimate(&self, terms: &Terms, now: Mono, wall_ms: i64) -> Estimate {
        let live = self.lease.filter(|l| l.live(now));
        match *terms {
            Terms::Rate { limit, period, .. } => {
                let window = period.window(self.db_now(now, wall_ms));
                let tag = Tag::window(window.start_ms);
                let held = live.filter(|l| l.tag == tag).map_or(0, |l| l.units);
                let remaining = self
                    .seen
                    .filter(|s| s.tag == tag)
                    .map_or(limit, |s| s.remaining.saturating_add(held));
                Estimate {
                    remaining: remaining.min(limit),
                    reset_ms: Some(window.end_ms),
                }
            }
            Terms::Credits(t) => {
                let current = |tag: Tag| tag >= Tag::epoch(t.epoch);
                let held = live.filter(|l| current(l.tag)).map_or(0, |l| l.units);
                let (base, reset_ms) = match self.seen {
                    Some(s) if current(s.tag) && s.version >= t.version => (s.remaining, s.end_ms),
                    _ => (t.balance, t.next_refill_ms),
                };
                Estimate {
                    remaining: base.saturating_add(held).min(CREDITS_MAX),
                    reset_ms,
                }
            }
        }
    }

    /// The units this replica holds of `tag` (a window or epoch) that may still be spent:
    /// what a read of the stored balance on this replica adds, to show what it can spend.
    pub fn held_in(&self, tag: Tag, now: Mono) -> u64 {
        self.lease
            .filter(|l| l.tag == tag && l.live(now))
            .map_or(0, |l| l.units)
    }

    /// The database's clock now, at the lowest it can be (`wall_ms` if never read).
    pub fn db_now(&self, now: Mono, wall_ms: i64) -> i64 {
        self.reading.map_or(wall_ms, |r| r.db_floor(now))
    }

    /// Whether the budget can be dropped from memory: it holds nothing, waits for nothing
    /// and has not been used for [`RETIRE_AFTER`].
    pub fn is_retirable(&self, now: Mono) -> bool {
        !self.in_flight
            && self.lease.is_none_or(|l| l.units == 0 || !l.live(now))
            && self.last_use.is_none_or(|t| now.since(t) >= RETIRE_AFTER)
    }

    /// Units dropped unspent (a window or epoch over, a put-back too late) since the last
    /// call: for the metrics.
    pub fn take_lost(&mut self) -> u64 {
        std::mem::take(&mut self.lost)
    }

    pub(super) fn held(&self) -> u64 {
        self.lease.map_or(0, |l| l.units)
    }

    /// Keeps the newest of what the database said.
    fn note(&mut self, answer: &Grant) {
        if self
            .reading
            .is_none_or(|r| answer.reading.received >= r.received)
        {
            self.reading = Some(answer.reading);
        }
        if self.seen.is_none_or(|s| s.tag <= answer.tag) {
            self.seen = Some(Seen {
                tag: answer.tag,
                remaining: answer.remaining,
                end_ms: answer.end_ms,
                version: answer.version,
            });
        }
    }

    /// Drops a lease that can no longer be spent (its window or refill period may have
    /// ended, or the key's epoch moved past it) and a refusal that no longer stands.
    fn forget_stale(&mut self, terms: &Terms, now: Mono) {
        if let Some(lease) = self.lease {
            let void = match *terms {
                Terms::Credits(t) => lease.tag < Tag::epoch(t.epoch),
                Terms::Rate { .. } => false,
            };
            if void || !lease.live(now) {
                self.lost += lease.units;
                self.lease = None;
            }
        }
        if let Some(r) = self.refusal {
            let stale = now >= r.until
                || match *terms {
                    Terms::Rate { limit, .. } => r.limit != Some(limit),
                    Terms::Credits(t) => t.epoch > r.epoch || t.version > r.version,
                };
            if stale {
                self.refusal = None;
            }
        }
    }

    /// When the request falls in a boundary's *turn* — between the earliest and the latest
    /// local time the database can cross it — and this replica's last reading was itself
    /// taken inside the turn, asking again cannot tell more yet: wait for the turn's end.
    /// With an older reading, asking refreshes it (`None`: go ahead).
    fn turn(&self, terms: &Terms, now: Mono) -> Option<Mono> {
        let reading = self.reading?;
        let boundaries = match *terms {
            Terms::Rate { period, .. } => {
                let window = period.window(reading.db_floor(now));
                [Some(window.start_ms), Some(window.end_ms)]
            }
            Terms::Credits(t) => [self.seen.and_then(|s| s.end_ms).or(t.next_refill_ms), None],
        };
        boundaries.into_iter().flatten().find_map(|boundary| {
            let (earliest, latest) = (reading.earliest(boundary), reading.latest(boundary));
            (earliest <= now && now < latest && reading.received >= earliest).then_some(latest)
        })
    }

    /// How much to ask for: the need, plus what the observed rate spends in [`HORIZON`]
    /// (but not beyond the window's end), and for a rate limit never so much that this
    /// replica would hold more than its cap. Exactly the need while the fleet is unknown.
    fn want(&self, need: u64, terms: &Terms, fleet: Fleet, now: Mono) -> u64 {
        if fleet.replicas().is_none() {
            return need;
        }
        let rate = self.spend_rate.per_sec;
        let mut extra = units_for(rate, HORIZON);
        match *terms {
            Terms::Rate { limit, period, .. } => {
                if let Some(reading) = self.reading {
                    let db_now = reading.db_ceil(now);
                    let left = period.window(db_now).end_ms.saturating_sub(db_now);
                    let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
                    extra = extra.min(units_for(rate, left));
                }
                let room = fleet.rate_cap(limit).saturating_sub(self.held());
                need.saturating_add(extra).min(need.max(room))
            }
            Terms::Credits(_) => need.saturating_add(extra),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::fixtures::{T0_MS, at_ms, cost, period, rate};

    fn credits(balance: u64, epoch: u64, version: u64) -> Terms {
        Terms::Credits(CreditTerms {
            account: Uuid::nil(),
            balance,
            epoch,
            version,
            next_refill_ms: None,
        })
    }

    /// A reading taken in no time: local `at` is database `db_ms`.
    fn reading(at: Mono, db_ms: i64) -> Reading {
        Reading {
            sent: at,
            received: at,
            db_now_ms: db_ms,
        }
    }

    /// A grant of a 10-second window starting at `T0_MS + 10 s · window`, read at local
    /// `at` = database `T0_MS + at`.
    fn window_grant(units: u64, remaining: u64, window: i64, at: Mono) -> Grant {
        let start = T0_MS + 10_000 * window;
        Grant {
            units,
            tag: Tag::window(start),
            end_ms: Some(start + 10_000),
            remaining,
            version: 0,
            reading: reading(at, T0_MS + (at.as_micros() / 1000) as i64),
        }
    }

    fn credit_grant(units: u64, remaining: u64, epoch: u64, version: u64, at: Mono) -> Grant {
        Grant {
            units,
            tag: Tag::epoch(epoch),
            end_ms: None,
            remaining,
            version,
            reading: reading(at, T0_MS + (at.as_micros() / 1000) as i64),
        }
    }

    fn reserve(step: Step) -> Ask {
        match step {
            Step::Reserve(ask) => ask,
            other => panic!("expected a reservation, got {other:?}"),
        }
    }

    fn held(step: Step) -> Hold {
        match step {
            Step::Held(hold) => hold,
            other => panic!("expected units, got {other:?}"),
        }
    }

    #[test]
    fn cost_zero_spends_nothing_and_is_never_refused() {
        let mut b = Budget::new();
        let terms = rate(1, 10_000);
        assert_eq!(
            held(b.step(Cost::FREE, &terms, Fleet::of(3), at_ms(0))).units(),
            0
        );
        // Even with the window exhausted and remembered.
        let ask = reserve(b.step(cost(1), &terms, Fleet::of(3), at_ms(0)));
        b.refused(ask, window_grant(0, 0, 0, at_ms(1)), &terms, at_ms(1));
        assert_eq!(
            b.step(cost(1), &terms, Fleet::of(3), at_ms(2)),
            Step::Refused(Refused::Remembered)
        );
        let free = held(b.step(Cost::FREE, &terms, Fleet::of(3), at_ms(3)));
        b.put_back(free, at_ms(3));
        assert_eq!(b.take_lost(), 0);
        let mut c = Budget::new();
        assert_eq!(
            held(c.step(Cost::FREE, &credits(0, 1, 1), Fleet::UNKNOWN, at_ms(0))).units(),
            0
        );
    }

    #[test]
    fn a_cost_above_the_limit_never_reserves() {
        let mut b = Budget::new();
        assert_eq!(
            b.step(cost(6), &rate(5, 1_000), Fleet::of(1), at_ms(0)),
            Step::Refused(Refused::CostAboveLimit)
        );
        assert_eq!(
            reserve(b.step(cost(5), &rate(5, 1_000), Fleet::of(1), at_ms(0))).need,
            5
        );
    }

    #[test]
    fn spends_from_the_lease_and_asks_only_for_what_it_lacks() {
        let mut b = Budget::new();
        let terms = rate(1000, 10_000);
        let fleet = Fleet::of(3);
        let ask = reserve(b.step(cost(1), &terms, fleet, at_ms(0)));
        assert_eq!(ask, Ask { need: 1, want: 1 });
        b.granted(window_grant(10, 990, 0, at_ms(1)), at_ms(1));
        let hold = held(b.step(cost(3), &terms, fleet, at_ms(2)));
        assert_eq!(hold.units(), 3);
        for _ in 0..7 {
            held(b.step(cost(1), &terms, fleet, at_ms(3)));
        }
        // Empty now: a request of 2 needs 2.
        assert_eq!(reserve(b.step(cost(2), &terms, fleet, at_ms(4))).need, 2);
    }

    #[test]
    fn asks_for_exactly_the_need_while_the_fleet_is_unknown() {
        let mut b = Budget::new();
        let terms = rate(1_000_000, 10_000);
        reserve(b.step(cost(1), &terms, Fleet::UNKNOWN, at_ms(0)));
        b.granted(window_grant(1, 0, 0, at_ms(0)), at_ms(0));
        for t in 1..100 {
            held(b.step(cost(1), &terms, Fleet::UNKNOWN, at_ms(t)));
            let ask = reserve(b.step(cost(2), &terms, Fleet::UNKNOWN, at_ms(t)));
            assert_eq!(ask, Ask { need: 2, want: 2 });
            b.granted(window_grant(2, 0, 0, at_ms(t)), at_ms(t));
            held(b.step(cost(2), &terms, Fleet::UNKNOWN, at_ms(t)));
            b.failed();
            assert_eq!(b.prefetch(&terms, Fleet::UNKNOWN, at_ms(t)), None);
            reserve(b.step(cost(1), &terms, Fleet::UNKNOWN, at_ms(t)));
            b.granted(window_grant(1, 0, 0, at_ms(t)), at_ms(t));
        }
    }

    #[test]
    fn one_reservation_in_flight_per_budget() {
        let mut b = Budget::new();
        let terms = credits(100, 1, 1);
        let ask = reserve(b.step(cost(1), &terms, Fleet::of(2), at_ms(0)));
        assert_eq!(
            b.step(cost(1), &terms, Fleet::of(2), at_ms(0)),
            Step::AwaitReservation
        );
        b.granted(credit_grant(ask.want, 99, 1, 1, at_ms(1)), at_ms(1));
        held(b.step(cost(1), &terms, Fleet::of(2), at_ms(1)));
        reserve(b.step(cost(1), &terms, Fleet::of(2), at_ms(2)));
        b.failed();
        reserve(b.step(cost(1), &terms, Fleet::of(2), at_ms(2)));
    }

    #[test]
    fn a_lease_ends_before_its_window_can() {
        let mut b = Budget::new();
        let terms = rate(1000, 10_000);
        // Granted at T0 + 9 s for the window ending at T0 + 10 s.
        b.step(cost(1), &terms, Fleet::of(1), at_ms(9_000));
        b.granted(window_grant(50, 950, 0, at_ms(9_000)), at_ms(9_000));
        held(b.step(cost(1), &terms, Fleet::of(1), at_ms(9_998)));
        // 2 ms before the database can end the window (a millisecond of reading, 0.1% of the
        // second ahead) it is over here:
        // the rest is lost, and the next request asks the database.
        assert!(matches!(
            b.step(cost(1), &terms, Fleet::of(1), at_ms(9_999)),
            Step::Reserve(_)
        ));
        assert_eq!(b.take_lost(), 49);
    }

    #[test]
    fn waits_out_the_turn_of_a_window() {
        let mut b = Budget::new();
        let terms = rate(1000, 10_000);
        let fleet = Fleet::of(1);
        b.step(cost(1), &terms, fleet, at_ms(1_000));
        b.granted(window_grant(1, 999, 0, at_ms(1_000)), at_ms(1_000));
        held(b.step(cost(1), &terms, fleet, at_ms(1_000)));
        // In the turn (from 9.991 s, by a reading 9 s old): ask, which refreshes the reading.
        let ask = reserve(b.step(cost(1), &terms, fleet, at_ms(9_995)));
        // Answered at 9.996 s: the database read T0 + 9.999 s, still window 0. Its units can
        // be spent only before 9.995999 s: too late already, so they are lost.
        let mut grant = window_grant(ask.want, 998, 0, at_ms(9_995));
        grant.reading = Reading {
            sent: at_ms(9_995),
            received: at_ms(9_996),
            db_now_ms: T0_MS + 9_999,
        };
        b.granted(grant, at_ms(9_996));
        assert_eq!(b.take_lost(), ask.want);
        // Now the reading is from inside the turn: asking again cannot tell more before the
        // turn's end, 1 ms (+0.1%) after the answer.
        let Step::WaitUntil(until) = b.step(cost(1), &terms, fleet, Mono::from_micros(9_996_500))
        else {
            panic!("expected a wait");
        };
        assert_eq!(until, Mono::from_micros(9_997_002));
        assert_eq!(reserve(b.step(cost(1), &terms, fleet, until)).need, 1);
        b.granted(window_grant(1, 999, 1, until), until);
        held(b.step(cost(1), &terms, fleet, until));
    }

    #[test]
    fn remembers_a_refusal_for_larger_needs_until_the_window_ends() {
        let mut b = Budget::new();
        let terms = rate(100, 10_000);
        let fleet = Fleet::of(1);
        let ask = reserve(b.step(cost(3), &terms, fleet, at_ms(5_000)));
        b.refused(
            ask,
            window_grant(0, 2, 0, at_ms(5_000)),
            &terms,
            at_ms(5_000),
        );
        assert_eq!(
            b.step(cost(3), &terms, fleet, at_ms(6_000)),
            Step::Refused(Refused::Remembered)
        );
        assert_eq!(
            b.step(cost(9), &terms, fleet, at_ms(6_000)),
            Step::Refused(Refused::Remembered)
        );
        // A smaller need may still fit.
        let small = reserve(b.step(cost(2), &terms, fleet, at_ms(6_000)));
        b.refused(
            small,
            window_grant(0, 1, 0, at_ms(6_000)),
            &terms,
            at_ms(6_000),
        );
        assert_eq!(
            b.step(cost(2), &terms, fleet, at_ms(7_000)),
            Step::Refused(Refused::Remembered)
        );
        reserve(b.step(cost(1), &terms, fleet, at_ms(7_000)));
        b.failed();
        // Gone when the window can have ended (the last reading, at 6 s, says 9.995001 s).
        assert_eq!(
            b.step(cost(3), &terms, fleet, at_ms(9_995)),
            Step::Refused(Refused::Remembered)
        );
        assert_eq!(
            b.step(cost(3), &terms, fleet, at_ms(9_996)),
            Step::Reserve(Ask { need: 3, want: 3 })
        );
    }

    #[test]
    fn a_changed_limit_asks_again() {
        let mut b = Budget::new();
        let ask = reserve(b.step(cost(1), &rate(10, 10_000), Fleet::of(1), at_ms(0)));
        b.refused(
            ask,
            window_grant(0, 0, 0, at_ms(0)),
            &rate(10, 10_000),
            at_ms(0),
        );
        assert_eq!(
            b.step(cost(1), &rate(10, 10_000), Fleet::of(1), at_ms(1)),
            Step::Refused(Refused::Remembered)
        );
        reserve(b.step(cost(1), &rate(20, 10_000), Fleet::of(1), at_ms(1)));
    }

    #[test]
    fn credit_refusals_stand_briefly_and_yield_to_newer_versions() {
        let mut b = Budget::new();
        let fleet = Fleet::of(3);
        let ask = reserve(b.step(cost(5), &credits(3, 2, 7), fleet, at_ms(0)));
        b.refused(
            ask,
            credit_grant(0, 3, 2, 7, at_ms(1)),
            &credits(3, 2, 7),
            at_ms(1),
        );
        assert_eq!(
            b.step(cost(5), &credits(3, 2, 7), fleet, at_ms(250)),
            Step::Refused(Refused::Remembered)
        );
        // An adjustment reached this replica (the key was re-read with a newer version).
        reserve(b.step(cost(5), &credits(8, 2, 8), fleet, at_ms(10)));
        b.refused(
            ask,
            credit_grant(0, 4, 2, 8, at_ms(11)),
            &credits(8, 2, 8),
            at_ms(11),
        );
        // A key read before the refusal (older epoch or version) does not lift it.
        assert_eq!(
            b.step(cost(5), &credits(3, 2, 7), fleet, at_ms(12)),
            Step::Refused(Refused::Remembered)
        );
        // 250 ms later the database is asked again: another replica may have given back.
        reserve(b.step(cost(5), &credits(3, 2, 8), fleet, at_ms(261)));
    }

    #[test]
    fn a_credit_refusal_ends_at_the_refill() {
        let mut b = Budget::new();
        let terms = credits(0, 1, 1);
        let ask = reserve(b.step(cost(1), &terms, Fleet::of(1), at_ms(0)));
        let mut answer = credit_grant(0, 0, 1, 1, at_ms(0));
        answer.end_ms = Some(T0_MS + 100);
        b.refused(ask, answer, &terms, at_ms(0));
        assert_eq!(
            b.step(cost(1), &terms, Fleet::of(1), at_ms(50)),
            Step::Refused(Refused::Remembered)
        );
        // At the refill's turn (reading from before it): ask.
        assert!(matches!(
            b.step(cost(1), &terms, Fleet::of(1), at_ms(100)),
            Step::Reserve(_)
        ));
    }

    #[test]
    fn a_newer_epoch_voids_the_lease() {
        let mut b = Budget::new();
        let fleet = Fleet::of(1);
        reserve(b.step(cost(1), &credits(100, 1, 1), fleet, at_ms(0)));
        b.granted(credit_grant(10, 90, 1, 1, at_ms(0)), at_ms(0));
        held(b.step(cost(1), &credits(100, 1, 1), fleet, at_ms(1)));
        // remaining_uses was set: the key now says epoch 2. The old units are void, not returned.
        assert_eq!(
            reserve(b.step(cost(1), &credits(20, 2, 2), fleet, at_ms(2))).need,
            1
        );
        assert_eq!(b.take_lost(), 9);
        b.granted(credit_grant(1, 19, 2, 2, at_ms(3)), at_ms(3));
        // A refill the key has not seen yet (epoch 3 from the database) is fine.
        reserve(b.step(cost(2), &credits(20, 2, 2), fleet, at_ms(4)));
        b.granted(credit_grant(5, 95, 3, 2, at_ms(5)), at_ms(5));
        assert_eq!(b.take_lost(), 1);
        held(b.step(cost(2), &credits(20, 2, 2), fleet, at_ms(6)));
        // A database answer from a newer epoch voids the lease it held too.
        let ask = reserve(b.step(cost(4), &credits(20, 2, 2), fleet, at_ms(7)));
        b.refused(
            ask,
            credit_grant(0, 0, 4, 2, at_ms(7)),
            &credits(20, 2, 2),
            at_ms(7),
        );
        assert_eq!(b.take_lost(), 3);
    }

    #[test]
    fn a_hold_taken_before_a_window_ends_is_not_spent_after_it() {
        let mut b = Budget::new();
        let terms = rate(1000, 10_000);
        reserve(b.step(cost(1), &terms, Fleet::of(1), at_ms(9_000)));
        b.granted(window_grant(10, 990, 0, at_ms(9_000)), at_ms(9_000));
        // Taken at 9.9 s; the lease may end from 9.998001 s.
        let hold = held(b.step(cost(2), &terms, Fleet::of(1), at_ms(9_900)));
        assert!(hold.usable_at(at_ms(9_998)));
        // The request waited on another budget past that instant: it must start over.
        assert!(!hold.usable_at(at_ms(9_999)));
        b.put_back(hold, at_ms(9_999));
        assert_eq!(b.take_lost(), 2);
        // And the rest of the lease goes at the next look.
        let free = held(b.step(Cost::FREE, &terms, Fleet::of(1), at_ms(20_000)));
        assert_eq!(b.take_lost(), 8);
        assert!(free.usable_at(at_ms(u64::MAX / 1000)));
        let mut c = Budget::new();
        reserve(c.step(cost(1), &credits(5, 1, 1), Fleet::of(1), at_ms(0)));
        c.granted(credit_grant(5, 0, 1, 1, at_ms(0)), at_ms(0));
        let credit = held(c.step(cost(1), &credits(5, 1, 1), Fleet::of(1), at_ms(1)));
        assert!(
            credit.usable_at(at_ms(u64::MAX / 1000)),
            "no refill: no deadline"
        );
    }

    #[test]
    fn put_back_returns_units_only_to_the_same_lease() {
        let mut b = Budget::new();
        let terms = rate(1000, 10_000);
        let fleet = Fleet::of(1);
        reserve(b.step(cost(1), &terms, fleet, at_ms(0)));
        b.granted(window_grant(10, 990, 0, at_ms(0)), at_ms(0));
        let hold = held(b.step(cost(4), &terms, fleet, at_ms(1)));
        b.put_back(hold, at_ms(2));
        let again = held(b.step(cost(10), &terms, fleet, at_ms(3)));
        assert_eq!(b.take_lost(), 0);
        // The window turns; the hold belongs to the old one.
        let ask = reserve(b.step(cost(1), &terms, fleet, at_ms(10_010)));
        b.granted(window_grant(ask.want, 999, 1, at_ms(10_010)), at_ms(10_010));
        b.put_back(again, at_ms(10_011));
        assert_eq!(b.take_lost(), 10);
    }

    #[test]
    fn gives_back_when_idle_above_the_cap_and_at_shutdown() {
        let terms = rate(1000, 60_000);
        let fleet = Fleet::of(2); // cap 25
        let mut b = Budget::new();
        reserve(b.step(cost(30), &terms, fleet, at_ms(0)));
        b.granted(window_grant(30, 970, 0, at_ms(0)), at_ms(0));
        // A later check refused the request: its 30 units come back, 5 above the cap.
        let hold = held(b.step(cost(30), &terms, fleet, at_ms(1)));
        b.put_back(hold, at_ms(1));
        let surplus = b.give_back(at_ms(2), fleet, false).unwrap();
        assert_eq!(
            surplus,
            GiveBack {
                units: 5,
                tag: Tag::window(T0_MS)
            }
        );
        assert_eq!(b.give_back(at_ms(3), fleet, false), None);
        // Idle for a second: everything goes back.
        assert_eq!(b.give_back(at_ms(1_001), fleet, false).unwrap().units, 25);
        assert_eq!(b.give_back(at_ms(1_002), fleet, false), None);
        assert!(!b.is_retirable(at_ms(1_002)));
        assert!(b.is_retirable(at_ms(61_001)));

        let mut c = Budget::new();
        let terms = credits(100, 1, 1);
        reserve(c.step(cost(1), &terms, fleet, at_ms(0)));
        c.granted(credit_grant(8, 92, 1, 1, at_ms(0)), at_ms(0));
        held(c.step(cost(1), &terms, fleet, at_ms(1)));
        assert_eq!(c.give_back(at_ms(2), fleet, false), None);
        assert_eq!(
            c.give_back(at_ms(3), fleet, true),
            Some(GiveBack {
                units: 7,
                tag: Tag::epoch(1)
            })
        );
        // Nothing is left to spend or to give twice.
        assert_eq!(c.give_back(at_ms(4), fleet, true), None);
        assert!(matches!(
            c.step(cost(1), &terms, fleet, at_ms(5)),
            Step::Reserve(_)
        ));
    }

    #[test]
    fn giving_back_lifts_a_remembered_refusal() {
        let terms = rate(100, 60_000);
        let fleet = Fleet::single();
        let mut b = Budget::new();
        reserve(b.step(cost(1), &terms, fleet, at_ms(0)));
        b.granted(window_grant(3, 0, 0, at_ms(0)), at_ms(0));
        let ask = reserve(b.step(cost(5), &terms, fleet, at_ms(1)));
        b.refused(ask, window_grant(0, 0, 0, at_ms(1)), &terms, at_ms(1));
        assert_eq!(
            b.step(cost(5), &terms, fleet, at_ms(2)),
            Step::Refused(Refused::Remembered)
        );
        assert!(b.give_back(at_ms(1_100), fleet, false).is_some());
        assert!(matches!(
            b.step(cost(5), &terms, fleet, at_ms(1_101)),
            Step::Reserve(_)
        ));
    }

    #[test]
    fn leases_grow_with_the_observed_rate_up_to_the_cap() {
        let terms = rate(1_000_000, 60_000);
        let fleet = Fleet::of(2); // cap 25,000
        let mut b = Budget::new();
        // 1000 requests a second, each lease of 10 lasting 10 ms.
        let mut t = 0;
        let mut want = 0;
        for _ in 0..5 {
            let ask = reserve(b.step(cost(1), &terms, fleet, at_ms(t)));
            want = ask.want;
            b.granted(window_grant(10, 999_000, 0, at_ms(t)), at_ms(t));
            for _ in 0..10 {
                held(b.step(cost(1), &terms, fleet, at_ms(t)));
                t += 1;
            }
        }
        // 1000/s over the 200 ms horizon, plus the need.
        assert_eq!(want, 201);
        // A cap of 3 units (limit 120 over 2 replicas) bounds it however fast the traffic.
        let small = rate(120, 60_000);
        let mut c = Budget::new();
        let mut t = 0;
        for _ in 0..5 {
            let ask = reserve(c.step(cost(1), &small, fleet, at_ms(t)));
            assert!(ask.want <= 3);
            c.granted(window_grant(ask.want, 100, 0, at_ms(t)), at_ms(t));
            while let Step::Held(_) = c.step(cost(1), &small, fleet, at_ms(t)) {
                t += 1;
            }
            c.failed();
        }
        // Near the window's end a lease is no bigger than what the rest of the window spends.
        let mut d = Budget::new();
        let mut t = 59_000;
        for _ in 0..5 {
            let ask = reserve(d.step(cost(1), &terms, fleet, at_ms(t)));
            d.granted(window_grant(ask.want, 999_000, 0, at_ms(t)), at_ms(t));
            while let Step::Held(_) = d.step(cost(1), &terms, fleet, at_ms(t)) {
                t += 1;
            }
            d.failed();
            t += 100;
        }
        let ask = reserve(d.step(cost(1), &terms, fleet, at_ms(59_990)));
        assert!(ask.want <= 1 + 11, "{ask:?}");
    }

    #[test]
    fn prefetches_before_running_dry() {
        let terms = credits(1_000_000, 1, 1);
        let fleet = Fleet::of(1);
        let mut b = Budget::new();
        assert_eq!(b.prefetch(&terms, fleet, at_ms(0)), None);
        reserve(b.step(cost(1), &terms, fleet, at_ms(0)));
        b.granted(credit_grant(100, 0, 1, 1, at_ms(0)), at_ms(0));
        for t in 0..100 {
            held(b.step(cost(1), &terms, fleet, at_ms(t)));
        }
        reserve(b.step(cost(1), &terms, fleet, at_ms(100)));
        b.granted(credit_grant(1000, 0, 1, 1, at_ms(100)), at_ms(100));
        // 1000/s: nothing to do while what is held lasts 100 ms or more, then one
        // reservation in the background (when 99 are left), and only one.
        let mut first = None;
        for t in 100..2000 {
            held(b.step(cost(1), &terms, fleet, at_ms(t)));
            if let Some(ask) = b.prefetch(&terms, fleet, at_ms(t)) {
                first = Some((t, ask));
                break;
            }
        }
        let (t, ask) = first.unwrap();
        assert_eq!((t, b.lease.unwrap().units), (1_000, 99));
        assert_eq!(ask.need, 1);
        assert!(ask.want > 100);
        assert_eq!(b.prefetch(&terms, fleet, at_ms(1_000)), None);
        held(b.step(cost(1), &terms, fleet, at_ms(1_000)));
        b.granted(credit_grant(ask.want, 0, 1, 1, at_ms(1_001)), at_ms(1_001));
        // A rate limit at its cap does not prefetch.
        let mut c = Budget::new();
        let small = rate(40, 60_000);
        reserve(c.step(cost(1), &small, fleet, at_ms(0)));
        c.granted(window_grant(2, 38, 0, at_ms(0)), at_ms(0));
        held(c.step(cost(1), &small, fleet, at_ms(1)));
        assert_eq!(c.prefetch(&small, fleet, at_ms(1)), None);
    }

    #[test]
    fn a_grant_for_a_past_window_is_lost() {
        let terms = rate(1000, 10_000);
        let mut b = Budget::new();
        reserve(b.step(cost(1), &terms, Fleet::of(1), at_ms(10_500)));
        b.granted(window_grant(5, 995, 1, at_ms(10_500)), at_ms(10_500));
        reserve(b.step(cost(9), &terms, Fleet::of(1), at_ms(10_600)));
        // A late statement answered for window 0.
        b.granted(window_grant(9, 0, 0, at_ms(10_600)), at_ms(10_600));
        assert_eq!(b.take_lost(), 9);
        assert_eq!(
            held(b.step(cost(5), &terms, Fleet::of(1), at_ms(10_601))).units(),
            5
        );
    }

    #[test]
    fn rows_read_into_answers() {
        let p = period(10_000);
        let (sent, received) = (at_ms(1), at_ms(2));
        let row = RateRow {
            window_start: T0_MS,
            taken: 40,
            last_grant: 10,
            asked_window: T0_MS,
            now_ms: T0_MS + 5,
        };
        let Answer::Granted(g) = row.answer(100, p, sent, received) else {
            panic!("expected a grant");
        };
        assert_eq!(
            (g.units, g.remaining, g.tag, g.end_ms),
            (10, 60, Tag::window(T0_MS), Some(T0_MS + 10_000))
        );
        assert_eq!(
            g.reading,
            Reading {
                sent,
                received,
                db_now_ms: T0_MS + 5
            }
        );
        assert!(matches!(
            RateRow {
                last_grant: 0,
                ..row
            }
            .answer(100, p, sent, received),
            Answer::Refused(_)
        ));
        // The limit was lowered below what was taken: nothing left, not a negative.
        let Answer::Refused(r) = RateRow {
            last_grant: 0,
            ..row
        }
        .answer(20, p, sent, received) else {
            panic!("expected a refusal");
        };
        assert_eq!(r.remaining, 0);
        assert_eq!(
            RateRow {
                window_start: T0_MS + 10_000,
                ..row
            }
            .answer(100, p, sent, received),
            Answer::Again
        );
        let credit = CreditRow {
            last_grant: 3,
            balance: 7,
            epoch: 4,
            version: 9,
            next_refill_ms: Some(T0_MS + 60_000),
            now_ms: T0_MS,
        };
        let Answer::Granted(g) = credit.answer(sent, received) else {
            panic!("expected a grant");
        };
        assert_eq!(
            (g.units, g.remaining, g.tag, g.version, g.end_ms),
            (3, 7, Tag::epoch(4), 9, Some(T0_MS + 60_000))
        );
        assert!(matches!(
            CreditRow {
                last_grant: 0,
                ..credit
            }
            .answer(sent, received),
            Answer::Refused(_)
        ));
    }

    #[test]
    fn estimates_are_exact_on_one_replica() {
        let terms = rate(100, 10_000);
        let fleet = Fleet::single();
        let mut b = Budget::new();
        // Never asked: the whole limit, and the window from the wall clock.
        assert_eq!(
            b.estimate(&terms, at_ms(0), T0_MS + 3),
            Estimate {
                remaining: 100,
                reset_ms: Some(T0_MS + 10_000)
            }
        );
        reserve(b.step(cost(1), &terms, fleet, at_ms(0)));
        b.granted(window_grant(5, 95, 0, at_ms(0)), at_ms(0));
        held(b.step(cost(2), &terms, fleet, at_ms(1)));
        assert_eq!(b.estimate(&terms, at_ms(1), 0).remaining, 98);
        // Next window: full again.
        assert_eq!(
            b.estimate(&terms, at_ms(10_050), 0),
            Estimate {
                remaining: 100,
                reset_ms: Some(T0_MS + 20_000)
            }
        );

        let mut c = Budget::new();
        let terms = Terms::Credits(CreditTerms {
            account: Uuid::nil(),
            balance: 50,
            epoch: 1,
            version: 1,
            next_refill_ms: Some(T0_MS + 60_000),
        });
        assert_eq!(
            c.estimate(&terms, at_ms(0), 0),
            Estimate {
                remaining: 50,
                reset_ms: Some(T0_MS + 60_000)
            }
        );
        reserve(c.step(cost(1), &terms, fleet, at_ms(0)));
        let mut grant = credit_grant(10, 40, 1, 1, at_ms(0));
        grant.end_ms = Some(T0_MS + 60_000);
        c.granted(grant, at_ms(0));
        held(c.step(cost(3), &terms, fleet, at_ms(1)));
        assert_eq!(c.estimate(&terms, at_ms(1), 0).remaining, 47);
        // The key was re-read after an adjustment: its balance is newer than this replica's.
        let adjusted = Terms::Credits(CreditTerms {
            account: Uuid::nil(),
            balance: 140,
            epoch: 1,
            version: 2,
            next_refill_ms: Some(T0_MS + 60_000),
        });
        assert_eq!(c.estimate(&adjusted, at_ms(2), 0).remaining, 147);
    }
}
