// A two-way message channel between two processes, in one POSIX shared-memory segment.
//
// Each direction is a single-producer single-consumer byte ring: a message (a few parts, e.g. a
// pickle and its out-of-band buffers) is copied once into the ring by the sender and read in
// place by the receiver, which then releases it. Variable-size messages go straight into the
// ring, so there is no separate payload allocator whose state would have to be recovered after
// a crash: the only shared state is two 64-bit positions per ring.
//
// Everything in the segment is position-independent (offsets, never pointers): the two
// processes map it at different addresses. Wake-ups use futexes on words in the mapping
// WITHOUT FUTEX_PRIVATE (the private variant hashes on the virtual address, which differs
// between the processes, so a private wake would never reach the other side).
//
// Who may call what: one thread sends and one thread receives on each side; the parent sends
// requests and receives responses, the child the reverse. Every wait takes a timeout, so the
// caller can check the peer's liveness between waits (a crashed peer never wakes anyone).
//
// Backing store: the segment is sparse (a tmpfs file), and a store to a page that tmpfs cannot
// back (a full /dev/shm: Docker gives 64 MiB by default) is a SIGBUS in whichever process
// touches it first. So nothing is ever written to a page that was not reserved first: the
// header at creation, and each ring's data area as a growing prefix, reserved by its sender
// (posix_fallocate) before a frame goes past it. A message that cannot be reserved fails that
// send with no_space; the channel stays usable. Creation stays cheap (one header's worth),
// and memory follows the largest message actually sent.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "apportion/parking.hpp"

namespace apportion {

/// Blocks while `word == expected`, at most `timeout_ns` (< 0: no limit). The word may live in
/// memory shared with another process. May return spuriously. Safe from any thread.
void shared_park_wait(std::atomic<uint32_t>& word, uint32_t expected, int64_t timeout_ns) noexcept;

/// Wakes up to `count` waiters on `word`, in any process that maps it. Safe from any thread.
void shared_park_wake(std::atomic<uint32_t>& word, int count) noexcept;

namespace shm_detail {

inline constexpr std::size_t kLine = 64;

// One direction. head/tail count bytes since creation and never wrap (2^64 bytes is centuries
// of traffic), so head - tail is the ring's fill even across the byte ring's wrap-around.
struct alignas(kLine) Ring {
  alignas(kLine) std::atomic<uint64_t> head{0};  // written by the producer: bytes published
  alignas(kLine) std::atomic<uint64_t> tail{0};  // written by the consumer: bytes released
  // Each event word is bumped after its condition changes; a waiter registers in `*_waiters`
  // first, so the other side makes the wake syscall only when someone sleeps.
  alignas(kLine) std::atomic<uint32_t> data_event{0};
  std::atomic<uint32_t> data_waiters{0};
  alignas(kLine) std::atomic<uint32_t> space_event{0};
  std::atomic<uint32_t> space_waiters{0};
};

struct alignas(kLine) Header {
  uint64_t magic = 0;
  uint32_t version = 0;
  uint32_t reserved = 0;
  uint64_t ring_bytes = 0;  // capacity of each ring's data area, a multiple of kLine
  Ring rings[2];            // [0]: parent -> child, [1]: child -> parent
};

static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free,
              "the rings are shared between processes: their atomics must be lock-free, not "
              "guarded by a process-local lock");
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex needs a plain 32-bit word");
static_assert(sizeof(Header) % kLine == 0, "the data areas start on a cache line");

}  // namespace shm_detail

/// Outcome of a send or receive. no_space: the shared-memory filesystem could not back the
/// message (nothing was written; smaller messages may still go). corrupt (receive): the peer's
/// ring holds a frame no send() writes (its head, a frame's size, kind, part count or lengths
/// out of bounds): the peer's memory was overwritten; nothing is read past the ring, and the
/// channel is to be closed.
enum class ChannelStatus { ok, timeout, too_large, no_space, corrupt };

/// One shared-memory segment holding a request ring and a response ring.
class ShmChannel {
 public:
  enum class Side { parent, child };

  /// Creates the segment `name` ("/..." as shm_open wants it; must not exist) with rings of
  /// `ring_bytes` each (rounded up to 64). nullptr and `error` on failure. The creator owns the
  /// name: it is unlinked by unlink() or when the channel is destroyed.
  static std::unique_ptr<ShmChannel> create(const std::string& name, std::size_t ring_bytes,
                                            std::string* error);
  /// Maps an existing segment created by the parent. nullptr and `error` on failure.
  static std::unique_ptr<ShmChannel> open(const std::string& name, std::string* error);

  ShmChannel(const ShmChannel&) = delete;
  ShmChannel& operator=(const ShmChannel&) = delete;
  ~ShmChannel();

  /// Removes the name (the mappings stay valid for both sides). Idempotent; either side may
  /// call it: the opener does as soon as it mapped the segment, so no name outlives a parent
  /// that dies while its child is still starting. Only the creator's destructor unlinks.
  void unlink() noexcept;
  const std::string& name() const noexcept { return name_; }
  std::size_t ring_bytes() const noexcept { return ring_bytes_; }
  /// The most payload bytes (summed over `parts` parts of any sizes) that always fit the ring.
  std::size_t max_message_bytes(std::size_t parts) const noexcept;

  /// Bytes free on the filesystem that holds the segment (/dev/shm), -1 if unknown. Safe from
  /// any thread; best effort (other processes use it too).
  int64_t free_bytes() const noexcept;
  /// Bytes of the outgoing ring's data area reserved so far (the prefix a send may write).
  std::size_t reserved_bytes() const noexcept { return static_cast<std::size_t>(out_reserved_); }
  /// The errno of the last failed reservation (a no_space send), 0 if none failed.
  int reserve_errno() const noexcept { return reserve_errno_; }

  /// Copies `parts` as one message into the outgoing ring. Reserves the backing store for it
  /// first (no_space, with nothing written, if the filesystem cannot back it). Spins up to
  /// `spin_ns` for space, then parks; gives up after `timeout_ns` (< 0: no limit). One sender
  /// thread per side.
  ChannelStatus send(std::span<const std::span<const std::byte>> parts, int64_t spin_ns,
                     int64_t timeout_ns);

  /// Waits for the next incoming message: spins up to `spin_ns`, then parks, at most
  /// `timeout_ns` (< 0: no limit). On ok, `parts` views the message in the ring until
  /// release(). One receiver thread per side. Spinning backs off per side where it does not
  /// pay (see AdaptiveSpin).
  ChannelStatus receive(std::vector<std::span<const std::byte>>& parts, int64_t spin_ns,
                        int64_t timeout_ns);
  /// Whether this side's waits currently park at once (spinning kept failing).
  bool spin_suspended() const noexcept { return spin_.suspended(); }

  /// Frees the message returned by the last successful receive().
  void release() noexcept;

  /// Whether a message is waiting (best effort).
  bool readable() const noexcept;
  /// Whether a message this side sent has not been taken by the peer yet. After the peer
  /// died this tells a request it never saw (safe to send again) from one it may have run.
  bool sent_unread() const noexcept;

 private:
  ShmChannel(std::string name, int fd, void* base, std::size_t map_bytes, bool owner, Side side);
  bool reserve_out(uint64_t end) noexcept;
  shm_detail::Ring& out_ring() noexcept;
  shm_detail::Ring& in_ring() noexcept;
  std::byte* out_data() noexcept;
  const std::byte* in_data() const noexcept;
  bool wait_event(std::atomic<uint32_t>& event, std::atomic<uint32_t>& waiters,
                  const std::atomic<uint64_t>& watched, uint64_t unchanged_value, int64_t spin_ns,
                  int64_t deadline_ns);

  std::string name_;
  int fd_ = -1;  // kept open for the reservations (posix_fallocate) and free_bytes()
  void* base_ = nullptr;
  std::size_t map_bytes_ = 0;
  std::size_t ring_bytes_ = 0;
  bool owner_ = false;
  bool unlinked_ = false;
  Side side_;
  uint64_t pending_release_ = 0;  // tail value after the message being read, 0 = none
  // Only this side's sender writes to the outgoing data area, so it alone tracks how much of
  // it is backed (a prefix: send() restarts at the ring's start whenever the ring is empty).
  uint64_t out_reserved_ = 0;
  int reserve_errno_ = 0;
  AdaptiveSpin spin_;  // this side's waits (send for space, receive for data)
};

}  // namespace apportion
