#include "daemon/core/token.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "daemon/core/posix_handles.h"

namespace ws {

namespace {
constexpr size_t kMaxTokenFileBytes = 64 << 10;

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
}  // namespace

Status ValidateToken(std::string_view token, const std::string& what) {
  if (token.empty()) return InvalidArgument(what + " is empty");
  for (size_t i = 0; i < token.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(token[i]);
    if (c < 0x21 || c > 0x7e)
      return InvalidArgument(what + ": character " + std::to_string(i) +
                             " is not printable ASCII (a token is one word of printable ASCII)");
  }
  return Status::Ok();
}

Result<std::string> ReadTokenFile(const std::string& path, bool refuse_other_access) {
  const std::string what = "token file " + path;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd.valid()) return FailedPrecondition("cannot open " + what + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return FailedPrecondition("cannot stat " + what + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return FailedPrecondition(what + " is not a regular file");
  if (refuse_other_access && (st.st_mode & (S_IROTH | S_IWOTH)) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return FailedPrecondition(what + " has mode " + mode +
                              ": other users may read or write it; chmod o-rw (e.g. 0600 or 0640)");
  }
  if (st.st_size > static_cast<off_t>(kMaxTokenFileBytes))
    return InvalidArgument(what + " is larger than " + std::to_string(kMaxTokenFileBytes) + " bytes");
  std::string text;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailedPrecondition("cannot read " + what + ": " + std::strerror(errno));
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > kMaxTokenFileBytes)
      return InvalidArgument(what + " is larger than " + std::to_string(kMaxTokenFileBytes) + " bytes");
  }
  fd.Close();
  size_t b = 0, e = text.size();
  while (b < e && IsSpace(text[b])) ++b;
  while (e > b && IsSpace(text[e - 1])) --e;
  std::string token = text.substr(b, e - b);
  WS_RETURN_IF_ERROR(ValidateToken(token, what));
  return token;
}

bool TokenEquals(std::string_view given, std::string_view expected) {
  unsigned char diff = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= static_cast<unsigned char>(g ^ static_cast<unsigned char>(expected[i]));
  }
  // Keep the compiler from turning the loop into an early-exit comparison.
  volatile unsigned char sink = diff;
  return sink == 0;
}

Result<std::string> ReadPemFile(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return FailedPrecondition(std::string("cannot read ") + what + " " + path + ": " + std::strerror(errno));
  std::stringstream ss;
  ss << f.rdbuf();
  std::string pem = ss.str();
  if (pem.find("-----BEGIN ") == std::string::npos)
    return InvalidArgument(std::string(what) + " " + path + " is not PEM (no -----BEGIN line)");
  return pem;
}

}  // namespace ws
