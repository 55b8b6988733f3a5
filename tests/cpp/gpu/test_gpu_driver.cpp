// The driver loader: symbol resolution through a SymbolSource, version gating, the reasons it
// gives when the GPU layer is unavailable, and the real loader on this machine.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "apportion/gpu/device.hpp"
#include "apportion/gpu/driver.hpp"
#include "fake_driver.hpp"

namespace gpu = apportion::gpu;
namespace cu = apportion::gpu::cu;

namespace {

// The fake "libcuda": C functions with the driver's signatures whose answers come from here.
struct FakeLib {
  int version = 13000;
  cu::Result init_result = cu::kSuccess;
  int devices = 1;
  std::set<std::string> missing;                      // symbols the driver lacks
  std::vector<std::pair<std::string, int>> requests;  // what get_proc was asked
  int init_calls = 0;
};
FakeLib* lib = nullptr;

cu::Result fake_driver_get_version(int* v) {
  *v = lib->version;
  return cu::kSuccess;
}
cu::Result fake_init(unsigned flags) {
  ++lib->init_calls;
  return flags == 0 ? lib->init_result : cu::kErrorInvalidValue;
}
cu::Result fake_device_get_count(int* n) {
  *n = lib->devices;
  return cu::kSuccess;
}
cu::Result fake_error_name(cu::Result r, const char** s) {
  *s = r == cu::kErrorNoDevice ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN";
  return cu::kSuccess;
}
cu::Result fake_error_string(cu::Result r, const char** s) {
  *s = r == cu::kErrorNoDevice ? "no CUDA-capable device is detected" : "unknown error";
  return cu::kSuccess;
}
cu::Result fake_stream_create(cu::Stream* s, unsigned, int prio) {
  *s = reinterpret_cast<cu::Stream>(static_cast<std::uintptr_t>(0x5000 - prio));
  return cu::kSuccess;
}
cu::Result fake_other() { return cu::kSuccess; }

class FakeSource final : public gpu::SymbolSource {
 public:
  void* get_proc(const char* name, int version) override {
    lib->requests.emplace_back(name, version);
    const std::string n = name;
    if (lib->missing.count(n)) return nullptr;
    // A real driver never answers a request above its own version with a pointer.
    if (version > lib->version) return nullptr;
    if (n == "cuDriverGetVersion") return reinterpret_cast<void*>(&fake_driver_get_version);
    if (n == "cuInit") return reinterpret_cast<void*>(&fake_init);
    if (n == "cuDeviceGetCount") return reinterpret_cast<void*>(&fake_device_get_count);
    if (n == "cuGetErrorName") return reinterpret_cast<void*>(&fake_error_name);
    if (n == "cuGetErrorString") return reinterpret_cast<void*>(&fake_error_string);
    if (n == "cuStreamCreateWithPriority") return reinterpret_cast<void*>(&fake_stream_create);
    return reinterpret_cast<void*>(&fake_other);
  }
};

class DriverLoad : public ::testing::Test {
 protected:
  void SetUp() override { lib = &state_; }
  void TearDown() override { lib = nullptr; }
  std::shared_ptr<gpu::DriverApi> load() { return gpu::load_driver(std::make_unique<FakeSource>()); }
  bool requested(const std::string& name) const {
    for (const auto& [n, v] : state_.requests) {
      if (n == name) return true;
    }
    return false;
  }
  FakeLib state_;
};

}  // namespace

TEST(SymbolTable, FollowsEnumOrderAndDeclaresGreenContextVersions) {
  const auto specs = gpu::symbol_specs();
  ASSERT_EQ(specs.size(), gpu::kSymCount);
  std::map<std::string, const gpu::SymbolSpec*> by_name;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(static_cast<std::size_t>(specs[i].sym), i);
    by_name[specs[i].name] = &specs[i];
  }
  EXPECT_EQ(by_name.at("cuGreenCtxCreate")->version, 12040);
  EXPECT_FALSE(by_name.at("cuGreenCtxCreate")->required);
  EXPECT_EQ(by_name.at("cuGreenCtxStreamCreate")->version, 12050);
  EXPECT_FALSE(by_name.at("cuGreenCtxStreamCreate")->required);
  EXPECT_TRUE(by_name.at("cuStreamCreateWithPriority")->required);
  // _v2 ABIs: 64-bit sizes and the modern context stack.
  EXPECT_EQ(by_name.at("cuMemGetInfo")->version, 3020);
  EXPECT_EQ(by_name.at("cuDevicePrimaryCtxRelease")->version, 11000);
  for (const auto& s : specs) {
    // Required symbols must exist on every driver that has cuGetProcAddress (11.3).
    if (s.required) {
      EXPECT_LE(s.version, 11030) << s.name;
    }
  }
}

TEST_F(DriverLoad, NewDriverResolvesEverythingAndInitialises) {
  auto d = load();
  const auto& st = d->status();
  EXPECT_TRUE(st.available) << st.reason;
  EXPECT_EQ(st.driver_version, 13000);
  EXPECT_EQ(st.device_count, 1);
  EXPECT_TRUE(st.green_contexts);
  EXPECT_TRUE(st.green_ctx_stream_create);
  EXPECT_TRUE(st.missing_optional.empty());
  EXPECT_EQ(state_.init_calls, 1);
  // Every symbol is asked for in the ABI version of its table row.
  for (const auto& s : gpu::symbol_specs()) {
    bool found = false;
    for (const auto& [n, v] : state_.requests) found |= (n == s.name && v == s.version);
    EXPECT_TRUE(found) << s.name;
  }
  // Calls go through the resolved pointer.
  cu::Stream stream = nullptr;
  ASSERT_EQ(d->stream_create_with_priority(&stream, cu::kStreamNonBlocking, -3), cu::kSuccess);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(stream), 0x5003u);
}

TEST_F(DriverLoad, Driver12_4HasGreenContextsButNotGreenStreams) {
  state_.version = 12040;
  auto d = load();
  const auto& st = d->status();
  ASSERT_TRUE(st.available) << st.reason;
  EXPECT_TRUE(st.green_contexts);
  EXPECT_FALSE(st.green_ctx_stream_create);
  EXPECT_EQ(st.missing_optional, std::vector<std::string>{"cuGreenCtxStreamCreate"});
  // Gated by version: never asked for, so the driver is not asked for an ABI it cannot know.
  EXPECT_FALSE(requested("cuGreenCtxStreamCreate"));
  cu::Stream s = nullptr;
  EXPECT_EQ(d->green_ctx_stream_create(&s, nullptr, cu::kStreamNonBlocking, 0),
            cu::kErrorNotSupported);
}

TEST_F(DriverLoad, Driver12_2FallsBackToNoGreenContexts) {
  state_.version = 12020;
  auto d = load();
  const auto& st = d->status();
  ASSERT_TRUE(st.available) << st.reason;
  EXPECT_FALSE(st.green_contexts);
  EXPECT_FALSE(st.green_ctx_stream_create);
  EXPECT_EQ(st.missing_optional.size(), 7u);
  EXPECT_FALSE(requested("cuGreenCtxCreate"));
  EXPECT_FALSE(requested("cuDevSmResourceSplitByCount"));
  cu::DevResource res{};
  EXPECT_EQ(d->device_get_dev_resource(0, &res, cu::kDevResourceTypeSm), cu::kErrorNotSupported);
}

TEST_F(DriverLoad, OneMissingGreenSymbolDisablesGreenContexts) {
  state_.missing = {"cuDevResourceGenerateDesc"};
  auto d = load();
  ASSERT_TRUE(d->status().available);
  EXPECT_FALSE(d->status().green_contexts);
  EXPECT_FALSE(d->status().green_ctx_stream_create);
  EXPECT_EQ(d->status().missing_optional,
            std::vector<std::string>{"cuDevResourceGenerateDesc"});
}

TEST_F(DriverLoad, MissingErrorStringsStillGiveANumericReason) {
  state_.missing = {"cuGetErrorName", "cuGetErrorString"};
  state_.init_result = cu::kErrorNoDevice;
  auto d = load();
  EXPECT_FALSE(d->status().available);
  EXPECT_EQ(d->status().reason, "cuInit failed: CUresult 100");
}

TEST_F(DriverLoad, MissingRequiredSymbolIsUnavailableWithItsName) {
  state_.missing = {"cuStreamCreateWithPriority"};
  auto d = load();
  const auto& st = d->status();
  EXPECT_FALSE(st.available);
  EXPECT_NE(st.reason.find("lacks required symbol cuStreamCreateWithPriority"), std::string::npos)
      << st.reason;
  EXPECT_NE(st.reason.find("13.0"), std::string::npos) << st.reason;
  EXPECT_EQ(state_.init_calls, 0) << "cuInit must not run on an unusable driver";
  cu::Stream s = nullptr;
  EXPECT_EQ(d->stream_create_with_priority(&s, 0, 0), cu::kErrorNotInitialized);
}

TEST_F(DriverLoad, MissingVersionQueryIsUnavailable) {
  state_.missing = {"cuDriverGetVersion"};
  auto d = load();
  EXPECT_FALSE(d->status().available);
  EXPECT_NE(d->status().reason.find("cuDriverGetVersion"), std::string::npos);
}

TEST_F(DriverLoad, InitFailureIsUnavailableWithTheDriversWords) {
  state_.init_result = cu::kErrorNoDevice;
  auto d = load();
  EXPECT_FALSE(d->status().available);
  EXPECT_EQ(d->status().reason,
            "cuInit failed: CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)");
}

TEST_F(DriverLoad, StubLibrarySaysItIsNotADriver) {
  state_.init_result = cu::kErrorStubLibrary;
  auto d = load();
  EXPECT_FALSE(d->status().available);
  EXPECT_NE(d->status().reason.find("link-time stub, not a driver"), std::string::npos)
      << d->status().reason;
}

TEST_F(DriverLoad, ZeroDevicesIsUnavailable) {
  state_.devices = 0;
  auto d = load();
  EXPECT_FALSE(d->status().available);
  EXPECT_NE(d->status().reason.find("no CUDA device"), std::string::npos) << d->status().reason;
}

TEST(DriverLoadNoSource, NullSourceIsUnavailable) {
  auto d = gpu::load_driver(nullptr);
  EXPECT_FALSE(d->status().available);
  EXPECT_FALSE(d->status().reason.empty());
}

TEST(DriverLibrary, MissingLibraryGivesAReasonNamingIt) {
  std::string reason;
  auto src = gpu::open_driver_library("libapportion-no-such-driver.so.1", reason);
  EXPECT_EQ(src, nullptr);
  EXPECT_NE(reason.find("libapportion-no-such-driver.so.1"), std::string::npos) << reason;
}

TEST(DriverLibrary, LibraryWithoutGetProcAddressIsRejected) {
  // libm is always present and certainly has no cuGetProcAddress.
  std::string reason;
  auto src = gpu::open_driver_library("libm.so.6", reason);
  EXPECT_EQ(src, nullptr);
  EXPECT_NE(reason.find("cuGetProcAddress"), std::string::npos) << reason;
}

TEST(SystemDriver, NeverThrowsAndExplainsWhenUnavailable) {
  auto d = gpu::system_driver();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d.get(), gpu::system_driver().get()) << "loaded once per process";
  const auto& st = d->status();
  if (st.available) {
    EXPECT_GT(st.device_count, 0);
    EXPECT_GE(st.driver_version, 11030);
    std::string error;
    auto devices = gpu::describe_devices(*d, error);
    ASSERT_EQ(static_cast<int>(devices.size()), st.device_count) << error;
    EXPECT_GT(devices[0].sm_count, 0);
    EXPECT_GE(devices[0].priority_least, devices[0].priority_greatest);
  } else {
    EXPECT_FALSE(st.reason.empty());
    std::string error;
    EXPECT_TRUE(gpu::describe_devices(*d, error).empty());
    EXPECT_EQ(error, st.reason);
  }
}

TEST(SystemDriver, UnavailableHereBecauseThisMachineHasNoDriver) {
  if (std::getenv("APPORTION_EXPECT_GPU")) GTEST_SKIP() << "a GPU is expected on this machine";
  std::string reason;
  auto src = gpu::open_driver_library("libcuda.so.1", reason);
  if (src) GTEST_SKIP() << "libcuda.so.1 is installed here";
  const auto& st = gpu::system_driver()->status();
  EXPECT_FALSE(st.available);
  EXPECT_NE(st.reason.find("libcuda.so.1"), std::string::npos) << st.reason;
}

TEST(UnavailableDriver, AnswersEveryCallWithNotInitialized) {
  auto d = gpu::unavailable_driver("because");
  EXPECT_FALSE(d->status().available);
  EXPECT_EQ(d->status().reason, "because");
  cu::Context c = nullptr;
  EXPECT_EQ(d->primary_ctx_retain(&c, 0), cu::kErrorNotInitialized);
}

TEST(DescribeDevice, ReadsAttributesPrioritiesMemoryAndSplitConstraints) {
  auto h200 = *gpu::described_device("h200");
  h200.free_memory = h200.total_memory - (1ull << 30);
  gpu::testing::FakeDriver fake({h200});
  std::string error;
  auto d = gpu::describe_device(fake, 0, error);
  ASSERT_TRUE(d) << error;
  EXPECT_EQ(d->name, "NVIDIA H200");
  EXPECT_EQ(d->sm_count, 132);
  EXPECT_EQ(d->cc_major, 9);
  EXPECT_EQ(d->priority_least, 0);
  EXPECT_EQ(d->priority_greatest, -5);
  EXPECT_EQ(d->min_sm_partition, 8);
  EXPECT_EQ(d->sm_alignment, 8);
  EXPECT_TRUE(d->green_contexts);
  EXPECT_EQ(d->total_memory, h200.total_memory);
  EXPECT_EQ(d->free_memory, h200.free_memory);
  // The primary context it needed is released and the thread's context stack restored.
  EXPECT_EQ(fake.primary_refs[0], 0);
  EXPECT_TRUE(fake.ctx_stack.empty());
}

TEST(DescribeDevice, OldDriverUsesTheArchitectureGuideline) {
  auto v100 = *gpu::described_device("v100-cuda12.2");
  gpu::testing::FakeDriver fake({v100});
  std::string error;
  auto d = gpu::describe_device(fake, 0, error);
  ASSERT_TRUE(d) << error;
  EXPECT_FALSE(d->green_contexts);
  EXPECT_EQ(d->min_sm_partition, 2);
  EXPECT_EQ(d->sm_alignment, 2);
  EXPECT_EQ(fake.count("cuDeviceGetDevResource"), 0) << "not asked without green contexts";
}

TEST(DescribeDevice, FailureNamesTheCallAndReleasesNothingItDidNotRetain) {
  gpu::testing::FakeDriver fake({*gpu::described_device("a100")});
  fake.fail("cuDeviceGetAttribute", cu::kErrorInvalidDevice);
  std::string error;
  EXPECT_FALSE(gpu::describe_device(fake, 0, error));
  EXPECT_NE(error.find("cuDeviceGetAttribute"), std::string::npos) << error;
  EXPECT_EQ(fake.count("cuDevicePrimaryCtxRelease"), 0);
}

TEST(DescribedDevices, PresetsMatchTheirChips) {
  auto names = gpu::described_device_names();
  ASSERT_EQ(names.size(), 4u);
  for (const auto& n : names) ASSERT_TRUE(gpu::described_device(n)) << n;
  EXPECT_FALSE(gpu::described_device("tpu"));
  auto h200 = *gpu::described_device("h200", 3);
  EXPECT_EQ(h200.ordinal, 3);
  EXPECT_EQ(h200.sm_granularity(), 8);
  EXPECT_EQ(h200.sm_units(), 16);
  EXPECT_GT(h200.total_memory, 140ull * 1000 * 1000 * 1000);
  EXPECT_EQ(gpu::described_device("h100")->sm_count, 132);
  auto a100 = *gpu::described_device("a100");
  EXPECT_EQ(a100.sm_count, 108);
  EXPECT_EQ(a100.sm_alignment, 2);
  EXPECT_EQ(a100.sm_granularity(), 4);  // minimum 4, a multiple of 2
  EXPECT_EQ(a100.sm_units(), 27);
  EXPECT_FALSE(gpu::described_device("v100-cuda12.2")->green_contexts);
  EXPECT_NE(gpu::to_string(h200).find("units of 8"), std::string::npos);
}

TEST(DescribedDevices, GranularityRoundsTheMinimumUpToTheAlignment) {
  gpu::DeviceInfo d;
  d.sm_count = 100;
  d.min_sm_partition = 6;
  d.sm_alignment = 4;
  EXPECT_EQ(d.sm_granularity(), 8);
  d.min_sm_partition = 0;  // unknown
  d.sm_alignment = 0;
  EXPECT_EQ(d.sm_granularity(), 1);
  // Extreme described values: no int overflow (it made a granularity of 0, and sm_units()
  // divided by it: SIGFPE from Python's plan_gpus).
  d.sm_alignment = std::numeric_limits<int>::max();
  EXPECT_EQ(d.sm_granularity(), std::numeric_limits<int>::max());
  EXPECT_EQ(d.sm_units(), 0);
  d.min_sm_partition = std::numeric_limits<int>::max();
  d.sm_alignment = 2;
  EXPECT_EQ(d.sm_granularity(), std::numeric_limits<int>::max());  // 2**31 rounded, held at INT_MAX
  EXPECT_EQ(d.sm_units(), 0);
  d.min_sm_partition = -5;
  d.sm_alignment = -3;
  EXPECT_EQ(d.sm_granularity(), 1);
  EXPECT_EQ(gpu::sm_split_guideline(9), std::make_pair(8, 8));
  EXPECT_EQ(gpu::sm_split_guideline(8), std::make_pair(4, 2));
  EXPECT_EQ(gpu::sm_split_guideline(7), std::make_pair(2, 2));
}
