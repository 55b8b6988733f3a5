#include "apportion/engine.hpp"

#include "apportion/cpu_idle.hpp"

#include "apportion/affinity.hpp"

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace apportion {

namespace {

// Names the calling thread "ap:<model><suffix>": Linux limits thread names to 15 bytes, so the
// model is cut, at a character's first byte (cut inside a UTF-8 sequence, ps and py-spy showed
// garbage). Workers take ":<index>", a model's deadline timer ":t" (all were "ap:expiry").
void name_thread(const std::string& model, const char* suffix) {
#if defined(__linux__)
  const int n = static_cast<int>(std::strlen(suffix));
  std::size_t room = static_cast<std::size_t>(std::max(0, 15 - 3 - n));
  if (model.size() > room) {
    while (room > 0 && (static_cast<unsigned char>(model[room]) & 0xC0) == 0x80) --room;
  }
  char name[48];
  std::snprintf(name, sizeof name, "ap:%.*s%s", static_cast<int>(std::min(room, model.size())), model.c_str(),
                suffix);
  name[15] = '\0';
  pthread_setname_np(pthread_self(), name);
#else
  (void)model;
  (void)suffix;
#endif
}

void name_worker(const std::string& model, uint32_t index) {
  char suffix[16];
  std::snprintf(suffix, sizeof suffix, ":%u", index);
  name_thread(model, suffix);
}

// A batch is sized by max_size before the first request: bounded so a worker cannot fail there.
void check_batch_size(const std::string& model, std::size_t max_size) {
  if (max_size > kMaxBatchSize) {
    throw std::invalid_argument("model '" + model + "': batching max_size " + std::to_string(max_size) +
                                " is out of range (1 .. " + std::to_string(kMaxBatchSize) + ")");
  }
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
    if (g >= LaneSet::kMaxGroups) {
      throw std::invalid_argument("model '" + model + "': instance_group entry " +
                                  std::to_string(g) + " is out of range (each must be < " +
                                  std::to_string(LaneSet::kMaxGroups) + ")");
    }
  }
}

}  // namespace

Model::Model(ModelOptions opts, std::shared_ptr<ModelHandler> handler)
    : opts_(std::move(opts)),
      handler_(std::move(handler)),
      counters_(std::make_shared<ModelCounters>(opts_.name)) {
  counters_->spare_cells = std::max<std::size_t>(opts_.max_queue, 1);  // see build_groups
  counters_->track_held = opts_.admission == Admission::deadline;
  opts_.priority_levels = std::max<uint32_t>(opts_.priority_levels, 1);
  opts_.batching.max_size = std::max<std::size_t>(opts_.batching.max_size, 1);
  check_groups(opts_.name, opts_.instances, opts_.instance_group);
  if (opts_.priority_levels > LaneSet::kMaxLevels) {
    throw std::invalid_argument("model '" + opts_.name + "': priority_levels " +
                                std::to_string(opts_.priority_levels) + " is out of range (1 .. " +
                                std::to_string(LaneSet::kMaxLevels) + ")");
  }
  // Bounds before anything is sized by them: 2 x max_queue cells per lane overflowed to 0 for
  // max_queue >= 2^63 (the third submit spun for ever), and a batch of SIZE_MAX was a
  // length_error thrown in a worker thread (std::terminate).
  // max_queue 0 admitted nothing, and set_max_queue() then read "out of range (1 .. 0)".
  if (opts_.max_queue == 0 || opts_.max_queue > kMaxQueueBound) {
    throw std::invalid_argument("model '" + opts_.name + "': max_queue " + std::to_string(opts_.max_queue) +
                                " is out of range (1 .. " + std::to_string(kMaxQueueBound) + ")");
  }
  check_batch_size(opts_.name, opts_.batching.max_size);
  if (opts_.pool != nullptr && opts_.burst_instances != 0 && opts_.batching.max_size > 1) {
    // A burst worker waits for every own worker to be busy, which only single-request workers
    // report: with batching the burst instances never served.
    throw std::invalid_argument("model '" + opts_.name + "': burst instances serve one request per call; "
                                "they are not available with batching");
  }
  if (opts_.admission == Admission::deadline && opts_.priority_levels != 1) {
    throw std::invalid_argument("model '" + opts_.name + "': admission by deadline judges a request by "
                                "every request queued ahead of it; with priority_levels " +
                                std::to_string(opts_.priority_levels) + " a request may skip some of them");
  }
  if (opts_.pool == nullptr) opts_.burst_instances = 0;
  // With on_timeout=delay a late request still runs: nothing to expire early.
  if (opts_.on_timeout == OnTimeout::reject) expiry_ = std::make_shared<ExpiryHeap>();
  if (opts_.pool != nullptr) {
    member_ = opts_.pool->join(opts_.name, opts_.weight, opts_.priority_class);
  }
  max_queue_.store(opts_.max_queue, std::memory_order_relaxed);
  instances_.store(opts_.instances, std::memory_order_relaxed);
  // Workers (and their metric shards) exist from construction so snapshot() never races with
  // start(); only the threads are spawned later.
  workers_ = make_workers(nullptr, opts_.instances, opts_.burst_instances, opts_.batching.max_size);
  build_groups();
  // Last (nothing after it may throw and leave the thread unjoined): requests submitted before
  // start() expire at their deadlines too.
  start_expiry();
}

std::vector<std::unique_ptr<Worker>> Model::make_workers(const std::shared_ptr<WorkerGeneration>& gen,
                                                         uint32_t own, uint32_t burst,
                                                         std::size_t batch_max) {
  std::vector<std::unique_ptr<Worker>> out;
  out.reserve(own + burst);
  for (uint32_t i = 0; i < own + burst; ++i) {
    auto w = std::make_unique<Worker>();
    w->model = this;
    w->index = i;
    w->burst = i >= own;
    w->gen = gen;
    w->single = batch_max <= 1;
    if (batch_max > 1) {
      w->batch_cost_ns.assign(batch_max + 1, 0);
      w->batch_slow_ns.assign(batch_max + 1, 0);
    }
    out.push_back(std::move(w));
  }
  return out;
}

std::shared_ptr<WorkerGeneration> Model::generation_from_options() const {
  auto gen = std::make_shared<WorkerGeneration>();
  gen->instances = opts_.instances;
  gen->placement = opts_.placement;
  gen->memory_policy = opts_.memory_policy;
  gen->batching = opts_.batching;
  gen->pool_units = opts_.pool_units;
  return gen;
}

void Model::build_groups() {
  const std::vector<uint32_t>& ig = opts_.instance_group;
  uint32_t groups = 1;
  for (uint32_t g : ig) groups = std::max(groups, g + 1);
  for (auto& w : workers_) {
    w->group = w->burst ? Worker::kNoGroup : (groups > 1 ? ig[w->index] : 0);
  }
  std::vector<uint32_t> cpu_group;
  if (groups > 1) {
    const std::size_t own = std::min<std::size_t>(opts_.instances, opts_.placement.size());
    for (std::size_t i = 0; i < own; ++i) {
      for (int cpu : opts_.placement[i].cpus) {
        if (cpu < 0) continue;
        if (static_cast<std::size_t>(cpu) >= cpu_group.size()) {
          cpu_group.resize(static_cast<std::size_t>(cpu) + 1, Worker::kNoGroup);
        }
        if (cpu_group[cpu] == Worker::kNoGroup) cpu_group[cpu] = ig[i];
      }
    }
  }
  lanes_.set_cpu_groups(std::move(cpu_group));
  if (lanes_.size() != 0 && groups == lanes_.groups()) return;
  // Every lane can hold max_queue requests: admission bounds all lanes together, so a push (or
  // a move to the delayed lane) always finds a free cell whichever group it routes to. The
  // price is memory: groups x levels x max_queue cells. The delayed lane has room for every
  // admitted request plus one per worker: a worker counts the request it moves there again,
  // though admission may have given its slot away while the worker held it. A move can then
  // never find that lane full.
  //
  // Twice that: a request settled while queued (expired by the timer, cancelled by its caller)
  // gives its admission slot back at once but keeps its cell until a worker pops it; at most
  // max_queue such requests are uncounted at a time (see claim_queued()), so a push still always
  // finds a free cell.
  const std::size_t cap = 2 * std::max<std::size_t>(opts_.max_queue, 1);
  lanes_.build(groups, opts_.priority_levels, cap,
               opts_.on_timeout == OnTimeout::delay ? cap + workers_.size() : 0);
}

Model::~Model() {
  if (!joined_) {
    close(false);
    join();
  }
}

// What to look at when the OS refuses a thread (std::system_error EAGAIN, std::bad_alloc).
constexpr const char* kThreadLimits = " (a thread, memory or process limit: ulimit -u, a container's pids limit, ulimit -v)";

void Model::start_expiry() {
  if (expiry_ == nullptr || expiry_thread_.joinable()) return;
  try {
    run_expiry_thread();
  } catch (const std::exception& e) {  // std::system_error (EAGAIN), std::bad_alloc
    throw std::runtime_error("model '" + opts_.name + "': the OS refused the thread of its deadline timer: " +
                             e.what() + kThreadLimits);
  }
}

void Model::run_expiry_thread() {
  expiry_thread_ = std::thread([this] {
    name_thread(opts_.name, ":t");
    std::vector<Request*> claimed, others;
    expiry_->run([&](std::vector<Request*>& due, int64_t now) {
      claimed.clear();
      others.clear();
      for (Request* r : due) {
        if (claim_queued(r)) {
          r->start_ns = now;
          claimed.push_back(r);  // abandoned: the heap's reference goes with it
        } else {
          others.push_back(r);  // running or completed: its owner completes it
        }
      }
      handler_->expire(claimed.data(), claimed.size(), others.data(), others.size());
    });
  });
}

uint32_t Model::start() {
  if (started_) return 0;
  started_ = true;
  try {
    start_expiry();
  } catch (const std::exception& e) {
    std::lock_guard lock(workers_mu_);
    thread_error_ = e.what();
    return 1;  // nothing started: the owner closes the model, which cancels what is queued
  }
  // Every worker serves as soon as it started: a failed start stops the whole model anyway.
  auto gen = generation_from_options();
  gen->gate.store(WorkerGeneration::kServe, std::memory_order_relaxed);
  std::vector<Worker*> ws;
  for (auto& w : workers_) {
    w->gen = gen;
    ws.push_back(w.get());
  }
  const std::size_t launched = launch(ws);
  std::unique_lock lock(gen->mu);
  gen->cv.wait(lock, [&] { return gen->started == launched; });
  return gen->failed + (launched < ws.size() ? 1 : 0);
}

std::size_t Model::launch(const std::vector<Worker*>& ws) {
  std::size_t i = 0;
  try {
    for (; i < ws.size(); ++i) {
      Worker* wp = ws[i];
      wp->thread = std::thread([this, wp] { worker_main(*wp); });
    }
  } catch (const std::exception& e) {  // std::system_error (EAGAIN), std::bad_alloc
    std::lock_guard lock(workers_mu_);
    thread_error_ = "the OS refused the thread of instance " + std::to_string(ws[i]->index) + " (" +
                    std::to_string(i) + " of " + std::to_string(ws.size()) + " started): " + e.what() +
                    kThreadLimits;
  }
  return i;
}

std::string Model::take_thread_error() {
  std::lock_guard lock(workers_mu_);
  return std::exchange(thread_error_, std::string());
}

void Model::worker_main(Worker& w) {
  name_worker(opts_.name, w.index);
#if defined(__linux__)
  w.tid.store(static_cast<int>(::syscall(SYS_gettid)), std::memory_order_release);
#endif
  struct Gone {
    Worker& w;
    ~Gone() { w.tid.store(0, std::memory_order_release); }
  } gone{w};
  WorkerGeneration& gen = *w.gen;
  if (w.index < gen.placement.size()) {
    const AffinityResult pinned = apply_placement(gen.placement[w.index], gen.memory_policy);
    if (!pinned.ok) {
      std::lock_guard lock(workers_mu_);  // pin_errors() reads it, during a live move too
      w.pin_error = pinned.error;
    }
  }
  if (member_ != nullptr && (opts_.burst_instances == 0 || w.burst)) {
    // Below a reserved class: yield the CPU to that class's calls (see SharedPool). Threads
    // the worker creates from here on (a framework's intra-op pool) inherit it.
    if (const int nice = opts_.pool->nice_for(member_->priority_class()); nice != 0) {
#if defined(__linux__)
      // Relative to the thread's own nice, so raising it never needs privileges.
      const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
      errno = 0;
      const int now = ::getpriority(PRIO_PROCESS, tid);
      const int target = std::min(19, (errno == 0 ? now : 0) + nice);
      if (::setpriority(PRIO_PROCESS, tid, target) != 0) {
        const std::string why = "cannot lower its OS priority to nice " + std::to_string(target) +
                                ": " + std::strerror(errno);
        std::lock_guard lock(workers_mu_);
        w.pin_error = w.pin_error.empty() ? why : w.pin_error + "; " + why;
      }
#endif
    }
  }
  const bool ok = handler_->start_worker(w);
  {
    std::lock_guard lock(gen.mu);
    ++gen.started;
    if (!ok) ++gen.failed;
    // Notified under the lock: the mover may destroy the generation once it saw the count.
    gen.cv.notify_all();
  }
  if (!ok) return;
  // A moved model's new workers wait here until every one of them started.
  uint32_t gate = gen.gate.load(std::memory_order_acquire);
  while (gate == WorkerGeneration::kHold) {
    park_wait(gen.gate, WorkerGeneration::kHold, -1);
    gate = gen.gate.load(std::memory_order_acquire);
  }
  if (gate == WorkerGeneration::kAbort) {
    handler_->stop_worker(w);
    return;
  }
  if (w.burst) {
    serve_burst(w);
  } else if (gen.batching.max_size > 1) {
    serve_batches(w);
  } else if (member_ != nullptr && opts_.burst_instances == 0) {
    serve_pooled(w);
  } else {
    serve_one(w);
  }
  handler_->stop_worker(w);
}

bool Model::spin_for_next(const Worker& w) const noexcept {
  return opts_.spin_beside_caller || w.colocated < kColocatedStreak || other_cpu_idle(current_cpu());
}

Model::Take Model::take_next(Worker& w, Request*& r, uint32_t& lane) {
  const int64_t idle_from = now_ns();
  const bool spin = spin_for_next(w) &&
                    (!w.arrivals.late() || !other_cpu_idle(current_cpu()) || w.arrivals.probe());
  const Take got = take(w, r, lane, -1, spin);
  if (got == Take::ok) w.arrivals.arrived(idle_from, r->submit_ns, opts_.spin_ns);
  return got;
}

namespace {

// A request `w` starts on CPU `cpu` (< 0: unknown). Its caller wakes at completion, on the CPU
// it submitted from: when that is this one, request after request, the worker stops spinning
// for the next (see Model::spin_for_next), and a caller waiting meanwhile learns it (stored only
// then: a store per request to the line the caller polls cost 6% of submit_many's throughput).
void note_caller_cpu(Worker& w, Request* r, int cpu) noexcept {
  if (cpu >= 0 && r->submit_cpu == cpu) {
    r->worker_cpu.store(cpu, std::memory_order_relaxed);
    ++w.colocated;
  } else {
    w.colocated = 0;
  }
}

}  // namespace

void Model::serve_one(Worker& w) {
  w.may_linger = true;
  for (;;) {
    Request* r = nullptr;
    uint32_t lane = 0;
    if (w.retire.load(std::memory_order_acquire)) break;  // moved: the new workers take the rest
    if (lanes_.try_take(w.group, r, lane)) {
      w.arrivals.in_time();
    } else {
      handler_->idle(w);  // nothing queued: let go of what the handler held across calls
      if (take_next(w, r, lane) != Take::ok) break;  // leaving, every lane empty
    }
    // Uncount first: the RMW takes the submitters' line exclusively, so the read of
    // cancel_queued_ below (same line) hits instead of fetching it a second time.
    taken(r);
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
    if (w.retire.load(std::memory_order_acquire)) break;  // moved: the new workers take the rest
    if (held == 0) {
      if (queued_.load(std::memory_order_relaxed) == 0) {
        handler_->idle(w);
        if (!await_work(w)) break;  // leaving, nothing queued
      }
      held = pool_enter(w);
    }
    Request* r = nullptr;
    uint32_t lane = 0;
    if (!lanes_.try_take(w.group, r, lane)) {  // another worker took it, or a push is still in progress
      pool_leave(held, 0);
      held = 0;
      continue;
    }
    taken(r);
    held = serve_taken(w, r, lane, held);
  }
  pool_leave(held, 0);
  handler_->idle(w);
  w.may_linger = false;
}

bool Model::await_work(const Worker& w) noexcept {
  // The sleeper handshake of take(), on queued_ alone: it is the condition itself.
  const auto queued = [this] { return queued_.load(std::memory_order_seq_cst) != 0; };
  return lanes_.idle(w.group).await(opts_.spin_ns, -1, queued, queued, [] { return false; },
                                    [this, &w] { return leaving(w); }) == EventCount::Wait::ready;
}

uint32_t Model::serve_taken(Worker& w, Request* r, uint32_t lane, uint32_t units) {
  const int64_t now = now_ns();
  // Expired before it started: it is never run (an expired answer is worth nothing and
  // running it would steal time from requests that can still meet their deadline) unless
  // the policy delays it. Requests in the delayed lane run whatever their deadline.
  const bool expired = lane != lanes_.delayed_lane() && now > r->deadline_ns;
  if (expired || cancel_queued_.load(std::memory_order_acquire)) {
    settle_unrunnable(w, r, lane, expired, now);
    return units;  // nothing ran: the grant is still good for the next request
  }
  if (!claim(r, RequestState::running)) return units;
  r->start_ns = now;
  note_caller_cpu(w, r, current_cpu());
  w.call_start_ns.store(now, std::memory_order_relaxed);
  handler_->run(w, &r, 1);  // one request per call: snapshot() derives the batch sizes
  w.call_start_ns.store(0, std::memory_order_relaxed);
  const int64_t end = now_ns();
  note_drained(1, now, end);
  if (units == 0) return 0;
  const int64_t cost = end - now;
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
  return opts_.pool->acquire(*member_, w.gen->pool_units, idle_hook(w));
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
    if (!own_stay_busy()) continue;  // an own worker was only leaving its call: the request is its
    const uint32_t units = pool_enter(w);
    if (units == 0) break;  // withdrawn from the pool: the model closed (its own workers drain)
    Request* r = nullptr;
    uint32_t lane = 0;
    if (!lanes_.try_take(w.group, r, lane)) {  // an own worker got there first
      pool_leave(units, 0);
      continue;
    }
    taken(r);
    metrics_.count_burst();
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

bool Model::own_stay_busy() const noexcept {
  // A caller's next request often arrives while the own worker that answered the last one is
  // still leaving its call (counted busy a moment longer): without this look a lone caller's
  // requests went to burst workers (a third of them), taking shared-pool time at no peak.
  // Asleep meanwhile, not spinning: the watch takes no time from the shared cores it runs on.
  const auto still = [this] {
    return busy_own_.load(std::memory_order_seq_cst) >= opts_.instances &&
           queued_.load(std::memory_order_seq_cst) != 0;
  };
  if (!still()) return false;
  std::this_thread::sleep_for(std::chrono::nanoseconds(kBurstConfirmNs));
  return still();
}

void Model::wake_burst() noexcept {
  burst_epoch_.fetch_add(1, std::memory_order_release);
  park_wake(burst_epoch_);
}

bool Model::claim(Request* r, RequestState to) noexcept {
  if (r->try_claim(to)) return true;
  handler_->release(r);
  return false;
}

void Model::settle_unrunnable(Worker& w, Request* r, uint32_t lane, bool expired,
                              int64_t now) noexcept {
  const bool cancel = cancel_queued_.load(std::memory_order_acquire);
  if (expired && !cancel && opts_.on_timeout == OnTimeout::delay && lane != lanes_.delayed_lane() &&
      r->state() == RequestState::queued) {
    // Moved, not claimed: the request stays `queued` (a caller may still cancel it, and
    // whoever later wins its claim completes it) and holds an admission slot again; the
    // queue's reference moves with it. While the worker held it uncounted, admission may have
    // filled its slot: each worker holds at most one such request, which is what the delayed
    // lane's extra room (one cell per worker) is for.
    queued_.fetch_add(1, std::memory_order_relaxed);
    if (counters_->track_held && r->held.exchange(false, std::memory_order_relaxed)) {
      counters_->held.fetch_sub(1, std::memory_order_relaxed);  // queued again, counted there
    }
    r->counted.store(true, std::memory_order_relaxed);  // before the push publishes it
    metrics_.count_delayed();
    // A free cell exists (see the lane's capacity). This worker serves the lane itself later
    // if no other does, so it needs no wake-up.
    lanes_.push_delayed(r);
    return;
  }
  if (!claim(r, RequestState::claimed)) return;
  if (expired && !cancel) {
    r->start_ns = now;
    handler_->abandon(&w, r, Outcome::expired);
  } else {
    handler_->abandon(&w, r, Outcome::cancelled);
  }
}

void Model::serve_batches(Worker& w) {
  Batcher b(w.gen->batching, w.batch_cost_ns, &w.batch_slow_ns);
  for (;;) {
    Request* r = nullptr;
    uint32_t lane = 0;
    bool carried = false;
    const bool retiring = w.retire.load(std::memory_order_acquire);
    if (b.has_carry()) {
      r = b.take_carry(lane);
      carried = true;
    } else if (b.empty()) {
      if (retiring) return;  // moved: the new workers take the rest
      idle_batchers_.fetch_add(1, std::memory_order_relaxed);
      const Take got = take_next(w, r, lane);
      idle_batchers_.fetch_sub(1, std::memory_order_relaxed);
      if (got != Take::ok) return;  // leaving, every lane empty
    } else if (retiring) {
      dispatch(w, b);  // what it holds runs now; it takes nothing more
      continue;
    } else if (!lanes_.try_take(w.group, r, lane)) {
      // Nothing queued right now: dispatch, or wait for more while the batcher allows.
      const int64_t dry = now_ns();
      b.ran_dry(dry);
      // Another instance idle: whatever comes next is its at once, and this batch's wait
      // would only delay these requests (and, in a closed loop, their clients' next ones).
      if (b.dispatch_now(stopping_.load(std::memory_order_acquire),
                         idle_batchers_.load(std::memory_order_relaxed) != 0)) {
        dispatch(w, b);
        continue;
      }
      const int64_t until = b.wait_until();
      if (dry >= until || take(w, r, lane, until) != Take::ok) {
        dispatch(w, b);
        continue;
      }
    }

    // Taken: uncounted at once (see serve_one), held by this worker until it is batched,
    // carried, settled or moved.
    if (!carried) taken(r);
    const int64_t now = now_ns();
    if (cancel_queued_.load(std::memory_order_acquire) || r->state() != RequestState::queued) {
      settle_unrunnable(w, r, lane, false, now);
      continue;
    }
    // Requests in the delayed lane run whatever their deadline.
    const int64_t deadline = lane != lanes_.delayed_lane() ? r->deadline_ns : Request::kNoDeadline;
    switch (b.offer(r, deadline, now)) {
      case Batcher::Fit::joined:
        break;
      case Batcher::Fit::full:
        dispatch(w, b);
        break;
      case Batcher::Fit::next_batch:
        b.carry(r, lane);
        dispatch(w, b);
        break;
      case Batcher::Fit::hopeless:
        settle_unrunnable(w, r, lane, true, now);
        break;
    }
  }
}

void Model::dispatch(Worker& w, Batcher& b) {
  std::vector<Request*>& claimed = b.claimed();
  claimed.clear();
  // A pooled model's batch waits for pool capacity formed but unclaimed: still cancellable.
  const uint32_t units = pool_enter(w);
  // Requests wait in a forming batch still `queued`: cancellation (by a caller, or by a close
  // without drain) still reaches them, and only here does the worker claim them.
  const bool cancel = cancel_queued_.load(std::memory_order_acquire);
  const int64_t start = now_ns();
  const int cpu = current_cpu();
  bool probe = b.probing();
  // A pooled batch waited for the pool after offer() judged its requests by their deadlines
  // (other models' calls held the units): one that this call can no longer finish in time is
  // expired now, as offer() would judge it, rather than run late. Not a probe's batch (it
  // runs to re-measure), nor under on_timeout=delay (late requests run, after the rest).
  int64_t late_before = std::numeric_limits<int64_t>::min();
  // Past its deadline already (its batch waited up to it, or a timer is about to expire it): it
  // is never run, as a request taken alone is not (serve_taken), rather than race the timer.
  if (opts_.on_timeout != OnTimeout::delay) late_before = start;
  if (units != 0 && !probe && opts_.on_timeout != OnTimeout::delay) {
    late_before = start + w.deadline_estimate_ns(b.requests().size());
    // Only calls correct the estimate, and this check may keep every call from running: a
    // busy moment inflates the estimate, every batch then waits for the pool long enough to
    // be expired whole by it, and the model serves nothing, for good. So once no call has run
    // for kProbeAfterEstimates estimated calls, a batch this would expire whole runs instead
    // (what is already past its deadline still expires) and re-measures, as offer()'s probe.
    bool all_late = true, any_in_time = false;
    for (const Request* r : b.requests()) {
      all_late = all_late && r->deadline_ns < late_before;
      any_in_time = any_in_time || r->deadline_ns >= start;
    }
    if (all_late && any_in_time &&
        start - w.last_call_end_ns > Batcher::kProbeAfterEstimates * w.estimate_ns(1)) {
      probe = true;
      late_before = start;
    }
  }
  for (Request* r : b.requests()) {
    if (cancel || r->deadline_ns < late_before) {
      // Its lane matters only under on_timeout=delay, which late_before leaves out.
      settle_unrunnable(w, r, 0, !cancel, start);
    } else if (claim(r, RequestState::running)) {
      r->start_ns = start;
      claimed.push_back(r);
      note_caller_cpu(w, r, cpu);
    }
  }
  b.clear();
  if (claimed.empty()) {
    pool_leave(units, 0);
    return;
  }
  const std::size_t n = claimed.size();
  // Counted before the call: a caller that saw its result then reads the stats finds it.
  w.shard.batch_size.record(n);
  w.call_start_ns.store(start, std::memory_order_relaxed);
  handler_->run(w, claimed.data(), n);  // completes and releases every one of them
  w.call_start_ns.store(0, std::memory_order_relaxed);
  const int64_t end = now_ns();
  w.last_call_end_ns = end;
  note_drained(n, start, end);
  const int64_t cost = end - start;
  pool_leave(units, cost);
  w.observe(n, cost, probe);
}

Model::Take Model::take(const Worker& w, Request*& r, uint32_t& lane, int64_t until_ns, bool spin) noexcept {
  const uint32_t group = w.group;
  // While it spins, a worker watches only its own group: another group's request is its own
  // workers' while they are free (they may be spinning too), and stays on its node. Once the
  // spin is over, the worker takes from every group before it parks (the wake-up may be for
  // another group's push), and a worker woken by a push to any group takes from any group.
  //
  // No lost wake-up: the event count's handshake with queued_ as the condition. A submitter
  // adds to queued_ before its pushes and looks at the sleepers after them (all seq_cst), so
  // either it sees this worker announced and wakes it, or the worker's look at queued_
  // (`pending`) sees the request counted: it does not park but retries, and finds it once it
  // is pushed (or finds the count dropped because another worker took it). queued_ is non-zero
  // without anything to take only for moments: a push in progress, a pop not yet uncounted, a
  // move to the delayed lane.
  switch (lanes_.idle(group).await(
      spin ? opts_.spin_ns : 0, until_ns, [&] { return lanes_.try_take(group, r, lane, false); },
      [&] { return lanes_.try_take(group, r, lane); },
      [this] { return queued_.load(std::memory_order_seq_cst) != 0; },
      [this, &w] { return leaving(w); })) {
    case EventCount::Wait::ready:
      return Take::ok;
    case EventCount::Wait::timeout:
      return Take::timeout;
    case EventCount::Wait::stopped:
      break;
  }
  return Take::closed;
}

Admit Model::submit(Request* r) noexcept { return submit_n(&r, 1); }

Admit Model::submit_n(Request* const* rs, std::size_t n) noexcept {
  // Nothing to queue, but a closed model still says so (as for one request).
  if (n == 0) return closed_.load(std::memory_order_acquire) ? Admit::closed : Admit::ok;
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
  // A slot for each of the n, taken only if all fit: a compare-and-swap, never an add undone
  // when over (a bystander saw the inflated count in between and was refused with room left).
  // seq_cst on success: the submitter's first half of the sleeper handshake (see take()).
  std::size_t before = queued_.load(std::memory_order_relaxed);
  do {
    // Slots of requests settled while queued are free again (their cells are spare room).
    if (before + n > max_queue_.load(std::memory_order_relaxed) +
                         counters_->returned.load(std::memory_order_relaxed)) {
      counters_->rejected.fetch_add(n, std::memory_order_relaxed);
      return Admit::full;
    }
  } while (!queued_.compare_exchange_weak(before, before + n, std::memory_order_seq_cst, std::memory_order_relaxed));
  const int64_t now = now_ns();
  int64_t eta = 0;
  if (opts_.admission == Admission::deadline) {
    // Backlogged: the last of these starts once everything ahead of it has gone (queued, or
    // taken by a worker and not yet completed), at the pace the model keeps while backlogged,
    // and completes a call later. One that would miss its deadline is refused now rather than
    // expire in the queue (or complete late) after holding a slot.
    // What stretched recent requests past their estimates after admission (overrun_ns) is
    // added: a request is admitted only if it would meet its deadline at that much late.
    // Requests settled while queued (cancelled, expired) are not ahead: their cells wait only
    // for a worker to pop them (as queued() counts them).
    const std::size_t back = counters_->returned.load(std::memory_order_relaxed);
    const std::size_t ahead = (before > back ? before - back : 0) + counters_->held.load(std::memory_order_relaxed);
    const int64_t estimate = expected_wait_ns(ahead + n - 1);  // 0 until measured
    eta = estimate > 0 ? now + estimate : 0;
    int64_t deadline = Request::kNoDeadline;
    for (std::size_t i = 0; i < n; ++i) deadline = std::min(deadline, rs[i]->deadline_ns);
    // deadline <= now first: deadline - now cannot overflow after it (a deadline far in the
    // past, INT64_MIN, was undefined behaviour and admitted).
    if (ahead != 0 && estimate > 0 && deadline != Request::kNoDeadline &&
        (deadline <= now || deadline - now < estimate + counters_->overrun_ns.load(std::memory_order_relaxed))) {
      queued_.fetch_sub(n, std::memory_order_relaxed);
      counters_->rejected.fetch_add(n, std::memory_order_relaxed);
      return Admit::late;
    }
  }
  const uint32_t groups = lanes_.groups();
  // One routing decision per call: a batch comes from one thread on one CPU.
  const uint32_t routed = groups > 1 ? lanes_.route() : 0;
  const int cpu = current_cpu();
  for (std::size_t i = 0; i < n; ++i) {
    Request* r = rs[i];
    r->submit_ns = now;
    r->eta_ns = eta;
    r->submit_cpu = cpu;
    r->counters = counters_;
    if (expiry_ != nullptr && r->deadline_ns != Request::kNoDeadline) {
      // Once every field above is set (the timer may complete it at once), and before the
      // push (a worker may complete it at once too).
      r->expiry = expiry_;
      expiry_->add(r);
    }
    r->counted.store(true, std::memory_order_relaxed);  // published by the push
    // Admission guarantees a free cell and close() waits for us (see LaneSet::push).
    lanes_.push(r->group < groups ? r->group : routed, r->priority, r);
  }
  // No more wake-ups than requests still queued: a spinning worker may have taken these.
  lanes_.wake(n, rs[0]->group < groups ? rs[0]->group : routed,
              [this] { return queued_.load(std::memory_order_seq_cst); });
  if (opts_.burst_instances != 0 && busy_own_.load(std::memory_order_seq_cst) >= opts_.instances) {
    wake_burst();
  }
  return Admit::ok;
}

void Model::cancel_queued() noexcept {
  cancel_queued_.store(true, std::memory_order_release);
  // Idle workers settle what is queued now rather than at their next wake-up.
  lanes_.wake_all();
}

void Model::close(bool drain) noexcept {
  if (!drain) cancel_queued_.store(true, std::memory_order_release);
  // A worker waiting in the shared pool's line (behind other models' calls, maybe a higher
  // class that never lets go, or a pool with no CPUs left) leaves it with nothing held.
  // Without drain it sees cancel_queued_ (published by the pool's mutex) and cancels the
  // queue without running anything. A burst worker leaves either way: the model's own
  // workers, which never wait for the pool, drain what is queued.
  if (member_ != nullptr && (!drain || opts_.burst_instances != 0)) opts_.pool->withdraw(*member_);
  closed_.store(true, std::memory_order_seq_cst);
  // Submitters that saw the model open finish their pushes first (they never block, so this
  // wait is short); every later one sees closed_.
  while (submitting_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  // Every push is done (made visible by the submitters' release of submitting_): a worker that
  // sees stopping_ and finds every lane empty may exit.
  stopping_.store(true, std::memory_order_seq_cst);
  lanes_.wake_all();
  if (opts_.burst_instances != 0) wake_burst();
}

void Model::join() {
  // No move runs now (the owner serialises them with join), so the list is stable.
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
  // The timer stops after the workers: while a draining close works through the queue, a
  // request behind a long call still expires at its deadline.
  if (expiry_ != nullptr) {
    expiry_->stop();
    if (expiry_thread_.joinable()) expiry_thread_.join();
  }
  joined_ = true;
  // Requests no worker will take: workers that failed to start, or pushes racing close().
  Request* r = nullptr;
  uint32_t lane = 0;
  while (lanes_.try_take(Worker::kNoGroup, r, lane)) {
    taken(r);
    if (claim(r, RequestState::claimed)) handler_->abandon(nullptr, r, Outcome::cancelled);
  }
  // Every request is complete, so none is left in the expiry heap; in case: references back.
  if (expiry_ != nullptr) {
    for (Request* left : expiry_->drain()) handler_->release(left);
  }
}

void Model::note_drained(std::size_t n, int64_t start, int64_t end) noexcept {
  if (opts_.admission != Admission::deadline || n == 0) return;
  // Smoothed over about eight calls; racing workers may drop a sample, never tear one.
  const int64_t call = call_ns_.load(std::memory_order_relaxed), cost = end - start;
  call_ns_.store(call == 0 ? cost : call + (cost - call) / 8, std::memory_order_relaxed);
  if (call != 0) {
    const int64_t slow = call_slow_ns_.load(std::memory_order_relaxed);
    call_slow_ns_.store(slow + (std::max<int64_t>(cost - call, 0) - slow) / 8, std::memory_order_relaxed);
  }
  // Backlogged since the previous call finished: every worker had work in between, so the
  // interval is the model's pace (all instances together) for these n requests.
  const bool backlog = queued_.load(std::memory_order_relaxed) != 0;
  const int64_t prev = last_done_ns_.exchange(backlog ? end : 0, std::memory_order_relaxed);
  if (prev == 0 || end <= prev) return;
  const int64_t sample = (end - prev) / static_cast<int64_t>(n);
  const int64_t pace = drain_ns_.load(std::memory_order_relaxed);
  drain_ns_.store(pace == 0 ? sample : pace + (sample - pace) / 8, std::memory_order_relaxed);
}

void Model::taken(Request* r) noexcept {
  queued_.fetch_sub(1, std::memory_order_relaxed);
  if (counters_->track_held && !r->held.exchange(true, std::memory_order_acq_rel)) {
    counters_->held.fetch_add(1, std::memory_order_relaxed);
    // Settled while queued (a tombstone), or by a timer or cancel racing this pop: whoever
    // completes it clears `held` after claiming it, so either that exchange saw this one's
    // true, or it came first and this load sees the claim. Not counted then.
    if (r->state() != RequestState::queued && r->held.exchange(false, std::memory_order_acq_rel)) {
      counters_->held.fetch_sub(1, std::memory_order_relaxed);
    }
  }
  // Settled while queued, and its slot given back then: the give-back is over with the cell.
  if (!r->counted.exchange(false, std::memory_order_acq_rel)) {
    counters_->returned.fetch_sub(1, std::memory_order_relaxed);
  }
}

bool Model::claim_queued(Request* r) noexcept {
  if (!r->try_claim(RequestState::claimed)) return false;
  ModelCounters* c = r->counters.get();
  if (c == nullptr) return true;
  // A bounded increment: never past spare_cells, not even for a moment (an add undone when
  // over let a submitter admit one more request than the lanes hold, whose push then spun
  // for ever, and close() waited for it).
  std::size_t ret = c->returned.load(std::memory_order_relaxed);
  do {
    if (ret >= c->spare_cells) return true;  // no spare cell: keeps its slot
  } while (!c->returned.compare_exchange_weak(ret, ret + 1, std::memory_order_relaxed, std::memory_order_relaxed));
  if (!r->counted.exchange(false, std::memory_order_acq_rel)) {
    c->returned.fetch_sub(1, std::memory_order_relaxed);  // popped already: nothing to give back
  }
  return true;
}

bool Model::cancel(Request* r) {
  if (!claim_queued(r)) return false;
  // abandon() consumes a reference; the caller keeps its own, and the queue keeps its own until
  // a worker pops the tombstone.
  r->add_ref();
  handler_->abandon(nullptr, r, Outcome::cancelled);
  return true;
}

void Model::complete(Request& r, Outcome o, WorkerShard* shard) noexcept {
  if (r.expiry != nullptr) r.expiry->remove(&r);
  if (r.counters && r.counters->track_held && r.held.exchange(false, std::memory_order_acq_rel)) {
    r.counters->held.fetch_sub(1, std::memory_order_relaxed);
  }
  const int64_t end = now_ns();
  r.end_ns = end;
  if (r.eta_ns != 0 && r.counters && (o == Outcome::ok || o == Outcome::expired)) {
    r.counters->note_overrun(end - r.eta_ns);
  }
  if (r.counters) r.counters->count(o);
  if (shard != nullptr && (o == Outcome::ok || o == Outcome::error)) shard->record(r, end);
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
  metrics_.record_direct(took);
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

void Model::check_shape(const Shape& shape) const {
  const std::string& name = opts_.name;
  const auto refuse = [&](const std::string& why) {
    throw std::invalid_argument("model '" + name + "': " + why);
  };
  if (opts_.burst_instances != 0) refuse("a model with burst instances cannot be moved while it serves");
  if (shape.instances == 0) refuse("instances must be >= 1");
  if (!shape.placement.empty() && shape.placement.size() != shape.instances) {
    refuse("placement has " + std::to_string(shape.placement.size()) + " instances, the shape " +
           std::to_string(shape.instances));
  }
  check_groups(name, shape.instances, shape.instance_group);
  check_batch_size(name, shape.batching.max_size);
  uint32_t groups = 1;
  for (uint32_t g : shape.instance_group) groups = std::max(groups, g + 1);
  if (groups != lanes_.groups() || groups > 1) {
    refuse("its queue would span " + std::to_string(groups) + " NUMA node(s), it spans " +
           std::to_string(lanes_.groups()) + " now: a model moves while it serves only within one node");
  }
  check_max_queue(shape.max_queue);
  if (lanes_.has_delayed()) {
    // Each worker may hold one request it moves to the delayed lane beyond the admitted ones
    // and the settled ones still in it (see build_groups): during a move the old and the new
    // workers exist together.
    std::size_t existing = 0;
    {
      std::lock_guard lock(workers_mu_);
      existing = workers_.size();
    }
    const std::size_t need = 2 * opts_.max_queue + existing + shape.instances;
    if (need > lanes_.delayed_capacity()) {
      refuse("a move to " + std::to_string(shape.instances) + " instances needs " + std::to_string(need) +
             " cells in the delayed lane (on_timeout='delay'), it has " +
             std::to_string(lanes_.delayed_capacity()));
    }
  }
}

void Model::check_max_queue(std::size_t max_queue) const {
  if (max_queue == 0 || max_queue > opts_.max_queue) {
    throw std::invalid_argument("model '" + opts_.name + "': max_queue " + std::to_string(max_queue) +
                                " is out of range (1 .. " + std::to_string(opts_.max_queue) +
                                ", the size its queue was made with)");
  }
}

void Model::set_priority_class(int32_t priority_class) {
  if (member_ == nullptr) {
    throw std::invalid_argument("model '" + opts_.name + "': it does not draw on a scheduled shared pool, so it has "
                                "no priority class to change");
  }
  opts_.pool->set_class(*member_, priority_class);
}

void Model::set_max_queue(std::size_t max_queue) {
  check_max_queue(max_queue);
  max_queue_.store(max_queue, std::memory_order_relaxed);
}

uint32_t Model::reshape(Shape shape) {
  check_shape(shape);
  auto gen = std::make_shared<WorkerGeneration>();
  gen->instances = shape.instances;
  gen->placement = std::move(shape.placement);
  gen->memory_policy = shape.memory_policy;
  gen->batching = shape.batching;
  gen->batching.max_size = std::max<std::size_t>(gen->batching.max_size, 1);
  gen->pool_units = opts_.pool_units;
  if (member_ != nullptr) {  // a pooled call holds one unit per intra-op thread, as set_placement
    uint32_t units = 0;
    for (const auto& p : gen->placement) units = std::max<uint32_t>(units, static_cast<uint32_t>(std::max(p.threads, 1)));
    if (units != 0) gen->pool_units = units;
  }
  const uint32_t n = shape.instances;
  if (!started_) {
    // Before start: these are the settings the workers will start with.
    opts_.instances = n;
    opts_.placement = gen->placement;
    opts_.memory_policy = gen->memory_policy;
    opts_.batching = gen->batching;
    opts_.pool_units = gen->pool_units;
    opts_.instance_group = std::move(shape.instance_group);
    {
      std::lock_guard lock(workers_mu_);
      workers_ = make_workers(nullptr, n, 0, gen->batching.max_size);
    }
    build_groups();  // the same number of groups (check_shape): the lanes stay
    max_queue_.store(shape.max_queue, std::memory_order_relaxed);
    instances_.store(n, std::memory_order_relaxed);
    return 0;
  }

  // The new workers: listed first (their empty shards join the snapshots), then started; each
  // pins itself and builds its instance, then waits at the gate.
  std::vector<std::unique_ptr<Worker>> fresh = make_workers(gen, n, 0, gen->batching.max_size);
  std::vector<Worker*> old, started;
  {
    std::lock_guard lock(workers_mu_);
    for (auto& w : workers_) old.push_back(w.get());
    for (auto& w : fresh) {
      started.push_back(w.get());
      workers_.push_back(std::move(w));
    }
  }
  const std::size_t launched = launch(started);
  uint32_t failed = 0;
  {
    std::unique_lock lock(gen->mu);
    gen->cv.wait(lock, [&] { return gen->started == launched; });
    failed = gen->failed + (launched < started.size() ? 1 : 0);
  }
  if (failed != 0) {
    // Nothing moved: the new workers exit without serving, the old ones never stopped.
    gen->gate.store(WorkerGeneration::kAbort, std::memory_order_release);
    park_wake(gen->gate);
    retire_workers(started);
    return failed;
  }
  max_queue_.store(shape.max_queue, std::memory_order_relaxed);
  instances_.store(n, std::memory_order_relaxed);
  // The old pace says nothing of the new shape: admission by deadline measures it again.
  last_done_ns_.store(0, std::memory_order_relaxed);
  drain_ns_.store(0, std::memory_order_relaxed);
  call_ns_.store(0, std::memory_order_relaxed);
  call_slow_ns_.store(0, std::memory_order_relaxed);
  counters_->overrun_ns.store(0, std::memory_order_relaxed);
  // The new workers serve first, then the old ones are told to leave: the queue is never
  // without a worker that takes from it.
  gen->gate.store(WorkerGeneration::kServe, std::memory_order_release);
  park_wake(gen->gate);
  for (Worker* w : old) w->retire.store(true, std::memory_order_seq_cst);
  // Parked old workers wake up and see their flag; a wake-up one of them consumes for a push is
  // not lost: the new workers look at the lanes before they park.
  lanes_.wake_all();
  retire_workers(old);
  // Insurance: whatever is queued now has a parked new worker woken for it.
  if (queued_.load(std::memory_order_seq_cst) != 0) lanes_.wake_all();
  moves_.fetch_add(1, std::memory_order_relaxed);
  return 0;
}

void Model::retire_workers(const std::vector<Worker*>& gone) {
  for (Worker* w : gone) {
    if (w->thread.joinable()) w->thread.join();
  }
  std::lock_guard lock(workers_mu_);
  for (Worker* w : gone) {
    const uint64_t before = retired_.compute.total;
    w->shard.merge_into(retired_);
    if (w->single) retired_single_calls_ += retired_.compute.total - before;
  }
  std::erase_if(workers_, [&](const std::unique_ptr<Worker>& w) {
    return std::find(gone.begin(), gone.end(), w.get()) != gone.end();
  });
}

std::vector<int> Model::worker_tids() const {
  std::vector<int> out;
  std::lock_guard lock(workers_mu_);
  for (const auto& w : workers_) {
    if (const int t = w->tid.load(std::memory_order_acquire); t != 0) out.push_back(t);
  }
  return out;
}

std::vector<std::string> Model::pin_errors() const {
  std::vector<std::string> out;
  std::lock_guard lock(workers_mu_);
  for (const auto& w : workers_) {
    if (!w->pin_error.empty()) out.push_back("instance " + std::to_string(w->index) + ": " + w->pin_error);
  }
  return out;
}

ModelSnapshot Model::snapshot() const {
  ModelSnapshot s;
  ModelMetrics::read_counters(*counters_, s);
  s.queued = queued();
  uint64_t single_calls = 0;
  int64_t oldest_start = 0;
  {
    std::lock_guard lock(workers_mu_);
    for (const auto& w : workers_) {
      const uint64_t before = s.compute.total;
      w->shard.merge_into(s);
      if (w->single) single_calls += s.compute.total - before;
      const int64_t started = w->call_start_ns.load(std::memory_order_relaxed);
      if (started != 0) {
        ++s.running_calls;
        if (oldest_start == 0 || started < oldest_start) oldest_start = started;
      }
    }
    single_calls += retired_single_calls_;
    s.queue_wait.merge(retired_.queue_wait);
    s.compute.merge(retired_.compute);
    s.end_to_end.merge(retired_.end_to_end);
    s.batch_size.merge(retired_.batch_size);
  }
  if (member_ != nullptr) {
    const SharedPool::MemberStats p = opts_.pool->stats(*member_);
    s.pool_grants = p.grants;
    s.pool_busy_unit_ns = p.busy_unit_ns;
  }
  s.stolen = lanes_.stolen();
  if (oldest_start != 0) s.oldest_call_ns = static_cast<uint64_t>(std::max<int64_t>(now_ns() - oldest_start, 0));
  metrics_.finish(s, single_calls);
  s.queue_wait.origin = origin_;
  s.compute.origin = origin_ + 1;
  s.end_to_end.origin = origin_ + 2;
  s.batch_size.origin = origin_ + 3;
  return s;
}

}  // namespace apportion
