// health, status, and helpers shared by the subcommands.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include <google/protobuf/util/json_util.h>

#include "client/cpp/client.h"
#include "client/ctl/commands.h"

#ifndef WS_DEFAULT_LAYOUTS_DIR
#define WS_DEFAULT_LAYOUTS_DIR "config/layouts"
#endif

namespace ws::ctl {
namespace {

void WriteAll(int fd, const std::string& line) {
  std::string s = line;
  if (s.empty() || s.back() != '\n') s.push_back('\n');
  const char* p = s.data();
  size_t n = s.size();
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Left-aligned text table.
class Table {
 public:
  explicit Table(std::vector<std::string> header) { rows_.push_back(std::move(header)); }
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  std::string Render() const {
    std::vector<size_t> w;
    for (const auto& r : rows_)
      for (size_t i = 0; i < r.size(); ++i) {
        if (w.size() <= i) w.push_back(0);
        w[i] = std::max(w[i], r[i].size());
      }
    std::string out;
    for (const auto& r : rows_) {
      std::string line;
      for (size_t i = 0; i < r.size(); ++i) {
        line += r[i];
        if (i + 1 < r.size()) line += std::string(w[i] - r[i].size() + 2, ' ');
      }
      out += line + "\n";
    }
    return out;
  }

 private:
  std::vector<std::vector<std::string>> rows_;
};

std::string Fmt(double v, int prec) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}

std::string SyncLine(const pb::SyncStats& s) {
  std::string line = "sync " + std::to_string(s.sync_id()) + " model " + s.model() + " version " +
                     std::to_string(s.version()) + ": " + s.state() + ", " + std::to_string(s.bytes_written()) +
                     " bytes written (" + HumanBytes(s.bytes_written()) + ") in " + Fmt(s.seconds(), 3) + " s (" +
                     Fmt(s.gbps(), 2) + " GB/s), world " + std::to_string(s.world_size()) + ", engines " +
                     std::to_string(s.engines());
  if (!s.error().empty()) line += ", error: " + s.error();
  return line;
}

}  // namespace

void Out(const std::string& line) { WriteAll(STDOUT_FILENO, line); }
void Err(const std::string& line) { WriteAll(STDERR_FILENO, line); }

std::string HumanBytes(uint64_t bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1000 && u < 4) {
    v /= 1000;
    ++u;
  }
  return u == 0 ? std::to_string(bytes) + " B" : Fmt(v, 1) + " " + units[u];
}

std::string LayoutsDir(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* env = std::getenv("WEIGHTSYNC_LAYOUTS_DIR"); env != nullptr && *env != '\0') return env;
  return WS_DEFAULT_LAYOUTS_DIR;
}

Result<std::shared_ptr<const LayoutRegistry>> LoadRegistry(const std::string& flag) {
  const std::string dir = LayoutsDir(flag);
  auto reg = LayoutRegistry::LoadDir(dir);
  if (!reg.ok()) return reg.status().WithContext("loading layout rules from " + dir);
  return reg;
}

int RunHealth(const GlobalOptions& g, const HealthOptions& o) {
  WeightSyncClient client(g.daemon, g.client);
  auto st = client.Health(o.service, o.timeout_s);
  if (!st.ok()) {
    Out("UNKNOWN");
    Err("weightsyncctl health: " + client.target() + ": " + st.status().ToString());
    return 1;
  }
  Out(HealthStateName(*st));
  return *st == HealthState::kServing ? 0 : 1;
}

int RunStatus(const GlobalOptions& g, const StatusOptions& o) {
  WeightSyncClient client(g.daemon, g.client);
  auto r = client.GetStatus();
  if (!r.ok()) {
    Err("weightsyncctl status: " + client.target() + ": " + r.status().ToString());
    return 1;
  }
  const pb::StatusResponse& s = *r;
  if (o.json) {
    google::protobuf::util::JsonPrintOptions jo;
    jo.add_whitespace = true;
    jo.always_print_primitive_fields = true;
    jo.preserve_proto_field_names = true;
    std::string text;
    auto js = google::protobuf::util::MessageToJsonString(s, &text, jo);
    if (!js.ok()) {
      Err("weightsyncctl status: cannot print JSON: " + js.ToString());
      return 1;
    }
    Out(text);
    return 0;
  }
  std::string out = "weightsyncd " + s.daemon_version() + ", up " + Fmt(s.uptime_seconds(), 1) + " s, syncs committed " +
                    std::to_string(s.syncs_committed()) + ", aborted " + std::to_string(s.syncs_aborted()) + "\n";
  if (!s.node_name().empty()) out += "node " + s.node_name() + "\n";
  if (!s.peers().empty()) {
    out += "\npeers:\n";
    Table t({"  PEER", "ADDRESS", "STATE", "LAST_OK", "RTT_MS", "VERSION", "ERROR"});
    for (const auto& p : s.peers())
      t.Add({"  " + p.name(), p.address(), p.state(),
             p.last_ok_age_seconds() < 0 ? "never" : Fmt(p.last_ok_age_seconds(), 1) + " s ago", Fmt(p.rtt_ms(), 2),
             p.daemon_version(), p.last_error()});
    out += t.Render();
  }
  out += "\nmodels:\n";
  if (s.models().empty()) {
    out += "  (none)\n";
  } else {
    Table t({"  MODEL", "ARCHITECTURE", "REPLICAS", "ENGINE_RANKS", "COMMITTED_VERSION"});
    for (const auto& m : s.models())
      t.Add({"  " + m.model(), m.architecture(), std::to_string(m.replicas()), std::to_string(m.engine_ranks()),
             std::to_string(m.committed_version())});
    out += t.Render();
  }
  out += "\nengines:\n";
  if (s.engines().empty()) {
    out += "  (none)\n";
  } else {
    Table t({"  ENGINE", "MODEL", "REPLICA", "RANK", "TP", "PARAMS", "BYTES", "APPLIED", "OWNER", "LABEL"});
    for (const auto& e : s.engines())
      t.Add({"  " + e.engine_id(), e.model(), std::to_string(e.replica_id()), std::to_string(e.tp_rank()),
             std::to_string(e.tp_size()), std::to_string(e.params()), HumanBytes(e.bytes()),
             std::to_string(e.applied_version()), e.owner(), e.label()});
    out += t.Render();
  }
  out += "\ncurrent syncs:\n";
  if (s.current_syncs().empty()) out += "  (none)\n";
  for (const auto& c : s.current_syncs()) out += "  " + SyncLine(c) + "\n";
  out += "\nlast sync:\n";
  out += s.has_last_sync() && s.last_sync().sync_id() != 0 ? "  " + SyncLine(s.last_sync()) + "\n" : "  (none)\n";
  Out(out);
  return 0;
}

}  // namespace ws::ctl
