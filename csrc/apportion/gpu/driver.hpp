// The CUDA driver, reached without linking libcuda: libcuda.so.1 is opened at run time and every
// entry point is resolved through cuGetProcAddress, so one build runs on machines with no driver,
// an old driver or a new one. Everything above this file talks to `DriverApi`, which tests
// replace with a fake that records calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "apportion/gpu/cuda_abi.hpp"

namespace apportion::gpu {

/// Where driver entry points come from. The real source is dlopen("libcuda.so.1") plus
/// cuGetProcAddress; tests hand in tables of fake functions.
class SymbolSource {
 public:
  virtual ~SymbolSource() = default;
  /// The entry point `name` in the ABI it had in CUDA `cuda_version` (1000*major + 10*minor), or
  /// nullptr when this driver does not provide it.
  virtual void* get_proc(const char* name, int cuda_version) = 0;
};

/// Every driver entry point the GPU layer may call.
enum class Sym : std::size_t {
  init,
  driver_get_version,
  device_get,
  device_get_count,
  device_get_attribute,
  device_get_name,
  device_total_mem,
  primary_ctx_retain,
  primary_ctx_release,
  ctx_set_current,
  ctx_push_current,
  ctx_pop_current,
  ctx_get_stream_priority_range,
  stream_create_with_priority,
  stream_destroy,
  stream_synchronize,
  mem_get_info,
  get_error_name,
  get_error_string,
  device_get_dev_resource,
  dev_sm_resource_split_by_count,
  dev_resource_generate_desc,
  green_ctx_create,
  green_ctx_destroy,
  ctx_from_green_ctx,
  green_ctx_stream_create,
  count_,
};
inline constexpr std::size_t kSymCount = static_cast<std::size_t>(Sym::count_);

/// The signature each entry point is called through, in `Sym` order (test_gpu_abi checks each
/// against cudaTypedefs.h's PFN_<name>_v<version> for the version the symbol table asks for).
using SymSignatures =
    std::tuple<cu::fn::Init, cu::fn::DriverGetVersion, cu::fn::DeviceGet, cu::fn::DeviceGetCount,
               cu::fn::DeviceGetAttribute, cu::fn::DeviceGetName, cu::fn::DeviceTotalMem,
               cu::fn::PrimaryCtxRetain, cu::fn::PrimaryCtxRelease, cu::fn::CtxSetCurrent,
               cu::fn::CtxPushCurrent, cu::fn::CtxPopCurrent, cu::fn::CtxGetStreamPriorityRange,
               cu::fn::StreamCreateWithPriority, cu::fn::StreamDestroy,
               cu::fn::StreamSynchronize, cu::fn::MemGetInfo, cu::fn::GetErrorText,
               cu::fn::GetErrorText, cu::fn::DeviceGetDevResource,
               cu::fn::SmResourceSplitByCount, cu::fn::ResourceGenerateDesc,
               cu::fn::GreenCtxCreate, cu::fn::GreenCtxDestroy, cu::fn::CtxFromGreenCtx,
               cu::fn::GreenCtxStreamCreate>;
static_assert(std::tuple_size_v<SymSignatures> == kSymCount, "one signature per Sym");
template <Sym S>
using sym_fn_t = std::tuple_element_t<static_cast<std::size_t>(S), SymSignatures>;

/// One row of the symbol table: the driver name, the CUDA version whose ABI (the _vN variant) our
/// call signature matches, which is also the oldest driver that has it, and whether the GPU
/// layer can work without it.
struct SymbolSpec {
  Sym sym;
  const char* name;
  int version;
  bool required;
};

/// The full table, in `Sym` order.
std::span<const SymbolSpec> symbol_specs() noexcept;

/// What loading the driver found. `available` is false with a `reason` a person can act on.
struct DriverStatus {
  bool available = false;
  std::string reason;
  int driver_version = 0;                  ///< as cuDriverGetVersion reports it, 0 when unknown
  int device_count = 0;
  bool green_contexts = false;             ///< every 12.4 green-context symbol resolved
  bool green_ctx_stream_create = false;    ///< cuGreenCtxStreamCreate (12.5) resolved
  std::vector<std::string> missing_optional;  ///< optional symbols absent or above the version
};

/// The driver API subset the GPU layer uses, one method per CUDA call, same argument order and
/// the same CUresult codes. A call whose symbol is missing returns kErrorNotSupported.
/// Thread safety: as the CUDA driver's own (calls are safe from any thread; the current context is
/// per thread).
class DriverApi {
 public:
  virtual ~DriverApi() = default;

  virtual const DriverStatus& status() const noexcept = 0;
  /// "CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)"-style text for any code.
  virtual std::string error_string(cu::Result r) = 0;

  virtual cu::Result device_get(cu::Device* dev, int ordinal) = 0;
  virtual cu::Result device_get_count(int* count) = 0;
  virtual cu::Result device_get_attribute(int* value, int attribute, cu::Device dev) = 0;
  virtual cu::Result device_get_name(char* name, int len, cu::Device dev) = 0;
  virtual cu::Result device_total_mem(std::size_t* bytes, cu::Device dev) = 0;
  virtual cu::Result primary_ctx_retain(cu::Context* ctx, cu::Device dev) = 0;
  virtual cu::Result primary_ctx_release(cu::Device dev) = 0;
  virtual cu::Result ctx_set_current(cu::Context ctx) = 0;
  virtual cu::Result ctx_push_current(cu::Context ctx) = 0;
  virtual cu::Result ctx_pop_current(cu::Context* ctx) = 0;
  virtual cu::Result ctx_get_stream_priority_range(int* least, int* greatest) = 0;
  virtual cu::Result stream_create_with_priority(cu::Stream* stream, unsigned flags,
                                                 int priority) = 0;
  virtual cu::Result stream_destroy(cu::Stream stream) = 0;
  virtual cu::Result stream_synchronize(cu::Stream stream) = 0;
  virtual cu::Result mem_get_info(std::size_t* free, std::size_t* total) = 0;
  virtual cu::Result device_get_dev_resource(cu::Device dev, cu::DevResource* resource,
                                            int type) = 0;
  virtual cu::Result dev_sm_resource_split_by_count(cu::DevResource* result, unsigned* groups,
                                                    const cu::DevResource* input,
                                                    cu::DevResource* remaining, unsigned flags,
                                                    unsigned min_count) = 0;
  virtual cu::Result dev_resource_generate_desc(cu::ResourceDesc* desc,
                                                cu::DevResource* resources, unsigned count) = 0;
  virtual cu::Result green_ctx_create(cu::GreenContext* green, cu::ResourceDesc desc,
                                      cu::Device dev, unsigned flags) = 0;
  virtual cu::Result green_ctx_destroy(cu::GreenContext green) = 0;
  virtual cu::Result ctx_from_green_ctx(cu::Context* ctx, cu::GreenContext green) = 0;
  virtual cu::Result green_ctx_stream_create(cu::Stream* stream, cu::GreenContext green,
                                             unsigned flags, int priority) = 0;
};

/// Resolves the symbol table from `source`, checks the driver version, calls cuInit(0) and counts
/// devices. Never throws for driver trouble: the result reports `available == false` and why.
/// Optional symbols newer than the driver are not even asked for (version gating), so green
/// contexts on a 12.2 driver read as unsupported rather than as a lookup failure.
std::shared_ptr<DriverApi> load_driver(std::unique_ptr<SymbolSource> source);

/// dlopen(`library`) and a SymbolSource backed by its cuGetProcAddress_v2 (or cuGetProcAddress
/// on drivers before 12.0). nullptr with `reason` set when the library or the resolver is absent.
/// The handle is never dlclosed: the CUDA runtime may hold pointers into the same library.
std::unique_ptr<SymbolSource> open_driver_library(const char* library, std::string& reason);

/// The process-wide driver from libcuda.so.1, loaded once on first use (thread-safe). Always
/// returns an object; check status().available.
std::shared_ptr<DriverApi> system_driver();

/// A driver that is always unavailable with `reason` (what the layer uses when loading failed).
std::shared_ptr<DriverApi> unavailable_driver(std::string reason);

/// "12.4" for 12040.
std::string format_driver_version(int version);

}  // namespace apportion::gpu
