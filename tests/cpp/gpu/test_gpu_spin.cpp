// The spin kernel's host wrapper. Without a CUDA device (or without CUDA in the build) the tests
// skip and say why; with one they check the kernel really occupies the blocks and SMs it was
// given, in streams from the partitioner (primary context and green contexts).
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "apportion/gpu/partitioner.hpp"

#if defined(APPORTION_WITH_CUDA)
#include "apportion/gpu/spin.hpp"

namespace gpu = apportion::gpu;

namespace {

// GTEST_SKIP in SetUp skips the whole test (in a helper it would only return from the helper).
class SpinOnDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu::spin_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device is present (" << gpu::system_driver()->status().reason
                   << ")";
    }
  }
};

}  // namespace

TEST(Spin, DeviceCountNeverThrows) {
  const int n = gpu::spin_device_count();
  EXPECT_GE(n, 0);
  EXPECT_EQ(n > 0, gpu::system_driver()->status().available);
}

TEST_F(SpinOnDevice, InvalidArgumentsAreRejectedBeforeLaunch) {
  EXPECT_NE(gpu::launch_spin(0, 10.0, 0, nullptr), 0);
  EXPECT_NE(gpu::launch_spin(0, 10.0, 1, nullptr, 2048), 0);
  EXPECT_NE(gpu::launch_spin(0, -1.0, 1, nullptr), 0);
}

TEST_F(SpinOnDevice, RecordsTheSmOfEveryBlockAndRunsAtLeastItsTime) {
  gpu::SpinBuffer ids(64);
  ASSERT_EQ(gpu::launch_spin(0, 200.0, 64, ids.data()), 0);
  ASSERT_EQ(gpu::spin_stream_synchronize(0), 0);
  std::string error;
  auto info = gpu::describe_device(*gpu::system_driver(), 0, error);
  ASSERT_TRUE(info) << error;
  const auto sms = ids.read();
  std::set<int> distinct(sms.begin(), sms.end());
  EXPECT_GT(distinct.size(), 1u) << "64 blocks spread over more than one SM";
  auto times = gpu::time_spins(0, 500.0, 4, 32, 3);
  ASSERT_EQ(times.micros.size(), 3u);
  for (double t : times.micros) EXPECT_GE(t, 500.0);
  EXPECT_FALSE(times.sm_ids.empty());
}

TEST_F(SpinOnDevice, GreenContextStreamsStayOnDisjointSms) {
  auto driver = gpu::system_driver();
  std::string error;
  auto info = gpu::describe_device(*driver, 0, error);
  ASSERT_TRUE(info) << error;
  if (!info->green_contexts) GTEST_SKIP() << "the driver cannot build green contexts";
  const int unit = info->sm_granularity();
  gpu::GpuQuota a;
  a.model = "a";
  a.sm_count = 2 * unit;
  gpu::GpuQuota b;
  b.model = "b";
  b.sm_count = 4 * unit;
  auto plan = gpu::plan_gpus(std::vector{a, b}, std::vector{*info});
  gpu::GpuPartition part(driver, plan);
  ASSERT_TRUE(part.warnings().empty()) << part.warnings()[0];
  auto ta = gpu::time_spins(part.find("a")->streams[0], 100.0, 8 * a.sm_count, 32, 5);
  auto tb = gpu::time_spins(part.find("b")->streams[0], 100.0, 8 * b.sm_count, 32, 5);
  EXPECT_LE(static_cast<int>(ta.sm_ids.size()), a.sm_count);
  EXPECT_LE(static_cast<int>(tb.sm_ids.size()), b.sm_count);
  std::vector<int> both;
  std::set_intersection(ta.sm_ids.begin(), ta.sm_ids.end(), tb.sm_ids.begin(), tb.sm_ids.end(),
                        std::back_inserter(both));
  EXPECT_TRUE(both.empty()) << "SM groups overlap on " << both.size() << " SMs";
  part.close();
}

TEST_F(SpinOnDevice, FloodKeepsItsStreamBusyUntilStopped) {
  gpu::SpinFlood flood(0, 100.0, 4, 32);
  // The constructor returned with the first batch queued, so this is never a race with stop().
  EXPECT_GT(flood.kernels(), 0u);
  auto t = gpu::time_spins(0, 10.0, 1, 32, 1);  // same stream: waits behind the flood
  flood.stop();
  ASSERT_EQ(t.micros.size(), 1u);
  EXPECT_FALSE(flood.sm_ids().empty());
}

TEST_F(SpinOnDevice, FloodStoppedAtOnceStillRanAndReportsABadLaunch) {
  {
    gpu::SpinFlood flood(0, 10.0, 1, 32);
    flood.stop();
    EXPECT_GT(flood.kernels(), 0u);
  }
  gpu::SpinFlood bad(0, 10.0, 1, 4096);  // more threads than a block may have
  EXPECT_EQ(bad.kernels(), 0u);
  EXPECT_THROW(bad.stop(), std::runtime_error);
}

#else

TEST(Spin, NotBuiltWithoutCuda) {
  GTEST_SKIP() << "built without CUDA (APPORTION_WITH_CUDA=OFF): no spin kernel";
}

#endif
