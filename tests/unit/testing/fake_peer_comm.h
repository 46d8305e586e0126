// An in-process stand-in for NCCL's two-rank communicators (PeerComm,
// daemon/transport/peer_comm.h) over host memory, for the CPU tests of the
// device path of syncs across nodes: two "nodes" (two caches, two cluster
// links) in one test process join through a shared FakePeerCommFabric by
// unique id, and each Exchange meets the other rank's Exchange of the same
// round: the sends of one rank are copied, in order, into the receives of
// the other (sizes must match, as NCCL's would have to). Like NCCL's
// non-blocking communicators, a join or an exchange the other rank never
// matches fails at the deadline and aborts the pair, and a pair that failed
// (deadline, size mismatch, injected fault, one side destroyed) refuses
// every later exchange on both sides.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "daemon/transport/peer_comm.h"

namespace ws::testing {

class FakePeerCommFabric {
 public:
  // Fails the next `n` exchanges (either rank), aborting their pairs.
  void FailNextExchanges(int n) {
    std::lock_guard lk(mu_);
    fail_next_ = n;
  }
  // Aborts every pair (a node lost, ncclCommAbort on the other side).
  void AbortAll(const std::string& why) {
    std::lock_guard lk(mu_);
    for (auto& [id, p] : pairs_) Abort(p, why);
    cv_.notify_all();
  }
  int unique_ids() const {
    std::lock_guard lk(mu_);
    return next_id_;
  }
  int joins() const {
    std::lock_guard lk(mu_);
    return joins_;
  }
  // Exchanges in which both ranks met (one per window and pair).
  int rounds() const {
    std::lock_guard lk(mu_);
    return rounds_;
  }
  // Devices that joined under each unique id, by rank ("" while not joined).
  std::vector<std::string> Devices(const std::string& unique_id) const {
    std::lock_guard lk(mu_);
    auto it = pairs_.find(unique_id);
    if (it == pairs_.end()) return {};
    return {it->second.device[0], it->second.device[1]};
  }

 private:
  friend class FakePeerCommFactory;
  friend class FakePeerComm;
  struct Pair {
    bool joined[2] = {false, false};
    std::string device[2];
    bool aborted = false;
    std::string why;
    uint64_t round[2] = {0, 0};
    const std::vector<PeerComm::P2P>* posted[2] = {nullptr, nullptr};
    uint64_t done_round = 0;
    Status result;
  };
  static void Abort(Pair& p, const std::string& why) {
    if (p.aborted) return;
    p.aborted = true;
    p.why = why;
  }
  // Copies rank `s`'s sends into the other rank's receives, in order.
  static Status Match(const std::vector<PeerComm::P2P>& from, const std::vector<PeerComm::P2P>& to) {
    std::vector<const PeerComm::P2P*> sends, recvs;
    for (const auto& op : from)
      if (op.send) sends.push_back(&op);
    for (const auto& op : to)
      if (!op.send) recvs.push_back(&op);
    if (sends.size() != recvs.size())
      return Internal("fake peer comm: " + std::to_string(sends.size()) + " sends met " + std::to_string(recvs.size()) +
                      " receives");
    for (size_t i = 0; i < sends.size(); ++i) {
      if (sends[i]->bytes != recvs[i]->bytes)
        return Internal("fake peer comm: " + sends[i]->what + ": " + std::to_string(sends[i]->bytes) +
                        " bytes sent into a " + std::to_string(recvs[i]->bytes) + "-byte receive (" + recvs[i]->what +
                        ")");
      if (sends[i]->bytes > 0) std::memcpy(recvs[i]->ptr, sends[i]->ptr, sends[i]->bytes);
    }
    return Status::Ok();
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, Pair> pairs_;
  int next_id_ = 0, joins_ = 0, rounds_ = 0, fail_next_ = 0;
};

class FakePeerComm final : public PeerComm {
 public:
  FakePeerComm(FakePeerCommFabric* f, std::string id, int rank, std::chrono::milliseconds timeout)
      : f_(f), id_(std::move(id)), rank_(rank), timeout_(timeout) {}
  ~FakePeerComm() override {
    std::lock_guard lk(f_->mu_);
    FakePeerCommFabric::Abort(f_->pairs_[id_], "rank " + std::to_string(rank_) + " destroyed its communicator");
    f_->cv_.notify_all();
  }
  FakePeerComm(const FakePeerComm&) = delete;
  FakePeerComm& operator=(const FakePeerComm&) = delete;

  Status Exchange(const std::vector<P2P>& ops) override {
    std::unique_lock lk(f_->mu_);
    auto& p = f_->pairs_[id_];
    if (p.aborted) return FailedPrecondition("fake peer comm " + id_ + " was aborted: " + p.why);
    if (f_->fail_next_ > 0) {
      f_->fail_next_--;
      FakePeerCommFabric::Abort(p, "injected failure");
      f_->cv_.notify_all();
      return Internal("fake peer comm " + id_ + ": injected failure");
    }
    const int other = 1 - rank_;
    const uint64_t mine = ++p.round[rank_];
    p.posted[rank_] = &ops;
    if (p.round[other] == mine && p.posted[other] != nullptr) {
      Status st = FakePeerCommFabric::Match(rank_ == 0 ? ops : *p.posted[other], rank_ == 0 ? *p.posted[other] : ops);
      if (st.ok()) st = FakePeerCommFabric::Match(rank_ == 1 ? ops : *p.posted[other], rank_ == 1 ? *p.posted[other] : ops);
      p.posted[0] = p.posted[1] = nullptr;
      p.done_round = mine;
      p.result = st;
      f_->rounds_++;
      if (!st.ok()) FakePeerCommFabric::Abort(p, st.message());
      f_->cv_.notify_all();
      return st;
    }
    const bool met = f_->cv_.wait_until(lk, std::chrono::steady_clock::now() + timeout_,
                                        [&] { return p.done_round >= mine || p.aborted; });
    p.posted[rank_] = nullptr;
    if (p.done_round >= mine) return p.result;
    if (met) return Aborted("fake peer comm " + id_ + " aborted: " + p.why);
    FakePeerCommFabric::Abort(p, "deadline");
    f_->cv_.notify_all();
    return DeadlineExceeded("fake peer comm " + id_ + ": rank " + std::to_string(rank_) +
                            ": the other rank did not exchange within the deadline; aborted");
  }

 private:
  FakePeerCommFabric* const f_;
  const std::string id_;
  const int rank_;
  const std::chrono::milliseconds timeout_;
};

class FakePeerCommFactory final : public PeerCommFactory {
 public:
  explicit FakePeerCommFactory(FakePeerCommFabric* f) : f_(f) {}
  const char* name() const override { return "fake-nccl"; }
  Result<std::string> NewUniqueId() override {
    std::lock_guard lk(f_->mu_);
    return "uid-" + std::to_string(f_->next_id_++);
  }
  Result<std::unique_ptr<PeerComm>> Join(const std::string& unique_id, int rank, const std::string& device_uuid,
                                         std::chrono::milliseconds timeout) override {
    if (rank != 0 && rank != 1) return InvalidArgument("fake peer comm: rank " + std::to_string(rank));
    std::unique_lock lk(f_->mu_);
    auto& p = f_->pairs_[unique_id];
    if (p.joined[rank]) return AlreadyExists("fake peer comm " + unique_id + ": rank " + std::to_string(rank) + " joined twice");
    p.joined[rank] = true;
    p.device[rank] = device_uuid;
    f_->joins_++;
    f_->cv_.notify_all();
    const bool met = f_->cv_.wait_until(lk, std::chrono::steady_clock::now() + timeout,
                                        [&] { return (p.joined[0] && p.joined[1]) || p.aborted; });
    if (p.aborted) return Aborted("fake peer comm " + unique_id + " aborted while joining: " + p.why);
    if (!met) {
      FakePeerCommFabric::Abort(p, "join deadline");
      f_->cv_.notify_all();
      return DeadlineExceeded("fake peer comm " + unique_id + ": the other rank did not join within the deadline; aborted");
    }
    return std::unique_ptr<PeerComm>(new FakePeerComm(f_, unique_id, rank, timeout));
  }

 private:
  FakePeerCommFabric* const f_;
};

}  // namespace ws::testing
