#include "apportion/shm_channel.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_support.hpp"

namespace apportion {
namespace {

using apportion::testing::scaled;
using apportion::testing::Watchdog;
using namespace std::chrono_literals;

constexpr int64_t kSecond = 1'000'000'000;

std::string unique_name(const char* tag) {
  static std::atomic<int> counter{0};
  return "/apportion-test-" + std::to_string(::getpid()) + "-" + tag + "-" + std::to_string(counter++);
}

bool shm_exists(const std::string& name) { return ::access(("/dev/shm" + name).c_str(), F_OK) == 0; }

std::span<const std::byte> bytes_of(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}
std::string string_of(std::span<const std::byte> b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

// Payload i of a fuzz run: its tag and a length that varies so frames straddle the ring's end.
std::string payload(uint64_t i, std::size_t max_len) {
  std::string s = std::to_string(i) + ":";
  const std::size_t len = (i * 7919) % max_len;
  for (std::size_t k = 0; k < len; ++k) s.push_back(static_cast<char>('a' + (i + k) % 26));
  return s;
}

TEST(ShmChannel, SpinningStopsAfterFailedSpinsAndProbesItsWayBack) {
  Watchdog guard(60s);
  std::string error;
  const auto name = unique_name("adaptive");
  auto parent = ShmChannel::create(name, 4096, &error);
  ASSERT_TRUE(parent) << error;
  auto child = ShmChannel::open(name, &error);
  ASSERT_TRUE(child) << error;
  parent->unlink();
  std::vector<std::span<const std::byte>> in;
  const std::string msg = "m";
  const std::vector<std::span<const std::byte>> out{bytes_of(msg)};

  // Nothing comes within a 1 us spin: each spin runs out.
  for (uint32_t i = 0; i < AdaptiveSpin::kFailedSpins; ++i) {
    EXPECT_FALSE(child->spin_suspended()) << i;
    EXPECT_EQ(child->receive(in, 1'000, 0), ChannelStatus::timeout);
  }
  EXPECT_TRUE(child->spin_suspended());

  // Now a message comes 1 ms into each wait, while the wait asks for a spin of 10 s. A spin
  // would catch it and end the suspension at once; parked waits are woken instead, and only
  // every kProbeEvery-th wait spins. (A message that arrives before its wait starts is taken
  // without waiting and does not count: hence "at least".)
  uint32_t rounds = 0;
  while (child->spin_suspended() && rounds < 4 * AdaptiveSpin::kProbeEvery) {
    std::thread sender([&] {
      std::this_thread::sleep_for(1ms);
      ASSERT_EQ(parent->send(out, 0, kSecond), ChannelStatus::ok);
    });
    ASSERT_EQ(child->receive(in, 10 * kSecond, 10 * kSecond), ChannelStatus::ok);
    child->release();
    sender.join();
    ++rounds;
  }
  EXPECT_FALSE(child->spin_suspended()) << "the probe's spin caught a message";
  EXPECT_GE(rounds, AdaptiveSpin::kProbeEvery) << "a wait spun before its probe";
  // The other side keeps its own state: it never spun in vain.
  EXPECT_FALSE(parent->spin_suspended());
}

TEST(ShmChannel, RoundTripsMultiPartMessagesBothWays) {
  Watchdog guard(30s);
  std::string error;
  const auto name = unique_name("basic");
  auto parent = ShmChannel::create(name, 4096, &error);
  ASSERT_TRUE(parent) << error;
  auto child = ShmChannel::open(name, &error);
  ASSERT_TRUE(child) << error;
  EXPECT_EQ(child->ring_bytes(), 4096u);

  const std::string a = "header", b(300, 'x'), empty;
  std::vector<std::span<const std::byte>> out{bytes_of(a), bytes_of(empty), bytes_of(b)};
  ASSERT_EQ(parent->send(out, 0, kSecond), ChannelStatus::ok);
  EXPECT_FALSE(parent->readable());  // it went out, not back in
  EXPECT_TRUE(parent->sent_unread());
  EXPECT_TRUE(child->readable());
  std::vector<std::span<const std::byte>> in;
  ASSERT_EQ(child->receive(in, 0, kSecond), ChannelStatus::ok);
  EXPECT_TRUE(parent->sent_unread()) << "taken only when released";
  child->release();
  EXPECT_FALSE(parent->sent_unread());
  ASSERT_EQ(parent->send(out, 0, kSecond), ChannelStatus::ok);
  ASSERT_EQ(child->receive(in, 0, kSecond), ChannelStatus::ok);
  ASSERT_EQ(in.size(), 3u);
  EXPECT_EQ(string_of(in[0]), a);
  EXPECT_EQ(in[1].size(), 0u);
  EXPECT_EQ(string_of(in[2]), b);
  child->release();

  const std::string reply = "reply";
  std::vector<std::span<const std::byte>> back{bytes_of(reply)};
  ASSERT_EQ(child->send(back, 0, kSecond), ChannelStatus::ok);
  ASSERT_EQ(parent->receive(in, 0, kSecond), ChannelStatus::ok);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(string_of(in[0]), reply);
  parent->release();
}

TEST(ShmChannel, EmptyReceiveTimesOutAndOversizedSendIsRefused) {
  Watchdog guard(30s);
  std::string error;
  auto parent = ShmChannel::create(unique_name("limits"), 1024, &error);
  ASSERT_TRUE(parent) << error;
  std::vector<std::span<const std::byte>> in;
  EXPECT_EQ(parent->receive(in, 1000, 2'000'000), ChannelStatus::timeout);
  EXPECT_TRUE(in.empty());
  const std::string big(parent->max_message_bytes(1) + 1, 'z');
  std::vector<std::span<const std::byte>> out{bytes_of(big)};
  EXPECT_EQ(parent->send(out, 0, kSecond), ChannelStatus::too_large);
  const std::string fits(parent->max_message_bytes(1), 'z');
  out = {bytes_of(fits)};
  EXPECT_EQ(parent->send(out, 0, kSecond), ChannelStatus::ok);
  // The ring is full now: a second send waits for space and times out.
  EXPECT_EQ(parent->send(out, 0, 2'000'000), ChannelStatus::timeout);
}

TEST(ShmChannel, AMessageLargerThanTheRoomBeforeTheEndAndThanTheOneBeforeItGoesThrough) {
  // 0.4 then 0.7 of the ring: the second cannot fit before the end (0.6 left) and, at the
  // ring's start, would cover the skip frame's header at 0.4. It waited for ever (the pair
  // counted as more than the whole ring); now the skip goes alone first.
  Watchdog guard(30s);
  std::string error;
  const auto name = unique_name("wrap");
  auto parent = ShmChannel::create(name, 1 << 16, &error);
  ASSERT_TRUE(parent) << error;
  auto child = ShmChannel::open(name, &error);
  ASSERT_TRUE(child) << error;
  const std::size_t cap = parent->ring_bytes();
  std::vector<std::span<const std::byte>> in;
  for (int round = 0; round < 3; ++round) {  // and again from wherever the last one left off
    for (double share : {0.4, 0.7, 0.2, 0.95, 0.5}) {
      const std::string msg(static_cast<std::size_t>(share * static_cast<double>(parent->max_message_bytes(1))),
                            static_cast<char>('a' + round));
      std::vector<std::span<const std::byte>> out{bytes_of(msg)};
      std::thread reader([&] {
        ASSERT_EQ(child->receive(in, 0, 5 * kSecond), ChannelStatus::ok);
        ASSERT_EQ(in.size(), 1u);
        EXPECT_EQ(string_of(in[0]), msg) << share;
        child->release();
      });
      ASSERT_EQ(parent->send(out, 0, 5 * kSecond), ChannelStatus::ok) << "share " << share << " of " << cap;
      reader.join();
    }
  }
  // The same with the reply direction, and with the reader waiting before the skip arrives.
  const std::string small(cap / 3, 's'), large(cap * 4 / 5, 'l');
  for (const std::string* msg : {&small, &large, &small, &large}) {
    std::thread reader([&] {
      ASSERT_EQ(parent->receive(in, 0, 5 * kSecond), ChannelStatus::ok);
      EXPECT_EQ(in.at(0).size(), msg->size());
      parent->release();
    });
    std::this_thread::sleep_for(2ms);
    std::vector<std::span<const std::byte>> out{bytes_of(*msg)};
    ASSERT_EQ(child->send(out, 0, 5 * kSecond), ChannelStatus::ok);
    reader.join();
  }
  // A held message keeps its room: the large one times out while it is held (nothing of it
  // sent, or only the skip), and goes once it is released, to a reader that receives.
  std::vector<std::span<const std::byte>> out{bytes_of(small)};
  ASSERT_EQ(parent->send(out, 0, kSecond), ChannelStatus::ok);
  ASSERT_EQ(child->receive(in, 0, kSecond), ChannelStatus::ok);
  out = {bytes_of(large)};
  EXPECT_EQ(parent->send(out, 0, 20'000'000), ChannelStatus::timeout);
  child->release();
  std::thread reader([&] {
    ASSERT_EQ(child->receive(in, 0, 5 * kSecond), ChannelStatus::ok);
    EXPECT_EQ(in.at(0).size(), large.size());
    child->release();
  });
  EXPECT_EQ(parent->send(out, 0, 5 * kSecond), ChannelStatus::ok);
  reader.join();
  EXPECT_FALSE(parent->sent_unread());
}

TEST(ShmChannel, NameIsExclusiveAndUnlinkedByItsOwner) {
  std::string error;
  const auto name = unique_name("names");
  {
    auto parent = ShmChannel::create(name, 4096, &error);
    ASSERT_TRUE(parent) << error;
    EXPECT_TRUE(shm_exists(name));
    EXPECT_FALSE(ShmChannel::create(name, 4096, &error));
    EXPECT_NE(error.find("shm_open"), std::string::npos) << error;
    {
      auto child = ShmChannel::open(name, &error);
      ASSERT_TRUE(child) << error;
    }
    EXPECT_TRUE(shm_exists(name)) << "only the creator's destructor removes the name";
    parent->unlink();
    EXPECT_FALSE(shm_exists(name));
    parent->unlink();  // idempotent
  }
  {
    // The opener may remove the name too (a child does, as soon as it mapped the segment); the
    // creator's later unlink is then a no-op.
    const auto early = unique_name("early");
    auto parent = ShmChannel::create(early, 4096, &error);
    ASSERT_TRUE(parent) << error;
    auto child = ShmChannel::open(early, &error);
    ASSERT_TRUE(child) << error;
    child->unlink();
    EXPECT_FALSE(shm_exists(early));
    parent->unlink();
    EXPECT_FALSE(shm_exists(early));
  }
  EXPECT_FALSE(ShmChannel::open(name, &error));
  const auto other = unique_name("dtor");
  { auto p = ShmChannel::create(other, 4096, &error); }
  EXPECT_FALSE(shm_exists(other)) << "destroying the creator unlinks the name";
}

TEST(ShmChannel, RefusesSegmentsThatAreNotChannels) {
  std::string error;
  const auto name = unique_name("foreign");
  const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 1 << 16), 0);
  ::close(fd);
  EXPECT_FALSE(ShmChannel::open(name, &error));
  EXPECT_NE(error.find("not an apportion channel"), std::string::npos) << error;
  ::shm_unlink(name.c_str());
}

// Two threads, one per side, echo tagged messages of varying size through a small ring (so
// frames wrap and senders wait for space): nothing lost, duplicated, reordered or corrupted.
TEST(ShmChannel, ThreadedEchoKeepsEveryMessageInOrder) {
  Watchdog guard(60s);
  std::string error;
  const auto name = unique_name("fuzz");
  auto parent = ShmChannel::create(name, 2048, &error);
  ASSERT_TRUE(parent) << error;
  auto child = ShmChannel::open(name, &error);
  ASSERT_TRUE(child) << error;
  const uint64_t n = scaled(20000);
  constexpr std::size_t kMaxLen = 700;

  std::thread echo([&] {
    std::vector<std::span<const std::byte>> in;
    for (uint64_t i = 0; i < n; ++i) {
      while (child->receive(in, 20'000, kSecond / 10) == ChannelStatus::timeout) {
      }
      // Copy first: the reply may need the space this message occupies in the other ring only,
      // but the request must be released before the parent can send more.
      std::vector<std::string> copies;
      for (auto p : in) copies.push_back(string_of(p));
      child->release();
      std::vector<std::span<const std::byte>> out;
      for (auto& c : copies) out.push_back(bytes_of(c));
      while (child->send(out, 20'000, kSecond / 10) == ChannelStatus::timeout) {
      }
    }
  });

  std::vector<std::span<const std::byte>> in;
  uint64_t received = 0;
  const uint64_t window = 3;  // requests in flight: exercises the ring holding several frames
  auto drain_one = [&] {
    while (parent->receive(in, 20'000, kSecond / 10) == ChannelStatus::timeout) {
    }
    ASSERT_EQ(in.size(), 2u);
    EXPECT_EQ(string_of(in[0]), payload(received, kMaxLen));
    EXPECT_EQ(string_of(in[1]), std::to_string(received));
    parent->release();
    ++received;
  };
  for (uint64_t i = 0; i < n; ++i) {
    const std::string p = payload(i, kMaxLen), tag = std::to_string(i);
    std::vector<std::span<const std::byte>> out{bytes_of(p), bytes_of(tag)};
    if (i >= received + window) drain_one();
    while (parent->send(out, 20'000, kSecond / 10) == ChannelStatus::timeout) {
    }
  }
  while (received < n) drain_one();
  echo.join();
  EXPECT_FALSE(parent->readable());
}

// The real use: another process (fork of this single-threaded test before any thread starts)
// wakes and is woken through the shared futex words, parking between messages.
TEST(ShmChannel, CrossProcessEchoWithParking) {
  std::string error;
  const auto name = unique_name("fork");
  auto parent = ShmChannel::create(name, 1 << 16, &error);
  ASSERT_TRUE(parent) << error;
  const int n = static_cast<int>(scaled(2000));
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(120);  // a missed wake-up kills the child instead of hanging the test
    std::string err;
    auto child = ShmChannel::open(name, &err);
    if (!child) ::_exit(2);
    std::vector<std::span<const std::byte>> in;
    for (int i = 0; i < n; ++i) {
      // No spinning: every message is a park and a cross-process futex wake.
      if (child->receive(in, 0, 60 * kSecond) != ChannelStatus::ok) ::_exit(3);
      std::vector<std::byte> copy(in[0].begin(), in[0].end());
      child->release();
      std::vector<std::span<const std::byte>> out{std::span<const std::byte>(copy)};
      if (child->send(out, 0, 60 * kSecond) != ChannelStatus::ok) ::_exit(4);
    }
    ::_exit(0);
  }
  std::vector<std::span<const std::byte>> in;
  bool ok = true;
  for (int i = 0; i < n && ok; ++i) {
    // Sizes up to 40 KiB in a 64 KiB ring: frames wrap, and the ring restarts when empty.
    const std::string p = payload(static_cast<uint64_t>(i) * 13, 40000);
    std::vector<std::span<const std::byte>> out{bytes_of(p)};
    ok = parent->send(out, 0, 60 * kSecond) == ChannelStatus::ok &&
         parent->receive(in, 0, 60 * kSecond) == ChannelStatus::ok && in.size() == 1 &&
         string_of(in[0]) == p;
    parent->release();
    EXPECT_TRUE(ok) << "message " << i;
  }
  if (!ok) ::kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  parent->unlink();
  EXPECT_FALSE(shm_exists(name));
}

// Bytes tmpfs has allocated for the segment `name` (its blocks, not its sparse size).
int64_t backed_bytes(const std::string& name) {
  struct stat st {};
  if (::stat(("/dev/shm" + name).c_str(), &st) != 0) return -1;
  return static_cast<int64_t>(st.st_blocks) * 512;
}

// The whole segment `name` (rings of `cap` bytes), mapped for a test to write over as a peer's
// stray writes would.
std::byte* map_segment(const std::string& name, uint64_t cap) {
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return nullptr;
  void* p = ::mmap(nullptr, sizeof(shm_detail::Header) + 2 * cap, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  return p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
}

TEST(ShmChannel, AFrameNoSenderWritesIsCorruptAndNothingIsReadPastTheRing) {
  // A child whose model wrote over its reply ring (a native bug) made the parent copy a part's
  // length, 1 GiB, from past the mapping: SIGSEGV in the parent.
  Watchdog guard(30s);
  constexpr uint64_t cap = 4096;
  const auto put64 = [](std::byte* at, uint64_t v) { std::memcpy(at, &v, 8); };
  const auto put32 = [](std::byte* at, uint32_t v) { std::memcpy(at, &v, 4); };
  struct Case {
    const char* what;
    std::function<void(shm_detail::Header&, std::byte*)> spoil;  // the header, the frame at the ring's start
  };
  const std::vector<Case> cases{
      {"a part longer than its frame", [&](shm_detail::Header&, std::byte* f) { put64(f + 16, 1ULL << 40); }},
      {"a frame longer than the head published", [&](shm_detail::Header&, std::byte* f) { put64(f, 1ULL << 30); }},
      {"a frame past the ring's end", [&](shm_detail::Header& h, std::byte* f) {
         put64(f, 2 * cap);
         h.rings[1].head.store(2 * cap);
       }},
      {"a head a ring ahead of the tail", [&](shm_detail::Header& h, std::byte*) { h.rings[1].head.store(3 * cap); }},
      {"an unknown kind", [&](shm_detail::Header&, std::byte* f) { put32(f + 8, 7); }},
      {"more parts than the frame holds", [&](shm_detail::Header&, std::byte* f) { put32(f + 12, 0xFFFFFFFFu); }},
      {"a skip short of the ring's end", [&](shm_detail::Header&, std::byte* f) {
         put64(f, 64);
         put32(f + 8, 2);
       }},
      {"a skip of nothing", [&](shm_detail::Header&, std::byte* f) {
         put64(f, 0);
         put32(f + 8, 2);
       }},
      {"nothing: the message as sent", nullptr},  // reads as it was written
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    std::string error;
    const auto name = unique_name("corrupt");
    auto parent = ShmChannel::create(name, cap, &error);
    ASSERT_TRUE(parent) << error;
    auto child = ShmChannel::open(name, &error);
    ASSERT_TRUE(child) << error;
    const std::string hello = "hello";
    std::vector<std::span<const std::byte>> out{bytes_of(hello)};
    ASSERT_EQ(child->send(out, 0, kSecond), ChannelStatus::ok);
    std::vector<std::span<const std::byte>> in;
    if (!c.spoil) {
      ASSERT_EQ(parent->receive(in, 0, kSecond), ChannelStatus::ok);
      ASSERT_EQ(in.size(), 1u);
      EXPECT_EQ(string_of(in[0]), hello);
      parent->release();
      continue;
    }
    std::byte* base = map_segment(name, cap);
    ASSERT_NE(base, nullptr);
    c.spoil(*reinterpret_cast<shm_detail::Header*>(base), base + sizeof(shm_detail::Header) + cap);
    EXPECT_EQ(parent->receive(in, 0, kSecond), ChannelStatus::corrupt);
    EXPECT_TRUE(in.empty());
    ::munmap(base, sizeof(shm_detail::Header) + 2 * cap);
  }
}

TEST(ShmChannel, ReservesEachRingAsFarAsItsMessagesReach) {
  Watchdog guard(30s);
  std::string error;
  const auto name = unique_name("reserve");
  auto parent = ShmChannel::create(name, 4 << 20, &error);
  ASSERT_TRUE(parent) << error;
  auto child = ShmChannel::open(name, &error);
  ASSERT_TRUE(child) << error;
  // Creation backs the header only: starting a channel stays cheap.
  EXPECT_LT(backed_bytes(name), 64 * 1024);
  EXPECT_EQ(parent->reserved_bytes(), 0u);
  EXPECT_GT(parent->free_bytes(), 0);

  const std::string big(1 << 20, 'b');
  std::vector<std::span<const std::byte>> out{bytes_of(big)};
  ASSERT_EQ(parent->send(out, 0, kSecond), ChannelStatus::ok);
  EXPECT_GE(parent->reserved_bytes(), big.size());
  EXPECT_LT(parent->reserved_bytes(), big.size() + 64 * 1024);
  EXPECT_GE(backed_bytes(name), static_cast<int64_t>(big.size()));
  EXPECT_EQ(child->reserved_bytes(), 0u) << "each side reserves its own outgoing ring";
  std::vector<std::span<const std::byte>> in;
  ASSERT_EQ(child->receive(in, 0, kSecond), ChannelStatus::ok);
  EXPECT_EQ(string_of(in[0]), big);
  child->release();

  // The ring restarts at its start when empty: the same message needs no more store.
  const std::size_t before = parent->reserved_bytes();
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(parent->send(out, 0, kSecond), ChannelStatus::ok);
    ASSERT_EQ(child->receive(in, 0, kSecond), ChannelStatus::ok);
    child->release();
  }
  EXPECT_EQ(parent->reserved_bytes(), before);

  const std::string reply(200 * 1024, 'r');
  std::vector<std::span<const std::byte>> back{bytes_of(reply)};
  ASSERT_EQ(child->send(back, 0, kSecond), ChannelStatus::ok);
  EXPECT_GE(child->reserved_bytes(), reply.size());
  ASSERT_EQ(parent->receive(in, 0, kSecond), ChannelStatus::ok);
  EXPECT_EQ(string_of(in[0]), reply);
  parent->release();
  EXPECT_EQ(parent->reserve_errno(), 0);
  parent->unlink();
}

// Runs `body` in a forked child (single-threaded, as unshare(CLONE_NEWNS) wants) that has a
// tmpfs of `size` on /dev/shm in a mount namespace of its own, and checks how it ended: exit 0
// passes, another code names the failed check, a signal (SIGBUS) fails. Skips without root.
template <class Body>
void with_small_dev_shm(const char* size, Body body) {
  constexpr int kSkip = 77;
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(120);
    if (::unshare(CLONE_NEWNS) != 0) ::_exit(kSkip);
    // Private propagation first, or the mount would show in the parent's namespace.
    if (::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) ::_exit(kSkip);
    const std::string options = std::string("size=") + size;
    if (::mount("tmpfs", "/dev/shm", "tmpfs", 0, options.c_str()) != 0) ::_exit(kSkip);
    ::_exit(body());
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  if (WIFEXITED(status) && WEXITSTATUS(status) == kSkip) {
    GTEST_SKIP() << "needs root to mount a small tmpfs on /dev/shm in a mount namespace of its own";
  }
  ASSERT_FALSE(WIFSIGNALED(status)) << "child killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "failed check (exit code) in the child";
}

// A message the shared-memory filesystem cannot back fails with no_space and writes nothing;
// the channel keeps working for messages that fit, and no process takes a SIGBUS. Needs a
// small tmpfs on /dev/shm: a forked child (single-threaded, as unshare(CLONE_NEWNS) wants)
// mounts one in a mount namespace of its own, which needs root (CAP_SYS_ADMIN).
TEST(ShmChannel, MessageThatCannotBeBackedFailsAloneWithoutSigbus) {
  with_small_dev_shm("4m", [] {
    std::string err;
    const auto name = unique_name("nospace");
    // 16 MiB rings on a 4 MiB filesystem: creating it must work (nothing but the header is
    // backed) and so must messages that fit in what is free.
    auto parent = ShmChannel::create(name, 16 << 20, &err);
    if (!parent) return 10;
    auto child = ShmChannel::open(name, &err);
    if (!child) return 11;
    const int64_t free_before = parent->free_bytes();
    if (free_before <= 0 || free_before > (4 << 20)) return 12;
    const std::string big(8 << 20, 'x');
    std::vector<std::span<const std::byte>> out{bytes_of(big)};
    if (parent->send(out, 0, kSecond) != ChannelStatus::no_space) return 13;
    if (parent->reserve_errno() != ENOSPC) return 14;
    if (parent->sent_unread() || child->readable()) return 15;  // nothing was published
    if (parent->free_bytes() != free_before) return 16;         // nor kept
    // The peer's reply of the same size fails the same way, on its own side.
    if (child->send(out, 0, kSecond) != ChannelStatus::no_space) return 17;
    const std::string small(1 << 20, 's');
    std::vector<std::span<const std::byte>> ok{bytes_of(small)};
    std::vector<std::span<const std::byte>> in;
    for (int i = 0; i < 2; ++i) {
      if (parent->send(ok, 0, kSecond) != ChannelStatus::ok) return 18;
      if (child->receive(in, 0, kSecond) != ChannelStatus::ok || string_of(in[0]) != small) return 19;
      child->release();
      if (child->send(ok, 0, kSecond) != ChannelStatus::ok) return 20;
      if (parent->receive(in, 0, kSecond) != ChannelStatus::ok || string_of(in[0]) != small) return 21;
      parent->release();
    }
    // Now both rings hold 1 MiB each: a 3 MiB message no longer fits the 4 MiB filesystem.
    const std::string mid(3 << 20, 'm');
    std::vector<std::span<const std::byte>> third{bytes_of(mid)};
    if (parent->send(third, 0, kSecond) != ChannelStatus::no_space) return 22;
    if (parent->send(ok, 0, kSecond) != ChannelStatus::ok) return 23;
    return 0;
  });
}

// tmpfs undoes a refused posix_fallocate by dropping the never-touched pages in that call's
// range. A page reserved earlier (the end of a message's page-rounded reservation) but not
// written yet must never be one of them: a message written there later would then fault on a
// hole, a SIGBUS when /dev/shm is full at that moment. Here: a reservation whose last page is
// untouched, a refused large message right after it, /dev/shm filled up by someone else, then
// a message inside the old reservation that reaches that page.
TEST(ShmChannel, RefusedReservationLeavesEarlierReservationsWhole) {
  with_small_dev_shm("4m", [] {
    std::string err;
    const auto name = unique_name("undo");
    auto parent = ShmChannel::create(name, 16 << 20, &err);
    if (!parent) return 10;
    auto child = ShmChannel::open(name, &err);
    if (!child) return 11;
    // A frame of 4 pages less 1 KiB (64 bytes of framing): its reservation's last KiB is
    // untouched. It stays unread, so the next message goes right after it.
    const std::string first(4 * 4096 - 1024 - 64, 'a');
    std::vector<std::span<const std::byte>> m1{bytes_of(first)};
    if (parent->send(m1, 0, kSecond) != ChannelStatus::ok) return 12;
    const std::string big(8 << 20, 'x');
    std::vector<std::span<const std::byte>> huge{bytes_of(big)};
    if (parent->send(huge, 0, kSecond) != ChannelStatus::no_space) return 13;
    // Someone else takes every free page.
    const int filler = ::open("/dev/shm/filler", O_CREAT | O_RDWR, 0600);
    if (filler < 0) return 14;
    for (off_t at = 0; ::posix_fallocate(filler, at, 4096) == 0; at += 4096) {
    }
    // 448 bytes right after the first message: inside its reservation, into its last page.
    const std::string second(448, 'b');
    std::vector<std::span<const std::byte>> m2{bytes_of(second)};
    if (parent->send(m2, 0, kSecond) != ChannelStatus::ok) return 15;
    std::vector<std::span<const std::byte>> in;
    if (child->receive(in, 0, kSecond) != ChannelStatus::ok || string_of(in[0]) != first) return 16;
    child->release();
    if (child->receive(in, 0, kSecond) != ChannelStatus::ok || string_of(in[0]) != second) return 17;
    child->release();
    return 0;
  });
}

}  // namespace
}  // namespace apportion
