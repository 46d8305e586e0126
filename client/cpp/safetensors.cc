#include "client/cpp/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace ws::st {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr uint64_t kMaxHeader = 100ull << 20;  // the reference implementation's limit

std::string Errno(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

// Element size of any safetensors dtype, 0 if unknown.
uint64_t AnyDTypeSize(const std::string& d) {
  static const std::map<std::string, uint64_t> kSizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
      {"I8", 1},  {"U64", 8}, {"U32", 4}, {"U16", 2},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1},
      {"F8_E5M2", 1}, {"F8_E8M0", 1}};
  auto it = kSizes.find(d);
  return it == kSizes.end() ? 0 : it->second;
}

std::optional<DType> MovableDType(const std::string& d) {
  if (d == "F32") return DType::kF32;
  if (d == "BF16") return DType::kBF16;
  if (d == "F16") return DType::kF16;
  return std::nullopt;
}

Result<std::string> ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound(Errno("cannot open", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Internal(Errno("cannot read", path));
  return ss.str();
}

}  // namespace

// ---- MappedFile -------------------------------------------------------------

Result<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return NotFound(Errno("cannot open", path));
  struct stat stbuf {};
  if (::fstat(fd.get(), &stbuf) != 0) return Internal(Errno("cannot stat", path));
  uint64_t size = static_cast<uint64_t>(stbuf.st_size);
  UniqueMapping map;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED) return Internal(Errno("cannot mmap", path));
    map = UniqueMapping(p, size);
  }
  // fd closes here: the mapping keeps the file referenced
  return std::unique_ptr<MappedFile>(new MappedFile(path, std::move(map), size));
}

// ---- Parsing ----------------------------------------------------------------

Result<std::vector<TensorInfo>> ParseSafetensors(const uint8_t* data, uint64_t size,
                                                 const std::string& path) {
  if (size < 8) return InvalidArgument(path + ": file too short for a safetensors header (" +
                                       std::to_string(size) + " bytes)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];  // little-endian u64
  if (n > kMaxHeader || n > size - 8)
    return InvalidArgument(path + ": header length " + std::to_string(n) +
                           " exceeds the file size " + std::to_string(size) + " or the 100 MiB limit");
  json header;
  try {
    header = json::parse(data + 8, data + 8 + n);
  } catch (const std::exception& e) {
    return InvalidArgument(path + ": header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) return InvalidArgument(path + ": header is not a JSON object");

  const uint64_t data_size = size - 8 - n;
  const uint8_t* base = data + 8 + n;
  struct Entry {
    TensorInfo info;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const json& v = it.value();
    auto bad = [&](const std::string& why) {
      return InvalidArgument(path + ": tensor \"" + name + "\": " + why);
    };
    if (!v.is_object()) return bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) return bad("missing or non-string \"dtype\"");
    if (!v.contains("shape") || !v["shape"].is_array()) return bad("missing or non-array \"shape\"");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      return bad("\"data_offsets\" must be a [begin, end] array");
    Entry e;
    e.info.name = name;
    e.info.dtype_name = v["dtype"].get<std::string>();
    e.info.dtype = MovableDType(e.info.dtype_name);
    e.info.file = path;
    uint64_t numel = 1;
    for (const json& d : v["shape"]) {
      if (!d.is_number_unsigned()) return bad("shape entries must be non-negative integers");
      uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > (uint64_t{1} << 62) / dim) return bad("shape overflows");
      numel *= dim;
      e.info.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return bad("data_offsets must be non-negative integers");
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.end < e.begin)
      return bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] end before begin");
    if (e.end > data_size)
      return bad("data_offsets end " + std::to_string(e.end) + " is past the data section (" +
                 std::to_string(data_size) + " bytes)");
    uint64_t esize = AnyDTypeSize(e.info.dtype_name);
    if (esize != 0 && numel * esize != e.end - e.begin)
      return bad("shape " + ShapeToString(e.info.shape) + " of " + e.info.dtype_name + " needs " +
                 std::to_string(numel * esize) + " bytes but data_offsets span " +
                 std::to_string(e.end - e.begin));
    e.info.data = base + e.begin;
    e.info.nbytes = e.end - e.begin;
    entries.push_back(std::move(e));
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Like the reference implementation: tensors tile the data section exactly.
  uint64_t expect = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (e.begin < expect)
      return InvalidArgument(path + ": tensor \"" + e.info.name + "\" data_offsets [" +
                             std::to_string(e.begin) + ", " + std::to_string(e.end) +
                             ") overlap tensor \"" + entries[i - 1].info.name + "\"");
    if (e.begin > expect)
      return InvalidArgument(path + ": tensor \"" + e.info.name + "\" data_offsets begin at " +
                             std::to_string(e.begin) + ", leaving a hole after byte " + std::to_string(expect));
    expect = e.end;
  }
  if (expect != data_size)
    return InvalidArgument(path + ": data section has " + std::to_string(data_size) +
                           " bytes but tensors cover " + std::to_string(expect));
  std::vector<TensorInfo> out;
  out.reserve(entries.size());
  for (Entry& e : entries) out.push_back(std::move(e.info));
  return out;
}

// ---- Checkpoint -------------------------------------------------------------

Result<Checkpoint> Checkpoint::OpenFile(const std::string& path) {
  Checkpoint c;
  c.dir_ = fs::path(path).parent_path().string();
  WS_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> f, MappedFile::Open(path));
  WS_ASSIGN_OR_RETURN(c.tensors_, ParseSafetensors(f->data(), f->size(), path));
  c.files_.push_back(std::move(f));
  return c;
}

Result<Checkpoint> Checkpoint::Open(const std::string& dir) {
  Checkpoint c;
  c.dir_ = dir;
  const fs::path d(dir);
  WS_ASSIGN_OR_RETURN(c.config_json_, ReadText((d / "config.json").string()));
  const fs::path index = d / "model.safetensors.index.json";
  std::error_code ec;
  if (!fs::exists(index, ec)) {
    WS_ASSIGN_OR_RETURN(Checkpoint single, OpenFile((d / "model.safetensors").string()));
    c.files_ = std::move(single.files_);
    c.tensors_ = std::move(single.tensors_);
    return c;
  }
  WS_ASSIGN_OR_RETURN(std::string text, ReadText(index.string()));
  std::map<std::string, std::string> weight_map;  // tensor -> file
  try {
    json j = json::parse(text);
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      return InvalidArgument(index.string() + ": missing \"weight_map\" object");
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return InvalidArgument(index.string() + ": weight_map entry for \"" + it.key() + "\" is not a file name");
      weight_map[it.key()] = it.value().get<std::string>();
    }
  } catch (const std::exception& e) {
    return InvalidArgument(index.string() + ": not valid JSON: " + e.what());
  }
  std::set<std::string> files;
  for (const auto& [t, f] : weight_map) {
    if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
      return InvalidArgument(index.string() + ": weight_map entry for \"" + t + "\" names an invalid file \"" + f + "\"");
    files.insert(f);
  }
  std::set<std::string> seen;
  for (const std::string& f : files) {
    const std::string path = (d / f).string();
    WS_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> mf, MappedFile::Open(path));
    WS_ASSIGN_OR_RETURN(std::vector<TensorInfo> ts, ParseSafetensors(mf->data(), mf->size(), path));
    for (TensorInfo& t : ts) {
      auto it = weight_map.find(t.name);
      if (it != weight_map.end() && it->second != f) continue;  // the index names another copy
      if (!seen.insert(t.name).second)
        return InvalidArgument(path + ": tensor \"" + t.name + "\" appears in more than one file");
      c.tensors_.push_back(std::move(t));
    }
    c.files_.push_back(std::move(mf));
  }
  for (const auto& [t, f] : weight_map)
    if (!seen.count(t))
      return InvalidArgument(index.string() + ": tensor \"" + t + "\" is mapped to " + f + " but that file lacks it");
  return c;
}

const TensorInfo* Checkpoint::Find(const std::string& name) const {
  for (const TensorInfo& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t n = 0;
  for (const TensorInfo& t : tensors_) n += t.nbytes;
  return n;
}

// ---- Writing ----------------------------------------------------------------

Result<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(const std::string& path,
                                                                     std::vector<TensorHeader> tensors) {
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return DTypeSize(tensors[a].dtype) > DTypeSize(tensors[b].dtype);
  });
  std::unique_ptr<SafetensorsWriter> w(new SafetensorsWriter());
  w->path_ = path;
  w->ranges_.resize(tensors.size());
  // ordered_json keeps the data order in the header text.
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  std::set<std::string> names;
  uint64_t off = 0;
  for (size_t i : order) {
    const TensorHeader& t = tensors[i];
    if (!names.insert(t.name).second) return InvalidArgument(path + ": duplicate tensor \"" + t.name + "\"");
    for (int64_t d : t.shape)
      if (d < 0) return InvalidArgument(path + ": tensor \"" + t.name + "\" has a negative dimension");
    uint64_t bytes = static_cast<uint64_t>(NumElements(t.shape)) * DTypeSize(t.dtype);
    header[t.name] = {{"dtype", DTypeSafetensorsName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + bytes}}};
    w->ranges_[i] = {off, off + bytes};
    off += bytes;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  w->data_start_ = 8 + text.size();
  w->size_ = w->data_start_ + off;

  w->fd_ = UniqueFd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!w->fd_.valid()) return Internal(Errno("cannot create", path));
  if (::ftruncate(w->fd_.get(), static_cast<off_t>(w->size_)) != 0) return Internal(Errno("cannot size", path));
  void* p = ::mmap(nullptr, w->size_, PROT_READ | PROT_WRITE, MAP_SHARED, w->fd_.get(), 0);
  if (p == MAP_FAILED) return Internal(Errno("cannot mmap", path));
  w->map_ = UniqueMapping(p, w->size_);
  uint8_t* m = w->base();
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) m[i] = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(m + 8, text.data(), text.size());
  return w;
}

void* SafetensorsWriter::tensor_data(size_t i) const { return base() + data_start_ + ranges_[i].first; }
uint64_t SafetensorsWriter::tensor_bytes(size_t i) const { return ranges_[i].second - ranges_[i].first; }

Status SafetensorsWriter::Finish() {
  if (finished_) return Status::Ok();
  Status s;
  if (map_.Unmap() != 0) s = Internal(Errno("cannot unmap", path_));
  if (fd_.Close() != 0 && s.ok()) s = Internal(Errno("cannot close", path_));
  finished_ = s.ok();
  return s;
}

SafetensorsWriter::~SafetensorsWriter() {
  map_.Unmap();
  fd_.Close();
  if (!finished_ && !path_.empty()) ::unlink(path_.c_str());
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  std::vector<TensorHeader> headers;
  headers.reserve(tensors.size());
  for (const TensorToWrite& t : tensors) headers.push_back({t.name, t.dtype, t.shape});
  WS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> w, SafetensorsWriter::Create(path, headers));
  for (size_t i = 0; i < tensors.size(); ++i) {
    uint64_t n = w->tensor_bytes(i);
    if (n == 0) continue;
    if (tensors[i].data == nullptr)
      return InvalidArgument(path + ": tensor \"" + tensors[i].name + "\" has no data");
    std::memcpy(w->tensor_data(i), tensors[i].data, n);
  }
  return w->Finish();
}

Status WriteIndex(const std::string& dir, uint64_t total_size,
                  const std::vector<std::pair<std::string, std::string>>& weight_map) {
  nlohmann::ordered_json j;
  j["metadata"] = {{"total_size", total_size}};
  j["weight_map"] = nlohmann::ordered_json::object();
  for (const auto& [t, f] : weight_map) j["weight_map"][t] = f;
  const std::string path = (fs::path(dir) / "model.safetensors.index.json").string();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Internal(Errno("cannot create", path));
  out << j.dump(2) << "\n";
  out.close();
  if (!out) return Internal(Errno("cannot write", path));
  return Status::Ok();
}

}  // namespace ws::st
