// Metrics: the Prometheus text exposition (families, labels, histogram).
#include "daemon/server/metrics.h"

#include <gtest/gtest.h>

#include <map>
#include <sstream>
#include <cstring>
#include <string>

namespace ws::server {
namespace {

// sample line ("name{labels}") -> value; checks every sample's family was
// announced by "# TYPE" first.
std::map<std::string, std::string> Parse(const std::string& text) {
  std::map<std::string, std::string> out;
  std::map<std::string, std::string> types;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    EXPECT_FALSE(line.empty()) << "empty line in exposition";
    if (line.rfind("# TYPE ", 0) == 0) {
      auto rest = line.substr(7);
      auto sp = rest.find(' ');
      EXPECT_EQ(types.count(rest.substr(0, sp)), 0u) << "family announced twice: " << line;
      types[rest.substr(0, sp)] = rest.substr(sp + 1);
      continue;
    }
    if (line.rfind("# HELP ", 0) == 0) continue;
    auto sp = line.rfind(' ');
    EXPECT_NE(sp, std::string::npos) << line;
    std::string sample = line.substr(0, sp);
    std::string name = sample.substr(0, sample.find('{'));
    std::string family = name;
    for (const char* suf : {"_bucket", "_sum", "_count"})
      if (!types.count(family) && family.size() > strlen(suf) && family.ends_with(suf))
        family = family.substr(0, family.size() - strlen(suf));
    EXPECT_TRUE(types.count(family)) << "sample before its # TYPE: " << line;
    EXPECT_EQ(out.count(sample), 0u) << "duplicate sample: " << line;
    out[sample] = line.substr(sp + 1);
  }
  return out;
}

StatusSnapshot Snapshot() {
  StatusSnapshot s;
  s.uptime_seconds = 12.5;
  EngineInfo e;
  e.engine_id = "eng-1";
  e.model = "m\"x";
  e.replica_id = 0;
  e.tp_rank = 1;
  e.applied_version = 3;
  s.engines.push_back(e);
  ModelInfo m;
  m.model = "m\"x";
  m.committed_version = 5;
  s.models.push_back(m);
  s.current_syncs.push_back(SyncStats{});
  return s;
}

TEST(Metrics, RendersGaugesFromStatus) {
  Metrics metrics(BuildInfo{"1.2.3", true});
  auto m = Parse(metrics.Render(Snapshot()));
  EXPECT_EQ(m["weightsync_build_info{version=\"1.2.3\",cuda=\"true\"}"], "1");
  EXPECT_EQ(m["weightsync_uptime_seconds"], "12.5");
  EXPECT_EQ(m["weightsync_engines_registered"], "1");
  EXPECT_EQ(m["weightsync_syncs_in_flight"], "1");
  EXPECT_EQ(m["weightsync_model_committed_version{model=\"m\\\"x\"}"], "5");
  EXPECT_EQ(m["weightsync_engine_applied_version{engine=\"eng-1\",model=\"m\\\"x\",replica=\"0\",tp_rank=\"1\"}"], "3");
  EXPECT_EQ(m["weightsync_engine_version_lag{engine=\"eng-1\",model=\"m\\\"x\"}"], "2");
  EXPECT_EQ(m["weightsync_syncs_total{outcome=\"committed\"}"], "0");
  EXPECT_EQ(m["weightsync_syncs_total{outcome=\"aborted\"}"], "0");
}

TEST(Metrics, CountsSyncsIntoCumulativeHistogram) {
  Metrics metrics(BuildInfo{"v", false}, {0.5, 2});
  SyncStats a;
  a.seconds = 0.25;
  a.bytes_written = 1000;
  a.bytes_read = 800;
  metrics.SyncFinished(a, /*committed=*/true);
  SyncStats b;
  b.seconds = 1;
  b.bytes_written = 10;
  metrics.SyncFinished(b, /*committed=*/false);
  SyncStats c;
  c.seconds = 7;
  metrics.SyncFinished(c, /*committed=*/false);
  auto m = Parse(metrics.Render(StatusSnapshot{}));
  EXPECT_EQ(m["weightsync_syncs_total{outcome=\"committed\"}"], "1");
  EXPECT_EQ(m["weightsync_syncs_total{outcome=\"aborted\"}"], "2");
  EXPECT_EQ(m["weightsync_sync_duration_seconds_bucket{le=\"0.5\"}"], "1");
  EXPECT_EQ(m["weightsync_sync_duration_seconds_bucket{le=\"2\"}"], "2");
  EXPECT_EQ(m["weightsync_sync_duration_seconds_bucket{le=\"+Inf\"}"], "3");
  EXPECT_EQ(m["weightsync_sync_duration_seconds_count"], "3");
  EXPECT_EQ(m["weightsync_sync_duration_seconds_sum"], "8.25");
  EXPECT_EQ(m["weightsync_bytes_written_total"], "1010");
  EXPECT_EQ(m["weightsync_bytes_read_total"], "800");
  EXPECT_EQ(m["weightsync_last_sync_throughput_bytes_per_second"], "4000");
  EXPECT_EQ(m["weightsync_build_info{version=\"v\",cuda=\"false\"}"], "1");
}

TEST(Metrics, CountsRpcErrorsByCodeOnly) {
  Metrics metrics(BuildInfo{"v", false});
  metrics.RpcFinished("/weightsync.v1.WeightSync/BeginSync", 0);
  metrics.RpcFinished("/weightsync.v1.WeightSync/BeginSync", 3);
  metrics.RpcFinished("/weightsync.v1.WeightSync/BeginSync", 3);
  metrics.RpcFinished("/weightsync.v1.WeightSync/Commit", 10);
  metrics.Housekeeping();
  auto m = Parse(metrics.Render(StatusSnapshot{}));
  EXPECT_EQ(m["weightsync_rpc_errors_total{method=\"/weightsync.v1.WeightSync/BeginSync\",code=\"INVALID_ARGUMENT\"}"],
            "2");
  EXPECT_EQ(m["weightsync_rpc_errors_total{method=\"/weightsync.v1.WeightSync/Commit\",code=\"ABORTED\"}"], "1");
  EXPECT_EQ(m.count("weightsync_rpc_errors_total{method=\"/weightsync.v1.WeightSync/BeginSync\",code=\"OK\"}"), 0u);
  EXPECT_EQ(m["weightsync_housekeeping_passes_total"], "1");
}

TEST(Metrics, CountsSyncBytesPerPeer) {
  Metrics metrics(BuildInfo{"v", false});
  auto m = Parse(metrics.Render(StatusSnapshot{}, {}, {{"b", PeerBytes{123, 0}}, {"c", PeerBytes{0, 45}}}));
  EXPECT_EQ(m["weightsync_peer_bytes_sent_total{peer=\"b\"}"], "123");
  EXPECT_EQ(m["weightsync_peer_bytes_received_total{peer=\"c\"}"], "45");
  EXPECT_EQ(m["weightsync_peer_bytes_sent_total{peer=\"c\"}"], "0");
  EXPECT_EQ(Parse(metrics.Render(StatusSnapshot{})).count("weightsync_peer_bytes_sent_total{peer=\"b\"}"), 0u);
}

TEST(Metrics, EscapesLabelValues) {
  EXPECT_EQ(EscapeLabelValue("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
  EXPECT_EQ(StatusCodeName(16), "UNAUTHENTICATED");
  EXPECT_EQ(StatusCodeName(99), "CODE_99");
}

TEST(MetricsServer, RefusesBadAddresses) {
  Metrics metrics(BuildInfo{"v", false});
  MetricsServer server(&metrics, nullptr);
  EXPECT_FALSE(server.Start("9464").ok());
  EXPECT_FALSE(server.Start("127.0.0.1:99999").ok());
  EXPECT_FALSE(server.Start("127.0.0.1:x").ok());
  EXPECT_NE(server.Start("127.0.0.1:x").message().find("127.0.0.1:x"), std::string::npos);
}

}  // namespace
}  // namespace ws::server
