// The partition plan on described devices: SM group arithmetic, priority mapping and clamping,
// memory budgets, over-subscription errors and determinism. No driver involved.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "apportion/gpu/partition.hpp"

namespace gpu = apportion::gpu;

namespace {

constexpr std::uint64_t GiB = 1ull << 30;

gpu::DeviceInfo device(const char* name, int ordinal = 0) {
  return *gpu::described_device(name, ordinal);
}

gpu::GpuQuota quota(std::string model, int sm_count = 0, double share = 0.0) {
  gpu::GpuQuota q;
  q.model = std::move(model);
  q.sm_count = sm_count;
  q.sm_share = share;
  return q;
}

bool has_note(const gpu::GpuPlan& plan, const std::string& part) {
  for (const auto& n : plan.notes) {
    if (n.find(part) != std::string::npos) return true;
  }
  return false;
}

template <class F>
std::string placement_error(F f) {
  try {
    f();
  } catch (const gpu::GpuPlacementError& e) {
    return e.what();
  }
  return "<no GpuPlacementError>";
}

}  // namespace

TEST(GpuPlan, SixGroupsOfElevenOnHopperBecomeSixteenWithTheRemainderReported) {
  std::vector<gpu::GpuQuota> qs;
  for (int i = 0; i < 6; ++i) qs.push_back(quota("m" + std::to_string(i), 11));
  const std::vector<gpu::DeviceInfo> devs{device("h200")};
  auto plan = gpu::plan_gpus(qs, devs);
  ASSERT_EQ(plan.models.size(), 6u);
  for (int i = 0; i < 6; ++i) {
    const auto& m = plan.models[static_cast<std::size_t>(i)];
    EXPECT_EQ(m.sm_asked, 11);
    EXPECT_EQ(m.sm_count, 16);
    EXPECT_TRUE(m.sm_rounded);
    EXPECT_EQ(m.sm_units, (std::vector<int>{2 * i, 2 * i + 1})) << m.model;
    EXPECT_FALSE(m.sm_overlaps);
  }
  const auto& d = plan.devices.at(0);
  EXPECT_EQ(d.granularity, 8);
  EXPECT_EQ(d.units, 16);
  EXPECT_EQ(d.sm_grouped, 96);
  EXPECT_EQ(d.sm_unassigned, 36);
  EXPECT_TRUE(has_note(plan, "'m0': asked for 11 SMs, gets 16"));
  EXPECT_TRUE(has_note(plan, "36 of 132 SMs are in no group (32 in spare units, 4 outside"));
  const std::string text = plan.to_string();
  EXPECT_NE(text.find("16 [units 0-1]"), std::string::npos) << text;
  EXPECT_NE(text.find("in no group: 36 SMs"), std::string::npos) << text;
}

TEST(GpuPlan, ShareResolvesAgainstTheDevicesSmCount) {
  // 0.25 of 132 is 33 -> 40 on Hopper; on an A100 (units of 4) 0.25 of 108 is exactly 27 -> 28.
  auto h = gpu::plan_gpus(std::vector{quota("a", 0, 0.25)}, std::vector{device("h100")});
  EXPECT_EQ(h.models[0].sm_asked, 33);
  EXPECT_EQ(h.models[0].sm_count, 40);
  auto a = gpu::plan_gpus(std::vector{quota("a", 0, 0.25)}, std::vector{device("a100")});
  EXPECT_EQ(a.models[0].sm_asked, 27);
  EXPECT_EQ(a.models[0].sm_count, 28);
  EXPECT_EQ(a.devices[0].units, 27);
  // An exact multiple is not reported as rounded.
  auto exact = gpu::plan_gpus(std::vector{quota("a", 64)}, std::vector{device("h200")});
  EXPECT_FALSE(exact.models[0].sm_rounded);
  EXPECT_TRUE(exact.notes.size() == 1u) << "only the unassigned-SM note";
}

TEST(GpuPlan, WholeDeviceShareIsCappedAtWhatOneSplitCanGroup) {
  auto plan = gpu::plan_gpus(std::vector{quota("all", 0, 1.0)}, std::vector{device("h200")});
  EXPECT_EQ(plan.models[0].sm_asked, 132);
  EXPECT_EQ(plan.models[0].sm_count, 128);
  EXPECT_TRUE(plan.models[0].sm_rounded);
  auto strict = quota("all", 0, 1.0);
  strict.strict = true;
  EXPECT_NE(placement_error([&] {
              gpu::plan_gpus(std::vector{strict}, std::vector{device("h200")});
            }).find("largest SM group device 0 can build is 128 SMs"),
            std::string::npos);
}

TEST(GpuPlan, SmOverSubscriptionSaysWhatIsLeft) {
  std::vector qs{quota("big", 100), quota("small", 40)};
  const std::string e =
      placement_error([&] { gpu::plan_gpus(qs, std::vector{device("h200")}); });
  EXPECT_NE(e.find("model 'small' asks for 40 SMs"), std::string::npos) << e;
  EXPECT_NE(e.find("only 24 of 128 groupable SMs are left"), std::string::npos) << e;
  EXPECT_NE(e.find("big 104"), std::string::npos) << e;
  EXPECT_NE(e.find("allow_overlap"), std::string::npos) << e;
}

TEST(GpuPlan, MoreSmsThanTheDeviceHasIsAnError) {
  const std::string e = placement_error(
      [] { gpu::plan_gpus(std::vector{quota("x", 200)}, std::vector{device("a100")}); });
  EXPECT_NE(e.find("asks for 200 SMs on device 0"), std::string::npos) << e;
  EXPECT_NE(e.find("which has 108"), std::string::npos) << e;
}

TEST(GpuPlan, OverlapTakesSpareUnitsFirstThenSharesDeterministically) {
  auto over = quota("over", 48);
  over.allow_overlap = true;
  std::vector qs{over, quota("big", 100)};  // the overlapping one is planned after exclusives
  auto plan = gpu::plan_gpus(qs, std::vector{device("h200")});
  const auto* big = plan.find("big");
  const auto* ov = plan.find("over");
  ASSERT_TRUE(big && ov);
  EXPECT_EQ(big->sm_units.front(), 0);
  EXPECT_EQ(big->sm_count, 104);  // units 0..12
  EXPECT_EQ(ov->sm_count, 48);
  EXPECT_EQ(ov->sm_units, (std::vector<int>{0, 1, 2, 13, 14, 15}));
  EXPECT_TRUE(ov->sm_overlaps);
  EXPECT_FALSE(big->sm_overlaps);
  EXPECT_TRUE(has_note(plan, "'over': its SM group overlaps"));
  EXPECT_EQ(plan.devices[0].sm_unassigned, 4);
  // Same inputs, same plan.
  auto again = gpu::plan_gpus(qs, std::vector{device("h200")});
  EXPECT_EQ(again.to_string(), plan.to_string());
}

TEST(GpuPlan, PriorityClassesMapOntoTheDeviceRange) {
  auto hi = quota("hi");
  hi.priority = gpu::GpuPriority::high();
  auto no = quota("no");
  auto lo = quota("lo");
  lo.priority = gpu::GpuPriority::low();
  auto plan = gpu::plan_gpus(std::vector{hi, no, lo}, std::vector{device("h200")});
  EXPECT_EQ(plan.find("hi")->priority, -5);
  EXPECT_EQ(plan.find("no")->priority, -2);
  EXPECT_EQ(plan.find("lo")->priority, 0);
  for (const auto& m : plan.models) EXPECT_FALSE(m.priority_clamped);
  EXPECT_EQ(plan.find("hi")->priority_asked, "high");
  // A device with a range of one step: normal and low coincide at the least priority.
  auto narrow = device("h200");
  narrow.priority_greatest = -1;
  auto p2 = gpu::plan_gpus(std::vector{hi, no, lo}, std::vector{narrow});
  EXPECT_EQ(p2.find("hi")->priority, -1);
  EXPECT_EQ(p2.find("no")->priority, 0);
}

TEST(GpuPlan, IntegerPrioritiesAreClampedAndReported) {
  auto a = quota("a");
  a.priority = gpu::GpuPriority::of(-9);
  auto b = quota("b");
  b.priority = gpu::GpuPriority::of(3);
  auto c = quota("c");
  c.priority = gpu::GpuPriority::of(-4);
  auto plan = gpu::plan_gpus(std::vector{a, b, c}, std::vector{device("a100")});
  EXPECT_EQ(plan.find("a")->priority, -5);
  EXPECT_TRUE(plan.find("a")->priority_clamped);
  EXPECT_EQ(plan.find("b")->priority, 0);
  EXPECT_TRUE(plan.find("b")->priority_clamped);
  EXPECT_EQ(plan.find("c")->priority, -4);
  EXPECT_FALSE(plan.find("c")->priority_clamped);
  EXPECT_TRUE(has_note(plan, "model 'a': priority -9 is outside device 0's range [0, -5]; "
                             "clamped to -5"));
  EXPECT_NE(plan.to_string().find("-5 (-9, clamped)"), std::string::npos) << plan.to_string();
}

TEST(GpuPlan, MemoryBudgetsMustFitUnlessOverlapping) {
  auto a = quota("a");
  a.memory = 60 * GiB;
  auto b = quota("b");
  b.memory = 30 * GiB;
  const std::vector devs{device("h100")};  // 81559 MiB
  const std::string e = placement_error([&] { gpu::plan_gpus(std::vector{a, b}, devs); });
  EXPECT_NE(e.find("model 'b' asks for 30.0 GiB of GPU memory on device 0"), std::string::npos)
      << e;
  EXPECT_NE(e.find("only 19.6 GiB is left of 79.6 GiB"), std::string::npos) << e;
  EXPECT_NE(e.find("held: a 60.0 GiB"), std::string::npos) << e;

  b.allow_overlap = true;
  auto plan = gpu::plan_gpus(std::vector{a, b}, devs);
  EXPECT_EQ(plan.find("b")->memory, 30 * GiB);
  EXPECT_EQ(plan.devices[0].memory_assigned, 60 * GiB) << "overlapping budgets are not summed";
  b.memory = 90 * GiB;  // larger than the device, overlap or not
  EXPECT_NE(placement_error([&] { gpu::plan_gpus(std::vector{a, b}, devs); })
                .find("model 'b' asks for 90.0 GiB"),
            std::string::npos);
}

TEST(GpuPlan, MemoryIsCheckedAgainstFreeMemoryOfALiveDevice) {
  auto d = device("h200");
  d.free_memory = 10 * GiB;
  auto a = quota("a");
  a.memory = 12 * GiB;
  EXPECT_NE(placement_error([&] { gpu::plan_gpus(std::vector{a}, std::vector{d}); })
                .find("only 10.0 GiB is left of 10.0 GiB"),
            std::string::npos);
}

TEST(GpuPlan, ModelsOnDifferentDevicesDoNotCompete) {
  auto a = quota("a", 128);
  auto b = quota("b", 128);
  b.device = 1;
  auto plan = gpu::plan_gpus(std::vector{a, b}, std::vector{device("h200", 0), device("h200", 1)});
  EXPECT_EQ(plan.find("a")->sm_units, plan.find("b")->sm_units);
  EXPECT_EQ(plan.device(1)->sm_grouped, 128);
}

TEST(GpuPlan, MissingDeviceIsAPlacementErrorListingTheDevices) {
  auto a = quota("a");
  a.device = 2;
  const std::string e = placement_error(
      [&] { gpu::plan_gpus(std::vector{a}, std::vector{device("h200", 0), device("h200", 1)}); });
  EXPECT_EQ(e, "model 'a' asks for GPU 2 but the devices are 0 1");
  const std::string none =
      placement_error([&] { gpu::plan_gpus(std::vector{a}, std::vector<gpu::DeviceInfo>{}); });
  EXPECT_NE(none.find("no GPU is present"), std::string::npos);
}

TEST(GpuPlan, DeviceWithoutGreenContextsFallsBackOrFailsWhenStrict) {
  auto a = quota("a", 0, 0.5);
  auto plan = gpu::plan_gpus(std::vector{a}, std::vector{device("v100-cuda12.2")});
  EXPECT_EQ(plan.models[0].sm_asked, 40);
  EXPECT_EQ(plan.models[0].sm_count, 0);
  EXPECT_TRUE(plan.models[0].sm_units.empty());
  EXPECT_TRUE(has_note(plan, "no green contexts (driver 12.2); it gets priority-only streams"));
  EXPECT_NE(plan.to_string().find("all (asked 40)"), std::string::npos);
  a.strict = true;
  const std::string e = placement_error(
      [&] { gpu::plan_gpus(std::vector{a}, std::vector{device("v100-cuda12.2")}); });
  EXPECT_NE(e.find("strict=True"), std::string::npos) << e;
  EXPECT_NE(e.find("CUDA 12.4+"), std::string::npos) << e;
}

TEST(GpuPlan, InvalidQuotasNameModelAndField) {
  const std::vector devs{device("h200")};
  auto field_of = [&](gpu::GpuQuota q) -> std::string {
    try {
      gpu::plan_gpus(std::vector{q}, devs);
    } catch (const gpu::GpuQuotaError& e) {
      EXPECT_EQ(e.model(), q.model);
      EXPECT_NE(std::string(e.what()).find("model '" + q.model + "'"), std::string::npos)
          << e.what();
      return e.field();
    }
    return "<none>";
  };
  auto q = quota("m");
  q.streams = 0;
  EXPECT_EQ(field_of(q), "streams");
  q = quota("m", 0, 1.5);
  EXPECT_EQ(field_of(q), "sm_share");
  q = quota("m", 0, -0.1);
  EXPECT_EQ(field_of(q), "sm_share");
  q = quota("m", 8, 0.5);
  EXPECT_EQ(field_of(q), "sm_share");
  q = quota("m", -1);
  EXPECT_EQ(field_of(q), "sm_count");
  q = quota("m");
  q.device = -1;
  EXPECT_EQ(field_of(q), "device");
  EXPECT_THROW(gpu::plan_gpus(std::vector{quota("d"), quota("d")}, devs), gpu::GpuQuotaError);
}

TEST(GpuPlan, NoSmAskSharesTheWholeGpu) {
  auto plan = gpu::plan_gpus(std::vector{quota("a"), quota("b")}, std::vector{device("h200")});
  for (const auto& m : plan.models) {
    EXPECT_EQ(m.sm_count, 0);
    EXPECT_EQ(m.streams, 1);
  }
  EXPECT_TRUE(plan.notes.empty());
  EXPECT_NE(plan.to_string().find("all (shared)"), std::string::npos);
}
