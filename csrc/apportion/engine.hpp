// The engine: one bounded queue per model, served by that model's pinned worker threads.
//
// Python-free. What a request carries and how a model is called is the business of a
// ModelHandler (the Python bindings supply one that holds the GIL only around the model call);
// the engine owns admission, claiming, deadlines, shutdown, and metrics.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "apportion/histogram.hpp"
#include "apportion/mpmc_queue.hpp"
#include "apportion/placement.hpp"
#include "apportion/request.hpp"

namespace apportion {

/// Latency histograms written only by the worker that owns them (merged on read).
struct alignas(kCacheLine) WorkerShard {
  LogHistogram queue_wait;
  LogHistogram compute;
  LogHistogram end_to_end;
};

class Model;

/// One worker thread of a model. `user` belongs to the handler (per-thread state).
struct Worker {
  Model* model = nullptr;
  uint32_t index = 0;
  WorkerShard shard;
  void* user = nullptr;
  std::thread thread;
  /// Why the OS refused this worker's pinning or memory policy (empty: applied, or none
  /// asked). Written by the worker before it reports started; read after start() returns.
  std::string pin_error;
};

/// What a model does with its requests. Every method runs in the named thread; each one that
/// receives a `Request*` owns one reference to it and must release it.
class ModelHandler {
 public:
  virtual ~ModelHandler() = default;
  /// In the worker thread, before it serves anything. False stops this worker; the handler
  /// keeps the reason (Model::start_failures() counts them).
  virtual bool start_worker(Worker& w) = 0;
  /// Serve a request this worker claimed (state `running`): call the model, then
  /// `Model::complete(*r, outcome, &w.shard)` exactly once.
  virtual void run(Worker& w, Request* r) = 0;
  /// Complete a claimed request that will never run (expired or cancelled); `w` may be null
  /// when the caller is not a worker (cancellation from a caller or at shutdown).
  virtual void abandon(Worker* w, Request* r, Outcome why) = 0;
  /// In the worker thread after it stopped serving.
  virtual void stop_worker(Worker& w) = 0;
};

struct ModelOptions {
  std::string name;
  uint32_t instances = 1;
  std::size_t max_queue = 1024;
  // How long an idle worker keeps polling its queue before it parks on a futex. A request that
  // arrives meanwhile is picked up in ~1 us instead of a ~5 us futex wake-up; the cost is that
  // much CPU after each burst.
  int64_t spin_ns = 50'000;
  /// Per instance: the CPUs its worker pins itself to and its memory nodes, applied in the
  /// worker before ModelHandler::start_worker so everything the factory creates inherits
  /// them. Empty: no pinning.
  std::vector<InstancePlacement> placement;
  MemoryPolicy memory_policy = MemoryPolicy::none;
};

enum class Admit : uint8_t { ok, full, closed };

struct ModelSnapshot {
  uint64_t submitted = 0, completed = 0, failed = 0, rejected = 0, expired = 0, cancelled = 0;
  uint64_t queued = 0;
  LogHistogram::Snapshot queue_wait, compute, end_to_end;
};

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

  /// Admits a request: the queue takes over one reference (the caller adds it first) on `ok`.
  /// Stamps submit time and counters. Safe from any thread.
  Admit submit(Request* r) noexcept;
  /// All-or-nothing admission of `n` requests. Safe from any thread.
  Admit submit_n(Request* const* rs, std::size_t n) noexcept;

  /// Refuses new requests. `drain`: workers finish what is queued; otherwise queued requests
  /// are completed as cancelled (running ones finish). Idempotent; safe from any thread.
  void close(bool drain) noexcept;
  /// Waits for the workers to exit, then cancels whatever is still queued (possible when no
  /// worker started). Call after close(); the handler's abandon() runs in this thread.
  void join();

  /// Completes a claimed request: timestamps, counters, histograms (when `shard`), publish.
  static void complete(Request& r, Outcome o, WorkerShard* shard) noexcept;

  /// Cancels `r` if still queued; the handler completes it in this thread. Safe from any thread.
  bool cancel(Request* r);

  const std::string& name() const noexcept { return opts_.name; }
  const ModelOptions& options() const noexcept { return opts_; }
  /// Sets where the workers will run. Only before start(); not thread-safe against start().
  void set_placement(std::vector<InstancePlacement> placement, MemoryPolicy policy) {
    opts_.placement = std::move(placement);
    opts_.memory_policy = policy;
  }
  /// Pinning refusals, one entry per worker that had one ("instance N: reason"). After start().
  std::vector<std::string> pin_errors() const;
  const std::shared_ptr<ModelCounters>& counters() const noexcept { return counters_; }
  bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }
  bool started() const noexcept { return started_; }
  std::size_t queued() const noexcept { return queued_.load(std::memory_order_relaxed); }
  ModelSnapshot snapshot() const;

 private:
  void worker_main(Worker& w);
  bool spin_then_pop(Request*& r) noexcept;

  ModelOptions opts_;
  std::shared_ptr<ModelHandler> handler_;
  std::shared_ptr<ModelCounters> counters_;
  MpmcQueue<Request*> queue_;
  std::vector<std::unique_ptr<Worker>> workers_;
  // Admission bound: counts requests in the ring, including cancelled ones not yet popped, so
  // the ring (capacity >= max_queue) can never be full when admission says yes.
  alignas(kCacheLine) std::atomic<std::size_t> queued_{0};
  std::atomic<bool> closed_{false};
  // Submitters between their look at closed_ and their last push. close() waits for zero before
  // closing the ring, so a push never meets a closed ring: a batch is never cut in two, and no
  // push lands after the workers (or join) drained the ring for the last time.
  std::atomic<uint32_t> submitting_{0};
  std::atomic<bool> cancel_queued_{false};
  bool started_ = false;
  bool joined_ = false;

  std::mutex start_mu_;
  std::condition_variable start_cv_;
  uint32_t start_done_ = 0;
  uint32_t start_failed_ = 0;
};

}  // namespace apportion
