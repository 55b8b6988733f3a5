// The model registry: models by name, their lifecycle, and the admission rules every entry
// point shares.
//
// Concurrency contract (every method is safe from any thread):
// - The name map is guarded by one lock, held only for lookups and inserts: never while a
//   model starts, drains or joins, so a slow factory or a long drain never blocks submit().
// - Starting and joining one model are serialised by that model's own lock, so a remove()
//   racing an add() that is still starting the same model waits for the start, then stops it.
// - A removed model leaves the map at once (new requests get "not found") and is kept on a
//   retiring list until its workers have exited, so a close() racing the removal still waits
//   for those workers.
// - A lifecycle call (add, start, remove, close) made again from inside one on the same thread
//   (a done-callback run by a cancellation in that thread) would wait for itself: close()
//   returns at once (the outer call finishes the work); the others report `nested`.
//
// Python-free: the handler decides what a request carries. Entries are returned to the caller
// that removed them so their last reference (and the handler's resources) is dropped where the
// caller chooses (the Python bindings: under the GIL).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "apportion/engine.hpp"

namespace apportion {

/// A request's timeout in ns (Request::kNoDeadline: none): the model's default, tightened by
/// the request's own. A request may only shorten its model's deadline, never extend it.
constexpr int64_t effective_timeout_ns(int64_t model_default_ns,
                                       std::optional<int64_t> requested_ns) noexcept {
  return requested_ns && *requested_ns < model_default_ns ? *requested_ns : model_default_ns;
}

/// The queue cells a model's lanes take (one cache line each), as Model::build_groups makes
/// them: G groups x `priority_levels` lanes of 2 x `max_queue` cells, plus the delayed lane's
/// 2 x `max_queue` + `workers` (instances and burst instances), each rounded up to a power of
/// two. Saturates instead of overflowing.
uint64_t lane_cells(uint64_t max_queue, uint32_t priority_levels, uint32_t groups, bool delayed_lane,
                    uint64_t workers) noexcept;

/// One registered model: the engine model, its handler, and its admission rules.
class ModelEntry {
 public:
  ModelEntry(std::shared_ptr<Model> model, std::shared_ptr<ModelHandler> handler,
             int64_t default_timeout_ns = Request::kNoDeadline, uint32_t priority_levels = 1);
  ModelEntry(const ModelEntry&) = delete;
  ModelEntry& operator=(const ModelEntry&) = delete;

  const std::string& name() const noexcept { return model->name(); }
  /// The timeout of a request that asks for `requested_ns` (nullopt: the model's default).
  int64_t timeout_ns(std::optional<int64_t> requested_ns) const noexcept {
    return effective_timeout_ns(default_timeout_ns, requested_ns);
  }
  /// Whether a request may name priority `p` (0 is highest).
  bool priority_ok(int64_t p) const noexcept { return p >= 0 && p < priority_levels; }

  const std::shared_ptr<ModelHandler> handler;
  const std::shared_ptr<Model> model;
  const int64_t default_timeout_ns;
  const uint32_t priority_levels;

 private:
  friend class Registry;
  std::mutex life_;       // held while this model starts or joins
  bool removed_ = false;  // guarded by the registry's lock
};

enum class RegistryStatus : uint8_t {
  ok,
  closed,        // the registry is closed
  exists,        // a model of that name is registered
  not_found,     // no model of that name
  nested,        // called from inside a lifecycle call of this registry on this thread
  start_failed,  // an instance failed to start: the model was stopped and is not registered
};

/// A readable word for a status (errors and tests).
const char* to_string(RegistryStatus s) noexcept;

class Registry {
 public:
  Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;
  /// Closes without draining and joins every worker. Must not run on one of this registry's
  /// own workers (it would join itself): the owner hands it to another thread then.
  ~Registry();

  /// Registers `e`. When the registry is started the model starts too, before this returns
  /// (its workers run the handler's start_worker); a model one of whose instances failed to
  /// start is stopped and unregistered again (`start_failed`). `closed` when the registry was
  /// closed before (nothing registered) or while the model started (registered, and stopped by
  /// that close).
  RegistryStatus add(const std::shared_ptr<ModelEntry>& e);

  /// Starts every registered model that has not started. Every model starts even if one
  /// fails; those that failed are stopped, unregistered and appended to `failed`.
  RegistryStatus start(std::vector<std::shared_ptr<ModelEntry>>* failed = nullptr);

  /// Unregisters a model at once (new requests no longer find it), then finishes its queued
  /// requests (`drain`) or cancels them, and returns once its workers have exited. `removed`
  /// receives the entry (before anything is cancelled).
  RegistryStatus remove(std::string_view name, bool drain,
                        std::shared_ptr<ModelEntry>* removed = nullptr);

  /// Moves a registered model to `shape` while it serves (see Model::reshape; its
  /// std::invalid_argument passes through before anything moves). Serialised with that
  /// model's start and join, so a close() racing the move waits for it. `start_failed` (with
  /// `failed` set to how many new instances failed) when a new instance failed to start: the
  /// old ones still serve. `closed` when the model or the registry was closed.
  RegistryStatus reshape(std::string_view name, Model::Shape shape, uint32_t* failed = nullptr);

  /// Sets a registered model's admission bound alone (see Model::set_max_queue; its
  /// std::invalid_argument passes through, nothing changed). `closed` when the model or the
  /// registry was closed.
  RegistryStatus set_max_queue(std::string_view name, std::size_t max_queue);

  /// Moves a registered model to another class of the scheduled shared pool (see
  /// Model::set_priority_class; its std::invalid_argument passes through, nothing changed).
  /// `closed` when the model or the registry was closed.
  RegistryStatus set_priority_class(std::string_view name, int32_t priority_class);

  /// Refuses new models and requests, drains or cancels queued requests, and returns once
  /// every worker (of registered models and of models being removed) has exited. Idempotent;
  /// a second close() waits like the first. Models stay listed (their stats stay readable).
  void close(bool drain);

  /// The model of that name, or null. Cheap: a shared lock and a reference count.
  std::shared_ptr<ModelEntry> find(std::string_view name) const;
  /// Registered names, sorted.
  std::vector<std::string> names() const;
  bool closed() const;
  bool started() const;
  /// True while this thread is inside add/start/remove/close of this registry.
  bool in_lifecycle() const noexcept;
  /// Unique for the process's life (unlike an address, never reused).
  uint64_t id() const noexcept { return id_; }

 private:
  struct Hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  class Active;  // marks this thread as inside a lifecycle call (RAII)

  // Starts `e` unless it was removed meanwhile; on a failed instance stops and unregisters it.
  // Takes e->life_. True when it failed.
  bool start_entry(const std::shared_ptr<ModelEntry>& e);
  static void stop_entry(ModelEntry& e, bool drain);
  // The registered entry of `name`, or null with `status` set (closed, not_found).
  std::shared_ptr<ModelEntry> open_entry(std::string_view name, RegistryStatus& status) const;

  const uint64_t id_;
  mutable std::shared_mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<ModelEntry>, Hash, std::equal_to<>> models_;
  std::unordered_set<std::shared_ptr<ModelEntry>> retiring_;
  bool closed_ = false;
  bool started_ = false;
};

}  // namespace apportion
