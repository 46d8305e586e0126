// Test certificates made at test time with the openssl CLI: a CA, a server
// certificate for 127.0.0.1/localhost and a client certificate with CN
// ws-test-client, all signed by the CA (EC P-256, valid two days).
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace ws::testing {

class TestCerts {
 public:
  // The process-wide set (removed at exit), or null when openssl could not make it.
  static const TestCerts* Get() {
    static const TestCerts certs;
    return certs.ok_ ? &certs : nullptr;
  }
  ~TestCerts() {
    if (!dir_.empty()) std::system(("rm -rf '" + dir_ + "'").c_str());
  }
  TestCerts(const TestCerts&) = delete;
  TestCerts& operator=(const TestCerts&) = delete;

  // ca.pem, server.pem, server.key, client.pem, client.key
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string Pem(const std::string& name) const {
    std::ifstream f(Path(name));
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }

 private:
  TestCerts() {
    char t[] = "/tmp/ws-test-certs-XXXXXX";
    if (::mkdtemp(t) == nullptr) return;
    dir_ = t;
    const std::string key = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string sign = " -CA ca.pem -CAkey ca.key -CAcreateserial -days 2";
    const std::string cmd =
        "command -v openssl >/dev/null && (set -e; cd '" + dir_ + "'; exec >log 2>&1;"
        " openssl req -x509" + key + " -keyout ca.key -out ca.pem -days 2 -subj /CN=ws-test-ca;"
        " openssl req" + key + " -keyout server.key -out server.csr -subj /CN=localhost;"
        " printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > server.ext;"
        " openssl x509 -req -in server.csr" + sign + " -out server.pem -extfile server.ext;"
        " openssl req" + key + " -keyout client.key -out client.csr -subj /CN=ws-test-client;"
        " openssl x509 -req -in client.csr" + sign + " -out client.pem)";
    ok_ = std::system(cmd.c_str()) == 0;
  }
  std::string dir_;
  bool ok_ = false;
};

}  // namespace ws::testing

#define WS_REQUIRE_TEST_CERTS(var)                         \
  const ::ws::testing::TestCerts* var = ::ws::testing::TestCerts::Get(); \
  if (var == nullptr) GTEST_SKIP() << "openssl could not make test certificates (is the openssl CLI installed?)"
