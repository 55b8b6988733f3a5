// The GPU partition plan: a pure, deterministic function from every model's GPU quota and the
// devices (live or described) to streams, clamped priorities, SM groups and memory budgets. It
// touches no driver, so it is computed and tested without a GPU; partitioner.hpp realises it.
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "apportion/gpu/device.hpp"

namespace apportion::gpu {

enum class PriorityClass { high, normal, low, value };

/// A stream priority as asked. Classes map onto the device's range: high = greatest (most
/// urgent), low = least, normal = the middle (rounded towards least), so three classes stay
/// distinct on every range wider than one step. `value` uses CUDA's convention (numerically lower
/// is more urgent, 0 is the default) and is clamped into the device's range.
struct GpuPriority {
  PriorityClass cls = PriorityClass::normal;
  int value = 0;

  static GpuPriority high() noexcept { return {PriorityClass::high, 0}; }
  static GpuPriority normal() noexcept { return {PriorityClass::normal, 0}; }
  static GpuPriority low() noexcept { return {PriorityClass::low, 0}; }
  static GpuPriority of(int v) noexcept { return {PriorityClass::value, v}; }
  /// "high", "normal", "low" or the integer.
  std::string to_string() const;
};

/// One model's GPU quota.
struct GpuQuota {
  std::string model;
  int device = 0;
  int streams = 1;               ///< 1..kMaxStreams
  GpuPriority priority;
  double sm_share = 0.0;         ///< (0, 1] of the device's SMs; 0: not asked
  int sm_count = 0;              ///< SMs asked; 0: not asked. At most one of the two.
  std::uint64_t memory = 0;      ///< budget in bytes; 0: no budget
  bool allow_overlap = false;    ///< its SMs and memory may overlap other models' (not counted)
  bool strict = false;           ///< fail rather than fall back when its SM group cannot be built
};

inline constexpr int kMaxStreams = 64;

/// An invalid quota (a field out of range, a duplicate model). Names the model and the field.
class GpuQuotaError : public std::invalid_argument {
 public:
  GpuQuotaError(std::string model, std::string field, const std::string& what)
      : std::invalid_argument(what), model_(std::move(model)), field_(std::move(field)) {}
  const std::string& model() const noexcept { return model_; }
  const std::string& field() const noexcept { return field_; }

 private:
  std::string model_;
  std::string field_;
};

/// Valid quotas that do not fit the devices (over-subscribed SMs or memory, a missing device, an
/// SM group a strict quota needs but the device cannot build). Says what is left.
class GpuPlacementError : public std::runtime_error {
 public:
  GpuPlacementError(std::string model, const std::string& what)
      : std::runtime_error(what), model_(std::move(model)) {}
  const std::string& model() const noexcept { return model_; }

 private:
  std::string model_;
};

/// What one model gets.
struct ModelGpuPlan {
  std::string model;
  int device = 0;
  int streams = 1;
  int priority = 0;              ///< the CUDA priority its streams are created with
  std::string priority_asked;    ///< GpuPriority::to_string() of the quota
  bool priority_clamped = false; ///< an integer outside the device's range was clamped
  int sm_asked = 0;              ///< SMs asked (sm_share resolved against the device); 0: none
  int sm_count = 0;              ///< SMs in its group after rounding; 0: shares the whole GPU
  bool sm_rounded = false;       ///< sm_count != sm_asked
  std::vector<int> sm_units;     ///< units (DeviceGpuPlan::granularity SMs each) of its group
  bool sm_overlaps = false;      ///< some of its units are also another model's
  std::uint64_t memory = 0;      ///< budget in bytes; 0: none
  bool allow_overlap = false;
  bool strict = false;
};

/// What one device holds after planning.
struct DeviceGpuPlan {
  DeviceInfo info;
  int granularity = 0;                 ///< SMs per unit
  int units = 0;                       ///< units one split of the device yields
  int sm_grouped = 0;                  ///< SMs in exclusive groups
  int sm_unassigned = 0;               ///< SMs in no group (spare units + SMs outside any unit)
  std::uint64_t memory_capacity = 0;   ///< free memory budgets are checked against
  std::uint64_t memory_assigned = 0;   ///< sum of non-overlapping budgets
};

struct GpuPlan {
  std::vector<DeviceGpuPlan> devices;  ///< as given, by position
  std::vector<ModelGpuPlan> models;    ///< in quota order
  /// Where the plan differs from what was asked: rounding, clamping, SM groups a device cannot
  /// build (the model then gets priority-only streams), overlaps.
  std::vector<std::string> notes;

  const ModelGpuPlan* find(std::string_view model) const noexcept;
  const DeviceGpuPlan* device(int ordinal) const noexcept;
  /// A table for people (rt.plan()).
  std::string to_string() const;
};

/// Plans every quota against `devices` (matched by DeviceInfo::ordinal). Deterministic: the same
/// inputs give the same plan; exclusive SM groups take units in quota order from unit 0, then
/// overlapping groups take spare units first and shared ones after.
/// Throws GpuQuotaError for an invalid quota and GpuPlacementError when quotas do not fit.
GpuPlan plan_gpus(std::span<const GpuQuota> quotas, std::span<const DeviceInfo> devices);

}  // namespace apportion::gpu
