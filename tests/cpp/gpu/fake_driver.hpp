// A DriverApi that plays a described device and records every call, so the partitioner's
// lifecycle (what it creates, in which order, and that it destroys all of it) is testable
// without a GPU. It refuses what the real driver refuses (cuda.h's documentation of each call),
// so a test cannot pass on a call sequence a GPU would reject:
//  - cuGreenCtxCreate without CU_GREEN_CTX_DEFAULT_STREAM ("Required");
//  - a green context's stream that is not CU_STREAM_NON_BLOCKING ("must be specified"), whether
//    made by cuGreenCtxStreamCreate or, on 12.4, with the green context current;
//  - cuDevResourceGenerateDesc over SM resources from different splits
//    (CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION);
//  - any use of a stream after its context is gone: a stream destroyed after its green context
//    was destroyed or after its primary context's last release.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "apportion/gpu/device.hpp"
#include "apportion/gpu/driver.hpp"

namespace apportion::gpu::testing {

class FakeDriver final : public DriverApi {
 public:
  explicit FakeDriver(std::vector<DeviceInfo> devices, bool stream_create_12_5 = true)
      : devices_(std::move(devices)) {
    status_.available = true;
    status_.driver_version = devices_.empty() ? 13000 : devices_.front().driver_version;
    status_.device_count = static_cast<int>(devices_.size());
    status_.green_contexts = !devices_.empty() && devices_.front().green_contexts;
    status_.green_ctx_stream_create = status_.green_contexts && stream_create_12_5;
  }

  // --- knobs ---
  /// Makes the named call ("cuGreenCtxCreate", ...) return `r` from its `nth` call on (1-based).
  void fail(const std::string& call, cu::Result r, int nth = 1) { fail_[call] = {r, nth}; }
  /// Units a split yields, when the driver should produce fewer than the arithmetic says.
  void limit_split_units(unsigned n) { split_limit_ = n; }
  /// SMs in each group a split yields, when the driver rounds groups up beyond minCount.
  void split_group_sms(unsigned n) { split_group_sms_ = n; }

  // --- what happened ---
  std::vector<std::string> log;                  ///< "cuStreamCreateWithPriority(prio=-5)" ...
  std::set<std::uintptr_t> live_streams;
  std::set<std::uintptr_t> live_green;
  std::map<int, int> primary_refs;               ///< device -> retain count
  std::map<std::uintptr_t, std::vector<int>> green_units;  ///< green ctx -> split unit indices
  std::map<std::uintptr_t, std::uintptr_t> stream_ctx;     ///< stream -> context it was made in
  std::vector<std::uintptr_t> ctx_stack;         ///< this thread's pushed contexts

  int count(const std::string& prefix) const {
    return static_cast<int>(std::count_if(log.begin(), log.end(), [&](const std::string& s) {
      return s.rfind(prefix, 0) == 0;
    }));
  }
  /// Like count() but only calls that succeeded (failed ones end in " FAILED").
  int count_ok(const std::string& prefix) const {
    return static_cast<int>(std::count_if(log.begin(), log.end(), [&](const std::string& s) {
      return s.rfind(prefix, 0) == 0 && !s.ends_with(" FAILED");
    }));
  }
  std::size_t index_of(const std::string& prefix, std::size_t from = 0) const {
    for (std::size_t i = from; i < log.size(); ++i) {
      if (log[i].rfind(prefix, 0) == 0) return i;
    }
    return log.size();
  }

  // --- DriverApi ---
  const DriverStatus& status() const noexcept override { return status_; }
  DriverStatus& mutable_status() { return status_; }
  std::string error_string(cu::Result r) override { return "FAKE_ERROR_" + std::to_string(r); }

  cu::Result device_get(cu::Device* dev, int ordinal) override {
    if (auto r = hit("cuDeviceGet")) return r;
    if (ordinal < 0 || ordinal >= static_cast<int>(devices_.size())) return cu::kErrorInvalidDevice;
    *dev = ordinal;
    return cu::kSuccess;
  }
  cu::Result device_get_count(int* n) override {
    *n = static_cast<int>(devices_.size());
    return cu::kSuccess;
  }
  cu::Result device_get_attribute(int* v, int attr, cu::Device dev) override {
    if (auto r = hit("cuDeviceGetAttribute")) return r;
    const DeviceInfo& d = devices_.at(static_cast<std::size_t>(dev));
    if (attr == cu::kAttrMultiprocessorCount) *v = d.sm_count;
    else if (attr == cu::kAttrComputeCapabilityMajor) *v = d.cc_major;
    else if (attr == cu::kAttrComputeCapabilityMinor) *v = d.cc_minor;
    else return cu::kErrorInvalidValue;
    return cu::kSuccess;
  }
  cu::Result device_get_name(char* name, int len, cu::Device dev) override {
    std::snprintf(name, static_cast<std::size_t>(len), "%s",
                  devices_.at(static_cast<std::size_t>(dev)).name.c_str());
    return cu::kSuccess;
  }
  cu::Result device_total_mem(std::size_t* bytes, cu::Device dev) override {
    *bytes = devices_.at(static_cast<std::size_t>(dev)).total_memory;
    return cu::kSuccess;
  }
  cu::Result primary_ctx_retain(cu::Context* ctx, cu::Device dev) override {
    log.push_back("cuDevicePrimaryCtxRetain(" + std::to_string(dev) + ")");
    if (auto r = hit("cuDevicePrimaryCtxRetain")) return logged_failure(r);
    ++primary_refs[dev];
    *ctx = reinterpret_cast<cu::Context>(primary_handle(dev));
    return cu::kSuccess;
  }
  cu::Result primary_ctx_release(cu::Device dev) override {
    log.push_back("cuDevicePrimaryCtxRelease(" + std::to_string(dev) + ")");
    if (primary_refs[dev] <= 0) return logged_failure(cu::kErrorInvalidContext);
    --primary_refs[dev];
    return cu::kSuccess;
  }
  cu::Result ctx_set_current(cu::Context) override { return cu::kSuccess; }
  cu::Result ctx_push_current(cu::Context ctx) override {
    log.push_back("cuCtxPushCurrent");
    ctx_stack.push_back(reinterpret_cast<std::uintptr_t>(ctx));
    return cu::kSuccess;
  }
  cu::Result ctx_pop_current(cu::Context* ctx) override {
    log.push_back("cuCtxPopCurrent");
    if (ctx_stack.empty()) return cu::kErrorInvalidValue;
    *ctx = reinterpret_cast<cu::Context>(ctx_stack.back());
    ctx_stack.pop_back();
    return cu::kSuccess;
  }
  cu::Result ctx_get_stream_priority_range(int* least, int* greatest) override {
    if (ctx_stack.empty()) return cu::kErrorInvalidValue;  // needs a current context
    const DeviceInfo& d = devices_.at(device_of_ctx(ctx_stack.back()));
    *least = d.priority_least;
    *greatest = d.priority_greatest;
    return cu::kSuccess;
  }
  cu::Result stream_create_with_priority(cu::Stream* s, unsigned flags, int prio) override {
    log.push_back("cuStreamCreateWithPriority(flags=" + std::to_string(flags) +
                  ",prio=" + std::to_string(prio) + ")");
    if (auto r = hit("cuStreamCreateWithPriority")) return logged_failure(r);
    if (ctx_stack.empty()) return logged_failure(cu::kErrorInvalidContext);
    if (!ctx_alive(ctx_stack.back())) return logged_failure(cu::kErrorInvalidContext);
    if (is_green(ctx_stack.back()) && !(flags & cu::kStreamNonBlocking)) {
      return logged_failure(cu::kErrorInvalidValue);
    }
    *s = reinterpret_cast<cu::Stream>(next_++);
    live_streams.insert(reinterpret_cast<std::uintptr_t>(*s));
    stream_ctx[reinterpret_cast<std::uintptr_t>(*s)] = ctx_stack.back();
    return cu::kSuccess;
  }
  cu::Result stream_destroy(cu::Stream s) override {
    log.push_back("cuStreamDestroy");
    const auto h = reinterpret_cast<std::uintptr_t>(s);
    if (!live_streams.count(h)) return logged_failure(cu::kErrorInvalidHandle);
    // Destroying a context destroys its streams with it; the handle is dangling afterwards.
    if (!ctx_alive(stream_ctx.at(h))) return logged_failure(cu::kErrorInvalidContext);
    live_streams.erase(h);
    return cu::kSuccess;
  }
  cu::Result stream_synchronize(cu::Stream) override { return cu::kSuccess; }
  cu::Result mem_get_info(std::size_t* free, std::size_t* total) override {
    if (ctx_stack.empty()) return cu::kErrorInvalidValue;
    const DeviceInfo& d = devices_.at(device_of_ctx(ctx_stack.back()));
    *free = d.free_memory;
    *total = d.total_memory;
    return cu::kSuccess;
  }
  cu::Result device_get_dev_resource(cu::Device dev, cu::DevResource* res, int type) override {
    log.push_back("cuDeviceGetDevResource");
    if (!status_.green_contexts) return cu::kErrorNotSupported;
    if (type != cu::kDevResourceTypeSm) return cu::kErrorInvalidValue;
    const DeviceInfo& d = devices_.at(static_cast<std::size_t>(dev));
    *res = cu::DevResource{};
    res->type = cu::kDevResourceTypeSm;
    res->sm.sm_count = static_cast<unsigned>(d.sm_count);
    res->sm.min_sm_partition_size = static_cast<unsigned>(d.min_sm_partition);
    res->sm.sm_coscheduled_alignment = static_cast<unsigned>(d.sm_alignment);
    return cu::kSuccess;
  }
  cu::Result dev_sm_resource_split_by_count(cu::DevResource* result, unsigned* groups,
                                            const cu::DevResource* input,
                                            cu::DevResource* remaining, unsigned,
                                            unsigned min_count) override {
    log.push_back("cuDevSmResourceSplitByCount(min=" + std::to_string(min_count) +
                  (result ? ")" : ",query)"));
    if (auto r = hit("cuDevSmResourceSplitByCount")) return logged_failure(r);
    const unsigned align = std::max(input->sm.sm_coscheduled_alignment, 1u);
    const unsigned unit = std::max((std::max(min_count, input->sm.min_sm_partition_size) +
                                    align - 1) / align * align, 1u);
    const unsigned group = std::max(unit, split_group_sms_);
    unsigned n = std::min(input->sm.sm_count / group, split_limit_);
    if (!result) {
      *groups = n;
      return cu::kSuccess;
    }
    n = std::min(n, *groups);
    const unsigned char split = ++splits_;
    // The real driver keeps its identity of a split output in this padding; the fake keeps the
    // unit index and the split's number there so descriptors can be checked.
    auto output = [&](cu::DevResource& r, unsigned index, unsigned sms) {
      r = cu::DevResource{};
      r.type = cu::kDevResourceTypeSm;
      r.sm.sm_count = sms;
      r.internal_padding[0] = static_cast<unsigned char>(index);
      r.internal_padding[1] = 0xA5;
      r.internal_padding[2] = split;
    };
    for (unsigned i = 0; i < n; ++i) output(result[i], i, group);
    if (remaining) output(*remaining, kRemainingUnit, input->sm.sm_count - n * group);
    *groups = n;
    return cu::kSuccess;
  }
  cu::Result dev_resource_generate_desc(cu::ResourceDesc* desc, cu::DevResource* res,
                                        unsigned n) override {
    log.push_back("cuDevResourceGenerateDesc(n=" + std::to_string(n) + ")");
    if (auto r = hit("cuDevResourceGenerateDesc")) return logged_failure(r);
    std::vector<int> units;
    for (unsigned i = 0; i < n; ++i) {
      if (res[i].internal_padding[1] != 0xA5 ||
          res[i].internal_padding[2] != res[0].internal_padding[2]) {
        return logged_failure(cu::kErrorInvalidResourceConfiguration);
      }
      units.push_back(res[i].internal_padding[0]);
    }
    auto h = next_++;
    descs_[h] = units;
    *desc = reinterpret_cast<cu::ResourceDesc>(h);
    return cu::kSuccess;
  }
  cu::Result green_ctx_create(cu::GreenContext* g, cu::ResourceDesc desc, cu::Device,
                              unsigned flags) override {
    log.push_back("cuGreenCtxCreate(flags=" + std::to_string(flags) + ")");
    if (auto r = hit("cuGreenCtxCreate")) return logged_failure(r);
    if (!(flags & cu::kGreenCtxDefaultStream)) return logged_failure(cu::kErrorInvalidValue);
    auto h = next_++;
    green_units[h] = descs_.at(reinterpret_cast<std::uintptr_t>(desc));
    live_green.insert(h);
    *g = reinterpret_cast<cu::GreenContext>(h);
    return cu::kSuccess;
  }
  cu::Result green_ctx_destroy(cu::GreenContext g) override {
    log.push_back("cuGreenCtxDestroy");
    return live_green.erase(reinterpret_cast<std::uintptr_t>(g)) ? cu::kSuccess
                                                                 : cu::kErrorInvalidValue;
  }
  cu::Result ctx_from_green_ctx(cu::Context* ctx, cu::GreenContext g) override {
    // The converted context is a distinct handle that maps back to the green context.
    *ctx = reinterpret_cast<cu::Context>(reinterpret_cast<std::uintptr_t>(g) | kGreenCtxTag);
    return cu::kSuccess;
  }
  cu::Result green_ctx_stream_create(cu::Stream* s, cu::GreenContext g, unsigned flags,
                                     int prio) override {
    log.push_back("cuGreenCtxStreamCreate(flags=" + std::to_string(flags) +
                  ",prio=" + std::to_string(prio) + ")");
    if (!status_.green_ctx_stream_create) return logged_failure(cu::kErrorNotSupported);
    if (auto r = hit("cuGreenCtxStreamCreate")) return logged_failure(r);
    if (!live_green.count(reinterpret_cast<std::uintptr_t>(g))) {
      return logged_failure(cu::kErrorInvalidHandle);
    }
    if (!(flags & cu::kStreamNonBlocking)) return logged_failure(cu::kErrorInvalidValue);
    *s = reinterpret_cast<cu::Stream>(next_++);
    live_streams.insert(reinterpret_cast<std::uintptr_t>(*s));
    stream_ctx[reinterpret_cast<std::uintptr_t>(*s)] =
        reinterpret_cast<std::uintptr_t>(g) | kGreenCtxTag;
    return cu::kSuccess;
  }

  static constexpr std::uintptr_t kGreenCtxTag = std::uintptr_t{1} << 40;
  /// internal_padding[0] of a split's `remaining` output.
  static constexpr unsigned kRemainingUnit = 0xFF;
  static std::uintptr_t primary_handle(int dev) {
    return 0x100000 + static_cast<std::uintptr_t>(dev);
  }

 private:
  cu::Result hit(const std::string& call) {
    auto it = fail_.find(call);
    if (it == fail_.end()) return cu::kSuccess;
    return --it->second.second <= 0 ? it->second.first : cu::kSuccess;
  }
  cu::Result logged_failure(cu::Result r) {
    log.back() += " FAILED";
    return r;
  }
  std::size_t device_of_ctx(std::uintptr_t ctx) const {
    return static_cast<std::size_t>(ctx - 0x100000);
  }
  static bool is_green(std::uintptr_t ctx) { return (ctx & kGreenCtxTag) != 0; }
  bool ctx_alive(std::uintptr_t ctx) const {
    if (is_green(ctx)) return live_green.count(ctx & ~kGreenCtxTag) > 0;
    auto it = primary_refs.find(static_cast<int>(device_of_ctx(ctx)));
    return it != primary_refs.end() && it->second > 0;
  }

  std::vector<DeviceInfo> devices_;
  DriverStatus status_;
  std::map<std::string, std::pair<cu::Result, int>> fail_;
  std::map<std::uintptr_t, std::vector<int>> descs_;
  std::uintptr_t next_ = 0x1000;
  unsigned split_limit_ = ~0u;
  unsigned split_group_sms_ = 0;
  unsigned char splits_ = 0;
};

}  // namespace apportion::gpu::testing
