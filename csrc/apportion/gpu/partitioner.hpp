// Realises a GpuPlan against a driver: per device the primary context, per model non-blocking
// streams with the planned priorities, and for SM groups green contexts over the SMs of the
// driver's split. Everything it creates it destroys, in reverse order, at close().
//
// What a green context guarantees (cuda.h, "Green Contexts"): its work gets at least the SMs it
// was provisioned with. It does NOT promise that work stays on them: the driver documents cases
// where kernels run on more SMs than provisioned (MPS with an active-thread percentage; on 9.x,
// once a module with dynamic parallelism is loaded, green contexts may share 2 extra SMs), and
// disjoint groups are not promised to run concurrently or to make forward progress (other
// resources, such as hardware connections, can couple them). Groups isolate in practice; the
// benchmark records the SMs each side really ran on.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "apportion/gpu/driver.hpp"
#include "apportion/gpu/partition.hpp"

namespace apportion::gpu {

/// The driver is unavailable (no library, no device, cuInit failed); what() is the reason.
class GpuUnavailableError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// What one model received. Handles are CUstream / CUcontext values; a CUstream is also a
/// cudaStream_t, so torch.cuda.ExternalStream and cupy.cuda.ExternalStream accept them as ints.
struct ModelStreams {
  std::string model;
  int device = 0;
  int priority = 0;
  /// SMs of the driver's groups its green context was built over (the driver's smCount, which may
  /// differ from the plan's); 0: no green context, its streams may use the whole GPU.
  int sm_count = 0;
  bool green_context = false;            ///< its streams live in a green context
  std::uintptr_t context = 0;            ///< the CUcontext its streams belong to
  std::vector<std::uintptr_t> streams;   ///< plan.streams handles
  std::uint64_t memory = 0;              ///< the plan's budget (enforced by the adapters)
};

/// Owner of every driver object a plan needs. Not thread-safe: one owner constructs, uses and
/// closes it; the stream handles it hands out may be used from any thread until close().
class GpuPartition {
 public:
  /// Builds everything; throws GpuUnavailableError when the driver is unavailable,
  /// GpuPlacementError when a strict model's SM group cannot be built, std::runtime_error for
  /// another driver failure. Whatever was created before a throw is destroyed first.
  /// A non-strict model whose group cannot be built gets priority-only streams and a warning.
  GpuPartition(std::shared_ptr<DriverApi> driver, const GpuPlan& plan);
  ~GpuPartition();
  GpuPartition(const GpuPartition&) = delete;
  GpuPartition& operator=(const GpuPartition&) = delete;

  /// Destroys streams, then green contexts, then releases primary contexts, each in reverse
  /// creation order. Idempotent; the stream handles are invalid afterwards. Driver errors on the
  /// way are counted in warnings(), never thrown.
  void close() noexcept;
  bool closed() const noexcept { return closed_; }

  const std::vector<ModelStreams>& models() const noexcept { return models_; }
  /// The plan as the driver realised it: each model's sm_count (and sm_rounded) is what its green
  /// context got from the driver's split, 0 with no units after a fallback to the whole GPU;
  /// the devices' grouped SM counts follow, and the notes end with the fallbacks taken.
  const GpuPlan& plan() const noexcept { return plan_; }
  const ModelStreams* find(std::string_view model) const noexcept;
  /// Fallbacks taken (an SM group the driver could not build) and close() failures.
  const std::vector<std::string>& warnings() const noexcept { return warnings_; }

 private:
  enum class Kind { primary_ctx, green_ctx, stream };
  struct Owned {
    Kind kind;
    cu::Device device;
    void* handle;
  };

  void realise_device(const GpuPlan& plan, const DeviceGpuPlan& device);
  // Throws std::runtime_error naming the GPU (and the model, for a call made for one) when r
  // is not success.
  void check(cu::Result r, const char* what, int device, const std::string* model = nullptr);

  void finish_plan();

  std::shared_ptr<DriverApi> driver_;
  GpuPlan plan_;               // the realised plan (see plan())
  std::vector<Owned> owned_;   // creation order; close() walks it backwards
  std::vector<ModelStreams> models_;
  std::vector<std::string> warnings_;
  bool closed_ = false;
};

}  // namespace apportion::gpu
