#include "daemon/core/token.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace ws {
namespace {

class TokenFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char t[] = "/tmp/ws-token-test-XXXXXX";
    ASSERT_NE(::mkdtemp(t), nullptr);
    dir_ = t;
  }
  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }
  std::string Write(const std::string& name, const std::string& text, mode_t mode) {
    std::string p = dir_ + "/" + name;
    std::ofstream(p) << text;
    EXPECT_EQ(::chmod(p.c_str(), mode), 0);
    return p;
  }
  std::string dir_;
};

TEST_F(TokenFile, ContentWithoutSurroundingWhitespace) {
  auto t = ReadTokenFile(Write("t", "  s3cr3t-T0ken_x\n\n", 0600), true);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(*t, "s3cr3t-T0ken_x");
  t = ReadTokenFile(Write("g", "abc\n", 0640), true);  // the group may read it
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(*t, "abc");
}

TEST_F(TokenFile, RefusesWhatOthersMayReadUnlessAskedNotTo) {
  std::string p = Write("t", "abc\n", 0644);
  auto t = ReadTokenFile(p, true);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find(p), std::string::npos) << t.status().message();
  EXPECT_NE(t.status().message().find("0644"), std::string::npos) << t.status().message();
  EXPECT_EQ(t.status().message().find("abc"), std::string::npos) << "the token leaked into: " << t.status().message();
  EXPECT_FALSE(ReadTokenFile(Write("w", "abc\n", 0602), true).ok());
  EXPECT_TRUE(ReadTokenFile(p, false).ok());  // clients read their own files
}

TEST_F(TokenFile, RefusesEmptyMissingAndNonTokens) {
  auto t = ReadTokenFile(Write("e", " \n\t\n", 0600), true);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("is empty"), std::string::npos) << t.status().message();
  t = ReadTokenFile(dir_ + "/missing", true);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find(dir_ + "/missing"), std::string::npos) << t.status().message();
  t = ReadTokenFile(Write("s", "two words\n", 0600), true);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("character 3"), std::string::npos) << t.status().message();
  EXPECT_FALSE(ReadTokenFile(Write("u", "caf\xc3\xa9", 0600), true).ok());
  EXPECT_FALSE(ReadTokenFile(dir_, true).ok());  // a directory
}

TEST(TokenEquals, ExactMatchOnly) {
  EXPECT_TRUE(TokenEquals("abc", "abc"));
  EXPECT_FALSE(TokenEquals("abd", "abc"));
  EXPECT_FALSE(TokenEquals("ab", "abc"));
  EXPECT_FALSE(TokenEquals("abcd", "abc"));
  EXPECT_FALSE(TokenEquals("", "abc"));
  EXPECT_FALSE(TokenEquals(std::string("abc\0", 4), "abc"));
  EXPECT_TRUE(TokenEquals("", ""));
}

}  // namespace
}  // namespace ws
