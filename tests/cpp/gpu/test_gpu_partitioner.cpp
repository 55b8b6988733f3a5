// Realising a plan against a recording fake driver: what is created (primary context, streams
// with the planned priorities, green contexts over the planned units), the fallbacks, and that
// close() destroys everything exactly once, in reverse order.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "apportion/gpu/partitioner.hpp"
#include "fake_driver.hpp"

namespace gpu = apportion::gpu;
namespace cu = apportion::gpu::cu;
using gpu::testing::FakeDriver;

namespace {

gpu::DeviceInfo device(const char* name, int ordinal = 0) {
  return *gpu::described_device(name, ordinal);
}

gpu::GpuQuota quota(std::string model, int sm_count, gpu::GpuPriority prio, int streams = 1) {
  gpu::GpuQuota q;
  q.model = std::move(model);
  q.sm_count = sm_count;
  q.priority = prio;
  q.streams = streams;
  return q;
}

// Every create has its destroy, nothing is left current, and no destroy came before a create.
void expect_balanced(const FakeDriver& fake) {
  EXPECT_TRUE(fake.live_streams.empty());
  EXPECT_TRUE(fake.live_green.empty());
  for (const auto& [dev, refs] : fake.primary_refs) EXPECT_EQ(refs, 0) << "device " << dev;
  EXPECT_TRUE(fake.ctx_stack.empty()) << "a context was left pushed";
  EXPECT_EQ(fake.count_ok("cuStreamCreateWithPriority") + fake.count_ok("cuGreenCtxStreamCreate"),
            fake.count("cuStreamDestroy"));
  EXPECT_EQ(fake.count_ok("cuGreenCtxCreate"), fake.count("cuGreenCtxDestroy"));
  EXPECT_EQ(fake.count_ok("cuDevicePrimaryCtxRetain"), fake.count("cuDevicePrimaryCtxRelease"));
  for (const auto& entry : fake.log) {
    if (entry.rfind("cuStreamDestroy", 0) == 0 || entry.rfind("cuGreenCtxDestroy", 0) == 0) {
      EXPECT_FALSE(entry.ends_with(" FAILED"));
    }
  }
}

}  // namespace

TEST(GpuPartition, StreamsWithPlannedPrioritiesAndGreenContextsOverPlannedUnits) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")});
  const std::vector devs{device("h200")};
  auto plan = gpu::plan_gpus(
      std::vector{quota("victim", 16, gpu::GpuPriority::high(), 2),
                  quota("aggressor", 100, gpu::GpuPriority::low()),
                  quota("shared", 0, gpu::GpuPriority::normal(), 3)},
      devs);
  {
    gpu::GpuPartition part(fake, plan);
    EXPECT_TRUE(part.warnings().empty());
    const auto* v = part.find("victim");
    const auto* a = part.find("aggressor");
    const auto* s = part.find("shared");
    ASSERT_TRUE(v && a && s);
    EXPECT_TRUE(v->green_context);
    EXPECT_EQ(v->sm_count, 16);
    EXPECT_EQ(v->streams.size(), 2u);
    EXPECT_EQ(v->priority, -5);
    EXPECT_TRUE(a->green_context);
    EXPECT_EQ(a->sm_count, 104);
    EXPECT_FALSE(s->green_context);
    EXPECT_EQ(s->sm_count, 0);
    EXPECT_EQ(s->streams.size(), 3u);
    EXPECT_EQ(s->context, FakeDriver::primary_handle(0));

    // One split of the whole device into units of 8; each green context over its own units.
    EXPECT_EQ(fake->count("cuDevSmResourceSplitByCount(min=8"), 2);  // query + split
    ASSERT_EQ(fake->green_units.size(), 2u);
    std::vector<std::vector<int>> groups;
    for (const auto& [g, units] : fake->green_units) groups.push_back(units);
    std::sort(groups.begin(), groups.end(),
              [](const auto& x, const auto& y) { return x.size() < y.size(); });
    EXPECT_EQ(groups[0], plan.find("victim")->sm_units);
    EXPECT_EQ(groups[1], plan.find("aggressor")->sm_units);

    // Green streams through cuGreenCtxStreamCreate (12.5+), all non-blocking, right priority.
    EXPECT_EQ(fake->count("cuGreenCtxStreamCreate(flags=1,prio=-5)"), 2);
    EXPECT_EQ(fake->count("cuGreenCtxStreamCreate(flags=1,prio=0)"), 1);
    EXPECT_EQ(fake->count("cuStreamCreateWithPriority(flags=1,prio=-2)"), 3);
    EXPECT_EQ(fake->count("cuGreenCtxCreate(flags=1)"), 2);  // CU_GREEN_CTX_DEFAULT_STREAM
    for (auto h : v->streams) EXPECT_EQ(fake->stream_ctx.at(h), v->context);
    for (auto h : s->streams) EXPECT_EQ(fake->stream_ctx.at(h), FakeDriver::primary_handle(0));
    EXPECT_EQ(fake->live_streams.size(), 6u);
    EXPECT_EQ(fake->primary_refs[0], 1);
    EXPECT_TRUE(fake->ctx_stack.empty()) << "construction leaves the caller's context alone";
  }  // the destructor closes
  expect_balanced(*fake);
}

TEST(GpuPartition, CloseDestroysInReverseOrderAndIsIdempotent) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h100")});
  auto plan = gpu::plan_gpus(std::vector{quota("a", 8, gpu::GpuPriority::high(), 2)},
                             std::vector{device("h100")});
  gpu::GpuPartition part(fake, plan);
  const std::size_t created = fake->log.size();
  part.close();
  EXPECT_TRUE(part.closed());
  EXPECT_TRUE(part.find("a")->streams.empty());
  std::vector<std::string> teardown(fake->log.begin() + static_cast<std::ptrdiff_t>(created),
                                    fake->log.end());
  EXPECT_EQ(teardown, (std::vector<std::string>{"cuStreamDestroy", "cuStreamDestroy",
                                                "cuGreenCtxDestroy",
                                                "cuDevicePrimaryCtxRelease(0)"}));
  const std::size_t after = fake->log.size();
  part.close();
  EXPECT_EQ(fake->log.size(), after) << "a second close() touches nothing";
  expect_balanced(*fake);
  EXPECT_TRUE(part.warnings().empty());
}

TEST(GpuPartition, Driver12_4CreatesGreenStreamsWithTheGreenContextCurrent) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")},
                                           /*stream_create_12_5=*/false);
  auto plan = gpu::plan_gpus(std::vector{quota("a", 24, gpu::GpuPriority::of(-1))},
                             std::vector{device("h200")});
  {
    gpu::GpuPartition part(fake, plan);
    const auto* a = part.find("a");
    ASSERT_EQ(a->streams.size(), 1u);
    EXPECT_TRUE(a->green_context);
    EXPECT_EQ(fake->count("cuGreenCtxStreamCreate"), 0);
    EXPECT_EQ(fake->count("cuStreamCreateWithPriority(flags=1,prio=-1)"), 1);
    EXPECT_EQ(fake->stream_ctx.at(a->streams[0]), a->context);
    EXPECT_NE(a->context, FakeDriver::primary_handle(0));
  }
  expect_balanced(*fake);
}

TEST(GpuPartition, NoGreenContextsFallsBackWithAWarning) {
  auto old = device("v100-cuda12.2");
  auto fake = std::make_shared<FakeDriver>(std::vector{old});
  // A plan made for a Hopper running on a driver without green contexts (e.g. the plan came
  // from a described device); the realisation must not trust the plan's SM groups.
  auto plan = gpu::plan_gpus(std::vector{quota("a", 16, gpu::GpuPriority::high())},
                             std::vector{device("h200")});
  {
    gpu::GpuPartition part(fake, plan);
    const auto* a = part.find("a");
    EXPECT_FALSE(a->green_context);
    EXPECT_EQ(a->sm_count, 0);
    ASSERT_EQ(a->streams.size(), 1u);
    ASSERT_EQ(part.warnings().size(), 1u);
    EXPECT_NE(part.warnings()[0].find("cannot build green contexts"), std::string::npos);
    EXPECT_NE(part.warnings()[0].find("priority-only streams"), std::string::npos);
    EXPECT_EQ(fake->count("cuStreamCreateWithPriority(flags=1,prio=-5)"), 1);
  }
  expect_balanced(*fake);
}

TEST(GpuPartition, StrictModelFailsAndNothingSurvives) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")});
  fake->fail("cuGreenCtxCreate", cu::kErrorInvalidResourceConfiguration, 2);
  auto strict = quota("b", 16, gpu::GpuPriority::low());
  strict.strict = true;
  auto plan = gpu::plan_gpus(std::vector{quota("a", 16, gpu::GpuPriority::high()), strict},
                             std::vector{device("h200")});
  try {
    gpu::GpuPartition part(fake, plan);
    FAIL() << "expected GpuPlacementError";
  } catch (const gpu::GpuPlacementError& e) {
    EXPECT_EQ(e.model(), "b");
    EXPECT_NE(std::string(e.what()).find("strict=True"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("FAKE_ERROR_915"), std::string::npos) << e.what();
  }
  EXPECT_EQ(fake->count("cuGreenCtxCreate"), 2);
  expect_balanced(*fake);
}

TEST(GpuPartition, NonStrictGreenFailureFallsBackForThatModelOnly) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")});
  fake->fail("cuGreenCtxCreate", cu::kErrorOutOfMemory, 2);
  auto plan = gpu::plan_gpus(std::vector{quota("a", 16, gpu::GpuPriority::high()),
                                         quota("b", 16, gpu::GpuPriority::low())},
                             std::vector{device("h200")});
  {
    gpu::GpuPartition part(fake, plan);
    EXPECT_TRUE(part.find("a")->green_context);
    EXPECT_FALSE(part.find("b")->green_context);
    ASSERT_EQ(part.warnings().size(), 1u);
    EXPECT_NE(part.warnings()[0].find("model 'b'"), std::string::npos);
  }
  expect_balanced(*fake);
}

TEST(GpuPartition, FewerUnitsFromTheDriverThanPlannedFallsBack) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")});
  fake->limit_split_units(12);  // e.g. cluster constraints
  auto plan = gpu::plan_gpus(std::vector{quota("a", 64, gpu::GpuPriority::high()),
                                         quota("b", 64, gpu::GpuPriority::low())},
                             std::vector{device("h200")});
  {
    gpu::GpuPartition part(fake, plan);
    EXPECT_TRUE(part.find("a")->green_context);   // units 0-7
    EXPECT_FALSE(part.find("b")->green_context);  // units 8-15, only 12 exist
    ASSERT_EQ(part.warnings().size(), 1u);
    EXPECT_NE(part.warnings()[0].find("only 12 groups of 8 SMs (planned 16)"), std::string::npos)
        << part.warnings()[0];
    // The realised plan shows what the driver built, not what was planned.
    const auto& realised = part.plan();
    EXPECT_EQ(realised.find("a")->sm_count, 64);
    EXPECT_EQ(realised.find("b")->sm_count, 0);
    EXPECT_TRUE(realised.find("b")->sm_units.empty());
    EXPECT_EQ(realised.devices[0].sm_grouped, 64);
    EXPECT_EQ(realised.devices[0].sm_unassigned, 132 - 64);
    EXPECT_EQ(realised.notes.back(), part.warnings()[0]);
    EXPECT_NE(realised.to_string().find("all (asked 64)"), std::string::npos);
    EXPECT_EQ(plan.find("b")->sm_count, 64) << "the caller's plan is left as it was";
  }
  expect_balanced(*fake);
}

TEST(GpuPartition, FewerUnitsFromTheDriverIsAnErrorForAStrictModel) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")});
  fake->limit_split_units(12);
  auto a = quota("a", 64, gpu::GpuPriority::high());
  auto b = quota("b", 64, gpu::GpuPriority::low());
  b.strict = true;
  auto plan = gpu::plan_gpus(std::vector{a, b}, std::vector{device("h200")});
  try {
    gpu::GpuPartition part(fake, plan);
    FAIL() << "a strict model's group must not fall back to the whole GPU";
  } catch (const gpu::GpuPlacementError& e) {
    EXPECT_EQ(e.model(), "b");
    EXPECT_NE(std::string(e.what()).find("strict=True"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("only 12 groups"), std::string::npos) << e.what();
  }
  expect_balanced(*fake);
}

TEST(GpuPartition, GroupSizesAreTheDriversNotThePlans) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")});
  fake->split_group_sms(10);  // the driver rounded each group of 8 up to 10 SMs: 13 groups
  auto plan = gpu::plan_gpus(std::vector{quota("a", 16, gpu::GpuPriority::high()),
                                         quota("b", 24, gpu::GpuPriority::low())},
                             std::vector{device("h200")});
  {
    gpu::GpuPartition part(fake, plan);
    EXPECT_TRUE(part.warnings().empty());
    EXPECT_EQ(part.find("a")->sm_count, 20);
    EXPECT_EQ(part.find("b")->sm_count, 30);
    EXPECT_EQ(part.plan().find("a")->sm_count, 20);
    EXPECT_TRUE(part.plan().find("a")->sm_rounded);
    EXPECT_EQ(part.plan().devices[0].sm_grouped, 50);
    EXPECT_EQ(part.plan().devices[0].sm_unassigned, 132 - 50);
  }
  expect_balanced(*fake);
}

// --- what the stricter fake refuses, as the real driver does ---------------------------------

class FakeRefuses : public ::testing::Test {
 protected:
  FakeRefuses() : fake_(std::vector{device("h200")}) {
    fake_.primary_ctx_retain(&primary_, 0);
    fake_.ctx_push_current(primary_);
    fake_.device_get_dev_resource(0, &all_, cu::kDevResourceTypeSm);
  }
  // Units of one split of the whole device into groups of 8.
  std::vector<cu::DevResource> split() {
    unsigned n = 16;
    std::vector<cu::DevResource> out(n);
    cu::DevResource rest{};
    EXPECT_EQ(fake_.dev_sm_resource_split_by_count(out.data(), &n, &all_, &rest, 0, 8),
              cu::kSuccess);
    out.resize(n);
    return out;
  }
  cu::GreenContext green(std::vector<cu::DevResource> units) {
    cu::ResourceDesc desc = nullptr;
    EXPECT_EQ(fake_.dev_resource_generate_desc(&desc, units.data(),
                                               static_cast<unsigned>(units.size())),
              cu::kSuccess);
    cu::GreenContext g = nullptr;
    EXPECT_EQ(fake_.green_ctx_create(&g, desc, 0, cu::kGreenCtxDefaultStream), cu::kSuccess);
    return g;
  }

  FakeDriver fake_;
  cu::Context primary_ = nullptr;
  cu::DevResource all_{};
};

TEST_F(FakeRefuses, GreenContextWithoutItsDefaultStreamFlag) {
  auto units = split();
  cu::ResourceDesc desc = nullptr;
  ASSERT_EQ(fake_.dev_resource_generate_desc(&desc, units.data(), 2), cu::kSuccess);
  cu::GreenContext g = nullptr;
  EXPECT_EQ(fake_.green_ctx_create(&g, desc, 0, 0), cu::kErrorInvalidValue);
  EXPECT_EQ(fake_.green_ctx_create(&g, desc, 0, cu::kGreenCtxDefaultStream), cu::kSuccess);
}

TEST_F(FakeRefuses, GreenContextStreamsThatBlock) {
  cu::GreenContext g = green({split()[0]});
  cu::Stream s = nullptr;
  EXPECT_EQ(fake_.green_ctx_stream_create(&s, g, 0, 0), cu::kErrorInvalidValue);
  EXPECT_EQ(fake_.green_ctx_stream_create(&s, g, cu::kStreamNonBlocking, 0), cu::kSuccess);
  // The 12.4 way (the green context current) is held to the same rule.
  cu::Context ctx = nullptr;
  ASSERT_EQ(fake_.ctx_from_green_ctx(&ctx, g), cu::kSuccess);
  fake_.ctx_push_current(ctx);
  EXPECT_EQ(fake_.stream_create_with_priority(&s, 0, 0), cu::kErrorInvalidValue);
  EXPECT_EQ(fake_.stream_create_with_priority(&s, cu::kStreamNonBlocking, 0), cu::kSuccess);
  // A primary-context stream may block.
  cu::Context popped = nullptr;
  fake_.ctx_pop_current(&popped);
  EXPECT_EQ(fake_.stream_create_with_priority(&s, 0, 0), cu::kSuccess);
}

TEST_F(FakeRefuses, DescriptorsMixingOutputsOfDifferentSplits) {
  auto first = split();
  auto second = split();
  std::vector<cu::DevResource> mixed{first[0], second[1]};
  cu::ResourceDesc desc = nullptr;
  EXPECT_EQ(fake_.dev_resource_generate_desc(&desc, mixed.data(), 2),
            cu::kErrorInvalidResourceConfiguration);
  std::vector<cu::DevResource> same{second[0], second[1]};
  EXPECT_EQ(fake_.dev_resource_generate_desc(&desc, same.data(), 2), cu::kSuccess);
}

TEST_F(FakeRefuses, StreamDestroyedAfterItsContext) {
  cu::GreenContext g = green({split()[0]});
  cu::Stream in_green = nullptr;
  ASSERT_EQ(fake_.green_ctx_stream_create(&in_green, g, cu::kStreamNonBlocking, 0), cu::kSuccess);
  ASSERT_EQ(fake_.green_ctx_destroy(g), cu::kSuccess);
  EXPECT_EQ(fake_.stream_destroy(in_green), cu::kErrorInvalidContext);

  cu::Stream in_primary = nullptr;
  ASSERT_EQ(fake_.stream_create_with_priority(&in_primary, cu::kStreamNonBlocking, 0),
            cu::kSuccess);
  ASSERT_EQ(fake_.primary_ctx_release(0), cu::kSuccess);
  EXPECT_EQ(fake_.stream_destroy(in_primary), cu::kErrorInvalidContext);
}

TEST(GpuPartition, PassesEveryRuleOfTheStricterFakeOnBothStreamPaths) {
  for (bool stream_create_12_5 : {true, false}) {
    auto fake = std::make_shared<FakeDriver>(std::vector{device("h200")}, stream_create_12_5);
    auto plan = gpu::plan_gpus(std::vector{quota("a", 16, gpu::GpuPriority::high(), 2),
                                           quota("b", 32, gpu::GpuPriority::low(), 2),
                                           quota("c", 0, gpu::GpuPriority::normal())},
                               std::vector{device("h200")});
    {
      gpu::GpuPartition part(fake, plan);
      EXPECT_TRUE(part.warnings().empty()) << part.warnings()[0];
    }
    for (const auto& entry : fake->log) EXPECT_FALSE(entry.ends_with(" FAILED")) << entry;
    expect_balanced(*fake);
  }
}

TEST(GpuPartition, StreamFailureMidwayUndoesEverythingAndThrows) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("a100"), device("a100", 1)});
  fake->fail("cuStreamCreateWithPriority", cu::kErrorOutOfMemory, 4);
  auto b = quota("b", 0, gpu::GpuPriority::low(), 3);
  b.device = 1;
  auto plan = gpu::plan_gpus(std::vector{quota("a", 0, gpu::GpuPriority::high(), 2), b},
                             std::vector{device("a100"), device("a100", 1)});
  EXPECT_THROW(
      {
        try {
          gpu::GpuPartition part(fake, plan);
        } catch (const std::runtime_error& e) {
          // The call made for model b names it: the device alone left the reader guessing.
          EXPECT_NE(std::string(e.what()).find("GPU 1, model 'b': cuStreamCreateWithPriority failed"),
                    std::string::npos)
              << e.what();
          throw;
        }
      },
      std::runtime_error);
  EXPECT_EQ(fake->count("cuDevicePrimaryCtxRetain"), 2);
  expect_balanced(*fake);
  // The two devices are released in reverse: device 1 first.
  EXPECT_LT(fake->index_of("cuDevicePrimaryCtxRelease(1)"),
            fake->index_of("cuDevicePrimaryCtxRelease(0)"));
}

TEST(GpuPartition, UnavailableDriverThrowsItsReason) {
  auto plan = gpu::plan_gpus(std::vector{quota("a", 0, gpu::GpuPriority::normal())},
                             std::vector{device("h200")});
  try {
    gpu::GpuPartition part(gpu::unavailable_driver("no libcuda here"), plan);
    FAIL();
  } catch (const gpu::GpuUnavailableError& e) {
    EXPECT_STREQ(e.what(), "no libcuda here");
  }
}

TEST(GpuPartition, UnusedDevicesAreNotTouched) {
  auto fake = std::make_shared<FakeDriver>(std::vector{device("h200"), device("h200", 1)});
  auto a = quota("a", 0, gpu::GpuPriority::normal());
  a.device = 1;
  auto plan = gpu::plan_gpus(std::vector{a}, std::vector{device("h200"), device("h200", 1)});
  {
    gpu::GpuPartition part(fake, plan);
    EXPECT_EQ(part.find("a")->device, 1);
  }
  EXPECT_EQ(fake->log.front(), "cuDevicePrimaryCtxRetain(1)");
  EXPECT_EQ(fake->count("cuDevicePrimaryCtxRetain(0)"), 0);
  expect_balanced(*fake);
}
