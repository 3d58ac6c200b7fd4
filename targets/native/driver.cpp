// mebp-native: run the training steps of an MLX artifact directory (`mebp compile --target
// mlx`) by its manifest, with no Python in the process. The reference implementation of
// docs/manifest.md; targets/driver.py is the second one and this follows it step for step.
//
//   mebp-native DIR --tokens FILE --out ADAPTER.safetensors [--optimizer adamw|sgd] [--lr X]
//               [--weight-decay X] [--offload-dir D] [--grads-dir D] [--mlx-cache-bytes N]
//
// Everything is checked before any compute: the manifest (version, seal, consistency), the
// SHA-256 of every file it lists, the weights file's tensors, every stage file (MLX loads it,
// its signature matches the manifest) and the token file (shape, ids in range). Then each
// step runs the stages in order, writes offloaded values to memory-mapped files and maps them
// back, applies the optimizer to the LoRA parameters (or, for a manifest with fused updates,
// carries the new LoRA parameters and optimizer state the stages return into the next step),
// and after the last step writes the adapter (peft's keys) atomically. One JSON line on stdout reports the losses, the bytes
// held, and the process's peak RSS; an error is one line on stderr and exit status 1 (2 for
// a bad command line), and nothing is written.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <mlx/mlx.h>

#include "digest.h"
#include "json.h"

namespace fs = std::filesystem;
namespace mx = mlx::core;

namespace {

constexpr int kFormatVersion = 3;
constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kTokenMagic = "MEBPTOK1";

struct Failure : std::runtime_error {  // exit 1: the artifacts, the inputs or the run
  using std::runtime_error::runtime_error;
};
struct Usage : std::runtime_error {  // exit 2: the command line
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------ dtypes

struct DtypeInfo {
  const char* manifest;     // torch's name, as the manifest and .mlxfn signatures write it
  const char* safetensors;  // the safetensors header's name
  mx::Dtype mlx;
};

const std::vector<DtypeInfo>& dtypes() {
  static const std::vector<DtypeInfo> table = {
      {"float32", "F32", mx::float32}, {"float16", "F16", mx::float16}, {"bfloat16", "BF16", mx::bfloat16},
      {"int64", "I64", mx::int64},     {"int32", "I32", mx::int32},     {"int16", "I16", mx::int16},
      {"int8", "I8", mx::int8},        {"uint8", "U8", mx::uint8},      {"bool", "BOOL", mx::bool_},
  };
  return table;
}

const DtypeInfo& dtype_named(const std::string& name) {
  for (const auto& d : dtypes())
    if (name == d.manifest || name == d.safetensors) return d;
  throw Failure("unknown dtype '" + name + "'");
}

std::string shape_text(const mx::Shape& shape) {
  std::string s = "[";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  return s + "]";
}

mx::Shape shape_of(const json::Value& v) {
  mx::Shape shape;
  for (const auto& d : v.array()) shape.push_back(static_cast<int>(d.integer()));
  return shape;
}

std::vector<std::string> strings(const json::Value& v) {
  std::vector<std::string> out;
  for (const auto& s : v.array()) out.push_back(s.str());
  return out;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  if (!in.good() && !in.eof()) throw Failure("cannot read " + path.string());
  return s.str();
}

// ------------------------------------------------------------------ the manifest

struct ValueSpec {
  std::string name, dtype, kind, source, reload_of;
  mx::Shape shape;
  int64_t nbytes = 0;
  bool offload = false;
};

struct StageSpec {
  std::string name, artifact;
  std::vector<std::string> inputs, outputs, free_after, offload_after;
  int64_t held_before_bytes = 0, internal_peak_bytes = 0;
};

struct Manifest {
  std::string model, weights_file, loss;
  mx::Shape batch_shape;
  std::vector<std::string> value_order;
  std::map<std::string, ValueSpec> values;
  std::vector<StageSpec> stages;
  std::vector<std::pair<std::string, std::string>> grads;  // LoRA source name -> gradient value
  std::vector<std::pair<std::string, std::string>> updates;  // LoRA or optimizer source name -> update value
  std::map<std::string, std::string> files;                // file -> SHA-256
  std::map<std::string, std::string> adapter_keys;         // LoRA source name -> peft key
  json::Value optimizer;
  int64_t predicted_peak_bytes = 0, vocab_size = 0;
};

bool is_step_input(const ValueSpec& v) {
  return (v.kind == "frozen" || v.kind == "lora" || v.kind == "batch" || v.kind == "mapped" || v.kind == "optimizer") &&
         v.reload_of.empty();
}

Manifest read_manifest(const fs::path& dir) {
  fs::path path = dir / kManifestFile;
  if (!fs::is_regular_file(path))
    throw Failure(dir.string() + " has no manifest.json; is it an artifact directory written by `mebp compile "
                  "--target mlx`?");
  json::Value data;
  try {
    data = json::parse(read_text(path));
  } catch (const json::Error& e) {
    throw Failure(path.string() + " is not valid JSON (" + e.what() + "); compile the artifacts again");
  }
  std::string version = data.has("format_version") ? data["format_version"].text : "missing";
  if (!data.has("format_version") || !data["format_version"].is_integer() ||
      data["format_version"].integer() != kFormatVersion)
    throw Failure("manifest format version " + version + " is not " + std::to_string(kFormatVersion) +
                  ", the version this driver reads; compile the artifacts again");
  std::string canonical;
  json::dump_canonical(data, canonical, "sha256");
  if (!data.has("sha256") || data["sha256"].kind != json::Value::Kind::String ||
      data["sha256"].text != digest::sha256_string(canonical))
    throw Failure(path.string() + " does not match its SHA-256 checksum (its bytes changed after it was written); "
                  "compile the artifacts again");
  Manifest m;
  try {
    m.model = data["model"].str();
    m.batch_shape = shape_of(data["batch_shape"]);
    for (const auto& v : data["values"].array()) {
      ValueSpec spec{v["name"].str(), v["dtype"].str(), v["kind"].str(), v["source"].str(), v["reload_of"].str(),
                     shape_of(v["shape"]), v["nbytes"].integer(), v["offload"].truth()};
      dtype_named(spec.dtype);
      m.value_order.push_back(spec.name);
      m.values[spec.name] = spec;
    }
    for (const auto& s : data["stages"].array())
      m.stages.push_back({s["name"].str(), s["artifact"].str(), strings(s["inputs"]), strings(s["outputs"]),
                          strings(s["free_after"]), strings(s["offload_after"]), s["held_before_bytes"].integer(),
                          s["internal_peak_bytes"].integer()});
    m.loss = data["loss"].str();
    for (const auto& [param, value] : data["grads"].members) m.grads.emplace_back(param, value.str());
    m.predicted_peak_bytes = data["predicted_peak_bytes"].integer();
    m.weights_file = data["weights_file"].str();
    for (const auto& [file, sha] : data["files"].members) m.files[file] = sha.str();
    if (data.has("vocab_size")) m.vocab_size = data["vocab_size"].integer();
    if (data.has("adapter_keys"))
      for (const auto& [source, key] : data["adapter_keys"].members) m.adapter_keys[source] = key.str();
    m.optimizer = data["optimizer"];
    if (data.has("updates"))
      for (const auto& [source, value] : data["updates"].members) m.updates.emplace_back(source, value.str());
  } catch (const json::Error& e) {
    throw Failure("corrupt manifest " + path.string() + ": " + e.what() + "; compile the artifacts again");
  }
  // Consistency, as Manifest.check: every stage reads step inputs, reloads or earlier outputs.
  std::set<std::string> available;
  for (const auto& [name, v] : m.values)
    if (is_step_input(v) || !v.reload_of.empty()) available.insert(name);
  for (const auto& stage : m.stages) {
    for (const auto* names : {&stage.inputs, &stage.outputs})
      for (const auto& n : *names)
        if (!m.values.count(n))
          throw Failure("manifest: stage " + stage.name + " names value '" + n + "' the manifest does not describe");
    for (const auto& n : stage.inputs)
      if (!available.count(n)) throw Failure("manifest: stage " + stage.name + " reads '" + n + "' before any stage produces it");
    available.insert(stage.outputs.begin(), stage.outputs.end());
  }
  if (!available.count(m.loss)) throw Failure("manifest: the loss is produced by no stage");
  for (const auto& [param, value] : m.grads)
    if (!available.count(value)) throw Failure("manifest: the gradient of " + param + " is produced by no stage");
  std::set<std::string> updatable;
  for (const auto& [name, v] : m.values)
    if ((v.kind == "lora" || v.kind == "optimizer") && is_step_input(v)) updatable.insert(v.source);
  for (const auto& [source, value] : m.updates) {
    if (!available.count(value)) throw Failure("manifest: the update of " + source + " is produced by no stage");
    if (!updatable.count(source))
      throw Failure("manifest: it updates '" + source + "', which is no LoRA or optimizer step input");
  }
  for (const auto& [name, v] : m.values)
    if (v.kind == "batch" && v.source != "input_ids" && v.source != "labels")
      throw Failure("manifest: the step takes batch input '" + v.source + "', and this driver's token file carries "
                    "input_ids and labels only; run these artifacts with the Python driver (mebp run without "
                    "--native), or compile without it");
  if (m.weights_file.empty())
    throw Failure("the manifest names no weights file (compiled with --no-weights); the native driver reads the "
                  "weights from the directory: compile again with them");
  return m;
}

void check_files(const Manifest& m, const fs::path& dir) {
  for (const auto& [name, sha] : m.files) {
    fs::path path = dir / name;
    if (!fs::exists(path))
      throw Failure(path.string() + " is missing; copy the whole artifact directory or compile again");
    if (digest::sha256_file(path) != sha)
      throw Failure(path.string() + " does not match its SHA-256 in the manifest (its bytes changed after `mebp "
                    "compile` wrote it); compile the artifacts again");
  }
}

// ------------------------------------------------------------------ memory-mapped arrays

// A read-only mapping of a whole file, unmapped when the last array on it goes.
struct Mapping {
  char* base = nullptr;
  size_t size = 0;
  Mapping(const fs::path& path, const char* what) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Failure(std::string("cannot open ") + what + " " + path.string() + ": " + std::strerror(errno));
    struct stat st {};
    ::fstat(fd, &st);
    size = static_cast<size_t>(st.st_size);
    void* p = size ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    ::close(fd);
    if (p == MAP_FAILED) throw Failure("cannot map " + path.string() + ": " + std::strerror(errno));
    base = static_cast<char*>(p);
  }
  ~Mapping() {
    if (base) ::munmap(base, size);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

// An MLX array over `nbytes` at `data` inside `mapping`, without a copy. MLX's CPU allocator
// has no no-copy `make_buffer`; its buffers are a size word followed by the data, so the
// array wraps the address that many bytes before `data` (measured, not assumed, from
// `Buffer::raw_ptr`), with a deleter that only drops the mapping. Where neither works the
// bytes are copied.
mx::array mapped_array(std::shared_ptr<Mapping> mapping, const char* data, size_t nbytes, const mx::Shape& shape,
                       mx::Dtype dtype) {
  auto* ptr = const_cast<char*>(data);
  mx::allocator::Buffer direct = mx::allocator::make_buffer(ptr, nbytes);
  if (direct.ptr())
    return mx::array(mx::allocator::Data(direct, [mapping](mx::allocator::Buffer b) { mx::allocator::release(b); }),
                     shape, dtype);
  static const ptrdiff_t header = [] {
    alignas(16) static char probe[64];
    return static_cast<char*>(mx::allocator::Buffer(probe).raw_ptr()) - probe;
  }();
  if (header >= 0 && data - mapping->base >= header)
    return mx::array(mx::allocator::Data(mx::allocator::Buffer(ptr - header), [mapping](mx::allocator::Buffer) {}),
                     shape, dtype);
  return mx::array(data, shape, dtype);  // copies
}

// ------------------------------------------------------------------ the weights file (safetensors)

std::map<std::string, mx::array> map_weights(const fs::path& path, const Manifest& m) {
  if (!fs::is_regular_file(path))
    throw Failure(path.string() + " is missing: the step's frozen weights and LoRA parameters; compile again");
  auto mapping = std::make_shared<Mapping>(path, "the weights file");
  auto bad = [&](const std::string& why) {
    return Failure(path.string() + " cannot be read (" + why + "); compile the artifacts again");
  };
  if (mapping->size < 8) throw bad("shorter than its header");
  uint64_t header_size = 0;
  std::memcpy(&header_size, mapping->base, 8);
  if (header_size > mapping->size - 8) throw bad("its header runs past the end of the file");
  json::Value header;
  try {
    header = json::parse(std::string(mapping->base + 8, header_size));
  } catch (const json::Error& e) {
    throw bad(std::string("header: ") + e.what());
  }
  const char* start = mapping->base + 8 + header_size;
  size_t data_size = mapping->size - 8 - header_size;
  std::map<std::string, mx::array> arrays;
  for (const auto& name : m.value_order) {
    const ValueSpec& v = m.values.at(name);
    if (!is_step_input(v) || v.kind == "batch" || v.kind == "optimizer") continue;
    if (!header.has(v.source)) throw Failure(path.string() + " has no tensor '" + v.source + "' the manifest needs");
    const json::Value& t = header[v.source];
    try {
      const DtypeInfo& dtype = dtype_named(t["dtype"].str());
      mx::Shape shape = shape_of(t["shape"]);
      if (dtype.manifest != v.dtype || shape != v.shape)
        throw Failure(v.kind + " input '" + v.source + "' is " + dtype.manifest + shape_text(shape) +
                      " in the weights file, the manifest says " + v.dtype + shape_text(v.shape));
      const auto& offsets = t["data_offsets"].array();
      int64_t begin = offsets.at(0).integer(), end = offsets.at(1).integer();
      size_t itemsize = mx::size_of(dtype.mlx);
      if (begin < 0 || end < begin || size_t(end) > data_size || end - begin != v.nbytes)
        throw bad("tensor '" + v.source + "' has offsets outside the file or of the wrong size");
      if ((reinterpret_cast<uintptr_t>(start + begin)) % itemsize)
        throw bad("tensor '" + v.source + "' is not aligned to its element size");
      arrays.emplace(v.source, mapped_array(mapping, start + begin, size_t(v.nbytes), shape, dtype.mlx));
    } catch (const json::Error& e) {
      throw bad("tensor '" + v.source + "': " + e.what());
    }
  }
  return arrays;
}

// ------------------------------------------------------------------ stage files (.mlxfn)

std::map<std::string, mx::ImportedFunction> load_stages(const Manifest& m, const fs::path& dir) {
  std::map<std::string, mx::ImportedFunction> fns;
  for (const auto& stage : m.stages) {
    fs::path path = dir / stage.artifact;
    if (!fs::exists(path))
      throw Failure("stage " + stage.name + ": artifact " + path.string() + " is missing; copy the whole artifact "
                    "directory or compile again");
    auto found = fns.find(stage.artifact);
    if (found == fns.end()) {
      try {
        found = fns.emplace(stage.artifact, mx::import_function(path.string())).first;
      } catch (const std::exception& e) {
        throw Failure("stage " + stage.name + ": MLX cannot load " + path.string() + " (" + e.what() +
                      "); compile the artifacts again");
      }
    }
    json::Value signature;
    try {
      signature = json::parse(found->second.metadata());
      for (const auto& [role, names] : {std::pair{"input", &stage.inputs}, std::pair{"output", &stage.outputs}}) {
        const auto& actual = signature[std::string(role) + "s"].array();
        if (actual.size() != names->size())
          throw Failure("stage " + stage.name + ": " + stage.artifact + " has " + std::to_string(actual.size()) + " " +
                        role + "s, the manifest lists " + std::to_string(names->size()) +
                        "; the artifact and manifest are from different compiles");
        for (size_t k = 0; k < actual.size(); ++k) {
          const ValueSpec& v = m.values.at((*names)[k]);
          mx::Shape shape = shape_of(actual[k].array().at(0));
          std::string dtype = actual[k].array().at(1).str();
          if (shape != v.shape || dtype != v.dtype)
            throw Failure("stage " + stage.name + ": " + role + " " + std::to_string(k) + " (" + v.name + ") of " +
                          stage.artifact + " is " + dtype + shape_text(shape) + ", the manifest says " + v.dtype +
                          shape_text(v.shape) + "; compile the artifacts again");
        }
      }
    } catch (const json::Error& e) {
      throw Failure(stage.artifact + " has no stage signature in its metadata (" + e.what() +
                    "); export it again with targets.mlx.export_stage");
    }
  }
  return fns;
}

// ------------------------------------------------------------------ the token file

// "MEBPTOK1", int64 steps, batch, seq, then input_ids and labels, each int64 [steps, batch, seq];
// all little-endian (docs/manifest.md).
struct Tokens {
  int64_t steps = 0;
  std::vector<int64_t> input_ids, labels;
};

Tokens read_tokens(const fs::path& path, const Manifest& m) {
  if (!fs::is_regular_file(path)) throw Failure("no token file at " + path.string());
  std::string bytes = read_text(path);
  if (bytes.size() < 32 || bytes.compare(0, 8, kTokenMagic) != 0)
    throw Failure(path.string() + " is not a token file (it does not start with " + kTokenMagic +
                  "); write it with mebp_compiler.targets.native_driver.write_tokens");
  int64_t dims[3];
  std::memcpy(dims, bytes.data() + 8, sizeof dims);
  if (m.batch_shape.size() != 2 || dims[1] != m.batch_shape[0] || dims[2] != m.batch_shape[1] || dims[0] < 1)
    throw Failure(path.string() + " holds " + std::to_string(dims[0]) + " batches of [" + std::to_string(dims[1]) +
                  ", " + std::to_string(dims[2]) + "] tokens; the artifacts were compiled for batches of " +
                  shape_text(m.batch_shape) + " (at least one); compile again for this shape");
  size_t count = size_t(dims[0] * dims[1] * dims[2]);
  if (bytes.size() != 32 + 2 * 8 * count)
    throw Failure(path.string() + " is " + std::to_string(bytes.size()) + " bytes, its header says " +
                  std::to_string(32 + 2 * 8 * count) + "; write it again");
  Tokens t{dims[0], std::vector<int64_t>(count), std::vector<int64_t>(count)};
  std::memcpy(t.input_ids.data(), bytes.data() + 32, 8 * count);
  std::memcpy(t.labels.data(), bytes.data() + 32 + 8 * count, 8 * count);
  if (m.vocab_size > 0) {
    for (size_t k = 0; k < count; ++k) {
      int64_t id = t.input_ids[k], label = t.labels[k];
      if (id < 0 || id >= m.vocab_size || (label != -100 && (label < 0 || label >= m.vocab_size)))
        throw Failure(path.string() + ": token " + std::to_string(k) + " (input id " + std::to_string(id) +
                      ", label " + std::to_string(label) + ") is outside the vocabulary [0, " +
                      std::to_string(m.vocab_size) + ") (labels may also be -100, ignored)");
    }
  }
  return t;
}

// ------------------------------------------------------------------ offloaded values

// A directory of memory-mapped files, one per offloaded value (OffloadStore in
// mebp_compiler/offload.py). A file holds a 64-byte prefix, then the value's bytes: the
// prefix's last 8 bytes are the size word MLX's CPU buffers carry before their data, so the
// mapped-back array is a buffer of the right size (`mapped_array`).
class OffloadStore {
 public:
  struct Handle {
    fs::path path;
    mx::Shape shape;
    mx::Dtype dtype = mx::float32;
    size_t nbytes = 0;
    uint32_t crc = 0;
  };
  static constexpr size_t kPrefix = 64;

  explicit OffloadStore(const std::string& dir) {
    if (dir.empty()) {
      std::string pattern = (fs::temp_directory_path() / "mebp-native-offload-XXXXXX").string();
      if (!::mkdtemp(pattern.data())) throw Failure("cannot create an offload directory: " + std::string(std::strerror(errno)));
      dir_ = pattern;
      owned_ = true;
    } else {
      dir_ = dir;
      std::error_code ec;
      fs::create_directories(dir_, ec);
      if (ec) throw Failure("cannot create the offload directory " + dir + ": " + ec.message());
    }
  }
  ~OffloadStore() {
    std::error_code ec;
    if (owned_) fs::remove_all(dir_, ec);
  }

  Handle write(mx::array a, const std::string& key) {
    a = mx::contiguous(a);
    mx::eval(a);
    Handle h{dir_ / (key + ".bin"), a.shape(), a.dtype(), a.nbytes(), 0};
    int fd = ::open(h.path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) throw Failure("cannot offload '" + key + "' to " + h.path.string() + ": " + std::strerror(errno));
    size_t size = kPrefix + h.nbytes;
    int err = ::posix_fallocate(fd, 0, off_t(size));
    if (err) {
      ::close(fd);
      fs::remove(h.path);
      throw Failure("cannot offload '" + key + "': " + std::to_string(size) + " bytes needed in " + dir_.string() +
                    ": " + std::strerror(err) + "; free disk space or choose another offload directory");
    }
    // pwrite, not a shared mapping and memcpy: the kernel copies into its page cache without a
    // page fault per 4 KiB of the file.
    char prefix[kPrefix] = {};
    uint64_t word = h.nbytes;
    std::memcpy(prefix + kPrefix - 8, &word, 8);
    bool written = write_all(fd, prefix, kPrefix, 0) && write_all(fd, a.data<char>(), h.nbytes, kPrefix);
    int write_errno = errno;
    ::close(fd);
    if (!written) {
      fs::remove(h.path);
      throw Failure("cannot offload '" + key + "' to " + h.path.string() + ": " + std::strerror(write_errno) +
                    "; check the disk or choose another offload directory");
    }
    h.crc = digest::crc32(a.data<char>(), h.nbytes);
    bytes_written += h.nbytes;
    return h;
  }

  mx::array read(const Handle& h) {
    auto mapping = std::make_shared<Mapping>(h.path, "the offloaded value");
    if (mapping->size != kPrefix + h.nbytes || digest::crc32(mapping->base + kPrefix, h.nbytes) != h.crc)
      throw Failure("offloaded value file " + h.path.string() + " changed on disk after this step wrote it (CRC-32 "
                    "mismatch); keep the offload directory to one run, and check the disk");
    bytes_read += h.nbytes;
    return mapped_array(mapping, mapping->base + kPrefix, h.nbytes, h.shape, h.dtype);
  }

  size_t bytes_written = 0, bytes_read = 0;

 private:
  static bool write_all(int fd, const char* data, size_t n, off_t offset) {
    while (n) {
      ssize_t done = ::pwrite(fd, data, n, offset);
      if (done < 0 && errno == EINTR) continue;
      if (done <= 0) return false;
      data += done, n -= size_t(done), offset += done;
    }
    return true;
  }

  fs::path dir_;
  bool owned_ = false;
};

// ------------------------------------------------------------------ memory of the process

struct Rss {
  int64_t hwm = 0, anon = 0, file = 0;
};

Rss read_rss() {
  Rss r;
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    auto field = [&](const char* key, int64_t& out) {
      if (line.rfind(key, 0) == 0) out = std::stoll(line.substr(std::strlen(key))) * 1024;
    };
    field("VmHWM:", r.hwm);
    field("RssAnon:", r.anon);
    field("RssFile:", r.file);
  }
  return r;
}

// ------------------------------------------------------------------ MLX's memory

// MLX, left to itself, keeps freed buffers in a cache (32 MiB at a step's end, measured) and
// runs ahead of the kernels, allocating outputs before the inputs they replace are freed. The
// driver holds it to the plan: no cache (unless --mlx-cache-bytes allows one: each freed buffer
// then waits there for reuse instead of going back to the OS, and counts on top of the plan's
// bytes), and a memory limit at the manifest's predicted peak,
// at which MLX's evaluation waits for running kernels to finish (and free) before allocating
// more. The limit is a soft one (MLX never fails for it): a stage whose transients exceed it
// still runs. run_stages lowers it to each stage's own planned peak while the stage runs: a
// limit above the stage's plan lets MLX's main thread allocate several kernels' outputs ahead
// of the kernels that free their inputs (SmolLM2's block forward: 31.0 MiB above its inputs
// unlimited, 14.0 MiB at its plan's 7.5). docs/native.md has the measurements.
void limit_mlx_memory(const Manifest& m, size_t cache_bytes) {
  mx::set_cache_limit(cache_bytes);
  mx::set_memory_limit(size_t(std::max<int64_t>(m.predicted_peak_bytes, 1)));
}

// ------------------------------------------------------------------ one step

struct StepResult {
  float loss = 0;
  std::map<std::string, mx::array> grads;    // LoRA source name -> gradient
  std::map<std::string, mx::array> updates;  // LoRA or optimizer source name -> its value after the step
  std::vector<int64_t> held_before, held_during;
  std::vector<double> stage_seconds;  // each stage's call, evaluation and offload writes
  std::vector<int64_t> stage_mlx_peak;  // MLX's allocator peak (bytes of arrays) during each stage
  std::vector<int64_t> held_after, stage_mlx_active;  // held bytes and MLX's bytes of arrays after each stage's frees
  int64_t staged_peak = 0;
  Rss peak;  // most anonymous and file-backed RSS seen when a stage returned
};

// `inputs` is taken over: a step input dropped after its last stage (a LoRA parameter or moment
// a fused update replaces) is freed then only if nothing else holds it.
StepResult run_stages(const Manifest& m, std::map<std::string, mx::ImportedFunction>& fns,
                      std::map<std::string, mx::array> inputs, OffloadStore& store) {
  StepResult r;
  std::unordered_map<std::string, mx::array> env;
  std::unordered_map<std::string, OffloadStore::Handle> handles;
  int64_t held = 0;
  for (const auto& name : m.value_order) {
    const ValueSpec& v = m.values.at(name);
    if (!is_step_input(v)) continue;
    env.emplace(name, inputs.at(v.source));
    if (v.kind != "mapped") held += int64_t(inputs.at(v.source).nbytes());
  }
  inputs.clear();
  for (const auto& stage : m.stages) {
    for (const auto& name : stage.inputs) {
      const ValueSpec& v = m.values.at(name);
      if (!env.count(name) && !v.reload_of.empty()) {
        auto it = env.emplace(name, store.read(handles.at(v.reload_of))).first;
        held += int64_t(it->second.nbytes());
      }
    }
    r.held_before.push_back(held);
    r.staged_peak = std::max(r.staged_peak, held + stage.internal_peak_bytes);
    mx::set_memory_limit(size_t(std::max<int64_t>(held + stage.internal_peak_bytes, 1)));
    auto started = std::chrono::steady_clock::now();
    mx::reset_peak_memory();
    std::vector<mx::array> args;
    for (const auto& name : stage.inputs) args.push_back(env.at(name));
    std::vector<mx::array> outputs = fns.at(stage.artifact)(args);
    args.clear();
    if (outputs.size() != stage.outputs.size())
      throw Failure("stage " + stage.name + " returned " + std::to_string(outputs.size()) + " outputs, the manifest lists " +
                    std::to_string(stage.outputs.size()));
    mx::eval(outputs);
    r.stage_mlx_peak.push_back(int64_t(mx::get_peak_memory()));
    for (size_t k = 0; k < outputs.size(); ++k) {
      held += int64_t(outputs[k].nbytes());
      env.insert_or_assign(stage.outputs[k], outputs[k]);
    }
    outputs.clear();
    r.held_during.push_back(held);
    Rss now = read_rss();
    r.peak.anon = std::max(r.peak.anon, now.anon);
    r.peak.file = std::max(r.peak.file, now.file);
    for (const auto& name : stage.offload_after) handles[name] = store.write(env.at(name), name);
    r.stage_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
    for (const auto& name : stage.free_after) {
      auto it = env.find(name);
      held -= int64_t(it->second.nbytes());
      env.erase(it);
    }
    r.held_after.push_back(held);
    r.stage_mlx_active.push_back(int64_t(mx::get_active_memory()));
  }
  mx::set_memory_limit(size_t(std::max<int64_t>(m.predicted_peak_bytes, 1)));
  r.loss = mx::contiguous(env.at(m.loss)).item<float>();
  for (const auto& [param, value] : m.grads) {
    mx::array g = mx::contiguous(env.at(value));
    mx::eval(g);
    r.grads.emplace(param, g);
  }
  for (const auto& [source, value] : m.updates) {
    mx::array u = mx::contiguous(env.at(value));
    mx::eval(u);
    r.updates.emplace(source, u);
  }
  return r;
}

// ------------------------------------------------------------------ the optimizer

// torch.optim.AdamW / SGD (no momentum), as mebp_compiler.plan.make_optimizer makes them:
// torch's single-tensor AdamW op by op in float32, the step's scalars in double (lerp_ as a
// fused multiply-add, as torch's CPU kernel). Not bit-exact: torch takes the square root with
// MKL's vector math (measured: 1 ulp off the rounded root for 17% of elements here).
struct Optimizer {
  std::string name = "adamw";
  double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 0;
  std::map<std::string, std::vector<float>> exp_avg, exp_avg_sq;

  void apply(const std::string& param, float* p, const float* g, size_t n) {
    if (name == "sgd") {
      for (size_t k = 0; k < n; ++k) {
        float grad = weight_decay ? g[k] + float(weight_decay) * p[k] : g[k];
        p[k] = std::fma(float(-lr), grad, p[k]);  // torch's add(alpha=) kernel fuses it
      }
      return;
    }
    auto& m = exp_avg.try_emplace(param, n, 0.0f).first->second;
    auto& v = exp_avg_sq.try_emplace(param, n, 0.0f).first->second;
    double bias1 = 1 - std::pow(beta1, double(step)), bias2 = 1 - std::pow(beta2, double(step));
    float step_size = float(lr / bias1), bias2_sqrt = float(std::sqrt(bias2));
    float decay = float(1 - lr * weight_decay), w1 = float(1 - beta1), b2 = float(beta2), w2 = float(1 - beta2);
    for (size_t k = 0; k < n; ++k) {
      if (weight_decay) p[k] *= decay;
      m[k] = std::fma(w1, g[k] - m[k], m[k]);
      v[k] = v[k] * b2 + w2 * g[k] * g[k];
      float denom = std::sqrt(v[k]) / bias2_sqrt + float(eps);
      p[k] = p[k] + -step_size * m[k] / denom;
    }
  }
};

Optimizer make_optimizer(const json::Value& settings) {
  Optimizer o;
  try {
    if (settings.has("name")) o.name = settings["name"].str();
    if (settings.has("lr")) o.lr = settings["lr"].number();
    if (settings.has("betas")) o.beta1 = settings["betas"].array().at(0).number(), o.beta2 = settings["betas"].array().at(1).number();
    if (settings.has("eps")) o.eps = settings["eps"].number();
    if (settings.has("weight_decay")) o.weight_decay = settings["weight_decay"].number();
  } catch (const std::exception& e) {
    throw Failure(std::string("the manifest's optimizer settings are malformed: ") + e.what());
  }
  return o;
}

// ------------------------------------------------------------------ writing files atomically

void write_all(int fd, const void* data, size_t n, const fs::path& path) {
  auto p = static_cast<const char*>(data);
  while (n) {
    ssize_t k = ::write(fd, p, n);
    if (k < 0) throw Failure("cannot write " + path.string() + ": " + std::strerror(errno));
    p += k, n -= size_t(k);
  }
}

// A safetensors file of float32 tensors written to a hidden sibling, fsynced, renamed over
// `path`, and the directory fsynced (mebp_compiler/files.py): a crash leaves the old file
// or the new one.
void write_safetensors(const fs::path& path, const std::map<std::string, mx::array>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  size_t offset = 0;
  for (const auto& [name, a] : tensors) {
    std::vector<int> shape(a.shape().begin(), a.shape().end());
    header += ",";
    json::dump_string(name, header);
    header += ":{\"dtype\":\"F32\",\"shape\":[";
    for (size_t k = 0; k < shape.size(); ++k) header += (k ? "," : "") + std::to_string(shape[k]);
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + a.nbytes()) + "]}";
    offset += a.nbytes();
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  fs::path tmp = path.parent_path() / ("." + path.stem().string() + ".tmp" + path.extension().string());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Failure("cannot write " + path.string() + ": " + std::strerror(errno));
  try {
    uint64_t size = header.size();
    write_all(fd, &size, 8, path);
    write_all(fd, header.data(), header.size(), path);
    for (const auto& [name, a] : tensors) write_all(fd, a.data<char>(), a.nbytes(), path);
    if (::fsync(fd) != 0) throw Failure("cannot write " + path.string() + ": " + std::strerror(errno));
  } catch (...) {
    ::close(fd);
    fs::remove(tmp);
    throw;
  }
  ::close(fd);
  fs::rename(tmp, path);
  int dir = ::open(path.parent_path().empty() ? "." : path.parent_path().c_str(), O_RDONLY | O_DIRECTORY);
  if (dir >= 0) ::fsync(dir), ::close(dir);
}

// ------------------------------------------------------------------ the command line

struct Args {
  fs::path dir, tokens, out, grads_dir;
  std::string offload_dir;
  std::optional<std::string> optimizer;
  std::optional<double> lr, weight_decay;
  size_t mlx_cache_bytes = 0;
};

double positive_number(const std::string& flag, const std::string& text, bool zero_ok) {
  try {
    size_t used = 0;
    double x = std::stod(text, &used);
    if (used == text.size() && std::isfinite(x) && (x > 0 || (zero_ok && x == 0))) return x;
  } catch (const std::exception&) {
  }
  throw Usage(flag + " " + text + ": give a " + (zero_ok ? "non-negative" : "positive") + " number");
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> rest(argv + 1, argv + argc);
  for (size_t k = 0; k < rest.size(); ++k) {
    const std::string& arg = rest[k];
    auto value = [&]() -> std::string {
      if (k + 1 >= rest.size()) throw Usage(arg + " needs a value");
      return rest[++k];
    };
    if (arg == "--tokens") a.tokens = value();
    else if (arg == "--out") a.out = value();
    else if (arg == "--offload-dir") a.offload_dir = value();
    else if (arg == "--grads-dir") a.grads_dir = value();
    else if (arg == "--optimizer") {
      a.optimizer = value();
      if (*a.optimizer != "adamw" && *a.optimizer != "sgd") throw Usage("--optimizer " + *a.optimizer + ": choose adamw or sgd");
    } else if (arg == "--lr") a.lr = positive_number(arg, value(), false);
    else if (arg == "--weight-decay") a.weight_decay = positive_number(arg, value(), true);
    else if (arg == "--mlx-cache-bytes") {
      double bytes = positive_number(arg, value(), true);
      if (bytes != std::floor(bytes)) throw Usage("--mlx-cache-bytes: give a whole number of bytes");
      a.mlx_cache_bytes = size_t(bytes);
    }
    else if (arg.rfind("--", 0) == 0) throw Usage("unknown option " + arg);
    else if (a.dir.empty()) a.dir = arg;
    else throw Usage("unexpected argument " + arg);
  }
  if (a.dir.empty() || a.tokens.empty() || a.out.empty())
    throw Usage("usage: mebp-native DIR --tokens FILE --out ADAPTER.safetensors [--optimizer adamw|sgd] [--lr X] "
                "[--weight-decay X] [--offload-dir D] [--grads-dir D] [--mlx-cache-bytes N]");
  if (fs::is_directory(a.out)) throw Usage("--out " + a.out.string() + " is a directory: give the adapter file to write");
  fs::path parent = a.out.parent_path().empty() ? fs::path(".") : a.out.parent_path();
  if (!fs::is_directory(parent)) throw Usage("--out " + a.out.string() + ": the directory " + parent.string() + " does not exist");
  if (!a.grads_dir.empty() && !fs::is_directory(a.grads_dir))
    throw Usage("--grads-dir " + a.grads_dir.string() + " is not a directory");
  return a;
}

std::string json_list(const std::vector<int64_t>& xs) {
  std::string s = "[";
  for (size_t k = 0; k < xs.size(); ++k) s += (k ? "," : "") + std::to_string(xs[k]);
  return s + "]";
}

int run(const Args& args) {
  Manifest m = read_manifest(args.dir);
  limit_mlx_memory(m, args.mlx_cache_bytes);
  check_files(m, args.dir);
  std::map<std::string, mx::array> weights = map_weights(args.dir / m.weights_file, m);
  auto fns = load_stages(m, args.dir);
  Tokens tokens = read_tokens(args.tokens, m);
  Optimizer optimizer = make_optimizer(m.optimizer);
  const bool fused = !m.updates.empty();  // the stages apply the optimizer; the driver carries its state
  if (fused && ((args.optimizer && *args.optimizer != optimizer.name) || (args.lr && *args.lr != optimizer.lr) ||
                (args.weight_decay && *args.weight_decay != optimizer.weight_decay)))
    throw Failure("the stages apply " + optimizer.name + " with lr " + json::python_float(optimizer.lr) +
                  " and weight decay " + json::python_float(optimizer.weight_decay) +
                  " (compiled with fused updates); other settings need another compile");
  if (args.optimizer) optimizer.name = *args.optimizer;
  if (args.lr) optimizer.lr = *args.lr;
  if (args.weight_decay) optimizer.weight_decay = *args.weight_decay;
  if (optimizer.name != "adamw" && optimizer.name != "sgd")
    throw Failure("the manifest's optimizer '" + optimizer.name + "' is not adamw or sgd; pass --optimizer");

  // The LoRA parameters are trained, so they are copied out of the mapping into memory of
  // their own; everything else stays mapped.
  std::map<std::string, mx::array> lora;
  for (const auto& name : m.value_order) {
    const ValueSpec& v = m.values.at(name);
    if (v.kind != "lora" || !is_step_input(v)) continue;
    if (v.dtype != "float32") throw Failure("LoRA parameter '" + v.source + "' is " + v.dtype + "; the driver trains float32 ones");
    mx::array owned = mx::array(weights.at(v.source).data<float>(), v.shape, mx::float32);
    lora.insert_or_assign(v.source, owned);
    weights.insert_or_assign(v.source, owned);
  }
  std::set<std::string> lora_sources;
  for (const auto& [source, value] : lora) lora_sources.insert(source);
  for (const auto& [param, value] : m.grads)
    if (!lora.count(param)) throw Failure("manifest: gradient for '" + param + "', which is not a LoRA step input");
  // Optimizer state (AdamW's moments and step count) starts at zeros, as torch's does.
  for (const auto& name : m.value_order) {
    const ValueSpec& v = m.values.at(name);
    if (v.kind != "optimizer" || !is_step_input(v)) continue;
    if (v.dtype != "float32") throw Failure("optimizer state '" + v.source + "' is " + v.dtype + "; the driver carries float32 state");
    mx::array zeros = mx::zeros(v.shape, dtype_named(v.dtype).mlx);
    mx::eval(zeros);
    weights.insert_or_assign(v.source, zeros);
  }

  OffloadStore store(args.offload_dir);
  const int64_t per_step = m.batch_shape[0] * m.batch_shape[1];
  std::vector<double> losses;
  StepResult last;
  Rss peak;
  std::vector<double> step_seconds;
  for (int64_t step = 0; step < tokens.steps; ++step) {
    auto started = std::chrono::steady_clock::now();
    std::map<std::string, mx::array> inputs = weights;
    inputs.insert_or_assign("input_ids", mx::array(tokens.input_ids.data() + step * per_step, m.batch_shape, mx::int64));
    inputs.insert_or_assign("labels", mx::array(tokens.labels.data() + step * per_step, m.batch_shape, mx::int64));
    // A value a fused update replaces is held by the stages alone, so that it is freed after its
    // update as the plan counts (kept here too, each block's old LoRA parameters and moments
    // stayed to the step's end: +27.9 MiB by SmolLM2's last block backward). Its new value
    // comes back in r.updates; a failed step exits without an adapter.
    for (const auto& [source, value] : m.updates) {
      weights.erase(source);
      lora.erase(source);
    }
    StepResult r = run_stages(m, fns, std::move(inputs), store);
    if (!std::isfinite(r.loss))
      throw Failure("step " + std::to_string(step + 1) + ": the loss is " + std::to_string(r.loss) +
                    "; no update applied and no adapter written; lower --lr");
    for (auto& [param, g] : r.grads) {
      const float* data = g.data<float>();
      for (size_t k = 0; k < g.size(); ++k)
        if (!std::isfinite(data[k]))
          throw Failure("step " + std::to_string(step + 1) + ": the gradient of " + param +
                        " is not finite; no update applied and no adapter written; lower --lr");
    }
    if (!args.grads_dir.empty()) {  // a test's record, not part of the step's time
      // With fused updates there are no gradients: the step's new values instead.
      auto writing = std::chrono::steady_clock::now();
      write_safetensors(args.grads_dir / ("step" + std::to_string(step + 1) + ".safetensors"), fused ? r.updates : r.grads);
      started += std::chrono::steady_clock::now() - writing;
    }
    mx::synchronize();
    if (fused) {
      // The stages' new LoRA parameters and optimizer state replace the old ones, for the next step.
      for (const auto& [source, u] : r.updates) {
        weights.insert_or_assign(source, u);
        if (lora_sources.count(source)) lora.insert_or_assign(source, u);
      }
      r.updates.clear();
    } else {
      ++optimizer.step;
      for (auto& [param, g] : r.grads) {
        mx::array& p = lora.at(param);
        optimizer.apply(param, p.data<float>(), g.data<float>(), p.size());
      }
    }
    step_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
    losses.push_back(r.loss);
    peak.anon = std::max(peak.anon, r.peak.anon);
    peak.file = std::max(peak.file, r.peak.file);
    last = std::move(r);
  }
  std::map<std::string, mx::array> adapter;
  for (const auto& [source, array] : lora) {
    auto key = m.adapter_keys.find(source);
    adapter.insert_or_assign(key == m.adapter_keys.end() ? source : key->second, array);
  }
  write_safetensors(args.out, adapter);

  Rss end = read_rss();
  std::string losses_text = "[";
  for (size_t k = 0; k < losses.size(); ++k) losses_text += (k ? "," : "") + json::python_float(losses[k]);
  losses_text += "]";
  std::string seconds_text = "[";
  for (size_t k = 0; k < step_seconds.size(); ++k) seconds_text += (k ? "," : "") + json::python_float(step_seconds[k]);
  seconds_text += "]";
  std::string stage_text = "[";
  for (size_t k = 0; k < last.stage_seconds.size(); ++k)
    stage_text += (k ? "," : "") + json::python_float(last.stage_seconds[k]);
  stage_text += "]";
  std::cout << "{\"steps\":" << tokens.steps << ",\"losses\":" << losses_text << ",\"step_seconds\":" << seconds_text
            << ",\"stage_seconds\":" << stage_text << ",\"held_before_bytes\":" << json_list(last.held_before)
            << ",\"held_peak_bytes\":" << *std::max_element(last.held_during.begin(), last.held_during.end())
            << ",\"staged_peak_bytes\":" << last.staged_peak
            << ",\"stage_mlx_peak_bytes\":" << json_list(last.stage_mlx_peak)
            << ",\"held_after_bytes\":" << json_list(last.held_after)
            << ",\"stage_mlx_active_bytes\":" << json_list(last.stage_mlx_active)
            << ",\"predicted_peak_bytes\":" << m.predicted_peak_bytes
            << ",\"flash_bytes_written\":" << store.bytes_written << ",\"flash_bytes_read\":" << store.bytes_read
            << ",\"vm_hwm_bytes\":" << end.hwm << ",\"rss_anon_peak_bytes\":" << peak.anon
            << ",\"rss_file_peak_bytes\":" << peak.file << ",\"mlx_peak_bytes\":" << *std::max_element(last.stage_mlx_peak.begin(), last.stage_mlx_peak.end())
            << ",\"mlx_cache_bytes\":" << mx::get_cache_memory() << ",\"mlx_cache_limit_bytes\":" << args.mlx_cache_bytes << ",\"optimizer\":\"" << optimizer.name << "\",\"lr\":"
            << json::python_float(optimizer.lr) << "}" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Depth-first evaluation, as the plan's liveness orders a stage's ops: MLX evaluates up to
  // MLX_BFS_MAX_WIDTH independent branches side by side (more than one unless set), each holding its
  // intermediates (on SmolLM2's head over 64 vocabulary slices, 1 instead of the default
  // lowered MLX's peak from 117 to 79 MiB). A value the user set is kept.
  ::setenv("MLX_BFS_MAX_WIDTH", "1", 0);
  try {
    return run(parse_args(argc, argv));
  } catch (const Usage& e) {
    std::cerr << "mebp-native: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::string line = e.what();
    std::replace(line.begin(), line.end(), '\n', ' ');
    std::cerr << "mebp-native: error: " << line << std::endl;
    return 1;
  }
}
