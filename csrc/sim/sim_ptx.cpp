// The inline-PTX interpreter of the simulator (see sim_ptx.h): the instructions the project's
// kernels use, by the PTX ISA's definitions.
//   mma.sync.aligned.m16n8k16 / m16n8k8 .row.col, f16 or bf16 inputs, f32 (or, for f16, f16)
//     accumulators: warp-collective; the fragments in the ISA's register layouts; every output
//     rounded once from the double sum (16-bit products are exact in double).
//   ldmatrix.sync.aligned.m8n8.x1/.x2/.x4[.trans].shared[::cta].b16: warp-collective.
//   cp.async.ca/.cg.shared[::cta].global [dst], [src], cp-size[, src-size], cp.async.commit_group,
//     cp.async.wait_group N, cp.async.wait_all: per thread, with deferred completion: the source is
//     read at issue, the destination poisoned (0xFF bytes: NaN in every float type) until a wait
//     lands the copy, so a kernel that reads before waiting sees NaN instead of the data.
// Anything else fails. Each distinct text is parsed once.
#include "sim_ptx.h"

#include <cctype>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "sim_half.h"

namespace fl_sim {
namespace {

// A scalar in the text: operand %N or an immediate.
struct Ref {
  int operand = -1;
  int64_t immediate = 0;
};

enum class Op { Mma, Ldmatrix, CpAsync, CommitGroup, WaitGroup, WaitAll };

struct Instr {
  Op op = Op::Mma;
  std::string signature;  // the opcode with its qualifiers: the warp collective's name
  std::string statement;  // for messages
  // mma
  int k = 16;
  bool bf16 = false, d_f16 = false, c_f16 = false;
  std::vector<Ref> d, a, b, c;
  // ldmatrix
  int matrices = 1;
  bool trans = false;
  std::vector<Ref> dst;
  // ldmatrix, cp.async: [address + offset]
  Ref address;
  int64_t address_offset = 0;
  // cp.async
  bool cg = false;
  Ref src;
  int64_t src_offset = 0;
  Ref cp_size, src_size;
  bool has_src_size = false;
  // wait_group
  Ref groups;
};

struct Program {
  std::string text;
  std::vector<Instr> instrs;
};

[[noreturn]] void unsupported(const std::string& text) { fail("unsupported inline PTX in the simulator: " + text); }
[[noreturn]] void malformed(const std::string& text, const std::string& why) {
  fail("inline PTX the simulator cannot read (" + why + "): " + text);
}

std::string trim(const std::string& s) {
  size_t begin = 0, end = s.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(s[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(s[end - 1]))) --end;
  return s.substr(begin, end - begin);
}

// Splits at `separator` outside braces and brackets.
std::vector<std::string> split_top(const std::string& s, char separator) {
  std::vector<std::string> parts;
  int depth = 0;
  std::string current;
  for (char ch : s) {
    if (ch == '{' || ch == '[') ++depth;
    if (ch == '}' || ch == ']') --depth;
    if (ch == separator && depth == 0) {
      parts.push_back(trim(current));
      current.clear();
    } else {
      current += ch;
    }
  }
  parts.push_back(trim(current));
  return parts;
}

Ref parse_scalar(const std::string& token, const std::string& text) {
  Ref ref;
  const std::string t = trim(token);
  char* end = nullptr;
  if (t.size() > 1 && t[0] == '%') {
    const long n = std::strtol(t.c_str() + 1, &end, 10);
    if (end == t.c_str() + 1 || *end != '\0' || n < 0) malformed(text, "operand '" + t + "'");
    ref.operand = static_cast<int>(n);
    return ref;
  }
  if (t.empty()) malformed(text, "an empty operand");
  ref.immediate = std::strtoll(t.c_str(), &end, 0);
  if (*end != '\0') malformed(text, "operand '" + t + "'");
  return ref;
}

std::vector<Ref> parse_vector(const std::string& arg, const std::string& text) {
  if (arg.size() < 2 || arg.front() != '{' || arg.back() != '}') malformed(text, "expected {registers}, got '" + arg + "'");
  std::vector<Ref> refs;
  for (const std::string& part : split_top(arg.substr(1, arg.size() - 2), ',')) {
    refs.push_back(parse_scalar(part, text));
    if (refs.back().operand < 0) malformed(text, "an immediate in a register vector");
  }
  return refs;
}

// [%N], [%N+imm], [%N-imm].
void parse_address(const std::string& arg, const std::string& text, Ref* ref, int64_t* offset) {
  if (arg.size() < 2 || arg.front() != '[' || arg.back() != ']') malformed(text, "expected [address], got '" + arg + "'");
  const std::string inner = arg.substr(1, arg.size() - 2);
  const size_t sign = inner.find_first_of("+-");
  *ref = parse_scalar(inner.substr(0, sign), text);
  *offset = 0;
  if (sign != std::string::npos) {
    const Ref imm = parse_scalar(inner.substr(sign + 1), text);
    if (imm.operand >= 0) malformed(text, "a register offset in an address");
    *offset = inner[sign] == '-' ? -imm.immediate : imm.immediate;
  }
  if (ref->operand < 0) malformed(text, "an address that is not an operand");
}

Instr parse_statement(const std::string& statement) {
  Instr in;
  in.statement = statement;
  size_t space = 0;
  while (space < statement.size() && !std::isspace(static_cast<unsigned char>(statement[space]))) ++space;
  in.signature = statement.substr(0, space);
  const std::string rest = trim(statement.substr(space));
  const std::vector<std::string> args = rest.empty() ? std::vector<std::string>{} : split_top(rest, ',');
  std::vector<std::string> q;
  {
    size_t begin = 0;
    for (size_t dot; (dot = in.signature.find('.', begin)) != std::string::npos; begin = dot + 1)
      q.push_back(in.signature.substr(begin, dot - begin));
    q.push_back(in.signature.substr(begin));
  }
  auto is = [&](size_t i, const char* word) { return i < q.size() && q[i] == word; };

  if (is(0, "mma")) {
    // mma.sync.aligned.{m16n8k16,m16n8k8}.row.col.dtype.atype.btype.ctype
    if (q.size() != 10 || !is(1, "sync") || !is(2, "aligned") || !(is(3, "m16n8k16") || is(3, "m16n8k8")) ||
        !is(4, "row") || !is(5, "col") || q[7] != q[8] || !(is(7, "f16") || is(7, "bf16")) ||
        !(is(6, "f32") || is(6, "f16")) || !(is(9, "f32") || is(9, "f16")))
      unsupported(statement);
    in.op = Op::Mma;
    in.k = is(3, "m16n8k16") ? 16 : 8;
    in.bf16 = is(7, "bf16");
    in.d_f16 = is(6, "f16");
    in.c_f16 = is(9, "f16");
    if (in.bf16 && (in.d_f16 || in.c_f16)) unsupported(statement);  // bf16 accumulates in f32 only
    if (args.size() != 4) malformed(statement, "mma takes d, a, b, c");
    in.d = parse_vector(args[0], statement);
    in.a = parse_vector(args[1], statement);
    in.b = parse_vector(args[2], statement);
    in.c = parse_vector(args[3], statement);
    if (in.d.size() != (in.d_f16 ? 2u : 4u) || in.c.size() != (in.c_f16 ? 2u : 4u) ||
        in.a.size() != static_cast<size_t>(in.k / 4) || in.b.size() != static_cast<size_t>(in.k / 8))
      malformed(statement, "wrong number of registers for the shape and types");
    return in;
  }
  if (is(0, "ldmatrix")) {
    // ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared[::cta].b16
    size_t i = 5;
    const bool trans = is(i, "trans");
    if (trans) ++i;
    if (!is(1, "sync") || !is(2, "aligned") || !is(3, "m8n8") || !(is(4, "x1") || is(4, "x2") || is(4, "x4")) ||
        !(is(i, "shared") || is(i, "shared::cta")) || !is(i + 1, "b16") || q.size() != i + 2)
      unsupported(statement);
    in.op = Op::Ldmatrix;
    in.matrices = q[4][1] - '0';
    in.trans = trans;
    if (args.size() != 2) malformed(statement, "ldmatrix takes {registers}, [address]");
    in.dst = parse_vector(args[0], statement);
    if (in.dst.size() != static_cast<size_t>(in.matrices)) malformed(statement, "one register per matrix");
    parse_address(args[1], statement, &in.address, &in.address_offset);
    return in;
  }
  if (is(0, "cp") && is(1, "async")) {
    if (q.size() == 3 && is(2, "commit_group") && args.empty()) {
      in.op = Op::CommitGroup;
      return in;
    }
    if (q.size() == 3 && is(2, "wait_all") && args.empty()) {
      in.op = Op::WaitAll;
      return in;
    }
    if (q.size() == 3 && is(2, "wait_group") && args.size() == 1) {
      in.op = Op::WaitGroup;
      in.groups = parse_scalar(args[0], statement);
      return in;
    }
    // cp.async.{ca,cg}.shared[::cta].global[.L2::{64,128,256}B] [dst], [src], cp-size[, src-size]
    const bool prefetch = q.size() == 6 && (is(5, "L2::64B") || is(5, "L2::128B") || is(5, "L2::256B"));
    if ((q.size() != 5 && !prefetch) || !(is(2, "ca") || is(2, "cg")) || !(is(3, "shared") || is(3, "shared::cta")) ||
        !is(4, "global") || args.size() < 3 || args.size() > 4)
      unsupported(statement);
    in.op = Op::CpAsync;
    in.cg = is(2, "cg");
    parse_address(args[0], statement, &in.address, &in.address_offset);
    parse_address(args[1], statement, &in.src, &in.src_offset);
    in.cp_size = parse_scalar(args[2], statement);
    in.has_src_size = args.size() == 4;
    if (in.has_src_size) in.src_size = parse_scalar(args[3], statement);
    return in;
  }
  unsupported(statement);
}

Program parse(const char* text) {
  Program program;
  program.text = text;
  for (const std::string& part : split_top(program.text, ';')) {
    if (part.empty()) continue;
    program.instrs.push_back(parse_statement(part));
  }
  if (program.instrs.empty()) unsupported(program.text);
  return program;
}

// Each distinct text is parsed once. The lock is never held across fail() (which may leave the
// function without unwinding) or a blocking operation.
const Program& program_of(const char* text) {
  struct Cache {
    std::mutex mutex;
    std::unordered_map<const char*, const Program*> by_pointer;
    std::unordered_map<std::string, std::unique_ptr<Program>> by_text;
  };
  static Cache cache;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto found = cache.by_pointer.find(text);
    if (found != cache.by_pointer.end()) return *found->second;
  }
  auto parsed = std::make_unique<Program>(parse(text));
  std::lock_guard<std::mutex> lock(cache.mutex);
  std::unique_ptr<Program>& slot = cache.by_text[parsed->text];
  if (!slot) slot = std::move(parsed);
  cache.by_pointer[text] = slot.get();
  return *slot;
}

// ---- operand access ------------------------------------------------------------------------------
struct Operands {
  const PtxOperand* ops;
  size_t count;
  const Instr* instr;

  const PtxOperand& at(const Ref& ref) const {
    if (static_cast<size_t>(ref.operand) >= count)
      malformed(instr->statement, "%" + std::to_string(ref.operand) + " but only " + std::to_string(count) +
                                      " operands");
    return ops[ref.operand];
  }
  // The value of a scalar: an immediate, an input, or a read-write output's current value.
  uint64_t read(const Ref& ref) const {
    if (ref.operand < 0) return static_cast<uint64_t>(ref.immediate);
    const PtxOperand& op = at(ref);
    if (op.mode == '=')
      fail("inline PTX reads %" + std::to_string(ref.operand) + ", a write-only (\"=\") operand: " + instr->statement);
    if (op.mode == '+') {
      uint64_t bits = 0;
      std::memcpy(&bits, op.address, op.size);
      return bits;
    }
    return op.bits;
  }
  void write(const Ref& ref, uint64_t bits) const {
    const PtxOperand& op = at(ref);
    if (op.mode != '=' && op.mode != '+')
      fail("inline PTX writes %" + std::to_string(ref.operand) + ", an input operand: " + instr->statement);
    std::memcpy(op.address, &bits, op.size);
  }
  // A register of the kind the instruction needs ('r' for .b32, 'f' for .f32, ...).
  void expect(const Ref& ref, const char* letters, const char* what) const {
    if (ref.operand < 0) return;
    const PtxOperand& op = at(ref);
    if (std::strchr(letters, op.type) == nullptr)
      fail(std::string("inline PTX: ") + what + " %" + std::to_string(ref.operand) + " has constraint '" + op.type +
           "', expected one of \"" + letters + "\": " + instr->statement);
  }
};

// What each lane brings to a warp-collective instruction.
struct LaneCall {
  Operands operands;
  const unsigned char* row;  // ldmatrix: the row this lane addresses (null when its address is unused)
};

double element(uint16_t bits, bool bf16) {
  return bf16 ? fp16::bfloat16_to_float(bits) : fp16::half_to_float(bits);
}

const LaneCall& lane_call(void* const* lanes, unsigned l, const Instr& self) {
  const auto* call = static_cast<const LaneCall*>(lanes[l]);
  if (call == nullptr) fail(self.signature + ": every lane of the warp must execute it (.sync.aligned)");
  return *call;
}

// ---- mma -------------------------------------------------------------------------------------------
void complete_mma(void* const* lanes, uint32_t, void* context) {
  const Instr& self = *static_cast<const Instr*>(context);
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  for (unsigned l = 0; l < 32; ++l) {
    const Operands& o = lane_call(lanes, l, self).operands;
    const Instr& in = *o.instr;
    const int g = static_cast<int>(l >> 2), t = static_cast<int>(l & 3);
    for (size_t r = 0; r < in.a.size(); ++r) {
      const uint64_t bits = o.read(in.a[r]);
      for (int h = 0; h < 2; ++h) {
        const int i = static_cast<int>(2 * r) + h;
        A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = element(static_cast<uint16_t>(bits >> (16 * h)), in.bf16);
      }
    }
    for (size_t r = 0; r < in.b.size(); ++r) {
      const uint64_t bits = o.read(in.b[r]);
      for (int h = 0; h < 2; ++h) {
        const int i = static_cast<int>(2 * r) + h;
        B[2 * t + (i & 1) + 8 * (i >> 1)][g] = element(static_cast<uint16_t>(bits >> (16 * h)), in.bf16);
      }
    }
    for (int i = 0; i < 4; ++i) {
      double value;
      if (in.c_f16) {
        value = fp16::half_to_float(static_cast<uint16_t>(o.read(in.c[i / 2]) >> (16 * (i & 1))));
      } else {
        const uint32_t bits = static_cast<uint32_t>(o.read(in.c[i]));
        float f;
        std::memcpy(&f, &bits, sizeof(f));
        value = f;
      }
      C[g + 8 * (i >> 1)][2 * t + (i & 1)] = value;
    }
  }
  double D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double sum = 0.0;
      for (int k = 0; k < self.k; ++k) sum += A[i][k] * B[k][j];
      D[i][j] = sum + C[i][j];
    }
  // Every lane's C was read above: D may name the same registers.
  for (unsigned l = 0; l < 32; ++l) {
    const Operands& o = lane_call(lanes, l, self).operands;
    const Instr& in = *o.instr;
    const int g = static_cast<int>(l >> 2), t = static_cast<int>(l & 3);
    if (in.d_f16) {
      for (int r = 0; r < 2; ++r) {
        const uint32_t lo = fp16::round_double(D[g + 8 * r][2 * t], 0, fp16::kHalf);
        const uint32_t hi = fp16::round_double(D[g + 8 * r][2 * t + 1], 0, fp16::kHalf);
        o.write(in.d[r], lo | (hi << 16));
      }
    } else {
      for (int i = 0; i < 4; ++i) {
        const float f = static_cast<float>(D[g + 8 * (i >> 1)][2 * t + (i & 1)]);
        uint32_t bits;
        std::memcpy(&bits, &f, sizeof(bits));
        o.write(in.d[i], bits);
      }
    }
  }
}

void run_mma(const Operands& o) {
  const Instr& in = *o.instr;
  for (const Ref& r : in.a) o.expect(r, "r", "an A register");
  for (const Ref& r : in.b) o.expect(r, "r", "a B register");
  for (const Ref& r : in.c) o.expect(r, in.c_f16 ? "r" : "f", "a C register");
  for (const Ref& r : in.d) o.expect(r, in.d_f16 ? "r" : "f", "a D register");
  LaneCall call{o, nullptr};
  warp_collective(0xffffffffu, in.signature.c_str(), &call, complete_mma, const_cast<Instr*>(&in));
}

// ---- ldmatrix --------------------------------------------------------------------------------------
// Lanes 8i..8i+7 address the rows of matrix i; lane l receives row l/4, elements 2(l%4) and
// 2(l%4)+1 of each matrix (low half first), or with .trans those of the transposed matrix.
void complete_ldmatrix(void* const* lanes, uint32_t, void* context) {
  const Instr& self = *static_cast<const Instr*>(context);
  const unsigned char* rows[32];
  for (unsigned l = 0; l < 32; ++l) rows[l] = lane_call(lanes, l, self).row;
  auto value = [&](int matrix, int row, int col) {
    uint16_t v;
    std::memcpy(&v, rows[8 * matrix + row] + 2 * col, sizeof(v));
    return static_cast<uint32_t>(v);
  };
  for (unsigned l = 0; l < 32; ++l) {
    const Operands& o = lane_call(lanes, l, self).operands;
    const int r = static_cast<int>(l / 4), c = static_cast<int>(2 * (l % 4));
    for (int m = 0; m < self.matrices; ++m) {
      const uint32_t lo = self.trans ? value(m, c, r) : value(m, r, c);
      const uint32_t hi = self.trans ? value(m, c + 1, r) : value(m, r, c + 1);
      o.write(o.instr->dst[m], lo | (hi << 16));
    }
  }
}

uint32_t shared_address(const Operands& o, const Ref& ref, int64_t offset, const char* what) {
  o.expect(ref, "rl", what);
  const uint64_t address = o.read(ref) + static_cast<uint64_t>(offset);
  if (address > 0xffffffffu)
    fail(std::string("inline PTX: ") + what + " " + std::to_string(address) +
         " is not a shared-memory address (pass __cvta_generic_to_shared's value): " + o.instr->statement);
  return static_cast<uint32_t>(address);
}

void run_ldmatrix(const Operands& o) {
  const Instr& in = *o.instr;
  for (const Ref& r : in.dst) {
    o.expect(r, "r", "an ldmatrix destination");
    if (o.at(r).mode == 0) fail("inline PTX: an ldmatrix destination is an input operand: " + in.statement);
  }
  LaneCall call{o, nullptr};
  if (lane_id() < static_cast<unsigned>(8 * in.matrices)) {  // the other lanes' addresses are not used
    const uint32_t address = shared_address(o, in.address, in.address_offset, "the ldmatrix row address");
    if (address % 16 != 0)
      fail("ldmatrix: the row address (shared offset " + std::to_string(address) + ") is not 16-byte aligned");
    call.row = static_cast<const unsigned char*>(shared_pointer(address, 16));
  }
  warp_collective(0xffffffffu, in.signature.c_str(), &call, complete_ldmatrix, const_cast<Instr*>(&in));
}

// ---- cp.async ----------------------------------------------------------------------------------------
void land(const PendingCopy& copy) { std::memcpy(shared_pointer(copy.dst_offset, copy.bytes), copy.data, copy.bytes); }

void run_cp_async(const Operands& o) {
  const Instr& in = *o.instr;
  o.expect(in.cp_size, "n", "the cp-size");
  const uint64_t size = o.read(in.cp_size);
  if (size != 16 && (in.cg || (size != 8 && size != 4)))
    fail("cp.async: cp-size " + std::to_string(size) + " is not " + (in.cg ? "16 (.cg)" : "4, 8 or 16") + ": " +
         in.statement);
  uint64_t valid = size;
  if (in.has_src_size) {
    o.expect(in.src_size, "rn", "the src-size");
    valid = static_cast<uint32_t>(o.read(in.src_size));
    if (valid > size)
      fail("cp.async: src-size " + std::to_string(static_cast<int32_t>(valid)) + " is not in [0, " +
           std::to_string(size) + "]: " + in.statement);
  }
  const uint32_t dst = shared_address(o, in.address, in.address_offset, "the cp.async destination");
  o.expect(in.src, "l", "the cp.async source");
  const uint64_t src = o.read(in.src) + static_cast<uint64_t>(in.src_offset);
  if (dst % size != 0 || src % size != 0)
    fail("cp.async: a " + std::to_string(size) + "-byte copy needs " + std::to_string(size) +
         "-byte aligned addresses (destination shared offset " + std::to_string(dst) + ", source address " +
         std::to_string(src) + ")");
  void* destination = shared_pointer(dst, size);
  PendingCopy copy{dst, static_cast<uint32_t>(size), {}};
  if (valid > 0) std::memcpy(copy.data, reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), valid);
  std::memset(destination, 0xff, size);
  cp_async_state().open.push_back(copy);
}

void commit_group() {
  CpAsyncState& state = cp_async_state();
  state.committed.push_back(std::move(state.open));
  state.open.clear();
}

void wait_group(uint64_t pending) {
  CpAsyncState& state = cp_async_state();
  while (state.committed.size() > pending) {
    for (const PendingCopy& copy : state.committed.front()) land(copy);
    state.committed.pop_front();
  }
}

}  // namespace

void check_ptx_operand(const PtxOperand& op) {
  const std::string which = std::string("asm operand \"") + (op.mode ? std::string(1, op.mode) : std::string()) +
                            op.type + "\"";
  if (op.mode != 0 && op.mode != '=' && op.mode != '+') fail(which + ": unknown modifier");
  if (op.mode != 0 && op.address == nullptr) fail(which + ": an output operand must be a modifiable lvalue");
  // An input integer narrower than its register is extended; everything else must match exactly.
  auto fits = [&](unsigned bytes) { return op.size == bytes || (op.mode == 0 && op.is_integer && op.size < bytes); };
  bool ok = false;
  switch (op.type) {
    case 'r': ok = !op.is_float && fits(4); break;
    case 'l': ok = !op.is_float && fits(8); break;
    case 'h': ok = !op.is_float && fits(2); break;
    case 'f': ok = op.is_float && op.size == 4; break;
    case 'd': ok = op.is_float && op.size == 8; break;
    case 'n': ok = op.mode == 0 && op.is_integer; break;
    default: fail(which + ": a constraint the simulator does not support");
  }
  if (!ok) fail(which + ": a " + std::to_string(op.size) + "-byte " + (op.is_float ? "floating-point " : "") +
                "value does not fit the constraint");
}

void ptx_asm(const char* text, std::initializer_list<PtxOperand> operands) {
  const Program& program = program_of(text);
  for (const Instr& in : program.instrs) {
    const Operands o{operands.begin(), operands.size(), &in};
    switch (in.op) {
      case Op::Mma: run_mma(o); break;
      case Op::Ldmatrix: run_ldmatrix(o); break;
      case Op::CpAsync: run_cp_async(o); break;
      case Op::CommitGroup: commit_group(); break;
      case Op::WaitGroup:
        o.expect(in.groups, "n", "the wait_group count");
        wait_group(o.read(in.groups));
        break;
      case Op::WaitAll:
        commit_group();
        wait_group(0);
        break;
    }
  }
}

}  // namespace fl_sim
