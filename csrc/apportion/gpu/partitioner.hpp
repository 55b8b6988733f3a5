// Realises a GpuPlan against a driver: per device the primary context, per model non-blocking
// streams with the planned priorities, and for SM groups green contexts whose streams can only
// run on the group's SMs. Everything it creates it destroys, in reverse order, at close().
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
  int sm_count = 0;                      ///< SMs its streams are confined to; 0: the whole GPU
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
  void check(cu::Result r, const char* what, int device);

  std::shared_ptr<DriverApi> driver_;
  std::vector<Owned> owned_;   // creation order; close() walks it backwards
  std::vector<ModelStreams> models_;
  std::vector<std::string> warnings_;
  bool closed_ = false;
};

}  // namespace apportion::gpu
