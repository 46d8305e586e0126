// Credentials files shared by the daemon and the clients: bearer tokens
// (--token-file; compared without a timing side channel) and TLS PEM files.
// Thread-safety: free functions, no shared state.
#pragma once

#include <string>
#include <string_view>

#include "daemon/core/status.h"

namespace ws {

// The token in `path`: the file's content without leading/trailing
// whitespace; it must be non-empty printable ASCII without spaces (it travels
// as "authorization: Bearer <token>"). With `refuse_other_access`, a file that
// users outside its owner and group may read or write is refused. Errors name
// the file and never contain the token.
Result<std::string> ReadTokenFile(const std::string& path, bool refuse_other_access);

// Checks a token's characters (see ReadTokenFile); `what` names its source.
Status ValidateToken(std::string_view token, const std::string& what);

// The PEM text in `path` (a TLS certificate, key or CA bundle); `what` names
// it in errors ("TLS client key"). Refuses a file without a -----BEGIN line.
Result<std::string> ReadPemFile(const std::string& path, const char* what);

// given == expected, in time that depends only on expected.size().
bool TokenEquals(std::string_view given, std::string_view expected);

}  // namespace ws
