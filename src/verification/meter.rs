//! The per-replica meter of usage controls: the budgets (rate limits, credit accounts) this
//! replica has seen, each a [`Budget`] state machine (`domain::usage`) behind its own mutex,
//! in a sharded map keyed by budget id. Verifications spend from the leases in memory; the
//! database is asked only to reserve more (one reservation in flight per budget, the other
//! requests wait for it) or to take units back. A background task tops busy leases up
//! before they run dry, gives idle ones back, and drops budgets nobody uses; shutdown gives
//! every lease back. The design, and why the bounds hold, is `docs/usage-controls.md`.
//!
//! A mutex is held for a few arithmetic operations, never across an `await`: statements run
//! in tasks of their own, which report to the budget when they end, so a request that is
//! cancelled mid-reservation cannot leave its budget waiting forever.
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use dashmap::DashMap;
use metrics::Counter;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::records::{ApiKey, VerifyCode};
use crate::domain::usage::{
    Answer, Ask, Budget, BudgetId, BudgetKind, CREDIT_REFUSAL_TTL, Cost, Fleet, GiveBack, Hold,
    IDLE, LimitState, Mono, Peers, Refused, Step, Tag, Terms,
};
use crate::storage::budgets::leases::RateAsk;
use crate::storage::feed::Heartbeats;
use crate::storage::{Store, StoreError};

/// How often the background task prefetches, gives back and retires.
const TICK: Duration = Duration::from_millis(100);
/// How often windows that ended long ago are swept from the database.
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// A reservation that takes longer is written off (its outcome is unknown) and the request
/// that needed it is answered UNAVAILABLE.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(2);
/// A request asks again at most this often when the database answered for an older window
/// (its clock stepped back) or its holds expired while it waited: then it is UNAVAILABLE.
const ATTEMPTS: usize = 4;
/// How long a request the database refused credits waits for the other replicas to return
/// theirs (a recall) before asking again: a NOTIFY's delivery and a give-back statement.
const RECALL_WAIT: Duration = Duration::from_millis(50);

/// Why a charge could not be decided: never an admission. Verification answers it
/// UNAVAILABLE, as it answers a database that cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// A statement failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a reservation timed out")]
    TimedOut,
    #[error("the reservation task ended early")]
    TaskEnded,
    #[error("the database keeps answering for an older window")]
    OlderWindows,
    #[error("usage holds kept expiring")]
    HoldsExpired,
    /// A stale verification ([`Spend::HeldOnly`]) needed more than this replica holds.
    #[error("{NOTHING_HELD}")]
    NothingHeld,
}

const NOTHING_HELD: &str = "no usage budget held, and the database does not answer";

impl From<MeterError> for StoreError {
    fn from(err: MeterError) -> Self {
        match err {
            MeterError::Store(err) => err,
            // Met only while the database already does not answer: said as its reads say it.
            MeterError::NothingHeld => StoreError::NotAnswering(NOTHING_HELD),
            other => StoreError::Metering(other.to_string()),
        }
    }
}

/// Where a charge may take its units from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Leases held, and the database when they run out (the normal case).
    Reserve,
    /// Only what this replica already holds: the database does not answer (a stale
    /// verification). Running out is UNAVAILABLE; credits are never overspent.
    HeldOnly,
}

/// What a verification decided about usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admitted,
    /// The rate limit at this index of the key's refused.
    RateLimited(usize),
    UsageExceeded,
}

impl Decision {
    pub fn code(self) -> VerifyCode {
        match self {
            Decision::Admitted => VerifyCode::Valid,
            Decision::RateLimited(_) => VerifyCode::RateLimited,
            Decision::UsageExceeded => VerifyCode::UsageExceeded,
        }
    }
}

/// One rate limit's state after a verification (this replica's estimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitReport {
    pub state: LimitState,
    /// The database clock now, as low as it can be: what `reset_ms` is counted from.
    pub db_now_ms: i64,
}

/// The credits after a verification (this replica's estimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditReport {
    pub remaining: u64,
    /// The next refill (database clock); `None` without one.
    pub reset_ms: Option<i64>,
    pub refill_amount: Option<u64>,
    pub db_now_ms: i64,
}

/// What verification reports about a key's usage controls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// One per rate limit, in the key's order.
    pub limits: Vec<LimitReport>,
    /// `None`: unlimited credits.
    pub credits: Option<CreditReport>,
}

struct SlotState {
    budget: Budget,
    /// As last seen with a key: the background task has no request to take them from.
    terms: Terms,
    /// A recall is out: refused requests wait until then, and the first to wake asks the
    /// database again.
    recall: Option<Mono>,
    /// When the last recall went out: at most one per [`CREDIT_REFUSAL_TTL`].
    last_recall: Option<Mono>,
    /// Since a recall was heard, the account is nearly spent: reserve exactly what each
    /// request needs until then, so that no replica strands credits again.
    frugal_until: Option<Mono>,
}

impl SlotState {
    /// The fleet to size this budget's reservations by: unknown (exactly the need, no
    /// prefetch) while frugal.
    fn sizing(&self, fleet: Fleet, now: Mono) -> Fleet {
        if self.frugal_until.is_some_and(|until| now < until) {
            Fleet::UNKNOWN
        } else {
            fleet
        }
    }
}

/// One budget of this replica.
struct Slot {
    id: BudgetId,
    state: Mutex<SlotState>,
    /// Woken when a reservation ends, for the requests that waited for it.
    reserved: Notify,
}

impl Slot {
    fn new(id: BudgetId, terms: Terms) -> Self {
        Self {
            id,
            state: Mutex::new(SlotState {
                budget: Budget::new(),
                terms,
                recall: None,
                last_recall: None,
                frugal_until: None,
            }),
            reserved: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state stays consistent between statements: a panic elsewhere cannot have left
        // it half-written, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a reservation ended, for the request that waited for it.
enum Reserved {
    /// The budget has the database's answer (granted or refused): step again.
    Answered,
    /// The credit account is unlimited now (cleared concurrently): nothing to draw.
    Unlimited,
    /// Nothing was taken and nothing learnt (an older window): ask again.
    Again,
}

/// What drawing a request's cost from one budget came to.
enum Drawn {
    Held,
    Unlimited,
    Refused,
}

/// Units a request holds until it is admitted; put back if it is not (refused by a later
/// budget, cancelled, failed).
struct Holds<'a> {
    meter: &'a Meter,
    /// Each hold with its budget and the budget's kind (for the spent-units counter).
    held: Vec<(Arc<Slot>, Hold, BudgetKind)>,
    /// The request's clock and replica count: read once, and again only after a wait, so
    /// a request that waits for nothing reads the clock and the peers' lock once for all
    /// its budgets.
    now: Mono,
    fleet: Fleet,
}

impl<'a> Holds<'a> {
    fn new(meter: &'a Meter) -> Self {
        let now = meter.now();
        Self {
            meter,
            held: Vec::new(),
            now,
            fleet: meter.fleet(now),
        }
    }

    /// After a wait: the time (and perhaps the fleet) has moved on.
    fn reread(&mut self) {
        self.now = self.meter.now();
        self.fleet = self.meter.fleet(self.now);
    }

    fn usable(&self) -> bool {
        self.held.iter().all(|(_, h, _)| h.usable_at(self.now))
    }

    fn spend(mut self) {
        for (_, hold, kind) in std::mem::take(&mut self.held) {
            self.meter.spent(kind, hold.units());
        }
    }
}

impl Drop for Holds<'_> {
    fn drop(&mut self) {
        let now = self.meter.now();
        for (slot, hold, _) in self.held.drain(..) {
            slot.lock().budget.put_back(hold, now);
        }
    }
}

/// The meter of one replica.
pub struct Meter {
    store: Store,
    budgets: DashMap<BudgetId, Arc<Slot>>,
    /// Replicas counted from the feed's heartbeats (PostgreSQL).
    peers: Mutex<Peers>,
    /// Whether other replicas may share the database; SQLite is one process (n = 1).
    shared: bool,
    origin: Instant,
    spent_rate: Counter,
    spent_credits: Counter,
}

impl Meter {
    pub fn new(store: Store) -> Self {
        let shared = store.is_shared();
        Self {
            store,
            budgets: DashMap::new(),
            peers: Mutex::new(Peers::new()),
            shared,
            origin: Instant::now(),
            spent_rate: metrics::counter!("keyplane_usage_units_total", "kind" => BudgetKind::Rate.as_str(), "fate" => "spent"),
            spent_credits: metrics::counter!("keyplane_usage_units_total", "kind" => BudgetKind::Credits.as_str(), "fate" => "spent"),
        }
    }

    fn now(&self) -> Mono {
        mono(self.origin)
    }

    fn peers(&self) -> MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica count reservations are sized by.
    fn fleet(&self, now: Mono) -> Fleet {
        if self.shared {
            self.peers().fleet(now)
        } else {
            Fleet::single()
        }
    }

    fn spent(&self, kind: BudgetKind, units: u64) {
        match kind {
            BudgetKind::Rate => self.spent_rate.increment(units),
            BudgetKind::Credits => self.spent_credits.increment(units),
        }
    }

    fn slot(&self, id: BudgetId, terms: Terms) -> Arc<Slot> {
        if let Some(slot) = self.budgets.get(&id) {
            return slot.clone();
        }
        self.budgets
            .entry(id)
            .or_insert_with(|| Arc::new(Slot::new(id, terms)))
            .clone()
    }

    /// Charges `cost` to the key's usage controls: rate limits in order, then credits. A
    /// refusal spends nothing (what earlier budgets handed out goes back); a database
    /// failure while a reservation is needed is an error, never an admission.
    pub async fn charge(
        &self,
        key: &ApiKey,
        cost: Cost,
        spend: Spend,
    ) -> Result<(Decision, UsageReport), MeterError> {
        let decision = self.decide(key, cost, spend).await?;
        Ok((decision, self.report(key, decision)))
    }

    async fn decide(&self, key: &ApiKey, cost: Cost, spend: Spend) -> Result<Decision, MeterError> {
        if cost.is_free() {
            return Ok(Decision::Admitted);
        }
        // A rotated key in its grace period stops spending: its successor holds the
        // account now, and the pair must never spend one balance from two secrets.
        if key.successor_id.is_some() && key.credits.is_some() {
            return Ok(Decision::UsageExceeded);
        }
        for _ in 0..ATTEMPTS {
            let mut holds = Holds::new(self);
            for (i, (limit, id)) in key.rate_limits.iter().zip(&key.budgets.rate).enumerate() {
                let terms = limit.terms(key.tenant_id);
                if let Drawn::Refused = self.draw(*id, terms, cost, spend, &mut holds).await? {
                    return Ok(Decision::RateLimited(i));
                }
            }
            if let Some(credits) = key.credits {
                let terms = Terms::Credits(credits.terms(key.usage_id));
                if let Drawn::Refused = self
                    .draw(key.budgets.credits, terms, cost, spend, &mut holds)
                    .await?
                {
                    return Ok(Decision::UsageExceeded);
                }
            }
            // A request that waited (for another budget's reservation) across the end of a
            // window must not spend that window's units in the next: start over.
            if holds.usable() {
                holds.spend();
                return Ok(Decision::Admitted);
            }
        }
        Err(MeterError::HoldsExpired)
    }

    /// Draws `cost` from one budget into `holds`.
    async fn draw(
        &self,
        id: BudgetId,
        terms: Terms,
        cost: Cost,
        spend: Spend,
        holds: &mut Holds<'_>,
    ) -> Result<Drawn, MeterError> {
        let slot = self.slot(id, terms);
        let kind = terms.kind();
        let mut agains = 0;
        let mut waited_for_recall = false;
        loop {
            let (now, fleet) = (holds.now, holds.fleet);
            let (step, reserved, prefetch) = {
                let mut state = slot.lock();
                state.terms = terms;
                // A recall's wait is over: what the other replicas returned is in the
                // database now, so its earlier refusal is not its word any more.
                if state.recall.is_some_and(|until| now >= until) {
                    state.recall = None;
                    state.budget.forget_refusal();
                }
                let sizing = state.sizing(fleet, now);
                let step = state.budget.step(cost, &terms, sizing, now);
                // Registered under the lock, which a reservation's end takes before it
                // wakes the waiters: that end cannot slip between this step and the wait.
                // Only a request that will wait pays for it.
                let reserved = matches!(step, Step::AwaitReservation).then(|| {
                    let mut reserved = Box::pin(slot.reserved.notified());
                    reserved.as_mut().enable();
                    reserved
                });
                // A busy budget tops its lease up as soon as it runs low rather than at the
                // next tick: at tens of thousands of requests a second a lease can run dry
                // between ticks, and then every request waits a database round trip.
                let prefetch = match step {
                    Step::Held(_) => state.budget.prefetch(&terms, sizing, now),
                    _ => None,
                };
                (step, reserved, prefetch)
            };
            if let Some(ask) = prefetch.filter(|_| spend == Spend::Reserve) {
                self.start_reservation(&slot, terms, ask, fleet);
            }
            let needs_database = matches!(step, Step::Reserve(_) | Step::AwaitReservation);
            if needs_database && spend == Spend::HeldOnly {
                return Err(MeterError::NothingHeld);
            }
            match step {
                Step::Held(hold) => {
                    holds.held.push((slot.clone(), hold, kind));
                    return Ok(Drawn::Held);
                }
                Step::Refused(why) => {
                    if !waited_for_recall
                        && spend == Spend::Reserve
                        && let Some(wait) = self.recall(&slot, terms, why, fleet, now)
                    {
                        waited_for_recall = true;
                        tokio::time::sleep(wait).await;
                        holds.reread();
                        continue;
                    }
                    metrics::counter!("keyplane_usage_local_refusals_total", "kind" => kind.as_str())
                        .increment(1);
                    return Ok(Drawn::Refused);
                }
                Step::Reserve(ask) => {
                    let reserved = self
                        .start_reservation(&slot, terms, ask, fleet)
                        .await
                        .map_err(|_| MeterError::TaskEnded)??;
                    holds.reread();
                    match reserved {
                        Reserved::Answered => {}
                        Reserved::Unlimited => return Ok(Drawn::Unlimited),
                        Reserved::Again => {
                            agains += 1;
                            if agains >= ATTEMPTS {
                                return Err(MeterError::OlderWindows);
                            }
                        }
                    }
                }
                Step::AwaitReservation => {
                    metrics::counter!("keyplane_usage_waits_total", "reason" => "reservation")
                        .increment(1);
                    if let Some(reserved) = reserved {
                        reserved.await;
                    }
                    holds.reread();
                }
                Step::WaitUntil(until) => {
                    metrics::counter!("keyplane_usage_waits_total", "reason" => "turn")
                        .increment(1);
                    tokio::time::sleep(until.since(now)).await;
                    holds.reread();
                }
            }
        }
    }

    /// Starts a reservation on a task of its own, so that a request giving up on it (a
    /// cancelled call) cannot leave it half done; a prefetch drops the handle, and its
    /// answer reaches the budget like any other.
    fn start_reservation(
        &self,
        slot: &Arc<Slot>,
        terms: Terms,
        ask: Ask,
        fleet: Fleet,
    ) -> JoinHandle<Result<Reserved, MeterError>> {
        tokio::spawn(reserve(
            self.store.clone(),
            slot.clone(),
            terms,
            ask,
            fleet,
            self.origin,
        ))
    }

    /// Credits the database refused may sit unspent on other replicas (a lease taken for
    /// traffic that then stopped). Before a request is answered USAGE_EXCEEDED, the other
    /// replicas are asked to return what they hold of the account (a NOTIFY), and the
    /// request waits [`RECALL_WAIT`] and asks the database again. At most one recall per
    /// budget per [`CREDIT_REFUSAL_TTL`]; refused requests wait for the one that is out.
    /// `None`: answer the refusal now.
    fn recall(
        &self,
        slot: &Arc<Slot>,
        terms: Terms,
        why: Refused,
        fleet: Fleet,
        now: Mono,
    ) -> Option<Duration> {
        let alone = !self.shared || fleet.replicas() == Some(1);
        if alone || why != Refused::Remembered || !matches!(terms, Terms::Credits(_)) {
            return None;
        }
        let mut state = slot.lock();
        if let Some(until) = state.recall {
            return Some(until.since(now));
        }
        if state
            .last_recall
            .is_some_and(|t| now.since(t) < CREDIT_REFUSAL_TTL)
        {
            return None;
        }
        state.recall = Some(now.after(RECALL_WAIT));
        state.last_recall = Some(now);
        drop(state);
        tokio::spawn(send_recall(self.store.clone(), slot.id));
        Some(RECALL_WAIT)
    }

    /// The credits of the key's account this replica holds, of the epoch the key was read
    /// with, that may still be spent.
    pub fn held_credits(&self, key: &ApiKey) -> u64 {
        let Some(credits) = key.credits else {
            return 0;
        };
        self.budgets.get(&key.budgets.credits).map_or(0, |slot| {
            slot.lock()
                .budget
                .held_in(Tag::epoch(credits.epoch), self.now())
        })
    }

    /// This replica's estimates after the decision, for the response.
    fn report(&self, key: &ApiKey, decision: Decision) -> UsageReport {
        let now = self.now();
        let wall_ms = Utc::now().timestamp_millis();
        let estimate = |id: &BudgetId, terms: &Terms| match self.budgets.get(id) {
            Some(slot) => {
                let state = slot.lock();
                (
                    state.budget.estimate(terms, now, wall_ms),
                    state.budget.db_now(now, wall_ms),
                )
            }
            None => {
                let fresh = Budget::new();
                (fresh.estimate(terms, now, wall_ms), wall_ms)
            }
        };
        let limits = key
            .rate_limits
            .iter()
            .zip(&key.budgets.rate)
            .enumerate()
            .map(|(i, (limit, id))| {
                let (estimate, db_now_ms) = estimate(id, &limit.terms(key.tenant_id));
                LimitReport {
                    state: LimitState {
                        limit: limit.limit(),
                        remaining: estimate.remaining,
                        reset_ms: estimate.reset_ms.unwrap_or(db_now_ms),
                        exceeded: decision == Decision::RateLimited(i),
                    },
                    db_now_ms,
                }
            })
            .collect();
        let credits = key.credits.map(|credits| {
            let terms = Terms::Credits(credits.terms(key.usage_id));
            let (estimate, db_now_ms) = estimate(&key.budgets.credits, &terms);
            CreditReport {
                remaining: estimate.remaining,
                reset_ms: estimate.reset_ms.filter(|_| credits.refill.is_some()),
                refill_amount: credits.refill.map(|r| r.amount()),
                db_now_ms,
            }
        });
        UsageReport { limits, credits }
    }

    /// Runs until `stop`: prefetches, gives back what is idle or above its cap, drops
    /// budgets nobody uses, and sweeps ended windows from the database now and then.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.tick();
            if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                last_sweep = Some(Instant::now());
                if let Err(err) = self.store.sweep_windows().await {
                    tracing::debug!(error = %err, "could not sweep ended rate-limit windows");
                }
            }
        }
    }

    fn tick(&self) {
        let now = self.now();
        let fleet = self.fleet(now);
        let slots: Vec<(BudgetId, Arc<Slot>)> = self
            .budgets
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        for (id, slot) in slots {
            let (terms, prefetch, back, lost, retire) = {
                let mut state = slot.lock();
                let terms = state.terms;
                let sizing = state.sizing(fleet, now);
                let prefetch = state.budget.prefetch(&terms, sizing, now);
                let back = state.budget.give_back(now, fleet, false);
                let lost = state.budget.take_lost();
                (terms, prefetch, back, lost, state.budget.is_retirable(now))
            };
            if lost > 0 {
                metrics::counter!("keyplane_usage_units_total", "kind" => terms.kind().as_str(), "fate" => "expired")
                    .increment(lost);
            }
            if let Some(ask) = prefetch {
                self.start_reservation(&slot, terms, ask, fleet);
            }
            if let Some(back) = back {
                tokio::spawn(give_back(self.store.clone(), id, terms, back));
            }
            if retire {
                self.budgets
                    .remove_if(&id, |_, slot| slot.lock().budget.is_retirable(now));
            }
        }
        metrics::gauge!("keyplane_usage_budgets").set(self.budgets.len() as f64);
        metrics::gauge!("keyplane_usage_replicas").set(fleet.replicas().map_or(0.0, f64::from));
    }

    /// Gives every lease back (on shutdown, after in-flight calls finished). What does not
    /// make it in time is lost, as with a crash: never created.
    pub async fn give_back_all(&self) {
        let now = self.now();
        let fleet = self.fleet(now);
        let backs: Vec<(BudgetId, Terms, GiveBack)> = self
            .budgets
            .iter()
            .filter_map(|e| {
                let mut state = e.value().lock();
                let terms = state.terms;
                let back = state.budget.give_back(now, fleet, true)?;
                Some((*e.key(), terms, back))
            })
            .collect();
        let count = backs.len();
        futures::future::join_all(
            backs
                .into_iter()
                .map(|(id, terms, back)| give_back(self.store.clone(), id, terms, back)),
        )
        .await;
        if count > 0 {
            tracing::info!(leases = count, "gave usage leases back");
        }
    }
}

impl Heartbeats for Meter {
    fn feed_up(&self) {
        let now = self.now();
        self.peers().feed_up(now);
    }

    fn feed_down(&self) {
        self.peers().feed_down();
    }

    fn heard(&self, replica: &str) {
        let now = self.now();
        self.peers().heard(replica, now);
    }

    /// Another replica (or this one) recalls a budget: return what this replica holds of
    /// it, so that the database can grant it to whoever was refused.
    fn recalled(&self, id: BudgetId) {
        let Some(slot) = self.budgets.get(&id).map(|s| s.clone()) else {
            return;
        };
        let now = self.now();
        let fleet = self.fleet(now);
        let (terms, back) = {
            let mut state = slot.lock();
            state.frugal_until = Some(now.after(IDLE));
            (state.terms, state.budget.give_back(now, fleet, true))
        };
        if let Some(back) = back {
            metrics::counter!("keyplane_usage_recalls_total", "side" => "returned").increment(1);
            tokio::spawn(give_back(self.store.clone(), id, terms, back));
        }
    }
}

/// Asks every replica to return what it holds of a budget (PostgreSQL only: SQLite is one
/// process). Best effort: a recall that is lost only means a refusal stands.
async fn send_recall(store: Store, id: BudgetId) {
    metrics::counter!("keyplane_usage_recalls_total", "side" => "sent").increment(1);
    if let Err(err) = store.recall_budget(id).await {
        tracing::debug!(error = %err, "could not recall a usage budget");
    }
}

fn mono(origin: Instant) -> Mono {
    Mono::from_micros(u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX))
}

/// The take statement for one ask, reported to the budget whatever happens (so its
/// reservation is never left in flight), and then to whoever waits.
async fn reserve(
    store: Store,
    slot: Arc<Slot>,
    terms: Terms,
    ask: Ask,
    fleet: Fleet,
    origin: Instant,
) -> Result<Reserved, MeterError> {
    let sent = mono(origin);
    let started = Instant::now();
    // Each kind's row is read in the arm that took it, against the terms it was taken with.
    let (answer, received) = match terms {
        Terms::Rate {
            tenant,
            limit,
            period,
        } => {
            let take = store.take_rate_lease(RateAsk {
                budget: slot.id,
                tenant,
                period_ms: period.as_millis(),
                limit,
                need: ask.need,
                want: ask.want,
            });
            let (row, received) = within_timeout(take, origin).await;
            let answer = row.map(|row| Some(row.answer(limit, period, sent, received)));
            (answer, received)
        }
        Terms::Credits(credits) => {
            let spread = fleet.credit_spread();
            let take = store.take_credit_lease(credits.account, ask.need, ask.want, spread);
            let (row, received) = within_timeout(take, origin).await;
            // No row: the account is unlimited now.
            let answer = row.map(|row| row.map(|row| row.answer(sent, received)));
            (answer, received)
        }
    };
    let kind = terms.kind().as_str();
    metrics::histogram!("keyplane_usage_reservation_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    let result = {
        let mut state = slot.lock();
        match answer {
            Ok(Some(Answer::Granted(grant))) => {
                metrics::counter!("keyplane_usage_reservations_total", "kind" => kind, "result" => "granted").increment(1);
                metrics::counter!("keyplane_usage_units_total", "kind" => kind, "fate" => "reserved").increment(grant.units);
                state.budget.granted(grant, received);
                Ok(Reserved::Answered)
            }
            Ok(Some(Answer::Refused(grant))) => {
                metrics::counter!("keyplane_usage_reservations_total", "kind" => kind, "result" => "refused").increment(1);
                state.budget.refused(ask, grant, &terms, received);
                Ok(Reserved::Answered)
            }
            Ok(Some(Answer::Again)) => {
                state.budget.failed();
                Ok(Reserved::Again)
            }
            Ok(None) => {
                state.budget.failed();
                Ok(Reserved::Unlimited)
            }
            Err(err) => {
                metrics::counter!("keyplane_usage_reservations_total", "kind" => kind, "result" => "error").increment(1);
                // Whatever the statement may have taken is lost, never assumed.
                state.budget.failed();
                Err(err)
            }
        }
    };
    slot.reserved.notify_waiters();
    result
}

/// A take statement given at most [`RESERVE_TIMEOUT`], with the local time it ended at.
async fn within_timeout<T>(
    take: impl Future<Output = Result<T, StoreError>>,
    origin: Instant,
) -> (Result<T, MeterError>, Mono) {
    let taken = tokio::time::timeout(RESERVE_TIMEOUT, take).await;
    let received = mono(origin);
    let taken = match taken {
        Ok(taken) => taken.map_err(MeterError::from),
        Err(_) => Err(MeterError::TimedOut),
    };
    (taken, received)
}

/// Returns units to the database. The units already left the lease; a statement whose
/// outcome is unknown is never retried (returning twice would create units).
async fn give_back(store: Store, id: BudgetId, terms: Terms, back: GiveBack) {
    let result = match terms {
        Terms::Rate { .. } => {
            let window_start = back.tag.window_start();
            store.give_back_rate(id, back.units, window_start).await
        }
        Terms::Credits(credits) => {
            let epoch = back.tag.epoch_number();
            store
                .give_back_credits(credits.account, back.units, epoch)
                .await
        }
    };
    let fate = if result.is_ok() { "given_back" } else { "lost" };
    metrics::counter!("keyplane_usage_units_total", "kind" => terms.kind().as_str(), "fate" => fate)
        .increment(back.units);
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::domain::usage::{Credits, Period, RateLimit, RateLimitName, RateLimits};
    use crate::storage::budgets::tests::{balance, credit_account, database};

    fn key(limits: &[(u64, i64)], credits: Option<u64>) -> ApiKey {
        let rate_limits = RateLimits::new(
            limits
                .iter()
                .enumerate()
                .map(|(i, (limit, period_ms))| {
                    RateLimit::new(
                        RateLimitName::parse(&format!("l{i}")).unwrap(),
                        *limit,
                        Period::rate_limit_ms(*period_ms).unwrap(),
                        false,
                    )
                    .unwrap()
                })
                .collect(),
        )
        .unwrap();
        let mut key = ApiKey {
            rate_limits,
            credits: credits.map(|balance| Credits {
                balance,
                refill: None,
                epoch: 1,
                version: 1,
                next_refill_ms: None,
            }),
            ..ApiKey::fixture()
        };
        key.bind_budgets();
        key
    }

    async fn meter() -> Option<(Meter, Option<tempfile::TempDir>)> {
        let (db, dir) = database(false).await?;
        Some((Meter::new(Store::new(db)), dir))
    }

    async fn decisions(meter: &Meter, key: &ApiKey, cost: u64, n: usize) -> Vec<Decision> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(
                meter
                    .charge(key, Cost::new(cost).unwrap(), Spend::Reserve)
                    .await
                    .unwrap()
                    .0,
            );
        }
        out
    }

    #[tokio::test]
    async fn a_rate_limit_admits_exactly_its_limit_on_one_replica() {
        let (meter, _dir) = meter().await.unwrap();
        let k = key(&[(3, 3_600_000)], None);
        use Decision::*;
        assert_eq!(
            decisions(&meter, &k, 1, 4).await,
            [Admitted, Admitted, Admitted, RateLimited(0)]
        );
        let (decision, report) = meter
            .charge(&k, Cost::DEFAULT, Spend::Reserve)
            .await
            .unwrap();
        assert_eq!(decision, RateLimited(0));
        let state = report.limits[0].state;
        assert_eq!((state.limit, state.remaining, state.exceeded), (3, 0, true));
        assert!(state.reset_ms > report.limits[0].db_now_ms);
        // Cost 0 checks without spending, and is never refused.
        assert_eq!(
            meter
                .charge(&k, Cost::FREE, Spend::Reserve)
                .await
                .unwrap()
                .0,
            Admitted
        );
        assert_eq!(decisions(&meter, &k, 4, 1).await, [RateLimited(0)]);
    }

    #[tokio::test]
    async fn credits_are_spent_exactly_and_a_rate_limited_request_spends_none() {
        let (meter, _dir) = meter().await.unwrap();
        let k = key(&[(2, 3_600_000)], Some(5));
        credit_account(meter.store.connection(), k.tenant_id, k.usage_id, 5).await;
        use Decision::*;
        assert_eq!(
            decisions(&meter, &k, 1, 3).await,
            [Admitted, Admitted, RateLimited(0)]
        );
        let report = meter
            .charge(&k, Cost::FREE, Spend::Reserve)
            .await
            .unwrap()
            .1;
        assert_eq!(report.credits.unwrap().remaining, 3);
        meter.give_back_all().await;
        assert_eq!(balance(meter.store.connection(), k.usage_id).await, Some(3));

        let k = key(&[], Some(5));
        credit_account(meter.store.connection(), k.tenant_id, k.usage_id, 5).await;
        assert_eq!(
            decisions(&meter, &k, 2, 3).await,
            [Admitted, Admitted, UsageExceeded]
        );
        assert_eq!(decisions(&meter, &k, 1, 2).await, [Admitted, UsageExceeded]);
        meter.give_back_all().await;
        assert_eq!(balance(meter.store.connection(), k.usage_id).await, Some(0));
    }

    #[tokio::test]
    async fn a_rotated_key_stops_spending_credits() {
        let (meter, _dir) = meter().await.unwrap();
        let mut k = key(&[], Some(5));
        k.successor_id = Some(Uuid::now_v7());
        use Decision::*;
        assert_eq!(decisions(&meter, &k, 1, 1).await, [UsageExceeded]);
        assert_eq!(decisions(&meter, &k, 0, 1).await, [Admitted]);
        // With rate limits only, it draws from the family's counters as before.
        let mut k = key(&[(1, 3_600_000)], None);
        k.successor_id = Some(Uuid::now_v7());
        assert_eq!(
            decisions(&meter, &k, 1, 2).await,
            [Admitted, RateLimited(0)]
        );
    }

    #[test]
    fn meter_errors_are_answered_as_an_unavailable_database() {
        let store = |err: MeterError| StoreError::from(err);
        assert!(matches!(
            store(MeterError::TimedOut),
            StoreError::Metering(why) if why == "a reservation timed out"
        ));
        assert!(matches!(
            store(MeterError::NothingHeld),
            StoreError::NotAnswering(NOTHING_HELD)
        ));
        assert!(matches!(
            store(MeterError::Store(StoreError::StaleEtag)),
            StoreError::StaleEtag
        ));
    }

    #[tokio::test]
    async fn an_unlimited_account_admits() {
        let (meter, _dir) = meter().await.unwrap();
        // The key was read limited, the account was cleared since: no row to draw from.
        let k = key(&[], Some(5));
        assert_eq!(decisions(&meter, &k, 1, 2).await, [Decision::Admitted; 2]);
    }
}
