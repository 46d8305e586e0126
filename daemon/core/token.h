// Shared-secret bearer tokens (daemon --token-file, client token options):
// reading a token file and comparing tokens without a timing side channel.
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

// given == expected, in time that depends only on expected.size().
bool TokenEquals(std::string_view given, std::string_view expected);

}  // namespace ws
