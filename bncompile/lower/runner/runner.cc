// bncompile-runner: run a library exported by `bncompile compile` without Python.
//
//   bncompile-runner MODEL.so [NAME=]INPUT.npy ... [-o OUTDIR] [--repeat N]
//
// * MODEL.so is a Relax VM library (CPU targets: llvm, x86_64, aarch64). If MODEL.so.json (written
//   by `bncompile compile`) is beside it, inputs may be given by name (NAME=file.npy, any order) and
//   outputs are written as OUTDIR/<output name>.npy; without it, inputs are positional and outputs
//   are OUTDIR/output<i>.npy.
// * Inputs and outputs are NumPy .npy files (C order; float32/float64/float16, int8..int64, uint8,
//   bool), so numpy.load / numpy.save on any machine read and write them.
// * Threads: the TVM runtime's pool; set TVM_NUM_THREADS to choose.
//
// Uses only the tvm-ffi headers (the wheel's tvm/runtime headers need files it does not ship) and
// links libtvm_runtime.so (which registers the relax.VMExecutable loader) and libtvm_ffi.so.
// Build: see README.md.

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cerrno>
#include <sys/stat.h>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n == 0 ? 64 : n);
    if (t->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct DType {
  const char* descr;  // numpy descr without the byte-order character
  DLDataType dl;
};

const DType kDTypes[] = {
    {"f4", {kDLFloat, 32, 1}}, {"f8", {kDLFloat, 64, 1}}, {"f2", {kDLFloat, 16, 1}},
    {"i8", {kDLInt, 64, 1}},   {"i4", {kDLInt, 32, 1}},   {"i2", {kDLInt, 16, 1}},
    {"i1", {kDLInt, 8, 1}},    {"u1", {kDLUInt, 8, 1}},   {"b1", {kDLBool, 8, 1}},
};

[[noreturn]] void Fail(const std::string& msg) { throw std::runtime_error(msg); }

DLDataType DTypeFromDescr(const std::string& descr, const std::string& file) {
  if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|' && descr[0] != '='))
    Fail(file + ": unsupported npy dtype '" + descr + "' (only little-endian numeric types)");
  std::string d = descr.substr(1);
  for (const auto& t : kDTypes)
    if (d == t.descr) return t.dl;
  Fail(file + ": unsupported npy dtype '" + descr + "'");
}

std::string DescrFromDType(DLDataType t) {
  for (const auto& x : kDTypes)
    if (x.dl.code == t.code && x.dl.bits == t.bits) {
      bool one_byte = t.bits == 8;
      return std::string(one_byte ? "|" : "<") + x.descr;
    }
  Fail("cannot write dtype code " + std::to_string(t.code) + " bits " + std::to_string(t.bits) + " as npy");
}

// Value of `key` in a numpy header dict such as {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
std::string HeaderField(const std::string& h, const std::string& key, const std::string& file) {
  size_t k = h.find("'" + key + "'");
  if (k == std::string::npos) Fail(file + ": npy header has no '" + key + "'");
  size_t c = h.find(':', k);
  size_t s = h.find_first_not_of(' ', c + 1);
  if (h[s] == '\'') return h.substr(s + 1, h.find('\'', s + 1) - s - 1);
  if (h[s] == '(') return h.substr(s + 1, h.find(')', s) - s - 1);
  size_t e = h.find_first_of(",}", s);
  return h.substr(s, e - s);
}

ffi::Tensor ReadNpy(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) Fail("cannot open input file '" + file + "'");
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) Fail(file + ": not a .npy file");
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    hlen = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  }
  std::string header(hlen, '\0');
  in.read(&header[0], hlen);
  if (HeaderField(header, "fortran_order", file) != "False") Fail(file + ": Fortran-order arrays are not supported");
  DLDataType dt = DTypeFromDescr(HeaderField(header, "descr", file), file);
  std::vector<int64_t> shape;
  std::stringstream ss(HeaderField(header, "shape", file));
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    size_t a = tok.find_first_not_of(' ');
    if (a == std::string::npos) continue;
    shape.push_back(std::stoll(tok.substr(a)));
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), dt, DLDevice{kDLCPU, 0});
  size_t nbytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(in.gcount()) != nbytes) Fail(file + ": truncated data");
  return t;
}

void WriteNpy(const std::string& file, const ffi::Tensor& tensor) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  if (t->device.device_type != kDLCPU) Fail("output tensor is not on the CPU");
  if (!tensor.IsContiguous()) Fail("output tensor is not contiguous");
  std::string shape;
  for (int i = 0; i < t->ndim; ++i) shape += std::to_string(t->shape[i]) + (t->ndim == 1 ? "," : (i + 1 < t->ndim ? ", " : ""));
  std::string header = "{'descr': '" + DescrFromDType(t->dtype) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(file, std::ios::binary);
  if (!out) Fail("cannot write output file '" + file + "'");
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t hl = static_cast<uint16_t>(header.size());
  unsigned char b[2] = {static_cast<unsigned char>(hl & 0xff), static_cast<unsigned char>(hl >> 8)};
  out.write(reinterpret_cast<char*>(b), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(t->data) + t->byte_offset, static_cast<std::streamsize>(ffi::GetDataSize(*t)));
  if (!out) Fail("failed writing '" + file + "'");
}

std::string ShapeStr(const ffi::Tensor& tensor) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  std::string s = "(";
  for (int i = 0; i < t->ndim; ++i) s += (i ? ", " : "") + std::to_string(t->shape[i]);
  return s + ")";
}

// Names of the inputs/outputs from MODEL.so.json ({"inputs": [{"name": ...}, ...], "outputs": [...]}).
bool ReadNames(const std::string& path, std::vector<std::string>* inputs, std::vector<std::string>* outputs) {
  std::ifstream in(path);
  if (!in) return false;
  std::stringstream buf;
  buf << in.rdbuf();
  ffi::String err;
  ffi::Any v = ffi::json::Parse(buf.str(), &err);
  if (!err.empty()) Fail(path + ": invalid JSON: " + std::string(err));
  auto obj = v.cast<ffi::Map<ffi::String, ffi::Any>>();
  auto names = [&](const char* key, std::vector<std::string>* out) {
    for (const ffi::Any& e : obj.at(key).cast<ffi::Array<ffi::Any>>())
      out->push_back(std::string(e.cast<ffi::Map<ffi::String, ffi::Any>>().at("name").cast<ffi::String>()));
  };
  names("inputs", inputs);
  names("outputs", outputs);
  return true;
}

int Usage() {
  std::cerr << "usage: bncompile-runner MODEL.so [NAME=]INPUT.npy ... [-o OUTDIR] [--repeat N]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) return Usage();
    std::string lib_path = argv[1];
    // dlopen searches the library path for a bare file name: load ./model.so, as the user meant
    if (lib_path.find('/') == std::string::npos) lib_path = "./" + lib_path;
    std::string outdir = ".";
    int repeat = 1;
    std::vector<std::pair<std::string, std::string>> args;  // (name or "", file)
    for (int i = 2; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "-o" || a == "--output-dir") {
        if (++i >= argc) return Usage();
        outdir = argv[i];
      } else if (a == "--repeat") {
        if (++i >= argc) return Usage();
        repeat = std::max(1, std::atoi(argv[i]));
      } else if (a == "-h" || a == "--help") {
        Usage();
        return 0;
      } else {
        size_t eq = a.find('=');
        args.emplace_back(eq == std::string::npos ? "" : a.substr(0, eq), eq == std::string::npos ? a : a.substr(eq + 1));
      }
    }
    std::vector<std::string> in_names, out_names;
    bool named = ReadNames(lib_path + ".json", &in_names, &out_names);

    std::vector<ffi::Tensor> inputs;
    if (named) {
      if (args.size() != in_names.size())
        Fail("the model has " + std::to_string(in_names.size()) + " inputs, " + std::to_string(args.size()) + " given");
      std::map<std::string, std::string> by_name;
      size_t positional = 0;
      for (auto& [n, f] : args) {
        if (n.empty()) {
          if (positional >= in_names.size()) Fail("too many inputs");
          by_name[in_names[positional++]] = f;
        } else {
          by_name[n] = f;
        }
      }
      for (const auto& n : in_names) {
        auto it = by_name.find(n);
        if (it == by_name.end()) Fail("input '" + n + "' is missing");
        inputs.push_back(ReadNpy(it->second));
      }
    } else {
      for (auto& [n, f] : args) {
        if (!n.empty()) Fail("NAME=FILE needs " + lib_path + ".json beside the library");
        inputs.push_back(ReadNpy(f));
      }
    }

    ffi::Module lib = ffi::Module::LoadFromFile(lib_path);
    auto load = lib->GetFunction("vm_load_executable");
    if (!load.has_value()) Fail(lib_path + " is not a Relax VM library (no vm_load_executable)");
    ffi::Module vm = (*load)().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);
    ffi::Function main_fn = vm->GetFunction("main").value();

    std::vector<ffi::AnyView> packed(inputs.begin(), inputs.end());
    ffi::Any rv;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeat; ++r) main_fn.CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &rv);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / repeat;

    if (::mkdir(outdir.c_str(), 0755) != 0 && errno != EEXIST) Fail("cannot create output folder '" + outdir + "'");
    std::vector<ffi::Tensor> outs;
    if (auto t = rv.as<ffi::Tensor>()) {
      outs.push_back(*t);
    } else {
      for (const ffi::Any& e : rv.cast<ffi::Array<ffi::Any>>()) outs.push_back(e.cast<ffi::Tensor>());
    }
    if (named && outs.size() != out_names.size())
      Fail("the library returned " + std::to_string(outs.size()) + " outputs, metadata lists " + std::to_string(out_names.size()));
    for (size_t i = 0; i < outs.size(); ++i) {
      std::string name = named ? out_names[i] : "output" + std::to_string(i);
      std::string safe = name;  // an output name may hold '/' (ONNX allows any string)
      for (char& c : safe)
        if (c == '/' || c == '\\' || c == ':') c = '_';
      std::string file = outdir + "/" + safe + ".npy";
      WriteNpy(file, outs[i]);
      std::cout << name << " " << ShapeStr(outs[i]) << " " << DescrFromDType(outs[i].dtype()) << " -> " << file << "\n";
    }
    std::cout << "time_ms " << ms << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    size_t nl = msg.find('\n');
    std::cerr << "bncompile-runner: error: " << (nl == std::string::npos ? msg : msg.substr(0, nl)) << "\n";
    return 2;
  }
}
