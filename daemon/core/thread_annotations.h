// Clang thread-safety annotations (-Wthread-safety), after LevelDB's
// port/thread_annotations.h: the macros expand to attributes under clang and
// to nothing elsewhere. libstdc++'s std::mutex carries no capability
// attribute, so guarded state uses the thin annotated Mutex / MutexLock below.
#pragma once

#include <condition_variable>
#include <mutex>

#if defined(__clang__)
#define WS_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define WS_THREAD_ANNOTATION(x)
#endif

#define WS_CAPABILITY(x) WS_THREAD_ANNOTATION(capability(x))
#define WS_SCOPED_CAPABILITY WS_THREAD_ANNOTATION(scoped_lockable)
#define WS_GUARDED_BY(x) WS_THREAD_ANNOTATION(guarded_by(x))
#define WS_PT_GUARDED_BY(x) WS_THREAD_ANNOTATION(pt_guarded_by(x))
#define WS_ACQUIRED_BEFORE(...) WS_THREAD_ANNOTATION(acquired_before(__VA_ARGS__))
#define WS_ACQUIRED_AFTER(...) WS_THREAD_ANNOTATION(acquired_after(__VA_ARGS__))
#define WS_REQUIRES(...) WS_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define WS_REQUIRES_SHARED(...) WS_THREAD_ANNOTATION(requires_shared_capability(__VA_ARGS__))
#define WS_ACQUIRE(...) WS_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define WS_RELEASE(...) WS_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define WS_TRY_ACQUIRE(...) WS_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define WS_EXCLUDES(...) WS_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define WS_ASSERT_CAPABILITY(x) WS_THREAD_ANNOTATION(assert_capability(x))
#define WS_RETURN_CAPABILITY(x) WS_THREAD_ANNOTATION(lock_returned(x))
#define WS_NO_THREAD_SAFETY_ANALYSIS WS_THREAD_ANNOTATION(no_thread_safety_analysis)

namespace ws {

class WS_CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() WS_ACQUIRE() { mu_.lock(); }
  void Unlock() WS_RELEASE() { mu_.unlock(); }
  // Tells the analysis the lock is held where it cannot see it (condition
  // predicates run by std::condition_variable with the lock held).
  void AssertHeld() const WS_ASSERT_CAPABILITY(this) {}

 private:
  friend class MutexLock;
  std::mutex mu_;
};

// Scoped lock over a Mutex; may be released and re-taken inside its scope,
// and waits on a std::condition_variable with the lock held.
class WS_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) WS_ACQUIRE(mu) : lk_(mu->mu_) {}
  ~MutexLock() WS_RELEASE() {}
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void Unlock() WS_RELEASE() { lk_.unlock(); }
  void Lock() WS_ACQUIRE() { lk_.lock(); }

  // The predicate runs with the lock held; call the mutex's AssertHeld() in it.
  template <class Pred>
  void Wait(std::condition_variable& cv, Pred pred) {
    cv.wait(lk_, std::move(pred));
  }
  template <class Rep, class Period, class Pred>
  bool WaitFor(std::condition_variable& cv, const std::chrono::duration<Rep, Period>& d, Pred pred) {
    return cv.wait_for(lk_, d, std::move(pred));
  }
  template <class Clock, class Duration, class Pred>
  bool WaitUntil(std::condition_variable& cv, const std::chrono::time_point<Clock, Duration>& t, Pred pred) {
    return cv.wait_until(lk_, t, std::move(pred));
  }

 private:
  std::unique_lock<std::mutex> lk_;
};

}  // namespace ws
