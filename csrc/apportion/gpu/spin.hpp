// A calibrated busy kernel for GPU tests and benchmarks: each block spins for a wall-clock time
// measured by the GPU's global nanosecond timer and records the SM it ran on. Built only when
// CUDA is on (APPORTION_WITH_CUDA); it uses the CUDA runtime, linked statically, never libcuda.
// Streams are passed as integers (a cudaStream_t is a CUstream), device buffers as pointers.
#pragma once

#if defined(APPORTION_WITH_CUDA)

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace apportion::gpu {

/// SM ids a mask can hold; %smid is below %nsmid, which no current GPU puts above this.
inline constexpr int kSpinMaskBits = 512;

/// Launches `blocks` blocks of `threads` threads that each spin for `micros` microseconds on
/// `stream` (0: the legacy default stream) of `device`. Block b writes its SM id to
/// sm_ids_device[b] when that (device) pointer is non-null, and sets bit smid in sm_mask_device
/// (kSpinMaskBits bits) when non-null. Asynchronous. Returns the cudaError_t (0: launched).
/// Safe from any thread; the calling thread's current device is restored before returning.
int launch_spin(std::uintptr_t stream, double micros, int blocks, int* sm_ids_device,
                int threads = 32, int device = 0, unsigned* sm_mask_device = nullptr) noexcept;

/// cudaGetErrorName + cudaGetErrorString of a code the functions here return.
std::string spin_error_string(int code);

/// CUDA devices visible to the runtime; 0 when there is no driver or device (never throws).
int spin_device_count() noexcept;

/// cudaStreamSynchronize on `device`. Returns the cudaError_t.
int spin_stream_synchronize(std::uintptr_t stream, int device = 0) noexcept;

/// Device memory of `count` ints (zeroed), freed by the destructor. Throws std::runtime_error
/// when allocation fails.
class SpinBuffer {
 public:
  SpinBuffer(std::size_t count, int device = 0);
  ~SpinBuffer();
  SpinBuffer(const SpinBuffer&) = delete;
  SpinBuffer& operator=(const SpinBuffer&) = delete;
  int* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return count_; }
  /// Copies the contents to the host (synchronises the device's legacy stream first).
  std::vector<int> read() const;
  void clear();

 private:
  int* data_ = nullptr;
  std::size_t count_ = 0;
  int device_ = 0;
};

/// Distinct SM ids set in a mask buffer of kSpinMaskBits bits, ascending.
std::vector<int> sm_ids_from_mask(const std::vector<int>& mask_words);

struct SpinTimes {
  std::vector<double> micros;   ///< host-measured launch-to-completion time of each kernel
  std::vector<int> sm_ids;      ///< distinct SMs any block ran on, ascending
};

/// Runs `iterations` spin kernels one after another on `stream`, each timed from launch to the
/// end of cudaStreamSynchronize. Blocks the calling thread. Throws std::runtime_error on a CUDA
/// error.
SpinTimes time_spins(std::uintptr_t stream, double micros, int blocks, int threads,
                     int iterations, int device = 0);

/// Keeps `stream` saturated with spin kernels (micros x blocks x threads each) from a background
/// thread until stop(), with at most two batches queued so stop() returns within about two
/// batches. Records every SM its blocks ran on. The constructor returns once the first batch is
/// queued (or launching failed), so a stop() right after it still finds the stream flooded.
/// Every CUDA call's result is checked; the first failure is what stop() throws.
class SpinFlood {
 public:
  SpinFlood(std::uintptr_t stream, double micros, int blocks, int threads, int device = 0);
  ~SpinFlood();
  SpinFlood(const SpinFlood&) = delete;
  SpinFlood& operator=(const SpinFlood&) = delete;
  /// Stops launching, waits for what was queued; idempotent. Throws std::runtime_error when a
  /// launch failed.
  void stop();
  std::uint64_t kernels() const noexcept { return kernels_.load(std::memory_order_relaxed); }
  /// Distinct SMs so far (call after stop() for the complete set).
  std::vector<int> sm_ids() const;

 private:
  void run();
  std::uintptr_t stream_;
  double micros_;
  int blocks_;
  int threads_;
  int device_;
  SpinBuffer mask_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> started_{false};
  std::atomic<std::uint64_t> kernels_{0};
  std::atomic<int> error_{0};
  std::thread thread_;
  bool stopped_ = false;
};

}  // namespace apportion::gpu

#endif  // APPORTION_WITH_CUDA
