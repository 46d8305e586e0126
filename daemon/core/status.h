// The one status type used inside weightsync. No exceptions cross layer
// boundaries: every fallible function returns Status or Result<T>.
// Thread-safety: value types, safe to copy between threads.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace ws {

enum class Code {
  kOk = 0,
  kInvalidArgument,    // bad input from a peer or a file: names the offender
  kNotFound,
  kAlreadyExists,
  kFailedPrecondition, // valid request in the wrong state (e.g. no engines registered)
  kOutOfRange,         // a memory reference outside its object
  kAborted,            // the sync was aborted
  kUnavailable,        // shutting down, peer gone
  kDeadlineExceeded,
  kCancelled,
  kInternal,
  kUnimplemented,
  kPermissionDenied,   // the caller may not act on (or map) what it named
  kResourceExhausted,  // a configured limit, or out of space/memory
  kUnauthenticated,    // the caller's identity could not be established (no/wrong token, unknown connection)
};

const char* CodeName(Code c);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }
  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

  // Returns a copy with `prefix: ` prepended to the message.
  Status WithContext(const std::string& prefix) const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
inline Status AlreadyExists(std::string m) { return {Code::kAlreadyExists, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {Code::kFailedPrecondition, std::move(m)}; }
inline Status OutOfRange(std::string m) { return {Code::kOutOfRange, std::move(m)}; }
inline Status Aborted(std::string m) { return {Code::kAborted, std::move(m)}; }
inline Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
inline Status DeadlineExceeded(std::string m) { return {Code::kDeadlineExceeded, std::move(m)}; }
inline Status Cancelled(std::string m) { return {Code::kCancelled, std::move(m)}; }
inline Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }
inline Status Unimplemented(std::string m) { return {Code::kUnimplemented, std::move(m)}; }
inline Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {Code::kResourceExhausted, std::move(m)}; }
inline Status Unauthenticated(std::string m) { return {Code::kUnauthenticated, std::move(m)}; }

// Result<T>: a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}               // NOLINT(implicit)
  Result(Status status) : v_(std::move(status)) {}        // NOLINT(implicit); must be non-OK
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace ws

#define WS_CONCAT_INNER(a, b) a##b
#define WS_CONCAT(a, b) WS_CONCAT_INNER(a, b)

// Return early on a non-OK Status.
#define WS_RETURN_IF_ERROR(expr)            \
  do {                                      \
    ::ws::Status _ws_st = (expr);           \
    if (!_ws_st.ok()) return _ws_st;        \
  } while (0)

// `WS_ASSIGN_OR_RETURN(auto x, F());` binds x or returns F()'s status.
#define WS_ASSIGN_OR_RETURN(lhs, expr)                         \
  auto WS_CONCAT(_ws_res_, __LINE__) = (expr);                 \
  if (!WS_CONCAT(_ws_res_, __LINE__).ok())                     \
    return WS_CONCAT(_ws_res_, __LINE__).status();             \
  lhs = std::move(WS_CONCAT(_ws_res_, __LINE__)).value()
