// The host platform: no devices, and every device call says why (the build).
#include <gtest/gtest.h>

#include <string>

#include "daemon/platform/platform.h"

namespace ws {
namespace {

TEST(HostPlatformTest, RefusesEveryDeviceCallNamingTheBuild) {
  Platform& p = HostPlatform();
  EXPECT_STREQ(p.name(), "host");
  const std::string why = "built with WS_WITH_CUDA=OFF";
  EXPECT_NE(p.DeviceSupport().message().find(why), std::string::npos);
  EXPECT_EQ(p.DeviceCount().status().code(), Code::kUnimplemented);
  EXPECT_FALSE(p.DeviceUuid(0).ok());
  EXPECT_FALSE(p.DeviceByUuid("GPU-0").ok());
  int x = 0;
  EXPECT_EQ(p.PointerDevice(&x), -1);
  EXPECT_EQ(p.IpcHandleBytes(), 0u);
  EXPECT_FALSE(p.ExportIpc(&x).ok());
  auto opened = p.OpenIpc(std::string(64, '\0'), 0, "engine e param w");
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.status().message().find("engine e param w"), std::string::npos) << opened.status().ToString();
  EXPECT_NE(opened.status().message().find(why), std::string::npos);
}

TEST(HostPlatformTest, PinningHostMemoryIsANoOpThatKeepsThePointer) {
  char buf[64];
  auto pinned = HostPlatform().PinHostRange(buf, sizeof buf, true, "shard w");
  ASSERT_TRUE(pinned.ok()) << pinned.status().ToString();
  EXPECT_EQ(pinned->get(), static_cast<void*>(buf));
}

}  // namespace
}  // namespace ws
