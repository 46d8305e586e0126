// Bulk host-to-host transfer over the UCX transport: the floor a cross-node
// sync is compared against (bytes moved between two daemons' workers with
// nothing else done to them), and the program the multi-host tests run in two
// network namespaces.
//
//   ucx_bulk --role send|recv --name ME --peer THEM --dir DIR [--bytes B] [--chunk C]
//            [--repeats R] [--timeout-ms T] [--devices LIST] [--transports LIST]
//
// Each side writes its worker address to DIR/ME.addr and waits for
// DIR/THEM.addr (the out-of-band exchange the daemons do over gRPC). The
// sender sends a B-byte buffer R times in C-byte messages; the receiver
// checks the bytes of every repeat against the sender's pattern and answers
// with the count of repeats it verified, so both exit 0 only when every byte
// arrived intact. Prints "started" when the first repeat begins, then one JSON
// line: {"role", "bytes", "repeats", "seconds" (median per repeat),
// "best_seconds", "gbps" (B/median/1e9), "verified"}. Errors (exit 1) name the
// peer; a timed-out or failed transfer is an error.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_args.h"
#include "daemon/transport/ucx/ucx_transport.h"

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Usage(const std::string& msg) {
  std::fprintf(stderr,
               "ucx_bulk: %s\nusage: ucx_bulk --role send|recv --name ME --peer THEM --dir DIR [--bytes B] "
               "[--chunk C] [--repeats R] [--timeout-ms T] [--devices LIST] [--transports LIST]\n",
               msg.c_str());
  std::exit(2);
}

[[noreturn]] void Fail(const std::string& msg) {
  std::fprintf(stderr, "ucx_bulk: %s\n", msg.c_str());
  std::exit(1);
}

// Byte i of repeat r: a cheap hash, so a misplaced or stale chunk shows.
inline uint8_t Pattern(uint64_t i, uint64_t r) {
  uint64_t x = (i / 8) * 0x9E3779B97F4A7C15ull + r * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31;
  return static_cast<uint8_t>(x >> (8 * (i % 8)));
}

void Fill(std::vector<uint8_t>& b, uint64_t r) {
  for (uint64_t i = 0; i < b.size(); ++i) b[i] = Pattern(i, r);
}

bool Check(const std::vector<uint8_t>& b, uint64_t r) {
  for (uint64_t i = 0; i < b.size(); ++i)
    if (b[i] != Pattern(i, r)) return false;
  return true;
}

std::string ReadPeerAddress(const std::string& path, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    std::ifstream f(path, std::ios::binary);
    if (f) {
      std::stringstream ss;
      ss << f.rdbuf();
      return ss.str();
    }
    if (Clock::now() > deadline) Fail("no peer address at " + path + " within the timeout");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string role, name, peer, dir, devices, transports;
  uint64_t bytes = 256ull << 20, chunk = 4ull << 20, repeats = 5, timeout_ms = 30000;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) Usage("missing value for " + a);
    std::string v = argv[++i];
    auto size = [&] {
      auto s = ws::bench::ParseSize(v.c_str());
      if (!s || *s == 0) Usage("bad value for " + a);
      return *s;
    };
    if (a == "--role") role = v;
    else if (a == "--name") name = v;
    else if (a == "--peer") peer = v;
    else if (a == "--dir") dir = v;
    else if (a == "--devices") devices = v;
    else if (a == "--transports") transports = v;
    else if (a == "--bytes") bytes = size();
    else if (a == "--chunk") chunk = size();
    else if (a == "--repeats") repeats = size();
    else if (a == "--timeout-ms") timeout_ms = size();
    else Usage("unknown flag " + a);
  }
  if ((role != "send" && role != "recv") || name.empty() || peer.empty() || dir.empty())
    Usage("--role send|recv, --name, --peer and --dir are required");
  const auto timeout = std::chrono::milliseconds(timeout_ms);

  ws::UcxOptions uo;
  uo.net_devices = devices;
  uo.transports = transports;
  auto t = ws::UcxTransport::Create(uo);
  if (!t.ok()) Fail(t.status().ToString());
  ws::UcxTransport& ucx = **t;
  {
    const std::string tmp = dir + "/" + name + ".addr.tmp", final = dir + "/" + name + ".addr";
    std::ofstream(tmp, std::ios::binary) << ucx.address();
    if (std::rename(tmp.c_str(), final.c_str()) != 0) Fail("cannot write " + final);
  }
  if (auto st = ucx.Connect(peer, ReadPeerAddress(dir + "/" + peer + ".addr", timeout)); !st.ok())
    Fail(st.ToString());

  const bool send = role == "send";
  std::vector<uint8_t> buf(bytes);
  std::vector<double> secs;
  uint64_t verified = 0;
  for (uint64_t r = 0; r < repeats; ++r) {
    if (send) Fill(buf, r);
    std::vector<ws::UcxTransport::Op> ops;
    for (uint64_t off = 0, k = 0; off < bytes; off += chunk, ++k)
      ops.push_back({send, peer, (r << 32) | k, buf.data() + off, std::min(chunk, bytes - off),
                     "repeat " + std::to_string(r) + " chunk " + std::to_string(k)});
    if (r == 0) {
      std::printf("started\n");
      std::fflush(stdout);
    }
    auto t0 = Clock::now();
    if (auto st = ucx.Exchange(ops, timeout); !st.ok()) Fail(st.ToString());
    secs.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    if (!send) {
      if (!Check(buf, r)) Fail("repeat " + std::to_string(r) + " from peer " + peer + ": bytes differ");
      ++verified;
    }
  }
  // The receiver reports how many repeats it verified; the sender waits for it.
  uint64_t report = verified;
  const uint64_t done_tag = ~uint64_t{0};
  if (auto st = ucx.Exchange({{!send, peer, done_tag, &report, sizeof(report), "verification report"}}, timeout);
      !st.ok())
    Fail(st.ToString());
  if (send && report != repeats)
    Fail("peer " + peer + " verified " + std::to_string(report) + " of " + std::to_string(repeats) + " repeats");
  std::vector<double> sorted = secs;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  std::printf("{\"role\": \"%s\", \"bytes\": %llu, \"repeats\": %llu, \"seconds\": %.6f, \"best_seconds\": %.6f, "
              "\"gbps\": %.3f, \"verified\": %llu}\n",
              role.c_str(), static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(repeats), median,
              sorted.front(), static_cast<double>(bytes) / median / 1e9, static_cast<unsigned long long>(report));
  return 0;
}
