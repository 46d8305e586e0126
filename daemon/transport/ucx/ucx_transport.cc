#include "daemon/transport/ucx/ucx_transport.h"

#include <ucp/api/ucp.h>

#include <mutex>
#include <thread>
#include <utility>

namespace ws {

namespace {

std::string UcsError(ucs_status_t s) { return ucs_status_string(s); }

// Completion of one posted op, written by UCX's callbacks from inside
// ucp_worker_progress (run by whichever exchange progresses, under Impl::mu).
struct Slot {
  void* req = nullptr;  // the UCX request while pending
  bool done = false;
  ucs_status_t status = UCS_OK;
  size_t length = 0;    // bytes received
  size_t* outstanding = nullptr;  // the exchange's count of requests not yet completed
};

void SendDone(void*, ucs_status_t status, void* user) {
  auto* s = static_cast<Slot*>(user);
  s->done = true;
  s->status = status;
  --*s->outstanding;
}

void RecvDone(void*, ucs_status_t status, const ucp_tag_recv_info_t* info, void* user) {
  auto* s = static_cast<Slot*>(user);
  s->done = true;
  s->status = status;
  if (status == UCS_OK && info != nullptr) s->length = info->length;
  --*s->outstanding;
}

}  // namespace

struct UcxTransport::Impl {
  struct Peer {
    ucp_ep_h ep = nullptr;
    ucs_status_t error = UCS_OK;  // set by the error handler: the peer or link failed
    uint64_t* errors = nullptr;   // the transport's count of peer errors, bumped with it
  };

  // The worker is serialised: every UCX call, and every read of state its
  // callbacks write (slots, peer errors), is made with mu held.
  std::mutex mu;
  ucp_context_h ctx = nullptr;
  ucp_worker_h worker = nullptr;
  std::string address;
  // std::map: Peer addresses stay stable (the error handler holds one).
  std::map<std::string, Peer> peers;

  uint64_t peer_errors = 0;  // error-handler calls so far (an exchange re-checks its ops when it grows)

  static void OnPeerError(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* p = static_cast<Peer*>(arg);
    p->error = status;
    ++*p->errors;
  }

  void Close(Peer& p) {
    if (p.ep == nullptr) return;
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = ucp_ep_close_nbx(p.ep, &rp);
    if (UCS_PTR_IS_PTR(r)) {
      while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(worker);
      ucp_request_free(r);
    }
    p.ep = nullptr;
  }

  ~Impl() {
    for (auto& [name, p] : peers) Close(p);
    if (worker != nullptr) ucp_worker_destroy(worker);
    if (ctx != nullptr) ucp_cleanup(ctx);
  }
};

UcxTransport::UcxTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UcxTransport::~UcxTransport() = default;

Result<std::unique_ptr<UcxTransport>> UcxTransport::Create(const UcxOptions& opts) {
  auto impl = std::make_unique<Impl>();
  ucp_config_t* cfg = nullptr;
  if (ucs_status_t s = ucp_config_read(nullptr, nullptr, &cfg); s != UCS_OK)
    return Internal("UCX: reading its configuration: " + UcsError(s));
  ucs_status_t s = UCS_OK;
  if (!opts.transports.empty() && (s = ucp_config_modify(cfg, "TLS", opts.transports.c_str())) != UCS_OK) {
    ucp_config_release(cfg);
    return InvalidArgument("UCX transports '" + opts.transports + "': " + UcsError(s));
  }
  if (!opts.net_devices.empty() && (s = ucp_config_modify(cfg, "NET_DEVICES", opts.net_devices.c_str())) != UCS_OK) {
    ucp_config_release(cfg);
    return InvalidArgument("UCX net devices '" + opts.net_devices + "': " + UcsError(s));
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG;
  s = ucp_init(&params, cfg, &impl->ctx);
  ucp_config_release(cfg);
  if (s != UCS_OK) return Unavailable("UCX: ucp_init: " + UcsError(s));
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  if ((s = ucp_worker_create(impl->ctx, &wp, &impl->worker)) != UCS_OK)
    return Unavailable("UCX: ucp_worker_create: " + UcsError(s));
  ucp_address_t* addr = nullptr;
  size_t len = 0;
  if ((s = ucp_worker_get_address(impl->worker, &addr, &len)) != UCS_OK)
    return Unavailable("UCX: ucp_worker_get_address: " + UcsError(s));
  impl->address.assign(reinterpret_cast<const char*>(addr), len);
  ucp_worker_release_address(impl->worker, addr);
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(impl)));
}

const std::string& UcxTransport::address() const { return impl_->address; }

bool UcxTransport::connected(const std::string& peer) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  auto it = impl_->peers.find(peer);
  return it != impl_->peers.end() && it->second.ep != nullptr && it->second.error == UCS_OK;
}

Status UcxTransport::Connect(const std::string& peer, const std::string& address) {
  if (address.empty()) return InvalidArgument("UCX peer " + peer + ": empty worker address");
  std::lock_guard<std::mutex> lk(impl_->mu);
  Impl::Peer& p = impl_->peers[peer];
  p.errors = &impl_->peer_errors;
  impl_->Close(p);
  p.error = UCS_OK;
  ucp_ep_params_t ep{};
  ep.field_mask =
      UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &Impl::OnPeerError;
  ep.err_handler.arg = &p;
  if (ucs_status_t s = ucp_ep_create(impl_->worker, &ep, &p.ep); s != UCS_OK) {
    p.ep = nullptr;
    return Unavailable("UCX peer " + peer + ": cannot create an endpoint: " + UcsError(s));
  }
  return Status::Ok();
}

Status UcxTransport::Exchange(const std::vector<Op>& ops, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<Slot> slots(ops.size());
  size_t outstanding = 0;  // requests posted and not completed (the callbacks count down)
  Status first;
  auto fail = [&](Status st) {
    if (first.ok()) first = std::move(st);
  };
  auto describe = [](const Op& op) {
    return std::string(op.send ? "send of " : "receive of ") + op.what + " (" + std::to_string(op.bytes) +
           " bytes, tag " + std::to_string(op.tag) + ") " + (op.send ? "to" : "from") + " peer " + op.peer;
  };

  std::unique_lock<std::mutex> lk(impl_->mu);
  // Post everything (receives first, so early sends find them posted).
  for (int pass = 0; pass < 2 && first.ok(); ++pass) {
    for (size_t i = 0; i < ops.size() && first.ok(); ++i) {
      const Op& op = ops[i];
      if (op.send != (pass == 1)) continue;
      Slot& slot = slots[i];
      slot.outstanding = &outstanding;
      ucp_request_param_t rp{};
      rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      rp.user_data = &slot;
      ucs_status_ptr_t r;
      if (op.send) {
        auto it = impl_->peers.find(op.peer);
        if (it == impl_->peers.end() || it->second.ep == nullptr) {
          fail(FailedPrecondition(describe(op) + ": not connected"));
          break;
        }
        rp.cb.send = &SendDone;
        r = ucp_tag_send_nbx(it->second.ep, op.ptr, op.bytes, op.tag, &rp);
      } else {
        // Always through the callback, which reports the length: a receive
        // that matched an eager message already here would otherwise complete
        // at once, and UCX 1.13 leaves recv_info unset then (0 bytes).
        rp.op_attr_mask |= UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        rp.cb.recv = &RecvDone;
        ++outstanding;  // RecvDone may run inside ucp_tag_recv_nbx already
        r = ucp_tag_recv_nbx(impl_->worker, op.ptr, op.bytes, op.tag, ~uint64_t{0}, &rp);
        --outstanding;
      }
      if (r == nullptr) {
        slot.done = true;
      } else if (UCS_PTR_IS_ERR(r)) {
        slot.done = true;
        slot.status = UCS_PTR_STATUS(r);
      } else {
        slot.req = r;
        ++outstanding;
      }
    }
  }

  // Progress to completion, a failure, or the deadline.
  auto pending = [&] { return outstanding > 0; };
  auto check = [&] {
    for (size_t i = 0; i < ops.size() && first.ok(); ++i) {
      const Slot& s = slots[i];
      const Op& op = ops[i];
      if (s.done && s.status != UCS_OK) {
        fail(Unavailable(describe(op) + ": " + UcsError(s.status)));
      } else if (s.done && !op.send && s.length != op.bytes) {
        fail(InvalidArgument(describe(op) + ": the peer sent " + std::to_string(s.length) + " bytes"));
      } else if (!s.done) {
        auto it = impl_->peers.find(op.peer);
        if (it != impl_->peers.end() && it->second.error != UCS_OK)
          fail(Unavailable(describe(op) + ": peer failed: " + UcsError(it->second.error)));
      }
    }
  };
  // Completions and peer errors arrive only through the callbacks progress
  // runs: the ops are re-checked when a request completed or a peer failed,
  // not on every turn of the loop.
  check();
  size_t seen_outstanding = outstanding;
  uint64_t seen_errors = impl_->peer_errors;
  while (first.ok() && pending()) {
    // Other exchanges progress the same worker in turn (each one's progress
    // completes everyone's requests): the lock is let go between turns, so a
    // node can receive from one peer while it sends to another.
    const unsigned progressed = ucp_worker_progress(impl_->worker);
    lk.unlock();
    if (progressed == 0) std::this_thread::yield();
    lk.lock();
    if (outstanding != seen_outstanding || impl_->peer_errors != seen_errors) {
      seen_outstanding = outstanding;
      seen_errors = impl_->peer_errors;
      check();
    }
    if (first.ok() && pending() && std::chrono::steady_clock::now() > deadline) {
      for (size_t i = 0; i < ops.size(); ++i)
        if (slots[i].req != nullptr && !slots[i].done) {
          fail(DeadlineExceeded(describe(ops[i]) + ": not done after " + std::to_string(timeout.count()) + " ms"));
          break;
        }
    }
  }
  check();
  // On failure: cancel what is still pending and wait for it, so no request
  // outlives this call (its buffer belongs to the caller). A receive not yet
  // matched is cancelled; a send, or a receive already matched (a rendezvous
  // transfer under way), cannot be, so the endpoint of its peer is closed by
  // force, which completes its requests as cancelled (the peer must be
  // connected again).
  if (!first.ok()) {
    for (size_t i = 0; i < ops.size(); ++i)
      if (slots[i].req != nullptr && !slots[i].done && !ops[i].send) ucp_request_cancel(impl_->worker, slots[i].req);
    for (int n = 0; n < 100 && pending(); ++n) ucp_worker_progress(impl_->worker);
    for (size_t i = 0; i < ops.size(); ++i) {
      if (slots[i].req == nullptr || slots[i].done) continue;
      if (auto it = impl_->peers.find(ops[i].peer); it != impl_->peers.end()) impl_->Close(it->second);
    }
  }
  while (pending()) ucp_worker_progress(impl_->worker);
  for (Slot& s : slots)
    if (s.req != nullptr) ucp_request_free(s.req);
  // Endpoints whose peer failed are dropped: the next Connect() starts over.
  for (auto& [name, p] : impl_->peers)
    if (p.error != UCS_OK) impl_->Close(p);
  return first;
}

}  // namespace ws
