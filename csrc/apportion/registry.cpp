#include "apportion/registry.hpp"

#include <algorithm>
#include <atomic>
#include <bit>

namespace apportion {

namespace {

std::atomic<uint64_t> next_registry_id{1};

// The registries whose lifecycle call this thread is inside (nesting is rare and shallow).
thread_local std::vector<uint64_t> active_here;

}  // namespace

uint64_t lane_cells(uint64_t max_queue, uint32_t priority_levels, uint32_t groups, bool delayed_lane,
                    uint64_t workers) noexcept {
  constexpr uint64_t kMax = UINT64_MAX;
  if (max_queue > (uint64_t{1} << 60) || workers > (uint64_t{1} << 60)) return kMax;
  // As Model::build_groups sizes them, and MpmcQueue rounds them up (to at least 2).
  const auto cells = [](uint64_t capacity) { return std::bit_ceil(std::max<uint64_t>(capacity, 2)); };
  const uint64_t cap = 2 * std::max<uint64_t>(max_queue, 1);
  const uint64_t lanes = uint64_t{std::max(priority_levels, 1u)} * std::max(groups, 1u);
  const uint64_t per_lane = cells(cap);
  if (per_lane > kMax / lanes) return kMax;
  const uint64_t delayed = delayed_lane ? cells(cap + workers) : 0;
  return per_lane * lanes > kMax - delayed ? kMax : per_lane * lanes + delayed;
}

ModelEntry::ModelEntry(std::shared_ptr<Model> m, std::shared_ptr<ModelHandler> h,
                       int64_t default_timeout, uint32_t levels)
    : handler(std::move(h)),
      model(std::move(m)),
      default_timeout_ns(default_timeout),
      priority_levels(std::max<uint32_t>(levels, 1)) {}

const char* to_string(RegistryStatus s) noexcept {
  switch (s) {
    case RegistryStatus::ok: return "ok";
    case RegistryStatus::closed: return "closed";
    case RegistryStatus::exists: return "exists";
    case RegistryStatus::not_found: return "not found";
    case RegistryStatus::nested: return "nested";
    case RegistryStatus::start_failed: return "start failed";
  }
  return "?";
}

class Registry::Active {
 public:
  explicit Active(uint64_t id) : id_(id) { active_here.push_back(id); }
  Active(const Active&) = delete;
  Active& operator=(const Active&) = delete;
  ~Active() {
    auto it = std::find(active_here.rbegin(), active_here.rend(), id_);
    if (it != active_here.rend()) active_here.erase(std::next(it).base());
  }

 private:
  uint64_t id_;
};

Registry::Registry() : id_(next_registry_id.fetch_add(1, std::memory_order_relaxed)) {}

Registry::~Registry() { close(false); }

bool Registry::in_lifecycle() const noexcept {
  return std::find(active_here.begin(), active_here.end(), id_) != active_here.end();
}

RegistryStatus Registry::add(const std::shared_ptr<ModelEntry>& e) {
  if (in_lifecycle()) return RegistryStatus::nested;
  bool started = false;
  {
    std::unique_lock lock(mu_);
    if (closed_) return RegistryStatus::closed;
    if (!models_.try_emplace(e->name(), e).second) return RegistryStatus::exists;
    started = started_;
  }
  if (!started) return RegistryStatus::ok;
  Active active(id_);
  if (start_entry(e)) return RegistryStatus::start_failed;
  std::shared_lock lock(mu_);
  return closed_ ? RegistryStatus::closed : RegistryStatus::ok;
}

RegistryStatus Registry::start(std::vector<std::shared_ptr<ModelEntry>>* failed) {
  if (in_lifecycle()) return RegistryStatus::nested;
  std::vector<std::shared_ptr<ModelEntry>> todo;
  {
    std::unique_lock lock(mu_);
    if (closed_) return RegistryStatus::closed;
    started_ = true;
    for (auto& [name, e] : models_) todo.push_back(e);
  }
  Active active(id_);
  for (auto& e : todo) {
    if (start_entry(e) && failed != nullptr) failed->push_back(e);
  }
  return RegistryStatus::ok;
}

bool Registry::start_entry(const std::shared_ptr<ModelEntry>& e) {
  std::lock_guard life(e->life_);
  {
    std::shared_lock lock(mu_);
    if (e->removed_) return false;  // its remover stops it
  }
  if (e->model->started()) return false;
  if (e->model->start() == 0) return false;
  {
    std::unique_lock lock(mu_);
    if (!e->removed_) {
      e->removed_ = true;
      models_.erase(e->name());
    }
  }
  e->model->close(false);
  e->model->join();
  return true;
}

void Registry::stop_entry(ModelEntry& e, bool drain) {
  e.model->close(drain);
  std::lock_guard life(e.life_);
  e.model->join();
}

RegistryStatus Registry::remove(std::string_view name, bool drain,
                                std::shared_ptr<ModelEntry>* removed) {
  if (in_lifecycle()) return RegistryStatus::nested;
  std::shared_ptr<ModelEntry> e;
  {
    std::unique_lock lock(mu_);
    auto it = models_.find(name);
    if (it == models_.end()) return RegistryStatus::not_found;
    e = it->second;
    e->removed_ = true;
    models_.erase(it);
    retiring_.insert(e);
  }
  if (removed != nullptr) *removed = e;
  {
    Active active(id_);
    stop_entry(*e, drain);
  }
  std::unique_lock lock(mu_);
  retiring_.erase(e);
  return RegistryStatus::ok;
}

RegistryStatus Registry::reshape(std::string_view name, Model::Shape shape, uint32_t* failed) {
  if (in_lifecycle()) return RegistryStatus::nested;
  RegistryStatus status = RegistryStatus::ok;
  const std::shared_ptr<ModelEntry> e = open_entry(name, status);
  if (e == nullptr) return status;
  Active active(id_);
  std::lock_guard life(e->life_);
  {
    std::shared_lock lock(mu_);
    if (e->removed_) return RegistryStatus::not_found;
  }
  if (e->model->closed()) return RegistryStatus::closed;
  const uint32_t n = e->model->reshape(std::move(shape));
  if (failed != nullptr) *failed = n;
  return n == 0 ? RegistryStatus::ok : RegistryStatus::start_failed;
}

std::shared_ptr<ModelEntry> Registry::open_entry(std::string_view name, RegistryStatus& status) const {
  std::shared_lock lock(mu_);
  if (closed_) {
    status = RegistryStatus::closed;
    return nullptr;
  }
  auto it = models_.find(name);
  if (it == models_.end()) {
    status = RegistryStatus::not_found;
    return nullptr;
  }
  return it->second;
}

RegistryStatus Registry::set_max_queue(std::string_view name, std::size_t max_queue) {
  RegistryStatus status = RegistryStatus::ok;
  const std::shared_ptr<ModelEntry> e = open_entry(name, status);
  if (e == nullptr) return status;
  if (e->model->closed()) return RegistryStatus::closed;
  e->model->set_max_queue(max_queue);
  return RegistryStatus::ok;
}

RegistryStatus Registry::set_priority_class(std::string_view name, int32_t priority_class) {
  RegistryStatus status = RegistryStatus::ok;
  const std::shared_ptr<ModelEntry> e = open_entry(name, status);
  if (e == nullptr) return status;
  if (e->model->closed()) return RegistryStatus::closed;
  e->model->set_priority_class(priority_class);
  return RegistryStatus::ok;
}

void Registry::close(bool drain) {
  if (in_lifecycle()) return;
  std::vector<std::shared_ptr<ModelEntry>> all;
  {
    std::unique_lock lock(mu_);
    closed_ = true;
    for (auto& [name, e] : models_) all.push_back(e);
    all.insert(all.end(), retiring_.begin(), retiring_.end());
  }
  Active active(id_);
  // Every model stops accepting first, so none keeps admitting while another drains.
  for (auto& e : all) e->model->close(drain);
  for (auto& e : all) stop_entry(*e, drain);
}

std::shared_ptr<ModelEntry> Registry::find(std::string_view name) const {
  std::shared_lock lock(mu_);
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : it->second;
}

std::vector<std::string> Registry::names() const {
  std::vector<std::string> out;
  {
    std::shared_lock lock(mu_);
    out.reserve(models_.size());
    for (auto& [name, e] : models_) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool Registry::closed() const {
  std::shared_lock lock(mu_);
  return closed_;
}

bool Registry::started() const {
  std::shared_lock lock(mu_);
  return started_;
}

}  // namespace apportion
