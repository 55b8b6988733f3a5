#include "apportion/engine.hpp"

#include "apportion/affinity.hpp"

#include <pthread.h>

#include <algorithm>
#include <cstdio>
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

}  // namespace

Model::Model(ModelOptions opts, std::shared_ptr<ModelHandler> handler)
    : opts_(std::move(opts)),
      handler_(std::move(handler)),
      counters_(std::make_shared<ModelCounters>(opts_.name)),
      queue_(std::max<std::size_t>(opts_.max_queue, 1)) {
  // Workers (and their metric shards) exist from construction so snapshot() never races with
  // start(); only the threads are spawned later.
  workers_.reserve(opts_.instances);
  for (uint32_t i = 0; i < opts_.instances; ++i) {
    auto w = std::make_unique<Worker>();
    w->model = this;
    w->index = i;
    workers_.push_back(std::move(w));
  }
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
  start_cv_.wait(lock, [&] { return start_done_ == opts_.instances; });
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

  for (;;) {
    Request* r = nullptr;
    if (!spin_then_pop(r) && queue_.pop_wait(r, -1, 0) != PopStatus::ok) break;  // closed, drained
    queued_.fetch_sub(1, std::memory_order_relaxed);
    if (cancel_queued_.load(std::memory_order_acquire)) {
      if (r->try_claim(RequestState::claimed)) {
        handler_->abandon(&w, r, Outcome::cancelled);
      } else {
        Request::release(r);
      }
      continue;
    }
    const int64_t now = now_ns();
    if (now > r->deadline_ns) {
      // Expired before it started: it is never run (an expired answer is worth nothing and
      // running it would steal time from requests that can still meet their deadline).
      if (r->try_claim(RequestState::claimed)) {
        r->start_ns = now;
        handler_->abandon(&w, r, Outcome::expired);
      } else {
        Request::release(r);
      }
      continue;
    }
    if (!r->try_claim(RequestState::running)) {
      Request::release(r);  // cancelled by its caller while queued: a tombstone, already complete
      continue;
    }
    r->start_ns = now;
    handler_->run(w, r);
  }
  handler_->stop_worker(w);
}

bool Model::spin_then_pop(Request*& r) noexcept {
  if (queue_.try_pop(r)) return true;
  if (opts_.spin_ns <= 0) return false;
  // Bounded by time, not by rounds: the cost of a pause instruction varies ~10x between CPUs.
  const int64_t until = now_ns() + opts_.spin_ns;
  do {
    for (int i = 0; i < 16; ++i) cpu_relax();
    if (queue_.try_pop(r)) return true;
  } while (now_ns() < until && !queue_.closed());
  return false;
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
  const std::size_t before = queued_.fetch_add(n, std::memory_order_relaxed);
  if (before + n > opts_.max_queue) {
    queued_.fetch_sub(n, std::memory_order_relaxed);
    counters_->rejected.fetch_add(n, std::memory_order_relaxed);
    return Admit::full;
  }
  const int64_t now = now_ns();
  for (std::size_t i = 0; i < n; ++i) {
    Request* r = rs[i];
    r->submit_ns = now;
    r->counters = counters_;
    // Admission guarantees a free cell and close() waits for us, so a refusal can only be a
    // consumer's release of that cell not yet visible here (possible on weakly ordered CPUs,
    // where its queued_ decrement may be seen first): it resolves within moments.
    while (!queue_.try_push(r)) cpu_relax();
  }
  return Admit::ok;
}

void Model::close(bool drain) noexcept {
  if (!drain) cancel_queued_.store(true, std::memory_order_release);
  closed_.store(true, std::memory_order_seq_cst);
  // Submitters that saw the model open finish their pushes first (they never block, so this
  // wait is short); every later one sees closed_.
  while (submitting_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  queue_.close();
}

void Model::join() {
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
  joined_ = true;
  // Requests no worker will take: workers that failed to start, or pushes racing close().
  Request* r = nullptr;
  while (queue_.try_pop(r)) {
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
  for (const auto& w : workers_) {
    w->shard.queue_wait.snapshot_into(s.queue_wait);
    w->shard.compute.snapshot_into(s.compute);
    w->shard.end_to_end.snapshot_into(s.end_to_end);
  }
  return s;
}

}  // namespace apportion
