// The handful of CUDA driver API types and constants the GPU layer uses, declared here with the
// documented ABI values instead of including <cuda.h>: the CPU-only build then has no CUDA
// dependency at all, and the driver itself is only ever reached through function pointers
// resolved at run time (see driver.hpp). Values were checked against cuda.h of CUDA 13.0; the
// static_asserts in driver.cpp pin the layouts we rely on.
#pragma once

#include <cstdint>

namespace apportion::gpu::cu {

using Result = int;   // CUresult
using Device = int;   // CUdevice
using Context = struct CUctx_st*;
using Stream = struct CUstream_st*;
using GreenContext = struct CUgreenCtx_st*;
using ResourceDesc = struct CUdevResourceDesc_st*;

inline constexpr Result kSuccess = 0;
inline constexpr Result kErrorInvalidValue = 1;
inline constexpr Result kErrorOutOfMemory = 2;
inline constexpr Result kErrorNotInitialized = 3;
inline constexpr Result kErrorInsufficientDriver = 35;
inline constexpr Result kErrorNoDevice = 100;
inline constexpr Result kErrorInvalidDevice = 101;
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
struct DevResource {
  int type;
  unsigned char internal_padding[92];
  union {
    SmResource sm;
    unsigned char oversize[48];   // RESOURCE_ABI_EXTERNAL_BYTES
  };
};

/// Driver version numbers are 1000 * major + 10 * minor, as cuDriverGetVersion reports them.
inline constexpr int kVersionGreenContexts = 12040;
inline constexpr int kVersionGreenCtxStreamCreate = 12050;

}  // namespace apportion::gpu::cu
