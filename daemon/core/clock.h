// The time a timeout is measured in, injectable so tests can move it
// (tests/unit/testing/fault_injection.h's FakeClock) instead of sleeping.
//
// Thread-safety: Now() is thread-safe.
#pragma once

#include <chrono>

namespace ws {

class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
};

// std::chrono::steady_clock. Never destroyed.
inline const Clock& SteadyClock() {
  struct Steady final : Clock {
    TimePoint Now() const override { return std::chrono::steady_clock::now(); }
  };
  static const Steady* clock = new Steady();
  return *clock;
}

}  // namespace ws
