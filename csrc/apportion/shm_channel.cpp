#include "apportion/shm_channel.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <new>

#include "apportion/parking.hpp"

#if defined(__linux__)
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif

namespace apportion {

using shm_detail::Header;
using shm_detail::kLine;
using shm_detail::Ring;

void shared_park_wait(std::atomic<uint32_t>& word, uint32_t expected, int64_t timeout_ns) noexcept {
  // Not FUTEX_WAIT_PRIVATE: the waker is another process (see the header).
  park_wait(word, expected, timeout_ns, ParkScope::shared);
}

void shared_park_wake(std::atomic<uint32_t>& word, int count) noexcept {
  park_wake(word, count, ParkScope::shared);
}

namespace {

constexpr uint64_t kMagic = 0x61707072'6f636831ULL;  // "apprhoc1"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kKindMessage = 1;
constexpr uint32_t kKindSkip = 2;  // the rest of the ring up to its end is padding

// Every frame starts on a cache line, so a frame's header never shares a line with the
// previous frame's tail bytes that the consumer may still be reading.
struct FrameHeader {
  uint64_t bytes;  // the whole frame, header included, a multiple of kLine
  uint32_t kind;
  uint32_t parts;
  // followed by `parts` uint64_t lengths, then the parts, each starting on a cache line
};
static_assert(sizeof(FrameHeader) == 16, "frame layout is shared between processes");

constexpr uint64_t round_up(uint64_t n) { return (n + kLine - 1) / kLine * kLine; }

uint64_t header_bytes(std::size_t parts) { return round_up(sizeof(FrameHeader) + 8 * parts); }

uint64_t frame_bytes(std::span<const std::span<const std::byte>> parts) {
  uint64_t n = header_bytes(parts.size());
  for (const auto& p : parts) n += round_up(p.size());
  return n;
}

std::string errno_text(const char* what, const std::string& name, int err = errno) {
  return std::string(what) + " " + name + ": " + std::strerror(err);
}

#if defined(__linux__)
uint64_t page_bytes() {
  static const uint64_t n = [] {
    const long p = ::sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<uint64_t>(p) : uint64_t{4096};
  }();
  return n;
}
#endif

}  // namespace

ShmChannel::ShmChannel(std::string name, int fd, void* base, std::size_t map_bytes, bool owner, Side side)
    : name_(std::move(name)), fd_(fd), base_(base), map_bytes_(map_bytes), owner_(owner), side_(side) {
  ring_bytes_ = static_cast<Header*>(base_)->ring_bytes;
}

std::unique_ptr<ShmChannel> ShmChannel::create(const std::string& name, std::size_t ring_bytes,
                                               std::string* error) {
#if defined(__linux__)
  ring_bytes = static_cast<std::size_t>(round_up(std::max<std::size_t>(ring_bytes, 4 * kLine)));
  const std::size_t total = sizeof(Header) + 2 * ring_bytes;
  const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    if (error) *error = errno_text("shm_open", name);
    return nullptr;
  }
  // Sparse: only the header is backed now; each sender reserves the part of its ring that its
  // messages reach (see reserve_out and the send() reuse rule).
  if (::ftruncate(fd, static_cast<off_t>(total)) != 0) {
    if (error) *error = errno_text("ftruncate", name);
    ::close(fd);
    ::shm_unlink(name.c_str());
    return nullptr;
  }
  if (const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(sizeof(Header))); err != 0) {
    if (error) *error = errno_text("reserving the header of", name, err);
    ::close(fd);
    ::shm_unlink(name.c_str());
    return nullptr;
  }
  void* base = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    if (error) *error = errno_text("mmap", name);
    ::close(fd);
    ::shm_unlink(name.c_str());
    return nullptr;
  }
  auto* h = new (base) Header{};
  h->ring_bytes = ring_bytes;
  h->version = kVersion;
  // Published last: open() refuses a segment whose magic is not set yet.
  std::atomic_ref<uint64_t>(h->magic).store(kMagic, std::memory_order_release);
  return std::unique_ptr<ShmChannel>(new ShmChannel(name, fd, base, total, true, Side::parent));
#else
  (void)name;
  (void)ring_bytes;
  if (error) *error = "shared-memory channels need Linux";
  return nullptr;
#endif
}

std::unique_ptr<ShmChannel> ShmChannel::open(const std::string& name, std::string* error) {
#if defined(__linux__)
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    if (error) *error = errno_text("shm_open", name);
    return nullptr;
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) < sizeof(Header)) {
    if (error) *error = "segment " + name + " is too small to be a channel";
    ::close(fd);
    return nullptr;
  }
  const auto total = static_cast<std::size_t>(st.st_size);
  void* base = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    if (error) *error = errno_text("mmap", name);
    ::close(fd);
    return nullptr;
  }
  auto* h = static_cast<Header*>(base);
  if (std::atomic_ref<uint64_t>(h->magic).load(std::memory_order_acquire) != kMagic ||
      h->version != kVersion || sizeof(Header) + 2 * h->ring_bytes != total) {
    if (error) *error = "segment " + name + " is not an apportion channel of this version";
    ::munmap(base, total);
    ::close(fd);
    return nullptr;
  }
  return std::unique_ptr<ShmChannel>(new ShmChannel(name, fd, base, total, false, Side::child));
#else
  (void)name;
  if (error) *error = "shared-memory channels need Linux";
  return nullptr;
#endif
}

ShmChannel::~ShmChannel() {
  if (owner_) unlink();
#if defined(__linux__)
  if (base_ != nullptr) ::munmap(base_, map_bytes_);
  if (fd_ >= 0) ::close(fd_);
#endif
}

int64_t ShmChannel::free_bytes() const noexcept {
#if defined(__linux__)
  struct statvfs st {};
  if (::fstatvfs(fd_, &st) != 0) return -1;
  return static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
#else
  return -1;
#endif
}

bool ShmChannel::reserve_out(uint64_t end) noexcept {
  // `end`: how far into the outgoing data area the next frame (and a skip header before it)
  // reaches. Reserved in whole pages; the reservation is never given back while the channel
  // lives, so a steady stream of same-sized messages costs no syscall.
  if (end <= out_reserved_) return true;
#if defined(__linux__)
  end = std::min<uint64_t>((end + page_bytes() - 1) / page_bytes() * page_bytes(), ring_bytes_);
  const uint64_t area = sizeof(Header) + (side_ == Side::parent ? 0 : ring_bytes_);
  // posix_fallocate fails with ENOSPC when tmpfs cannot back the range, and tmpfs frees what
  // it allocated for a failed call, so a refused message leaves the free space as it was.
  // Where fallocate is unsupported, glibc writes the blocks instead, which fails the same way.
  const int err = ::posix_fallocate(fd_, static_cast<off_t>(area + out_reserved_),
                                    static_cast<off_t>(end - out_reserved_));
  if (err != 0) {
    reserve_errno_ = err;
    return false;
  }
  out_reserved_ = end;
  return true;
#else
  return false;
#endif
}

void ShmChannel::unlink() noexcept {
#if defined(__linux__)
  if (!unlinked_) ::shm_unlink(name_.c_str());
#endif
  unlinked_ = true;
}

std::size_t ShmChannel::max_message_bytes(std::size_t parts) const noexcept {
  // Each part is padded to a cache line; with p parts at most p - 1 lines' worth of padding
  // can push the frame past what the payload alone needs (both are multiples of a line).
  const uint64_t framing = header_bytes(parts) + (parts > 0 ? parts - 1 : 0) * kLine;
  return ring_bytes_ > framing ? ring_bytes_ - framing : 0;
}

Ring& ShmChannel::out_ring() noexcept {
  return static_cast<Header*>(base_)->rings[side_ == Side::parent ? 0 : 1];
}
Ring& ShmChannel::in_ring() noexcept {
  return static_cast<Header*>(base_)->rings[side_ == Side::parent ? 1 : 0];
}
std::byte* ShmChannel::out_data() noexcept {
  return static_cast<std::byte*>(base_) + sizeof(Header) + (side_ == Side::parent ? 0 : ring_bytes_);
}
const std::byte* ShmChannel::in_data() const noexcept {
  return static_cast<const std::byte*>(base_) + sizeof(Header) + (side_ == Side::parent ? ring_bytes_ : 0);
}

bool ShmChannel::wait_event(std::atomic<uint32_t>& event, std::atomic<uint32_t>& waiters,
                            const std::atomic<uint64_t>& watched, uint64_t unchanged_value,
                            int64_t spin_ns, int64_t deadline_ns) {
  // Spinning first answers a peer that replies within microseconds without two futex
  // syscalls (~5 us each here); the spin is bounded by time so an idle side stops burning its
  // core quickly, and it backs off where it does not pay (AdaptiveSpin).
  spin_ns = spin_.budget(spin_ns);
  if (spin_ns > 0) {
    const int64_t spin_end = now_ns() + spin_ns;
    for (;;) {
      if (watched.load(std::memory_order_acquire) != unchanged_value) {
        spin_.caught();
        return true;
      }
      if (now_ns() >= spin_end) break;
      cpu_relax();
    }
    spin_.ran_out();
  } else if (watched.load(std::memory_order_acquire) != unchanged_value) {
    return true;
  }
  for (;;) {
    // Register, read the event, re-check: the other side bumps the event (seq_cst) after
    // changing `watched` and then reads `waiters` (seq_cst), so either it sees us and wakes
    // us, or we see its change here or in the futex's value check.
    waiters.fetch_add(1, std::memory_order_seq_cst);
    const uint32_t seen = event.load(std::memory_order_seq_cst);
    if (watched.load(std::memory_order_seq_cst) != unchanged_value) {
      waiters.fetch_sub(1, std::memory_order_relaxed);
      return true;
    }
    int64_t left = -1;
    if (deadline_ns >= 0) {
      left = deadline_ns - now_ns();
      if (left <= 0) {
        waiters.fetch_sub(1, std::memory_order_relaxed);
        return false;
      }
    }
    shared_park_wait(event, seen, left);
    waiters.fetch_sub(1, std::memory_order_relaxed);
    if (watched.load(std::memory_order_acquire) != unchanged_value) return true;
  }
}

namespace {
void signal_event(std::atomic<uint32_t>& event, std::atomic<uint32_t>& waiters) {
  event.fetch_add(1, std::memory_order_seq_cst);
  if (waiters.load(std::memory_order_seq_cst) != 0) shared_park_wake(event, INT_MAX);
}
}  // namespace

ChannelStatus ShmChannel::send(std::span<const std::span<const std::byte>> parts, int64_t spin_ns,
                               int64_t timeout_ns) {
  const uint64_t need = frame_bytes(parts);
  if (need > ring_bytes_) return ChannelStatus::too_large;
  const int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
  Ring& r = out_ring();
  std::byte* data = out_data();
  const uint64_t cap = ring_bytes_;
  uint64_t head = r.head.load(std::memory_order_relaxed);  // only this thread writes it
  uint64_t start = head;
  uint64_t offset = head % cap;
  // Where the frame goes: at `head`, or at the ring's start when it would run past the end
  // (a skip frame pads the rest). When the ring is empty and the frame also fits before the
  // current offset, restart at the ring's start anyway: messages then keep reusing the same
  // first pages instead of touching the whole ring over time (the segment is sparse).
  uint64_t tail = r.tail.load(std::memory_order_acquire);
  // Waits (spin, then park) while `full()` holds, reading the reader's tail anew each time.
  const auto wait_while = [&](auto&& full) {
    while (full()) {
      if (!wait_event(r.space_event, r.space_waiters, r.tail, tail, spin_ns, deadline)) return false;
      tail = r.tail.load(std::memory_order_acquire);
    }
    return true;
  };
  const auto put_skip = [&] {  // pads from `offset` to the ring's end
    FrameHeader skip{cap - offset, kKindSkip, 0};
    std::memcpy(data + offset, &skip, sizeof skip);
  };
  if (offset + need > cap && need > offset) {
    // At the ring's start the frame would cover the skip frame's own header (at `offset`),
    // so the two cannot be published together: once the ring is empty the skip goes alone,
    // the reader passes it at once (receive), and the frame follows at the ring's start.
    // (Counting the skipped bytes as taken, the pair needed more than the whole ring: a
    // message larger than the space before the end and than the one before it waited for
    // ever.)
    if (!reserve_out(std::max(offset + sizeof(FrameHeader), need))) return ChannelStatus::no_space;
    if (!wait_while([&] { return tail != head; })) return ChannelStatus::timeout;
    put_skip();
    head += cap - offset;
    r.head.store(head, std::memory_order_release);
    signal_event(r.data_event, r.data_waiters);
    start = head;
    offset = 0;
  } else if (offset + need > cap || (tail == head && offset != 0 && need <= offset)) {
    start = head + (cap - offset);
  }
  const uint64_t end = start + need;
  // Before any byte is written (or any wait for room): a message the filesystem cannot back
  // fails now, whole, instead of a SIGBUS in the middle of the copy (or in the peer).
  const uint64_t reach = std::max(start != head ? offset + sizeof(FrameHeader) : 0, start % cap + need);
  if (!reserve_out(reach)) return ChannelStatus::no_space;
  if (!wait_while([&] { return end - tail > cap; })) return ChannelStatus::timeout;
  if (start != head) put_skip();
  std::byte* frame = data + start % cap;
  FrameHeader fh{need, kKindMessage, static_cast<uint32_t>(parts.size())};
  std::memcpy(frame, &fh, sizeof fh);
  uint64_t at = header_bytes(parts.size());
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const uint64_t len = parts[i].size();
    std::memcpy(frame + sizeof fh + 8 * i, &len, 8);
    if (len != 0) std::memcpy(frame + at, parts[i].data(), len);
    at += round_up(len);
  }
  // Release: the frame bytes above are visible to a consumer that acquires the new head.
  r.head.store(end, std::memory_order_release);
  signal_event(r.data_event, r.data_waiters);
  return ChannelStatus::ok;
}

ChannelStatus ShmChannel::receive(std::vector<std::span<const std::byte>>& parts, int64_t spin_ns,
                                  int64_t timeout_ns) {
  parts.clear();
  const int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
  Ring& r = in_ring();
  const std::byte* data = in_data();
  const uint64_t cap = ring_bytes_;
  uint64_t tail = r.tail.load(std::memory_order_relaxed);  // only this thread writes it
  if (pending_release_ != 0) tail = pending_release_;      // a message still held: skip it
  FrameHeader fh{};
  // The peer writes the ring's head and every frame: none of it is trusted. A frame must lie
  // within what the head published and within the ring, in one piece (send() never wraps a
  // frame: a skip pads to the ring's end), and its parts within the frame; otherwise the
  // peer's memory was overwritten (a native bug in a child's model) and reading on would read
  // past the mapping.
  // Reads the header of the frame at `at` into fh; false when it is no frame send() writes.
  const auto read_header = [&](uint64_t at) {
    const uint64_t published = r.head.load(std::memory_order_acquire) - at;
    if (published > cap || published < sizeof(FrameHeader)) return false;
    std::memcpy(&fh, data + at % cap, sizeof fh);
    const uint64_t room = cap - at % cap;
    if (fh.kind == kKindSkip) return fh.bytes == room && fh.bytes <= published;
    return fh.kind == kKindMessage && fh.bytes >= sizeof(FrameHeader) && fh.bytes % kLine == 0 &&
           fh.bytes <= published && fh.bytes <= room && fh.parts <= (fh.bytes - sizeof(FrameHeader)) / 8 &&
           header_bytes(fh.parts) <= fh.bytes;
  };
  for (;;) {
    if (r.head.load(std::memory_order_acquire) == tail &&
        !wait_event(r.data_event, r.data_waiters, r.head, tail, spin_ns, deadline)) {
      return ChannelStatus::timeout;
    }
    if (!read_header(tail)) return ChannelStatus::corrupt;
    if (fh.kind != kKindSkip) break;
    tail += fh.bytes;
    if (r.head.load(std::memory_order_acquire) != tail) {
      // The producer published the skip and the frame after it with one head store: a message
      // (a skip pads to the ring's end, so a second one would be the whole ring).
      if (!read_header(tail) || fh.kind != kKindMessage) return ChannelStatus::corrupt;
      break;
    }
    // A skip published alone (see send): passed at once, so that the producer finds the
    // room at the ring's start it waits for. It only does that on an empty ring, so no
    // message is held here.
    if (pending_release_ == 0) {
      r.tail.store(tail, std::memory_order_release);
      signal_event(r.space_event, r.space_waiters);
    }
  }
  const std::byte* frame = data + tail % cap;
  uint64_t at = header_bytes(fh.parts);
  parts.reserve(fh.parts);
  for (uint32_t i = 0; i < fh.parts; ++i) {
    uint64_t len = 0;
    std::memcpy(&len, frame + sizeof fh + 8 * i, 8);
    if (len > fh.bytes - at || round_up(len) > fh.bytes - at) {  // (at <= fh.bytes holds here)
      parts.clear();
      return ChannelStatus::corrupt;
    }
    parts.emplace_back(frame + at, static_cast<std::size_t>(len));
    at += round_up(len);
  }
  pending_release_ = tail + fh.bytes;
  return ChannelStatus::ok;
}

void ShmChannel::release() noexcept {
  if (pending_release_ == 0) return;
  Ring& r = in_ring();
  // Release: our reads of the frame happen before the producer may overwrite it.
  r.tail.store(pending_release_, std::memory_order_release);
  pending_release_ = 0;
  signal_event(r.space_event, r.space_waiters);
}

bool ShmChannel::readable() const noexcept {
  const Ring& r = const_cast<ShmChannel*>(this)->in_ring();
  return r.head.load(std::memory_order_acquire) != r.tail.load(std::memory_order_relaxed);
}

bool ShmChannel::sent_unread() const noexcept {
  const Ring& r = const_cast<ShmChannel*>(this)->out_ring();
  return r.tail.load(std::memory_order_acquire) != r.head.load(std::memory_order_relaxed);
}

}  // namespace apportion
