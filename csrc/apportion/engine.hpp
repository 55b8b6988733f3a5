// The engine: per model, bounded priority lanes served by that model's pinned worker threads.
//
// A model has one bounded MPMC lane per priority level (0 is served first), plus, with
// on_timeout=delay, a last lane for requests that expired while queued. A worker takes from the
// highest non-empty lane at request (or batch) boundaries, optionally gathering a batch. Idle
// workers park on one event count per model (per group, see below), so a push to any lane
// wakes them.
//
// Lane groups (ModelOptions::instance_group, one per NUMA node the instances span): each group
// has its own set of priority lanes. A submission goes to the group of the CPU it runs on (else
// round-robin); a worker serves its own group first and steals from the others only when its
// own lanes are empty (an idle worker spinning watches only its own), so requests stay on their
// node while its workers keep up. Each group's idle workers park on the group's own event
// count: a push wakes a parked worker of its group first, and one of another group (which then
// steals it) only when none of its own is parked.
//
// The pieces live apart: the lanes and their event counts (lanes.hpp, event_count.hpp), the
// batcher (batcher.hpp) and the metrics (engine_metrics.hpp); this file is the serving loop
// that ties them together.
//
// Python-free. What a request carries and how a model is called is the business of a
// ModelHandler (the Python bindings supply one that holds the GIL only around the model call);
// the engine owns admission, claiming, deadlines, shutdown, and metrics.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "apportion/batcher.hpp"
#include "apportion/engine_metrics.hpp"
#include "apportion/histogram.hpp"
#include "apportion/lanes.hpp"
#include "apportion/mpmc_queue.hpp"
#include "apportion/parking.hpp"
#include "apportion/placement.hpp"
#include "apportion/expiry.hpp"
#include "apportion/request.hpp"
#include "apportion/shared_pool.hpp"

namespace apportion {

class Model;

/// What one set of workers was started with (see Model::reshape): the workers of a model
/// started together share one, and read their settings from it, never from the model's options
/// (a live move gives the next workers other settings while these still serve).
struct WorkerGeneration {
  uint32_t instances = 1;
  std::vector<InstancePlacement> placement;  // per instance; empty: no pinning
  MemoryPolicy memory_policy = MemoryPolicy::none;
  BatchingOptions batching;
  uint32_t pool_units = 1;
  /// Start handshake: how many of the generation's workers ran start_worker, how many failed.
  std::mutex mu;
  std::condition_variable cv;
  uint32_t started = 0;
  uint32_t failed = 0;
  /// kHold until the mover decides: kServe lets the started workers serve, kAbort stops them
  /// before they take anything (a sibling failed to start). A futex word.
  static constexpr uint32_t kHold = 0, kServe = 1, kAbort = 2;
  std::atomic<uint32_t> gate{kHold};
};

/// One worker thread of a model. `user` belongs to the handler (per-thread state).
struct Worker {
  static constexpr uint32_t kNoGroup = LaneSet::kNoGroup;
  Model* model = nullptr;
  uint32_t index = 0;
  /// The lane group this worker serves first (0 without groups); kNoGroup for burst workers,
  /// which take from every group alike. Fixed before start().
  uint32_t group = 0;
  WorkerShard shard;
  void* user = nullptr;
  std::thread thread;
  /// A burst worker: beyond the model's own instances, it serves only while every own worker
  /// is busy, and only with capacity lent by the shared pool.
  bool burst = false;
  /// True while the worker serves one request per call and will call ModelHandler::idle()
  /// before it waits: the handler may keep what it holds from one call to the next.
  bool may_linger = false;
  /// Requests served in a row whose submitter ran on this worker's CPU (see kColocatedStreak):
  /// each caller wakes on this CPU at completion, so a spin for the next request would only
  /// keep it from running.
  uint32_t colocated = 0;
  /// When this worker's requests came, against its spin budget (see ArrivalSpin).
  ArrivalSpin arrivals;
  /// Why the OS refused this worker's pinning or memory policy (empty: applied, or none
  /// asked). Written by the worker before it reports started; read after start() returns.
  std::string pin_error;
  /// The worker thread's kernel id (0 until it runs). Threads it creates (a framework's
  /// intra-op pool) inherit its name, which is how their CPU time is told apart per model.
  std::atomic<int> tid{0};
  /// The settings this worker was started with. Set before its thread starts.
  std::shared_ptr<WorkerGeneration> gen;
  /// Serves one request per call (no batching): records no batch sizes (see
  /// ModelMetrics::finish). Fixed before the worker is listed.
  bool single = true;
  /// Set by a live move (Model::reshape): the worker finishes what it holds (a running call, a
  /// forming batch) and exits without taking another request.
  std::atomic<bool> retire{false};
  /// This worker's estimate of a model call's duration by batch size (index = size; 0:
  /// never observed): an EWMA of what it measured. Worker-private; used to keep requests out
  /// of batches that would finish after their deadline.
  std::vector<int64_t> batch_cost_ns;
  /// How much longer than batch_cost_ns its slow calls ran, by size (see batch_observe).
  std::vector<int64_t> batch_slow_ns;
  /// When its latest batching call ended (0: none yet). Worker-private.
  int64_t last_call_end_ns = 0;
  /// When the model call it is in started (0: in none). Written by the worker around each
  /// call; read by snapshot() (running calls, and how long the oldest has run: a call that
  /// never returns shows there).
  std::atomic<int64_t> call_start_ns{0};
  /// The estimated duration of a call with `n` requests (see batch_estimate_ns).
  int64_t estimate_ns(std::size_t n) const noexcept { return batch_estimate_ns(batch_cost_ns, n); }
  /// The duration to plan a call of `n` requests against deadlines with (see
  /// batch_deadline_estimate_ns).
  int64_t deadline_estimate_ns(std::size_t n) const noexcept {
    return batch_deadline_estimate_ns(batch_cost_ns, &batch_slow_ns, n);
  }
  void observe(std::size_t n, int64_t ns, bool replace = false) noexcept {
    batch_observe(batch_cost_ns, n, ns, replace, &batch_slow_ns);
  }
};

/// What a model does with its requests. Every method runs in the named thread; each one that
/// receives a `Request*` owns one reference to it and must release it.
class ModelHandler {
 public:
  virtual ~ModelHandler() = default;
  /// In the worker thread, before it serves anything. False stops this worker; the handler
  /// keeps the reason (Model::start_failures() counts them).
  virtual bool start_worker(Worker& w) = 0;
  /// Serve `n >= 1` requests this worker claimed (state `running`) with one model call, then
  /// `Model::complete(*r, outcome, &w.shard)` exactly once for each and release each. `n` is
  /// 1 unless the model batches (ModelOptions::batching); a batching model's handler serves a
  /// batch of one as a batch. `batch` is valid only during the call.
  virtual void run(Worker& w, Request* const* batch, std::size_t n) = 0;
  /// Complete a claimed request that will never run (expired or cancelled); `w` may be null
  /// when the caller is not a worker (cancellation from a caller or at shutdown).
  virtual void abandon(Worker* w, Request* r, Outcome why) = 0;
  /// In the worker thread after it stopped serving.
  virtual void stop_worker(Worker& w) = 0;
  /// In the worker thread when it found nothing to serve and is about to wait (spin or park):
  /// a handler that keeps something between calls while work is queued back to back (the
  /// Python handler keeps the GIL: one acquisition for a run of requests instead of one each)
  /// lets go of it here. Only called when `Worker::may_linger` is set.
  virtual void idle(Worker& /*w*/) {}
  /// Drops a reference to `r` that a thread of the engine's own (the expiry timer) holds and
  /// did not hand to abandon(). Any thread; the handler adds what releasing needs.
  virtual void release(Request* r) { Request::release(r); }
  /// The expiry timer's batch: abandon(nullptr, r, Outcome::expired) for each of the `n`
  /// claimed requests in `expired`, then release() for each of the `m` in `others` (running
  /// or completed meanwhile: their owners complete them). A handler that needs something per
  /// call (the GIL) takes it once for the whole batch.
  virtual void expire(Request* const* expired, std::size_t n, Request* const* others, std::size_t m) {
    for (std::size_t i = 0; i < n; ++i) abandon(nullptr, expired[i], Outcome::expired);
    for (std::size_t i = 0; i < m; ++i) release(others[i]);
  }
};

/// What a worker does with a request whose deadline passed (or, when batching, would pass
/// before its batch finishes) before it started.
enum class OnTimeout : uint8_t {
  reject,  // complete it as expired; it never runs
  delay,   // move it to the delayed lane: it runs after every request still in time
};

/// What admission refuses besides a full queue.
enum class Admission : uint8_t {
  queue,     // only a full queue (max_queue)
  deadline,  // also a request that would wait past its deadline behind the queue ahead of it,
             // judged by the model's measured pace while backlogged (see Model::drain_ns())
             // plus how late recent requests ran against that judgement (Model::overrun_ns())
};

/// The largest admission bound a model is made with (its lanes hold twice as many cells).
inline constexpr std::size_t kMaxQueueBound = std::size_t{1} << 30;
/// The largest batch a model may form.
inline constexpr std::size_t kMaxBatchSize = std::size_t{1} << 16;

struct ModelOptions {
  std::string name;
  uint32_t instances = 1;
  /// Admission bound over all lanes together.
  std::size_t max_queue = 1024;
  /// Lanes 0 (served first) .. priority_levels - 1. Request::priority is clamped into range.
  uint32_t priority_levels = 1;
  OnTimeout on_timeout = OnTimeout::reject;
  /// Admission::deadline needs priority_levels == 1: a request is judged by every request
  /// queued ahead of it, which priority lanes would let it skip.
  Admission admission = Admission::queue;
  BatchingOptions batching;
  // How long an idle worker keeps polling its queue before it parks on a futex. A request that
  // arrives meanwhile is picked up in ~1 us instead of a ~5 us futex wake-up; the cost is that
  // much CPU after each burst.
  int64_t spin_ns = 50'000;
  // Whether a worker spins after serving a request that was submitted from its own CPU. Off:
  // that caller wakes on this CPU at completion, and a spin would only keep it from running
  // (a busy host puts caller and worker on the one CPU left). Tests that need a worker back
  // on its own lanes after serving such a caller turn it on.
  bool spin_beside_caller = false;
  /// Per instance: the CPUs its worker pins itself to and its memory nodes, applied in the
  /// worker before ModelHandler::start_worker so everything the factory creates inherits
  /// them. Empty: no pinning.
  std::vector<InstancePlacement> placement;
  MemoryPolicy memory_policy = MemoryPolicy::none;
  /// The shared pool this model's calls draw capacity from. Null: none, its workers run
  /// whenever they have work. Without burst_instances every worker is the pool's; with them
  /// only the burst workers are (the own ones run on the model's own cores).
  std::shared_ptr<SharedPool> pool;
  /// The model's share of the pool against other backlogged members (> 0).
  double weight = 1.0;
  /// Higher classes are always granted pool capacity first.
  int32_t priority_class = 0;
  /// Capacity units one call holds: the instance's intra-op threads.
  uint32_t pool_units = 1;
  /// Extra workers that serve on the shared pool while all `instances` own workers are busy
  /// (needs `pool`). Their placement entries follow the own instances' in `placement`.
  uint32_t burst_instances = 0;
  /// Per own instance: its lane group (the index of its NUMA node among the model's nodes),
  /// each < instances. Empty, or all one group: one set of lanes, the default. With G groups
  /// the model keeps G sets of priority lanes (the delayed lane stays one, shared); every lane
  /// can hold 2 x max_queue requests, so the lanes cost G x priority_levels x 2 x max_queue cells
  /// (one cache line each, the count rounded up to a power of two).
  std::vector<uint32_t> instance_group;
};

/// `late`: refused by Admission::deadline (the queue ahead would outlast the deadline).
enum class Admit : uint8_t { ok, full, closed, late };

class Model {
 public:
  Model(ModelOptions opts, std::shared_ptr<ModelHandler> handler);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;
  /// Stops and joins the workers if the owner did not (queued requests are then cancelled).
  ~Model();

  /// Spawns the workers and waits until each has run ModelHandler::start_worker. Returns the
  /// number that failed. Call once, from one thread; the handler may need the caller to have
  /// released any lock the workers' start needs (the Python GIL).
  uint32_t start();

  /// Admits a request into lane `r->priority` (clamped) of group `r->group` when that names
  /// one, else of the submitting CPU's group, else of the next group round-robin: the queue
  /// takes over one reference (the caller adds it first) on `ok`. Stamps submit time and
  /// counters. Safe from any thread.
  Admit submit(Request* r) noexcept;
  /// All-or-nothing admission of `n` requests. Safe from any thread.
  Admit submit_n(Request* const* rs, std::size_t n) noexcept;

  /// Refuses new requests. `drain`: workers finish what is queued; otherwise queued requests
  /// are completed as cancelled (running ones finish). Idempotent; safe from any thread.
  void close(bool drain) noexcept;
  /// What close(false) does first, alone: every request still queued, and each one taken from
  /// now on, is completed as cancelled, not run (admission is left as it is). For a close or
  /// removal without drain that must stop its running calls (process children) before it
  /// joins the workers: a worker freed by that must find the queue cancelled, not serve the
  /// next request on a child that is being killed. Safe from any thread.
  void cancel_queued() noexcept;
  /// Waits for the workers to exit, then cancels whatever is still queued (possible when no
  /// worker started). Call after close(); the handler's abandon() runs in this thread.
  void join();

  /// Completes a claimed request: timestamps, counters, histograms (when `shard`), publish.
  static void complete(Request& r, Outcome o, WorkerShard* shard) noexcept;

  /// Cancels `r` if still queued; the handler completes it in this thread. Safe from any thread.
  bool cancel(Request* r);

  /// What a live move changes (see reshape()).
  struct Shape {
    uint32_t instances = 1;
    /// Per instance (empty: no pinning); `threads` of each is its intra-op threads.
    std::vector<InstancePlacement> placement;
    MemoryPolicy memory_policy = MemoryPolicy::none;
    /// Per instance its lane group, as ModelOptions::instance_group; the number of groups
    /// must stay what it is.
    std::vector<uint32_t> instance_group;
    BatchingOptions batching;
    /// The admission bound: at most the max_queue the model was made with (its lanes' size).
    std::size_t max_queue = 1024;
  };

  /// Moves the model to `shape` while it serves. Before start(): replaces the settings the
  /// workers will start with. After: starts the new workers (each pins itself and runs
  /// ModelHandler::start_worker, where the handler builds and warms its instance), and only
  /// once every one of them started lets them serve, then has the old ones finish what they
  /// hold and exit, and returns once they have. The queue, the requests in it and the stats
  /// stay. When a new worker fails to start, the new ones exit before serving anything and the
  /// old ones go on serving: returns the number that failed (0: moved). Throws
  /// std::invalid_argument naming the model, before anything moves, for a shape the model
  /// cannot take live (burst instances, lane groups over several NUMA nodes, max_queue beyond
  /// the lanes' size). Batching may change, from one request per call to batches and back. Call from one
  /// thread at a time, not from one of this model's workers, and not concurrently with start()
  /// or join() (the registry serialises them).
  uint32_t reshape(Shape shape);

  /// Sets the admission bound alone, at once, with nothing else moved: no new workers, and
  /// the queue, the requests in it and the learned estimates stay. Lowering it below what is
  /// queued refuses new requests until the queue has drained below the bound; nothing queued
  /// is dropped. Throws std::invalid_argument naming the model for 0 or a bound beyond the
  /// max_queue the model was made with (its lanes' size). Safe from any thread.
  void set_max_queue(std::size_t max_queue);

  /// Moves the model to another class of the scheduled shared pool, at once, with nothing
  /// else moved (see SharedPool::set_class; its std::invalid_argument passes through, and
  /// one naming the model when it does not draw on a scheduled pool). Safe from any thread.
  void set_priority_class(int32_t priority_class);
  /// Its class on the scheduled shared pool now (set_priority_class() leaves the one in
  /// options() as it was made); none when it does not draw on one.
  std::optional<int32_t> priority_class() const noexcept {
    if (member_ == nullptr) return std::nullopt;
    return member_->priority_class();
  }

  const std::string& name() const noexcept { return opts_.name; }
  /// The options the model was made with, updated by set_placement() before start; a live
  /// move (reshape()), set_max_queue() and set_priority_class() do not change them: see
  /// instances(), max_queue() and priority_class().
  const ModelOptions& options() const noexcept { return opts_; }
  /// Own instances now (the latest reshape()). Safe from any thread.
  uint32_t instances() const noexcept { return instances_.load(std::memory_order_relaxed); }
  /// The admission bound now (the latest reshape()). Safe from any thread.
  std::size_t max_queue() const noexcept { return max_queue_.load(std::memory_order_relaxed); }
  /// Queue cells its lanes take (one cache line each; see lane_cells()). Not during a move.
  std::size_t queue_cells() const noexcept { return lanes_.cells(); }
  /// Admission::deadline's pace: the smoothed time between completions per request while the
  /// model was backlogged (ns; 0 until measured, and after a move). Safe from any thread.
  int64_t drain_ns() const noexcept { return drain_ns_.load(std::memory_order_relaxed); }
  /// Admission::deadline: requests taken by workers and not completed yet (0 otherwise).
  std::size_t held() const noexcept { return counters_->held.load(std::memory_order_relaxed); }
  /// Admission::deadline's call time: the smoothed duration of one call (ns; 0 until measured,
  /// and after a move). A request admitted behind a queue waits for the queue at the pace,
  /// then for its own call. Safe from any thread.
  int64_t call_ns() const noexcept { return call_ns_.load(std::memory_order_relaxed); }
  /// Admission::deadline's learned margin: how far requests have recently completed past the
  /// estimate they were admitted with (ns; see ModelCounters::overrun_ns). A request queued
  /// behind others is admitted only if its deadline leaves expected_wait_ns() plus this.
  /// Safe from any thread.
  int64_t overrun_ns() const noexcept { return counters_->overrun_ns.load(std::memory_order_relaxed); }
  /// Admission::deadline's estimate of when a request submitted now behind `ahead` requests
  /// (queued, or taken and not completed) completes, from now (ns; 0 until both are measured).
  /// The call is planned as the batcher plans one against a deadline: its smoothed duration
  /// plus kSlowCalls times the smoothed excess of the calls that ran over it, so a request
  /// admitted here is not judged hopeless when its batch forms.
  int64_t expected_wait_ns(std::size_t ahead) const noexcept {
    const int64_t pace = drain_ns(), call = call_ns();
    if (pace <= 0 || call <= 0) return 0;
    return static_cast<int64_t>(static_cast<double>(ahead) * static_cast<double>(pace)) + call +
           kSlowCalls * call_slow_ns_.load(std::memory_order_relaxed);
  }
  /// Live moves done (reshape() calls that moved a started model).
  uint64_t moves() const noexcept { return moves_.load(std::memory_order_relaxed); }
  /// Sets where the workers will run and, when `groups` is given, the own instances' lane
  /// groups (see ModelOptions::instance_group; throws std::invalid_argument naming the model
  /// when they do not fit). Only before start(); not thread-safe against start(), nor, when
  /// the number of groups changes (queued requests then move to the new lanes), against
  /// submit(). A pool member's units per call follow: the most threads any of its pooled
  /// instances (all, or the burst ones) was given.
  void set_placement(std::vector<InstancePlacement> placement, MemoryPolicy policy,
                     std::optional<std::vector<uint32_t>> groups = std::nullopt);
  /// Pinning refusals, one entry per worker that had one ("instance N: reason"). After start().
  std::vector<std::string> pin_errors() const;
  /// Why the OS refused a thread the last start() or reshape() needed ("" when none was
  /// refused), and forgets it. Such a start or move counts as failed.
  std::string take_thread_error();
  /// The kernel thread ids of the workers running now (those that started and did not exit).
  std::vector<int> worker_tids() const;
  const std::shared_ptr<ModelCounters>& counters() const noexcept { return counters_; }
  bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }
  bool started() const noexcept { return started_; }
  /// Requests holding an admission slot: queued, not settled.
  std::size_t queued() const noexcept {
    const std::size_t cells = queued_.load(std::memory_order_relaxed);
    const std::size_t back = counters_->returned.load(std::memory_order_relaxed);
    return cells > back ? cells - back : 0;
  }
  /// Claims `r` (state `claimed`) if it is still queued, to settle it without running it
  /// (expired by the timer, cancelled by its caller), from any thread, through its counters, so
  /// also after its model is gone. Returns whether it was claimed; then its admission slot is
  /// back at once, so requests settled behind a busy worker do not refuse new ones. Its cell
  /// stays taken until a worker pops it, and at most `spare_cells` such cells at a time (beyond
  /// that it keeps its slot until then).
  static bool claim_queued(Request* r) noexcept;
  /// Number of lanes: priority_levels per group, plus the delayed lane with on_timeout=delay.
  std::size_t lanes() const noexcept { return lanes_.size(); }
  /// Number of lane groups (1 without instance_group).
  uint32_t groups() const noexcept { return lanes_.groups(); }
  ModelSnapshot snapshot() const;

  /// Direct calls: the calling thread serves a request itself on an idle instance (a
  /// synchronous call to a process instance talks to the child with no worker thread in
  /// between). Allowed only while the model is open and has nothing queued, so a direct call
  /// never overtakes a queued request (the caller also needs an instance that exists and is
  /// idle: the handler's business). Safe from any thread.
  bool direct_allowed() const noexcept;
  /// Counts a finished direct call (as submitted, and its outcome `ok` or `error`) and records
  /// its latency: no queue wait, compute and end to end both now - `start_ns`. Safe from any
  /// thread.
  void count_direct(Outcome o, int64_t start_ns) noexcept;

 private:
  enum class Take : uint8_t { ok, timeout, closed };

  void worker_main(Worker& w);
  // The workers of a new generation (not started, not yet in workers_).
  std::vector<std::unique_ptr<Worker>> make_workers(const std::shared_ptr<WorkerGeneration>& gen,
                                                    uint32_t own, uint32_t burst, std::size_t batch_max);
  void start_expiry();  // the deadline timer's thread, from construction
  void run_expiry_thread();
  // Starts the threads of `ws` in order, up to the first the OS refuses (no thread, memory
  // or process left: recorded in thread_error_); returns how many started.
  std::size_t launch(const std::vector<Worker*>& ws);
  std::shared_ptr<WorkerGeneration> generation_from_options() const;
  void check_shape(const Shape& shape) const;
  // Joins `gone` (retiring, or never served), folds their histograms into retired_ and drops
  // them from workers_.
  void retire_workers(const std::vector<Worker*>& gone);
  // Whether `w` should stop taking requests: the model stops, or a move retires it.
  bool leaving(const Worker& w) const noexcept {
    return stopping_.load(std::memory_order_acquire) || w.retire.load(std::memory_order_acquire);
  }
  void serve_one(Worker& w);
  void serve_burst(Worker& w);
  void serve_pooled(Worker& w);
  // Waits until a request is queued (true) or the model stopped with none queued (false),
  // taking nothing.
  bool await_work(const Worker& w) noexcept;
  void serve_batches(Worker& w);
  // Runs (or settles) a request this worker took and uncounted, holding `units` of pool
  // capacity (0: none). Returns the units it still holds for its next call: kept when more
  // work is queued and the pool would grant them to this model again anyway (or when
  // nothing ran), else 0 (given back).
  uint32_t serve_taken(Worker& w, Request* r, uint32_t lane, uint32_t units);
  // Pool capacity for one call of this worker (0 when it is not the pool's): waits for it,
  // after letting go of what the handler holds between calls.
  uint32_t pool_enter(Worker& w);
  void pool_leave(uint32_t units, int64_t cost_ns) noexcept;
  // What a worker lets go of before it blocks at the pool (the handler's idle()), if anything.
  std::function<void()> idle_hook(Worker& w);
  // A burst worker's wait: true once a request is queued while every own worker is busy;
  // false when the model stops with nothing queued.
  bool await_burst() noexcept;
  void wake_burst() noexcept;
  // Takes from the lanes, `w`'s group's first (see LaneSet::try_take); when nothing is
  // queued, spins, then parks on that group's event count until a request is taken,
  // `until_ns` passes (>= 0), or the worker is leaving (see leaving()) and finds every lane
  // empty.
  Take take(const Worker& w, Request*& r, uint32_t& lane, int64_t until_ns, bool spin = true) noexcept;
  // Whether `w`, about to wait for its next request, may spin first: not while callers on its
  // CPU, request after request (w.colocated), keep it from running and no other CPU is idle.
  bool spin_for_next(const Worker& w) const noexcept;
  // take() for an idle worker's next request (nothing held): spins only if spin_for_next
  // allows, and not while its requests keep coming after the spin would have ended and
  // another CPU is idle (see ArrivalSpin); tells w.arrivals when the request it took was
  // submitted.
  Take take_next(Worker& w, Request*& r, uint32_t& lane);
  // (Re)builds the lanes and the workers' and CPUs' groups from opts_; moves queued requests.
  void build_groups();
  // Completes (expired or cancelled) or moves to the delayed lane a request that will not run
  // now. The caller took it and already uncounted it from queued_.
  void settle_unrunnable(Worker& w, Request* r, uint32_t lane, bool expired, int64_t now) noexcept;
  // Claims `r` out of `queued` into `to` (running or claimed) for the caller, which then
  // completes it; true for exactly one caller over the request's life. When another party won
  // the claim (its caller cancelled it, or the expiry timer expired it, while it was queued:
  // a tombstone, already complete), drops the reference the caller held for the queue through
  // the handler: it may be the last one, and freeing the request may need what the handler
  // adds (the GIL, for a request holding Python objects).
  // Throws std::invalid_argument naming the model unless 1 <= max_queue <= the max_queue the
  // model was made with (its lanes' size): what a move or set_max_queue() may set.
  void check_max_queue(std::size_t max_queue) const;
  bool claim(Request* r, RequestState to) noexcept;
  // A request popped from a lane: frees its cell, and its admission slot unless it was given
  // back when it was settled (see claim_queued()).
  void taken(Request* r) noexcept;
  // Admission::deadline: a call of `n` requests ran from `start` to `end` (see drain_ns()).
  void note_drained(std::size_t n, int64_t start, int64_t end) noexcept;
  // Claims and runs the batch formed in `b` with one model call (or settles what cannot run).
  void dispatch(Worker& w, Batcher& b);

  ModelOptions opts_;
  std::shared_ptr<ModelHandler> handler_;
  std::shared_ptr<ModelCounters> counters_;
  // The workers serving now (and, during a move, the new ones starting). Changed only by
  // start() and reshape(); guarded by workers_mu_ against readers (snapshot, tids, pins).
  std::vector<std::unique_ptr<Worker>> workers_;
  mutable std::mutex workers_mu_;
  std::string thread_error_;  // guarded by workers_mu_
  // The histograms of workers a move retired, and how many one-request calls they made
  // (guarded by workers_mu_).
  ModelSnapshot retired_;
  uint64_t retired_single_calls_ = 0;
  std::atomic<uint32_t> instances_{1};
  std::atomic<uint64_t> moves_{0};
  // Prompt expiry (on_timeout=reject): the heap of requests with a deadline, and its timer.
  std::shared_ptr<ExpiryHeap> expiry_;
  std::thread expiry_thread_;
  // Origins of the snapshots of this model's four histograms (queue wait, compute, end to
  // end, batch size), so a window is never taken between two different histograms.
  const uint64_t origin_ = LogHistogram::new_origins(4);
  // Lane i holds priority i; with on_timeout=delay the last lane holds delayed requests. Each
  // lane can hold max_queue requests on its own: admission bounds all lanes together, so a
  // push (or a move to the delayed lane) always finds a free cell.
  // With G groups, lane g * priority_levels + p holds group g's priority p, and the delayed
  // lane (one for all groups: it is rare and served last anyway) comes after them all. Each
  // group's workers park on their group's event count there.
  //
  // Cache lines by who writes them. Every submission writes queued_ and submitting_, and every
  // request a worker takes writes queued_: one line, with what those same threads read per
  // request (closed_, cancel_queued_). What idle and spinning workers poll (stopping_, the
  // event counts) is on lines that only change when a worker parks, is woken, or the model
  // closes, so the spinning does not steal the submitters' line.
  LaneSet lanes_;

  // Admission bound: counts requests in the lanes, including cancelled ones not yet popped and
  // ones a worker is moving to the delayed lane, so the lanes can never be full when admission
  // says yes. It is also the sleepers' "work may be coming" signal (see take()).
  alignas(kCacheLine) std::atomic<std::size_t> queued_{0};
  // The admission bound now (<= opts_.max_queue, the lanes' size): a live move may lower it.
  std::atomic<std::size_t> max_queue_{0};
  // Submitters between their look at closed_ and their last push. close() waits for zero
  // before it lets workers stop, so a batch is never cut in two, and no push lands after the
  // workers (or join) drained the lanes for the last time.
  std::atomic<uint32_t> submitting_{0};
  std::atomic<bool> closed_{false};
  std::atomic<bool> cancel_queued_{false};

  // Admission::deadline only, written by workers once per call (their own line: submitters
  // only read drain_ns_). last_done_ns_: when the latest call finished if it left requests
  // queued, else 0 (the next interval may hold idle time and is not a sample).
  alignas(kCacheLine) std::atomic<int64_t> last_done_ns_{0};
  std::atomic<int64_t> drain_ns_{0};
  std::atomic<int64_t> call_ns_{0};
  std::atomic<int64_t> call_slow_ns_{0};

  // Set by close() once no submitter can push any more: a worker that then finds every lane
  // empty exits. (The lanes themselves are never closed: a worker moving a request to the
  // delayed lane must be able to push after close, and it serves that request itself.)
  alignas(kCacheLine) std::atomic<bool> stopping_{false};
  // Burst workers park on their own event count: a submission wakes them only when every own
  // worker is busy, and the own workers' wake-ups never go to them.
  std::atomic<uint32_t> burst_epoch_{0};
  // Own workers between taking a request and finishing it (burst models only).
  alignas(kCacheLine) std::atomic<uint32_t> busy_own_{0};
  /// How long a burst worker watches every own worker stay busy before it takes a request.
  static constexpr int64_t kBurstConfirmNs = 100'000;
  /// Whether every own worker stays busy with requests queued for kBurstConfirmNs.
  bool own_stay_busy() const noexcept;
  // Batching workers waiting for a request with no batch in hand (see serve_batches). Read,
  // relaxed, once per batch that runs dry: a hint, and only workers write it, so it shares a
  // line that submitters never touch.
  std::atomic<uint32_t> idle_batchers_{0};
  ModelMetrics metrics_;
  std::shared_ptr<SharedPool::Member> member_;  // null unless some worker uses the pool
  alignas(kCacheLine) bool started_ = false;
  bool joined_ = false;

};

}  // namespace apportion
