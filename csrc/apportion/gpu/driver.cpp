#include "apportion/gpu/driver.hpp"

#include <dlfcn.h>

#include <array>
#include <cstddef>
#include <mutex>
#include <utility>

namespace apportion::gpu {

namespace {

// In `Sym` order (checked by a test). Versions are those of the _vN variant whose signature the
// function-pointer types below declare; asking cuGetProcAddress for an older version would hand
// back a different ABI (e.g. cuMemGetInfo with 32-bit sizes before 3.2).
constexpr std::array<SymbolSpec, kSymCount> kSpecs{{
    {Sym::init, "cuInit", 2000, true},
    {Sym::driver_get_version, "cuDriverGetVersion", 2020, true},
    {Sym::device_get, "cuDeviceGet", 2000, true},
    {Sym::device_get_count, "cuDeviceGetCount", 2000, true},
    {Sym::device_get_attribute, "cuDeviceGetAttribute", 2000, true},
    {Sym::device_get_name, "cuDeviceGetName", 2000, true},
    {Sym::device_total_mem, "cuDeviceTotalMem", 3020, true},
    {Sym::primary_ctx_retain, "cuDevicePrimaryCtxRetain", 7000, true},
    {Sym::primary_ctx_release, "cuDevicePrimaryCtxRelease", 11000, true},
    {Sym::ctx_set_current, "cuCtxSetCurrent", 4000, true},
    {Sym::ctx_push_current, "cuCtxPushCurrent", 4000, true},
    {Sym::ctx_pop_current, "cuCtxPopCurrent", 4000, true},
    {Sym::ctx_get_stream_priority_range, "cuCtxGetStreamPriorityRange", 5050, true},
    {Sym::stream_create_with_priority, "cuStreamCreateWithPriority", 5050, true},
    {Sym::stream_destroy, "cuStreamDestroy", 4000, true},
    {Sym::stream_synchronize, "cuStreamSynchronize", 2000, true},
    {Sym::mem_get_info, "cuMemGetInfo", 3020, true},
    {Sym::get_error_name, "cuGetErrorName", 6000, false},
    {Sym::get_error_string, "cuGetErrorString", 6000, false},
    {Sym::device_get_dev_resource, "cuDeviceGetDevResource", cu::kVersionGreenContexts, false},
    {Sym::dev_sm_resource_split_by_count, "cuDevSmResourceSplitByCount",
     cu::kVersionGreenContexts, false},
    {Sym::dev_resource_generate_desc, "cuDevResourceGenerateDesc", cu::kVersionGreenContexts,
     false},
    {Sym::green_ctx_create, "cuGreenCtxCreate", cu::kVersionGreenContexts, false},
    {Sym::green_ctx_destroy, "cuGreenCtxDestroy", cu::kVersionGreenContexts, false},
    {Sym::ctx_from_green_ctx, "cuCtxFromGreenCtx", cu::kVersionGreenContexts, false},
    {Sym::green_ctx_stream_create, "cuGreenCtxStreamCreate", cu::kVersionGreenCtxStreamCreate,
     false},
}};

constexpr bool specs_in_order() {
  for (std::size_t i = 0; i < kSpecs.size(); ++i) {
    if (static_cast<std::size_t>(kSpecs[i].sym) != i) return false;
  }
  return true;
}
static_assert(specs_in_order(), "kSpecs rows must follow the Sym enum so lookups index directly");

constexpr Sym kGreenSyms[] = {Sym::device_get_dev_resource, Sym::dev_sm_resource_split_by_count,
                              Sym::dev_resource_generate_desc, Sym::green_ctx_create,
                              Sym::green_ctx_destroy, Sym::ctx_from_green_ctx};

using cu::Result;

// A driver whose entry points came from a SymbolSource. Missing (optional) entries answer
// kErrorNotSupported, so callers probe features by status() and never by a null call.
class TableDriver final : public DriverApi {
 public:
  explicit TableDriver(std::unique_ptr<SymbolSource> source) : source_(std::move(source)) {
    load();
  }

  const DriverStatus& status() const noexcept override { return status_; }

  std::string error_string(Result r) override {
    const char* name = nullptr;
    const char* text = nullptr;
    if (auto fn = get<Sym::get_error_name>(); fn && fn(r, &name) != cu::kSuccess) {
      name = nullptr;
    }
    if (auto fn = get<Sym::get_error_string>(); fn && fn(r, &text) != cu::kSuccess) {
      text = nullptr;
    }
    std::string out = name ? std::string(name) : "CUresult " + std::to_string(r);
    if (text) out += std::string(" (") + text + ")";
    return out;
  }

  Result device_get(cu::Device* dev, int ordinal) override {
    return call<Sym::device_get>(dev, ordinal);
  }
  Result device_get_count(int* count) override {
    return call<Sym::device_get_count>(count);
  }
  Result device_get_attribute(int* value, int attribute, cu::Device dev) override {
    return call<Sym::device_get_attribute>(value, attribute, dev);
  }
  Result device_get_name(char* name, int len, cu::Device dev) override {
    return call<Sym::device_get_name>(name, len, dev);
  }
  Result device_total_mem(std::size_t* bytes, cu::Device dev) override {
    return call<Sym::device_total_mem>(bytes, dev);
  }
  Result primary_ctx_retain(cu::Context* ctx, cu::Device dev) override {
    return call<Sym::primary_ctx_retain>(ctx, dev);
  }
  Result primary_ctx_release(cu::Device dev) override {
    return call<Sym::primary_ctx_release>(dev);
  }
  Result ctx_set_current(cu::Context ctx) override {
    return call<Sym::ctx_set_current>(ctx);
  }
  Result ctx_push_current(cu::Context ctx) override {
    return call<Sym::ctx_push_current>(ctx);
  }
  Result ctx_pop_current(cu::Context* ctx) override {
    return call<Sym::ctx_pop_current>(ctx);
  }
  Result ctx_get_stream_priority_range(int* least, int* greatest) override {
    return call<Sym::ctx_get_stream_priority_range>(least, greatest);
  }
  Result stream_create_with_priority(cu::Stream* stream, unsigned flags, int priority) override {
    return call<Sym::stream_create_with_priority>(stream, flags, priority);
  }
  Result stream_destroy(cu::Stream stream) override {
    return call<Sym::stream_destroy>(stream);
  }
  Result stream_synchronize(cu::Stream stream) override {
    return call<Sym::stream_synchronize>(stream);
  }
  Result mem_get_info(std::size_t* free, std::size_t* total) override {
    return call<Sym::mem_get_info>(free, total);
  }
  Result device_get_dev_resource(cu::Device dev, cu::DevResource* resource, int type) override {
    return call<Sym::device_get_dev_resource>(dev, resource, type);
  }
  Result dev_sm_resource_split_by_count(cu::DevResource* result, unsigned* groups,
                                        const cu::DevResource* input, cu::DevResource* remaining,
                                        unsigned flags, unsigned min_count) override {
    return call<Sym::dev_sm_resource_split_by_count>(result, groups, input, remaining, flags,
                                                     min_count);
  }
  Result dev_resource_generate_desc(cu::ResourceDesc* desc, cu::DevResource* resources,
                                    unsigned count) override {
    return call<Sym::dev_resource_generate_desc>(desc, resources, count);
  }
  Result green_ctx_create(cu::GreenContext* green, cu::ResourceDesc desc, cu::Device dev,
                          unsigned flags) override {
    return call<Sym::green_ctx_create>(green, desc, dev, flags);
  }
  Result green_ctx_destroy(cu::GreenContext green) override {
    return call<Sym::green_ctx_destroy>(green);
  }
  Result ctx_from_green_ctx(cu::Context* ctx, cu::GreenContext green) override {
    return call<Sym::ctx_from_green_ctx>(ctx, green);
  }
  Result green_ctx_stream_create(cu::Stream* stream, cu::GreenContext green, unsigned flags,
                                 int priority) override {
    return call<Sym::green_ctx_stream_create>(stream, green, flags, priority);
  }

 private:
  template <Sym S>
  sym_fn_t<S> get() const noexcept {
    // Converting an object pointer to a function pointer is conditionally supported; POSIX
    // (dlsym) and every CUDA platform guarantee it, and it is the only way to use the table.
    return reinterpret_cast<sym_fn_t<S>>(table_[static_cast<std::size_t>(S)]);
  }

  template <Sym S, class... Args>
  Result call(Args... args) const {
    if (!status_.available) return cu::kErrorNotInitialized;
    auto fn = get<S>();
    return fn ? fn(args...) : cu::kErrorNotSupported;
  }

  void load() {
    if (!source_) {
      status_.reason = "no CUDA driver symbol source";
      return;
    }
    // The version comes first: it decides which optional symbols may even be asked for (asking
    // cuGetProcAddress for a version above the driver's is an error, not a null answer).
    const SymbolSpec& version_spec = kSpecs[static_cast<std::size_t>(Sym::driver_get_version)];
    auto get_version = reinterpret_cast<sym_fn_t<Sym::driver_get_version>>(
        source_->get_proc(version_spec.name, version_spec.version));
    if (!get_version) {
      status_.reason = "CUDA driver lacks required symbol cuDriverGetVersion";
      return;
    }
    int version = 0;
    if (get_version(&version) != cu::kSuccess || version <= 0) {
      status_.reason = "cuDriverGetVersion failed";
      return;
    }
    status_.driver_version = version;

    for (const SymbolSpec& spec : kSpecs) {
      void* p = nullptr;
      if (spec.version <= version) p = source_->get_proc(spec.name, spec.version);
      table_[static_cast<std::size_t>(spec.sym)] = p;
      if (p) continue;
      if (spec.required) {
        status_.reason = "CUDA driver " + format_driver_version(version) +
                         " lacks required symbol " + spec.name + " (needs CUDA " +
                         format_driver_version(spec.version) + " or newer)";
        return;
      }
      status_.missing_optional.emplace_back(spec.name);
    }
    status_.green_contexts = true;
    for (Sym s : kGreenSyms) {
      if (!table_[static_cast<std::size_t>(s)]) status_.green_contexts = false;
    }
    status_.green_ctx_stream_create =
        status_.green_contexts && table_[static_cast<std::size_t>(Sym::green_ctx_stream_create)];

    // From here on calls go through call<>(), which requires available_.
    status_.available = true;
    if (Result r = get<Sym::init>()(0); r != cu::kSuccess) {
      status_.available = false;
      status_.reason = "cuInit failed: " + error_string(r);
      if (r == cu::kErrorStubLibrary) {
        status_.reason += "; the libcuda.so.1 found is the CUDA toolkit's link-time stub, not a "
                          "driver: put the NVIDIA driver's library first on the loader path";
      }
      return;
    }
    int count = 0;
    if (Result r = get<Sym::device_get_count>()(&count); r != cu::kSuccess) {
      status_.available = false;
      status_.reason = "cuDeviceGetCount failed: " + error_string(r);
      return;
    }
    status_.device_count = count;
    if (count <= 0) {
      status_.available = false;
      status_.reason = "no CUDA device is present (driver " + format_driver_version(version) +
                       " reports 0 devices)";
    }
  }

  std::unique_ptr<SymbolSource> source_;
  std::array<void*, kSymCount> table_{};
  DriverStatus status_;
};

// Drivers from 12.0 export cuGetProcAddress_v2 with a status out-parameter; 11.3-11.8 only the
// four-argument form. Both are looked up by dlsym because they are the bootstrap.
using FnGetProcAddressV2 = cu::fn::GetProcAddressV2;
using FnGetProcAddressV1 = cu::fn::GetProcAddressV1;

class DlSymbolSource final : public SymbolSource {
 public:
  DlSymbolSource(FnGetProcAddressV2 v2, FnGetProcAddressV1 v1) : v2_(v2), v1_(v1) {}

  void* get_proc(const char* name, int cuda_version) override {
    void* fn = nullptr;
    if (v2_) {
      int found = cu::kProcAddressSymbolNotFound;
      if (v2_(name, &fn, cuda_version, 0, &found) != cu::kSuccess ||
          found != cu::kProcAddressSuccess) {
        return nullptr;
      }
      return fn;
    }
    if (v1_(name, &fn, cuda_version, 0) != cu::kSuccess) return nullptr;
    return fn;
  }

 private:
  FnGetProcAddressV2 v2_;
  FnGetProcAddressV1 v1_;
};

class UnavailableDriver final : public DriverApi {
 public:
  explicit UnavailableDriver(std::string reason) { status_.reason = std::move(reason); }
  const DriverStatus& status() const noexcept override { return status_; }
  std::string error_string(Result r) override { return "CUresult " + std::to_string(r); }
  Result device_get(cu::Device*, int) override { return cu::kErrorNotInitialized; }
  Result device_get_count(int*) override { return cu::kErrorNotInitialized; }
  Result device_get_attribute(int*, int, cu::Device) override { return cu::kErrorNotInitialized; }
  Result device_get_name(char*, int, cu::Device) override { return cu::kErrorNotInitialized; }
  Result device_total_mem(std::size_t*, cu::Device) override { return cu::kErrorNotInitialized; }
  Result primary_ctx_retain(cu::Context*, cu::Device) override { return cu::kErrorNotInitialized; }
  Result primary_ctx_release(cu::Device) override { return cu::kErrorNotInitialized; }
  Result ctx_set_current(cu::Context) override { return cu::kErrorNotInitialized; }
  Result ctx_push_current(cu::Context) override { return cu::kErrorNotInitialized; }
  Result ctx_pop_current(cu::Context*) override { return cu::kErrorNotInitialized; }
  Result ctx_get_stream_priority_range(int*, int*) override { return cu::kErrorNotInitialized; }
  Result stream_create_with_priority(cu::Stream*, unsigned, int) override {
    return cu::kErrorNotInitialized;
  }
  Result stream_destroy(cu::Stream) override { return cu::kErrorNotInitialized; }
  Result stream_synchronize(cu::Stream) override { return cu::kErrorNotInitialized; }
  Result mem_get_info(std::size_t*, std::size_t*) override { return cu::kErrorNotInitialized; }
  Result device_get_dev_resource(cu::Device, cu::DevResource*, int) override {
    return cu::kErrorNotInitialized;
  }
  Result dev_sm_resource_split_by_count(cu::DevResource*, unsigned*, const cu::DevResource*,
                                        cu::DevResource*, unsigned, unsigned) override {
    return cu::kErrorNotInitialized;
  }
  Result dev_resource_generate_desc(cu::ResourceDesc*, cu::DevResource*, unsigned) override {
    return cu::kErrorNotInitialized;
  }
  Result green_ctx_create(cu::GreenContext*, cu::ResourceDesc, cu::Device, unsigned) override {
    return cu::kErrorNotInitialized;
  }
  Result green_ctx_destroy(cu::GreenContext) override { return cu::kErrorNotInitialized; }
  Result ctx_from_green_ctx(cu::Context*, cu::GreenContext) override {
    return cu::kErrorNotInitialized;
  }
  Result green_ctx_stream_create(cu::Stream*, cu::GreenContext, unsigned, int) override {
    return cu::kErrorNotInitialized;
  }

 private:
  DriverStatus status_;
};

}  // namespace

std::span<const SymbolSpec> symbol_specs() noexcept { return kSpecs; }

std::string format_driver_version(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

std::shared_ptr<DriverApi> load_driver(std::unique_ptr<SymbolSource> source) {
  return std::make_shared<TableDriver>(std::move(source));
}

std::shared_ptr<DriverApi> unavailable_driver(std::string reason) {
  return std::make_shared<UnavailableDriver>(std::move(reason));
}

std::unique_ptr<SymbolSource> open_driver_library(const char* library, std::string& reason) {
  // RTLD_LOCAL keeps the driver's symbols out of the global namespace, so nothing else in the
  // process binds to them by accident through us.
  void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* err = dlerror();
    reason = std::string("cannot load the CUDA driver (") + library + "): " +
             (err ? err : "dlopen failed") + "; no NVIDIA driver is installed on this machine?";
    return nullptr;
  }
  auto v2 = reinterpret_cast<FnGetProcAddressV2>(dlsym(handle, "cuGetProcAddress_v2"));
  auto v1 = reinterpret_cast<FnGetProcAddressV1>(dlsym(handle, "cuGetProcAddress"));
  if (!v2 && !v1) {
    reason = std::string(library) +
             " has no cuGetProcAddress: the driver is older than CUDA 11.3; update it";
    return nullptr;
  }
  return std::make_unique<DlSymbolSource>(v2, v1);
}

std::shared_ptr<DriverApi> system_driver() {
  // Loaded at most once per process: cuInit is process-wide and the library is never unloaded.
  static std::once_flag once;
  static std::shared_ptr<DriverApi> driver;
  std::call_once(once, [] {
    std::string reason;
    auto source = open_driver_library("libcuda.so.1", reason);
    driver = source ? load_driver(std::move(source)) : unavailable_driver(std::move(reason));
  });
  return driver;
}

}  // namespace apportion::gpu
