// Python semantics of chat-template values: printing (str/repr), json.dumps, truthiness,
// equality and ordering, arithmetic and the str methods templates call. Every operation a
// Python TypeError/ValueError would refuse comes back as an error message; the evaluator
// adds the template position.
#include "engine/tokenizer/chat_template_value.h"

#include <utf8proc.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace moe::chat_template_internal {
namespace {

bool IsCased(char32_t c) {
  const utf8proc_category_t category = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return category == UTF8PROC_CATEGORY_LU || category == UTF8PROC_CATEGORY_LL ||
         category == UTF8PROC_CATEGORY_LT;
}

// Python's str.isprintable() for one code point: not in the Other or Separator categories,
// except the ASCII space.
bool IsPrintable(char32_t c) {
  if (c == ' ') return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
      return false;
    default:
      return true;
  }
}

void AppendHex(uint32_t value, int digits, std::string& out) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (int shift = (digits - 1) * 4; shift >= 0; shift -= 4) out += kHex[(value >> shift) & 0xF];
}

void AppendStringRepr(std::string_view text, std::string& out) {
  const bool has_single = text.find('\'') != std::string_view::npos;
  const bool has_double = text.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  out += quote;
  for (size_t pos = 0; pos < text.size();) {
    const char32_t c = NextCodePoint(text, pos);
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (IsPrintable(c)) {
      AppendUtf8(c, out);
    } else if (c < 0x100) {
      out += "\\x";
      AppendHex(c, 2, out);
    } else if (c < 0x10000) {
      out += "\\u";
      AppendHex(c, 4, out);
    } else {
      out += "\\U";
      AppendHex(c, 8, out);
    }
  }
  out += quote;
}

void AppendJsonString(std::string_view text, bool ensure_ascii, std::string& out) {
  out += '"';
  for (size_t pos = 0; pos < text.size();) {
    const char32_t c = NextCodePoint(text, pos);
    switch (c) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      default:
        break;
    }
    if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
      if (c >= 0x10000) {  // surrogate pair, as json.dumps writes it
        const uint32_t v = c - 0x10000;
        out += "\\u";
        AppendHex(0xD800 + (v >> 10), 4, out);
        out += "\\u";
        AppendHex(0xDC00 + (v & 0x3FF), 4, out);
      } else {
        out += "\\u";
        AppendHex(c, 4, out);
      }
    } else {
      AppendUtf8(c, out);
    }
  }
  out += '"';
}

std::string Quote(std::string_view text) {
  std::string out;
  AppendStringRepr(text, out);
  return out;
}

absl::StatusOr<int64_t> FloorDivInt(int64_t a, int64_t b) {
  if (b == 0) return Error("integer division or modulo by zero");
  if (a == INT64_MIN && b == -1) return Error("integer overflow");
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

absl::StatusOr<int64_t> ModInt(int64_t a, int64_t b) {
  if (b == 0) return Error("integer division or modulo by zero");
  if (b == -1) return 0;
  int64_t r = a % b;
  if (r != 0 && ((r < 0) != (b < 0))) r += b;
  return r;
}

// CPython's float_divmod.
std::pair<double, double> FloatDivMod(double a, double b) {
  double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  if (mod != 0) {
    if ((b < 0) != (mod < 0)) {
      mod += b;
      div -= 1.0;
    }
  } else {
    mod = std::copysign(0.0, b);
  }
  double floordiv;
  if (div != 0) {
    floordiv = std::floor(div);
    if (div - floordiv > 0.5) floordiv += 1.0;
  } else {
    floordiv = std::copysign(0.0, a / b);
  }
  return {floordiv, mod};
}

absl::StatusOr<Value> PowInt(int64_t base, int64_t exponent) {
  if (exponent < 0) {
    if (base == 0) return Error("0.0 cannot be raised to a negative power");
    return Value::Float(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
  }
  int64_t result = 1;
  while (exponent > 0) {
    if (exponent & 1) {
      if (__builtin_mul_overflow(result, base, &result)) return Error("integer overflow");
    }
    exponent >>= 1;
    if (exponent > 0 && __builtin_mul_overflow(base, base, &base)) return Error("integer overflow");
  }
  return Value::Int(result);
}

}  // namespace

absl::Status Error(std::string_view message) { return absl::InvalidArgumentError(Sv(message)); }

std::string TypeName(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "Undefined";
    case Value::Kind::kNone:
      return "NoneType";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "str";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kTuple:
      return "tuple";
    case Value::Kind::kDict:
      return "dict";
    case Value::Kind::kNamespace:
      return "Namespace";
    case Value::Kind::kLoop:
      return "LoopContext";
    case Value::Kind::kCallable:
      return "function";
  }
  return "object";
}

std::string ObjectDescription(const Value& v) {
  if (v.kind == Value::Kind::kNone) return "None";
  if (v.kind == Value::Kind::kNamespace) return "jinja2.utils.Namespace object";
  if (v.kind == Value::Kind::kLoop) return "jinja2.runtime.LoopContext object";
  return TypeName(v) + " object";
}

Value MissingAttribute(const Value& object, std::string_view name) {
  return Value::Undefined(
      absl::StrCat("'", ObjectDescription(object), "' has no attribute ", Quote(name)));
}

Value UndefinedName(std::string_view name) {
  return Value::Undefined(absl::StrCat(Quote(name), " is undefined"));
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.boolean;
    case Value::Kind::kInt:
      return v.integer != 0;
    case Value::Kind::kFloat:
      return v.number != 0;
    case Value::Kind::kString:
      return !v.text.empty();
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      return !v.list->items.empty();
    case Value::Kind::kDict:
      return !v.dict->entries.empty();
    default:
      return true;
  }
}

std::string FormatFloat(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto result =
      std::to_chars(buffer, buffer + sizeof(buffer), d, std::chars_format::scientific);
  std::string_view sci(buffer, static_cast<size_t>(result.ptr - buffer));
  std::string out;
  if (sci.front() == '-') {
    out += '-';
    sci.remove_prefix(1);
  }
  const size_t e = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e)) {
    if (c != '.') digits += c;
  }
  int exponent = 0;
  std::from_chars(sci.data() + e + (sci[e + 1] == '+' ? 2 : 1), sci.data() + sci.size(), exponent);
  const int decimal_point = exponent + 1;  // digits = 0.d1d2... * 10^decimal_point
  const int n = static_cast<int>(digits.size());
  if (decimal_point <= -4 || decimal_point > 16) {
    out += digits[0];
    if (n > 1) absl::StrAppend(&out, ".", digits.substr(1));
    const int shown = decimal_point - 1;
    absl::StrAppend(&out, "e", shown < 0 ? "-" : "+", std::abs(shown) < 10 ? "0" : "",
                    std::abs(shown));
  } else if (decimal_point <= 0) {
    absl::StrAppend(&out, "0.", std::string(-decimal_point, '0'), digits);
  } else if (decimal_point >= n) {
    absl::StrAppend(&out, digits, std::string(decimal_point - n, '0'), ".0");
  } else {
    absl::StrAppend(&out, digits.substr(0, decimal_point), ".", digits.substr(decimal_point));
  }
  return out;
}

absl::Status AppendRepr(const Value& v, int depth_left, std::string& out) {
  if (depth_left <= 0) return Error("value nested too deeply to print");
  switch (v.kind) {
    case Value::Kind::kUndefined:
      out += "Undefined";
      return absl::OkStatus();
    case Value::Kind::kString:
      AppendStringRepr(v.text, out);
      return absl::OkStatus();
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      const bool tuple = v.kind == Value::Kind::kTuple;
      out += tuple ? '(' : '[';
      const auto& items = v.list->items;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out += ", ";
        RETURN_IF_ERROR(AppendRepr(items[i], depth_left - 1, out));
      }
      if (tuple && items.size() == 1) out += ',';
      out += tuple ? ')' : ']';
      return absl::OkStatus();
    }
    case Value::Kind::kDict:
    case Value::Kind::kNamespace: {
      const bool ns = v.kind == Value::Kind::kNamespace;
      out += ns ? "<Namespace {" : "{";
      bool first = true;
      for (const auto& [key, value] : v.dict->entries) {
        if (!first) out += ", ";
        first = false;
        RETURN_IF_ERROR(AppendRepr(key, depth_left - 1, out));
        out += ": ";
        RETURN_IF_ERROR(AppendRepr(value, depth_left - 1, out));
      }
      out += ns ? "}>" : "}";
      return absl::OkStatus();
    }
    case Value::Kind::kLoop:
      absl::StrAppend(&out, "<LoopContext ", v.loop->index0 + 1, "/", v.loop->items->items.size(),
                      ">");
      return absl::OkStatus();
    case Value::Kind::kCallable:
      out += "<function>";
      return absl::OkStatus();
    default:
      return AppendStr(v, depth_left, out);
  }
}

absl::Status AppendStr(const Value& v, int depth_left, std::string& out) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return absl::OkStatus();
    case Value::Kind::kNone:
      out += "None";
      return absl::OkStatus();
    case Value::Kind::kBool:
      out += v.boolean ? "True" : "False";
      return absl::OkStatus();
    case Value::Kind::kInt:
      absl::StrAppend(&out, v.integer);
      return absl::OkStatus();
    case Value::Kind::kFloat:
      out += FormatFloat(v.number);
      return absl::OkStatus();
    case Value::Kind::kString:
      out += v.text;
      return absl::OkStatus();
    default:
      return AppendRepr(v, depth_left, out);
  }
}

absl::StatusOr<std::string> Str(const Value& v, int depth_left) {
  if (v.kind == Value::Kind::kString) return v.text;
  std::string out;
  RETURN_IF_ERROR(AppendStr(v, depth_left, out));
  return out;
}

bool Equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat)
      return AsDouble(a) == AsDouble(b);
    return AsInt(a) == AsInt(b);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kString:
      return a.text == b.text;
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      const auto& x = a.list->items;
      const auto& y = b.list->items;
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i) {
        if (!Equal(x[i], y[i])) return false;
      }
      return true;
    }
    case Value::Kind::kDict: {
      if (a.dict->entries.size() != b.dict->entries.size()) return false;
      for (const auto& [key, value] : a.dict->entries) {
        const Value* other = DictFind(*b.dict, key);
        if (other == nullptr || !Equal(value, *other)) return false;
      }
      return true;
    }
    case Value::Kind::kNamespace:
      return a.dict == b.dict;
    case Value::Kind::kLoop:
      return a.loop == b.loop;
    case Value::Kind::kCallable:
      return a.callable == b.callable;
    default:
      return false;
  }
}

absl::StatusOr<bool> Less(const Value& a, const Value& b, std::string_view op) {
  if (a.is_undefined()) return Error(a.text);
  if (b.is_undefined()) return Error(b.text);
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat)
      return AsDouble(a) < AsDouble(b);
    return AsInt(a) < AsInt(b);
  }
  if (a.kind == b.kind && a.kind == Value::Kind::kString)
    return a.text < b.text;  // UTF-8 keeps code point order
  if (a.kind == b.kind && a.is_sequence()) {
    const auto& x = a.list->items;
    const auto& y = b.list->items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (Equal(x[i], y[i])) continue;
      return Less(x[i], y[i], op);
    }
    return x.size() < y.size();
  }
  return Error(absl::StrCat("'", Sv(op), "' not supported between instances of '", TypeName(a),
                            "' and '", TypeName(b), "'"));
}

absl::StatusOr<bool> Compare(const Value& a, const Value& b, CompareOp op) {
  switch (op) {
    case CompareOp::kEq:
      return Equal(a, b);
    case CompareOp::kNe:
      return !Equal(a, b);
    case CompareOp::kLt:
      return Less(a, b, "<");
    case CompareOp::kGt:
      return Less(b, a, ">");
    case CompareOp::kLe: {
      // Python evaluates a <= b with __le__; for the types here that is (a < b or a == b),
      // but the type check must still fail for mismatched types.
      ASSIGN_OR_RETURN(bool less, Less(a, b, "<="));
      return less || Equal(a, b);
    }
    case CompareOp::kGe: {
      ASSIGN_OR_RETURN(bool greater, Less(b, a, ">="));
      return greater || Equal(a, b);
    }
    case CompareOp::kIn:
      return Contains(b, a);
    case CompareOp::kNotIn: {
      ASSIGN_OR_RETURN(bool in, Contains(b, a));
      return !in;
    }
  }
  return false;
}

absl::StatusOr<bool> Contains(const Value& container, const Value& item) {
  switch (container.kind) {
    case Value::Kind::kUndefined:
      return false;  // iterating Undefined yields nothing
    case Value::Kind::kString:
      if (!item.is_string()) {
        if (item.is_undefined()) return Error(item.text);
        return Error(
            absl::StrCat("'in <string>' requires string as left operand, not ", TypeName(item)));
      }
      return container.text.find(item.text) != std::string::npos;
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      for (const Value& element : container.list->items) {
        if (Equal(element, item)) return true;
      }
      return false;
    case Value::Kind::kDict:
      return DictFind(*container.dict, item) != nullptr;
    default:
      return Error(absl::StrCat("argument of type '", TypeName(container), "' is not iterable"));
  }
}

const Value* DictFind(const Dict& dict, const Value& key) {
  for (const auto& [k, v] : dict.entries) {
    if (Equal(k, key)) return &v;
  }
  return nullptr;
}

const Value* DictFind(const Dict& dict, std::string_view key) {
  for (const auto& [k, v] : dict.entries) {
    if (k.is_string() && k.text == key) return &v;
  }
  return nullptr;
}

void DictSet(Dict& dict, Value key, Value value) {
  for (auto& [k, v] : dict.entries) {
    if (Equal(k, key)) {
      v = std::move(value);
      return;
    }
  }
  dict.entries.emplace_back(std::move(key), std::move(value));
}

double AsDouble(const Value& v) {
  if (v.kind == Value::Kind::kFloat) return v.number;
  return static_cast<double>(AsInt(v));
}

int64_t AsInt(const Value& v) {
  return v.kind == Value::Kind::kBool ? (v.boolean ? 1 : 0) : v.integer;
}

bool IsHashable(const Value& v) {
  if (v.kind == Value::Kind::kList || v.kind == Value::Kind::kDict) return false;
  if (v.kind == Value::Kind::kTuple) {
    for (const Value& item : v.list->items) {
      if (!IsHashable(item)) return false;
    }
  }
  return true;
}

absl::StatusOr<Value> Arithmetic(BinaryOp op, const Value& a, const Value& b, size_t max_bytes) {
  if (a.is_undefined()) return Error(a.text);
  if (b.is_undefined()) return Error(b.text);
  static constexpr std::string_view kSymbols[] = {"+", "-", "*", "/", "//", "%", "**", "~"};
  const std::string_view symbol = kSymbols[static_cast<int>(op)];
  if (a.is_number() && b.is_number()) {
    const bool floats = a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat;
    if (!floats) {
      const int64_t x = AsInt(a);
      const int64_t y = AsInt(b);
      int64_t r = 0;
      switch (op) {
        case BinaryOp::kAdd:
          if (__builtin_add_overflow(x, y, &r)) return Error("integer overflow");
          return Value::Int(r);
        case BinaryOp::kSub:
          if (__builtin_sub_overflow(x, y, &r)) return Error("integer overflow");
          return Value::Int(r);
        case BinaryOp::kMul:
          if (__builtin_mul_overflow(x, y, &r)) return Error("integer overflow");
          return Value::Int(r);
        case BinaryOp::kDiv:
          if (y == 0) return Error("division by zero");
          return Value::Float(static_cast<double>(x) / static_cast<double>(y));
        case BinaryOp::kFloorDiv: {
          ASSIGN_OR_RETURN(int64_t q, FloorDivInt(x, y));
          return Value::Int(q);
        }
        case BinaryOp::kMod: {
          ASSIGN_OR_RETURN(int64_t m, ModInt(x, y));
          return Value::Int(m);
        }
        case BinaryOp::kPow:
          return PowInt(x, y);
        default:
          break;
      }
    } else {
      const double x = AsDouble(a);
      const double y = AsDouble(b);
      switch (op) {
        case BinaryOp::kAdd:
          return Value::Float(x + y);
        case BinaryOp::kSub:
          return Value::Float(x - y);
        case BinaryOp::kMul:
          return Value::Float(x * y);
        case BinaryOp::kDiv:
          if (y == 0) return Error("float division by zero");
          return Value::Float(x / y);
        case BinaryOp::kFloorDiv:
          if (y == 0) return Error("float floor division by zero");
          return Value::Float(FloatDivMod(x, y).first);
        case BinaryOp::kMod:
          if (y == 0) return Error("float modulo");
          return Value::Float(FloatDivMod(x, y).second);
        case BinaryOp::kPow: {
          if (x == 0 && y < 0) return Error("0.0 cannot be raised to a negative power");
          if (x < 0 && y != std::floor(y)) return Error("complex results are not supported");
          const double r = std::pow(x, y);
          if (std::isinf(r) && !std::isinf(x) && !std::isinf(y)) {
            return Error("(34, 'Numerical result out of range')");
          }
          return Value::Float(r);
        }
        default:
          break;
      }
    }
  }
  if (op == BinaryOp::kAdd && a.kind == b.kind) {
    if (a.is_string()) {
      if (a.text.size() + b.text.size() > max_bytes)
        return Error("string too large (max_output_bytes)");
      return Value::String(a.text + b.text);
    }
    if (a.is_sequence()) {
      std::vector<Value> items = a.list->items;
      items.insert(items.end(), b.list->items.begin(), b.list->items.end());
      return MakeList(a.kind, std::move(items));
    }
  }
  if (op == BinaryOp::kMul &&
      (a.is_string() || a.is_sequence() || b.is_string() || b.is_sequence())) {
    const Value& seq = a.is_string() || a.is_sequence() ? a : b;
    const Value& count = &seq == &a ? b : a;
    if (count.kind == Value::Kind::kInt || count.kind == Value::Kind::kBool) {
      const int64_t n = std::max<int64_t>(0, AsInt(count));
      const size_t unit =
          seq.is_string() ? seq.text.size() : seq.list->items.size() * sizeof(Value);
      if (unit > 0 && static_cast<uint64_t>(n) > max_bytes / unit) {
        return Error("sequence repetition too large (max_output_bytes)");
      }
      if (seq.is_string()) {
        std::string out;
        for (int64_t i = 0; i < n; ++i) out += seq.text;
        return Value::String(std::move(out));
      }
      std::vector<Value> items;
      for (int64_t i = 0; i < n; ++i)
        items.insert(items.end(), seq.list->items.begin(), seq.list->items.end());
      return MakeList(seq.kind, std::move(items));
    }
    return Error(
        absl::StrCat("can't multiply sequence by non-int of type '", TypeName(count), "'"));
  }
  if (op == BinaryOp::kAdd && (a.is_string() || a.is_sequence())) {
    return Error(absl::StrCat("can only concatenate ", TypeName(a), " (not \"", TypeName(b),
                              "\") to ", TypeName(a)));
  }
  if (op == BinaryOp::kMod && a.is_string())
    return Error("string formatting with % is not supported");
  return Error(absl::StrCat("unsupported operand type(s) for ", Sv(symbol), ": '", TypeName(a),
                            "' and '", TypeName(b), "'"));
}

Value MakeList(Value::Kind kind, std::vector<Value> items) {
  auto list = std::make_shared<List>();
  for (const Value& item : items) list->depth = std::max(list->depth, ContainerDepth(item) + 1);
  list->items = std::move(items);
  Value v = Value::Of(kind);
  v.list = std::move(list);
  return v;
}

Value MakeDict(std::vector<std::pair<Value, Value>> entries) {
  auto dict = std::make_shared<Dict>();
  for (auto& [key, value] : entries) {
    dict->depth = std::max({dict->depth, ContainerDepth(key) + 1, ContainerDepth(value) + 1});
    DictSet(*dict, std::move(key), std::move(value));
  }
  Value v = Value::Of(Value::Kind::kDict);
  v.dict = std::move(dict);
  return v;
}

int ContainerDepth(const Value& v) {
  if (v.is_sequence()) return v.list->depth;
  if (v.kind == Value::Kind::kDict) return v.dict->depth;
  return 0;
}

std::vector<size_t> CodePointOffsets(std::string_view text) {
  std::vector<size_t> offsets;
  for (size_t pos = 0; pos < text.size();) {
    offsets.push_back(pos);
    NextCodePoint(text, pos);
  }
  offsets.push_back(text.size());
  return offsets;
}

size_t CodePointCount(std::string_view text) {
  size_t count = 0;
  for (char c : text) count += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
  return count;
}

absl::StatusOr<std::vector<Value>> Iterate(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return std::vector<Value>{};
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      return v.list->items;
    case Value::Kind::kDict: {
      std::vector<Value> keys;
      for (const auto& entry : v.dict->entries) keys.push_back(entry.first);
      return keys;
    }
    case Value::Kind::kString: {
      std::vector<Value> chars;
      for (size_t pos = 0; pos < v.text.size();) {
        const size_t start = pos;
        NextCodePoint(v.text, pos);
        chars.push_back(Value::String(v.text.substr(start, pos - start)));
      }
      return chars;
    }
    default:
      return Error(absl::StrCat("'", TypeName(v), "' object is not iterable"));
  }
}

absl::StatusOr<int64_t> Length(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return 0;
    case Value::Kind::kString:
      return static_cast<int64_t>(CodePointCount(v.text));
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      return static_cast<int64_t>(v.list->items.size());
    case Value::Kind::kDict:
      return static_cast<int64_t>(v.dict->entries.size());
    default:
      return Error(absl::StrCat("object of type '", TypeName(v), "' has no len()"));
  }
}

// ----- str methods ------------------------------------------------------------------------

std::string MapCase(std::string_view text, CaseMapping mapping) {
  std::string out;
  out.reserve(text.size());
  bool previous_cased = false;  // for kTitle
  bool first = true;            // for kCapitalize
  for (size_t pos = 0; pos < text.size();) {
    const char32_t c = NextCodePoint(text, pos);
    const auto cp = static_cast<utf8proc_int32_t>(c);
    utf8proc_int32_t mapped = cp;
    switch (mapping) {
      case CaseMapping::kUpper:
        mapped = utf8proc_toupper(cp);
        break;
      case CaseMapping::kLower:
        mapped = utf8proc_tolower(cp);
        break;
      case CaseMapping::kCapitalize:
        mapped = first ? utf8proc_totitle(cp) : utf8proc_tolower(cp);
        break;
      case CaseMapping::kTitle: {
        const bool cased = IsCased(c);
        if (cased) mapped = previous_cased ? utf8proc_tolower(cp) : utf8proc_totitle(cp);
        previous_cased = cased;
        break;
      }
    }
    first = false;
    // The full case mappings (SpecialCasing.txt) Python applies that utf8proc's simple
    // mappings miss, for the letters European text meets.
    if (c == 0xDF && mapping != CaseMapping::kLower) {
      out += mapping == CaseMapping::kUpper ? "SS" : "Ss";
      continue;
    }
    if (c == 0x130 && mapped != cp && mapped == 'i') {
      out += "i\xCC\x87";  // U+0130 lowercases to i + combining dot above
      continue;
    }
    AppendUtf8(static_cast<char32_t>(mapped), out);
  }
  return out;
}

bool IsLowerOrUpper(std::string_view text, bool upper) {
  bool any_cased = false;
  for (size_t pos = 0; pos < text.size();) {
    const char32_t c = NextCodePoint(text, pos);
    if (!IsCased(c)) continue;
    any_cased = true;
    const auto category = utf8proc_category(static_cast<utf8proc_int32_t>(c));
    if (upper ? category != UTF8PROC_CATEGORY_LU : category != UTF8PROC_CATEGORY_LL) return false;
  }
  return any_cased;
}

std::string_view Strip(std::string_view text, const std::string* chars, bool left, bool right) {
  auto strippable = [&](char32_t c) {
    if (chars == nullptr) return IsPythonSpace(c);
    for (size_t pos = 0; pos < chars->size();) {
      if (NextCodePoint(*chars, pos) == c) return true;
    }
    return false;
  };
  size_t begin = 0;
  size_t end = text.size();
  if (left) {
    while (begin < end) {
      size_t next = begin;
      if (!strippable(NextCodePoint(text, next))) break;
      begin = next;
    }
  }
  if (right) {
    while (end > begin) {
      size_t start = end - 1;
      while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
      size_t next = start;
      if (!strippable(NextCodePoint(text, next))) break;
      end = start;
    }
  }
  return text.substr(begin, end - begin);
}

absl::StatusOr<std::vector<std::string>> Split(std::string_view text, const std::string* separator,
                                               int64_t max_split) {
  std::vector<std::string> parts;
  if (separator != nullptr) {
    if (separator->empty()) return Error("empty separator");
    size_t start = 0;
    while (max_split < 0 || static_cast<int64_t>(parts.size()) < max_split) {
      const size_t at = text.find(*separator, start);
      if (at == std::string_view::npos) break;
      parts.emplace_back(text.substr(start, at - start));
      start = at + separator->size();
    }
    parts.emplace_back(text.substr(start));
    return parts;
  }
  // Runs of whitespace separate; leading and trailing whitespace give no empty parts.
  size_t pos = 0;
  while (true) {
    while (pos < text.size()) {
      size_t next = pos;
      if (!IsPythonSpace(NextCodePoint(text, next))) break;
      pos = next;
    }
    if (pos >= text.size()) break;
    if (max_split >= 0 && static_cast<int64_t>(parts.size()) >= max_split) {
      parts.emplace_back(Strip(text.substr(pos), nullptr, false, true));
      break;
    }
    size_t end = pos;
    while (end < text.size()) {
      size_t next = end;
      if (IsPythonSpace(NextCodePoint(text, next))) break;
      end = next;
    }
    parts.emplace_back(text.substr(pos, end - pos));
    pos = end;
  }
  return parts;
}

absl::StatusOr<std::string> Replace(std::string_view text, std::string_view old_text,
                                    std::string_view new_text, int64_t count, size_t max_bytes) {
  std::string out;
  int64_t done = 0;
  auto fits = [&](size_t more) { return out.size() + more <= max_bytes; };
  if (old_text.empty()) {
    // Python inserts `new` before every code point and at the end.
    size_t pos = 0;
    while (true) {
      if (count < 0 || done < count) {
        if (!fits(new_text.size())) return Error("string too large (max_output_bytes)");
        out += new_text;
        ++done;
      }
      if (pos >= text.size()) break;
      const size_t start = pos;
      NextCodePoint(text, pos);
      out += text.substr(start, pos - start);
    }
    return out;
  }
  size_t start = 0;
  while (count < 0 || done < count) {
    const size_t at = text.find(old_text, start);
    if (at == std::string_view::npos) break;
    if (!fits(at - start + new_text.size())) return Error("string too large (max_output_bytes)");
    out += text.substr(start, at - start);
    out += new_text;
    start = at + old_text.size();
    ++done;
  }
  if (!fits(text.size() - start)) return Error("string too large (max_output_bytes)");
  out += text.substr(start);
  return out;
}

// ----- json.dumps -------------------------------------------------------------------------

absl::Status JsonDump(const Value& v, const JsonOptions& options, int level, int depth_left,
                      std::string& out) {
  if (depth_left <= 0) return Error("value nested too deeply for tojson");
  if (out.size() > options.max_bytes) return Error("tojson output too large (max_output_bytes)");
  auto newline = [&](int at_level) {
    if (!options.indent.has_value()) return;
    out += '\n';
    for (int i = 0; i < at_level; ++i) out += *options.indent;
  };
  switch (v.kind) {
    case Value::Kind::kNone:
      out += "null";
      return absl::OkStatus();
    case Value::Kind::kBool:
      out += v.boolean ? "true" : "false";
      return absl::OkStatus();
    case Value::Kind::kInt:
      absl::StrAppend(&out, v.integer);
      return absl::OkStatus();
    case Value::Kind::kFloat:
      if (std::isnan(v.number))
        out += "NaN";
      else if (std::isinf(v.number))
        out += v.number > 0 ? "Infinity" : "-Infinity";
      else
        out += FormatFloat(v.number);
      return absl::OkStatus();
    case Value::Kind::kString:
      AppendJsonString(v.text, options.ensure_ascii, out);
      return absl::OkStatus();
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      const auto& items = v.list->items;
      if (items.empty()) {
        out += "[]";
        return absl::OkStatus();
      }
      out += '[';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out += options.item_separator;
        newline(level + 1);
        RETURN_IF_ERROR(JsonDump(items[i], options, level + 1, depth_left - 1, out));
      }
      newline(level);
      out += ']';
      return absl::OkStatus();
    }
    case Value::Kind::kDict: {
      if (v.dict->entries.empty()) {
        out += "{}";
        return absl::OkStatus();
      }
      std::vector<const std::pair<Value, Value>*> entries;
      for (const auto& entry : v.dict->entries) entries.push_back(&entry);
      if (options.sort_keys) {
        absl::Status status = absl::OkStatus();
        std::stable_sort(entries.begin(), entries.end(), [&](const auto* x, const auto* y) {
          if (!status.ok()) return false;
          auto less = Less(x->first, y->first, "<");
          if (!less.ok()) {
            status = less.status();
            return false;
          }
          return *less;
        });
        RETURN_IF_ERROR(status);
      }
      out += '{';
      bool first = true;
      for (const auto* entry : entries) {
        if (!first) out += options.item_separator;
        first = false;
        newline(level + 1);
        const Value& key = entry->first;
        switch (key.kind) {
          case Value::Kind::kString:
            AppendJsonString(key.text, options.ensure_ascii, out);
            break;
          case Value::Kind::kNone:
            out += "\"null\"";
            break;
          case Value::Kind::kBool:
            out += key.boolean ? "\"true\"" : "\"false\"";
            break;
          case Value::Kind::kInt:
          case Value::Kind::kFloat: {
            std::string text;
            RETURN_IF_ERROR(JsonDump(key, options, level, depth_left - 1, text));
            absl::StrAppend(&out, "\"", text, "\"");
            break;
          }
          default:
            return Error(
                absl::StrCat("keys must be str, int, float, bool or None, not ", TypeName(key)));
        }
        out += options.key_separator;
        RETURN_IF_ERROR(JsonDump(entry->second, options, level + 1, depth_left - 1, out));
      }
      newline(level);
      out += '}';
      return absl::OkStatus();
    }
    default:
      return Error(absl::StrCat("Object of type ", TypeName(v), " is not JSON serializable"));
  }
}

}  // namespace moe::chat_template_internal
