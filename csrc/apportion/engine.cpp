#include "apportion/engine.hpp"

#include "apportion/affinity.hpp"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace apportion {

namespace {

void name_thread(const std::string& model, uint32_t index) {
#if defined(__linux__)
  // Linux limits thread names to 15 bytes: "ap:<model>:<index>" with the model truncated.
  char suffix[16];
  const int n = std::snprintf(suffix, sizeof suffix, ":%u", index);
  const int room = std::max(0, 15 - 3 - n);
  char name[48];
  std::snprintf(name, sizeof name, "ap:%.*s%s", room, model.c_str(), suffix);
  name[15] = '\0';
  pthread_setname_np(pthread_self(), name);
#else
  (void)model;
  (void)index;
#endif
}

// Lane groups must name an own instance's group each, dense enough to bound the lanes' memory.
void check_groups(const std::string& model, uint32_t instances,
                  const std::vector<uint32_t>& groups) {
  if (groups.empty()) return;
  if (groups.size() != instances) {
    throw std::invalid_argument("model '" + model + "': instance_group has " +
                                std::to_string(groups.size()) + " entries, the model " +
                                std::to_string(instances) + " instances");
  }
  for (uint32_t g : groups) {
    if (g >= instances) {
      throw std::invalid_argument("model '" + model + "': instance_group entry " +
                                  std::to_string(g) + " is out of range (each must be < " +
                                  "instances = " + std::to_string(instances) + ")");
    }
  }
}

}  // namespace

int64_t Worker::estimate_ns(std::size_t n) const noexcept {
  const std::size_t known = batch_cost_ns.size();
  if (n < known && batch_cost_ns[n] > 0) return batch_cost_ns[n];
  // Scaling a smaller size up linearly over-estimates (a call has fixed costs): when in doubt
  // a request is kept out of a batch rather than put in one that finishes too late.
  for (std::size_t k = std::min(n, known); k-- > 1;) {
    if (batch_cost_ns[k] > 0) return batch_cost_ns[k] / static_cast<int64_t>(k) * static_cast<int64_t>(n);
  }
  for (std::size_t k = n + 1; k < known; ++k) {
    if (batch_cost_ns[k] > 0) return batch_cost_ns[k];
  }
  return 0;
}

void Worker::observe(std::size_t n, int64_t ns) noexcept {
  if (n >= batch_cost_ns.size()) return;
  ns = std::max<int64_t>(ns, 1);
  int64_t& e = batch_cost_ns[n];
  // EWMA with weight 1/4: follows a model that warms up or a machine that gets busier within
  // a few calls, without letting one outlier decide alone.
  e = e == 0 ? ns : e + (ns - e) / 4;
}

Model::Model(ModelOptions opts, std::shared_ptr<ModelHandler> handler)
    : opts_(std::move(opts)),
      handler_(std::move(handler)),
      counters_(std::make_shared<ModelCounters>(opts_.name)) {
  opts_.priority_levels = std::max<uint32_t>(opts_.priority_levels, 1);
  opts_.batching.max_size = std::max<std::size_t>(opts_.batching.max_size, 1);
  check_groups(opts_.name, opts_.instances, opts_.instance_group);
  if (opts_.pool == nullptr) opts_.burst_instances = 0;
  if (opts_.pool != nullptr) {
    member_ = opts_.pool->join(opts_.name, opts_.weight, opts_.priority_class);
  }
  const uint32_t total = opts_.instances + opts_.burst_instances;
  // Workers (and their metric shards) exist from construction so snapshot() never races with
  // start(); only the threads are spawned later.
  workers_.reserve(total);
  for (uint32_t i = 0; i < total; ++i) {
    auto w = std::make_unique<Worker>();
    w->model = this;
    w->index = i;
    w->burst = i >= opts_.instances;
    if (opts_.batching.max_size > 1) w->batch_cost_ns.assign(opts_.batching.max_size + 1, 0);
    workers_.push_back(std::move(w));
  }
  build_groups();
}

void Model::build_groups() {
  const std::vector<uint32_t>& ig = opts_.instance_group;
  uint32_t groups = 1;
  for (uint32_t g : ig) groups = std::max(groups, g + 1);
  for (auto& w : workers_) {
    w->group = w->burst ? Worker::kNoGroup : (groups > 1 ? ig[w->index] : 0);
  }
  cpu_group_.clear();
  if (groups > 1) {
    const std::size_t own = std::min<std::size_t>(opts_.instances, opts_.placement.size());
    for (std::size_t i = 0; i < own; ++i) {
      for (int cpu : opts_.placement[i].cpus) {
        if (cpu < 0) continue;
        if (static_cast<std::size_t>(cpu) >= cpu_group_.size()) {
          cpu_group_.resize(static_cast<std::size_t>(cpu) + 1, Worker::kNoGroup);
        }
        if (cpu_group_[cpu] == Worker::kNoGroup) cpu_group_[cpu] = ig[i];
      }
    }
  }
  if (!lanes_.empty() && groups == groups_) return;

  const uint32_t levels = opts_.priority_levels;
  const std::size_t cap = std::max<std::size_t>(opts_.max_queue, 1);
  // Every lane can hold max_queue requests: admission bounds all lanes together, so a push (or
  // a move to the delayed lane) always finds a free cell whichever group it routes to. The
  // price is memory: groups x levels x max_queue cells.
  std::vector<std::unique_ptr<Lane>> lanes;
  for (uint32_t i = 0; i < groups * levels; ++i) lanes.push_back(std::make_unique<Lane>(cap));
  if (!lanes_.empty()) {
    // Regrouped before start() with requests already queued: they keep their priority and
    // their order within it; each new lane has room for all of them (see above).
    for (uint32_t i = 0; i < groups_ * levels; ++i) {
      const uint32_t to = std::min(i / levels, groups - 1) * levels + i % levels;
      Request* r = nullptr;
      while (lanes_[i]->try_pop(r)) {
        if (!lanes[to]->try_push(r)) std::abort();  // single-threaded here: cannot be full
      }
    }
  }
  if (opts_.on_timeout == OnTimeout::delay) {
    if (delayed_lane_ != UINT32_MAX) {
      lanes.push_back(std::move(lanes_[delayed_lane_]));
    } else {
      // Room for every admitted request plus one per worker: a worker counts the request it
      // moves here again, though admission may have given its slot away while the worker held
      // it. A move can then never find this lane full.
      lanes.push_back(std::make_unique<Lane>(cap + workers_.size()));
    }
    delayed_lane_ = groups * levels;
  }
  lanes_ = std::move(lanes);
  // No worker runs yet, so none is parked on a count being replaced.
  more_idle_ = groups > 1 ? std::make_unique<Sleepers[]>(groups - 1) : nullptr;
  groups_ = groups;
}

Model::~Model() {
  if (!joined_) {
    close(false);
    join();
  }
}

uint32_t Model::start() {
  if (started_) return 0;
  started_ = true;
  for (auto& w : workers_) {
    Worker* wp = w.get();
    wp->thread = std::thread([this, wp] { worker_main(*wp); });
  }
  std::unique_lock lock(start_mu_);
  start_cv_.wait(lock, [&] { return start_done_ == workers_.size(); });
  return start_failed_;
}

void Model::worker_main(Worker& w) {
  name_thread(opts_.name, w.index);
  if (w.index < opts_.placement.size()) {
    const AffinityResult pinned = apply_placement(opts_.placement[w.index], opts_.memory_policy);
    if (!pinned.ok) w.pin_error = pinned.error;
  }
  const bool ok = handler_->start_worker(w);
  {
    std::lock_guard lock(start_mu_);
    ++start_done_;
    if (!ok) ++start_failed_;
  }
  start_cv_.notify_all();
  if (!ok) return;
  if (w.burst) {
    serve_burst(w);
  } else if (opts_.batching.max_size > 1) {
    serve_batches(w);
  } else if (member_ != nullptr && opts_.burst_instances == 0) {
    serve_pooled(w);
  } else {
    serve_one(w);
  }
  handler_->stop_worker(w);
}

void Model::serve_one(Worker& w) {
  w.may_linger = true;
  for (;;) {
    Request* r = nullptr;
    uint32_t lane = 0;
    if (!try_take(w.group, r, lane)) {
      handler_->idle(w);  // nothing queued: let go of what the handler held across calls
      if (take(w.group, r, lane, -1) != Take::ok) break;  // closed, every lane empty
    }
    // Uncount first: the RMW takes the submitters' line exclusively, so the read of
    // cancel_queued_ below (same line) hits instead of fetching it a second time.
    queued_.fetch_sub(1, std::memory_order_relaxed);
    if (opts_.burst_instances != 0) {
      // The last free own worker just took one and more are waiting: the burst workers' turn.
      if (busy_own_.fetch_add(1, std::memory_order_seq_cst) + 1 >= opts_.instances &&
          queued_.load(std::memory_order_relaxed) != 0) {
        wake_burst();
      }
    }
    serve_taken(w, r, lane, 0);  // own workers of a burst model hold no pool units
    if (opts_.burst_instances != 0) busy_own_.fetch_sub(1, std::memory_order_seq_cst);
  }
  handler_->idle(w);
  w.may_linger = false;
}

void Model::serve_pooled(Worker& w) {
  // Units first, request second: a worker waits at the pool before it takes anything, so the
  // pool sees every model that has work queued (a model whose workers held popped requests
  // while not yet waiting would lose its turn, or its class's precedence, for that moment),
  // and the request taken once the units are granted is the highest-priority one queued then.
  w.may_linger = true;
  uint32_t held = 0;  // kept from the previous call (renewed) or granted and not yet used
  for (;;) {
    if (held == 0) {
      if (queued_.load(std::memory_order_relaxed) == 0) {
        handler_->idle(w);
        if (!await_work(w.group)) break;  // closed, nothing queued
      }
      held = pool_enter(w);
    }
    Request* r = nullptr;
    uint32_t lane = 0;
    if (!try_take(w.group, r, lane)) {  // another worker took it, or a push is still in progress
      pool_leave(held, 0);
      held = 0;
      continue;
    }
    queued_.fetch_sub(1, std::memory_order_relaxed);
    held = serve_taken(w, r, lane, held);
  }
  pool_leave(held, 0);
  handler_->idle(w);
  w.may_linger = false;
}

bool Model::await_work(uint32_t group) noexcept {
  Sleepers& idle = idle_of(group);
  const auto queued = [this] { return queued_.load(std::memory_order_seq_cst) != 0; };
  if (queued()) return true;
  if (opts_.spin_ns > 0) {
    const int64_t spin_until = now_ns() + opts_.spin_ns;
    do {
      for (int i = 0; i < 16; ++i) cpu_relax();
      if (queued()) return true;
    } while (now_ns() < spin_until && !stopping_.load(std::memory_order_acquire));
  }
  for (;;) {
    if (stopping_.load(std::memory_order_acquire)) return queued();
    const uint32_t epoch = idle.epoch.load(std::memory_order_acquire);
    // The sleeper handshake of take(), on the count alone (see there).
    idle.count.fetch_add(kOneSleeper, std::memory_order_seq_cst);
    if (queued()) {
      leave_sleepers(idle);
      return true;
    }
    if (!stopping_.load(std::memory_order_acquire)) park_wait(idle.epoch, epoch, -1);
    leave_sleepers(idle);
  }
}

uint32_t Model::serve_taken(Worker& w, Request* r, uint32_t lane, uint32_t units) {
  const int64_t now = now_ns();
  // Expired before it started: it is never run (an expired answer is worth nothing and
  // running it would steal time from requests that can still meet their deadline) unless
  // the policy delays it. Requests in the delayed lane run whatever their deadline.
  const bool expired = lane != delayed_lane_ && now > r->deadline_ns;
  if (expired || cancel_queued_.load(std::memory_order_acquire)) {
    settle_unrunnable(w, r, lane, expired, now);
    return units;  // nothing ran: the grant is still good for the next request
  }
  if (!r->try_claim(RequestState::running)) {
    Request::release(r);  // cancelled by its caller while queued: a tombstone, already complete
    return units;
  }
  r->start_ns = now;
  handler_->run(w, &r, 1);  // one request per call: snapshot() derives the batch sizes
  if (units == 0) return 0;
  const int64_t cost = now_ns() - now;
  if (queued_.load(std::memory_order_relaxed) != 0 && !w.burst) {
    // More work: keep the units, or wait in line at once for the next grant (a worker that
    // left the line here and came back would make its model look idle for that moment).
    return opts_.pool->renew(*member_, units, cost, /*wait=*/true, idle_hook(w));
  }
  opts_.pool->release(*member_, units, cost);
  return 0;
}

uint32_t Model::pool_enter(Worker& w) {
  if (member_ == nullptr || (opts_.burst_instances != 0 && !w.burst)) return 0;
  // Before blocking on other models' calls, which may need what this worker holds (the GIL).
  return opts_.pool->acquire(*member_, opts_.pool_units, idle_hook(w));
}

std::function<void()> Model::idle_hook(Worker& w) {
  if (!w.may_linger) return {};
  return [this, &w] { handler_->idle(w); };
}

void Model::pool_leave(uint32_t units, int64_t cost_ns) noexcept {
  if (units != 0) opts_.pool->release(*member_, units, cost_ns);
}

void Model::serve_burst(Worker& w) {
  // One request per call, batching model or not (the handler calls a batching model with a
  // batch of one): a burst worker is there to cut the wait of the request at the head of the
  // queue, not to build throughput.
  while (await_burst()) {
    const uint32_t units = pool_enter(w);
    Request* r = nullptr;
    uint32_t lane = 0;
    if (!try_take(w.group, r, lane)) {  // an own worker got there first
      pool_leave(units, 0);
      continue;
    }
    queued_.fetch_sub(1, std::memory_order_relaxed);
    burst_served_.fetch_add(1, std::memory_order_relaxed);
    pool_leave(serve_taken(w, r, lane, units), 0);  // kept only if nothing ran: unused
  }
}

bool Model::await_burst() noexcept {
  for (;;) {
    const uint32_t epoch = burst_epoch_.load(std::memory_order_acquire);
    const bool queued = queued_.load(std::memory_order_seq_cst) != 0;
    if (queued && busy_own_.load(std::memory_order_seq_cst) >= opts_.instances) return true;
    if (!queued && stopping_.load(std::memory_order_acquire)) return false;
    // Woken by a submission that finds every own worker busy, by the own worker that takes
    // the last free slot with more queued, and by close(). Requests queued while an own
    // worker is free are that worker's; the timeout covers an own worker that stays busy
    // after the submission looked, with nothing new arriving.
    park_wait(burst_epoch_, epoch, queued ? 1'000'000 : -1);
  }
}

void Model::wake_burst() noexcept {
  burst_epoch_.fetch_add(1, std::memory_order_release);
  park_wake(burst_epoch_);
}

void Model::settle_unrunnable(Worker& w, Request* r, uint32_t lane, bool expired,
                              int64_t now) noexcept {
  const bool cancel = cancel_queued_.load(std::memory_order_acquire);
  if (expired && !cancel && opts_.on_timeout == OnTimeout::delay && lane != delayed_lane_ &&
      r->state() == RequestState::queued) {
    // Moved, not claimed: the request stays `queued` (a caller may still cancel it, and
    // whoever later wins its claim completes it) and holds an admission slot again; the
    // queue's reference moves with it. While the worker held it uncounted, admission may have
    // filled its slot: each worker holds at most one such request, which is what the delayed
    // lane's extra room (one cell per worker) is for.
    queued_.fetch_add(1, std::memory_order_relaxed);
    delayed_.fetch_add(1, std::memory_order_relaxed);
    // A free cell exists (see the lane's capacity); a refusal is a consumer's release of it
    // not yet visible here, which resolves within moments. This worker serves the lane itself
    // later if no other does, so it needs no wake-up.
    while (!lanes_[delayed_lane_]->try_push(r)) cpu_relax();
    return;
  }
  if (r->try_claim(RequestState::claimed)) {
    if (expired && !cancel) {
      r->start_ns = now;
      handler_->abandon(&w, r, Outcome::expired);
    } else {
      handler_->abandon(&w, r, Outcome::cancelled);
    }
  } else {
    Request::release(r);  // a tombstone: its caller cancelled (and completed) it
  }
}

void Model::serve_batches(Worker& w) {
  const BatchingOptions& opt = opts_.batching;
  const std::size_t max_size = opt.max_size;
  std::vector<Request*> batch, claimed;
  batch.reserve(max_size);
  claimed.reserve(max_size);
  // A request taken from a lane that fits no longer in the batch being formed, though it
  // could still meet its deadline in a smaller one: it opens the next batch. Uncounted in
  // queued_ (so idle workers do not wait on it), still `queued` (so it can be cancelled).
  Request* carry = nullptr;
  uint32_t carry_lane = 0;
  int64_t opened = 0;
  int64_t min_deadline = Request::kNoDeadline;

  const auto preferred = [&](std::size_t n) {
    return std::binary_search(opt.preferred_sizes.begin(), opt.preferred_sizes.end(), n);
  };
  const auto flush = [&] {
    dispatch(w, batch, claimed);
    min_deadline = Request::kNoDeadline;
  };

  for (;;) {
    Request* r = nullptr;
    uint32_t lane = 0;
    bool carried = false;
    if (carry != nullptr) {
      r = std::exchange(carry, nullptr);
      lane = carry_lane;
      carried = true;
    } else if (batch.empty()) {
      if (take(w.group, r, lane, -1) != Take::ok) return;  // closed, every lane empty
    } else if (!try_take(w.group, r, lane)) {
      // Nothing queued right now: dispatch, or wait for more while the batch is below
      // max_size, max_delay has not passed, and one more request would still let the batch
      // finish before its earliest deadline.
      if (stopping_.load(std::memory_order_acquire) || preferred(batch.size())) {
        flush();
        continue;
      }
      const int64_t by_deadline =
          min_deadline == Request::kNoDeadline
              ? Request::kNoDeadline
              : min_deadline - w.estimate_ns(batch.size() + 1);
      const int64_t until = std::min(opened + opt.max_delay_ns, by_deadline);
      if (now_ns() >= until || take(w.group, r, lane, until) != Take::ok) {
        flush();
        continue;
      }
    }

    // Taken: uncounted at once (see serve_one), held by this worker until it is batched,
    // carried, settled or moved.
    if (!carried) queued_.fetch_sub(1, std::memory_order_relaxed);
    const int64_t now = now_ns();
    if (cancel_queued_.load(std::memory_order_acquire) || r->state() != RequestState::queued) {
      settle_unrunnable(w, r, lane, false, now);
      continue;
    }
    // Requests in the delayed lane run whatever their deadline.
    const int64_t deadline = lane != delayed_lane_ ? r->deadline_ns : Request::kNoDeadline;
    // Deadline-aware: a request joins a batch only if that batch, by this worker's own measure
    // of calls of that size, finishes before the request's deadline and before those of the
    // requests already in it. One that no call could serve in time expires (or is delayed);
    // one that only this batch would make late, or that would make this batch late, opens the
    // next batch.
    if (deadline != Request::kNoDeadline && deadline < now + w.estimate_ns(1)) {
      settle_unrunnable(w, r, lane, true, now);
      continue;
    }
    const int64_t limit = std::min(deadline, min_deadline);
    if (!batch.empty() && limit != Request::kNoDeadline &&
        limit < now + w.estimate_ns(batch.size() + 1)) {
      carry = r;
      carry_lane = lane;
      flush();
      continue;
    }
    if (batch.empty()) opened = now;
    batch.push_back(r);
    min_deadline = limit;
    if (batch.size() >= max_size) flush();
  }
}

void Model::dispatch(Worker& w, std::vector<Request*>& batch, std::vector<Request*>& claimed) {
  claimed.clear();
  // A pooled model's batch waits for pool capacity formed but unclaimed: still cancellable.
  const uint32_t units = pool_enter(w);
  // Requests wait in a forming batch still `queued`: cancellation (by a caller, or by a close
  // without drain) still reaches them, and only here does the worker claim them.
  const bool cancel = cancel_queued_.load(std::memory_order_acquire);
  const int64_t start = now_ns();
  for (Request* r : batch) {
    if (cancel) {
      if (r->try_claim(RequestState::claimed)) {
        handler_->abandon(&w, r, Outcome::cancelled);
      } else {
        Request::release(r);
      }
    } else if (r->try_claim(RequestState::running)) {
      r->start_ns = start;
      claimed.push_back(r);
    } else {
      Request::release(r);  // cancelled by its caller while the batch formed
    }
  }
  batch.clear();
  if (claimed.empty()) {
    pool_leave(units, 0);
    return;
  }
  const std::size_t n = claimed.size();
  // Counted before the call: a caller that saw its result then reads the stats finds it.
  w.shard.batch_size.record(n);
  handler_->run(w, claimed.data(), n);  // completes and releases every one of them
  const int64_t cost = now_ns() - start;
  pool_leave(units, cost);
  w.observe(n, cost);
}

bool Model::try_take(uint32_t group, Request*& r, uint32_t& lane, bool steal) noexcept {
  const auto pop = [&](uint32_t i) {
    if (!lanes_[i]->try_pop(r)) return false;
    lane = i;
    return true;
  };
  if (groups_ == 1) {  // no groups: every worker serves every lane in order, delayed last
    const auto n = static_cast<uint32_t>(lanes_.size());
    for (uint32_t i = 0; i < n; ++i) {
      if (pop(i)) return true;
    }
    return false;
  }
  const uint32_t levels = opts_.priority_levels;
  const bool own = group < groups_;
  if (own) {
    for (uint32_t p = 0; p < levels; ++p) {
      if (pop(group * levels + p)) return true;
    }
  }
  if (steal || !own) {
    // Victims in turn from the next group on, so that stealers from different groups do not
    // all pile onto group 0.
    const uint32_t first = own ? group + 1 : 0;
    for (uint32_t p = 0; p < levels; ++p) {
      for (uint32_t k = 0; k < groups_; ++k) {
        const uint32_t g = (first + k) % groups_;
        if (g == group) continue;
        if (pop(g * levels + p)) {
          if (own) stolen_.fetch_add(1, std::memory_order_relaxed);
          return true;
        }
      }
    }
  }
  return delayed_lane_ != UINT32_MAX && pop(delayed_lane_);
}

uint32_t Model::route() const noexcept {
#if defined(__linux__)
  const int cpu = sched_getcpu();
  if (cpu >= 0 && static_cast<std::size_t>(cpu) < cpu_group_.size() &&
      cpu_group_[static_cast<std::size_t>(cpu)] < groups_) {
    return cpu_group_[static_cast<std::size_t>(cpu)];
  }
#endif
  // Off every instance's CPUs: spread evenly. Per thread, so submitters share no counter.
  thread_local uint32_t next = 0;
  return next++ % groups_;
}

Model::Take Model::take(uint32_t group, Request*& r, uint32_t& lane, int64_t until_ns) noexcept {
  // While it spins, a worker watches only its own group: another group's request is its own
  // workers' while they are free (they may be spinning too), and stays on its node. Once the
  // spin is over, the worker takes from every group before it parks (the handshake below),
  // and a worker woken by a push to any group takes from any group.
  if (try_take(group, r, lane, false)) return Take::ok;
  if (opts_.spin_ns > 0) {
    // Bounded by time, not by rounds: the cost of a pause instruction varies ~10x between CPUs.
    int64_t spin_until = now_ns() + opts_.spin_ns;
    if (until_ns >= 0) spin_until = std::min(spin_until, until_ns);
    do {
      for (int i = 0; i < 16; ++i) cpu_relax();
      if (try_take(group, r, lane, false)) return Take::ok;
    } while (now_ns() < spin_until && !stopping_.load(std::memory_order_acquire));
  }
  Sleepers& idle = idle_of(group);
  for (;;) {
    if (stopping_.load(std::memory_order_acquire)) {
      return try_take(group, r, lane) ? Take::ok : Take::closed;
    }
    const uint32_t epoch = idle.epoch.load(std::memory_order_acquire);
    // No lost wake-up (Dekker): announce the sleeper, then look at queued_. A submitter adds
    // to queued_ before its pushes and looks at the sleepers after them; all four are seq_cst,
    // so in their one total order either the submitter's look comes after this announcement
    // (it sees the sleeper, bumps the epoch, and the futex wait below returns at once or is
    // woken), or its add comes before the load below, which then sees the request counted:
    // this worker does not park but retries, and finds it once it is pushed (or finds the
    // count dropped because another worker took it). queued_ is non-zero without anything to
    // take only for moments: a push in progress, a pop not yet uncounted, a move to the
    // delayed lane.
    idle.count.fetch_add(kOneSleeper, std::memory_order_seq_cst);
    if (try_take(group, r, lane)) {  // every group: the wake-up may be for another group's push
      leave_sleepers(idle);
      return Take::ok;
    }
    const bool pending = queued_.load(std::memory_order_seq_cst) != 0;
    int64_t remaining = -1;
    if (until_ns >= 0) {
      remaining = until_ns - now_ns();
      if (remaining <= 0) {
        leave_sleepers(idle);
        return Take::timeout;
      }
    }
    // stopping_ is read again after the epoch: close() sets it before bumping the epoch, so a
    // worker that read the bumped epoch sees it here instead of sleeping through the close.
    if (!pending && !stopping_.load(std::memory_order_acquire)) {
      park_wait(idle.epoch, epoch, remaining);
    }
    leave_sleepers(idle);
    // Unregistered, so pushes meanwhile skip the wake-up syscall; on a busy core the thread
    // we wait for (a submitter between count and push) gets to run.
    if (pending) std::this_thread::yield();
  }
}

// Wakes up to `n` sleepers, skipping those that already have a wake-up on its way: without
// that, every push made while a woken worker is still being scheduled pays a futex syscall
// for nobody, and submitters slow to the syscall rate exactly when the workers are behind.
//
// With groups, `group`'s sleepers come first: a request pushed there is best served on its
// own node. The others are woken only for what that group cannot take: together that is as
// many wake-ups as one event count would issue, and the handshake of take() holds for each
// group's count on its own (every count is looked at, seq_cst, after the push, unless `n`
// wake-ups were issued already).
void Model::wake(std::size_t n, uint32_t group) noexcept {
  if (groups_ == 1) {
    wake_in(idle0_, n);
    return;
  }
  const uint32_t first = group < groups_ ? group : 0;
  for (uint32_t k = 0; k < groups_ && n != 0; ++k) n -= wake_in(idle_of((first + k) % groups_), n);
}

std::size_t Model::wake_in(Sleepers& idle, std::size_t n) noexcept {
  uint64_t s = idle.count.load(std::memory_order_seq_cst);  // the submitter's half: see take()
  uint64_t k = 0;
  for (;;) {
    const uint64_t sleepers = s >> 32;
    const uint64_t woken = s & kWokenMask;
    if (woken >= sleepers) return 0;  // no sleepers, or each has a wake-up in flight
    k = std::min<uint64_t>(n, sleepers - woken);
    if (idle.count.compare_exchange_weak(s, s + k, std::memory_order_acq_rel,
                                         std::memory_order_relaxed)) {
      break;
    }
  }
  idle.epoch.fetch_add(1, std::memory_order_release);
  park_wake(idle.epoch, static_cast<int>(k));
  return static_cast<std::size_t>(k);
}

// A sleeper stops waiting (for any reason) and takes one in-flight wake-up with it, if there
// is one. Wake-ups are not addressed, so the one taken may have been meant for another
// sleeper; that only leaves `woken` too low (a spare wake-up later), never a missed one.
void Model::leave_sleepers(Sleepers& idle) noexcept {
  uint64_t s = idle.count.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t woken = s & kWokenMask;
    const uint64_t next = s - kOneSleeper - (woken != 0 ? 1 : 0);
    if (idle.count.compare_exchange_weak(s, next, std::memory_order_relaxed)) return;
  }
}

Admit Model::submit(Request* r) noexcept { return submit_n(&r, 1); }

Admit Model::submit_n(Request* const* rs, std::size_t n) noexcept {
  if (n == 0) return Admit::ok;
  counters_->submitted.fetch_add(n, std::memory_order_relaxed);
  // seq_cst announcement, then seq_cst look at closed_; close() does the mirror image (store
  // closed_, then load submitting_). One total order: either this submitter sees the model
  // closed, or close() sees it inside and waits for its pushes to finish.
  submitting_.fetch_add(1, std::memory_order_seq_cst);
  struct Leave {
    std::atomic<uint32_t>& count;
    ~Leave() { count.fetch_sub(1, std::memory_order_release); }
  } leave{submitting_};
  if (closed_.load(std::memory_order_seq_cst)) {
    counters_->rejected.fetch_add(n, std::memory_order_relaxed);
    return Admit::closed;
  }
  // seq_cst: the submitter's first half of the sleeper handshake (see take()).
  const std::size_t before = queued_.fetch_add(n, std::memory_order_seq_cst);
  if (before + n > opts_.max_queue) {
    queued_.fetch_sub(n, std::memory_order_relaxed);
    counters_->rejected.fetch_add(n, std::memory_order_relaxed);
    return Admit::full;
  }
  const int64_t now = now_ns();
  const uint32_t last = opts_.priority_levels - 1;
  // One routing decision per call: a batch comes from one thread on one CPU.
  const uint32_t routed = groups_ > 1 ? route() : 0;
  for (std::size_t i = 0; i < n; ++i) {
    Request* r = rs[i];
    r->submit_ns = now;
    r->counters = counters_;
    const uint32_t group = r->group < groups_ ? r->group : routed;
    Lane& lane = *lanes_[group * opts_.priority_levels + std::min(r->priority, last)];
    // Admission guarantees a free cell and close() waits for us, so a refusal can only be a
    // consumer's release of that cell not yet visible here (possible on weakly ordered CPUs,
    // where its queued_ decrement may be seen first): it resolves within moments.
    while (!lane.try_push(r)) cpu_relax();
  }
  wake(n, rs[0]->group < groups_ ? rs[0]->group : routed);
  if (opts_.burst_instances != 0 && busy_own_.load(std::memory_order_seq_cst) >= opts_.instances) {
    wake_burst();
  }
  return Admit::ok;
}

void Model::close(bool drain) noexcept {
  if (!drain) cancel_queued_.store(true, std::memory_order_release);
  closed_.store(true, std::memory_order_seq_cst);
  // Submitters that saw the model open finish their pushes first (they never block, so this
  // wait is short); every later one sees closed_.
  while (submitting_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  // Every push is done (made visible by the submitters' release of submitting_): a worker that
  // sees stopping_ and finds every lane empty may exit.
  stopping_.store(true, std::memory_order_seq_cst);
  for (uint32_t g = 0; g < groups_; ++g) {
    Sleepers& idle = idle_of(g);
    idle.epoch.fetch_add(1, std::memory_order_release);
    park_wake(idle.epoch);
  }
  if (opts_.burst_instances != 0) wake_burst();
}

void Model::join() {
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
  joined_ = true;
  // Requests no worker will take: workers that failed to start, or pushes racing close().
  Request* r = nullptr;
  uint32_t lane = 0;
  while (try_take(Worker::kNoGroup, r, lane)) {
    queued_.fetch_sub(1, std::memory_order_relaxed);
    if (r->try_claim(RequestState::claimed)) {
      handler_->abandon(nullptr, r, Outcome::cancelled);
    } else {
      Request::release(r);
    }
  }
}

bool Model::cancel(Request* r) {
  if (!r->try_claim(RequestState::claimed)) return false;
  // abandon() consumes a reference; the caller keeps its own, and the queue keeps its own until
  // a worker pops the tombstone.
  r->add_ref();
  handler_->abandon(nullptr, r, Outcome::cancelled);
  return true;
}

void Model::complete(Request& r, Outcome o, WorkerShard* shard) noexcept {
  const int64_t end = now_ns();
  r.end_ns = end;
  if (r.counters) r.counters->count(o);
  if (shard != nullptr && (o == Outcome::ok || o == Outcome::error)) {
    shard->queue_wait.record(static_cast<uint64_t>(r.start_ns - r.submit_ns));
    shard->compute.record(static_cast<uint64_t>(end - r.start_ns));
    shard->end_to_end.record(static_cast<uint64_t>(end - r.submit_ns));
  }
  r.publish(o);
}

bool Model::direct_allowed() const noexcept {
  // seq_cst like submit_n's look at closed_: a direct call that starts after close() began
  // is refused, and one that started before is waited for by its handler's close.
  return !closed_.load(std::memory_order_seq_cst) && queued_.load(std::memory_order_seq_cst) == 0;
}

void Model::count_direct(Outcome o, int64_t start_ns) noexcept {
  const int64_t end = now_ns();
  const auto took = static_cast<uint64_t>(end > start_ns ? end - start_ns : 0);
  {
    std::lock_guard<std::mutex> lock(direct_mu_);
    direct_shard_.queue_wait.record(0);
    direct_shard_.compute.record(took);
    direct_shard_.end_to_end.record(took);
  }
  // Submitted before the outcome: a snapshot reads outcomes first, so it never sees more
  // outcomes than submissions.
  counters_->submitted.fetch_add(1, std::memory_order_relaxed);
  counters_->count(o);
}

void Model::set_placement(std::vector<InstancePlacement> placement, MemoryPolicy policy,
                          std::optional<std::vector<uint32_t>> groups) {
  if (groups) check_groups(opts_.name, opts_.instances, *groups);
  opts_.placement = std::move(placement);
  opts_.memory_policy = policy;
  if (groups) opts_.instance_group = std::move(*groups);
  build_groups();  // the CPU table follows the placement even when the groups stay
  if (member_ == nullptr) return;
  const std::size_t first = opts_.burst_instances != 0 ? opts_.instances : 0;
  uint32_t units = 0;
  for (std::size_t i = first; i < opts_.placement.size(); ++i) {
    units = std::max<uint32_t>(units, static_cast<uint32_t>(std::max(opts_.placement[i].threads, 1)));
  }
  if (units != 0) opts_.pool_units = units;
}

std::vector<std::string> Model::pin_errors() const {
  std::vector<std::string> out;
  for (const auto& w : workers_) {
    if (!w->pin_error.empty()) out.push_back("instance " + std::to_string(w->index) + ": " + w->pin_error);
  }
  return out;
}

ModelSnapshot Model::snapshot() const {
  ModelSnapshot s;
  const ModelCounters& c = *counters_;
  // Outcomes first, submitted last: a reader then never sees more outcomes than submissions.
  s.completed = c.completed.load(std::memory_order_relaxed);
  s.failed = c.failed.load(std::memory_order_relaxed);
  s.rejected = c.rejected.load(std::memory_order_relaxed);
  s.expired = c.expired.load(std::memory_order_relaxed);
  s.cancelled = c.cancelled.load(std::memory_order_relaxed);
  s.submitted = c.submitted.load(std::memory_order_relaxed);
  s.queued = queued_.load(std::memory_order_relaxed);
  s.delayed = delayed_.load(std::memory_order_relaxed);
  for (const auto& w : workers_) {
    w->shard.queue_wait.snapshot_into(s.queue_wait);
    w->shard.compute.snapshot_into(s.compute);
    w->shard.end_to_end.snapshot_into(s.end_to_end);
    w->shard.batch_size.snapshot_into(s.batch_size);
  }
  if (member_ != nullptr) {
    const SharedPool::MemberStats p = opts_.pool->stats(*member_);
    s.pool_grants = p.grants;
    s.pool_busy_unit_ns = p.busy_unit_ns;
  }
  s.burst_served = burst_served_.load(std::memory_order_relaxed);
  s.stolen = stolen_.load(std::memory_order_relaxed);
  direct_shard_.queue_wait.snapshot_into(s.queue_wait);
  direct_shard_.compute.snapshot_into(s.compute);
  const uint64_t served_by_workers = s.end_to_end.total;
  direct_shard_.end_to_end.snapshot_into(s.end_to_end);
  s.direct = s.end_to_end.total - served_by_workers;  // one sample per direct call
  if (opts_.batching.max_size <= 1) {
    // Without batching every call serves one request, and every call that ran recorded its
    // compute time: the batch-size histogram follows from that count, at no cost per call.
    const uint64_t calls = s.compute.total;
    s.batch_size.counts[LogHistogram::index_of(1)] = calls;
    s.batch_size.total = calls;
    s.batch_size.sum = calls;
    s.batch_size.max = calls != 0 ? 1 : 0;
  }
  s.queue_wait.origin = origin_;
  s.compute.origin = origin_ + 1;
  s.end_to_end.origin = origin_ + 2;
  s.batch_size.origin = origin_ + 3;
  return s;
}

}  // namespace apportion
