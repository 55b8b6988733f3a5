// What the partitioner needs to know about one GPU, read from the driver or described by hand
// (presets of real chips) so plans are computed and tested on machines without a GPU.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "apportion/gpu/driver.hpp"

namespace apportion::gpu {

/// One device. Plain data; copy freely.
struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  int cc_major = 0;
  int cc_minor = 0;
  int sm_count = 0;
  /// cuCtxGetStreamPriorityRange: numerically lower is more urgent, so least >= greatest
  /// (e.g. least 0, greatest -5 on Ampere and Hopper).
  int priority_least = 0;
  int priority_greatest = 0;
  /// Green-context SM split constraints (CUdevSmResource): a group has at least
  /// `min_sm_partition` SMs and is a multiple of `sm_alignment`.
  int min_sm_partition = 0;
  int sm_alignment = 0;
  std::uint64_t total_memory = 0;
  /// Free bytes when described (equal to total for presets); what memory budgets are checked
  /// against.
  std::uint64_t free_memory = 0;
  int driver_version = 0;
  /// The driver can build green contexts (CUDA 12.4+ and every symbol present).
  bool green_contexts = false;

  /// SMs per unit of an SM group. Groups of different sizes on one device are built from the
  /// outputs of ONE cuDevSmResourceSplitByCount call (results of a split cannot be split again),
  /// and that call makes equal groups, so every group is a whole number of these units: the
  /// minimum partition rounded up to the alignment.
  int sm_granularity() const noexcept;
  /// How many units one split of the whole device yields (the SMs beyond them stay outside
  /// every group).
  int sm_units() const noexcept;
};

/// Names accepted by described_device(): "h200", "h100", "a100", "v100-cuda12.2".
std::vector<std::string> described_device_names();

/// A preset device (no GPU needed). Unknown names return std::nullopt.
///  - h200: 132 SMs, cc 9.0, partitions of 8 aligned to 8, priorities [0, -5], 143771 MiB.
///  - h100: H100 SXM, 132 SMs, cc 9.0, 8/8, [0, -5], 81559 MiB.
///  - a100: A100 SXM 80 GB, 108 SMs, cc 8.0, minimum 4 aligned to 2 (the guideline cuda.h gives
///    for compute capability 8.x), [0, -5], 81920 MiB.
///  - v100-cuda12.2: 80 SMs, cc 7.0, driver 12.2 so no green contexts, [0, -5], 32768 MiB.
std::optional<DeviceInfo> described_device(std::string_view name, int ordinal = 0);

/// The documented per-architecture split constraints (cuda.h, "Green Contexts") used when the
/// driver leaves CUdevSmResource's newer fields at zero: {min partition, alignment}.
std::pair<int, int> sm_split_guideline(int cc_major) noexcept;

/// Reads device `ordinal` from a live driver. Retains and releases the primary context (the
/// priority range and free memory need a current context), so the first call on a device pays
/// its initialisation. std::nullopt with `error` set on failure; never throws.
std::optional<DeviceInfo> describe_device(DriverApi& driver, int ordinal, std::string& error);

/// Every device of a live driver; empty when the driver is unavailable.
std::vector<DeviceInfo> describe_devices(DriverApi& driver, std::string& error);

/// One line: "H200 (device 0): cc 9.0, 132 SMs, groups of 8, priorities [0, -5], ...".
std::string to_string(const DeviceInfo& device);

}  // namespace apportion::gpu
