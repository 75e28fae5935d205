// Python semantics of chat-template values (chat_template_internal.h's Value): what str(),
// repr(), json.dumps, ==, <, +, `in`, len() and the str methods do in CPython, for the
// types chat templates use. Errors are InvalidArgument with Python's message and no
// position; the evaluator adds "chat template line L, column C: ".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/chat_template_internal.h"

namespace moe::chat_template_internal {

absl::Status Error(std::string_view message);

// Python's type name ("str", "NoneType", ...) and jinja2's object description for messages.
std::string TypeName(const Value& v);
std::string ObjectDescription(const Value& v);

// The Undefined jinja2 gives for a missing attribute or variable.
Value MissingAttribute(const Value& object, std::string_view name);
Value UndefinedName(std::string_view name);

bool Truthy(const Value& v);
double AsDouble(const Value& v);  // for numbers (bool, int, float)
int64_t AsInt(const Value& v);    // for bool and int
bool IsHashable(const Value& v);

// Python's repr(float).
std::string FormatFloat(double d);

// str(v) as jinja2 prints it (Undefined prints nothing) and repr(v); `depth_left` bounds
// recursion into containers (namespaces can contain themselves).
absl::Status AppendStr(const Value& v, int depth_left, std::string& out);
absl::Status AppendRepr(const Value& v, int depth_left, std::string& out);
absl::StatusOr<std::string> Str(const Value& v, int depth_left);

bool Equal(const Value& a, const Value& b);
absl::StatusOr<bool> Less(const Value& a, const Value& b, std::string_view op);
absl::StatusOr<bool> Compare(const Value& a, const Value& b, CompareOp op);
// `item in container`.
absl::StatusOr<bool> Contains(const Value& container, const Value& item);

// + - * / // % ** on numbers, strings and sequences; results larger than `max_bytes` fail.
absl::StatusOr<Value> Arithmetic(BinaryOp op, const Value& a, const Value& b, size_t max_bytes);

// Containers, with their nesting depth computed.
Value MakeList(Value::Kind kind, std::vector<Value> items);  // kList or kTuple
Value MakeDict(std::vector<std::pair<Value, Value>> entries);
int ContainerDepth(const Value& v);

const Value* DictFind(const Dict& dict, const Value& key);
const Value* DictFind(const Dict& dict, std::string_view key);
void DictSet(Dict& dict, Value key, Value value);

// Python iteration (dicts give keys, strings code points, Undefined nothing) and len().
absl::StatusOr<std::vector<Value>> Iterate(const Value& v);
absl::StatusOr<int64_t> Length(const Value& v);

// Byte offset of every code point of valid UTF-8, plus text.size() at the end.
std::vector<size_t> CodePointOffsets(std::string_view text);
size_t CodePointCount(std::string_view text);

// str methods.
enum class CaseMapping { kUpper, kLower, kCapitalize, kTitle };
std::string MapCase(std::string_view text, CaseMapping mapping);
bool IsLowerOrUpper(std::string_view text, bool upper);  // str.islower() / str.isupper()
// str.strip/lstrip/rstrip; `chars` null: whitespace.
std::string_view Strip(std::string_view text, const std::string* chars, bool left, bool right);
// str.split; `separator` null: runs of whitespace. `max_split` < 0: no limit.
absl::StatusOr<std::vector<std::string>> Split(std::string_view text, const std::string* separator,
                                               int64_t max_split);
// str.replace; `count` < 0: all.
absl::StatusOr<std::string> Replace(std::string_view text, std::string_view old_text,
                                    std::string_view new_text, int64_t count, size_t max_bytes);

// json.dumps options as transformers' tojson passes them.
struct JsonOptions {
  bool ensure_ascii = false;
  std::optional<std::string> indent;       // one level of indentation; none: single line
  std::string_view item_separator = ", ";  // views into the caller's arguments
  std::string_view key_separator = ": ";
  bool sort_keys = false;
  size_t max_bytes = 0;
};
absl::Status JsonDump(const Value& v, const JsonOptions& options, int level, int depth_left,
                      std::string& out);

}  // namespace moe::chat_template_internal
