// The handful of CUDA driver API types, constants and entry-point signatures the GPU layer uses,
// declared here instead of including <cuda.h>: the CPU-only build then has no CUDA dependency at
// all, and the driver itself is only ever reached through function pointers resolved at run time
// (see driver.hpp). Nothing here is trusted by review alone: tests/cpp/gpu/test_gpu_abi.cpp
// compares every value, layout and signature with cuda.h and cudaTypedefs.h wherever the CUDA
// toolkit is installed (CI has it).
#pragma once

#include <cstddef>
#include <cstdint>

// The opaque handle structs, declared at global scope exactly as cuda.h declares them, so our
// handle types are cuda.h's own (the ABI test includes both headers in one translation unit).
struct CUctx_st;
struct CUstream_st;
struct CUgreenCtx_st;
struct CUdevResourceDesc_st;

namespace apportion::gpu::cu {

using Result = int;   // CUresult (an enum of non-negative values; returned as a 32-bit int)
using Device = int;   // CUdevice
using Context = ::CUctx_st*;
using Stream = ::CUstream_st*;
using GreenContext = ::CUgreenCtx_st*;
using ResourceDesc = ::CUdevResourceDesc_st*;

inline constexpr Result kSuccess = 0;
inline constexpr Result kErrorInvalidValue = 1;
inline constexpr Result kErrorOutOfMemory = 2;
inline constexpr Result kErrorNotInitialized = 3;
/// libcuda.so.1 is the toolkit's stub (link-time only) library, not an installed driver.
inline constexpr Result kErrorStubLibrary = 34;
inline constexpr Result kErrorNoDevice = 100;
inline constexpr Result kErrorInvalidDevice = 101;
inline constexpr Result kErrorInvalidContext = 201;
inline constexpr Result kErrorInvalidHandle = 400;
inline constexpr Result kErrorNotFound = 500;
inline constexpr Result kErrorNotSupported = 801;
inline constexpr Result kErrorInvalidResourceConfiguration = 915;

inline constexpr int kAttrMultiprocessorCount = 16;   // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
inline constexpr int kAttrComputeCapabilityMajor = 75;
inline constexpr int kAttrComputeCapabilityMinor = 76;

inline constexpr unsigned kStreamNonBlocking = 0x1;    // CU_STREAM_NON_BLOCKING
inline constexpr unsigned kGreenCtxDefaultStream = 0x1; // CU_GREEN_CTX_DEFAULT_STREAM (required)

inline constexpr int kDevResourceTypeSm = 1;           // CU_DEV_RESOURCE_TYPE_SM

// CUdriverProcAddressQueryResult
inline constexpr int kProcAddressSuccess = 0;
inline constexpr int kProcAddressSymbolNotFound = 1;
inline constexpr int kProcAddressVersionNotSufficient = 2;

/// CUdevSmResource. Drivers before the fields minSmPartitionSize / smCoscheduledAlignment existed
/// leave them as we zeroed them, so a zero means "unknown" (callers fall back to the documented
/// per-architecture guideline).
struct SmResource {
  unsigned sm_count;
  unsigned min_sm_partition_size;
  unsigned sm_coscheduled_alignment;
};

/// CUdevResource (RESOURCE_ABI_VERSION 1): a tagged union whose opaque padding carries the
/// driver's bookkeeping (which split produced it), so copies must be byte-for-byte.
/// Aligned to 8: from CUDA 13.1 the struct ends in a pointer (same size and offsets), and an
/// array of ours handed to a newer driver must meet the alignment it assumes. Over-aligning is
/// harmless for the 13.0 layout (4-byte aligned, 144 bytes either way).
struct alignas(8) DevResource {
  int type;
  unsigned char internal_padding[92];
  union {
    SmResource sm;
    unsigned char oversize[48];   // RESOURCE_ABI_EXTERNAL_BYTES
  };
};
static_assert(sizeof(SmResource) == 12, "CUdevSmResource is three unsigned ints");
static_assert(offsetof(DevResource, sm) == 96,
              "CUdevResource: the union follows a 4-byte type and 92 bytes of padding");
static_assert(sizeof(DevResource) == 144, "CUdevResource (ABI v1) is 144 bytes");

/// Driver version numbers are 1000 * major + 10 * minor, as cuDriverGetVersion reports them.
inline constexpr int kVersionGreenContexts = 12040;
inline constexpr int kVersionGreenCtxStreamCreate = 12050;

/// The C signature of every entry point, as the _vN variant named in driver.cpp's symbol table
/// declares it (cudaTypedefs.h's PFN_<name>_v<N>); enums of cuda.h are passed as int.
namespace fn {
using Init = Result (*)(unsigned);
using DriverGetVersion = Result (*)(int*);
using DeviceGet = Result (*)(Device*, int);
using DeviceGetCount = Result (*)(int*);
using DeviceGetAttribute = Result (*)(int*, int, Device);
using DeviceGetName = Result (*)(char*, int, Device);
using DeviceTotalMem = Result (*)(std::size_t*, Device);
using PrimaryCtxRetain = Result (*)(Context*, Device);
using PrimaryCtxRelease = Result (*)(Device);
using CtxSetCurrent = Result (*)(Context);
using CtxPushCurrent = Result (*)(Context);
using CtxPopCurrent = Result (*)(Context*);
using CtxGetStreamPriorityRange = Result (*)(int*, int*);
using StreamCreateWithPriority = Result (*)(Stream*, unsigned, int);
using StreamDestroy = Result (*)(Stream);
using StreamSynchronize = Result (*)(Stream);
using MemGetInfo = Result (*)(std::size_t*, std::size_t*);
using GetErrorText = Result (*)(Result, const char**);
using DeviceGetDevResource = Result (*)(Device, DevResource*, int);
using SmResourceSplitByCount = Result (*)(DevResource*, unsigned*, const DevResource*,
                                          DevResource*, unsigned, unsigned);
using ResourceGenerateDesc = Result (*)(ResourceDesc*, DevResource*, unsigned);
using GreenCtxCreate = Result (*)(GreenContext*, ResourceDesc, Device, unsigned);
using GreenCtxDestroy = Result (*)(GreenContext);
using CtxFromGreenCtx = Result (*)(Context*, GreenContext);
using GreenCtxStreamCreate = Result (*)(Stream*, GreenContext, unsigned, int);
// The bootstrap, found by dlsym: cuGetProcAddress_v2 (12.0+, with a CUdriverProcAddressQueryResult
// out-parameter) and cuGetProcAddress (11.3-11.8).
using GetProcAddressV2 = Result (*)(const char*, void**, int, std::uint64_t, int*);
using GetProcAddressV1 = Result (*)(const char*, void**, int, std::uint64_t);
}  // namespace fn

}  // namespace apportion::gpu::cu
