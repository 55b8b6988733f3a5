// cuda_abi.hpp against the CUDA toolkit's own headers: every constant, every layout and every
// entry-point signature the loader declares by hand. Built wherever the toolkit's headers are
// found (CMake defines APPORTION_HAVE_CUDA_H; CI has them), including the sanitizer builds that
// compile no CUDA code: only headers are used, libcuda is never linked.
#include <gtest/gtest.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "apportion/gpu/cuda_abi.hpp"
#include "apportion/gpu/driver.hpp"

#if defined(APPORTION_HAVE_CUDA_H)
#include <cuda.h>
#include <cudaTypedefs.h>

namespace gpu = apportion::gpu;
namespace cu = apportion::gpu::cu;

#if CUDA_VERSION < 12050
#error "test_gpu_abi needs the headers of CUDA 12.5 or newer (cuGreenCtxStreamCreate)"
#endif

// --- constants --------------------------------------------------------------------------------
static_assert(cu::kSuccess == CUDA_SUCCESS);
static_assert(cu::kErrorInvalidValue == CUDA_ERROR_INVALID_VALUE);
static_assert(cu::kErrorOutOfMemory == CUDA_ERROR_OUT_OF_MEMORY);
static_assert(cu::kErrorNotInitialized == CUDA_ERROR_NOT_INITIALIZED);
static_assert(cu::kErrorStubLibrary == CUDA_ERROR_STUB_LIBRARY);
static_assert(cu::kErrorNoDevice == CUDA_ERROR_NO_DEVICE);
static_assert(cu::kErrorInvalidDevice == CUDA_ERROR_INVALID_DEVICE);
static_assert(cu::kErrorInvalidContext == CUDA_ERROR_INVALID_CONTEXT);
static_assert(cu::kErrorInvalidHandle == CUDA_ERROR_INVALID_HANDLE);
static_assert(cu::kErrorNotFound == CUDA_ERROR_NOT_FOUND);
static_assert(cu::kErrorNotSupported == CUDA_ERROR_NOT_SUPPORTED);
static_assert(cu::kErrorInvalidResourceConfiguration ==
              CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION);
static_assert(cu::kAttrMultiprocessorCount == CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
static_assert(cu::kAttrComputeCapabilityMajor == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
static_assert(cu::kAttrComputeCapabilityMinor == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
static_assert(cu::kStreamNonBlocking == CU_STREAM_NON_BLOCKING);
static_assert(cu::kGreenCtxDefaultStream == CU_GREEN_CTX_DEFAULT_STREAM);
static_assert(cu::kDevResourceTypeSm == CU_DEV_RESOURCE_TYPE_SM);
static_assert(cu::kProcAddressSuccess == CU_GET_PROC_ADDRESS_SUCCESS);
static_assert(cu::kProcAddressSymbolNotFound == CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
static_assert(cu::kProcAddressVersionNotSufficient == CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT);
static_assert(RESOURCE_ABI_VERSION == 1, "cuda_abi.hpp declares CUdevResource ABI version 1");
static_assert(sizeof(cu::Result) == sizeof(CUresult), "CUresult travels as a 32-bit int");

// --- handles and layouts ----------------------------------------------------------------------
static_assert(std::is_same_v<cu::Device, CUdevice>);
static_assert(std::is_same_v<cu::Context, CUcontext>);
static_assert(std::is_same_v<cu::Stream, CUstream>);
static_assert(std::is_same_v<cu::GreenContext, CUgreenCtx>);
static_assert(std::is_same_v<cu::ResourceDesc, CUdevResourceDesc>);

static_assert(sizeof(cu::SmResource) == sizeof(CUdevSmResource));
static_assert(offsetof(cu::SmResource, sm_count) == offsetof(CUdevSmResource, smCount));
static_assert(offsetof(cu::SmResource, min_sm_partition_size) ==
              offsetof(CUdevSmResource, minSmPartitionSize));
static_assert(offsetof(cu::SmResource, sm_coscheduled_alignment) ==
              offsetof(CUdevSmResource, smCoscheduledAlignment));
static_assert(sizeof(cu::DevResource) == sizeof(CUdevResource));
static_assert(offsetof(cu::DevResource, type) == offsetof(CUdevResource, type));
static_assert(offsetof(cu::DevResource, internal_padding) ==
              offsetof(CUdevResource, _internal_padding));
static_assert(sizeof(cu::DevResource::internal_padding) ==
              sizeof(CUdevResource::_internal_padding));
static_assert(offsetof(cu::DevResource, sm) == offsetof(CUdevResource, sm));
static_assert(sizeof(cu::DevResource::oversize) == RESOURCE_ABI_EXTERNAL_BYTES);
static_assert(alignof(cu::DevResource) >= alignof(CUdevResource),
              "our CUdevResource arrays must be at least as aligned as the driver assumes");
static_assert(alignof(cu::DevResource) == 8,
              "CUDA 13.1 ends CUdevResource in a pointer: keep 8-byte alignment for newer drivers");

// --- signatures -------------------------------------------------------------------------------
// Two parameter types are the same ABI when they are the same type, when both are integers or
// enums of one size (cuda.h's enums travel as int here), or when both are pointers with the same
// const-ness to the same ABI. CUdevResource is ours by the layout checks above.
template <class A, class B>
struct SameAbi : std::bool_constant<std::is_same_v<A, B>> {};
template <class A, class B>
  requires(!std::is_same_v<A, B> && (std::is_integral_v<A> || std::is_enum_v<A>) &&
           (std::is_integral_v<B> || std::is_enum_v<B>))
struct SameAbi<A, B> : std::bool_constant<sizeof(A) == sizeof(B)> {};
template <class A, class B>
struct SameAbi<A*, B*>
    : std::bool_constant<std::is_const_v<A> == std::is_const_v<B> &&
                         SameAbi<std::remove_cv_t<A>, std::remove_cv_t<B>>::value> {};
template <>
struct SameAbi<cu::DevResource, CUdevResource> : std::true_type {};

template <class... T>
struct List {};
template <class L1, class L2>
struct SameParams : std::false_type {};
template <class... A, class... B>
  requires(sizeof...(A) == sizeof...(B))
struct SameParams<List<A...>, List<B...>>
    : std::bool_constant<(SameAbi<A, B>::value && ... && true)> {};

template <class F, class G>
struct SameSignature : std::false_type {};
template <class R1, class... A, class R2, class... B>
struct SameSignature<R1 (*)(A...), R2 (*)(B...)>
    : std::bool_constant<SameAbi<R1, R2>::value && SameParams<List<A...>, List<B...>>::value> {};

// The checker must be able to fail.
static_assert(!SameSignature<cu::fn::MemGetInfo, CUresult (*)(unsigned int*, unsigned int*)>::value,
              "cuMemGetInfo before 3.2 took 32-bit sizes: a different ABI than _v3020");
static_assert(!SameSignature<cu::fn::StreamCreateWithPriority, PFN_cuStreamDestroy_v4000>::value);
static_assert(!SameAbi<const cu::DevResource*, CUdevResource*>::value);

static_assert(SameSignature<cu::fn::GetProcAddressV2, PFN_cuGetProcAddress_v12000>::value);
static_assert(SameSignature<cu::fn::GetProcAddressV1, PFN_cuGetProcAddress_v11030>::value);

namespace {

struct Row {
  gpu::Sym sym;
  std::string name;
  int version;
};

// One line per entry point: the signature the loader calls it through must be the PFN typedef of
// exactly the version the symbol table asks cuGetProcAddress for (checked at compile time), and
// the name and version are compared with the table at run time below.
#define AP_SYMBOL(SYM, NAME, VERSION)                                                          \
  static_assert(SameSignature<gpu::sym_fn_t<gpu::Sym::SYM>, PFN_##NAME##_v##VERSION>::value,   \
                #NAME ": the loader's signature differs from PFN_" #NAME "_v" #VERSION);       \
  rows.push_back({gpu::Sym::SYM, #NAME, VERSION})

std::vector<Row> checked_rows() {
  std::vector<Row> rows;
  AP_SYMBOL(init, cuInit, 2000);
  AP_SYMBOL(driver_get_version, cuDriverGetVersion, 2020);
  AP_SYMBOL(device_get, cuDeviceGet, 2000);
  AP_SYMBOL(device_get_count, cuDeviceGetCount, 2000);
  AP_SYMBOL(device_get_attribute, cuDeviceGetAttribute, 2000);
  AP_SYMBOL(device_get_name, cuDeviceGetName, 2000);
  AP_SYMBOL(device_total_mem, cuDeviceTotalMem, 3020);
  AP_SYMBOL(primary_ctx_retain, cuDevicePrimaryCtxRetain, 7000);
  AP_SYMBOL(primary_ctx_release, cuDevicePrimaryCtxRelease, 11000);
  AP_SYMBOL(ctx_set_current, cuCtxSetCurrent, 4000);
  AP_SYMBOL(ctx_push_current, cuCtxPushCurrent, 4000);
  AP_SYMBOL(ctx_pop_current, cuCtxPopCurrent, 4000);
  AP_SYMBOL(ctx_get_stream_priority_range, cuCtxGetStreamPriorityRange, 5050);
  AP_SYMBOL(stream_create_with_priority, cuStreamCreateWithPriority, 5050);
  AP_SYMBOL(stream_destroy, cuStreamDestroy, 4000);
  AP_SYMBOL(stream_synchronize, cuStreamSynchronize, 2000);
  AP_SYMBOL(mem_get_info, cuMemGetInfo, 3020);
  AP_SYMBOL(get_error_name, cuGetErrorName, 6000);
  AP_SYMBOL(get_error_string, cuGetErrorString, 6000);
  AP_SYMBOL(device_get_dev_resource, cuDeviceGetDevResource, 12040);
  AP_SYMBOL(dev_sm_resource_split_by_count, cuDevSmResourceSplitByCount, 12040);
  AP_SYMBOL(dev_resource_generate_desc, cuDevResourceGenerateDesc, 12040);
  AP_SYMBOL(green_ctx_create, cuGreenCtxCreate, 12040);
  AP_SYMBOL(green_ctx_destroy, cuGreenCtxDestroy, 12040);
  AP_SYMBOL(ctx_from_green_ctx, cuCtxFromGreenCtx, 12040);
  AP_SYMBOL(green_ctx_stream_create, cuGreenCtxStreamCreate, 12050);
  return rows;
}
#undef AP_SYMBOL

}  // namespace

TEST(CudaAbi, EverySymbolTableRowIsTheVersionWhoseSignatureWasChecked) {
  const auto rows = checked_rows();
  const auto specs = gpu::symbol_specs();
  ASSERT_EQ(rows.size(), specs.size()) << "an entry point lacks its PFN check here";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].sym, specs[i].sym) << rows[i].name;
    EXPECT_EQ(rows[i].name, specs[i].name);
    EXPECT_EQ(rows[i].version, specs[i].version) << rows[i].name;
  }
}

TEST(CudaAbi, GreenContextVersionsAreTheHeadersFirstVersions) {
  EXPECT_EQ(cu::kVersionGreenContexts, 12040);
  EXPECT_EQ(cu::kVersionGreenCtxStreamCreate, 12050);
  EXPECT_GE(CUDA_VERSION, cu::kVersionGreenCtxStreamCreate);
}

#else

TEST(CudaAbi, NeedsTheCudaToolkitHeaders) {
  GTEST_SKIP() << "the CUDA toolkit's cuda.h was not found at configure time, so cuda_abi.hpp "
                  "could not be compared with it (CI has it)";
}

#endif
