// Internals of the chat-template renderer (chat_template.h): the syntax tree the parser
// (chat_template_parser.cc) builds and the evaluator (chat_template.cc) walks, and the
// Python-like values the evaluator computes with. Not part of the public API.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer/utf8.h"

namespace moe::chat_template_internal {

// ---------------------------------------------------------------------------------------
// Values: what jinja2 computes with, restricted to the Python types chat templates meet.

struct List;
struct Dict;
struct LoopState;
struct Callable;

// A Python value. Lists and tuples are immutable (the sandbox forbids mutation), dicts too
// once built; only namespaces change after creation. Containers are shared, as Python
// references are.
struct Value {
  enum class Kind {
    kUndefined,  // jinja2's Undefined; `text` holds the message given when it is misused
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kList,
    kTuple,
    kDict,
    kNamespace,  // namespace(...): the only mutable object
    kLoop,       // the `loop` variable of a for loop
    kCallable,   // macro, global function or bound method
  };

  Kind kind = Kind::kUndefined;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0;
  std::string text;                       // kString; kUndefined: the error message
  std::shared_ptr<const List> list;       // kList, kTuple
  std::shared_ptr<Dict> dict;             // kDict, kNamespace
  std::shared_ptr<const LoopState> loop;  // kLoop
  std::shared_ptr<const Callable> callable;

  static Value Undefined(std::string message) {
    Value v;
    v.text = std::move(message);
    return v;
  }
  static Value None() { return Of(Kind::kNone); }
  static Value Bool(bool b) {
    Value v = Of(Kind::kBool);
    v.boolean = b;
    return v;
  }
  static Value Int(int64_t i) {
    Value v = Of(Kind::kInt);
    v.integer = i;
    return v;
  }
  static Value Float(double d) {
    Value v = Of(Kind::kFloat);
    v.number = d;
    return v;
  }
  static Value String(std::string s) {
    Value v = Of(Kind::kString);
    v.text = std::move(s);
    return v;
  }
  static Value Of(Kind kind) {
    Value v;
    v.kind = kind;
    return v;
  }

  bool is_undefined() const { return kind == Kind::kUndefined; }
  bool is_string() const { return kind == Kind::kString; }
  bool is_sequence() const { return kind == Kind::kList || kind == Kind::kTuple; }
  // bool, int and float: Python's numbers (bool is an int subclass).
  bool is_number() const {
    return kind == Kind::kBool || kind == Kind::kInt || kind == Kind::kFloat;
  }
};

// Nesting depth is tracked when containers are built so that deep structures are refused
// before printing or destroying them could exhaust the stack.
struct List {
  std::vector<Value> items;
  int depth = 1;
};

// Insertion-ordered, as Python dicts are. Lookup is linear: chat-template dicts are small.
struct Dict {
  std::vector<std::pair<Value, Value>> entries;
  int depth = 1;
};

struct LoopState {
  std::shared_ptr<const List> items;
  size_t index0 = 0;
};

// ---------------------------------------------------------------------------------------
// Syntax tree.

struct SourcePos {
  int line = 1;
  int column = 1;
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

enum class BinaryOp { kAdd, kSub, kMul, kDiv, kFloorDiv, kMod, kPow, kConcat };
enum class CompareOp { kEq, kNe, kLt, kLe, kGt, kGe, kIn, kNotIn };

struct Expr {
  enum class Kind {
    kLiteral,    // literal
    kName,       // name
    kList,       // operands
    kTuple,      // operands
    kDict,       // operands: key, value, key, value, ...
    kGetAttr,    // operands[0].name
    kGetItem,    // operands[0][operands[1]]
    kSlice,      // operands[0][operands[1]:operands[2]:operands[3]] (null: omitted)
    kCall,       // operands[0](operands[1:], keyword_args)
    kFilter,     // operands[0] | name(operands[1:], keyword_args)
    kTest,       // operands[0] is [not] name(operands[1:], keyword_args)
    kNegate,     // -operands[0]
    kPlus,       // +operands[0]
    kNot,        // not operands[0]
    kBinary,     // operands[0] binary_op operands[1]
    kCompare,    // operands[0] compare_ops[0] operands[1] compare_ops[1] ... (chained)
    kAnd,        // operands[0] and operands[1]
    kOr,         // operands[0] or operands[1]
    kCondition,  // operands[1] if operands[0] else operands[2] (null: no else)
  };

  Kind kind;
  SourcePos pos;
  Value literal;
  std::string name;
  std::vector<ExprPtr> operands;
  std::vector<std::pair<std::string, ExprPtr>> keyword_args;
  BinaryOp binary_op = BinaryOp::kAdd;
  std::vector<CompareOp> compare_ops;
  bool negated = false;  // kTest: `is not`
};

struct MacroParam {
  std::string name;
  ExprPtr default_value;  // null: required (undefined when not passed, as in jinja2)
};

struct Stmt {
  enum class Kind {
    kText,      // text
    kOutput,    // {{ expr }}
    kIf,        // branches (condition, body), else_body
    kFor,       // for targets in expr [if condition]: body [else: else_body]
    kSet,       // set targets = expr
    kSetAttr,   // set targets[0].text = expr (a namespace attribute)
    kSetBlock,  // set targets[0]: body
    kMacro,     // macro text(params): body
    kBreak,
    kContinue,
    kGeneration,  // transformers' {% generation %}: renders body
  };

  Kind kind;
  SourcePos pos;
  std::string text;
  std::vector<std::string> targets;
  bool unpack = false;  // kFor / kSet: targets written as a tuple (`k, v`)
  ExprPtr expr;
  ExprPtr condition;
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body;
  Body else_body;
  std::vector<MacroParam> params;
};

struct Program {
  Body body;
};

// Parses `source` (chat_template_parser.cc). Errors: "chat template line L, column C: what".
absl::StatusOr<std::unique_ptr<Program>> ParseProgram(std::string_view source);

// "chat template line L, column C: <message>".
absl::Status ErrorAt(SourcePos pos, std::string_view message);

// Python's str.isspace() for one code point: what jinja2's `\s` and str.strip() use.
bool IsPythonSpace(char32_t c);

// The tokenizer's UTF-8 helpers (utf8.h); every string a template handles is valid UTF-8
// (sources, context strings and escapes are checked when they come in).
using tokenizer_internal::AppendUtf8;
using tokenizer_internal::NextCodePoint;
using tokenizer_internal::Sv;

// The filters and tests the evaluator implements; the parser refuses other names, as
// jinja2 does when it compiles a template.
bool IsKnownFilter(std::string_view name);
bool IsKnownTest(std::string_view name);

}  // namespace moe::chat_template_internal
