// gpu_copy and gpu_floor of builds without CUDA (chosen by the build files,
// bench/CMakeLists.txt): one JSON line saying why nothing was measured.
#include <cstdio>

int main() {
  std::printf("{\"skipped\": \"built without CUDA\"}\n");
  return 0;
}
