#include "apportion/gpu/device.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <utility>

#include "apportion/gpu/format.hpp"

namespace apportion::gpu {

namespace {
constexpr std::uint64_t kMiB = 1024ull * 1024ull;
}  // namespace

int DeviceInfo::sm_granularity() const noexcept {
  // In 64 bits: a described device may hold any int here, and min + align - 1 overflowed int
  // (a granularity of 0, then a division by it). At least 1, at most INT_MAX.
  const long long align = std::max(sm_alignment, 1);
  const long long min = std::max<long long>(min_sm_partition, align);
  const long long units = (min + align - 1) / align * align;
  return static_cast<int>(std::min<long long>(units, std::numeric_limits<int>::max()));
}

int DeviceInfo::sm_units() const noexcept { return sm_count / sm_granularity(); }

std::pair<int, int> sm_split_guideline(int cc_major) noexcept {
  if (cc_major >= 9) return {8, 8};
  if (cc_major == 8) return {4, 2};
  return {2, 2};
}

std::vector<std::string> described_device_names() {
  return {"h200", "h100", "a100", "v100-cuda12.2"};
}

std::optional<DeviceInfo> described_device(std::string_view name, int ordinal) {
  DeviceInfo d;
  d.ordinal = ordinal;
  d.priority_least = 0;
  d.priority_greatest = -5;
  d.driver_version = 13000;
  d.green_contexts = true;
  if (name == "h200") {
    d.name = "NVIDIA H200";
    d.cc_major = 9;
    d.sm_count = 132;
    d.min_sm_partition = 8;
    d.sm_alignment = 8;
    d.total_memory = 143771 * kMiB;
  } else if (name == "h100") {
    d.name = "NVIDIA H100 80GB HBM3";
    d.cc_major = 9;
    d.sm_count = 132;
    d.min_sm_partition = 8;
    d.sm_alignment = 8;
    d.total_memory = 81559 * kMiB;
  } else if (name == "a100") {
    d.name = "NVIDIA A100-SXM4-80GB";
    d.cc_major = 8;
    d.sm_count = 108;
    d.min_sm_partition = 4;
    d.sm_alignment = 2;
    d.total_memory = 81920 * kMiB;
  } else if (name == "v100-cuda12.2") {
    d.name = "Tesla V100-SXM2-32GB";
    d.cc_major = 7;
    d.sm_count = 80;
    d.min_sm_partition = 2;
    d.sm_alignment = 2;
    d.total_memory = 32768 * kMiB;
    d.driver_version = 12020;
    d.green_contexts = false;
  } else {
    return std::nullopt;
  }
  d.free_memory = d.total_memory;
  return d;
}

std::optional<DeviceInfo> describe_device(DriverApi& driver, int ordinal, std::string& error) {
  const DriverStatus& st = driver.status();
  if (!st.available) {
    error = st.reason;
    return std::nullopt;
  }
  auto fail = [&](const char* what, cu::Result r) {
    error = "device " + std::to_string(ordinal) + ": " + what + " failed: " +
            driver.error_string(r);
    return std::nullopt;
  };
  DeviceInfo d;
  d.ordinal = ordinal;
  d.driver_version = st.driver_version;
  cu::Device dev = 0;
  if (auto r = driver.device_get(&dev, ordinal); r != cu::kSuccess) return fail("cuDeviceGet", r);
  std::array<char, 256> name{};
  if (auto r = driver.device_get_name(name.data(), static_cast<int>(name.size()), dev);
      r != cu::kSuccess) {
    return fail("cuDeviceGetName", r);
  }
  name.back() = '\0';
  d.name = name.data();
  if (auto r = driver.device_get_attribute(&d.sm_count, cu::kAttrMultiprocessorCount, dev);
      r != cu::kSuccess) {
    return fail("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)", r);
  }
  if (auto r = driver.device_get_attribute(&d.cc_major, cu::kAttrComputeCapabilityMajor, dev);
      r != cu::kSuccess) {
    return fail("cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)", r);
  }
  if (auto r = driver.device_get_attribute(&d.cc_minor, cu::kAttrComputeCapabilityMinor, dev);
      r != cu::kSuccess) {
    return fail("cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)", r);
  }
  std::size_t total = 0;
  if (auto r = driver.device_total_mem(&total, dev); r != cu::kSuccess) {
    return fail("cuDeviceTotalMem", r);
  }
  d.total_memory = total;

  auto [min, align] = sm_split_guideline(d.cc_major);
  d.min_sm_partition = min;
  d.sm_alignment = align;
  if (st.green_contexts) {
    cu::DevResource res{};
    if (driver.device_get_dev_resource(dev, &res, cu::kDevResourceTypeSm) == cu::kSuccess &&
        res.type == cu::kDevResourceTypeSm) {
      d.green_contexts = true;
      // Zero: a driver from before these fields existed; the guideline stands.
      if (res.sm.min_sm_partition_size > 0) d.min_sm_partition = static_cast<int>(res.sm.min_sm_partition_size);
      if (res.sm.sm_coscheduled_alignment > 0) {
        d.sm_alignment = static_cast<int>(res.sm.sm_coscheduled_alignment);
      }
    }
  }

  cu::Context ctx = nullptr;
  if (auto r = driver.primary_ctx_retain(&ctx, dev); r != cu::kSuccess) {
    return fail("cuDevicePrimaryCtxRetain", r);
  }
  cu::Result r = driver.ctx_push_current(ctx);
  const char* what = "cuCtxPushCurrent";
  if (r == cu::kSuccess) {
    std::size_t free = 0;
    std::size_t total_ctx = 0;
    r = driver.ctx_get_stream_priority_range(&d.priority_least, &d.priority_greatest);
    what = "cuCtxGetStreamPriorityRange";
    if (r == cu::kSuccess) {
      r = driver.mem_get_info(&free, &total_ctx);
      what = "cuMemGetInfo";
      d.free_memory = free;
    }
    cu::Context popped = nullptr;
    driver.ctx_pop_current(&popped);
  }
  driver.primary_ctx_release(dev);
  if (r != cu::kSuccess) return fail(what, r);
  return d;
}

std::vector<DeviceInfo> describe_devices(DriverApi& driver, std::string& error) {
  std::vector<DeviceInfo> out;
  if (!driver.status().available) {
    error = driver.status().reason;
    return out;
  }
  for (int i = 0; i < driver.status().device_count; ++i) {
    if (auto d = describe_device(driver, i, error)) out.push_back(std::move(*d));
  }
  return out;
}

std::string to_string(const DeviceInfo& d) {
  std::string s = d.name + " (device " + std::to_string(d.ordinal) + "): cc " +
                  std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor) + ", " +
                  std::to_string(d.sm_count) + " SMs";
  if (d.green_contexts) {
    s += ", SM groups in units of " + std::to_string(d.sm_granularity()) + " (min " +
         std::to_string(d.min_sm_partition) + ", align " + std::to_string(d.sm_alignment) + ")";
  } else {
    s += ", no green contexts (driver " + format_driver_version(d.driver_version) + ")";
  }
  s += ", stream priorities [" + std::to_string(d.priority_least) + ", " +
       std::to_string(d.priority_greatest) + "], " + format_bytes(d.free_memory) + " free of " +
       format_bytes(d.total_memory);
  return s;
}

}  // namespace apportion::gpu
