// Reading and writing safetensors checkpoints (https://github.com/huggingface/safetensors).
//
// A checkpoint directory holds config.json and either model.safetensors or
// several files listed by model.safetensors.index.json. Files are mapped
// read-only; tensor data pointers stay valid as long as the Checkpoint lives.
//
// Thread-safety: a Checkpoint is immutable after Open() and may be read from
// any number of threads. A SafetensorsWriter is used by one thread at a time
// (distinct tensors' buffers may be filled concurrently).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "daemon/core/dtype.h"
#include "daemon/core/manifest.h"
#include "daemon/core/posix_handles.h"
#include "daemon/core/status.h"

namespace ws::st {

// A read-only mapping of a whole file (RAII).
class MappedFile {
 public:
  static Result<std::unique_ptr<MappedFile>> Open(const std::string& path);
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(map_.get()); }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, UniqueMapping map, uint64_t size)
      : path_(std::move(path)), map_(std::move(map)), size_(size) {}
  std::string path_;
  UniqueMapping map_;  // empty for an empty file
  uint64_t size_ = 0;
};

struct TensorInfo {
  std::string name;
  std::string dtype_name;        // as written in the header, e.g. "BF16", "I64"
  std::optional<DType> dtype;    // empty for dtypes weightsync does not move
  Shape shape;
  const uint8_t* data = nullptr; // inside the file's mapping
  uint64_t nbytes = 0;
  std::string file;              // path of the file holding it
};

// Parses one safetensors image (header + data). Tensors come back in data
// order. Errors name `path` and the tensor.
Result<std::vector<TensorInfo>> ParseSafetensors(const uint8_t* data, uint64_t size,
                                                 const std::string& path);

class Checkpoint {
 public:
  // Opens DIR: config.json is required; tensors come from
  // model.safetensors.index.json (files in name order) when present, else
  // model.safetensors.
  static Result<Checkpoint> Open(const std::string& dir);
  // Opens a single safetensors file (no config.json needed).
  static Result<Checkpoint> OpenFile(const std::string& path);

  const std::string& dir() const { return dir_; }
  const std::string& config_json() const { return config_json_; }
  // Every tensor, in file order (index files by name, then data order).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;
  uint64_t total_bytes() const;

 private:
  std::string dir_;
  std::string config_json_;
  std::vector<std::shared_ptr<MappedFile>> files_;
  std::vector<TensorInfo> tensors_;
};

// ---- Writing --------------------------------------------------------------

struct TensorHeader {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
};

// Creates a safetensors file of the final size, maps it writable and lets the
// caller fill each tensor in place; Finish() flushes and closes it. The header
// carries "__metadata__": {"format": "pt"} and is space-padded so the data
// starts 8-byte aligned; tensors are laid out in order of decreasing element
// size (stable), so every tensor is aligned to its element size. A writer
// destroyed before Finish() removes the file.
class SafetensorsWriter {
 public:
  static Result<std::unique_ptr<SafetensorsWriter>> Create(const std::string& path,
                                                           std::vector<TensorHeader> tensors);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // The buffer of tensor i (index into the vector given to Create).
  void* tensor_data(size_t i) const;
  uint64_t tensor_bytes(size_t i) const;
  uint64_t file_bytes() const { return size_; }
  Status Finish();

 private:
  SafetensorsWriter() = default;
  std::string path_;
  uint8_t* base() const { return static_cast<uint8_t*>(map_.get()); }
  UniqueFd fd_;
  UniqueMapping map_;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;
  std::vector<std::pair<uint64_t, uint64_t>> ranges_;  // per input tensor: [begin, end) in the data section
  bool finished_ = false;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  const void* data = nullptr;  // NumElements(shape) * DTypeSize(dtype) bytes
};

// Writes a whole file from in-memory tensors.
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

// Writes DIR/model.safetensors.index.json: {"metadata": {"total_size": N},
// "weight_map": {tensor: file}}.
Status WriteIndex(const std::string& dir, uint64_t total_size,
                  const std::vector<std::pair<std::string, std::string>>& weight_map);

}  // namespace ws::st
