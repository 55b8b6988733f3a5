#include "apportion/gpu/partitioner.hpp"

#include <algorithm>
#include <set>
#include <utility>

namespace apportion::gpu {

namespace {

// Pops the context it pushed on every way out, so a throw never leaves the caller's thread with
// our context current.
class ScopedContext {
 public:
  ScopedContext(DriverApi& driver, cu::Context ctx) : driver_(driver) {
    pushed_ = driver_.ctx_push_current(ctx) == cu::kSuccess;
  }
  ~ScopedContext() {
    if (pushed_) {
      cu::Context popped = nullptr;
      driver_.ctx_pop_current(&popped);
    }
  }
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;
  bool ok() const noexcept { return pushed_; }

 private:
  DriverApi& driver_;
  bool pushed_ = false;
};

std::uintptr_t as_int(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

}  // namespace

GpuPartition::GpuPartition(std::shared_ptr<DriverApi> driver, const GpuPlan& plan)
    : driver_(std::move(driver)), plan_(plan) {
  if (!driver_ || !driver_->status().available) {
    closed_ = true;
    throw GpuUnavailableError(driver_ ? driver_->status().reason : "no CUDA driver");
  }
  for (const auto& m : plan.models) {
    ModelStreams ms;
    ms.model = m.model;
    ms.device = m.device;
    ms.priority = m.priority;
    ms.memory = m.memory;
    models_.push_back(std::move(ms));
  }
  try {
    for (const auto& d : plan.devices) realise_device(plan, d);
    finish_plan();
  } catch (...) {
    close();
    throw;
  }
}

void GpuPartition::finish_plan() {
  plan_.notes.insert(plan_.notes.end(), warnings_.begin(), warnings_.end());
}

GpuPartition::~GpuPartition() { close(); }

const ModelStreams* GpuPartition::find(std::string_view model) const noexcept {
  for (const auto& m : models_) {
    if (m.model == model) return &m;
  }
  return nullptr;
}

void GpuPartition::check(cu::Result r, const char* what, int device, const std::string* model) {
  if (r != cu::kSuccess) {
    std::string where = "GPU " + std::to_string(device);
    if (model != nullptr) where += ", model '" + *model + "'";
    throw std::runtime_error(where + ": " + what + " failed: " + driver_->error_string(r));
  }
}

void GpuPartition::realise_device(const GpuPlan& plan, const DeviceGpuPlan& device) {
  const int ordinal = device.info.ordinal;
  std::vector<std::size_t> here;
  for (std::size_t i = 0; i < plan.models.size(); ++i) {
    if (plan.models[i].device == ordinal) here.push_back(i);
  }
  if (here.empty()) return;
  DriverApi& drv = *driver_;

  cu::Device dev = 0;
  check(drv.device_get(&dev, ordinal), "cuDeviceGet", ordinal);
  cu::Context primary = nullptr;
  check(drv.primary_ctx_retain(&primary, dev), "cuDevicePrimaryCtxRetain", ordinal);
  owned_.push_back({Kind::primary_ctx, dev, primary});
  ScopedContext current(drv, primary);
  if (!current.ok()) check(cu::kErrorInvalidValue, "cuCtxPushCurrent", ordinal);

  // Green contexts for the models with an SM group. A failure here is a fallback for a
  // non-strict model and an error for a strict one; either way nothing half-built survives.
  std::vector<cu::GreenContext> green(plan.models.size(), nullptr);
  auto fallback = [&](const ModelGpuPlan& m, const std::string& why) {
    if (m.strict) {
      throw GpuPlacementError(m.model, "model '" + m.model + "' needs an SM group of " +
                                           std::to_string(m.sm_count) + " SMs on GPU " +
                                           std::to_string(ordinal) + " (strict=True) but " + why);
    }
    warnings_.push_back("model '" + m.model + "': " + why +
                        "; using priority-only streams on the whole GPU");
  };
  std::vector<cu::DevResource> units;   // the driver's split, in its order
  std::vector<std::size_t> grouped;
  for (std::size_t i : here) {
    if (plan.models[i].sm_count > 0) grouped.push_back(i);
  }
  if (!grouped.empty() && !drv.status().green_contexts) {
    const std::string why = "the driver (" + format_driver_version(drv.status().driver_version) +
                            ") cannot build green contexts (CUDA 12.4+ needed)";
    for (std::size_t i : grouped) fallback(plan.models[i], why);
    grouped.clear();
  }
  if (!grouped.empty()) {
    // One split of the whole device into equal units; each group is a descriptor over some of
    // them. Splitting the remainder again is not allowed by the driver, so groups of different
    // sizes cannot come from successive splits.
    cu::DevResource all{};
    std::string why;
    cu::Result r = drv.device_get_dev_resource(dev, &all, cu::kDevResourceTypeSm);
    unsigned n = 0;
    if (r == cu::kSuccess) {
      r = drv.dev_sm_resource_split_by_count(nullptr, &n, &all, nullptr, 0,
                                             static_cast<unsigned>(device.granularity));
    }
    if (r == cu::kSuccess && n > 0) {
      units.resize(n);
      cu::DevResource remaining{};
      r = drv.dev_sm_resource_split_by_count(units.data(), &n, &all, &remaining, 0,
                                             static_cast<unsigned>(device.granularity));
      units.resize(std::min<std::size_t>(n, units.size()));
    }
    if (r != cu::kSuccess) {
      why = "splitting its SMs failed: " + drv.error_string(r);
    }
    for (std::size_t i : grouped) {
      const ModelGpuPlan& m = plan.models[i];
      std::string model_why = why;
      if (model_why.empty() && !m.sm_units.empty() &&
          static_cast<std::size_t>(m.sm_units.back()) >= units.size()) {
        model_why = "the driver split the GPU into only " + std::to_string(units.size()) +
                    " groups of " + std::to_string(device.granularity) + " SMs (planned " +
                    std::to_string(device.units) + ")";
      }
      if (!model_why.empty()) {
        fallback(m, model_why);
        continue;
      }
      std::vector<cu::DevResource> mine;
      for (int u : m.sm_units) mine.push_back(units[static_cast<std::size_t>(u)]);
      cu::ResourceDesc desc = nullptr;
      r = drv.dev_resource_generate_desc(&desc, mine.data(), static_cast<unsigned>(mine.size()));
      cu::GreenContext g = nullptr;
      if (r == cu::kSuccess) r = drv.green_ctx_create(&g, desc, dev, cu::kGreenCtxDefaultStream);
      if (r != cu::kSuccess) {
        fallback(m, "creating its green context failed: " + drv.error_string(r));
        continue;
      }
      owned_.push_back({Kind::green_ctx, dev, g});
      green[i] = g;
    }
  }

  // The realised plan: groups as the driver made them. A unit's SMs are the driver's smCount
  // (the plan assumed `granularity`); a model that fell back has no group at all.
  std::set<int> used;
  int sm_grouped = 0;
  for (std::size_t i : here) {
    ModelGpuPlan& m = plan_.models[i];
    if (!green[i]) {
      m.sm_count = 0;
      m.sm_units.clear();
      m.sm_overlaps = false;
      m.sm_rounded = m.sm_asked != 0;
      continue;
    }
    m.sm_count = 0;
    for (int u : m.sm_units) {
      const int sms = static_cast<int>(units[static_cast<std::size_t>(u)].sm.sm_count);
      m.sm_count += sms;
      if (used.insert(u).second) sm_grouped += sms;
    }
    m.sm_rounded = m.sm_count != m.sm_asked;
  }
  DeviceGpuPlan& realised = *std::find_if(plan_.devices.begin(), plan_.devices.end(),
                                          [&](const DeviceGpuPlan& d) {
                                            return d.info.ordinal == ordinal;
                                          });
  realised.sm_grouped = sm_grouped;
  realised.sm_unassigned = realised.info.sm_count - sm_grouped;

  for (std::size_t i : here) {
    const ModelGpuPlan& m = plan.models[i];
    ModelStreams& out = models_[i];
    cu::GreenContext g = green[i];
    cu::Context ctx = primary;
    if (g) check(drv.ctx_from_green_ctx(&ctx, g), "cuCtxFromGreenCtx", ordinal, &m.model);
    out.context = as_int(ctx);
    out.green_context = g != nullptr;
    out.sm_count = plan_.models[i].sm_count;
    for (int s = 0; s < m.streams; ++s) {
      cu::Stream stream = nullptr;
      if (g && drv.status().green_ctx_stream_create) {
        check(drv.green_ctx_stream_create(&stream, g, cu::kStreamNonBlocking, m.priority),
              "cuGreenCtxStreamCreate", ordinal, &m.model);
      } else if (g) {
        // 12.4 has no cuGreenCtxStreamCreate: a stream made while the green context is current
        // belongs to it.
        ScopedContext in_green(drv, ctx);
        if (!in_green.ok()) check(cu::kErrorInvalidValue, "cuCtxPushCurrent(green)", ordinal, &m.model);
        check(drv.stream_create_with_priority(&stream, cu::kStreamNonBlocking, m.priority),
              "cuStreamCreateWithPriority", ordinal, &m.model);
      } else {
        check(drv.stream_create_with_priority(&stream, cu::kStreamNonBlocking, m.priority),
              "cuStreamCreateWithPriority", ordinal, &m.model);
      }
      owned_.push_back({Kind::stream, dev, stream});
      out.streams.push_back(as_int(stream));
    }
  }
}

void GpuPartition::close() noexcept {
  if (closed_) return;
  closed_ = true;
  // Streams before the contexts they live in; green contexts before the primary context they
  // retain. Reverse creation order gives both.
  int failures = 0;
  while (!owned_.empty()) {
    Owned o = owned_.back();
    owned_.pop_back();
    cu::Result r = cu::kSuccess;
    switch (o.kind) {
      case Kind::stream: r = driver_->stream_destroy(static_cast<cu::Stream>(o.handle)); break;
      case Kind::green_ctx:
        r = driver_->green_ctx_destroy(static_cast<cu::GreenContext>(o.handle));
        break;
      case Kind::primary_ctx: r = driver_->primary_ctx_release(o.device); break;
    }
    if (r != cu::kSuccess) ++failures;
  }
  if (failures > 0) {
    try {
      warnings_.push_back("close(): " + std::to_string(failures) +
                          " driver object(s) failed to be destroyed");
    } catch (...) {  // out of memory while reporting: nothing more useful to do
    }
  }
  for (auto& m : models_) m.streams.clear();
}

}  // namespace apportion::gpu
