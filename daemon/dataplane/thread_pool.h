// A fixed pool of worker threads running index ranges (parallel for).
//
// Thread-safety: ParallelFor may be called concurrently from any number of
// threads, including from inside a task (the caller always works on its own
// batch, so it never waits on a batch nobody serves). Batches are served in
// FIFO order; each call blocks on its own completion latch.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "daemon/core/thread_annotations.h"

namespace ws {

class ThreadPool {
 public:
  // `workers` background threads (0 is legal: callers do all the work).
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { WorkerLoop(); });
  }
  ~ThreadPool() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int workers() const { return static_cast<int>(threads_.size()); }

  // Runs fn(i) for every i in [0, n) on the workers and the calling thread;
  // returns when all are done. fn must not throw.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
    if (n == 0) return;
    if (n == 1 || threads_.empty()) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto b = std::make_shared<Batch>();
    b->n = n;
    b->fn = &fn;
    {
      MutexLock lock(&mu_);
      queue_.push_back(b);
    }
    size_t wake = std::min(n - 1, threads_.size());
    if (wake == threads_.size()) {
      cv_.notify_all();
    } else {
      for (size_t i = 0; i < wake; ++i) cv_.notify_one();
    }
    Drain(b);
    MutexLock lock(&b->mu);
    lock.Wait(b->cv, [&] {
      b->mu.AssertHeld();
      return b->finished;
    });
  }

 private:
  struct Batch {
    size_t n = 0;
    const std::function<void(size_t)>* fn = nullptr;
    std::atomic<size_t> next{0};
    std::atomic<size_t> done{0};
    Mutex mu;
    std::condition_variable cv;
    bool finished WS_GUARDED_BY(mu) = false;
  };

  // Claims and runs items of `b` until none are left; the thread that sees
  // the batch exhausted removes it from the queue.
  void Drain(const std::shared_ptr<Batch>& b) {
    for (;;) {
      size_t i = b->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= b->n) break;
      (*b->fn)(i);
      if (b->done.fetch_add(1, std::memory_order_acq_rel) + 1 == b->n) {
        MutexLock lock(&b->mu);
        b->finished = true;
        b->cv.notify_all();
      }
    }
    MutexLock lock(&mu_);
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (*it == b) {
        queue_.erase(it);
        break;
      }
    }
  }

  void WorkerLoop() {
    for (;;) {
      std::shared_ptr<Batch> b;
      {
        MutexLock lock(&mu_);
        lock.Wait(cv_, [&] {
          mu_.AssertHeld();
          return stop_ || !queue_.empty();
        });
        if (stop_ && queue_.empty()) return;
        b = queue_.front();
      }
      Drain(b);
    }
  }

  Mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Batch>> queue_ WS_GUARDED_BY(mu_);
  bool stop_ WS_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace ws
