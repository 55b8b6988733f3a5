// This file is compiled only into apportion_cuda, which exists only when CUDA is on; the macro
// is normally set on apportion_core's users, not on this target.
#ifndef APPORTION_WITH_CUDA
#define APPORTION_WITH_CUDA 1
#endif
#include "apportion/gpu/spin.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace apportion::gpu {

namespace {

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  // %globaltimer counts wall-clock nanoseconds on every SM alike, so the spin length does not
  // depend on the SM clock (which boosts and throttles); that is the calibration.
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned sm_id() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

__global__ void spin_kernel(unsigned long long nanos, int* sm_ids, unsigned* sm_mask) {
  const unsigned long long start = global_ns();
  if (threadIdx.x == 0) {
    const unsigned sm = sm_id();
    if (sm_ids) sm_ids[blockIdx.x] = static_cast<int>(sm);
    if (sm_mask && sm < kSpinMaskBits) atomicOr(&sm_mask[sm / 32], 1u << (sm % 32));
  }
  while (global_ns() - start < nanos) {
  }
}

// Makes `device` current for the scope and restores the caller's device: a library call must not
// change which device the caller's later runtime calls go to.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      error_ = cudaSetDevice(device);
      restore_ = error_ == cudaSuccess;
    } else if (prev_ != device) {
      error_ = cudaSetDevice(device);
    }
  }
  ~DeviceScope() {
    if (restore_) cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t error() const noexcept { return error_; }

 private:
  int prev_ = -1;
  bool restore_ = false;
  cudaError_t error_ = cudaSuccess;
};

void throw_if(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + spin_error_string(e));
  }
}

cudaError_t launch(std::uintptr_t stream, double micros, int blocks, int threads, int* sm_ids,
                   unsigned* mask) {
  if (blocks < 1 || threads < 1 || threads > 1024 || !(micros >= 0.0)) {
    return cudaErrorInvalidValue;
  }
  const auto nanos = static_cast<unsigned long long>(micros * 1000.0);
  spin_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0,
                reinterpret_cast<cudaStream_t>(stream)>>>(nanos, sm_ids, mask);
  return cudaGetLastError();
}

}  // namespace

int launch_spin(std::uintptr_t stream, double micros, int blocks, int* sm_ids_device, int threads,
                int device, unsigned* sm_mask_device) noexcept {
  DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  return launch(stream, micros, blocks, threads, sm_ids_device, sm_mask_device);
}

std::string spin_error_string(int code) {
  const auto e = static_cast<cudaError_t>(code);
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

int spin_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

int spin_stream_synchronize(std::uintptr_t stream, int device) noexcept {
  DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  return cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream));
}

SpinBuffer::SpinBuffer(std::size_t count, int device) : count_(count), device_(device) {
  DeviceScope scope(device);
  throw_if(scope.error(), "cudaSetDevice");
  void* p = nullptr;
  throw_if(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(int)), "cudaMalloc");
  data_ = static_cast<int*>(p);
  clear();
}

SpinBuffer::~SpinBuffer() {
  if (data_) {
    DeviceScope scope(device_);
    cudaFree(data_);
  }
}

void SpinBuffer::clear() {
  DeviceScope scope(device_);
  throw_if(cudaMemset(data_, 0, std::max<std::size_t>(count_, 1) * sizeof(int)), "cudaMemset");
}

std::vector<int> SpinBuffer::read() const {
  DeviceScope scope(device_);
  std::vector<int> out(count_);
  // cudaMemcpy on the legacy stream waits for the kernels of blocking streams only; callers
  // synchronise their non-blocking streams first.
  throw_if(cudaMemcpy(out.data(), data_, count_ * sizeof(int), cudaMemcpyDeviceToHost),
           "cudaMemcpy");
  return out;
}

std::vector<int> sm_ids_from_mask(const std::vector<int>& words) {
  std::vector<int> out;
  for (std::size_t w = 0; w < words.size(); ++w) {
    const auto bits = static_cast<unsigned>(words[w]);
    for (unsigned b = 0; b < 32; ++b) {
      if (bits & (1u << b)) out.push_back(static_cast<int>(w * 32 + b));
    }
  }
  return out;
}

SpinTimes time_spins(std::uintptr_t stream, double micros, int blocks, int threads,
                     int iterations, int device) {
  DeviceScope scope(device);
  throw_if(scope.error(), "cudaSetDevice");
  SpinBuffer mask(kSpinMaskBits / 32, device);
  SpinTimes out;
  out.micros.reserve(static_cast<std::size_t>(std::max(iterations, 0)));
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  for (int i = 0; i < iterations; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    throw_if(launch(stream, micros, blocks, threads, nullptr,
                    reinterpret_cast<unsigned*>(mask.data())),
             "spin kernel launch");
    throw_if(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    const auto t1 = std::chrono::steady_clock::now();
    out.micros.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  out.sm_ids = sm_ids_from_mask(mask.read());
  return out;
}

SpinFlood::SpinFlood(std::uintptr_t stream, double micros, int blocks, int threads, int device)
    : stream_(stream),
      micros_(micros),
      blocks_(blocks),
      threads_(threads),
      device_(device),
      mask_(kSpinMaskBits / 32, device) {
  thread_ = std::thread([this] { run(); });
  // Until the first batch is queued a stop() could end the flood before it began, and the
  // caller would measure an idle stream: the constructor returns once the stream is busy (or the
  // launch failed, which stop() reports).
  started_.wait(false);
}

SpinFlood::~SpinFlood() {
  try {
    stop();
  } catch (...) {  // a destructor cannot report a launch failure; stop() callers see it
  }
}

void SpinFlood::run() {
  auto signal_started = [this] {
    started_.store(true);
    started_.notify_all();
  };
  // The first failure is the one worth reporting; later ones are usually its consequences.
  auto fail = [this](cudaError_t r) {
    int none = 0;
    error_.compare_exchange_strong(none, static_cast<int>(r));
    stop_.store(true);
  };
  if (auto r = cudaSetDevice(device_); r != cudaSuccess) {
    fail(r);
    signal_started();
    return;
  }
  cudaEvent_t done[2] = {nullptr, nullptr};
  for (auto& e : done) {
    if (auto r = cudaEventCreateWithFlags(&e, cudaEventDisableTiming); r != cudaSuccess) {
      fail(r);
      break;
    }
  }
  const auto s = reinterpret_cast<cudaStream_t>(stream_);
  // Batches of about 2 ms; waiting for batch k-1 after queueing batch k keeps the stream always
  // busy yet never more than two batches deep, so stop() is quick.
  const int batch = std::max(1, static_cast<int>(2000.0 / std::max(micros_, 1.0)));
  auto* mask = reinterpret_cast<unsigned*>(mask_.data());
  for (std::uint64_t k = 0; !stop_.load(std::memory_order_relaxed); ++k) {
    for (int i = 0; i < batch; ++i) {
      if (auto r = launch(stream_, micros_, blocks_, threads_, nullptr, mask); r != cudaSuccess) {
        fail(r);
        break;
      }
      kernels_.fetch_add(1, std::memory_order_relaxed);
    }
    if (k == 0) signal_started();
    if (stop_.load(std::memory_order_relaxed)) break;
    if (auto r = cudaEventRecord(done[k % 2], s); r != cudaSuccess) {
      fail(r);
      break;
    }
    if (k > 0) {
      if (auto r = cudaEventSynchronize(done[(k + 1) % 2]); r != cudaSuccess) fail(r);
    }
  }
  signal_started();
  if (auto r = cudaStreamSynchronize(s); r != cudaSuccess) fail(r);
  for (auto& e : done) {
    if (e) {
      if (auto r = cudaEventDestroy(e); r != cudaSuccess) fail(r);
    }
  }
}

void SpinFlood::stop() {
  if (stopped_) return;
  stopped_ = true;
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  if (int e = error_.load(); e != 0) {
    throw std::runtime_error("spin flood failed: " + spin_error_string(e));
  }
}

std::vector<int> SpinFlood::sm_ids() const { return sm_ids_from_mask(mask_.read()); }

}  // namespace apportion::gpu
