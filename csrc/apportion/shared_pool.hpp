// The shared pool's scheduler: capacity units (one per pool CPU by default) lent to the
// workers of the models that share the pool, one model call at a time.
//
// A worker of a member model asks for `units` (its intra-op threads) before each call and
// gives them back after it, with what the call cost. Who gets freed capacity next:
//   1. the waiter of the highest priority class, always (strict, at call boundaries);
//   2. within a class, the member furthest behind its weighted share: start-time fair
//      queuing on virtual time, where a call advances its member's clock by
//      cost x units / weight (cost is estimated at the grant and corrected at the release);
//   3. then arrival order.
// Work-conserving: capacity is only held back for a better waiter that needs more units than
// are free (no bypassing, so a wide call is never starved by narrow ones). A member that was
// idle rejoins at the pool's current virtual time: idleness earns no credit to burst later.
//
// Class reservations (set_reserve): grants are at call boundaries, so a high-class request
// otherwise waits for whatever lower-class call holds the units, however long. A reservation
// {class c, r units} lets members of class >= c hold up to r units beyond the capacity: their
// call starts at once, on a CPU a lower-class call is running on, and the OS gives it that CPU
// because the workers of every class below a reservation run at a lower OS priority (a
// positive nice, see nice_for). Lower classes lose only the CPU time the reserved class uses;
// nothing sits idle waiting for it.
//
// A mutex, not a lock-free structure: it is taken twice per model call (calls last micro- to
// milliseconds), its critical sections are a scan of the waiters (at most one per worker),
// and the grant order needs one consistent view of every member.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace apportion {

class SharedPool {
 public:
  /// A model that shares the pool. Created by join(); members outlive their workers.
  class Member {
   public:
    const std::string& name() const noexcept { return name_; }
    double weight() const noexcept { return weight_; }
    int32_t priority_class() const noexcept { return priority_class_.load(std::memory_order_relaxed); }

   private:
    friend class SharedPool;
    Member(std::string name, double weight, int32_t priority_class)
        : name_(std::move(name)), weight_(weight), priority_class_(priority_class) {}
    const std::string name_;
    const double weight_;
    // Written under the pool's mutex (set_class); read there, or alone where a stale class
    // does no harm (priority_class()).
    std::atomic<int32_t> priority_class_;
    // Guarded by the pool's mutex.
    double vtime_ = 0.0;        // virtual finish time of its last granted call
    int64_t estimate_ns_ = 0;   // EWMA of its calls' cost (what a grant charges up front)
    uint32_t active_ = 0;       // its workers waiting or holding units
    uint64_t grants_ = 0;
    uint64_t busy_unit_ns_ = 0;  // sum over calls of cost x units
    bool withdrawn_ = false;     // see withdraw()
  };

  struct MemberStats {
    uint64_t grants = 0;
    /// Pool time used: the sum over its calls of duration x units held.
    uint64_t busy_unit_ns = 0;
  };

  /// `capacity` 0 means none yet: every acquire() waits until set_capacity() gives some.
  explicit SharedPool(uint32_t capacity = 0) : capacity_(capacity) {}
  SharedPool(const SharedPool&) = delete;
  SharedPool& operator=(const SharedPool&) = delete;

  /// Registers a model. `weight` > 0; a higher `priority_class` is always served first.
  /// Safe from any thread.
  std::shared_ptr<Member> join(std::string name, double weight, int32_t priority_class);

  /// Moves member `m` to `priority_class`: its waiters and later calls are granted by the new
  /// class at once (calls running now finish as they are). Within the new class it starts
  /// level with the member of that class waiting now that is furthest behind, or, with none
  /// waiting, from the pool's current virtual time, as a member back from idle does: a class
  /// change banks no credit, and a member moved down is not held back. Throws
  /// std::invalid_argument while the pool has class reservations: a worker's OS priority
  /// follows its class when it starts (see nice_for), so a class changed under running
  /// workers would run them at the other class's priority. Safe from any thread.
  void set_class(Member& m, int32_t priority_class);

  /// Sets the pool's size; units held now stay held. Safe from any thread.
  void set_capacity(uint32_t capacity);
  uint32_t capacity() const;

  struct Reservation {
    int32_t priority_class;  // applies to this class and every higher one
    uint32_t units;          // held beyond the capacity at most
  };
  /// Replaces the reservations; `nice` is the OS priority offset (1..19) of the workers of
  /// members below a reserved class (see nice_for). Throws std::invalid_argument for a
  /// reservation of 0 units, one class named twice, or a nice outside 1..19. Safe from any
  /// thread; workers already running keep the OS priority they started with.
  void set_reserve(std::vector<Reservation> reserve, int nice);
  /// Units a member of `priority_class` may hold beyond the capacity: the largest reservation
  /// of a class <= it (0 without one).
  uint32_t headroom(int32_t priority_class) const;
  /// The nice value a worker of a member of `priority_class` runs at: the reservations' nice
  /// when some reservation is for a higher class, else 0.
  int nice_for(int32_t priority_class) const;

  /// Takes `units` (clamped to [1, capacity]) if they are free and nobody better waits.
  /// Returns the units taken (to give back), or 0 without waiting. Safe from any thread.
  uint32_t try_acquire(Member& m, uint32_t units);
  /// Waits until `units` (clamped to [1, capacity]) are granted to `m`; returns the units
  /// taken. `before_wait` runs (without the pool's lock) once the caller is in line and
  /// before it blocks, only if it must. Safe from any thread; blocks while the pool has no
  /// capacity.
  uint32_t acquire(Member& m, uint32_t units, const std::function<void()>& before_wait = {});
  /// Gives back units from acquire()/try_acquire(); `cost_ns` is how long they were held for
  /// work (0 when the worker found nothing to do). Safe from any thread.
  void release(Member& m, uint32_t units, int64_t cost_ns);
  /// release() for a worker with more work queued: it keeps the units for its next call if it
  /// would be the first one granted anyway (returns them); else it gives them back and, with
  /// `wait`, waits in line at once (returns the units granted then), or without it returns 0
  /// (the worker acquires again when it is ready to, e.g. after letting go of the GIL).
  /// Without renewing, a continuously busy model would look idle for the moment between its
  /// worker's release and its next acquire, and lose its turn (or its class's precedence) to
  /// whoever waits then. Safe from any thread.
  uint32_t renew(Member& m, uint32_t units, int64_t cost_ns, bool wait = false,
                 const std::function<void()>& before_wait = {});

  /// Ends `m`'s waits for good: its workers waiting in line leave it with 0 units, and any
  /// later acquire() or waiting renew() for it returns 0 at once. For a model closing without
  /// drain: it cancels its queue rather than wait for other models' calls to finish first.
  /// Units `m` holds stay held until released. Safe from any thread.
  void withdraw(Member& m);

  MemberStats stats(const Member& m) const;
  /// Workers waiting for capacity now. Safe from any thread.
  std::size_t waiting() const;

 private:
  struct Waiter {
    Waiter(Member* m, uint32_t u, uint64_t s) : member(m), units(u), seq(s) {}
    Member* member;
    uint32_t units;
    uint64_t seq;
    bool granted = false;
    std::condition_variable cv;
  };

  uint32_t clamp(uint32_t units) const noexcept;
  // Whether `units` more for `m` stay within the capacity plus its class's headroom.
  bool fits(const Member& m, uint32_t units) const noexcept;
  uint32_t headroom_locked(int32_t priority_class) const noexcept;
  void activate(Member& m) noexcept;
  // Whether a waiter of `a` that arrived as `a_seq` goes before one of `b` (class, then
  // virtual time, then arrival).
  static bool better(const Member& a, uint64_t a_seq, const Member& b, uint64_t b_seq) noexcept;
  void charge(Member& m, uint32_t units) noexcept;
  void grant_waiters() noexcept;
  void settle(Member& m, uint32_t units, int64_t cost_ns) noexcept;
  uint32_t wait_in_line(std::unique_lock<std::mutex>& lock, Member& m, uint32_t units,
                        const std::function<void()>& before_wait);

  mutable std::mutex mu_;

  uint32_t capacity_;
  uint32_t held_ = 0;
  // The virtual time of the latest grant: where an idle member rejoins.
  double vnow_ = 0.0;
  uint64_t next_seq_ = 0;
  std::vector<Waiter*> waiters_;
  std::vector<Reservation> reserve_;
  int reserve_nice_ = 0;
};

}  // namespace apportion
